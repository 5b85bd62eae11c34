"""End-to-end smoke test of the test harness itself (tests/support.py).

Needs a real Docker Engine: skipped without one, except under CI=true,
where it fails instead.
"""

import json
import time
import unittest

from tests import support


class HarnessSmokeTest(unittest.TestCase):
    """A registry, an imported busybox image, a container serving it."""

    @classmethod
    def setUpClass(cls):
        support.engine_env()  # skip (or fail under CI) before anything else
        cls.registry = support.Registry().start()

    @classmethod
    def tearDownClass(cls):
        cls.registry.stop()

    def setUp(self):
        self.ref = "%s/autodeploy-test/smoke:v1" % self.registry.host
        # Cleanups run even if a test fails half-way; later-added run first.
        self.addCleanup(support.cleanup_images, [self.ref])
        self.addCleanup(support.cleanup_containers, support.run_id())

    def run_container(self, *args):
        """docker run -d with our label; return the container id."""
        out = support.docker("run", "-d", "--label",
                             "%s=%s" % (support.TEST_LABEL, support.run_id()), *args)
        return out.stdout.strip()

    @staticmethod
    def inspect(container, template):
        return support.docker("inspect", "-f", template, container).stdout.strip()

    def test_image_is_pushed_and_serves_its_version(self):
        image_id = support.make_image(self.ref, "v1")
        self.assertTrue(image_id.startswith("sha256:"), image_id)

        tags_url = "%s/v2/autodeploy-test/smoke/tags/list" % self.registry.url
        tags = json.loads(support.wait_http(tags_url))
        self.assertEqual(tags["tags"], ["v1"])

        port = support.free_port()
        cid = self.run_container("-p", "127.0.0.1:%d:8080" % port, self.ref)
        support.wait_running(cid)  # probing a port before that stalls ~1 s
        self.assertEqual(self.inspect(cid, "{{.State.Running}}"), "true")
        body = support.wait_http("http://127.0.0.1:%d/" % port)
        self.assertEqual(body, "v1\n")

    @support.skip_on_podman("Podman 4.3's import refuses a HEALTHCHECK change, and without "
                            "systemd (this VM) Podman runs no healthcheck")
    def test_shell_and_healthcheck_work(self):
        support.make_image(
            self.ref, "v1", push=False,
            env=["GREETING=hello world"], labels={"com.example.role": "smoke"},
            healthcheck={"test": "wget -q -O /dev/null http://127.0.0.1:8080/",
                         "interval": 0.2, "timeout": 2, "retries": 3})
        config = json.loads(support.docker(
            "image", "inspect", "-f", "{{json .Config}}", self.ref).stdout)
        self.assertEqual(config["Labels"], {"com.example.role": "smoke"})
        self.assertEqual(config["Healthcheck"]["Retries"], 3)

        # /bin/sh -c works through the busybox symlinks.
        out = support.docker("run", "--rm", "--label",
                             "%s=%s" % (support.TEST_LABEL, support.run_id()),
                             self.ref, "/bin/sh", "-c", 'echo "$GREETING"; cat /www/index.html')
        self.assertEqual(out.stdout, "hello world\nv1\n")

        cid = self.run_container(self.ref)
        support.wait_running(cid)
        deadline = time.monotonic() + 20
        status = self.inspect(cid, "{{.State.Health.Status}}")
        while status != "healthy" and time.monotonic() < deadline:
            self.assertNotEqual(status, "unhealthy")
            time.sleep(0.1)
            status = self.inspect(cid, "{{.State.Health.Status}}")
        self.assertEqual(status, "healthy")


if __name__ == "__main__":
    unittest.main()
