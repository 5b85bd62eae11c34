"""End to end: senders other than Docker Hub, and exact digests.

* a real `docker-registry` sends its own notifications (pushes, pulls,
  blobs: everything it does) to the service, with an Authorization header
  as the signing secret: `docker push` of v2 replaces the container, and
  nothing else the registry reports starts a job. No hand-written payload;
* the native format with a digest deploys exactly that digest, though the
  tag has moved on since; the container shows the tag.
"""

import json
import unittest

import dockerapi
from tests import support
from tests.support import (CallbackReceiver, ServiceProcess, inspect, journal_rows,
                           main_section)
from tests.test_e2e_recovery import wait_final

SECRET = "registry-secret-" + "5a" * 16


def shown(ref: str, tag: str, digest: str) -> str:
    """The image a container created from ref:tag@digest names: that, on
    Docker; Podman drops the tag (ref@digest)."""
    return "%s@%s" % (ref, digest) if support.is_podman() else "%s:%s@%s" % (ref, tag, digest)


def registry_digest(ref: str, tag: str) -> str:
    """The digest the registry stores for ref:tag (Podman's RepoDigests may
    name the manifest it built before pushing, not the registry's)."""
    return dockerapi.RegistryClient().manifest_digest(ref, tag, None).digest


class RegistryNotificationsTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.env = support.engine_env()
        cls.label = support.run_id()
        cls.images = []
        cls.callbacks = CallbackReceiver()
        cls.addClassCleanup(cls.callbacks.close)
        cls.port = support.free_port()
        cls.registry = support.Registry(
            notify_url="http://127.0.0.1:%d/deploy/%s" % (cls.port, support.TOKEN),
            notify_headers={"Authorization": "Bearer " + SECRET}).start()
        cls.addClassCleanup(cls.registry.stop)
        cls.addClassCleanup(support.cleanup_images, cls.images)
        cls.addClassCleanup(support.cleanup_containers, cls.label)
        cls.ref = "%s/e2e/notified" % cls.registry.host

    def test_a_docker_push_of_the_followed_tag_replaces_the_container(self):
        ids = support.make_versions(self.images, self.ref, ("v1",), cmd=support.app_cmd())
        name, app_port = support.run_version(self, "notified", self.ref, "v1")
        service = ServiceProcess(main_section(self.port, self.callbacks) + """
[e2e/notified]
image = {ref}
tag = v2
container = {name}
settle = 1
signing_secret = {secret}
""".format(ref=self.ref, name=name, secret=SECRET), self.env)
        self.addCleanup(service.stop)
        service.start(self.port)
        ids.update(support.make_versions(self.images, self.ref, ("v2",), cmd=support.app_cmd()))
        pushed = [registry_digest(self.ref, "v2")]
        jobs = support.wait_for_jobs(service, 1)
        job = wait_final(service, jobs[0]["id"])
        self.assertEqual(job["state"], "succeeded", job)
        self.assertEqual(job["source"], "distribution")
        self.assertEqual([job["digest"]], pushed)
        self.assertEqual(inspect(name)["Image"], ids["v2"])
        self.assertEqual(inspect(name)["Config"]["Image"], shown(self.ref, "v2", job["digest"]))
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % app_port, expect_body="v2\n"),
                         "v2\n")
        # The pull of v2 and the blob pushes were reported too: none became a job.
        self.assertEqual(len(journal_rows(service)), 1)
        self.assertIn("ignored", service.log_text())


class ExactDigestTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        support.start_app_fixture(cls, "digest", ())

    def test_the_named_digest_is_deployed_though_the_tag_moved_on(self):
        ids = support.make_versions(self.images, self.ref, ("v0", "latest"), cmd=support.app_cmd())
        first = ids["latest"]
        digest = registry_digest(self.ref, "latest")
        name, app_port = support.run_version(self, "digest", self.ref, "v0")
        support.make_image(self.ref + ":latest", "moved", cmd=support.app_cmd())  # the tag moves on
        self.images.append(self.ref + ":latest")
        service_port = support.free_port()
        service = ServiceProcess(main_section(service_port, self.callbacks) + """
[e2e/digest]
image = {ref}
tag = latest
container = {name}
settle = 1
""".format(ref=self.ref, name=name), self.env)
        self.addCleanup(service.stop)
        service.start(service_port)
        status, answer = service.post(json.dumps({"image": self.ref, "tag": "latest",
                                                  "digest": digest}).encode())
        self.assertEqual(status, 202, answer)
        job = wait_final(service, answer["job"])
        self.assertEqual(job["state"], "succeeded", job)
        self.assertEqual(job["digest"], digest)
        self.assertEqual(inspect(name)["Image"], first)
        self.assertEqual(inspect(name)["Config"]["Image"], shown(self.ref, "latest", digest))
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % app_port, expect_body="latest\n"),
                         "latest\n")

    def test_a_malformed_digest_is_refused_and_nothing_is_touched(self):
        service_port = support.free_port()
        service = ServiceProcess(main_section(service_port, self.callbacks) + """
[e2e/digest]
image = {ref}
tag = latest
container = e2e-digest-none
""".format(ref=self.ref), self.env)
        self.addCleanup(service.stop)
        service.start(service_port)
        status, answer = service.post(json.dumps({"image": self.ref, "tag": "latest",
                                                  "digest": "sha256:xxxx"}).encode())
        self.assertEqual(status, 400, answer)
        self.assertIn("digest", answer["error"])
        self.assertEqual(journal_rows(service), {})


if __name__ == "__main__":
    unittest.main()
