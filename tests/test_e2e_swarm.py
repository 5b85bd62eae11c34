"""End to end: Swarm services, rolled out by Swarm itself, on a real
single-node swarm (`docker swarm init --advertise-addr 127.0.0.1`, left at
the end when this class made it), the real service and a real registry.

The ingress routing mesh does not answer on this VM: what runs is read from
the tasks themselves (`docker inspect` of the service's running tasks).
"""

import json
import os
import signal
import subprocess
import sys
import time
import unittest

from tests import support
from tests.support import ServiceProcess, app_cmd, hub_payload, journal_rows, main_section

SWARM_APPS = ("swarm-ok", "swarm-bad", "swarm-twice", "swarm-crash", "swarm-poll")


@support.skip_on_podman("Podman has no Swarm mode")
class SwarmServiceTest(unittest.TestCase):
    """One service process, a swarm, a Swarm service per scenario."""

    @classmethod
    def setUpClass(cls):
        support.start_class_fixture(cls)
        cls.addClassCleanup(support.stop_class_fixture, cls)
        cls.made_swarm = cls.join_swarm()
        cls.ids = {}
        for app in SWARM_APPS:
            ref = "%s/e2e/%s" % (cls.registry.host, app)
            cls.ids[app] = support.make_versions(cls.images, ref, ["v1"], cmd=app_cmd())
            cls.create_service(app, ref + ":v1")
        sections = "".join("""
[e2e/{app}]
image = {reg}/e2e/{app}
tag = v2
service = {app}-{run}
swarm_timeout = 90{poll}
""".format(app=app, reg=cls.registry.host, run=cls.label,
           poll="\npoll = 1s" if app == "swarm-poll" else "") for app in SWARM_APPS)
        cls.service_port = support.free_port()
        config = main_section(cls.service_port, cls.callbacks, admin_token=None) + sections
        cls.service = ServiceProcess(config, cls.env).start(cls.service_port)
        cls.addClassCleanup(cls.service.stop)

    @classmethod
    def join_swarm(cls) -> bool:
        """Init a single-node swarm (True), or use the one the Engine is a
        manager of (False); SkipTest with the reason when it cannot."""
        state = support.docker("info", "--format", "{{json .Swarm}}").stdout
        swarm = json.loads(state)
        if swarm.get("LocalNodeState") == "active":
            if not swarm.get("ControlAvailable"):
                raise unittest.SkipTest("the Engine is a Swarm worker, not a manager")
            return False
        made = support.docker("swarm", "init", "--advertise-addr", "127.0.0.1", check=False)
        if made.returncode != 0:
            raise unittest.SkipTest("docker swarm init failed: %s" % (made.stderr or made.stdout).strip())
        cls.addClassCleanup(support.docker, "swarm", "leave", "--force", check=False)
        return True

    @classmethod
    def create_service(cls, app: str, image: str) -> None:
        name = "%s-%s" % (app, cls.label)
        support.docker("service", "create", "--detach=false", "--quiet", "--name", name,
                       "--replicas", "2", "--update-order", "start-first",
                       "--update-parallelism", "1", "--update-failure-action", "rollback",
                       "--update-monitor", "5s", "--label", "autodeploy.test=" + cls.label,
                       image)
        cls.addClassCleanup(support.docker, "service", "rm", name, check=False)

    def push_v2(self, app: str, content: str = "v2", **image) -> str:
        """Push an image serving `content` under the tag the section follows (v2); its digest."""
        ref = "%s/e2e/%s:v2" % (self.registry.host, app)
        self.images.append(ref)
        self.images.append(support.make_image(ref, content, **image))
        digests = json.loads(support.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                                            ref).stdout)
        return [d for d in digests if d.startswith(self.registry.host)][0].split("@")[1]

    def running_images(self, app: str) -> list:
        """Spec.ContainerSpec.Image of each running task of the app's service."""
        name = "%s-%s" % (app, self.label)
        ids = support.docker("service", "ps", "-q", "--filter", "desired-state=running",
                             name).stdout.split()
        tasks = json.loads(support.docker("inspect", *ids).stdout)
        return sorted(task["Spec"]["ContainerSpec"]["Image"] for task in tasks
                      if task["Status"]["State"] == "running")

    def deploy(self, app: str, callback_name: str) -> dict:
        self.post(app, callback_name)
        return self.callbacks.wait_for(callback_name, timeout=120)

    def post(self, app: str, callback_name: str) -> None:
        status, answer = self.service.post(hub_payload("e2e/" + app, "v2", self.callbacks.url(callback_name)))
        self.assertEqual(status, 202, answer)

    def test_a_start_first_service_moves_every_task_to_the_new_digest(self):
        digest = self.push_v2("swarm-ok", cmd=app_cmd())
        callback = self.deploy("swarm-ok", "ok")
        self.assertEqual(callback["state"], "success", callback)
        self.assertEqual(self.running_images("swarm-ok"),
                         ["%s/e2e/swarm-ok:v2@%s" % (self.registry.host, digest)] * 2)
        row = [r for r in journal_rows(self.service).values() if r["app"] == "e2e/swarm-ok"][-1]
        self.assertEqual(row["state"], "succeeded", row)
        self.assertIn("2/2 tasks updated", row["description"])

    def test_a_new_version_that_exits_at_once_is_rolled_back_by_swarm(self):
        self.push_v2("swarm-bad", cmd=["/bin/sh", "-c", "exit 3"])
        callback = self.deploy("swarm-bad", "bad")
        self.assertEqual(callback["state"], "failure", callback)
        row = [r for r in journal_rows(self.service).values() if r["app"] == "e2e/swarm-bad"][-1]
        self.assertEqual(row["state"], "rolled_back", row)
        self.assertIn("update rolled back due to failure", row["description"])  # Swarm's own words
        self.assertIn("non-zero exit (3)", row["description"])
        v1 = self.running_images("swarm-bad")
        self.assertEqual(len(v1), 2, v1)
        self.assertTrue(all(":v1@sha256:" in image for image in v1), v1)

    def test_two_pushes_in_quick_succession_end_on_the_newer_digest_one_update_at_a_time(self):
        self.push_v2("swarm-twice", cmd=app_cmd())
        self.post("swarm-twice", "first")
        newer = self.push_v2("swarm-twice", "v3", cmd=app_cmd())
        self.post("swarm-twice", "second")
        for name in ("first", "second"):
            self.assertEqual(self.callbacks.wait_for(name, timeout=120)["state"], "success")
        self.assertEqual(self.running_images("swarm-twice"),
                         ["%s/e2e/swarm-twice:v2@%s" % (self.registry.host, newer)] * 2)
        rows = sorted((r for r in journal_rows(self.service).values()
                       if r["app"] == "e2e/swarm-twice" and r["started"]),
                      key=lambda r: r["started"])
        for earlier, later in zip(rows, rows[1:]):
            self.assertLessEqual(earlier["finished"], later["started"], rows)  # never two at once
        self.assertEqual(rows[-1]["digest"], newer, rows)

    def test_a_crash_while_swarm_rolls_out_is_followed_to_its_end_not_sent_again(self):
        digest = self.push_v2("swarm-crash", cmd=app_cmd())
        self.post("swarm-crash", "crash")
        deadline = time.monotonic() + 60
        while "Swarm rolls it out" not in self.service.log_text():
            self.assertLess(time.monotonic(), deadline, self.service.log_text())
            time.sleep(0.05)
        self.service.process.send_signal(signal.SIGKILL)  # mid roll-out (start-first, 5 s monitor)
        self.service.process.wait(10)
        self.service.log.close()
        self.service.start(self.service_port)
        self.assertEqual(self.callbacks.wait_for("crash", timeout=120)["state"], "success")
        row = [r for r in journal_rows(self.service).values() if r["app"] == "e2e/swarm-crash"][-1]
        self.assertEqual(row["state"], "succeeded", row)
        self.assertIn("before the crash: following its roll-out", row["log"])
        # One update: a second one, sent after the restart, would have left v2 in PreviousSpec.
        previous = json.loads(support.docker(
            "service", "inspect", "--format", "{{json .PreviousSpec.TaskTemplate.ContainerSpec.Image}}",
            "swarm-crash-" + self.label).stdout)
        self.assertIn("/e2e/swarm-crash:v1@sha256:", previous)
        self.assertEqual(self.running_images("swarm-crash"),
                         ["%s/e2e/swarm-crash:v2@%s" % (self.registry.host, digest)] * 2)

    def test_check_lists_the_services_on_a_manager(self):
        checked = subprocess.run([sys.executable, os.path.join(support.ROOT, "autodeploy.py"),
                                  "--config", self.service.config, "check"], env=self.service.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        out = checked.stdout.decode()
        self.assertEqual(checked.returncode, 0, out + checked.stderr.decode())
        self.assertIn("Swarm manager: %d service(s) named in sections" % len(SWARM_APPS), out)
        self.assertIn("e2e/swarm-ok -> Swarm service swarm-ok-%s" % self.label, out)
        self.assertIn("service swarm-ok-%s (e2e/swarm-ok) runs %s/e2e/swarm-ok:" % (
            self.label, self.registry.host), out)

    def test_a_poll_finds_the_new_digest_and_swarm_rolls_it_out(self):
        digest = self.push_v2("swarm-poll", cmd=app_cmd())
        deadline = time.monotonic() + 90
        while True:
            rows = [r for r in journal_rows(self.service).values()
                    if r["app"] == "e2e/swarm-poll" and r["state"] == "succeeded"]
            if rows:
                break
            self.assertLess(time.monotonic(), deadline, self.service.log_text()[-3000:])
            time.sleep(0.5)
        self.assertEqual((rows[0]["source"], rows[0]["digest"]), ("poll", digest))
        self.assertEqual(self.running_images("swarm-poll"),
                         ["%s/e2e/swarm-poll:v2@%s" % (self.registry.host, digest)] * 2)
        time.sleep(2.5)  # more polls: the service runs what the registry has; no new job
        self.assertEqual(len([r for r in journal_rows(self.service).values()
                              if r["app"] == "e2e/swarm-poll"]), 1)


if __name__ == "__main__":
    unittest.main()
