"""Unit tests: ContainerTarget (pull, swap, rollback) against an in-process
fake Engine, for the faults a real Engine cannot produce on demand."""

import logging
import unittest

import autodeploy
from autodeploy import DeployFailed, RolledBack
from dockerapi import DockerError
from tests.unit_support import Rig, app_config, die_event, new_job


class ContainerTargetTest(unittest.TestCase):

    def setUp(self):
        rig = Rig(self)
        self.clock, self.engine, self.deadline, self.target = rig.clock, rig.engine, rig.deadline, rig.target
        self.steps = rig.steps
        self.old_id = self.engine.add_container("web", "sha256:v1")
        self.job = new_job(app_config(order="stop-first"))
        self.jlog = autodeploy.JobLog(logging.getLogger("autodeploy.test"), self.job)

    def deploy(self):
        return self.target.deploy(self.job, self.jlog)

    def test_a_healthy_new_container_replaces_the_old_one_under_its_name(self):
        state, description = self.deploy()
        self.assertEqual(state, "succeeded", description)
        web = self.engine.named("web")
        self.assertEqual(web["Image"], "sha256:v2")
        self.assertTrue(web["State"]["Running"])
        self.assertNotIn(self.old_id, self.engine.containers)
        self.assertEqual(self.engine.names(), ["web"])
        self.assertNotIn("sha256:v1", self.engine.images)  # the unused image went
        recorded = {key for fields in self.steps for key in fields}
        self.assertEqual(recorded, {"new_image", "digest", "old_container", "old_image",
                                    "was_running", "new_container", "step", "failure"})
        self.assertIsNone(self.job.swap)

    def stop_takes(self, seconds, exit_code):
        """The old container's stop takes `seconds` and ends with `exit_code`."""
        def on_call(method):
            if method == "stop_container":
                self.clock.advance(seconds)
                self.engine.containers[self.old_id]["State"]["ExitCode"] = exit_code
        self.engine.on_call = on_call

    def old_container_lines(self):
        return [line for line in self.job.lines if "old container" in line]

    def test_an_old_container_killed_after_its_stop_timeout_is_said_so_in_the_job_log(self):
        for order in ("stop-first", "start-first"):
            with self.subTest(order=order):
                self.setUp()
                self.job = new_job(app_config(order=order, stop_timeout=5))
                self.jlog = autodeploy.JobLog(logging.getLogger("autodeploy.test"), self.job)
                self.stop_takes(5.2, 137)
                self.assertEqual(self.deploy()[0], "succeeded")
                [line] = [line for line in self.old_container_lines() if "stop" in line]
                self.assertIn("WARNING old container %s did not stop within 5 s and was killed"
                              % self.old_id[:12], line)

    def test_the_engine_default_timeout_is_named_when_the_app_sets_none(self):
        self.stop_takes(10.1, 137)
        self.deploy()
        self.assertTrue([line for line in self.old_container_lines()
                         if "did not stop within 10 s and was killed" in line], self.job.lines)

    def test_an_old_container_that_stops_in_time_is_just_stopped_with_no_inspect(self):
        self.stop_takes(0.3, 137)  # its stop signal is SIGKILL, say: killed, but not late
        self.deploy()
        self.assertTrue([line for line in self.old_container_lines() if "stopped old container" in line])
        self.assertFalse([line for line in self.job.lines if "was killed" in line])
        after_stop = [call[0] for call in self.engine.calls][
            [call[0] for call in self.engine.calls].index("stop_container") + 1]
        self.assertNotEqual(after_stop, "inspect_container")

    def test_a_slow_stop_that_exits_by_itself_is_not_called_a_kill(self):
        self.job = new_job(app_config(order="stop-first", stop_timeout=5))
        self.jlog = autodeploy.JobLog(logging.getLogger("autodeploy.test"), self.job)
        self.stop_takes(5, 0)
        self.deploy()
        self.assertFalse([line for line in self.job.lines if "was killed" in line])

    def test_each_step_is_recorded_before_it_is_taken(self):
        self.deploy()
        steps = [fields["step"] for fields in self.steps if "step" in fields]
        self.assertEqual(steps, ["rename-aside", "create-new", "stop-old", "start-new", "gate",
                                 "remove-old", "remove-image"])
        # What recovery needs is on record before the old container is touched.
        first = self.steps[1]
        self.assertEqual((first["old_container"], first["was_running"], first["failure"]),
                         (self.old_id, True, None))

    def test_a_rollback_records_its_failure_before_undoing(self):
        self.engine.on_start = lambda info: info["Image"] == "sha256:v2" and die_event(
            self.engine, info["Id"], self.clock() + 1, code=2)
        with self.assertRaises(RolledBack):
            self.deploy()
        rollback = [fields for fields in self.steps if fields.get("step") in autodeploy.ROLLBACK_STEPS]
        self.assertEqual([fields["step"] for fields in rollback], ["remove-new", "rename-back", "start-old"])
        self.assertIn("exit code 2", rollback[0]["failure"])

    def test_a_digest_the_sender_named_is_pulled_exactly_and_the_container_shows_the_tag(self):
        digest = "sha256:" + "ab" * 32
        self.engine.add_image("reg.example/team/web@" + digest, "sha256:v3")
        self.job.digest, self.job.pinned = digest, True
        state, description = self.deploy()
        self.assertEqual(state, "succeeded", description)
        self.assertIn(("pull_image", "reg.example/team/web", digest), self.engine.calls)
        web = self.engine.named("web")
        self.assertEqual(web["Image"], "sha256:v3")  # not what :latest points to (v2)

    def test_a_recorded_digest_is_not_pulled_by_later_deploys_of_the_job(self):
        # The digest a pull recorded is the local engine's name for it (Podman's
        # may be one the registry never had): only a sender's digest is pulled.
        self.job.digest = "sha256:" + "ef" * 32
        state, _ = self.deploy()
        self.assertEqual(state, "succeeded")
        self.assertIn(("pull_image", "reg.example/team/web", "latest"), self.engine.calls)

    def test_without_a_digest_the_one_the_tag_pointed_to_is_recorded(self):
        digest = "sha256:" + "cd" * 32
        self.engine.images["reg.example/team/web:latest"]["RepoDigests"] = [
            "other.example/web@sha256:" + "00" * 32, "reg.example/team/web@" + digest]
        self.deploy()
        self.assertEqual(self.job.digest, digest)
        self.assertEqual(self.steps[0]["digest"], digest)

    def test_the_same_image_is_up_to_date_and_nothing_changes(self):
        self.engine.containers[self.old_id]["Image"] = "sha256:v2"
        state, _ = self.deploy()
        self.assertEqual(state, "up_to_date")
        self.assertEqual([c[0] for c in self.engine.calls if c[0] in ("rename_container",
                                                                      "create_container")], [])

    def test_the_same_image_stopped_is_started_and_gated_not_up_to_date(self):
        info = self.engine.containers[self.old_id]
        info["Image"] = "sha256:v2"
        info["State"].update(Running=False, Status="exited")
        state, description = self.deploy()
        self.assertEqual(state, "succeeded", description)
        self.assertIn("was not running; started it", description)
        self.assertTrue(self.engine.named("web")["State"]["Running"])
        self.assertEqual(self.engine.names(), ["web"])

    def test_the_same_image_stopped_that_dies_on_start_fails_with_the_reason(self):
        info = self.engine.containers[self.old_id]
        info["Image"] = "sha256:v2"
        info["State"].update(Running=False, Status="exited")
        self.engine.on_start = lambda info: die_event(self.engine, info["Id"], self.clock() + 1)
        with self.assertRaisesRegex(DeployFailed, "did not start healthy: .*exit code 3"):
            self.deploy()

    def test_a_new_container_that_dies_is_rolled_back_and_the_old_one_runs_again(self):
        self.engine.on_start = lambda info: info["Image"] == "sha256:v2" and die_event(
            self.engine, info["Id"], self.clock() + 1, code=2)
        with self.assertRaisesRegex(RolledBack, r"exit code 2.*the old one runs again; last output: boom"):
            self.deploy()
        web = self.engine.named("web")
        self.assertEqual(web["Id"], self.old_id)
        self.assertTrue(web["State"]["Running"])
        self.assertEqual(self.engine.names(), ["web"])
        self.assertIsNone(self.job.swap)

    def test_start_first_failure_never_stops_the_old_container(self):
        self.job = new_job(app_config(order="start-first"))
        self.engine.on_start = lambda info: info["Image"] == "sha256:v2" and die_event(
            self.engine, info["Id"], self.clock() + 1)
        with self.assertRaisesRegex(DeployFailed, "the old one kept running"):
            self.target.deploy(self.job, self.jlog)
        self.assertNotIn(("stop_container", self.old_id), self.engine.calls)
        self.assertEqual(self.engine.named("web")["Id"], self.old_id)

    def test_a_refused_pull_changes_nothing(self):
        self.engine.images.pop("reg.example/team/web:latest")
        with self.assertRaisesRegex(DeployFailed, "pull failed: manifest .* not found"):
            self.deploy()
        self.assertEqual(self.engine.named("web")["Id"], self.old_id)
        self.assertEqual(self.steps, [])

    def test_a_failed_create_gives_the_old_container_its_name_back(self):
        self.engine.fail_at["create_container"] = 1
        with self.assertRaisesRegex(DeployFailed, "cannot create the new container"):
            self.deploy()
        self.assertEqual(self.engine.names(), ["web"])
        self.assertTrue(self.engine.named("web")["State"]["Running"])

    def test_a_container_that_took_the_name_mid_swap_is_left_alone_and_the_old_one_runs_aside(self):
        stranger = {}

        def take_the_name(method):
            if method == "create_container" and not stranger:
                stranger["id"] = self.engine.add_container("web", "sha256:other")
        self.engine.on_call = take_the_name
        with self.assertRaisesRegex(DeployFailed, "not created by autodeploy\) took the name web"):
            self.deploy()
        self.assertEqual(self.engine.named("web")["Id"], stranger["id"])
        self.assertTrue(self.engine.named("web")["State"]["Running"])
        aside = self.engine.named(autodeploy.aside_name("web", self.job.id))
        self.assertEqual(aside["Id"], self.old_id)
        self.assertTrue(aside["State"]["Running"])
        self.assertIsNone(self.job.swap)

    def test_converging_never_removes_a_started_container_it_has_no_record_of(self):
        # A crash came right after the old one was set aside; then someone
        # ran a container under the name. Ours would still be "created".
        self.engine.rename_container("web", autodeploy.aside_name("web", self.job.id))
        self.engine.containers[self.old_id]["State"].update(Running=False, Status="exited")
        stranger = self.engine.add_container("web", "sha256:other")
        row = {"id": self.job.id, "old_container": self.old_id, "was_running": 1,
               "step": "create-new", "failure": None}
        with self.assertRaisesRegex(DeployFailed, "left alone; the old container runs again as"):
            self.target.converge(self.job, row, self.jlog)
        self.assertIn(stranger, self.engine.containers)
        self.assertTrue(self.engine.containers[self.old_id]["State"]["Running"])

    def test_the_engine_lost_mid_swap_leaves_the_swap_for_the_runner_to_converge(self):
        def lose_engine(method):
            if method == "start_container":
                self.engine.down = True
        self.engine.on_call = lose_engine
        with self.assertRaises(DockerError):
            self.deploy()
        swap = self.job.swap
        self.assertEqual((swap["old_container"], swap["was_running"], swap["step"], swap["failure"]),
                         (self.old_id, True, "start-new", None))
        self.assertEqual(swap["new_container"], self.engine.named("web")["Id"])

    def test_a_shutdown_before_the_swap_changes_nothing(self):
        self.deadline.start(0)
        with self.assertRaises(autodeploy.CutOff):
            self.deploy()
        self.assertEqual(self.engine.names(), ["web"])

    def test_no_container_yet_creates_the_first_from_the_section(self):
        del self.engine.containers[self.old_id]
        state, description = self.deploy()
        self.assertEqual(state, "succeeded")
        self.assertIn("created web running reg.example/team/web:latest", description)

    def test_a_first_container_that_cannot_start_says_so_not_unhealthy(self):
        del self.engine.containers[self.old_id]
        self.engine.fail_at["start_container"] = 1
        with self.assertRaisesRegex(DeployFailed, "the first container did not start: start_container failed"):
            self.deploy()
        self.assertEqual(self.engine.names(), [])  # the one that did not start is removed

    def test_a_first_container_whose_name_was_taken_meanwhile_fails_naming_it(self):
        del self.engine.containers[self.old_id]
        def take_the_name(method):
            if method == "create_container" and self.engine.named("web") is None:
                self.engine.add_container("web", "sha256:v1")
        self.engine.on_call = take_the_name
        with self.assertRaisesRegex(DeployFailed, "cannot create web: Conflict. The container name /web is already in use"):
            self.deploy()

    def test_describe_names_the_container(self):
        self.assertEqual(self.target.describe(app_config()), "container web")


class AsideNameTest(unittest.TestCase):

    def test_the_old_container_is_set_aside_under_a_name_with_the_job_id(self):
        self.assertEqual(autodeploy.aside_name("web", "abc"), "web-autodeploy-old-abc")


if __name__ == "__main__":
    unittest.main()
