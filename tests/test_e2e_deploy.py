"""End to end: the real service process, a real Docker Engine, a real registry.

Each test pushes images to a throwaway registry, POSTs Docker Hub payloads to
`autodeploy.py serve` and checks what runs afterwards, through the app's
published 127.0.0.1 port and `docker inspect`. Everything created carries
the label autodeploy.test=<run id> and is removed afterwards.
"""

import os
import shutil
import tempfile
import threading
import unittest

from tests import support
from tests.support import (TOKEN, ServiceProcess, app_cmd, containers_named, hub_payload, inspect,
                           main_section)


class DeployEndToEndTest(unittest.TestCase):
    """One service, one registry, a few apps; tests use separate apps."""

    @classmethod
    def setUpClass(cls):
        support.start_class_fixture(cls)
        cls.app_port = support.free_port()
        cls.race_port = support.free_port()
        cls.bind_dir = tempfile.mkdtemp(prefix="autodeploy-bind-")
        with open(os.path.join(cls.bind_dir, "bind.txt"), "w") as fh:
            fh.write("from the host\n")
        cls.volume = "autodeploy-test-%s-data" % cls.label
        cls.service_port = support.free_port()
        config = main_section(cls.service_port, cls.callbacks, workers=3, admin_token=None) + """
[e2e/web]
image = {reg}/e2e/web
tag = latest missing
container = e2e-web-{run}
stop_timeout = 5
settle = 1
ports = 127.0.0.1:{app_port}:8080
env =
    GREETING=hello world
    MODE=e2e
volumes = {bind}:/bind:ro, {volume}:/data
labels =
    autodeploy.test={run}
    com.example.team=platform
restart = unless-stopped

[e2e/race]
image = {reg}/e2e/race
container = e2e-race-{run}
settle = 1
ports = 127.0.0.1:{race_port}:8080
labels =
    autodeploy.test={run}
""".format(reg=cls.registry.host, run=cls.label, app_port=cls.app_port, race_port=cls.race_port,
           bind=cls.bind_dir, volume=cls.volume)
        cls.service = ServiceProcess(config, cls.env)
        cls.service.start(cls.service_port)

    @classmethod
    def tearDownClass(cls):
        cls.service.stop()
        support.stop_class_fixture(cls)
        support.docker("volume", "rm", "-f", cls.volume, check=False)
        shutil.rmtree(cls.bind_dir, ignore_errors=True)

    def push(self, repo: str, version: str) -> str:
        ref = "%s/%s:latest" % (self.registry.host, repo)
        self.images.append(ref)
        image_id = support.make_image(ref, version, cmd=app_cmd())
        self.images.append(image_id)
        return image_id

    def deploy(self, repo: str, tag: str, callback_name: str) -> dict:
        status, answer = self.service.post(hub_payload(repo, tag, self.callbacks.url(callback_name)))
        self.assertEqual(status, 202, answer)
        self.assertTrue(answer["job"])
        return self.callbacks.wait_for(callback_name)

    def answer_of(self, container: str, port: int) -> str:
        support.wait_running(container)
        return support.wait_http("http://127.0.0.1:%d/" % port, timeout=20)

    def test_push_v1_then_v2_keeps_the_configuration_and_a_missing_tag_changes_nothing(self):
        name = "e2e-web-%s" % self.label
        v1 = self.push("e2e/web", "v1")
        callback = self.deploy("e2e/web", "latest", "web-v1")
        self.assertEqual(callback["state"], "success", callback)
        self.assertEqual(callback["context"], "autodeploy")
        self.assertEqual(self.answer_of(name, self.app_port), "v1\n")
        support.docker("exec", name, "sh", "-c", "echo kept > /data/note.txt")
        before = inspect(name)
        self.assertEqual(before["Image"], v1)

        v2 = self.push("e2e/web", "v2")
        callback = self.deploy("e2e/web", "latest", "web-v2")
        self.assertEqual(callback["state"], "success", callback)
        self.assertEqual(self.answer_of(name, self.app_port), "v2\n")
        after = inspect(name)
        self.assertEqual(after["Image"], v2)
        self.assertNotEqual(after["Id"], before["Id"])
        self.assertEqual(after["Name"], "/" + name)
        self.assertEqual(after["HostConfig"]["PortBindings"], before["HostConfig"]["PortBindings"])
        self.assertEqual(after["HostConfig"]["PortBindings"]["8080/tcp"],
                         [{"HostIp": "127.0.0.1", "HostPort": str(self.app_port)}])
        self.assertEqual(support.user_env(after), support.user_env(before))
        # Podman puts HOSTNAME=<the container's hostname> in Env: the new
        # container must carry its own, not the old one's.
        self.assertNotIn("HOSTNAME=" + before["Config"]["Hostname"], after["Config"]["Env"])
        self.assertIn("GREETING=hello world", after["Config"]["Env"])
        self.assertEqual(after["Config"]["Labels"], before["Config"]["Labels"])
        self.assertEqual(after["Config"]["Labels"]["com.example.team"], "platform")
        self.assertEqual(after["HostConfig"]["RestartPolicy"], {"Name": "unless-stopped", "MaximumRetryCount": 0})
        self.assertEqual(after["HostConfig"]["Binds"], before["HostConfig"]["Binds"])
        self.assertEqual(support.docker("exec", name, "cat", "/bind/bind.txt").stdout, "from the host\n")
        self.assertEqual(support.docker("exec", name, "cat", "/data/note.txt").stdout, "kept\n")
        self.assertEqual(list(after["NetworkSettings"]["Networks"]), list(before["NetworkSettings"]["Networks"]))
        self.assertEqual(containers_named(name), [name])

        # The same image again: nothing is touched.
        callback = self.deploy("e2e/web", "latest", "web-v2-again")
        self.assertEqual(callback["state"], "success")
        self.assertIn("already runs", callback["description"])
        self.assertEqual(inspect(name)["Id"], after["Id"])

        # A tag the registry does not have: failure reported, v2 untouched.
        callback = self.deploy("e2e/web", "missing", "web-missing")
        self.assertIn(callback["state"], ("failure", "error"))
        self.assertIn("pull failed", callback["description"])
        self.assertEqual(inspect(name)["Id"], after["Id"])
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % self.app_port), "v2\n")
        self.assertEqual(containers_named(name), [name])
        self.assertNotIn(TOKEN, self.service.log_text())

    def test_two_webhooks_at_once_leave_exactly_one_container(self):
        name = "e2e-race-%s" % self.label
        self.push("e2e/race", "r1")
        self.assertEqual(self.deploy("e2e/race", "latest", "race-1")["state"], "success")
        r2 = self.push("e2e/race", "r2")
        results = []
        barrier = threading.Barrier(2)

        def fire(n):
            barrier.wait()
            results.append(self.service.post(hub_payload("e2e/race", "latest", self.callbacks.url("race-2-%d" % n))))
        threads = [threading.Thread(target=fire, args=(n,)) for n in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual([status for status, _ in results], [202, 202], results)
        outcomes = [self.callbacks.wait_for("race-2-%d" % n) for n in (1, 2)]
        self.assertEqual([o["state"] for o in outcomes], ["success", "success"], outcomes)
        self.assertEqual(containers_named(name), [name])
        self.assertEqual(inspect(name)["Image"], r2)
        self.assertEqual(self.answer_of(name, self.race_port), "r2\n")
        log = self.service.log_text()
        self.assertNotIn("Conflict", log)
        self.assertNotIn("already in use", log)

    def test_not_configured_repository_is_422_and_touches_nothing(self):
        before = support.docker("ps", "-aq").stdout
        status, answer = self.service.post(hub_payload("e2e/unknown", "latest", self.callbacks.url("unknown")))
        self.assertEqual(status, 422)
        self.assertIn("not configured", answer["error"])
        status, _ = self.service.post(hub_payload("e2e/web", "nightly"))
        self.assertEqual(status, 422)
        self.assertEqual(support.docker("ps", "-aq").stdout, before)

    def test_malformed_bodies_are_400_and_a_wrong_token_404(self):
        for body in (b"{not json", b"[]", b'{"repository": {}}', b'{"repository": {"repo_name": "e2e/web"}}'):
            with self.subTest(body=body):
                status, answer = self.service.post(body)
                self.assertEqual(status, 400)
                self.assertIn("error", answer)
        status, _ = self.service.post(hub_payload("e2e/web", "latest"), token="x" * 40)
        self.assertEqual(status, 404)
        self.assertIsNone(self.service.process.poll(), "the service must still run")


if __name__ == "__main__":
    unittest.main()
