"""End to end: the journal and the callbacks under faults, on the real
service, a real Docker Engine and a real registry (issue 12, items 3-5):

* the journal's state dir on a 1 MiB tmpfs that fills up while a deploy
  runs: the outcome is held in memory, written when space is freed
  (/healthz recovers with no webhook), and a restart neither runs the job
  again nor sends its callback again;
* a callback host that never answers, with 8 callbacks queued for it, does
  not hold back another job's callback;
* a callback answered 500 is retried after a restart (SIGTERM, kill -9),
  and its 200 comes once.

Each ends with the app answering on its port, one container under its name
(no *-autodeploy-old-* left), every job final in the journal and each
callback received exactly once. Only loopback is used; every wait is bounded.
"""

import os
import shutil
import signal
import time
import unittest

from tests import support
from tests.support import (FINAL_STATES, CallbackReceiver, ServiceProcess, StalledHost, app_cmd,
                           containers_named, get_json, hub_payload, journal_rows, main_section)

OBSERVED = {}  # what the faults took, for AUTODEPLOY_TEST_VERBOSE=1


def tearDownModule():
    if os.environ.get("AUTODEPLOY_TEST_VERBOSE"):
        for name, seen in sorted(OBSERVED.items()):
            print("%-24s %r" % (name, seen))


def wait_log(service: ServiceProcess, *fragments: str, timeout: float = 30.0) -> str:
    """Until one line of the service's log holds every fragment; that line."""
    deadline = time.monotonic() + timeout
    while True:
        for line in service.log_text().splitlines():
            if all(fragment in line for fragment in fragments):
                return line
        if time.monotonic() > deadline:
            raise AssertionError("no log line with %r in %.0fs:\n%s"
                                 % (fragments, timeout, service.log_text()[-4000:]))
        time.sleep(0.02)


def stop_service(service: ServiceProcess, how: str) -> str:
    """SIGTERM (exit 0 expected) or SIGKILL the service; its log until then
    (a start truncates the log file)."""
    service.process.send_signal(signal.SIGTERM if how == "term" else signal.SIGKILL)
    code = service.process.wait(30)
    service.log.close()
    text = service.log_text()
    if how == "term" and code != 0:
        raise AssertionError("exit code %s after SIGTERM:\n%s" % (code, text[-4000:]))
    return text


class OutboundFaultsTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        support.start_app_fixture(cls, "outbound", ("v1", "v2"), cmd=app_cmd())

    def setUp(self):
        self.receiver = self.callbacks  # the class's receiver; a test may use its own

    # -- shared steps -----------------------------------------------------

    def run_v1(self, app: str) -> tuple:
        """Run v1 under the name of `app`'s container, its port published; (name, port)."""
        return support.run_version(self, app, self.ref)

    def config(self, port: int, app: str, name: str, also_allow=(), extra: str = "") -> str:
        """A service deploying e2e/<app> (tags v1 v2) to `name`, and e2e/junk,
        whose image is on a closed port: its jobs fail at the pull, at once."""
        return main_section(port, self.receiver, also_allow=also_allow, extra=extra) + """
[e2e/{app}]
image = {ref}
tag = v1 v2
container = {name}
settle = 1
remove_old_image = no

[e2e/junk]
image = 127.0.0.1:{closed}/e2e/nothing
container = e2e-junk-{run}
cooldown = 0
""".format(app=app, ref=self.ref, name=name, closed=support.free_port(), run=self.label)

    def post(self, service: ServiceProcess, app: str, tag: str, callback: str = None) -> str:
        status, answer = service.post(hub_payload("e2e/" + app, tag, callback))
        self.assertEqual(status, 202, answer)
        return answer["job"]

    def assert_converged(self, service: ServiceProcess, name: str, app_port: int, version: str,
                         jobs) -> dict:
        """The app answers `version`, one container has its name, and every
        job in `jobs` is final in the journal; the rows."""
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % app_port, timeout=30,
                                           expect_body=version + "\n"), version + "\n")
        self.assertEqual(containers_named(name), [name])
        deadline = time.monotonic() + 60  # jobs still queued behind a slow one end too
        while True:
            rows = journal_rows(service)
            unfinished = {job: rows.get(job, {}).get("state") for job in jobs
                          if rows.get(job, {}).get("state") not in FINAL_STATES}
            if not unfinished or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(unfinished, {}, service.log_text()[-4000:])
        return rows

    # -- 1. the journal on a full disk ------------------------------------

    def test_a_job_ending_on_a_full_journal_disk_is_recorded_when_space_returns_and_not_run_again(self):
        name, app_port = self.run_v1("full")
        port = support.free_port()
        service = ServiceProcess(self.config(port, "full", name), self.env)
        # Cleanups run last-first: stop the service, unmount, remove the folder.
        self.addCleanup(shutil.rmtree, service.folder, True)
        state = service.env["STATE_DIRECTORY"]
        support.mount_tmpfs(self, state, "1m")
        self.addCleanup(service.stop, keep_folder=True)
        service.start(port)
        job = self.post(service, "full", "v2", self.receiver.url("full"))
        support.fill_file_system(os.path.join(state, "filler"))
        # Webhooks until one is refused: from then on the journal really cannot be written.
        junk = []
        for _ in range(300):
            status, answer = service.post(hub_payload("e2e/junk", "latest"))
            if status != 202:
                break
            junk.append(answer["job"])
        self.assertEqual(status, 503, answer)
        status, health = get_json(port, "/healthz", token="")
        self.assertEqual((status, health.get("reason")), (503, "journal not writable"), health)

        # The deploy ends meanwhile: its callback goes out from memory, its end is held.
        self.assertEqual(self.receiver.wait_for("full")["state"], "success")
        wait_log(service, "job=%s " % job, "succeeded")
        wait_log(service, "held in memory: ")
        self.assertNotIn(journal_rows(service)[job]["state"], FINAL_STATES)

        os.unlink(os.path.join(state, "filler"))
        freed = time.monotonic()
        healthy = support.wait_healthz(port, 200, timeout=10)  # GETs only: no webhook, no /jobs
        deadline = time.monotonic() + 10
        while journal_rows(service)[job]["state"] != "succeeded":
            self.assertLess(time.monotonic(), deadline, service.log_text()[-4000:])
            time.sleep(0.05)
        OBSERVED["full disk: healthy after"] = "%.2fs" % (healthy - freed)
        self.assertLess(healthy - freed, 5.0)
        wait_log(service, "held in memory written")

        before = stop_service(service, "term")
        service.start(port)
        # Deliveries left in the journal are queued before anything new, and
        # one host gets one POST at a time: once this new callback came, a
        # repeat of the old one would have come first.
        self.post(service, "junk", "latest", self.receiver.url("full-after"))
        self.receiver.wait_for("full-after")
        self.assertEqual(self.receiver.count("full"), 1)
        after = service.log_text()
        self.assertNotIn("recovered", after)
        self.assertNotIn("job=%s " % job, after, "the job ran again")
        self.assertIn("cannot write", before)
        rows = self.assert_converged(service, name, app_port, "v2", [job] + junk)
        self.assertEqual(rows[job]["state"], "succeeded")

    # -- 2. a callback host that never answers ----------------------------

    def test_a_stalled_callback_host_holds_back_no_other_callback(self):
        hole = StalledHost()
        self.addCleanup(hole.close)
        name, app_port = self.run_v1("stalled")
        port = support.free_port()
        service = ServiceProcess(self.config(port, "stalled", name, also_allow=[hole.origin]), self.env)
        self.addCleanup(service.stop)
        service.start(port)
        stalled = [self.post(service, "junk", "latest", hole.url("s%d" % n)) for n in range(8)]
        hole.wait_accepted(1)
        job = self.post(service, "stalled", "v2", self.receiver.url("unrelated"))
        [arrived] = self.receiver.wait_count("unrelated", 1, timeout=30)
        given_up = [at for at in hole.times("given up") if at < arrived]
        # An ordering, not a duration: the callback came while every post to
        # the stalled host was still held open (the first of them since
        # before this job was even accepted).
        self.assertEqual(given_up, [], "a stalled post was given up before the unrelated callback came")
        self.assertLess(hole.times("accepted")[0], arrived)
        OBSERVED["stalled: held open"] = len(hole.times("accepted"))
        self.assertEqual(self.receiver.wait_for("unrelated")["state"], "success")
        self.assert_converged(service, name, app_port, "v2", [job] + stalled)
        self.assertEqual(self.receiver.count("unrelated"), 1)

    # -- 3. callback retries across a restart ------------------------------

    def retry_across_restart(self, how: str) -> None:
        self.receiver = receiver = CallbackReceiver(statuses=(500, 200))
        self.addCleanup(receiver.close)
        app = "retry-" + how
        name, app_port = self.run_v1(app)
        port = support.free_port()
        service = ServiceProcess(self.config(port, app, name), self.env)
        self.addCleanup(service.stop)
        service.start(port)
        job = self.post(service, app, "v2", receiver.url(app))
        receiver.wait_count(app, 1)  # answered 500: the retry is due 1 s later
        before = stop_service(service, how)
        self.assertEqual(receiver.count(app), 1, "the retry went out before the stop")
        if how == "term":
            self.assertIn("1 callback(s) pending: sent after the next start", before)
        restarted = time.monotonic()
        service.start(port)
        [_, sent] = receiver.wait_count(app, 2, timeout=30)
        OBSERVED["retry after %s: sent after" % how] = "%.2fs" % (sent - restarted)
        self.assertIn("1 callback(s) pending from before the restart: queued", service.log_text())
        # A new callback to the same host comes after every resumed one.
        self.post(service, app, "v2", receiver.url(app + "-after"))
        receiver.wait_for(app + "-after")
        self.assertEqual([status for _, path, status in receiver.arrivals if path == "/cb/" + app],
                         [500, 200])
        self.assertEqual(receiver.wait_for(app)["state"], "success")
        self.assertNotIn("recovered", service.log_text())  # the job was final: not run again
        rows = self.assert_converged(service, name, app_port, "v2", [job])
        self.assertEqual(rows[job]["state"], "succeeded")

    def test_a_callback_retry_survives_sigterm_and_its_200_comes_once(self):
        self.retry_across_restart("term")

    def test_a_callback_retry_survives_kill_9_and_its_200_comes_once(self):
        self.retry_across_restart("kill")


if __name__ == "__main__":
    unittest.main()
