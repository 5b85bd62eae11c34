"""Unit tests: `request_timeout`: a client that trickles its request
(slowloris) or never starts its TLS handshake is dropped once it passes.

Here waiting is the point, so setUpClass starts every slow client at once,
against a plain and an HTTPS server: the class waits one request_timeout
(0.2 s: make_config skips load_config's floor of 0.5 s), not one a test.
"""

import concurrent.futures
import logging
import select
import socket
import time
import unittest
from typing import Dict, Optional, Tuple

import autodeploy
from tests.unit_support import (BoundedTestCase, capture_logs, hub_body, make_certificate, make_config,
                                raw_post, read_until_closed, start_webhook_server)

TIMEOUT = 0.2  # below load_config's least (0.5 s): waiting is all these tests do


def trickle(sock: socket.socket, head: bytes, rest: bytes, limit: float = 4.0
            ) -> Tuple[Optional[float], bytes]:
    """Send `head`, then `rest` a byte every 50 ms until the server answers
    or closes: (seconds until then, what it sent), or (None, b"") when it
    kept listening for `limit` seconds."""
    sock.sendall(head)
    started = time.monotonic()
    for byte in rest:
        if time.monotonic() - started >= limit:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # reset: dropped
            return time.monotonic() - started, b""
        if select.select([sock], [], [], 0.05)[0]:  # an answer, or the end
            closed_after = time.monotonic() - started
            try:
                return closed_after, sock.recv(4096)
            except ConnectionError:
                return closed_after, b""
    return None, b""


def stay_silent(sock: socket.socket) -> Tuple[float, bytes]:
    """Send nothing; (seconds until the server closed, what it sent)."""
    started = time.monotonic()
    data = read_until_closed(sock)
    return time.monotonic() - started, data


class RequestTimeoutTest(BoundedTestCase):

    @classmethod
    def setUpClass(cls) -> None:
        cls.class_logs = capture_logs(cls.addClassCleanup)
        cls.plain = start_webhook_server(cls.addClassCleanup, make_config(request_timeout=TIMEOUT, header_timeout=TIMEOUT))
        try:
            cert, key = make_certificate(cls.addClassCleanup)
        except unittest.SkipTest as exc:
            cls.tls, cls.no_tls = None, str(exc)
        else:
            config = make_config(tls_cert=cert, tls_key=key, request_timeout=TIMEOUT,
                                 header_timeout=TIMEOUT)
            cls.tls, cls.no_tls = start_webhook_server(cls.addClassCleanup, config,
                                                       autodeploy.tls_context(config)), ""
        pool = concurrent.futures.ThreadPoolExecutor(3)
        cls.addClassCleanup(pool.shutdown)
        cls.outcomes: Dict[str, concurrent.futures.Future] = {
            # The request line a byte at a time; or the headers at once, then the body so.
            "request line": pool.submit(trickle, cls.connect(cls.plain), b"", raw_post(body=hub_body())),
            "body": pool.submit(trickle, cls.connect(cls.plain), raw_post(length=200), b"{" * 200)}
        if cls.tls is not None:
            cls.outcomes["tls"] = pool.submit(stay_silent, cls.connect(cls.tls))

    @classmethod
    def connect(cls, server: autodeploy.WebhookServer) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5)
        cls.addClassCleanup(sock.close)
        return sock

    def test_slowloris_is_dropped_at_request_timeout(self):
        for phase in ("request line", "body"):
            with self.subTest(phase=phase):
                closed_after, data = self.outcomes[phase].result(10)
                self.assertIsNotNone(closed_after, "still connected after 4 s")
                self.assertFalse(data.startswith(b"HTTP/1.1 2"), data)
                self.assertLess(closed_after, TIMEOUT + 1.0)
                self.assertGreater(closed_after, 0.7 * TIMEOUT)
        self.assertEqual(self.plain.service.queue.depth(), 0)
        self.assertNoErrorLogged()

    def test_a_silent_tls_client_is_dropped_after_request_timeout(self):
        if self.tls is None:
            self.skipTest(self.no_tls)
        closed_after, data = self.outcomes["tls"].result(10)
        self.assertEqual(data, b"")
        self.assertLess(closed_after, TIMEOUT + 1.0)
        self.assertGreater(closed_after, 0.7 * TIMEOUT)
        self.assertNoErrorLogged()

    def assertNoErrorLogged(self) -> None:
        """Of the class's servers: they log what the slow clients cause."""
        errors = [r for r in self.class_logs.records if r.levelno >= logging.ERROR]
        self.assertFalse(errors, self.class_logs.lines())


if __name__ == "__main__":
    unittest.main()
