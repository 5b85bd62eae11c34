"""Unit tests: the service (workers, reporting, the in-memory journal), the
queue's hand-off of superseded jobs, and the `check` command's token rule,
with an in-process fake Engine."""

import contextlib
import io
import os
import tempfile
import threading
import time
import unittest

import autodeploy
from autodeploy import CallbackSender, JobQueue, MemoryJournal, Push, Service
from tests.unit_support import (NO_ENGINE, FakeClock, Rig, app_config, capture_logs, make_config,
                                new_job, quiet_logs, run_serve, temp_folder, wait_until, web_config,
                                write_file)


class ShutdownTest(unittest.TestCase):
    """SIGTERM with an Engine that does not answer: the real threads and
    pauses (no fake clock), bounded."""

    def setUp(self):
        quiet_logs(self)
        self.config = make_config(engine_wait=60, workers=1)
        self.service = autodeploy.build_service(self.config, autodeploy.DockerClient(NO_ENGINE))

    def test_stop_ends_a_job_waiting_for_the_engine_within_a_second_and_keeps_it_queued(self):
        self.service.start()
        job = self.service.submit(Push("myname/myrepo", "latest", sender="cli"))
        wait_until(lambda: job.state == "running", 5)
        began = time.monotonic()
        self.service.stop()  # stop_deadline: 30 s
        self.assertLess(time.monotonic() - began, 1.5)
        self.assertEqual(self.service.journal.get(job.id)["state"], "queued")

    def test_a_pause_wakes_when_the_stop_begins_and_never_outlasts_the_deadline(self):
        deadline = autodeploy.StopDeadline(time.monotonic)
        pausing = threading.Thread(target=deadline.pause, args=(30,), daemon=True)
        pausing.start()
        time.sleep(0.02)
        deadline.start(0.05)
        pausing.join(2)
        self.assertFalse(pausing.is_alive())
        began = time.monotonic()
        deadline.pause(30)  # the stop has begun: until the deadline, no longer
        self.assertLess(time.monotonic() - began, 1.0)

    def test_serve_warns_at_start_when_the_engine_does_not_answer(self):
        logs = capture_logs(self.addCleanup)
        self.assertFalse(autodeploy.check_engine_at_start(autodeploy.DockerClient(NO_ENGINE), self.config))
        [line] = logs.matching("does not answer")
        self.assertIn(NO_ENGINE, line)
        self.assertIn("no such socket", line)
        self.assertIn("waits up to 60 s (engine_wait)", line)

    def test_serve_logs_that_warning_as_it_starts(self):
        logs = capture_logs(self.addCleanup)
        run_serve(self, self.config._replace(listen_port=0), {})
        self.assertTrue(logs.wait_for("does not answer", timeout=5), logs.lines())


class ServiceTest(unittest.TestCase):

    def setUp(self):
        rig = Rig(self)
        rig.engine.add_container("web", "sha256:v1")
        self.clock, runner = rig.clock, rig.runner
        self.journal = MemoryJournal()
        self.service = Service(web_config(), runner, CallbackSender([]), self.journal,
                               clock=self.clock, hostname="host")

    def wait_for(self, waiter):
        self.assertTrue(waiter.event.wait(10), "the job did not finish")
        return waiter.outcome

    def test_a_submitted_push_is_deployed_and_recorded_in_the_memory_journal(self):
        self.service.start()
        self.addCleanup(self.service.stop, 0)
        waiter = autodeploy.Waiter()
        job = self.service.submit(Push("team/web", "latest", sender="cli"), waiter)
        self.assertEqual(self.wait_for(waiter)["state"], "succeeded")
        row = self.service.job_detail(job.id)
        self.assertEqual((row["state"], row["source"]), ("succeeded", "cli"))
        self.assertIn("now runs", row["description"])
        self.assertTrue(row["log"])
        self.assertEqual([r["id"] for r in self.service.job_list(state="succeeded")], [job.id])

    def test_a_bug_in_reporting_does_not_kill_the_worker(self):
        calls, reported = [], threading.Event()

        def broken_deliveries(job):
            calls.append(job.id)
            reported.set()
            if len(calls) == 1:
                raise RuntimeError("reporting bug")
            return []
        self.service.reporter.deliveries = broken_deliveries
        self.service.start()
        self.addCleanup(self.service.stop, 0)
        waiter, first_waiter = autodeploy.Waiter(), autodeploy.Waiter()
        with self.assertLogs("autodeploy", "ERROR") as logs:
            first = self.service.submit(Push("team/web", "latest"), first_waiter)
            self.assertTrue(reported.wait(10))
            # Its waiter hears the outcome all the same.
            self.assertEqual(self.wait_for(first_waiter)["state"], "succeeded")
            # The first job's report blew up; the worker still takes the second.
            second = self.service.submit(Push("team/web", "latest"), waiter)
            self.wait_for(waiter)
        self.assertEqual(calls, [first.id, second.id])
        self.assertIn("internal error while reporting", "\n".join(logs.output))
        self.assertTrue(self.service.alive())

    def test_unknown_repository_or_tag_is_422(self):
        with self.assertRaises(autodeploy.PayloadError) as caught:
            self.service.submit(Push("team/other", "latest"))
        self.assertEqual(caught.exception.status, 422)
        with self.assertRaisesRegex(autodeploy.PayloadError, "follows: latest"):
            self.service.submit(Push("team/web", "beta"))

    def test_a_job_superseded_in_the_queue_is_recorded_as_superseded(self):
        first = self.service.submit(Push("team/web", "latest"))
        self.service.submit(Push("team/web", "latest"))
        self.service.flush_superseded()
        self.assertEqual(self.journal.get(first.id)["state"], "superseded")


class QueueHandOffTest(unittest.TestCase):

    def test_superseded_jobs_are_handed_over_after_the_queue_lock_is_released(self):
        seen = []

        def on_superseded(job):
            # Another thread must be able to use the queue now: the lock is free.
            probe = threading.Thread(target=queue.depth)
            probe.start()
            probe.join(5)
            seen.append((job.id, probe.is_alive()))
        queue = JobQueue(on_superseded=on_superseded)
        app = app_config()
        for n in range(3):
            job = new_job(app, "j%d" % n)
            queue.put(job)
        self.assertEqual(seen, [("j0", False), ("j1", False)])

    def test_a_job_someone_awaits_is_kept_to_hear_the_newer_outcome(self):
        queue = JobQueue()
        app = app_config()
        awaited = new_job(app, "j0")
        awaited.waiter = autodeploy.Waiter()
        queue.put(awaited)
        queue.put(new_job(app, "j1"))
        self.assertEqual([j.id for j in queue.get(timeout=0).superseded], ["j0"])


class CheckCommandTest(unittest.TestCase):

    def check(self, config):
        """check()'s exit status and what it wrote to stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = autodeploy.check(config._replace(docker_host="unix:///nonexistent/docker.sock"))
        return status, out.getvalue(), err.getvalue()

    def test_per_app_tokens_count_as_configured(self):
        config = web_config(apps={"team/web": app_config(tokens=("a" * 32,))})
        self.assertTrue(config.has_tokens())
        self.assertIn("deploy tokens: 0 global, 1 app-only", self.check(config)[1])

    def test_no_token_at_all_is_an_error_as_serve_would_refuse_to_start(self):
        folder = temp_folder(self)
        config = web_config()._replace(path=os.path.join(folder, "autodeploy.conf"))
        self.assertFalse(config.has_tokens())
        status, _, err = self.check(config)
        self.assertEqual(status, 1)
        self.assertIn("error: no deploy token configured, so serve will refuse to start", err)

    def test_the_installed_layouts_credential_file_counts_and_is_checked(self):
        # autodeploy.service passes <config folder>/token as credential 'token'.
        folder = temp_folder(self)
        config = web_config()._replace(path=os.path.join(folder, "autodeploy.conf"))
        write_file(folder, "token", "k" * 40 + "\n")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertTrue(autodeploy.check_tokens(config))
        self.assertIn("passes to serve as its credential 'token'", out.getvalue())
        write_file(folder, "token", "short\n")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertFalse(autodeploy.check_tokens(config))
        self.assertIn("at least 32", err.getvalue())
        self.assertNotIn("short", err.getvalue())


class InstanceLockTest(unittest.TestCase):

    def test_one_holder_at_a_time_and_the_file_names_it(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        path = os.path.join(folder.name, "state", "autodeploy.lock")
        first, second = autodeploy.InstanceLock(path), autodeploy.InstanceLock(path)
        self.assertTrue(first.acquire("serve"))
        self.assertFalse(second.acquire("deploy"))
        self.assertEqual(second.holder(), "%d serve" % os.getpid())
        first.release()
        self.assertTrue(second.acquire("deploy"))
        second.release()

    def test_a_second_service_on_one_state_directory_is_refused(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        config = web_config(state_dir=folder.name)
        first = autodeploy.take_instance_lock(config, threading.Event())
        self.addCleanup(first.release)
        with self.assertRaisesRegex(SystemExit, "another autodeploy serve .* own state_dir"):
            autodeploy.take_instance_lock(config, threading.Event(), pause=0)


if __name__ == "__main__":
    unittest.main()


class HealthReasonTest(unittest.TestCase):

    def setUp(self):
        self.rig = Rig(self)
        self.service = Service(web_config(), self.rig.runner, CallbackSender([]), MemoryJournal(),
                               clock=self.rig.clock, hostname="host")
        self.service.alive = lambda: True  # no threads started here

    def test_reasons_are_classes_without_paths_and_the_details_are_logged(self):
        self.assertEqual(self.service.health(), (True, "ok"))
        self.service.journal.error = "disk I/O error at /var/lib/autodeploy/journal.sqlite3"
        with self.assertLogs("autodeploy", "WARNING") as logs:
            self.assertEqual(self.service.health(), (False, "journal not writable"))
            self.service.health()  # the same reason again: not logged again
        self.assertEqual(len(logs.output), 1)
        self.assertIn("/var/lib/autodeploy/journal.sqlite3", logs.output[0])
        self.service.journal.error = None
        self.rig.engine.down = True
        with self.assertLogs("autodeploy", "WARNING"):
            self.assertEqual(self.service.health(), (False, "docker engine unreachable"))

    def test_a_swap_waiting_to_converge_is_unhealthy_and_names_the_job_in_the_log(self):
        self.rig.runner.unconverged.add("j7")
        with self.assertLogs("autodeploy", "WARNING") as logs:
            self.assertEqual(self.service.health(), (False, "a deploy is not converged"))
        self.assertIn("j7", logs.output[0])
        self.rig.runner.unconverged.clear()
        self.assertEqual(self.service.health(), (True, "ok"))


class PrintableTest(unittest.TestCase):

    def test_control_characters_and_backslashes_are_escaped(self):
        self.assertEqual(autodeploy.printable("a\r\nINFO forged\x1b[31m\x0b\\ok\x85"),
                         "a\\x0d\\x0aINFO forged\\x1b[31m\\x0b\\x5cok\\x85")
        self.assertEqual(autodeploy.printable("plain ASCII, and é"), "plain ASCII, and é")


class SourceShareTest(unittest.TestCase):

    def test_a_source_is_an_ipv4_address_or_an_ipv6_slash_64(self):
        self.assertEqual(autodeploy.source_of("192.0.2.7"), "192.0.2.7")
        self.assertEqual(autodeploy.source_of("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(autodeploy.source_of("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(autodeploy.source_of("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64")
        self.assertNotEqual(autodeploy.source_of("2001:db8:1:3::1"), "2001:db8:1:2::/64")


class LogLimiterTest(unittest.TestCase):

    def test_one_line_a_second_per_kind_then_the_count_left_out(self):
        clock = FakeClock()
        limiter = autodeploy.LogLimiter(1.0, clock)
        self.assertEqual(limiter.allow("refused"), 0)
        self.assertIsNone(limiter.allow("refused"))
        self.assertIsNone(limiter.allow("refused"))
        self.assertEqual(limiter.allow("displaced"), 0)  # another kind is not held back
        clock.advance(1.0)
        self.assertEqual(limiter.allow("refused"), 2)
