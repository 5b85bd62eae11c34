"""End to end: failure, rollback and success notifications (generic JSON and
Slack-compatible), and SIGTERM past its stop_deadline in the middle of a
swap, on the real service, a real Docker Engine and a real registry."""

import signal
import subprocess
import time
import unittest

from tests import support
from tests.support import (CallbackReceiver, ServiceProcess, app_cmd, containers_named,
                           hub_payload, inspect, journal_rows, main_section)


def wait_for_log(service: ServiceProcess, *fragments: str, timeout: float = 60.0) -> str:
    """Wait until one line of the service's log holds every fragment; that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in service.log_text().splitlines():
            if all(fragment in line for fragment in fragments):
                return line
        time.sleep(0.05)
    raise AssertionError("no log line with %r in %.0fs:\n%s" % (fragments, timeout, service.log_text()))


def posts_to(receiver: CallbackReceiver, name: str) -> list:
    """Every body POSTed so far to /cb/<name>."""
    with receiver.cond:
        return [body for path, body in receiver.received if path == "/cb/" + name]


class NotificationTest(unittest.TestCase):
    """Apps that fail, roll back and succeed, each notifying its own URLs on
    the local receiver (which also takes the registry's callbacks)."""

    @classmethod
    def setUpClass(cls):
        support.start_class_fixture(cls)
        cls.addClassCleanup(support.stop_class_fixture, cls)
        cls.receiver = cls.callbacks
        cls.port = support.free_port()
        sections = []
        # n-crash stops the old container first, so that its failure is a rollback.
        for app, extra in (("n-crash", "order = stop-first"), ("n-missing", ""),
                           ("n-ok", "notify_on = success")):
            sections.append("""
[e2e/{app}]
image = {reg}/e2e/{app}
container = e2e-{app}-{run}
settle = 1
labels = autodeploy.test={run}
notify_url = {notify}
slack_url = {slack}
{extra}""".format(app=app, reg=cls.registry.host, run=cls.label, notify=cls.receiver.url("notify-" + app),
                  slack=cls.receiver.url("slack-" + app), extra=extra))
        # callback_allow names another port: notification URLs come from the
        # configuration, not from payloads, and need no allowlist entry.
        config = main_section(cls.port, cls.receiver, admin_token=None) + "".join(sections)
        cls.service = ServiceProcess(config, cls.env).start(cls.port)
        cls.addClassCleanup(cls.service.stop)

    def push(self, app: str, version: str, **image) -> str:
        ref = "%s/e2e/%s:latest" % (self.registry.host, app)
        image.setdefault("cmd", app_cmd())
        image_id = support.make_image(ref, version, **image)
        self.images.extend([ref, image_id])
        return image_id

    def deploy(self, app: str, callback: str, tag: str = "latest") -> str:
        status, answer = self.service.post(hub_payload("e2e/" + app, tag, self.receiver.url(callback)))
        self.assertEqual(status, 202, answer)
        self.receiver.wait_for(callback)
        return answer["job"]

    def test_rollback_is_notified_to_both_urls_and_success_is_not_by_default(self):
        self.push("n-crash", "v1")
        first = self.deploy("n-crash", "n-crash-v1")
        self.push("n-crash", "v2", cmd=["/bin/sh", "-c", "echo boom; exit 3"])
        job = self.deploy("n-crash", "n-crash-v2")
        notice = self.receiver.wait_for("notify-n-crash")
        self.assertEqual((notice["event"], notice["state"], notice["job"], notice["app"]),
                         ("rollback", "rolled_back", job, "e2e/n-crash"))
        self.assertIn("exit code 3", notice["description"])
        self.assertEqual(notice["image"], "%s/e2e/n-crash:latest" % self.registry.host)
        self.assertGreater(notice["took"], 0)
        slack = self.receiver.wait_for("slack-n-crash")
        self.assertEqual(set(slack), {"text"})
        self.assertIn("ROLLED BACK (job %s)" % job, slack["text"])
        # The first deploy succeeded: notify_on defaults to failure and rollback.
        self.assertEqual([n["job"] for n in posts_to(self.receiver, "notify-n-crash")], [job])
        self.assertNotEqual(first, job)
        name = "e2e-n-crash-%s" % self.label
        self.assertEqual(containers_named(name), [name])

    def test_failed_pull_is_notified(self):
        job = self.deploy("n-missing", "n-missing-cb", tag="latest")  # never pushed
        notice = self.receiver.wait_for("notify-n-missing")
        self.assertEqual((notice["event"], notice["state"], notice["job"]), ("failure", "failed", job))
        self.assertIn("pull failed", notice["description"])
        self.assertIn("FAILED to deploy", self.receiver.wait_for("slack-n-missing")["text"])

    def test_success_is_notified_when_asked_for(self):
        self.push("n-ok", "v1")
        job = self.deploy("n-ok", "n-ok-v1")
        notice = self.receiver.wait_for("notify-n-ok")
        self.assertEqual((notice["event"], notice["state"], notice["job"]), ("success", "succeeded", job))
        self.assertIn("deployed (job %s)" % job, self.receiver.wait_for("slack-n-ok")["text"])


class ShutdownDeadlineTest(unittest.TestCase):
    """SIGTERM while a deploy waits in its health gate, with stop_deadline = 1:
    the swap is undone, the old version answers, the service exits 0, and the
    job runs again at the next start."""

    def test_sigterm_past_the_deadline_rolls_back_and_the_next_start_deploys(self):
        support.start_class_fixture(self)
        self.addCleanup(support.stop_class_fixture, self)
        env, label, receiver = self.env, self.label, self.callbacks
        ref = "%s/e2e/cut" % self.registry.host
        ids = support.make_versions(self.images, ref, ("v1", "v2"), cmd=app_cmd())
        name = "e2e-cut-%s" % label
        app_port = support.free_port()
        support.docker("run", "-d", "--name", name, "--label", "autodeploy.test=" + label,
                       "-p", "127.0.0.1:%d:8080" % app_port, ref + ":v1")
        support.wait_running(name)
        port = support.free_port()
        config = main_section(port, receiver, admin_token=None, extra="stop_deadline = 1") + """
[e2e/cut]
image = {ref}
tag = v2
container = {name}
settle = 60
remove_old_image = no
""".format(ref=ref, name=name)
        service = ServiceProcess(config, env).start(port)
        self.addCleanup(service.stop)
        status, answer = service.post(hub_payload("e2e/cut", "v2", receiver.url("cut")))
        self.assertEqual(status, 202, answer)
        job = answer["job"]
        # Mid-swap: the old container is stopped, the new one runs its settle time.
        wait_for_log(service, "job=%s " % job, "checking it stays up for")
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        try:
            code = service.process.wait(30)
        except subprocess.TimeoutExpired:
            code = "still running after 30 s"
        took = time.monotonic() - signalled
        log = service.log_text()
        self.assertEqual(code, 0, log)
        self.assertLess(took, 20, log)
        self.assertIn("cut off by a shutdown", log)
        self.assertEqual(containers_named(name), [name])
        self.assertEqual(inspect(name)["Image"], ids["v1"])
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % app_port, expect_body="v1\n"), "v1\n")
        row = journal_rows(service)[job]
        self.assertEqual(row["state"], "queued", row)
        self.assertEqual(posts_to(receiver, "cut"), [])  # no outcome yet: the job is not over

        # The next start (a shorter settle time now) runs the job again.
        with open(service.config, "w") as fh:
            fh.write(config.replace("settle = 60", "settle = 1"))
        service.log.close()
        service.start(port)
        self.assertEqual(receiver.wait_for("cut")["state"], "success")
        self.assertEqual(inspect(name)["Image"], ids["v2"])
        self.assertEqual(containers_named(name), [name])
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % app_port, expect_body="v2\n"), "v2\n")


if __name__ == "__main__":
    unittest.main()
