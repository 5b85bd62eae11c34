"""Unit tests: the SQLite journal (records, unfinished jobs, retention, errors)."""

import os
import shutil
import sqlite3
import unittest

import autodeploy
from autodeploy import AppConfig, Job, Journal, JournalError
from tests.unit_support import BoundedTestCase, FakeClock, temp_folder, wait_until

APP = AppConfig("team/api", "team/api", ("latest",), "team-api")
OTHER = AppConfig("team/web", "team/web", ("latest",), "team-web")


class JournalTest(BoundedTestCase):

    def setUp(self):
        super().setUp()
        self.folder = temp_folder(self, "autodeploy-journal-")
        self.clock = FakeClock()
        self.journal = self.open(keep_per_app=3, keep_days=1)

    def open(self, **kwargs) -> Journal:
        journal = Journal(os.path.join(self.folder, "state", "journal.sqlite3"),
                          clock=self.clock, **kwargs).open()
        self.addCleanup(journal.close)
        return journal

    def job(self, app: AppConfig = APP, received: float = 0.0, state: str = "queued") -> Job:
        job = Job(id=autodeploy.new_job_id(), app=app, tag="latest", received=received or self.clock.now)
        self.journal.add(job)
        if state != "queued":
            job.state, job.finished = state, job.received + 1
            self.journal.save(job)
        return job

    def test_a_job_is_recorded_and_updated(self):
        job = self.job()
        job.state, job.started, job.description = "running", self.clock.now, "pulling"
        job.lines = ["a", "b"]
        self.journal.save(job, old_container="c1", was_running=1)
        row = self.journal.get(job.id)
        self.assertEqual((row["app"], row["container"], row["state"], row["old_container"], row["log"]),
                         ("team/api", "team-api", "running", "c1", "a\nb"))
        self.assertEqual([r["id"] for r in self.journal.unfinished()], [job.id])
        self.assertIsNone(self.journal.get("nosuchjob"))

    def test_unfinished_are_oldest_first_and_recent_newest_first(self):
        jobs = [self.job(received=self.clock.now + n) for n in range(3)]
        self.job(state="succeeded", received=self.clock.now + 5)
        self.assertEqual([r["id"] for r in self.journal.unfinished()], [j.id for j in jobs])
        self.assertEqual([r["id"] for r in self.journal.recent(state="queued")],
                         [j.id for j in reversed(jobs)])
        self.assertEqual(len(self.journal.recent(app="team/api", limit=2)), 2)

    def test_superseded_jobs_are_marked_in_one_commit(self):
        jobs = [self.job() for _ in range(3)]
        self.journal.mark_superseded([(self.clock.now, "superseded by x", j.id) for j in jobs])
        self.assertEqual({r["state"] for r in self.journal.recent()}, {"superseded"})

    def test_retention_keeps_the_newest_finished_jobs_per_app_and_no_old_ones(self):
        old = self.job(state="succeeded", received=self.clock.now - 2 * 86400)
        finished = [self.job(state="failed", received=self.clock.now + n) for n in range(5)]
        other = self.job(OTHER, state="succeeded")
        waiting = self.job(received=self.clock.now - 3 * 86400)  # unfinished: never pruned
        self.journal._prune()
        kept = {r["id"] for r in self.journal.recent(limit=100)}
        self.assertEqual(kept, {j.id for j in finished[-3:]} | {other.id, waiting.id})
        self.assertNotIn(old.id, kept)

    def test_small_pages_and_no_index_on_state(self):
        db = self.journal._db
        self.assertEqual(db.execute("PRAGMA page_size").fetchone()[0], 1024)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        indexes = {row[1] for row in db.execute("PRAGMA index_list(jobs)")}
        self.assertIn("jobs_by_app", indexes)
        self.assertNotIn("jobs_by_state", indexes)

    def rows_in_database_file(self) -> int:
        """The rows in a copy of the journal's database file without its WAL
        (-1 when the copy caught a checkpoint half-way)."""
        copy = os.path.join(self.folder, "copy.sqlite3")
        shutil.copyfile(self.journal.path, copy)
        db = sqlite3.connect(copy)
        try:
            return db.execute("SELECT count(*) FROM jobs").fetchone()[0]
        except sqlite3.DatabaseError:
            return -1
        finally:
            db.close()

    def test_checkpoints_run_on_the_housekeeping_thread(self):
        self.journal.start_housekeeping(interval=0.01)
        self.assertEqual(self.journal._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0], 0)
        for _ in range(50):
            self.job()
        # The database file alone, without its WAL, comes to hold the rows: they were checkpointed.
        self.assertTrue(wait_until(lambda: self.rows_in_database_file() == 50, 5),
                        self.rows_in_database_file())
        self.assertTrue(self.journal.alive())
        self.journal.close()
        self.assertFalse(self.journal._housekeeper.is_alive())

    def test_an_unopenable_journal_reports_and_refuses(self):
        blocker = os.path.join(self.folder, "file")
        with open(blocker, "w"):
            pass
        journal = Journal(os.path.join(blocker, "journal.sqlite3")).open()  # its folder is a file
        self.addCleanup(journal.close)
        self.assertIn("cannot open the journal", journal.error)
        self.assertTrue(self.logs.matching("cannot open the journal"))
        with self.assertRaises(JournalError):
            journal.add(Job(id="j1", app=APP, tag="latest"))

    def test_a_journal_from_before_the_step_columns_gets_them_and_keeps_its_rows(self):
        path = os.path.join(self.folder, "old", "journal.sqlite3")
        os.makedirs(os.path.dirname(path))
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE jobs (%s)" % ", ".join(
            c for c in autodeploy.JOURNAL_COLUMNS if c not in ("step", "failure")))
        db.execute("INSERT INTO jobs (id, app, state, received) VALUES ('j0', 'team/api', 'running', 1)")
        db.commit()
        db.close()
        journal = Journal(path).open()
        self.addCleanup(journal.close)
        row = journal.get("j0")
        self.assertEqual((row["state"], row["step"], row["failure"]), ("running", None, None))
        journal.save(Job(id="j0", app=APP, tag="latest"), step="gate")
        self.assertEqual(journal.get("j0")["step"], "gate")

    def test_a_delivery_id_is_accepted_once_and_can_be_forgotten(self):
        self.assertTrue(self.journal.first_delivery("github:d1"))
        self.assertFalse(self.journal.first_delivery("github:d1"))
        self.journal.forget_delivery("github:d1")
        self.assertTrue(self.journal.first_delivery("github:d1"))

    def test_delivery_ids_survive_a_reopen_and_old_ones_are_pruned(self):
        self.journal.first_delivery("old")
        self.clock.advance(autodeploy.SEEN_DELIVERY_DAYS * 86400 + 1)
        self.journal.first_delivery("new")
        self.journal.close()
        journal = self.open()
        self.assertFalse(journal.first_delivery("new"))
        journal._prune()
        self.assertTrue(journal.first_delivery("old"))

    def test_the_memory_journal_keeps_a_bounded_window_of_delivery_ids(self):
        journal = autodeploy.MemoryJournal()
        self.assertTrue(journal.first_delivery("a"))
        self.assertFalse(journal.first_delivery("a"))
        for n in range(autodeploy.SEEN_DELIVERIES):
            journal.first_delivery("k%d" % n)
        self.assertTrue(journal.first_delivery("a"))  # the oldest went

    def test_a_closed_journal_refuses_writes(self):
        self.journal.close()
        with self.assertRaises(JournalError):
            self.job()


if __name__ == "__main__":
    unittest.main()
