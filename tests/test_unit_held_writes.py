"""Unit tests: writes the journal cannot take are held in memory and
written, in order, when it can again (Recorder); the service's upkeep
writes them and probes the journal, so /healthz recovers with no webhook;
a finished job's state and its callbacks are one transaction. The journal
is a real SQLite file whose writes SQLite refuses while it is 'broken'."""

import autodeploy
from autodeploy import CallbackSender, Job, Push, Recorder, Service, no_redirects_opener
from tests.unit_support import (BoundedTestCase, BreakableJournal, Receiver, Rig, app_config,
                                wait_until, web_config)

APP = app_config()


class RecorderTest(BoundedTestCase):

    def setUp(self):
        super().setUp()
        self.journal = BreakableJournal(self)
        self.record = Recorder(self.journal)

    def accepted_job(self, job_id: str = "j1") -> Job:
        job = Job(id=job_id, app=APP, tag="latest", received=1.0)
        self.journal.add(job)
        return job

    def test_a_job_finished_while_the_journal_fails_is_written_when_it_comes_back(self):
        job = self.accepted_job()
        job.state, job.started = "running", 2.0
        self.record.save(job)
        self.journal.break_writes()
        self.record.save(job, old_container="c-old", was_running=1)
        job.state, job.finished, job.description = "succeeded", 3.0, "now runs v2"
        self.record.save(job, new_container="c-new")
        self.assertEqual(self.journal.row(job.id)["state"], "running")  # nothing got through
        self.assertEqual(self.record.held(), 1)
        self.assertIsNotNone(self.journal.error)

        self.journal.mend()
        self.assertTrue(self.record.flush())
        row = self.journal.row(job.id)
        self.assertEqual((row["state"], row["finished"], row["old_container"], row["new_container"],
                          row["was_running"]), ("succeeded", 3.0, "c-old", "c-new", 1))
        self.assertEqual(self.journal.unfinished(), [])  # the next start does not run it again
        self.assertIsNone(self.journal.error)
        self.assertEqual(self.record.held(), 0)

    def test_a_write_after_held_ones_waits_for_them_so_an_older_state_never_wins(self):
        job = self.accepted_job()
        self.journal.break_writes()
        job.state = "running"
        self.record.save(job, old_container="c-old")
        self.journal.mend()
        job.state = "failed"
        self.record.save(job)
        # Written together: the held 'running' did not come after 'failed'.
        row = self.journal.row(job.id)
        self.assertEqual((row["state"], row["old_container"]), ("failed", "c-old"))
        self.assertTrue(self.record.flush())
        self.assertEqual(self.journal.row(job.id)["state"], "failed")

    def test_holding_and_writing_are_logged_once_each(self):
        jobs = [self.accepted_job("j%d" % n) for n in range(3)]
        self.journal.break_writes()
        for job in jobs:
            job.state = "running"
            self.record.save(job)
        self.assertEqual(len(self.logs.matching("held in memory: ")), 1, self.logs.lines())
        self.assertTrue(self.logs.matching("1 job update(s) held in memory: "))
        self.assertFalse(self.record.flush())
        self.journal.mend()
        self.assertTrue(self.record.flush())
        self.assertTrue(self.record.flush())
        self.assertEqual(len(self.logs.matching("3 job update(s) held in memory written")), 1,
                         self.logs.lines())
        self.assertEqual({row["state"] for row in self.journal.recent()}, {"running"})

    def test_a_forgotten_job_stays_forgotten_after_held_updates(self):
        job = self.accepted_job()
        self.journal.break_writes()
        job.state = "running"
        self.record.save(job)
        self.record.forget(job)
        self.journal.mend()
        self.assertTrue(self.record.flush())
        self.assertIsNone(self.journal.get(job.id))

    def test_close_logs_the_ids_of_what_could_not_be_written(self):
        job = self.accepted_job("lostjob")
        self.journal.break_writes()
        job.state = "succeeded"
        self.record.save(job)
        self.record.close()
        self.assertTrue(self.logs.matching("could not be written and are lost (jobs lostjob)"),
                        self.logs.lines())


class ServiceWithBreakableJournalTest(BoundedTestCase):
    """The service on a journal whose writes fail on demand; the upkeep
    thread's interval is an hour, so only upkeep_once() calls do its work."""

    def setUp(self):
        self.rig = Rig(self)  # before the log capture, which keeps the deploys' lines off stderr
        super().setUp()
        self.rig.engine.add_container("web", "sha256:v1")
        self.journal = BreakableJournal(self)
        self.receiver = Receiver(self)
        self.callbacks = CallbackSender([self.receiver.origin], no_redirects_opener(False),
                                        timeout=2.0, retry_delays=())
        self.service = Service(web_config(), self.rig.runner, self.callbacks, self.journal,
                               clock=self.rig.clock, hostname="host", upkeep_interval=3600)

    def start(self):
        self.service.start()
        self.addCleanup(self.service.stop, 0)

    def deploy(self, callback: str = "") -> Job:
        waiter = autodeploy.Waiter()
        job = self.service.submit(Push("team/web", "latest", callback_url=callback or None), waiter)
        self.assertTrue(waiter.event.wait(10), "the job did not finish")
        return job

    def test_health_recovers_by_the_upkeep_probe_with_no_webhook(self):
        self.service.alive = lambda: True
        self.journal.break_writes()
        with self.assertRaises(autodeploy.PayloadError) as refused:
            self.service.submit(Push("team/web", "latest"))
        self.assertEqual(refused.exception.status, 503)
        self.assertEqual(self.service.health(), (False, "journal not writable"))
        self.journal.mend()
        self.assertEqual(self.service.health(), (False, "journal not writable"))  # nothing wrote yet
        self.service.upkeep_once()
        self.assertEqual(self.service.health(), (True, "ok"))
        self.assertTrue(self.logs.matching("writable again"))

    def test_upkeep_writes_the_outcome_of_a_job_finished_while_the_journal_failed(self):
        self.start()
        add = self.journal.add

        def add_then_break(job):  # the webhook is recorded; every write after it fails
            add(job)
            self.journal.break_writes()
        self.journal.add = add_then_break
        job = self.deploy(callback=self.receiver.url)
        self.assertTrue(self.receiver.wait_for(1), "sent from memory although its row was not written")
        self.assertTrue(wait_until(lambda: self.callbacks.pending() == 0, 5))
        self.assertNotEqual(self.journal.row(job.id)["state"], "succeeded")
        self.service.upkeep_once()
        self.assertNotEqual(self.journal.row(job.id)["state"], "succeeded")  # still broken
        self.journal.mend()
        self.service.upkeep_once()
        self.assertEqual(self.journal.row(job.id)["state"], "succeeded")
        self.assertEqual(self.journal.deliveries(), [])  # sent: its row is not written after all
        self.assertEqual(self.journal.unfinished(), [])
        self.assertEqual(self.service.record.held(), 0)

    def test_superseded_batches_are_held_not_lost(self):
        first = self.service.submit(Push("team/web", "latest"))
        second = self.service.submit(Push("team/web", "latest"))
        self.journal.break_writes()
        self.service.flush_superseded()
        self.assertEqual(self.journal.row(first.id)["state"], "queued")
        self.journal.mend()
        self.service.upkeep_once()
        self.assertEqual(self.journal.row(first.id)["state"], "superseded")
        self.assertEqual(self.journal.row(second.id)["state"], "queued")

    def test_final_state_and_callbacks_are_one_transaction(self):
        self.start()
        self.journal.break_writes("deliveries")  # the jobs table alone could be written
        job = self.deploy(callback=self.receiver.url)
        self.assertTrue(self.receiver.wait_for(1))
        # The callback row was refused, so the final state was not written either.
        self.assertNotEqual(self.journal.row(job.id)["state"], "succeeded")
        self.journal.mend()
        self.service.upkeep_once()
        self.assertEqual(self.journal.row(job.id)["state"], "succeeded")

    def test_a_finished_job_and_its_pending_callback_are_written_together(self):
        self.callbacks.urlopen = lambda *args, **kwargs: self.fail("sent before start")
        job = Job(id="j1", app=self.service.config.apps["team/web"], tag="latest",
                  callback_url=self.receiver.url, received=1.0)
        self.journal.add(job)
        job.state, job.description, job.finished = "failed", "pull failed", 2.0
        self.service.finish(job)  # the sender is not started: the callback stays pending
        self.assertEqual(self.journal.row(job.id)["state"], "failed")
        [row] = self.journal.deliveries()
        self.assertEqual((row["job"], row["url"], row["attempt"], row["from_request"]),
                         (job.id, self.receiver.url, 1, 1))
        self.assertIn('"state": "failure"', row["body"])


if __name__ == "__main__":
    import unittest
    unittest.main()
