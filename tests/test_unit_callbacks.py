"""Unit tests: the CallbackSender: allowlisted origins only, no redirects,
timeouts, retries, a bounded queue. Callbacks go to Receivers on 127.0.0.1."""

import json
import socket
import threading
import time
import unittest
from typing import Any, List, Tuple

import autodeploy
from autodeploy import AppConfig, CallbackSender, Job, MemoryJournal, Recorder, no_redirects_opener
from tests.unit_support import BoundedTestCase, BreakableJournal, HeldOpener, Receiver, wait_until


class BlackHole:
    """A listening socket that accepts connections and never answers, until
    hang_up() closes those it holds."""

    def __init__(self, test: unittest.TestCase):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.origin = ("http", "127.0.0.1", self.port)
        self.url = "http://127.0.0.1:%d/hook/1" % self.port
        self.accepted: List[socket.socket] = []
        self._cond = threading.Condition()
        self._stopping = False
        thread = threading.Thread(target=self._accept, name="black-hole", daemon=True)
        thread.start()
        test.addCleanup(self._close, thread)

    def _accept(self) -> None:
        while True:
            try:
                conn = self.sock.accept()[0]
            except OSError:
                return
            with self._cond:
                if self._stopping:
                    conn.close()
                    return
                self.accepted.append(conn)
                self._cond.notify_all()

    def wait_accepted(self, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.accepted) >= count, timeout)

    def hang_up(self) -> None:
        """Close the connections held so far."""
        with self._cond:
            held, self.accepted = self.accepted, []
        for conn in held:
            conn.close()

    def _close(self, thread: threading.Thread) -> None:
        with self._cond:
            self._stopping = True
        socket.create_connection(("127.0.0.1", self.port), timeout=5).close()  # wakes accept()
        thread.join(5)
        self.hang_up()
        self.sock.close()


def a_job(n: int = 1) -> Job:
    app = AppConfig("myname/myrepo", "myname/myrepo", ("latest",), "myname-myrepo")
    job = Job(id="job%d" % n, app=app, tag="latest")
    job.state, job.description = "succeeded", "deployed"
    return job


BODY = {"state": "success", "description": "deployed", "context": "autodeploy"}
NOT_SENT = "callback(s) not sent: stopping"  # stop() counts what was queued but not due


class CallbackTest(BoundedTestCase):

    def sender(self, allow: List[Tuple[str, str, int]], **options: Any) -> CallbackSender:
        options.setdefault("timeout", 2.0)
        options.setdefault("retry_delays", ())
        # no proxy from the environment: these URLs are on 127.0.0.1
        sender = CallbackSender(allow, no_redirects_opener(use_proxy_env=False), **options)
        sender.start()
        self.addCleanup(sender.stop, 3.0)
        return sender

    def test_not_allowed_origins_are_not_called(self):
        receiver = Receiver(self)
        host = "127.0.0.1:%d" % receiver.port
        other_port = receiver.port + 1 if receiver.port < 65535 else 1
        sender = self.sender([("https", "registry.hub.docker.com", 443), ("https", "127.0.0.1", receiver.port),
                              ("http", "127.0.0.1", other_port)])  # the host over http, on another port
        refused = ["http://%s/hook" % host,  # the host is not allowed over http
                   "https://%s/hook" % host.replace("127.0.0.1", "localhost"),
                   "http://user:secret-pw@%s/hook" % host, "ftp://%s/hook" % host,
                   "http://127.0.0.1/hook", "//%s/hook" % host, "http://[::1]:%d/" % receiver.port,
                   "http://127.0.0.1:%d:80/" % receiver.port, "javascript:alert(1)"]
        for url in refused:
            with self.subTest(url=url):
                self.assertFalse(autodeploy.callback_allowed(url, sender.allow))
                sender.send(a_job(), url, BODY)
        sender.stop()  # what was queued and due is sent now; what was not, counted
        self.assertEqual(receiver.count(), 0)
        self.assertFalse(self.logs.matching(NOT_SENT))
        self.assertEqual(len(self.logs.matching("not an allowed callback origin")), len(refused))
        for line in self.logs.lines():
            self.assertNotIn("secret-pw", line)
            self.assertNotIn("/hook", line)  # paths of callback URLs carry secrets

    def test_http_callback_refused_when_only_https_is_allowed_then_sent_when_allowed(self):
        receiver = Receiver(self)
        sender = self.sender([("https", "127.0.0.1", receiver.port)])
        sender.send(a_job(), receiver.url, BODY)
        self.assertEqual(len(self.logs.matching("not an allowed callback origin")), 1)
        sender.allow = [receiver.origin]  # Service.reload() does this
        sender.send(a_job(), receiver.url, BODY)
        self.assertTrue(receiver.wait_for(1))
        sender.stop()
        self.assertEqual(receiver.count(), 1)  # the refused one was never queued
        _, method, path, body = receiver.hits[0]
        self.assertEqual((method, path, json.loads(body.decode())), ("POST", "/hook/1", BODY))

    def test_redirects_are_not_followed(self):
        target = Receiver(self)
        redirector = Receiver(self, statuses=(302,), location=target.url)
        sender = self.sender([redirector.origin, target.origin], retry_delays=(0.01, 0.01))
        sender.send(a_job(), redirector.url, BODY)
        self.assertTrue(self.logs.wait_for("refused: HTTP 302"), self.logs.lines())
        sender.stop()  # a retry would now be sent, or counted as not sent
        self.assertEqual(target.count(), 0)
        self.assertEqual(redirector.count(), 1)  # a redirect will not change: not retried
        self.assertFalse(self.logs.matching(NOT_SENT))

    def test_no_redirect_opener_on_its_own(self):
        import urllib.error
        import urllib.request
        target = Receiver(self)
        for status in (301, 302, 303, 307, 308):
            redirector = Receiver(self, statuses=(status,), location=target.url)
            with self.subTest(status=status), self.assertRaises(urllib.error.HTTPError) as caught:
                no_redirects_opener(False)(urllib.request.Request(redirector.url, data=b"{}"), timeout=3)
            caught.exception.close()
            self.assertEqual(caught.exception.code, status)
        self.assertEqual(target.count(), 0)

    def test_a_host_that_never_answers_holds_one_thread_only(self):
        hole = BlackHole(self)
        receiver = Receiver(self)
        failed = "callback success to http://127.0.0.1/... failed"
        # A timeout longer than the test: the post to the hole stays stuck until it hangs up.
        sender = self.sender([hole.origin, receiver.origin], timeout=60.0)
        sender.send(a_job(1), hole.url, BODY)
        self.assertTrue(hole.wait_accepted(1))  # a thread is now stuck on it
        sender.send(a_job(2), receiver.url, BODY)
        self.assertTrue(receiver.wait_for(1))
        self.assertFalse(self.logs.matching(failed))  # it came while the other one was stuck
        hole.hang_up()
        self.assertTrue(self.logs.wait_for(failed), self.logs.lines())
        # and a post that gets no answer gives up after `timeout`
        quick = self.sender([hole.origin], timeout=0.05)
        started = time.monotonic()
        quick.send(a_job(3), hole.url, BODY)
        self.assertEqual(len(self.logs.wait_for(failed, count=2)), 2, self.logs.lines())
        self.assertGreater(time.monotonic() - started, 0.049)
        self.assertLess(time.monotonic() - started, 3.0)

    def test_retries_follow_retry_delays(self):
        receiver = Receiver(self, statuses=(500, 503, 200))
        sender = self.sender([receiver.origin], retry_delays=(0.01, 0.03, 0.005))
        sender.send(a_job(), receiver.url, BODY)
        self.assertTrue(self.logs.wait_for("callback success sent"), self.logs.lines())
        sender.stop()  # sent at the third attempt: a fourth would now be sent, or counted as not sent
        times = [hit[0] for hit in receiver.hits]
        self.assertEqual(len(times), 3)
        self.assertGreaterEqual(times[1] - times[0], 0.0099)
        self.assertGreaterEqual(times[2] - times[1], 0.0299)
        self.assertLess(times[2] - times[0], 2.0)
        self.assertEqual(len(self.logs.matching("attempt 1 failed, next in 0.01 s")), 1)
        self.assertEqual(len(self.logs.matching("attempt 2 failed, next in 0.03 s")), 1)
        self.assertEqual(len(self.logs.matching("callback success sent")), 1)
        self.assertFalse(self.logs.matching(NOT_SENT))

    def test_retries_stop_after_the_last_delay(self):
        receiver = Receiver(self, statuses=(500,))
        sender = self.sender([receiver.origin], retry_delays=(0.01, 0.01))
        sender.send(a_job(), receiver.url, BODY)
        self.assertEqual(len(self.logs.wait_for("refused: HTTP 500", count=3)), 3, self.logs.lines())
        sender.stop()  # a fourth attempt would now be sent, or counted as not sent
        self.assertEqual(receiver.count(), 3)
        self.assertFalse(self.logs.matching("attempt 3 failed"))
        self.assertFalse(self.logs.matching(NOT_SENT))

    def test_429_is_retried_but_404_is_not(self):
        retried = Receiver(self, statuses=(429, 200))
        final = Receiver(self, statuses=(404,))
        sender = self.sender([retried.origin, final.origin], retry_delays=(0.01, 0.01, 0.01))
        sender.send(a_job(1), retried.url, BODY)
        sender.send(a_job(2), final.url, BODY)
        self.assertTrue(self.logs.wait_for("callback success sent"), self.logs.lines())
        self.assertTrue(self.logs.wait_for("refused: HTTP 404"), self.logs.lines())
        sender.stop()  # a retry would now be sent, or counted as not sent
        self.assertEqual((retried.count(), final.count()), (2, 1))
        self.assertFalse(self.logs.matching(NOT_SENT))

    def test_the_queue_is_bounded(self):
        sender = CallbackSender([("http", "127.0.0.1", 9)], max_pending=2)  # not started
        for n in range(4):
            sender.send(a_job(n), "http://127.0.0.1:9/hook", BODY)
        self.assertEqual(len(self.logs.matching("dropped: 2 posts are waiting already")), 2)
        sender.stop(0.1)
        self.assertTrue(self.logs.matching("2 " + NOT_SENT))

class DestinationTest(BoundedTestCase):
    """Each destination has its queue and, while something is due, its thread."""

    def test_a_stalled_destination_with_many_deliveries_holds_back_no_other(self):
        hole, receiver = BlackHole(self), Receiver(self)
        # A timeout longer than the test: each post to the hole stays stuck until it hangs up.
        sender = CallbackSender([hole.origin, receiver.origin], no_redirects_opener(False),
                                timeout=60.0, retry_delays=())
        sender.start()
        self.addCleanup(sender.stop, 0.1)  # its stuck threads end when the hole closes
        for n in range(8):
            sender.send(a_job(n), hole.url, BODY)
        self.assertTrue(hole.wait_accepted(1))
        sender.send(a_job(99), receiver.url, BODY)
        self.assertTrue(receiver.wait_for(1))
        self.assertTrue(self.logs.wait_for("callback success sent"))
        # It came while the hole held its first post: none was given up, and
        # the hole's others wait their turn (one post in flight per destination).
        self.assertFalse(self.logs.matching("failed"), self.logs.lines())
        self.assertEqual(len(hole.accepted), 1)
        self.assertTrue(wait_until(lambda: sender.pending() == 8, 5), sender.pending())
        hole.hang_up()
        self.assertTrue(hole.wait_accepted(1))  # the next one of the hole's queue
        self.assertEqual(len(self.logs.matching("callback success to http://127.0.0.1/... failed")), 1)
        sender.stop(0)  # nothing more is posted; the one in flight ends with the hang-up
        hole.hang_up()
        self.assertEqual(len(self.logs.wait_for("given up after 1 attempt(s)", count=2)), 2)

    def test_at_most_max_destinations_are_sent_to_at_once(self):
        opener = HeldOpener(self)
        sender = CallbackSender([], opener, retry_delays=(), max_destinations=2)
        urls = ["http://127.0.0.%d:8000/held" % n for n in (2, 3, 4)]
        for n, url in enumerate(urls):  # all queued before start: one dispatching pass sees them
            sender.post_later(a_job(n), "notification", url, BODY)
        sender.start()
        self.addCleanup(sender.stop, 1.0)
        self.assertTrue(opener.wait_calls(2))
        self.assertEqual(sorted(opener.calls), urls[:2])
        self.assertEqual(len(sender.busy()), 2)
        opener.release()
        self.assertTrue(opener.wait_calls(3))
        self.assertEqual(opener.calls[2], urls[2])

    def test_two_posts_to_one_destination_are_never_in_flight_together(self):
        opener = HeldOpener(self)
        sender = CallbackSender([], opener, retry_delays=())
        sender.start()
        self.addCleanup(sender.stop, 1.0)
        sender.post_later(a_job(1), "notification", "http://127.0.0.2:8000/held/1", BODY)
        sender.post_later(a_job(2), "notification", "http://127.0.0.2:8000/held/2", BODY)
        sender.post_later(a_job(3), "notification", "http://127.0.0.3:8000/free", BODY)
        self.assertTrue(opener.wait_calls(2))
        self.assertEqual(sorted(opener.calls), ["http://127.0.0.2:8000/held/1",
                                                "http://127.0.0.3:8000/free"])
        opener.release()
        self.assertTrue(opener.wait_calls(3))
        self.assertEqual(opener.calls[-1], "http://127.0.0.2:8000/held/2")


class WallClock:
    """time.time(), `ahead` seconds ahead: a restart that comes later."""

    def __init__(self, ahead: float = 0.0):
        self.ahead = ahead

    def __call__(self) -> float:
        return time.time() + self.ahead


class PersistedDeliveryTest(BoundedTestCase):
    """Deliveries are journal rows until sent or given up; a new sender
    (after a restart) sends what an old one left."""

    def setUp(self):
        super().setUp()
        self.journal = BreakableJournal(self)
        self.record = Recorder(self.journal)

    def sender(self, allow, wall_ahead: float = 0.0, **options: Any) -> CallbackSender:
        options.setdefault("retry_delays", (30.0,))
        sender = CallbackSender(allow, no_redirects_opener(False), timeout=2.0, record=self.record,
                                wall_clock=WallClock(wall_ahead), **options)
        self.addCleanup(sender.stop, 1.0)
        return sender

    def test_a_retry_survives_a_restart_and_a_success_is_never_sent_again(self):
        receiver = Receiver(self, statuses=(500, 200))
        first = self.sender([receiver.origin])
        first.start()
        first.send(a_job(1), receiver.url, BODY)
        self.assertTrue(self.logs.wait_for("attempt 1 failed, next in 30 s"), self.logs.lines())
        first.stop()
        self.assertTrue(self.logs.matching("1 callback(s) pending: sent after the next start"))
        [row] = self.journal.deliveries()
        self.assertEqual((row["job"], row["attempt"]), ("job1", 2))
        self.assertGreater(row["due"], time.time() + 25)  # the retry's due time, on the wall clock

        # Started again 31 s later: the retry is overdue, so it is sent at once.
        second = self.sender([receiver.origin], wall_ahead=31.0)
        second.resume(self.journal.deliveries())
        second.start()
        self.assertTrue(receiver.wait_for(2))
        self.assertTrue(self.logs.wait_for("callback success sent"), self.logs.lines())
        second.stop()
        self.assertEqual(self.journal.deliveries(), [])
        third = self.sender([receiver.origin], wall_ahead=62.0)
        third.resume(self.journal.deliveries())
        third.start()
        third.stop()
        self.assertEqual(receiver.count(), 2)
        self.assertEqual([json.loads(hit[3].decode()) for hit in receiver.hits], [BODY, BODY])

    def test_resumed_deliveries_go_before_new_ones(self):
        opener = HeldOpener(self)
        old = self.sender([], wall_ahead=0.0)
        old.post_later(a_job(1), "notification", "http://127.0.0.2:8000/old", BODY)  # never started
        old.stop(0)
        new = CallbackSender([], opener, record=self.record)
        self.addCleanup(new.stop, 1.0)
        new.resume(self.journal.deliveries())
        new.post_later(a_job(2), "notification", "http://127.0.0.2:8000/new", BODY)
        new.start()
        self.assertTrue(opener.wait_calls(2))
        self.assertEqual(opener.calls, ["http://127.0.0.2:8000/old", "http://127.0.0.2:8000/new"])

    def test_what_is_not_due_at_stop_stays_in_the_journal_for_the_next_start(self):
        receiver = Receiver(self, statuses=(503,))
        sender = self.sender([receiver.origin])
        sender.start()
        sender.send(a_job(1), receiver.url, BODY)
        self.assertTrue(self.logs.wait_for("attempt 1 failed"), self.logs.lines())
        sender.stop()
        self.assertEqual(len(self.journal.deliveries()), 1)
        self.assertFalse(self.logs.matching(NOT_SENT))

    def test_without_a_journal_what_is_not_due_at_stop_is_not_sent(self):
        receiver = Receiver(self, statuses=(503,))
        sender = CallbackSender([receiver.origin], no_redirects_opener(False), retry_delays=(30.0,),
                                record=Recorder(MemoryJournal()))
        sender.start()
        sender.send(a_job(1), receiver.url, BODY)
        self.assertTrue(self.logs.wait_for("attempt 1 failed"), self.logs.lines())
        sender.stop()
        self.assertTrue(self.logs.matching("1 " + NOT_SENT))

    def test_given_up_and_refused_deliveries_leave_no_row(self):
        refused, failing = Receiver(self, statuses=(404,)), Receiver(self, statuses=(500,))
        sender = self.sender([refused.origin, failing.origin], retry_delays=(0.01,))
        sender.start()
        sender.send(a_job(1), refused.url, BODY)
        sender.send(a_job(2), failing.url, BODY)
        self.assertTrue(self.logs.wait_for("given up after 2 attempt(s)"), self.logs.lines())
        self.assertTrue(self.logs.wait_for("refused: HTTP 404"), self.logs.lines())
        sender.stop()
        self.assertEqual(self.journal.deliveries(), [])

    def test_a_resumed_callback_to_an_origin_no_longer_allowed_is_dropped(self):
        receiver = Receiver(self)
        old = self.sender([receiver.origin])
        old.send(a_job(1), receiver.url, BODY)  # never started: stays in the journal
        old.stop(0)
        new = self.sender([])  # the origin left callback_allow meanwhile
        new.resume(self.journal.deliveries())
        new.start()
        new.stop()
        self.assertEqual(receiver.count(), 0)
        self.assertTrue(self.logs.matching("not an allowed callback origin any more"))
        self.assertEqual(self.journal.deliveries(), [])

    def test_a_delivery_whose_row_cannot_be_written_is_sent_and_its_delete_held(self):
        receiver = Receiver(self)
        sender = self.sender([receiver.origin])
        sender.start()
        self.journal.break_writes()
        sender.send(a_job(1), receiver.url, BODY)
        self.assertTrue(receiver.wait_for(1))
        self.assertTrue(self.logs.wait_for("callback success sent"))
        self.journal.mend()
        self.assertTrue(self.record.flush())
        self.assertEqual(self.journal.deliveries(), [])  # inserted and deleted: nothing left


if __name__ == "__main__":
    unittest.main()
