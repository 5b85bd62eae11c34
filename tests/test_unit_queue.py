"""Unit tests: the JobQueue: one job per container at a time, the newest
waiting push wins, cooldowns, and close()."""

import threading
import time
import unittest

import autodeploy
from autodeploy import AppConfig, Job, JobQueue
from tests.unit_support import FakeClock


def job(container: str, n: int, cooldown: float = 0.0) -> Job:
    app = AppConfig(container, container, ("latest",), container, cooldown=cooldown)
    return Job(id="%s-%d" % (container, n), app=app, tag="latest",
               callback_url="https://registry.hub.docker.com/u/x/hook/%d/" % n)


class JobQueueTest(unittest.TestCase):

    def test_one_job_per_container_at_a_time_and_newest_waiting_wins(self):
        queue = JobQueue()
        queue.put(job("a", 1))
        queue.put(job("b", 1))
        first = queue.get(timeout=0)
        self.assertEqual(first.id, "a-1")
        queue.put(job("a", 2))
        replaced = queue.put(job("a", 3))  # replaces a-2, which is still waiting
        self.assertEqual(replaced.id, "a-2")
        self.assertEqual(queue.get(timeout=0).id, "b-1")
        self.assertIsNone(queue.get(timeout=0))  # a is busy with a-1
        queue.task_done(first)
        third = queue.get(timeout=0)
        self.assertEqual(third.id, "a-3")
        self.assertEqual([j.id for j in third.superseded], ["a-2"])

    def test_a_flood_of_pushes_keeps_memory_bounded(self):
        queue = JobQueue()
        for n in range(autodeploy.MAX_SUPERSEDED + 50):
            queue.put(job("a", n))
        waiting = queue.get(timeout=1)
        self.assertEqual(len(waiting.superseded), autodeploy.MAX_SUPERSEDED)
        self.assertEqual(waiting.superseded[-1].id, "a-%d" % (autodeploy.MAX_SUPERSEDED + 48))

    def test_next_job_for_a_container_waits_out_its_cooldown(self):
        clock = FakeClock()  # get(timeout=0) looks once, at the clock's time
        queue = JobQueue(clock=clock)
        first = job("a", 1, cooldown=30)
        queue.put(first)
        self.assertIs(queue.get(timeout=0), first)
        queue.task_done(first)
        queue.put(job("a", 2, cooldown=30))
        queue.put(job("b", 1))
        self.assertEqual(queue.get(timeout=0).id, "b-1")  # another container does not wait
        self.assertIsNone(queue.get(timeout=0))
        clock.advance(29.9)
        self.assertIsNone(queue.get(timeout=0))
        clock.advance(0.1)
        self.assertEqual(queue.get(timeout=0).id, "a-2")

    def test_a_worker_waiting_for_a_cooldown_wakes_when_it_ends(self):
        queue = JobQueue()
        first = job("a", 1, cooldown=0.01)
        queue.put(first)
        self.assertIs(queue.get(timeout=0), first)
        ended = time.monotonic()
        queue.task_done(first)
        queue.put(job("a", 2))
        self.assertEqual(queue.get(timeout=5).id, "a-2")
        self.assertGreaterEqual(time.monotonic() - ended, 0.0099)

    def test_close_wakes_workers(self):
        queue = JobQueue()
        results = []
        worker = threading.Thread(target=lambda: results.append(queue.get()))
        worker.start()
        queue.close()
        worker.join(2)
        self.assertEqual(results, [None])


if __name__ == "__main__":
    unittest.main()
