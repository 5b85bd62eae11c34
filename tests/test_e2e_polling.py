"""End to end: registry polling, against a real `docker-registry` (open,
and behind htpasswd basic auth), with `poll = 1s`:

* v2 pushed under the followed tag: the poller finds the new digest and
  deploys it (a job like a webhook's, its source `poll`, no callback);
* v1.2.4 and v2.0.0 pushed with a `minor` policy over v1.2.3: it deploys
  v1.2.4 only, and then finds nothing newer;
* the poller asks for manifests with HEAD, never GET (a recording proxy in
  front of the registry), and waits out a 429's Retry-After.

Loopback only; every wait is bounded.
"""

import os
import shutil
import tempfile
import time
import unittest

from tests import support
from tests.support import ServiceProcess, get_json, inspect, main_section
from tests.test_e2e_private_registry import PASSWORD, USER, PrivateRegistry
from tests.test_e2e_recovery import wait_final


class PollingTestCase(unittest.TestCase):

    registry_class = support.Registry

    @classmethod
    def setUpClass(cls):
        support.start_class_fixture(cls, cls.registry_class())
        cls.addClassCleanup(support.stop_class_fixture, cls)
        cls.folder = tempfile.mkdtemp(prefix="autodeploy-polling-")
        cls.addClassCleanup(shutil.rmtree, cls.folder, True)

    def push(self, ref: str, version: str, tag: str = "") -> str:
        """Build `version` and push it as <ref>:<tag or version>; its image id."""
        tagged = "%s:%s" % (ref, tag or version)
        image_id = support.make_image(tagged, version, cmd=support.app_cmd(), push=False)
        self.images += [tagged, image_id]
        self.docker_push(tagged)
        return image_id

    def docker_push(self, tagged: str) -> None:
        support.docker("push", tagged)

    def serve(self, app: str, name: str, lines: str, extra: str = "") -> ServiceProcess:
        port = support.free_port()
        service = ServiceProcess(main_section(port, self.callbacks, extra=extra) + """
[e2e/{app}]
image = {ref}
container = {name}
settle = 1
poll = 1s
{lines}
""".format(app=app, ref="%s/e2e/%s" % (self.registry.host, app), name=name, lines=lines), self.env)
        self.addCleanup(service.stop)
        return service.start(port)


# Not solved yet: Podman's RepoDigests lists two digests for a pushed image
# (its local manifest's and the registry's), and the poller compares the
# first; so it sees a new digest at every poll. Its pulls also GET manifests
# through the recording proxy that the HEAD-only test watches.
PODMAN_DIGESTS = ("an image built and pushed from this Podman host names a digest the "
                  "registry does not store (its RepoDigests record the manifest before the "
                  "push), so polls queue extra jobs, which these tests count (open)")


@support.skip_on_podman(PODMAN_DIGESTS)
class PollingTest(PollingTestCase):

    def test_a_new_digest_under_the_followed_tag_is_deployed_by_a_poll(self):
        ref = "%s/e2e/polled" % self.registry.host
        self.push(ref, "v1", "latest")
        name, port = support.run_version(self, "polled", ref, "latest", answers="v1")
        service = self.serve("polled", name, "tag = latest")
        v2 = self.push(ref, "v2", "latest")
        job = wait_final(service, support.wait_for_jobs(service)[0]["id"])
        self.assertEqual((job["state"], job["source"], job["tag"]), ("succeeded", "poll", "latest"))
        self.assertEqual(inspect(name)["Image"], v2)
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % port, expect_body="v2\n"), "v2\n")
        time.sleep(2.5)  # two more polls: the digest it deployed is the one it finds
        self.assertEqual(len(support.wait_for_jobs(service)), 1)
        metrics = support.http_get(service.port, "/metrics")[2].decode()
        self.assertIn('autodeploy_last_poll_timestamp_seconds{app="e2e/polled"}', metrics)

    def test_a_minor_policy_deploys_the_newest_minor_and_not_the_next_major(self):
        ref = "%s/e2e/semver" % self.registry.host
        self.push(ref, "v1.2.3")
        name, port = support.run_version(self, "semver", ref, "v1.2.3")
        service = self.serve("semver", name, "tag_policy = minor")
        self.push(ref, "v2.0.0")
        self.push(ref, "v1.2.4")
        job = wait_final(service, support.wait_for_jobs(service)[0]["id"])
        self.assertEqual((job["state"], job["tag"]), ("succeeded", "v1.2.4"), job)
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % port, expect_body="v1.2.4\n"),
                         "v1.2.4\n")
        time.sleep(2.5)  # more polls: v2.0.0 stays outside the policy
        self.assertEqual(len(support.wait_for_jobs(service)), 1)
        self.assertTrue(inspect(name)["Config"]["Image"].startswith(ref + ":v1.2.4"))


class PollRequestsTest(PollingTestCase):
    """Through a recording proxy in front of the registry: what the poller asks."""

    def setUp(self):
        self.proxy = support.RecordingProxy(self.registry.url)
        self.addCleanup(self.proxy.close)
        ref = "%s/e2e/asked" % self.registry.host
        self.push(ref, "v1", "latest")
        self.image = "%s/e2e/asked" % self.proxy.host  # the app's image names the proxy
        name = "e2e-asked-%s" % self.label
        self.addCleanup(support.docker, "rm", "-f", name, check=False)
        support.docker("run", "-d", "--name", name, "--label",
                       "%s=%s" % (support.TEST_LABEL, self.label), self.image + ":latest")
        self.images.append(self.image + ":latest")
        port = support.free_port()
        self.service = ServiceProcess(main_section(port, self.callbacks) + """
[e2e/asked]
image = {image}
tag = latest
container = {name}
poll = 1s
""".format(image=self.image, name=name), self.env)
        self.addCleanup(self.service.stop)
        self.seen_before = len(self.proxy.hits)  # the docker run's pull
        self.service.start(port)

    def manifest_requests(self) -> list:
        return [(method, status) for _, method, path, status in self.proxy.hits[self.seen_before:]
                if "/manifests/" in path]

    def test_the_poller_asks_for_manifests_with_head_never_get(self):
        self.proxy.wait_for("HEAD", "/manifests/latest", 3, timeout=30)
        self.assertEqual({method for method, _ in self.manifest_requests()}, {"HEAD"})
        self.assertEqual(len(wait_for_job_list(self.service)), 0)  # it runs that digest already

    def test_a_429_retry_after_is_waited_out_before_the_next_poll(self):
        first = self.proxy.wait_for("HEAD", "/manifests/latest", 1, timeout=30)[0]
        self.proxy.throttle(1, retry_after=4)
        throttled = [at for at, _, path, status in self.proxy.hits
                     if status == 429 and "/manifests/" in path]
        deadline = time.monotonic() + 30
        while not throttled and time.monotonic() < deadline:
            time.sleep(0.05)
            throttled = [at for at, _, path, status in self.proxy.hits
                         if status == 429 and "/manifests/" in path]
        self.assertTrue(throttled, "no poll reached the throttle")
        after = [at for at, method, path, status in self.proxy.hits
                 if "/manifests/" in path and at > throttled[0]]
        deadline = time.monotonic() + 30
        while not after and time.monotonic() < deadline:
            time.sleep(0.05)
            after = [at for at, method, path, status in self.proxy.hits
                     if "/manifests/" in path and at > throttled[0]]
        self.assertTrue(after, "no poll after the 429")
        self.assertGreaterEqual(after[0] - throttled[0], 4.0 - 0.1)  # Retry-After, not the 1 s poll
        self.assertGreater(throttled[0], first)
        self.assertIn("poll failed", self.service.log_text())


def wait_for_job_list(service: ServiceProcess) -> list:
    status, doc = get_json(service.port, "/jobs")
    return doc["jobs"] if status == 200 else []


class PrivatePollingTest(PollingTestCase):

    registry_class = PrivateRegistry

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.login = os.path.join(cls.folder, "login")
        support.registry_login(cls.login, cls.registry.host, USER, PASSWORD)

    def docker_push(self, tagged: str) -> None:
        support.docker("--config", self.login, "push", tagged)

    def test_a_private_registry_is_polled_with_the_pull_credentials(self):
        ref = "%s/e2e/privpoll" % self.registry.host
        self.push(ref, "v1", "latest")
        name = "e2e-privpoll-%s" % self.label
        self.addCleanup(support.docker, "rm", "-f", name, check=False)
        port = support.free_port()
        support.docker("--config", self.login, "run", "-d", "--name", name, "--label",
                       "%s=%s" % (support.TEST_LABEL, self.label),
                       "-p", "127.0.0.1:%d:8080" % port, ref + ":latest")
        config = os.path.join(self.login, "config.json")
        service = self.serve("privpoll", name, "tag = latest", extra="docker_config = " + config)
        v2 = self.push(ref, "v2", "latest")
        job = wait_final(service, support.wait_for_jobs(service)[0]["id"])
        self.assertEqual((job["state"], job["source"]), ("succeeded", "poll"), job)
        self.assertEqual(inspect(name)["Image"], v2)
        self.assertNotIn(PASSWORD, service.log_text())


if __name__ == "__main__":
    unittest.main()
