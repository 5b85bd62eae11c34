"""End to end: the faults of an operator's worst day, on the real Engine
and registry.

* the service killed hard (AUTODEPLOY_CRASH_AT: it SIGKILLs itself right
  after recording a step's intent) at every step of a swap and of a
  rollback, then started again with the same journal;
* the Engine taken away mid-gate (a cuttable proxy between the service and
  the real Engine) for longer than engine_wait, the app's containers
  stopped meanwhile as an Engine restart stops them, then given back;
* a container that has the pushed image but does not run.

After each: the app answers on its port, exactly one container has its
name and nothing named *-autodeploy-old-* is left, the journal holds one
final state for the job, and its callback arrived exactly once.
"""

import shutil
import tempfile
import time
import unittest

from tests import support
from tests.support import (FINAL_STATES, EngineProxy, ServiceProcess, containers_named, get_json,
                           hub_payload, inspect, journal_rows, main_section)
from tests.test_e2e_recovery import LogWatcher, tail, wait_final

BROKEN_CMD = ["/bin/sh", "-c", "echo broken; exit 3"]


class FaultTestCase(unittest.TestCase):
    """An app at v1 (v2 and a broken `bad` pushed too), a service deploying it."""

    @classmethod
    def setUpClass(cls):
        cls.ids = support.start_app_fixture(cls, "faults", ("v1", "v2"), cmd=support.app_cmd())
        cls.ids.update(support.make_versions(cls.images, cls.ref, ("bad",), cmd=BROKEN_CMD))

    def run_v1(self, app: str, publish: bool = True) -> str:
        """docker run the app's v1 (its port published on loopback, unless not
        `publish`: then start-first applies); its container name."""
        name, self.port = support.run_version(self, app, self.ref, "v1", publish)
        return name

    def answer(self, name: str, version: str) -> str:
        """What the app answers, on its published port or its bridge address."""
        return support.wait_http(support.app_url(name, self.port), expect_body=version + "\n")

    def start_service(self, app: str, name: str, env: dict = None, extra: str = "",
                      settings: str = "", settle: float = 1) -> ServiceProcess:
        port = support.free_port()
        config = main_section(port, self.callbacks, extra=extra) + """
[e2e/{app}]
image = {image}
tag = v2 bad
container = {name}
stop_timeout = 2
settle = {settle}
{settings}
""".format(app=app, image=self.ref, name=name, settings=settings, settle=settle)
        service = ServiceProcess(config, dict(self.env, **(env or {})))
        self.addCleanup(service.stop)
        return service.start(port)

    def push(self, service: ServiceProcess, app: str, tag: str) -> str:
        status, answer = service.post(hub_payload("e2e/" + app, tag, self.callbacks.url(app)))
        self.assertEqual(status, 202, answer)
        return answer["job"]

    def assert_converged(self, service: ServiceProcess, app: str, name: str, job_id: str,
                         state: str, version: str) -> dict:
        """The job ended `state`, the app runs `version` under its name alone,
        answers, the journal has one final state, the callback came once."""
        job = wait_final(service, job_id, timeout=90)
        diagnostics = "job: %r\n--- log:\n%s" % (job, tail(service, 60))
        self.assertEqual(job["state"], state, diagnostics)
        self.assertEqual(containers_named(name), [name], diagnostics)
        self.assertEqual(inspect(name)["Image"], self.ids[version], diagnostics)
        self.assertTrue(inspect(name)["State"]["Running"], diagnostics)
        self.assertEqual(self.answer(name, version), version + "\n")
        rows = journal_rows(service)
        self.assertEqual(rows[job_id]["state"], state)
        self.assertEqual([r["id"] for r in rows.values() if r["state"] not in FINAL_STATES], [])
        self.callbacks.wait_for(app, timeout=30)
        self.assertEqual(self.callbacks.count(app), 1, diagnostics)
        return job


class CrashAtEachStepTest(FaultTestCase):
    """kill -9 right after each step's intent is on record, then a restart:
    recovery finishes the swap (v2, succeeded) or the rollback (v1,
    rolled_back) from what the journal recorded."""

    def crash_at(self, step: str, tag: str = "v2", publish: bool = True) -> None:
        app = "crash-" + step
        name = self.run_v1(app, publish)
        service = self.start_service(app, name, env={"AUTODEPLOY_CRASH_AT": step},
                                     settings="" if publish else "order = start-first")
        job_id = self.push(service, app, tag)
        service.process.wait(60)
        self.assertEqual(service.process.returncode, -9, tail(service))
        row = journal_rows(service)[job_id]
        self.assertEqual((row["state"], row["step"]), ("running", step))
        service.log.close()
        del service.env["AUTODEPLOY_CRASH_AT"]
        service.start(service.port)
        if tag == "bad":
            job = self.assert_converged(service, app, name, job_id, "rolled_back", "v1")
            self.assertIn("exit code 3", job["description"])
        else:
            self.assert_converged(service, app, name, job_id, "succeeded", "v2")

    def test_crash_before_the_old_container_is_renamed_aside(self):
        self.crash_at("rename-aside")

    def test_crash_before_the_new_container_is_created(self):
        self.crash_at("create-new")

    def test_crash_before_the_old_container_is_stopped(self):
        self.crash_at("stop-old")

    def test_crash_before_the_new_container_is_started(self):
        self.crash_at("start-new")

    def test_crash_during_the_health_gate(self):
        self.crash_at("gate")

    def test_crash_before_the_old_container_is_retired_start_first(self):
        self.crash_at("retire-old", publish=False)

    def test_crash_before_the_old_container_is_removed(self):
        self.crash_at("remove-old")

    def test_crash_after_the_old_container_is_removed_is_a_success_not_up_to_date(self):
        self.crash_at("remove-image")

    def test_crash_before_a_failed_new_container_is_removed(self):
        self.crash_at("remove-new", "bad")

    def test_crash_before_the_old_container_gets_its_name_back(self):
        self.crash_at("rename-back", "bad")

    def test_crash_after_the_old_container_got_its_name_back_before_it_started(self):
        self.crash_at("start-old", "bad")


class EngineAwayTest(FaultTestCase):

    def test_engine_away_past_engine_wait_mid_gate_converges_once_it_is_back(self):
        app = "engine-away"
        name = self.run_v1(app)
        folder = tempfile.mkdtemp(prefix="autodeploy-proxy-")
        self.addCleanup(shutil.rmtree, folder, True)
        proxy = EngineProxy(self.env["DOCKER_HOST"][len("unix://"):], folder)
        self.addCleanup(proxy.close)
        service = self.start_service(app, name, extra="docker_host = %s\nengine_wait = 2" % proxy.url,
                                     settle=5)
        watcher = LogWatcher(service)
        self.addCleanup(watcher.close)
        job_id = self.push(service, app, "v2")
        watcher.wait_for("job=%s " % job_id, "checking it stays up")
        proxy.cut()
        # As an Engine restart would: the new container stops (the old one is stopped already).
        support.docker("kill", name)
        watcher.wait_for("job=%s " % job_id, "waiting for it to put the swap in order")
        status, doc = get_json(service.port, "/healthz")
        self.assertEqual((status, doc["reason"]), (503, "a deploy is not converged"))
        time.sleep(3)  # away for longer than engine_wait (2 s)
        self.assertIsNone(service.process.poll())
        self.assertNotIn(job_id, {r["id"] for r in journal_rows(service).values()
                                  if r["state"] in FINAL_STATES})
        proxy.restore()
        job = self.assert_converged(service, app, name, job_id, "succeeded", "v2")
        self.assertIn("the Docker Engine answers again", "\n".join(job["log"]))
        self.assertEqual(get_json(service.port, "/healthz")[0], 200)


class StoppedContainerTest(FaultTestCase):

    def test_a_stopped_container_with_the_pushed_image_is_started_not_up_to_date(self):
        app = "stopped"
        name = self.run_v1(app)
        service = self.start_service(app, name)
        self.assert_converged(service, app, name, self.push(service, app, "v2"), "succeeded", "v2")
        support.docker("stop", "-t", "1", name)
        job_id = self.push(service, app, "v2")
        job = wait_final(service, job_id)
        self.assertEqual(job["state"], "succeeded", job)
        self.assertIn("was not running; started it", job["description"])
        self.assertEqual(self.answer(name, "v2"), "v2\n")
        self.assertEqual(containers_named(name), [name])


class StubbornOldContainerTest(FaultTestCase):
    """An old container that ignores SIGTERM (busybox httpd as PID 1, the
    test images' default command) is killed after its stop timeout."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ids.update(support.make_versions(cls.images, cls.ref, ("stubborn",)))

    def test_the_job_log_says_the_old_container_was_killed_after_stop_timeout(self):
        app = "stubborn"
        name, self.port = support.run_version(self, app, self.ref, "stubborn")
        service = self.start_service(app, name)
        job = self.assert_converged(service, app, name, self.push(service, app, "v2"), "succeeded", "v2")
        killed = [line for line in job["log"] if "did not stop within 2 s and was killed" in line]
        self.assertEqual(len(killed), 1, job["log"])
        self.assertIn("WARNING", killed[0])


if __name__ == "__main__":
    unittest.main()
