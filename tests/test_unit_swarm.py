"""Unit tests of SwarmServiceTarget against the fake Engine's scripted
services: the update it sends, the roll-out states it follows, version
conflicts, and converging after a crash."""

import contextlib
import io
import unittest

import autodeploy
import dockerapi
from tests.unit_support import (FakeClock, FakeEngine, app_config, new_job, quiet_logs,
                                make_config, web_config, write_config)

OLD = "reg.example/team/web:latest@sha256:" + "1" * 64
CONFIG = "[autodeploy]\ntoken = " + "t" * 40 + "\n\n[team/web]\n"
NEW_DIGEST = "sha256:" + "2" * 64


class FakeRegistry:
    """manifest_digest answers `digest`, or raises `error`."""

    def __init__(self, digest=NEW_DIGEST, error=None):
        self.digest, self.error, self.asked = digest, error, []

    def manifest_digest(self, image, tag, auth):
        self.asked.append((image, tag, auth))
        if self.error:
            raise self.error
        return dockerapi.ManifestAnswer(self.digest, None)


class SwarmRig:
    def __init__(self, test, **app):
        quiet_logs(test)
        self.clock = FakeClock()
        self.engine = FakeEngine(self.clock)
        self.service_id = self.engine.add_service("web", OLD)
        self.registry = FakeRegistry()
        self.steps = []
        self.deadline = autodeploy.StopDeadline(self.clock)
        self.target = autodeploy.SwarmServiceTarget(
            self.engine, self.deadline, "/nonexistent/config.json", self.registry,
            lambda job, **fields: self.steps.append(fields), self.clock, self.clock.sleep)
        self.app = app_config(service="web", registry_user="bot", registry_password="pw", **app)
        self.job = new_job(self.app)
        self.jlog = autodeploy.JobLog(autodeploy.log, self.job)

    def updates(self):
        return [call for call in self.engine.calls if call[0] == "update_service"]

    def service(self):
        return self.engine.services[self.service_id]


class DeployTest(unittest.TestCase):

    def test_only_the_image_changes_to_the_resolved_digest_with_credentials(self):
        rig = SwarmRig(self)
        before = rig.engine.inspect_service("web")["Spec"]
        state, description = rig.target.deploy(rig.job, rig.jlog)
        self.assertEqual(state, autodeploy.SUCCEEDED, description)
        (_, service_id, version, spec, auth), = rig.updates()
        self.assertEqual((service_id, version), (rig.service_id, 10))
        expected = autodeploy.with_image(before, "reg.example/team/web:latest@" + NEW_DIGEST)
        self.assertEqual(spec, expected)
        self.assertEqual(before["TaskTemplate"]["ContainerSpec"]["Image"], OLD)  # a copy was changed
        self.assertEqual(auth["username"], "bot")
        self.assertEqual(rig.registry.asked[0][:2], ("reg.example/team/web", "latest"))
        self.assertEqual(rig.job.digest, NEW_DIGEST)
        self.assertIn("2/2 tasks updated", description)
        self.assertTrue(any("0/2 tasks updated" in line for line in rig.job.lines), rig.job.lines)

    def test_progress_counts_replicas_not_the_extra_task_of_start_first(self):
        rig = SwarmRig(self)
        rig.service()["surge"] = 1
        rig.target.deploy(rig.job, rig.jlog)
        self.assertTrue(any("0/2 tasks updated" in line for line in rig.job.lines), rig.job.lines)
        self.assertFalse(any("/3 tasks" in line for line in rig.job.lines), rig.job.lines)

    def test_the_step_is_recorded_before_the_update_is_sent(self):
        rig = SwarmRig(self)
        seen = []
        rig.target.record_step = lambda job, **fields: seen.append(
            (fields.get("step"), len(rig.updates())))
        rig.target.deploy(rig.job, rig.jlog)
        self.assertEqual(seen, [("service-update", 0)])

    def test_a_pinned_digest_is_deployed_without_asking_the_registry(self):
        rig = SwarmRig(self)
        rig.job.digest, rig.job.pinned = "sha256:" + "3" * 64, True
        rig.target.deploy(rig.job, rig.jlog)
        self.assertEqual(rig.registry.asked, [])
        self.assertTrue(rig.updates()[0][3]["TaskTemplate"]["ContainerSpec"]["Image"]
                        .endswith("@sha256:" + "3" * 64))

    def test_a_service_on_that_digest_already_is_up_to_date_and_not_updated(self):
        rig = SwarmRig(self)
        rig.registry.digest = "sha256:" + "1" * 64
        state, description = rig.target.deploy(rig.job, rig.jlog)
        self.assertEqual(state, autodeploy.UP_TO_DATE)
        self.assertIn("already runs", description)
        self.assertEqual(rig.updates(), [])

    def test_a_service_set_to_the_digest_but_still_rolling_out_is_followed_not_up_to_date(self):
        rig = SwarmRig(self)
        rig.engine.rollout = [("updating", ""), ("rollback_started", "update rolled back: task abc"),
                              ("rollback_completed", "rollback completed")]
        rig.engine.update_service(rig.service_id, 10, autodeploy.with_image(
            rig.service()["Spec"], "reg.example/team/web:latest@" + NEW_DIGEST))  # a cut-off job's
        with self.assertRaises(autodeploy.RolledBack):
            rig.target.deploy(rig.job, rig.jlog)
        self.assertEqual(len(rig.updates()), 1)  # that one only

    def test_a_registry_that_cannot_resolve_fails_before_any_change(self):
        rig = SwarmRig(self)
        rig.registry.error = dockerapi.RegistryError("manifest unknown", 404)
        with self.assertRaises(autodeploy.DeployFailed) as caught:
            rig.target.deploy(rig.job, rig.jlog)
        self.assertIn("manifest unknown", str(caught.exception))
        self.assertEqual(rig.updates(), [])

    def test_a_version_conflict_is_retried_with_the_fresh_spec(self):
        rig = SwarmRig(self)
        rig.engine.conflicts = 2
        state, _ = rig.target.deploy(rig.job, rig.jlog)
        self.assertEqual(state, autodeploy.SUCCEEDED)
        self.assertEqual([call[2] for call in rig.updates()], [10, 11, 12])

    def test_endless_conflicts_give_up_after_a_bound(self):
        rig = SwarmRig(self)
        rig.engine.conflicts = 100
        with self.assertRaises(autodeploy.DeployFailed) as caught:
            rig.target.deploy(rig.job, rig.jlog)
        self.assertIsNot(type(caught.exception), autodeploy.RolledBack)
        self.assertEqual(len(rig.updates()), autodeploy.SWARM_UPDATE_TRIES)

    def test_a_rollback_is_rolled_back_with_swarms_message_and_the_task_error(self):
        rig = SwarmRig(self)
        rig.engine.rollout = [("updating", "update in progress"),
                              ("rollback_started", "update rolled back due to failure or early "
                               "termination of task abc"),
                              ("rollback_completed", "rollback completed")]
        with self.assertRaises(autodeploy.RolledBack) as caught:
            rig.target.deploy(rig.job, rig.jlog)
        message = str(caught.exception)
        self.assertIn("rollback_completed", message)
        self.assertIn("early termination of task abc", message)
        self.assertIn("non-zero exit (1)", message)

    def test_a_paused_update_fails(self):
        rig = SwarmRig(self)
        rig.engine.rollout = [("paused", "update paused due to failure of task abc")]
        with self.assertRaises(autodeploy.DeployFailed) as caught:
            rig.target.deploy(rig.job, rig.jlog)
        self.assertNotIsInstance(caught.exception, autodeploy.RolledBack)
        self.assertIn("update paused due to failure of task abc", str(caught.exception))

    def test_a_roll_out_longer_than_swarm_timeout_fails_and_says_so(self):
        rig = SwarmRig(self, swarm_timeout=30)
        rig.engine.rollout = [("updating", "update in progress")] * 100
        with self.assertRaises(autodeploy.DeployFailed) as caught:
            rig.target.deploy(rig.job, rig.jlog)
        self.assertIn("did not end within 30 s", str(caught.exception))
        self.assertLess(sum(rig.clock.slept), 32)

    def test_an_update_swarm_never_rolls_out_is_up_to_date_once_tasks_run_the_digest(self):
        rig = SwarmRig(self)
        rig.engine.rollout = []
        rig.service()["running"] = "reg.example/team/web:other@" + NEW_DIGEST
        state, _ = rig.target.deploy(rig.job, rig.jlog)
        self.assertEqual(state, autodeploy.UP_TO_DATE)

    def test_running_version_is_what_the_spec_names_for_polls_and_tag_policies(self):
        rig = SwarmRig(self)
        self.assertEqual(rig.target.running_version(rig.app), ("latest", ["sha256:" + "1" * 64]))
        self.assertEqual(rig.target.running_tag(rig.app), "latest")
        self.assertEqual(rig.target.running_version(app_config("api", service="api")), (None, []))


class ConvergeTest(unittest.TestCase):

    def row(self, rig, step="service-update"):
        return {"id": rig.job.id, "step": step, "digest": NEW_DIGEST, "container": "web"}

    def test_an_update_swarm_got_is_followed_not_sent_again(self):
        rig = SwarmRig(self)
        rig.target.deploy(rig.job, rig.jlog)  # the update reached Swarm; then "the crash"
        rig.service()["script"] = [("updating", ""), ("completed", "update completed")]
        rig.service()["running"] = OLD
        job = new_job(rig.app)
        rig.target.converge(job, self.row(rig), rig.jlog)
        self.assertEqual(job.state, autodeploy.SUCCEEDED, job.description)
        self.assertEqual(len(rig.updates()), 1)

    def test_a_rolled_back_update_converges_to_rolled_back(self):
        rig = SwarmRig(self)
        rig.engine.rollout = [("rollback_started", "rolled back due to task abc"),
                              ("rollback_completed", "rollback completed")]
        rig.engine.update_service(rig.service_id, 10, autodeploy.with_image(
            rig.service()["Spec"], "reg.example/team/web:latest@" + NEW_DIGEST))
        rig.target.converge(rig.job, self.row(rig), rig.jlog)
        self.assertEqual(rig.job.state, autodeploy.ROLLED_BACK, rig.job.description)

    def test_an_update_that_never_reached_swarm_is_left_to_the_deploy(self):
        rig = SwarmRig(self)
        rig.target.converge(rig.job, self.row(rig), rig.jlog)
        self.assertEqual(rig.job.state, autodeploy.QUEUED)
        self.assertEqual(rig.updates(), [])

    def test_the_runner_deploys_after_a_crash_before_the_update(self):
        rig = SwarmRig(self)
        container = autodeploy.ContainerTarget(rig.engine, None, rig.deadline, "/nonexistent")
        runner = autodeploy.JobRunner(container, rig.deadline, clock=rig.clock,
                                      sleep=rig.clock.sleep, swarm=rig.target)
        rig.job.resume = self.row(rig, step=None)
        runner.run(rig.job)
        self.assertEqual(rig.job.state, autodeploy.SUCCEEDED, rig.job.description)
        self.assertEqual(len(rig.updates()), 1)


class ConfigTest(unittest.TestCase):

    def test_service_and_swarm_timeout_are_read(self):
        config = autodeploy.load_config(write_config(self, CONFIG + "service = web\nswarm_timeout = 90\n"))
        app = config.apps["team/web"]
        self.assertEqual((app.service, app.swarm_timeout, app.container), ("web", 90, "web"))

    def test_container_and_service_together_are_refused(self):
        with self.assertRaises(autodeploy.ConfigError):
            autodeploy.load_config(write_config(self, CONFIG + "service = web\ncontainer = web\n"))


class CheckTest(unittest.TestCase):

    def run_check(self, engine, apps):
        config = web_config(apps=apps)
        with contextlib.redirect_stdout(io.StringIO()) as out, \
                contextlib.redirect_stderr(io.StringIO()) as err:
            good = autodeploy.check_swarm(config, engine)
        return good, out.getvalue(), err.getvalue()

    def test_a_manager_lists_named_and_labelled_services(self):
        rig = SwarmRig(self)
        rig.service()["Spec"]["Labels"] = {"autodeploy.enable": "true"}
        good, out, err = self.run_check(rig.engine, {"team/web": rig.app})
        self.assertTrue(good, err)
        self.assertIn("service web (team/web) runs " + OLD, out)
        self.assertIn("1 service(s) named in sections", out)

    def test_a_missing_service_fails(self):
        rig = SwarmRig(self)
        good, _, err = self.run_check(rig.engine, {"team/api": app_config("api", service="api")})
        self.assertFalse(good)
        self.assertIn("service api (team/api)", err)

    def test_not_a_manager_fails_only_when_a_section_names_a_service(self):
        engine = FakeEngine(FakeClock())  # no services: the fake says it is no manager
        good, _, err = self.run_check(engine, {"team/web": app_config(service="web")})
        self.assertFalse(good)
        self.assertIn("not a Swarm manager", err)
        good, out, _ = self.run_check(engine, {"team/web": app_config()})
        self.assertTrue(good)
        self.assertIn("not a Swarm manager", out)


class LabelledSwarmServiceTest(unittest.TestCase):
    """A push with no section reaches a Swarm service labelled autodeploy.enable=true."""

    def setUp(self):
        self.rig = SwarmRig(self)
        self.rig.service()["Spec"]["Labels"] = {"autodeploy.enable": "true"}
        container = autodeploy.ContainerTarget(self.rig.engine, None, self.rig.deadline, "/nonexistent")
        self.runner = autodeploy.JobRunner(container, self.rig.deadline, clock=self.rig.clock,
                                           sleep=self.rig.clock.sleep, swarm=self.rig.target,
                                           discovery=autodeploy.Discovery(self.rig.engine))
        self.service = autodeploy.Service(make_config(apps={}, tokens=[]), self.runner,
                                          autodeploy.CallbackSender([]), autodeploy.MemoryJournal(),
                                          clock=self.rig.clock, hostname="host")

    def test_a_labelled_service_of_the_pushed_repository_and_tag_becomes_a_job_and_deploys(self):
        job = self.service.submit(autodeploy.Push("team/web", "latest"))
        self.assertEqual((job.app.service, job.app.image, job.app.labelled),
                         ("web", "reg.example/team/web", True))
        self.assertEqual(self.service.journal.get(job.id)["service"], "web")
        self.runner.run(job)
        self.assertEqual(job.state, autodeploy.SUCCEEDED, job.description)
        self.assertEqual(len(self.rig.updates()), 1)

    def test_a_service_of_another_tag_or_unlabelled_is_not_reached(self):
        with self.assertRaises(autodeploy.PayloadError):
            self.service.submit(autodeploy.Push("team/web", "v9"))
        self.rig.service()["Spec"]["Labels"] = {}
        with self.assertRaises(autodeploy.PayloadError):
            self.service.submit(autodeploy.Push("team/web", "latest"))

    def test_the_tag_label_says_which_tags_a_service_follows(self):
        self.rig.service()["Spec"]["Labels"]["autodeploy.tag"] = "v9 v10"
        self.assertEqual(self.service.submit(autodeploy.Push("team/web", "v10")).app.service, "web")

    def test_an_unfinished_job_of_a_labelled_service_is_resumed_on_the_service(self):
        row = {"id": "j1", "app": "team/web", "container": "web", "tag": "latest",
               "source": "dockerhub", "callback_url": None, "received": 1.0, "state": "running",
               "log": "", "labelled": 1, "service": "web"}
        autodeploy.resume_unfinished([row], self.service.config, self.service.queue, [].append)
        job = self.service.queue.get(timeout=0)
        self.assertEqual(job.app.service, "web")
        self.runner.run(job)
        self.assertEqual(job.state, autodeploy.SUCCEEDED, job.description)
        self.assertIn("reg.example/team/web:latest@", self.rig.updates()[0][3]["TaskTemplate"]
                      ["ContainerSpec"]["Image"])


if __name__ == "__main__":
    unittest.main()
