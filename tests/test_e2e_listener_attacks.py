"""End to end: the listener under attack, from distinct loopback sources.

The real service process, with allow_from naming 127.0.0.1 and 127.0.0.3-5
(127.0.0.2 is refused). Each attack is bounded in connections and time;
while it runs, a valid webhook from 127.0.0.1 must still get its 202 within
a second, and afterwards the service's peak resident memory must stay
under 64 MiB. No Docker Engine is needed: the webhooks' jobs fail at once
(docker_host names a socket that does not exist), which is not under test.
"""

import http.client
import json
import os
import socket
import threading
import time
import unittest

from tests import support
from tests.support import TOKEN, ServiceProcess, hub_payload
from tests.unit_support import read_until_closed

ATTACKERS_ALLOWED = ("127.0.0.3", "127.0.0.4", "127.0.0.5")
REFUSED = "127.0.0.2"
HUGE_LINE = b"X-Pad: " + b"p" * 64990 + b"\r\n"  # inside http.client's per-line limit


def connect(port: int, source: str, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def vm_hwm_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM for %d" % pid)


class ListenerAttackTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.port = support.free_port()
        config = """
[autodeploy]
listen = 127.0.0.1:{port}
token = {token}
workers = 1
allow_from = 127.0.0.1/32, 127.0.0.3/32, 127.0.0.4/32, 127.0.0.5/32
trusted_proxies = 127.0.0.1/32
docker_host = unix:///nonexistent/autodeploy-attack.sock
engine_wait = 0

[e2e/attacked]
container = e2e-attacked
cooldown = 0
""".format(port=cls.port, token=TOKEN)
        cls.service = ServiceProcess(config, dict(os.environ))
        cls.addClassCleanup(cls.service.stop)
        cls.service.start(cls.port)

    def valid_webhooks_answer_within_a_second(self, attack: threading.Thread, count: int = 8) -> None:
        """While `attack` runs: `count` webhooks from 127.0.0.1, each 202 within 1 s."""
        attack.start()
        try:
            time.sleep(0.3)  # the attack is under way
            for n in range(count):
                started = time.monotonic()
                status, answer = self.service.post(hub_payload("e2e/attacked", "latest"))
                took = time.monotonic() - started
                self.assertEqual(status, 202, answer)
                self.assertLess(took, 1.0, "webhook %d took %.2f s during the attack" % (n, took))
                time.sleep(0.1)
        finally:
            attack.join(30)
        self.assertFalse(attack.is_alive(), "the attack did not end within its bound")
        self.assertIsNone(self.service.process.poll(), "the service died")

    def flood(self, sources, per_source: int, send) -> threading.Thread:
        """A thread that opens `per_source` connections from each source at
        once and runs send(sock) on each, on threads of their own."""
        def run():
            workers = []
            for source in sources:
                for _ in range(per_source):
                    try:
                        sock = connect(self.port, source)
                    except OSError:
                        continue
                    worker = threading.Thread(target=self._quietly, args=(send, sock))
                    worker.start()
                    workers.append(worker)
            for worker in workers:
                worker.join(20)
        return threading.Thread(target=run)

    @staticmethod
    def _quietly(send, sock):
        try:
            send(sock)
        except OSError:
            pass  # the server closed it: what the attack is meant to meet
        finally:
            sock.close()

    def test_1_huge_headers_are_cut_off_at_the_head_budget(self):
        def huge_head(sock):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            for n in range(98):
                line = HUGE_LINE if n % 2 else HUGE_LINE.replace(b"pp", b"p\x80", 1)  # both parsers
                sock.sendall(line)
            sock.sendall(b"\r\n")
            sock.recv(4096)
        before = vm_hwm_kib(self.service.process.pid)
        attack = self.flood(ATTACKERS_ALLOWED + (REFUSED,), 16, huge_head)
        self.valid_webhooks_answer_within_a_second(attack)
        peak = vm_hwm_kib(self.service.process.pid)
        self.assertLess(peak, 64 * 1024, "peak RSS %d KiB (before: %d)" % (peak, before))

    def test_2_silent_sockets_cost_a_refused_source_nothing_and_an_allowed_one_its_share(self):
        def silent(sock):
            sock.settimeout(8)
            sock.recv(1)  # until the server drops it (header_timeout) or displaces it
        attack = self.flood((REFUSED,) * 4 + ATTACKERS_ALLOWED, 16, silent)
        self.valid_webhooks_answer_within_a_second(attack)
        self.assertIn("refused: not in allow_from", self.service.log_text())

    def test_3_slowloris_connections_do_not_starve_valid_senders(self):
        def slowloris(sock):
            for byte in b"POST /deploy/" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\n":
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
        attack = self.flood(ATTACKERS_ALLOWED, 24, slowloris)  # 72: more than max_connections
        self.valid_webhooks_answer_within_a_second(attack)

    def test_4_a_header_line_that_is_not_a_field_line_is_one_400_never_a_second_request(self):
        smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        body = hub_payload("e2e/attacked", "latest")
        for bad in (b"junk", b"Foo bar: x", b"Content-Length : %d" % len(smuggled),
                    b"X-Foo: a\rContent-Length: %d" % len(smuggled), b"X-Foo: a\r\n folded"):
            for head in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n%s\r\nContent-Length: %d\r\n\r\n"
                         % (bad, len(smuggled)),
                         b"POST /deploy/%s HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % (TOKEN.encode(), bad)):
                with self.subTest(head=head[:60], bad=bad):
                    sock = connect(self.port, "127.0.0.1")
                    self.addCleanup(sock.close)
                    sock.sendall(head + (smuggled if head.startswith(b"GET") else body))
                    answer = read_until_closed(sock)
                    self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])
                    self.assertEqual(answer.count(b"HTTP/1.1 "), 1, answer)
        started = time.monotonic()
        self.assertEqual(self.service.post(body)[0], 202)  # and valid senders are served
        self.assertLess(time.monotonic() - started, 1.0)

    def test_6_healthz_names_a_class_of_reason_never_a_path(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(conn.close)
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        answer = json.loads(response.read())
        self.assertEqual((response.status, answer),
                         (503, {"status": "unhealthy", "reason": "docker engine unreachable"}))
        self.assertIn("/nonexistent/autodeploy-attack.sock", self.service.log_text())  # the details

    def test_5_nothing_a_client_sends_forges_or_hides_a_log_line(self):
        offset = len(self.service.log_text())
        forged = "2026-01-01 00:00:00,000 INFO forged"
        requests = [
            # an obs-folded X-Forwarded-For through the trusted proxy
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.9.9.9,\r\n " + forged.encode()
            + b"\r\n\r\n",
            # terminal escapes and a vertical tab in the request line and a header
            b"GET /\x1b[31mred\x0b HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.9.9.9\x1b[2J\r\n\r\n",
            b"GET /\x1b]0;title\x07 HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
        for request in requests:
            sock = connect(self.port, "127.0.0.1")
            self.addCleanup(sock.close)
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
        # a callback URL with CR LF in it: logged as scheme and host only
        status, _ = self.service.post(json.dumps({
            "repository": {"repo_name": "e2e/attacked"}, "push_data": {"tag": "latest"},
            "callback_url": "https://evil.example/x\r\n" + forged + " /secret-path"}).encode())
        self.assertEqual(status, 202)
        deadline = time.monotonic() + 10
        while "not an allowed callback origin" not in self.service.log_text()[offset:]:
            self.assertLess(time.monotonic(), deadline, self.service.log_text()[offset:])
            time.sleep(0.05)
        log = self.service.log_text()[offset:]
        self.assertFalse([line for line in log.splitlines() if line.startswith(forged)], log)
        for raw in ("\x1b", "\x0b", "\x07", "secret-path"):
            self.assertNotIn(raw, log)
        self.assertIn("evil.example/...", log)


if __name__ == "__main__":
    unittest.main()
