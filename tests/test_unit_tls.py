"""Unit tests: HTTPS, with a certificate made at test time by `openssl`
(skipped when openssl is missing, except under CI=true, where that fails).
A silent TLS client is dropped at request_timeout: test_unit_request_timeout.

Comments starting with BUG name a bug these tests found; each is fixed, and
the test keeps it fixed.
"""

import contextlib
import io
import os
import socket
import ssl
import unittest
import warnings

import autodeploy
from tests.unit_support import (GLOBAL_TOKEN, ServerTestCase, hub_body, make_certificate, make_config,
                                raw_post, split_response)


class TLSTest(ServerTestCase):

    @classmethod
    def setUpClass(cls) -> None:
        cls.cert, cls.key = make_certificate(cls.addClassCleanup)

    def setUp(self) -> None:
        super().setUp()
        config = make_config(tls_cert=self.cert, tls_key=self.key, request_timeout=0.5)
        self.start_server(config, tls=autodeploy.tls_context(config))

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert)

    def test_https_post_is_202(self):
        status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, hub_body(), context=self.client_context())
        self.assertEqual((status, doc["state"]), (202, "queued"))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            with self.client_context().wrap_socket(sock, server_hostname="localhost") as tls:
                self.assertIn(tls.version(), ("TLSv1.2", "TLSv1.3"))

    def test_plain_http_on_the_tls_port_is_dropped(self):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            raw = self.exchange(raw_post(body=hub_body()))
            self.assertFalse(raw.startswith(b"HTTP/"))
            self.assertTrue(self.logs.wait_for("TLS failed"))
        self.assertEqual(self.service.queue.depth(), 0)
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body(), context=self.client_context())[0], 202)
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertNoErrorLogged()

    def test_tls_1_1_is_refused(self):
        def handshake(maximum: ssl.TLSVersion) -> str:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(self.cert)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = maximum
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions at all
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                    return tls.version()

        with self.assertRaises((ssl.SSLError, ConnectionError)):
            handshake(ssl.TLSVersion.TLSv1_1)
        # the server saw the attempt and refused it (the client did not just give up)
        self.assertTrue(self.logs.wait_for("TLS failed"), self.logs.lines())
        self.assertEqual(handshake(ssl.TLSVersion.TLSv1_2), "TLSv1.2")  # the same client, one version up
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body(), context=self.client_context())[0], 202)

    def test_tls_connections_are_closed_explicitly(self):
        # BUG (TLS sockets closed by the garbage collector): setup() replaces
        # self.request with the SSLSocket from wrap_socket(), which detaches
        # the plain socket; socketserver's shutdown_request() then closes that
        # detached socket (a no-op), so every HTTPS connection is closed only
        # when the handler is garbage-collected: a ResourceWarning each time,
        # and the connection stays open as long as anything references it.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                with self.client_context().wrap_socket(sock, server_hostname="localhost") as tls:
                    tls.sendall(raw_post(headers=["Connection: close"], body=hub_body()))
                    answer = b""
                    while True:  # until the server closes
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
            self.assertEqual(split_response(answer)[0], 202)
        ours = "laddr=('127.0.0.1', %d)" % self.port
        leaked = [str(w.message) for w in caught
                  if issubclass(w.category, ResourceWarning) and ours in str(w.message)]
        self.assertEqual(leaked, [])

    def test_tls_context_is_tls_1_2_or_newer_and_checks_its_files(self):
        config = make_config(tls_cert=self.cert, tls_key=self.key)
        self.assertEqual(autodeploy.tls_context(config).minimum_version, ssl.TLSVersion.TLSv1_2)
        with self.assertRaises(SystemExit):
            autodeploy.tls_context(config._replace(tls_key=self.cert))
        with self.assertRaises(SystemExit):
            autodeploy.tls_context(config._replace(tls_cert=os.path.join(os.path.dirname(self.cert),
                                                                         "missing.pem")))


if __name__ == "__main__":
    unittest.main()
