"""Unit tests: every HTTP answer of the webhook listener, and its own
parsing of plain requests (the same outcome as http.server's).

The service is not started here, so accepted jobs stay queued and no Docker
Engine is involved; deploying is covered end to end in test_e2e_deploy.
"""

import http.client
import http.server
import io
import logging
import types
from typing import Optional
import unittest

import autodeploy
from autodeploy import AppConfig
from tests import unit_support
from tests.unit_support import ServerTestCase

TOKEN = "k" * 40
ADMIN = "a" * 40
CALLBACK = "https://registry.hub.docker.com/u/a/b/hook/1/"


def hub_body(repo="myname/myrepo", tag="latest") -> bytes:
    return unit_support.hub_body(repo, tag, CALLBACK)


class HandlerTest(ServerTestCase):

    def setUp(self):
        super().setUp()
        apps = {"myname/myrepo": AppConfig("myname/myrepo", "myname/myrepo", ("latest", "v2"),
                                           "myname-myrepo"),
                "team/api": AppConfig("team/api", "team/api", ("latest",), "api")}
        self.start_server(tokens=[TOKEN], max_body=1024, max_queue=1, apps=apps)

    def request(self, method, path, body=None, headers=None):
        return self.post(path, body, headers, method=method)

    def test_accepted_push_answers_202_with_the_job_id(self):
        status, doc, _ = self.request("POST", "/deploy/" + TOKEN, hub_body())
        self.assertEqual(status, 202)
        self.assertEqual(doc["state"], "queued")
        self.assertIsNotNone(self.service.job_detail(doc["job"]))
        self.assertEqual(self.service.queue.depth(), 1)

    def test_wrong_or_missing_token_is_404(self):
        for path in ("/deploy/" + "x" * 40, "/deploy/", "/deploy", "/deploy/" + TOKEN[:-1],
                     "/deploy/" + TOKEN + "x", "/", "/other/" + TOKEN):
            with self.subTest(path=path):
                status, _, _ = self.request("POST", path, hub_body())
                self.assertEqual(status, 404)
        self.assertEqual(self.service.queue.depth(), 0)

    def test_malformed_bodies_are_400(self):
        for body in (b"not json", b"[1]", b"{}", b'{"repository": {"repo_name": "myname/myrepo"}}',
                     b"\xff", b'{"repository": {"repo_name": "myname/myrepo"}, "push_data": {"tag": "../x"}}'):
            with self.subTest(body=body):
                status, doc, _ = self.request("POST", "/deploy/" + TOKEN, body)
                self.assertEqual(status, 400)
                self.assertIn("error", doc)

    def test_not_configured_repository_or_tag_is_422(self):
        status, doc, _ = self.request("POST", "/deploy/" + TOKEN, hub_body(repo="someone/else"))
        self.assertEqual(status, 422)
        self.assertIn("not configured", doc["error"])
        status, doc, _ = self.request("POST", "/deploy/" + TOKEN, hub_body(tag="nightly"))
        self.assertEqual(status, 422)
        self.assertEqual(self.service.queue.depth(), 0)

    def test_a_full_queue_is_503_with_retry_after(self):
        self.assertEqual(self.request("POST", "/deploy/" + TOKEN, hub_body())[0], 202)
        # the same container again replaces the waiting job: still accepted
        self.assertEqual(self.request("POST", "/deploy/" + TOKEN, hub_body(tag="v2"))[0], 202)
        status, doc, response = self.request("POST", "/deploy/" + TOKEN, hub_body(repo="team/api"))
        self.assertEqual(status, 503)
        self.assertEqual(response.getheader("Retry-After"), "30")
        self.assertEqual(self.service.queue.depth(), 1)

    def test_other_methods_are_405(self):
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            with self.subTest(method=method):
                status, _, response = self.request(method, "/deploy/" + TOKEN)
                self.assertEqual(status, 405)
                self.assertEqual(response.getheader("Allow"), "POST")

    def test_oversized_body_is_413(self):
        status, _, _ = self.request("POST", "/deploy/" + TOKEN, b"{" + b" " * 2000 + b"}")
        self.assertEqual(status, 413)

    def test_missing_length_and_chunked_bodies_are_refused(self):
        sock = self.connect()
        sock.sendall(b"POST /deploy/" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        self.assertIn(b" 411 ", sock.recv(4096))
        sock = self.connect()
        sock.sendall(b"POST /deploy/" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b" 411 ", sock.recv(4096))
        status, _, _ = self.request("POST", "/deploy/" + TOKEN, b"{}", {"Content-Length": "abc"})
        self.assertEqual(status, 400)

    def test_keep_alive_after_a_refusal_does_not_misread_the_body(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(conn.close)
        conn.request("POST", "/deploy/wrong", body=hub_body())
        self.assertEqual(conn.getresponse().read() and 404, 404)
        conn.request("POST", "/deploy/" + TOKEN, body=hub_body())
        self.assertEqual(conn.getresponse().status, 202)

    def test_the_token_never_reaches_the_log(self):
        self.request("POST", "/deploy/" + TOKEN, hub_body())
        self.request("GET", "/deploy/" + TOKEN)
        self.request("POST", "/deploy/" + TOKEN, b"junk")
        sock = self.connect()
        sock.sendall(b"BROKEN /deploy/" + TOKEN.encode() + b"\r\n\r\n")
        sock.recv(4096)
        self.assertTrue(self.logs.lines())
        for line in self.logs.lines():
            self.assertNotIn(TOKEN, line)


class UnknownTokenLogTest(ServerTestCase):
    """A wrong token is a 404, and one line at INFO or above: a mistyped
    webhook URL shows in the log, without the token."""

    def request(self, method, path, body=None, headers=None):
        return self.post(path, body, headers, method=method)

    def setUp(self):
        super().setUp()
        self.start_server(tokens=[TOKEN])
        self.clock = unit_support.FakeClock()
        self.server._log_limiter = autodeploy.LogLimiter(clock=self.clock)

    def refused_lines(self):
        return [record.getMessage() for record in self.logs.records
                if record.levelno >= logging.INFO and "unknown token" in record.getMessage()]

    def test_a_wrong_token_is_logged_with_the_client_and_sender_but_not_the_token(self):
        typo = TOKEN[:-1] + "x"
        status, _, _ = self.request("POST", "/deploy/dockerhub/" + typo, hub_body())
        self.assertEqual(status, 404)
        [line] = self.refused_lines()
        self.assertIn("127.0.0.1", line)
        self.assertIn("sender dockerhub", line)
        self.assertIn("40 characters, starting kkkk", line)
        self.assertNotIn(typo, line)
        self.assertNotIn(TOKEN[:5], line)

    def test_the_sender_is_told_from_its_headers_else_the_user_agent_is_named(self):
        self.request("POST", "/deploy/" + "x" * 40, hub_body(), {"X-GitHub-Event": "package"})
        self.clock.advance(1)
        self.request("POST", "/deploy/" + "x" * 40, hub_body(), {"User-Agent": "Hookshot/1"})
        first, second = self.refused_lines()
        self.assertIn("sender github", first)
        self.assertIn("User-Agent Hookshot", second)

    def test_a_short_token_shows_its_length_only(self):
        self.request("POST", "/deploy/secret", hub_body())
        [line] = self.refused_lines()
        self.assertIn("6 characters;", line)
        self.assertNotIn("secr", line)

    def test_refusals_are_rate_limited_with_a_count_of_those_left_out(self):
        for _ in range(5):
            self.request("POST", "/deploy/" + "x" * 40, hub_body())
        self.clock.advance(1.5)
        self.request("POST", "/deploy/" + "x" * 40, hub_body())
        lines = self.refused_lines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("(4 more like it not logged)", lines[1])

    def test_other_unknown_paths_stay_at_debug(self):
        self.request("GET", "/wp-login.php")
        self.request("POST", "/admin", b"{}")
        self.assertFalse([record for record in self.logs.records if record.levelno >= logging.INFO],
                         self.logs.lines())


class AdminPagesTest(ServerTestCase):
    """/healthz, and the checks /jobs makes of its query."""

    def request(self, method, path, body=None, headers=None):
        return self.post(path, body, headers, method=method)

    def setUp(self):
        super().setUp()
        self.start_server(tokens=[TOKEN], admin_tokens=(ADMIN,))

    def get(self, path):
        return self.request("GET", path, headers={"Authorization": "Bearer " + ADMIN})

    def test_healthy_is_status_ok_alone(self):
        self.service.health = lambda: (True, "ok")
        status, doc, _ = self.get("/healthz")
        self.assertEqual((status, doc), (200, {"status": "ok"}))

    def test_unhealthy_says_why(self):
        status, doc, _ = self.get("/healthz")  # the test config's Engine does not exist
        self.assertEqual((status, doc), (503, {"status": "unhealthy",
                                               "reason": "docker engine unreachable"}))

    def test_a_state_that_does_not_exist_is_400_naming_the_states(self):
        status, doc, _ = self.get("/jobs?state=bogus")
        self.assertEqual(status, 400)
        for state in autodeploy.STATES:
            self.assertIn(state, doc["error"])

    def test_known_states_and_no_state_list_jobs(self):
        self.request("POST", "/deploy/" + TOKEN, hub_body())
        for query, count in (("", 1), ("?state=queued", 1), ("?state=failed", 0)):
            with self.subTest(query=query):
                status, doc, _ = self.get("/jobs" + query)
                self.assertEqual((status, len(doc["jobs"])), (200, count))

    def test_a_limit_that_is_no_number_is_400(self):
        self.assertEqual(self.get("/jobs?limit=ten")[0], 400)

    def test_the_server_header_is_the_version_with_no_trailing_space(self):
        _, _, response = self.get("/healthz")
        self.assertEqual(response.getheader("Server"), "autodeploy/" + autodeploy.__version__)


class _StdlibHandler(http.server.BaseHTTPRequestHandler):
    """http.server's handler with the protocol settings of WebhookHandler."""
    protocol_version = autodeploy.WebhookHandler.protocol_version
    default_request_version = autodeploy.WebhookHandler.default_request_version


class _Parsed:
    """The outcome of one parse: http.server's own, or WebhookHandler's."""

    def __init__(self, handler_class, data: bytes, own: bool):
        handler = handler_class.__new__(handler_class)  # no socket, no handle()
        line, _, rest = data.partition(b"\n")
        handler.raw_requestline = line + b"\n"
        handler.rfile = io.BytesIO(rest)
        handler.wfile = io.BytesIO()
        handler.client_address = ("127.0.0.1", 0)
        handler.errors = []
        handler.send_error = lambda code, *args: handler.errors.append(code)
        handler.handle_expect_100 = lambda: handler.errors.append(100) or True
        handler.log_message = lambda *args: None
        if own:
            config = types.SimpleNamespace(max_header_bytes=1024 * 1024)  # only the line and count limits
            handler.server = types.SimpleNamespace(service=types.SimpleNamespace(config=config))
            ok = handler._parse_head()
            self.plain = handler.head_was_plain
        else:
            ok = http.server.BaseHTTPRequestHandler.parse_request(handler)
        # After an error the connection closes: what was left unread does not matter.
        rest = None if handler.errors and handler.errors != [100] else handler.rfile.read()
        self.outcome = (ok, handler.errors, handler.command, getattr(handler, "path", None),
                        handler.request_version, handler.close_connection, rest)
        self.headers = getattr(handler, "headers", None)


class PlainRequestParsingTest(unittest.TestCase):
    """WebhookHandler parses plain requests itself: the outcome must be the
    one http.server's parse_request() gives, header by header."""

    NAMES = ("Host", "content-length", "CONTENT-TYPE", "Connection", "Expect", "X-Forwarded-For",
             "Forwarded", "Authorization", "X-Hub-Signature-256", "Transfer-Encoding", "Missing")

    def assertSameParse(self, data: bytes, plain: Optional[bool]) -> None:
        """Same outcome; `plain`: whether WebhookHandler parsed it itself (None: not checked)."""
        theirs = _Parsed(_StdlibHandler, data, own=False)
        ours = _Parsed(autodeploy.WebhookHandler, data, own=True)
        data = data[:120] if len(data) > 200 else data
        if plain is not None:
            self.assertEqual(ours.plain, plain, data)
        self.assertEqual(ours.outcome, theirs.outcome, data)
        if theirs.headers is not None:
            for name in self.NAMES:
                self.assertEqual(ours.headers.get(name), theirs.headers.get(name), (data, name))
                self.assertEqual(ours.headers.get_all(name), theirs.headers.get_all(name), (data, name))
                self.assertEqual(name in ours.headers, name in theirs.headers, (data, name))

    def test_plain_requests_parse_as_http_server_parses_them(self):
        body = b"{}"
        for head in (b"POST /deploy/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n",
                     b"POST /deploy/x HTTP/1.1\nHost: a\nContent-Length:2\n\n",
                     b"POST /deploy/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                     b"GET /jobs?app=a HTTP/1.1\r\nConnection: Close\r\nX-Forwarded-For: 1.2.3.4\r\n"
                     b"x-forwarded-for: 5.6.7.8\r\n\r\n",
                     b"POST /deploy/x HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 2  \r\n\r\n",
                     b"POST /deploy/x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
                     b"Authorization:\t Bearer t \t\r\nX-Empty:\r\n\r\n",
                     b"POST /deploy/x HTTP/1.1\r\nHost: a",  # the headers end at end of file
                     b"POST /deploy/x HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
                     b"POST /deploy/x HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",  # 431
                     b"POST /deploy/x HTTP/1.1\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n"):  # 431
            with self.subTest(head=head[:80]):
                unusual = b"X-A: b\r\n" * 100 in head or len(head) > 70000 or not head.endswith(b"\n")
                self.assertSameParse(head + body, plain=None if unusual else True)

    def test_header_lines_over_max_line_are_431_here_though_http_server_reads_64_kib(self):
        ours = _Parsed(autodeploy.WebhookHandler, b"POST /deploy/x HTTP/1.1\r\nX-A: " + b"b" * 9000
                       + b"\r\n\r\n{}", own=True)
        self.assertEqual(ours.outcome[:2], (False, [431]))

    def test_anything_unusual_goes_to_http_server(self):
        for head in (b"POST /deploy/x HTTP/1.1\r\nX-A: caf\xc3\xa9\r\n\r\n",):  # obs-text
            with self.subTest(head=head):
                self.assertSameParse(head + b"{}", plain=False)

    def test_a_header_line_that_is_not_a_field_line_is_400_not_parsed_on(self):
        # http.server ends the headers at such a line and serves what follows
        # as the body or a new request (smuggling): here it is a 400, and the
        # connection closes, whichever parser the request line goes to.
        for line in (b"POST /deploy/x HTTP/1.1", b"post /deploy/x HTTP/1.1"):
            for bad in (b"Host : a", b"Host: a\r\n folded", b"no colon here", b"X-A: a\rb",
                        b"Content-Length : 53", b"Foo bar: x", b"X-A: \x0b2", b"X-A: a\x00"):
                with self.subTest(line=line, bad=bad):
                    ours = _Parsed(autodeploy.WebhookHandler, line + b"\r\nHost: a\r\n" + bad
                                   + b"\r\nContent-Length: 2\r\n\r\n{}", own=True)
                    self.assertEqual(ours.outcome[:2], (False, [400]))
        for line in (b"post /deploy/x HTTP/1.1", b"POST //deploy/x HTTP/1.1", b"POST /deploy/x HTTP/2.0",
                     b"POST /deploy/x  HTTP/1.1", b"GET /", b"POST /deploy/x HTTP/1.1\r\r",
                     b"POST /d\xc3\xa9ploy HTTP/1.1", b"POST /deploy/x HTTP/1.10"):
            with self.subTest(line=line):
                self.assertSameParse(line + b"\r\nHost: a\r\n\r\n{}", plain=False)


if __name__ == "__main__":
    unittest.main()
