"""Unit tests: the health gate against an in-process fake Engine, with a
fake clock and scripted events (no sleeps)."""

import logging
import unittest

import autodeploy
from autodeploy import DeployFailed
from tests.unit_support import Rig, app_config, die_event, new_job

JLOG = autodeploy.JobLog(logging.getLogger("autodeploy.test"), new_job(app_config()))


class HealthGateTest(unittest.TestCase):

    def setUp(self):
        rig = Rig(self, probe=self.probe)
        self.clock, self.engine, self.deadline, self.gate = rig.clock, rig.engine, rig.deadline, rig.gate
        self.probes = []
        self.answers = []  # what the probe answers, call by call; then False

    def probe(self, target, timeout):
        self.probes.append(target)
        return self.answers.pop(0) if self.answers else False

    def container(self, health=None, running=True):
        return self.engine.add_container("web", "sha256:v2", running=running, health=health)

    def test_without_a_check_it_passes_once_the_container_stayed_up_for_settle(self):
        cid = self.container()
        started = self.clock()
        how = self.gate.wait_healthy(cid, app_config(settle=3), started, JLOG)
        self.assertEqual(how, "still running after 3 s")
        self.assertEqual(self.clock() - started, 3)
        self.assertEqual(self.clock.slept, [])  # the events stream was the wait

    def test_the_time_it_stayed_up_is_said_rounded(self):
        cid = self.container()
        started = self.clock() - 0.39299  # the gate began a moment after the start
        how = self.gate.wait_healthy(cid, app_config(settle=3), started, JLOG)
        self.assertEqual(how, "still running after 3.4 s")

    def test_durations_in_lines_are_rounded_with_a_space_before_the_unit(self):
        self.assertEqual([autodeploy.format_seconds(s) for s in
                          (3.39299, 3.0, 0.26, 0.013, 0, 9.96, 12.7, 120, 3600)],
                         ["3.4 s", "3 s", "0.3 s", "0.01 s", "0 s", "10 s", "13 s", "120 s", "3600 s"])

    def test_a_death_during_the_settle_time_fails_with_its_exit_code(self):
        cid = self.container()
        die_event(self.engine, cid, self.clock() + 1.5, code=3)
        with self.assertRaisesRegex(DeployFailed, r"exited \(exit code 3\)"):
            self.gate.wait_healthy(cid, app_config(settle=3), self.clock(), JLOG)

    def test_a_container_already_dead_and_restarted_names_the_exit_code_from_its_events(self):
        cid = self.container()
        self.engine.containers[cid]["RestartCount"] = 1
        started = self.clock()
        die_event(self.engine, cid, started + 0.1, code=7)
        self.clock.now += 0.5
        with self.assertRaisesRegex(DeployFailed, r"exit code 7"):
            self.gate.wait_healthy(cid, app_config(), started, JLOG)

    def test_healthcheck_healthy_event_passes(self):
        cid = self.container(health="starting")
        self.engine.events_script.append({"time": self.clock() + 4, "id": cid,
                                          "Action": "health_status: healthy"})
        how = self.gate.wait_healthy(cid, app_config(health_timeout=60), self.clock(), JLOG)
        self.assertEqual(how, "HEALTHCHECK healthy")

    def test_healthcheck_unhealthy_fails_at_once(self):
        cid = self.container(health="starting")
        start = self.clock()
        self.engine.events_script.append({"time": start + 2, "id": cid,
                                          "Action": "health_status: unhealthy"})
        with self.assertRaisesRegex(DeployFailed, "unhealthy"):
            self.gate.wait_healthy(cid, app_config(health_timeout=60), start, JLOG)
        self.assertLess(self.clock() - start, 3)

    def test_healthcheck_silent_until_the_timeout_fails(self):
        cid = self.container(health="starting")
        with self.assertRaisesRegex(DeployFailed, "did not report healthy"):
            self.gate.wait_healthy(cid, app_config(health_timeout=5), self.clock(), JLOG)

    def test_podman_health_without_a_status_means_no_healthcheck(self):
        # Podman 4.3 reports State.Health {"Status": ""} on every container.
        cid = self.container()
        self.engine.containers[cid]["State"]["Health"] = {"FailingStreak": 0, "Log": None, "Status": ""}
        how = self.gate.wait_healthy(cid, app_config(settle=3), self.clock(), JLOG)
        self.assertEqual(how, "still running after 3 s")

    def test_podman_health_status_event_passes(self):
        cid = self.container(health="starting")
        self.engine.events_script.append({"time": self.clock() + 4, "id": cid,
                                          "Action": "health_status", "HealthStatus": "healthy"})
        how = self.gate.wait_healthy(cid, app_config(health_timeout=60), self.clock(), JLOG)
        self.assertEqual(how, "HEALTHCHECK healthy")

    def test_podman_exit_code_attribute_names_the_exit_code(self):
        cid = self.container()
        self.engine.events_script.append({"time": self.clock() + 1, "id": cid, "Action": "die",
                                          "attributes": {"containerExitCode": "5"}})
        with self.assertRaisesRegex(DeployFailed, r"exited \(exit code 5\)"):
            self.gate.wait_healthy(cid, app_config(settle=3), self.clock(), JLOG)

    def test_probe_uses_the_container_address_and_passes_when_it_answers(self):
        cid = self.container()
        self.answers = [False, False, True]
        app = app_config(health_url="http://{ip}:8080/health")
        how = self.gate.wait_healthy(cid, app, self.clock(), JLOG)
        self.assertEqual(how, "http://172.17.0.2:8080/health answered")
        self.assertEqual(len(self.probes), 3)
        self.assertEqual(self.clock.slept, [0.2, 0.2])

    def test_probe_that_never_answers_fails_at_the_health_timeout(self):
        cid = self.container()
        start = self.clock()
        with self.assertRaisesRegex(DeployFailed, r"tcp://127.0.0.1:9 did not answer within 2 s"):
            self.gate.wait_healthy(cid, app_config(health_tcp="127.0.0.1:9", health_timeout=2),
                                   start, JLOG)
        self.assertGreaterEqual(self.clock() - start, 2)

    def test_a_shutdown_past_its_deadline_cuts_the_wait_short(self):
        cid = self.container()
        self.deadline.start(1.0)
        with self.assertRaises(autodeploy.CutOff):
            self.gate.wait_healthy(cid, app_config(settle=30), self.clock(), JLOG)
        self.assertLess(self.clock.now - 1_000_000.0, 3)

    def test_an_exited_container_fails(self):
        cid = self.container(running=False)
        with self.assertRaisesRegex(DeployFailed, "exited"):
            self.gate.wait_healthy(cid, app_config(), self.clock(), JLOG)


class EventActionTest(unittest.TestCase):

    def test_old_engines_name_the_action_status(self):
        self.assertEqual(autodeploy.event_action({"status": "die"}), "die")
        self.assertEqual(autodeploy.event_action({"Action": "start", "status": "x"}), "start")
        self.assertEqual(autodeploy.event_action({}), "")

    def test_podman_puts_the_health_status_in_a_field_of_its_own(self):
        self.assertEqual(autodeploy.event_action({"Action": "health_status", "HealthStatus": "unhealthy"}),
                         "health_status: unhealthy")
        self.assertEqual(autodeploy.event_action({"Action": "health_status: healthy"}),
                         "health_status: healthy")


if __name__ == "__main__":
    unittest.main()
