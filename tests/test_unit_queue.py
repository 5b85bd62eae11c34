"""Unit tests: the JobQueue: one job per container at a time, the newest
waiting push wins, cooldowns, and close()."""

import threading
import time
import unittest

import autodeploy
from autodeploy import AppConfig, Job, JobQueue


def job(container: str, n: int, cooldown: float = 0.0) -> Job:
    app = AppConfig(container, container, ("latest",), container, cooldown=cooldown)
    return Job(id="%s-%d" % (container, n), app=app, tag="latest",
               callback_url="https://registry.hub.docker.com/u/x/hook/%d/" % n)


class JobQueueTest(unittest.TestCase):

    def test_one_job_per_container_at_a_time_and_newest_waiting_wins(self):
        queue = JobQueue()
        queue.put(job("a", 1))
        queue.put(job("b", 1))
        first = queue.get(timeout=1)
        self.assertEqual(first.id, "a-1")
        queue.put(job("a", 2))
        replaced = queue.put(job("a", 3))  # replaces a-2, which is still waiting
        self.assertEqual(replaced.id, "a-2")
        self.assertEqual(queue.get(timeout=1).id, "b-1")
        self.assertIsNone(queue.get(timeout=0.05))  # a is busy with a-1
        queue.task_done(first)
        third = queue.get(timeout=1)
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
        queue = JobQueue()
        first = job("a", 1, cooldown=0.3)
        queue.put(first)
        self.assertIs(queue.get(timeout=1), first)
        queue.task_done(first)
        queue.put(job("a", 2, cooldown=0.3))
        queue.put(job("b", 1))
        ended = time.monotonic()
        self.assertEqual(queue.get(timeout=1).id, "b-1")  # another container does not wait
        self.assertIsNone(queue.get(timeout=0.1))
        self.assertEqual(queue.get(timeout=2).id, "a-2")
        self.assertGreaterEqual(time.monotonic() - ended, 0.29)

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
