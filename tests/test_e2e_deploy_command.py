"""End to end: the `deploy` command goes through the service.

With `serve` running, the command hands its job over the control socket in
the state directory: the job is journaled, shows in /jobs, `show` and
/metrics, and waits its turn behind a webhook's deploy of the same
container instead of racing it. With no service running, the command runs
the job through a service of its own, on the same journal.

A real Engine and registry; containers carry autodeploy.test=<run id>.
"""

import os
import re
import subprocess
import sys
import unittest

from tests import support
from tests.support import ServiceProcess, get_json, hub_payload, http_get, inspect, main_section


class DeployCommandTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.ids = support.start_app_fixture(cls, "cmd", ("v1", "v2", "v3"), cmd=support.app_cmd())
        cls.container = "e2e-cmd-%s" % cls.label
        cls.port = support.free_port()
        cls.config_text = main_section(cls.port, cls.callbacks) + """
[e2e/cmd]
image = {ref}
tag = v1 v2 v3
container = {name}
settle = 2
cooldown = 0
remove_old_image = no
labels = autodeploy.test={run}
""".format(ref=cls.ref, name=cls.container, run=cls.label)
        cls.service = ServiceProcess(cls.config_text, cls.env)
        cls.addClassCleanup(cls.service.stop)
        cls.service.start(cls.port)
        status, _ = cls.service.post(hub_payload("e2e/cmd", "v1", cls.callbacks.url("cmd-v1")))
        assert status == 202, status
        outcome = cls.callbacks.wait_for("cmd-v1", timeout=60)
        assert outcome["state"] == "success", outcome

    def command(self, *args, check=True):
        result = subprocess.run(
            [sys.executable, os.path.join(support.ROOT, "autodeploy.py"), "--config",
             self.service.config] + list(args),
            env=self.service.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        if check:
            self.assertEqual(result.returncode, 0, "%s\n%s" % (result.stdout, result.stderr))
        return result

    def job_id(self, stdout):
        found = re.search(r"^job ([0-9a-f]{12})", stdout, re.M)
        self.assertIsNotNone(found, stdout)
        return found.group(1)

    def test_1_a_running_service_takes_the_job_and_reports_it_everywhere(self):
        out = self.command("deploy", "e2e/cmd:v2").stdout
        self.assertIn("queued by the running service", out)
        self.assertIn("succeeded:", out)
        job = self.job_id(out)
        self.assertEqual(inspect(self.container)["Image"], self.ids["v2"])
        status, row = get_json(self.port, "/jobs/" + job)
        self.assertEqual((status, row["state"], row["source"]), (200, "succeeded", "cli"))
        _, _, metrics = http_get(self.port, "/metrics")
        self.assertRegex(metrics.decode(), r'autodeploy_deploys_total\{app="e2e/cmd",outcome="succeeded"\} [2-9]')
        shown = self.command("show", job).stdout
        self.assertIn("received", shown)
        self.assertIn("(from cli)", shown)
        self.assertIn(job, self.command("history").stdout)

    def test_2_a_command_during_a_webhook_deploy_waits_its_turn(self):
        status, answer = self.service.post(hub_payload("e2e/cmd", "v3", self.callbacks.url("cmd-v3")))
        self.assertEqual(status, 202, answer)
        # The webhook's job is in its 2 s settle time (or about to be): the
        # command's job for the same container must run after it, not beside it.
        out = self.command("deploy", "e2e/cmd:v3").stdout
        self.assertRegex(out, r"(up_to_date|succeeded): ")
        command_job = self.job_id(out)
        self.assertEqual(self.callbacks.wait_for("cmd-v3", timeout=60)["state"], "success")
        _, webhook_row = get_json(self.port, "/jobs/" + answer["job"])
        _, command_row = get_json(self.port, "/jobs/" + command_job)
        self.assertGreaterEqual(command_row["started"], webhook_row["finished"],
                                (webhook_row, command_row))
        state = inspect(self.container)
        self.assertTrue(state["State"]["Running"])
        self.assertEqual(state["Image"], self.ids["v3"])

    def test_3_with_no_service_running_it_deploys_through_the_same_journal(self):
        self.service.stop(keep_folder=True)
        self.addCleanup(self.service.start, self.port)  # for the class's other tests and clean-up
        out = self.command("deploy", "e2e/cmd:v1").stdout
        self.assertNotIn("running service", out)
        self.assertIn("succeeded:", out)
        job = self.job_id(out)
        self.assertEqual(inspect(self.container)["Image"], self.ids["v1"])
        row = support.journal_rows(self.service)[job]
        self.assertEqual((row["state"], row["source"]), ("succeeded", "cli"))

    def test_4_an_unconfigured_repository_is_refused(self):
        result = self.command("deploy", "e2e/nothing:v1", check=False)
        self.assertEqual(result.returncode, 2)
        self.assertIn("not configured", result.stderr)


if __name__ == "__main__":
    unittest.main()
