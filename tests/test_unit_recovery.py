"""Unit tests: running a job (outcomes, a lost Engine) and recovery after a
crash (converging a swap, resuming the journal's unfinished jobs), against
an in-process fake Engine with a fake clock."""

import logging
import unittest

import autodeploy
from autodeploy import JobQueue
from tests.unit_support import Rig, app_config, die_event, web_config, new_job, quiet_logs


class RecoveryTestCase(unittest.TestCase):

    def setUp(self):
        rig = Rig(self)
        self.clock, self.engine, self.deadline = rig.clock, rig.engine, rig.deadline
        self.target, self.runner = rig.target, rig.runner
        self.job = new_job(app_config(order="stop-first"), "j1")
        self.jlog = autodeploy.JobLog(logging.getLogger("autodeploy.test"), self.job)

    def crash_mid_swap(self, new_running: bool = True) -> str:
        """The Engine as a crash between create and the old container's
        removal leaves it: the old one set aside (stopped), the new one under
        the app's name; self.row is the journal's record of the swap. Returns
        the old container's id."""
        old_id = self.engine.add_container("web-autodeploy-old-j1", "sha256:v1", running=False)
        new_id = self.engine.add_container("web", "sha256:v2", running=new_running)
        self.row = {"id": "j1", "was_running": 1, "new_container": new_id}
        return old_id


class ConvergeTest(RecoveryTestCase):

    def test_a_new_container_that_passes_the_gate_again_wins_and_the_old_one_goes(self):
        old_id = self.crash_mid_swap()
        self.target.converge(self.job, self.row, self.jlog)
        self.assertEqual(self.job.state, "succeeded")
        self.assertIn("finished after a restart", self.job.description)
        self.assertNotIn(old_id, self.engine.containers)
        self.assertEqual(self.engine.names(), ["web"])

    def test_a_new_container_that_is_not_running_is_started_and_gated_again(self):
        old_id = self.crash_mid_swap(new_running=False)
        self.target.converge(self.job, self.row, self.jlog)
        self.assertEqual(self.job.state, "succeeded", self.job.description)
        self.assertTrue(self.engine.named("web")["State"]["Running"])
        self.assertNotIn(old_id, self.engine.containers)

    def test_a_new_container_that_dies_when_started_again_is_rolled_back(self):
        old_id = self.crash_mid_swap(new_running=False)
        self.engine.on_start = lambda info: info["Image"] == "sha256:v2" and die_event(
            self.engine, info["Id"], self.clock() + 1)
        self.target.converge(self.job, self.row, self.jlog)
        self.assertEqual(self.job.state, "rolled_back")
        web = self.engine.named("web")
        self.assertEqual(web["Id"], old_id)
        self.assertTrue(web["State"]["Running"])

    def test_a_stop_first_old_container_still_running_is_stopped_before_the_new_one_starts(self):
        self.engine.add_container("web-autodeploy-old-j1", "sha256:v1", running=True)
        new_id = self.engine.add_container("web", "sha256:v2", running=False)
        self.target.converge(self.job, {"id": "j1", "was_running": 1, "new_container": new_id},
                             self.jlog)
        methods = [c[0] for c in self.engine.calls]
        self.assertLess(methods.index("stop_container"), methods.index("start_container"))
        self.assertEqual(self.job.state, "succeeded")

    def test_a_rollback_cut_short_before_the_old_one_started_is_finished_from_the_record(self):
        # The crash came after the old container got its name back, before it
        # was started: nothing is set aside, and the old one is stopped. The
        # journal says it ran, and that the new version had failed.
        old_id = self.engine.add_container("web", "sha256:v1", running=False)
        row = {"id": "j1", "old_container": old_id, "was_running": 1, "step": "start-old",
               "failure": "the new container failed: exit code 3"}
        self.target.converge(self.job, row, self.jlog)
        self.assertEqual(self.job.state, "rolled_back")
        self.assertIn("exit code 3", self.job.description)
        self.assertTrue(self.engine.named("web")["State"]["Running"])
        self.assertNotIn("pull_image", [c[0] for c in self.engine.calls])

    def test_an_old_container_put_back_but_not_started_is_started_as_recorded(self):
        old_id = self.engine.add_container("web", "sha256:v1", running=False)
        self.job.state = "running"
        row = {"id": "j1", "old_container": old_id, "was_running": 1, "step": "start-old",
               "failure": None}
        self.target.converge(self.job, row, self.jlog)
        self.assertEqual(self.job.state, "running")  # not final: the job runs again
        self.assertTrue(self.engine.named("web")["State"]["Running"])

    def test_an_old_container_already_removed_means_the_swap_succeeded_and_cleans_up(self):
        # The old one goes only after the new one passed the gate.
        new_id = self.engine.add_container("web", "sha256:v2")
        row = {"id": "j1", "old_container": "c9999" + "0" * 60, "old_image": "sha256:v1",
               "was_running": 1, "new_container": new_id, "step": "remove-image"}
        self.target.converge(self.job, row, self.jlog)
        self.assertEqual(self.job.state, "succeeded")
        self.assertNotIn("sha256:v1", self.engine.images)

    def test_no_new_container_yet_puts_the_old_one_back_and_leaves_the_job_to_run_again(self):
        old_id = self.engine.add_container("web-autodeploy-old-j1", "sha256:v1", running=False)
        self.job.state = "running"
        self.target.converge(self.job, {"id": "j1", "was_running": 1}, self.jlog)
        self.assertEqual(self.job.state, "running")
        self.assertEqual(self.engine.named("web")["Id"], old_id)
        self.assertTrue(self.engine.named("web")["State"]["Running"])

    def test_nothing_set_aside_changes_nothing(self):
        self.engine.add_container("web", "sha256:v1")
        before = len(self.engine.calls)
        self.target.converge(self.job, {"id": "j1", "was_running": 1}, self.jlog)
        self.assertEqual({c[0] for c in self.engine.calls[before:]}, {"inspect_container"})


class JobRunnerTest(RecoveryTestCase):

    def test_a_crashed_swap_is_converged_before_anything_else(self):
        self.crash_mid_swap()
        self.job.resume = dict(self.row, state="running")
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "succeeded")
        self.assertNotIn("pull_image", [c[0] for c in self.engine.calls])

    def test_a_newer_job_converges_the_swap_of_the_one_it_replaced_then_deploys(self):
        self.crash_mid_swap(new_running=False)  # left by j1
        self.engine.add_image("reg.example/team/web:latest", "sha256:v3")
        newer = new_job(app_config(order="stop-first"), "j2")
        newer.resume = dict(self.row, state="running")
        self.runner.run(newer)
        self.assertEqual(newer.state, "succeeded", newer.description)
        self.assertEqual(self.engine.named("web")["Image"], "sha256:v3")
        self.assertEqual(self.engine.names(), ["web"])

    def test_an_engine_lost_mid_gate_is_waited_for_then_the_swap_converged(self):
        old_id = self.engine.add_container("web", "sha256:v1")
        outage = {"left": 3}

        def flaky(method):
            if method == "events" and outage["left"] == 3:
                self.engine.down = True
            elif self.engine.down and method == "ping":
                outage["left"] -= 1
                self.engine.down = outage["left"] > 0
        self.engine.on_call = flaky
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "succeeded", self.job.description)
        self.assertIn("finished after a restart", self.job.description)
        self.assertNotIn(old_id, self.engine.containers)
        self.assertEqual(self.engine.names(), ["web"])
        self.assertEqual(self.clock.slept, [1.0, 1.0])  # asked every second, on the fake clock

    def test_an_engine_away_past_engine_wait_mid_swap_is_waited_for_as_long_as_it_takes(self):
        old_id = self.engine.add_container("web", "sha256:v1")
        seen_unconverged = []

        def away(method):
            if method == "events" and not self.clock.slept:
                self.engine.down = True
            elif method == "ping" and self.engine.down:
                seen_unconverged.append(set(self.runner.unconverged))
                self.engine.down = sum(self.clock.slept) < 300  # five times engine_wait
        self.engine.on_call = away
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "succeeded", self.job.description)
        self.assertNotIn(old_id, self.engine.containers)
        self.assertEqual(self.engine.names(), ["web"])
        self.assertIn({"j1"}, seen_unconverged)  # /healthz said so meanwhile
        self.assertEqual(self.runner.unconverged, set())
        self.assertLessEqual(max(self.clock.slept), 1.0)  # its return noticed within a second

    def test_a_shutdown_while_waiting_to_converge_leaves_the_job_running_for_the_next_start(self):
        self.engine.add_container("web", "sha256:v1")

        def away(method):
            if method == "events":
                self.engine.down = True
        self.engine.on_call = away
        self.deadline.start(30)
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "running")
        self.assertIn("cut off by a shutdown", self.job.description)
        self.assertEqual(self.runner.unconverged, set())

    def sigterm_at(self, after: float, stop_deadline: float = 30) -> dict:
        """The runner's sleep, on the fake clock, with a shutdown beginning
        once `after` seconds have passed (between two pauses: a real pause
        is woken by it, see StopDeadline.pause). Returns when it began."""
        began, stop = self.clock(), {}

        def sleep(seconds):
            self.clock.sleep(seconds)
            if not stop and self.clock() - began >= after:
                stop["at"] = self.clock()
                self.deadline.start(stop_deadline)
        self.runner.sleep = sleep
        return stop

    def test_a_shutdown_ends_a_wait_for_an_absent_engine_at_once_and_the_job_stays_queued(self):
        self.engine.down = True  # a wrong docker_host, or dockerd not up yet
        stop = self.sigterm_at(3)
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "queued", self.job.description)
        self.assertIn("changed nothing", self.job.description)
        self.assertLessEqual(self.clock() - stop["at"], 1.0)  # not stop_deadline's 30 s
        self.assertEqual(self.engine.names(), [])

    def test_a_retry_pause_while_converging_ends_at_the_stop_deadline(self):
        self.engine.add_container("web", "sha256:v1")

        def refuse(job, swap, jlog):
            raise autodeploy.DockerError("conflict (fake)", 409)
        self.target.converge = refuse
        stop = self.sigterm_at(15, stop_deadline=3)  # after pauses of 1, 2, 4 and 8 s; the next is 15
        with self.assertRaises(autodeploy.CutOff):
            self.runner.converge(self.target, self.job, {"id": "j1"}, self.jlog)
        self.assertEqual(self.clock() - stop["at"], 3)  # at the deadline, not after the 15 s pause
        self.assertIsNotNone(self.job.swap)  # the next start converges it

    def test_an_engine_lost_before_the_new_container_started_starts_it_once_back(self):
        old_id = self.engine.add_container("web", "sha256:v1")

        def flaky(method):
            if method == "start_container" and not self.clock.slept:
                self.engine.down = True
            elif method == "ping" and self.engine.down:
                self.engine.down = not self.clock.slept
        self.engine.on_call = flaky
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "succeeded", self.job.description)
        self.assertNotIn(old_id, self.engine.containers)
        self.assertTrue(self.engine.named("web")["State"]["Running"])
        self.assertEqual(self.engine.names(), ["web"])

    def test_an_engine_that_stays_down_past_engine_wait_is_an_error(self):
        self.engine.down = True
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "error")
        self.assertLessEqual(sum(self.clock.slept), 60)

    def test_a_rollback_and_a_failure_are_told_apart(self):
        self.engine.add_container("web", "sha256:v1")
        self.engine.on_start = lambda info: info["Image"] == "sha256:v2" and die_event(
            self.engine, info["Id"], self.clock() + 1)
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "rolled_back")
        self.engine.images.pop("reg.example/team/web:latest")
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "failed")

    def test_a_shutdown_mid_gate_puts_the_old_one_back_and_leaves_the_job_queued(self):
        old_id = self.engine.add_container("web", "sha256:v1")
        self.deadline.start(1.0)
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "queued")
        self.assertIn("cut off by a shutdown", self.job.description)
        self.assertEqual(self.engine.named("web")["Id"], old_id)

    def test_a_bug_is_an_error_of_the_job_not_of_the_worker(self):
        self.target.deploy = lambda job, jlog: 1 / 0
        self.runner.run(self.job)
        self.assertEqual(self.job.state, "error")
        self.assertIn("ZeroDivisionError", self.job.description)


class ResumeUnfinishedTest(unittest.TestCase):

    def setUp(self):
        quiet_logs(self)
        self.config = web_config()
        self.queue = JobQueue()
        self.ended = []

    def row(self, job_id, state, app="team/web", tag="latest"):
        return {"id": job_id, "app": app, "container": "web", "tag": tag, "source": "dockerhub",
                "callback_url": None, "received": 1.0, "state": state, "log": "a\nb"}

    def resume(self, rows):
        return autodeploy.resume_unfinished(rows, self.config, self.queue, self.ended.append,
                                            clock=lambda: 5.0)

    def test_a_job_cut_short_mid_swap_carries_its_row_to_be_converged(self):
        self.assertEqual(self.resume([self.row("j1", "running")]), 1)
        job = self.queue.get(timeout=0)
        self.assertEqual((job.id, job.resume["id"], job.lines), ("j1", "j1", ["a", "b"]))

    def test_a_newer_queued_push_replaces_it_and_inherits_the_swap_to_converge(self):
        self.resume([self.row("j1", "running"), self.row("j2", "queued")])
        job = self.queue.get(timeout=0)
        self.assertEqual((job.id, job.resume["id"]), ("j2", "j1"))

    def test_a_job_for_an_app_or_tag_no_longer_configured_ends_as_an_error(self):
        self.resume([self.row("j1", "queued", app="team/gone"), self.row("j2", "queued", tag="beta")])
        self.assertEqual([(j.id, j.state, j.finished) for j in self.ended],
                         [("j1", "error", 5.0), ("j2", "error", 5.0)])
        self.assertEqual(self.queue.depth(), 0)


if __name__ == "__main__":
    unittest.main()
