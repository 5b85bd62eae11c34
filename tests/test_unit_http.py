"""Unit tests: every HTTP answer of the webhook listener, and the job queue.

The service is not started here, so accepted jobs stay queued and no Docker
Engine is involved; deploying is covered end to end in test_e2e_deploy.
"""

import http.client
import http.server
import io
import json
import logging
import socket
import threading
import time
import unittest

import autodeploy
from autodeploy import AppConfig, Job, JobQueue

TOKEN = "k" * 40


def make_config(**overrides) -> autodeploy.Config:
    apps = {"myname/myrepo": AppConfig("myname/myrepo", "myname/myrepo", ("latest", "v2"), "myname-myrepo"),
            "team/api": AppConfig("team/api", "team/api", ("latest",), "api")}
    values = dict(path="test.conf", listen_host="127.0.0.1", listen_port=0, tokens=[TOKEN],
                  workers=1, state_dir="", callback_allow=[], max_body=1024, max_queue=1,
                  docker_host="unix:///nonexistent.sock", docker_config=None, apps=apps,
                  journal=False, engine_wait=0)
    values.update(overrides)
    return autodeploy.Config(**values)


def hub_body(repo="myname/myrepo", tag="latest") -> bytes:
    return json.dumps({"push_data": {"tag": tag}, "repository": {"repo_name": repo},
                       "callback_url": "https://registry.hub.docker.com/u/a/b/hook/1/"}).encode()


class HandlerTest(unittest.TestCase):

    def setUp(self):
        config = make_config()
        engine = autodeploy.DockerClient(config.docker_host)
        self.service = autodeploy.build_service(config, engine)
        self.server = autodeploy.WebhookServer(("127.0.0.1", 0), self.service)
        self.port = self.server.server_address[1]
        thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.logs = self.enterContext_logs()

    def enterContext_logs(self):
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(self.format(record))
        handler = Keep()
        logger = logging.getLogger("autodeploy")
        logger.addHandler(handler)
        old_level = logger.level
        logger.setLevel(logging.DEBUG)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(logger.setLevel, old_level)
        return records

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(conn.close)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        doc = json.loads(raw) if raw else None
        return response.status, doc, response

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
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /deploy/" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        self.assertIn(b" 411 ", sock.recv(4096))
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.addCleanup(sock.close)
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
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(b"BROKEN /deploy/" + TOKEN.encode() + b"\r\n\r\n")
        sock.recv(4096)
        sock.close()
        self.assertTrue(self.logs)
        for line in self.logs:
            self.assertNotIn(TOKEN, line)


def job(container: str, n: int, cooldown: float = 0.0) -> Job:
    app = AppConfig(container, container, ("latest",), container, cooldown=cooldown)
    return Job(id="%s-%d" % (container, n), app=app, tag="latest",
               callback_url="https://registry.hub.docker.com/u/x/hook/%d/" % n)


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
            ok = handler._parse_plain_request()
            self.plain = ok is not None
            ok = ok if ok is not None else http.server.BaseHTTPRequestHandler.parse_request(handler)
        else:
            ok = http.server.BaseHTTPRequestHandler.parse_request(handler)
        self.outcome = (ok, handler.errors, handler.command, getattr(handler, "path", None),
                        handler.request_version, handler.close_connection, handler.rfile.read())
        self.headers = getattr(handler, "headers", None)


class PlainRequestParsingTest(unittest.TestCase):
    """WebhookHandler parses plain requests itself: the outcome must be the
    one http.server's parse_request() gives, header by header."""

    NAMES = ("Host", "content-length", "CONTENT-TYPE", "Connection", "Expect", "X-Forwarded-For",
             "Forwarded", "Authorization", "X-Hub-Signature-256", "Transfer-Encoding", "Missing")

    def assertSameParse(self, data: bytes, plain: bool) -> None:
        theirs = _Parsed(_StdlibHandler, data, own=False)
        ours = _Parsed(autodeploy.WebhookHandler, data, own=True)
        data = data[:120] if len(data) > 200 else data
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
                self.assertSameParse(head + body, plain=True)

    def test_anything_unusual_goes_to_http_server(self):
        for head in (b"POST /deploy/x HTTP/1.1\r\nHost : a\r\n\r\n",         # blank before the colon
                     b"POST /deploy/x HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",  # obs-fold
                     b"POST /deploy/x HTTP/1.1\r\nno colon here\r\nHost: a\r\n\r\n",
                     b"POST /deploy/x HTTP/1.1\r\nX-A: caf\xc3\xa9\r\n\r\n",   # not ASCII
                     b"POST /deploy/x HTTP/1.1\r\nX-A: a\rb\r\n\r\n",           # a lone CR
                     b"POST /deploy/x HTTP/1.1\r\nContent-Length: \x0b2\r\n\r\n"):
            with self.subTest(head=head):
                self.assertSameParse(head + b"{}", plain=True)
        for line in (b"post /deploy/x HTTP/1.1", b"POST //deploy/x HTTP/1.1", b"POST /deploy/x HTTP/2.0",
                     b"POST /deploy/x  HTTP/1.1", b"GET /", b"POST /deploy/x HTTP/1.1\r\r",
                     b"POST /d\xc3\xa9ploy HTTP/1.1", b"POST /deploy/x HTTP/1.10"):
            with self.subTest(line=line):
                self.assertSameParse(line + b"\r\nHost: a\r\n\r\n{}", plain=False)


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
