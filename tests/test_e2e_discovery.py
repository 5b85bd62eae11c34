"""End to end: label discovery on the real Engine and registry. Containers
labelled autodeploy.enable=true are deployed by a push with no config
section for them; two from one image move together, and when the second
fails its health gate, the first stays on v2, the second is back on v1,
and the job says so; `serve` with no config deploys after a push to the
URL it printed."""

import os
import re
import subprocess
import sys
import tempfile
import time
import unittest

from tests import support
from tests.support import (ServiceProcess, hub_payload, inspect, main_section)
from tests.test_e2e_recovery import tail, wait_final


class DiscoveryE2ETest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.ids = support.start_app_fixture(cls, "labels", ("v1", "v2"), cmd=support.app_cmd())

    def run_labelled(self, key: str, labels: dict) -> str:
        """docker run <ref>:v1 labelled to follow v2; its name."""
        name = "e2e-%s-%s" % (key, support.run_id())
        self.addCleanup(support.docker, "rm", "-f", name, check=False)
        args = ["run", "-d", "--name", name, "--label", "%s=%s" % (support.TEST_LABEL, support.run_id()),
                "--label", "autodeploy.enable=true", "--label", "autodeploy.tag=v2",
                "--label", "autodeploy.settle=1", "--label", "autodeploy.stop_timeout=2"]
        for key_, value in labels.items():
            args += ["--label", "autodeploy.%s=%s" % (key_, value)]
        support.docker(*(args + ["%s:v1" % self.ref]))
        support.wait_running(name)
        support.wait_http(support.app_url(name, None), expect_body="v1\n")
        return name

    def start_service(self) -> ServiceProcess:
        port = support.free_port()
        service = ServiceProcess(main_section(port, self.callbacks), self.env)
        self.addCleanup(service.stop)
        return service.start(port)

    def push(self, service, key):
        status, answer = service.post(hub_payload("e2e/labels", "v2", self.callbacks.url(key)))
        self.assertEqual(status, 202, answer)
        return wait_final(service, answer["job"], timeout=90)

    def test_a_labelled_container_with_no_section_is_redeployed_by_a_push(self):
        name = self.run_labelled("one", {})
        service = self.start_service()
        job = self.push(service, "one")
        self.assertEqual(job["state"], "succeeded", tail(service, 40))
        self.assertEqual(inspect(name)["Image"], self.ids["v2"])
        support.wait_http(support.app_url(name, None), expect_body="v2\n")
        self.assertEqual(support.containers_named(name), [name])
        self.assertEqual(self.callbacks.wait_for("one")["state"], "success")

    def test_two_containers_move_and_a_failing_second_stops_the_roll_out(self):
        first = self.run_labelled("a", {})
        second = self.run_labelled("b", {"depends_on": first, "health_tcp": "{ip}:9", "order": "stop-first",
                                         "health_timeout": "3"})
        service = self.start_service()
        job = self.push(service, "two")
        self.assertEqual(job["state"], "rolled_back", tail(service, 60))
        self.assertEqual(inspect(first)["Image"], self.ids["v2"])
        self.assertEqual(inspect(second)["Image"], self.ids["v1"])
        self.assertTrue(inspect(second)["State"]["Running"])
        support.wait_http(support.app_url(first, None), expect_body="v2\n")
        support.wait_http(support.app_url(second, None), expect_body="v1\n")
        description = job["description"]
        self.assertTrue(description.startswith("%s now runs %s:v2" % (first, self.ref)), description)
        self.assertIn("; %s rolled back: the new container failed" % second, description)
        callback = self.callbacks.wait_for("two")
        self.assertEqual(callback["state"], "failure")
        self.assertEqual(callback["description"][:60], description[:60])

    def test_serve_with_no_config_deploys_after_a_push_to_the_printed_url(self):
        name = self.run_labelled("zero", {})
        folder = tempfile.mkdtemp(prefix="autodeploy-e2e-")
        port = support.free_port()
        env = dict(self.env, STATE_DIRECTORY=os.path.join(folder, "state"))
        env.pop("AUTODEPLOY_CONFIG", None)
        log_path = os.path.join(folder, "out.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, os.path.join(support.ROOT, "autodeploy.py"), "serve",
                 "--listen", "127.0.0.1:%d" % port], env=env, cwd=folder,
                stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: (process.terminate(), process.wait(30)))
        deadline = time.monotonic() + 20
        url, text = None, ""
        while url is None or "listening on" not in text:
            with open(log_path) as fh:
                text = fh.read()
            found = re.search(r"http://127\.0\.0\.1:%d/deploy/\S+" % port, text)
            url = found.group(0) if found else None
            self.assertIsNone(process.poll(), text)
            self.assertLess(time.monotonic(), deadline, text)
            time.sleep(0.05)
        token_file = os.path.join(folder, "state", "token")
        self.assertEqual(os.stat(token_file).st_mode & 0o777, 0o600)
        import urllib.request
        request = urllib.request.Request(url, data=hub_payload("e2e/labels", "v2"), method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            self.assertEqual(response.status, 202)
        deadline = time.monotonic() + 60
        # The job's end, from the log (no admin token here): mid-swap the
        # name is briefly unused, so the container is inspected only after.
        while "repo=e2e/labels succeeded:" not in open(log_path).read():
            self.assertLess(time.monotonic(), deadline, open(log_path).read())
            time.sleep(0.2)
        self.assertEqual(inspect(name)["Image"], self.ids["v2"])
        support.wait_running(name)
        support.wait_http(support.app_url(name, None), expect_body="v2\n")


if __name__ == "__main__":
    unittest.main()
