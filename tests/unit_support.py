"""What the unit tests share: configs, log capture, in-process servers, a
fake clock, and a test case that cannot hang.

In-process servers listen on 127.0.0.1 port 0 (or a temporary AF_UNIX
socket) and are shut down, closed and joined when their test ends. The
service under test gets a Docker socket that does not exist: the HTTP and
security layer is under test, not deploys. Every socket and join has a
timeout, and a test that runs over TEST_LIMIT seconds stops the process
with every thread's traceback.

Waiting is for a condition (a log line, a request, a thread ending), not
for a fixed time: "nothing more came" is checked after joining whatever
could still have sent it. Where a timeout itself is under test, it is
short, and the waits for it run at once.
"""

import copy
import faulthandler
import hashlib
import hmac
import http.client
import http.server
import itertools
import json
import logging
import os
import re
import selectors
import shutil
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import unittest
import unittest.mock
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import autodeploy
import dockerapi
from autodeploy import AppConfig
from dockerapi import Conflict, DockerError, NotFound

GLOBAL_TOKEN = "global-token-" + "g" * 27
ROTATED_TOKEN = "rotated-token-" + "r" * 26
APP_TOKEN = "app-token-for-myrepo-" + "a" * 19
OTHER_APP_TOKEN = "app-token-for-api-" + "b" * 22
ENV_TOKEN = "env-token-" + "e" * 30
CREDENTIAL_TOKEN = "credential-token-" + "c" * 23
GLOBAL_SECRET = "global-signing-secret-0123"
APP_SECRET = "app-signing-secret-for-myrepo"
SECRETS = (GLOBAL_TOKEN, ROTATED_TOKEN, APP_TOKEN, OTHER_APP_TOKEN, ENV_TOKEN, CREDENTIAL_TOKEN,
           GLOBAL_SECRET, APP_SECRET)
NO_ENGINE = "unix:///nonexistent/autodeploy-test.sock"
TEST_LIMIT = 60  # seconds any one test may take before the process is stopped with tracebacks


############################################################################
# Configs and requests
############################################################################

def make_apps(**tokens: Tuple[str, ...]) -> Dict[str, AppConfig]:
    """Two apps; make_apps(myrepo=(...), api=(...)) gives them tokens of their own."""
    return {"myname/myrepo": AppConfig("myname/myrepo", "myname/myrepo", ("latest",), "myname-myrepo",
                                       tokens=tokens.get("myrepo", ())),
            "team/api": AppConfig("team/api", "team/api", ("latest",), "api",
                                  tokens=tokens.get("api", ()))}


def make_config(**overrides: Any) -> autodeploy.Config:
    """A Config for an in-process server on 127.0.0.1 with no Engine and no journal."""
    values = dict(path="test.conf", listen_host="127.0.0.1", listen_port=0, tokens=[GLOBAL_TOKEN],
                  workers=1, state_dir="", callback_allow=[], max_body=64 * 1024, max_queue=100,
                  docker_host=NO_ENGINE, docker_config=None, apps=make_apps(), journal=False,
                  engine_wait=0)
    values.update(overrides)
    return autodeploy.Config(**values)


def for_tests(config: autodeploy.Config) -> autodeploy.Config:
    """A loaded Config made safe to serve here: port 0, no Engine, no journal."""
    return config._replace(listen_host="127.0.0.1", listen_port=0, docker_host=NO_ENGINE,
                           journal=False, engine_wait=0, workers=1)


def hub_body(repo: str = "myname/myrepo", tag: str = "latest", callback: Optional[str] = None) -> bytes:
    """A minimal Docker Hub push payload."""
    doc = {"push_data": {"tag": tag}, "repository": {"repo_name": repo}}
    if callback:
        doc["callback_url"] = callback
    return json.dumps(doc).encode()


def sign(secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def raw_post(path: str = "/deploy/" + GLOBAL_TOKEN, headers: Sequence[str] = (),
             body: bytes = b"", length: Optional[int] = -1) -> bytes:
    """A request as bytes: Content-Length is added unless `length` is None."""
    lines = ["POST %s HTTP/1.1" % path, "Host: 127.0.0.1"] + list(headers)
    if length is not None:
        lines.append("Content-Length: %d" % (len(body) if length == -1 else length))
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def split_response(raw: bytes) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1."):
        raise AssertionError("not an HTTP answer: %r" % raw[:200])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def read_until_closed(sock: socket.socket) -> bytes:
    """What the peer sends until it closes, resets, or the socket times out."""
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.005) -> Any:
    """Poll `predicate` until it is true or `timeout` passes; its last value.
    For conditions nothing signals (a file's content, a port freeing up)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


############################################################################
# Files
############################################################################

def temp_folder(test: unittest.TestCase, prefix: str = "autodeploy-test-") -> str:
    """A new folder, removed when `test` ends."""
    folder = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, folder, True)
    return folder


def write_file(folder: str, name: str, text: str) -> str:
    """Write `text` to `folder`/`name`; its path."""
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def write_config(test: unittest.TestCase, text: str) -> str:
    """Write `text` to an autodeploy.conf in a folder of its own; its path."""
    return write_file(temp_folder(test, "autodeploy-config-"), "autodeploy.conf", text)


############################################################################
# Time
############################################################################

class FakeClock:
    """A clock that stands still until advanced: for clock= parameters; its
    sleep() (for sleep= parameters) advances it and notes the seconds."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now
        self.slept: List[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


############################################################################
# Logs, and tests that cannot hang
############################################################################

class LogCapture(logging.Handler):
    """Every record of the 'autodeploy' logger, DEBUG and up; wait_for() a line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)  # fills record.exc_text: tracebacks are searched too
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def lines(self) -> List[str]:
        with self._cond:
            records = list(self.records)
        return [self.format(record) for record in records]

    def matching(self, fragment: str) -> List[str]:
        return [line for line in self.lines() if fragment in line]

    def wait_for(self, fragment: str, count: int = 1, timeout: float = 5.0) -> List[str]:
        """The lines holding `fragment`, once there are `count` of them (or
        when `timeout` passed first: then fewer)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.matching(fragment)) >= count, timeout)
        return self.matching(fragment)


def capture_logs(add_cleanup: Callable[..., None]) -> LogCapture:
    """Capture the 'autodeploy' logger (and keep it off stderr) until the
    cleanups of `add_cleanup` (a test's addCleanup, a class's addClassCleanup) run."""
    logger = logging.getLogger("autodeploy")
    handler = LogCapture()
    old = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # no output on stderr
    add_cleanup(setattr, logger, "propagate", old[1])
    add_cleanup(logger.setLevel, old[0])
    add_cleanup(logger.removeHandler, handler)
    return handler


class BoundedTestCase(unittest.TestCase):
    """A test that cannot hang, with its logs captured in self.logs (and
    kept off stderr)."""

    def setUp(self) -> None:
        faulthandler.dump_traceback_later(TEST_LIMIT, exit=True)
        self.addCleanup(faulthandler.cancel_dump_traceback_later)
        self.logs = self.capture_logs()

    def capture_logs(self) -> LogCapture:
        return capture_logs(self.addCleanup)

    def assertNoSecretLogged(self) -> None:
        lines = self.logs.lines()
        for secret in SECRETS:
            for line in lines:
                self.assertNotIn(secret, line)

    def assertNoErrorLogged(self) -> None:
        self.assertFalse([r for r in self.logs.records if r.levelno >= logging.ERROR], self.logs.lines())


############################################################################
# In-process servers
############################################################################

class ServeLoop:
    """serve_forever() for a socketserver server, without polling: stop()
    wakes it at once. (socketserver's own loop polls, every 0.5 s by
    default, and its shutdown() waits for the next poll.)"""

    def __init__(self, server: Any):
        self.server = server
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self._waker, self._woken = socket.socketpair()

    def run(self) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.server, selectors.EVENT_READ)
                selector.register(self._woken, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    for key, _ in selector.select():
                        if key.fileobj is self.server and not self._stopping.is_set():
                            self.server.handle_request()  # a connection waits: returns at once
        finally:
            self._ended.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End run() (when it runs) and wait for that."""
        self._stopping.set()
        self._waker.send(b"\0")
        self._ended.wait(timeout)
        self._waker.close()
        self._woken.close()


def serve_in_thread(add_cleanup: Callable[..., None], server: Any) -> Any:
    """Run a socketserver server in a thread of its own; the cleanups of
    `add_cleanup` (a test's addCleanup, a class's addClassCleanup) stop it,
    join the thread and close the server."""
    loop = ServeLoop(server)
    thread = threading.Thread(target=loop.run, name="server-under-test", daemon=True)
    thread.start()
    add_cleanup(server.server_close)
    add_cleanup(thread.join, 5)
    add_cleanup(loop.stop)
    return server


def start_webhook_server(add_cleanup: Callable[..., None], config: autodeploy.Config,
                         tls: Any = None) -> autodeploy.WebhookServer:
    """A WebhookServer on 127.0.0.1 in a thread (see serve_in_thread); its
    service (server.service) is not started, so accepted jobs stay queued."""
    service = autodeploy.build_service(config, autodeploy.DockerClient(config.docker_host))
    return serve_in_thread(add_cleanup, autodeploy.WebhookServer(("127.0.0.1", 0), service, tls))


def make_certificate(add_cleanup: Callable[..., None]) -> Tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1 made by
    `openssl`, valid 2 days, removed by the cleanups of `add_cleanup`:
    (cert, key). SkipTest when it cannot be made, except under CI=true,
    where that fails."""
    folder = tempfile.mkdtemp(prefix="autodeploy-tls-")
    add_cleanup(shutil.rmtree, folder, True)
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    try:
        if shutil.which("openssl") is None:
            raise OSError("openssl is not installed")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        if os.environ.get("CI") == "true":
            raise AssertionError("cannot make a test certificate (CI=true: failing, not skipping): %s"
                                 % exc) from exc
        raise unittest.SkipTest("cannot make a test certificate: %s" % exc) from exc
    return cert, key


class ServerTestCase(BoundedTestCase):
    """Runs a WebhookServer in-process; its service is not started, so
    accepted jobs stay queued."""

    def setUp(self) -> None:
        super().setUp()
        self.answers: List[bytes] = []  # every answer read, for the secrecy checks

    def start_server(self, config: Optional[autodeploy.Config] = None, tls: Any = None,
                     **overrides: Any) -> autodeploy.WebhookServer:
        server = start_webhook_server(self.addCleanup, config or make_config(**overrides), tls)
        self.server, self.service, self.port = server, server.service, server.server_address[1]
        return server

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        self.addCleanup(sock.close)
        return sock

    def post(self, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
             method: str = "POST", context: Optional[ssl.SSLContext] = None
             ) -> Tuple[int, Any, http.client.HTTPResponse]:
        """One request on a connection of its own: (status, JSON answer, response)."""
        if context is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        else:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=context)
        self.addCleanup(conn.close)
        conn.request(method, path, body=body if method == "POST" else None, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        self.answers.append(raw)
        doc = json.loads(raw.decode("utf-8")) if raw and method != "HEAD" else None
        if raw:
            self.assertEqual(response.getheader("Content-Type"), "application/json")
        return response.status, doc, response

    def refused_at_accept(self, wait: float = 2.0) -> Tuple[int, Any]:
        """Connect and send nothing: (status, JSON answer) of what the server
        says before reading a byte (a refusal), or (0, None) if it waits."""
        sock = self.connect(wait)
        try:
            status, _, body = split_response(read_until_closed(sock))
        except (AssertionError, OSError):
            return 0, None
        return status, json.loads(body)

    def post_or_reset(self, *args: Any, **kwargs: Any) -> int:
        """post()'s status, or 0 when the server closed the connection while
        the request was still being sent (a refusal at accept can do that)."""
        try:
            return self.post(*args, **kwargs)[0]
        except (ConnectionError, http.client.HTTPException):
            return 0

    def exchange(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send raw bytes; the server's first answer (or what it sent before
        closing, or before `timeout` passed with nothing more)."""
        sock = self.connect(timeout)
        sock.sendall(data)
        return self.read_answer(sock)

    def read_answer(self, sock: socket.socket) -> bytes:
        """One HTTP answer: its head, then Content-Length bytes of body."""
        data, need = b"", None
        try:
            while need is None or len(data) < need:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if need is None and b"\r\n\r\n" in data:
                    head = data.split(b"\r\n\r\n", 1)[0]
                    match = re.search(br"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
                    need = len(head) + 4 + int(match.group(1)) if match else 0
        except (socket.timeout, ConnectionError):
            pass
        self.answers.append(data)
        return data

    def read_all(self, sock: socket.socket) -> bytes:
        """Everything until the server closes (or the socket's timeout)."""
        raw = read_until_closed(sock)
        self.answers.append(raw)
        return raw

    def status_of(self, data: bytes) -> int:
        """The status of the answer to raw request bytes; its body must be a JSON object."""
        status, headers, body = split_response(self.exchange(data))
        self.assertEqual(headers.get("content-type"), "application/json")
        self.assertIsInstance(json.loads(body.decode("utf-8")), dict)
        return status


def quick_polling(poll_interval: float = 0.005) -> Any:
    """A patch of socketserver's serve_forever() to poll every `poll_interval`
    s: serve() stops its servers with shutdown(), which waits for the next
    poll, 0.5 s apart by default."""
    serve_forever = socketserver.BaseServer.serve_forever

    def polling_often(server: Any, interval: float = poll_interval) -> None:
        serve_forever(server, min(interval, poll_interval))

    return unittest.mock.patch.object(socketserver.BaseServer, "serve_forever", polling_often)


def run_serve(test: unittest.TestCase, config: autodeploy.Config, environ: Dict[str, str]
              ) -> Tuple[threading.Event, threading.Thread, Dict[str, Any]]:
    """autodeploy.serve() in a thread (it sets no signal handler there), with
    a state directory of its own and quick_polling(); stopped and joined at
    cleanup. `result` gets 'status' or 'error'."""
    if not config.state_dir:  # not the current directory
        config = config._replace(state_dir=temp_folder(test, "autodeploy-state-"))
    stop = threading.Event()
    result: Dict[str, Any] = {}

    def target() -> None:
        try:
            result["status"] = autodeploy.serve(config, stop, environ)
        except BaseException as exc:  # SystemExit too
            result["error"] = exc

    patcher = quick_polling()
    patcher.start()
    test.addCleanup(patcher.stop)
    thread = threading.Thread(target=target, name="serve-under-test", daemon=True)
    thread.start()
    test.addCleanup(thread.join, 10)
    test.addCleanup(stop.set)
    return stop, thread, result


class Receiver:
    """A local HTTP server recording every request; answers with `statuses`
    in turn (the last one repeats), with a Location header when given."""

    def __init__(self, test: unittest.TestCase, statuses: Sequence[int] = (200,),
                 location: Optional[str] = None):
        self.hits: List[Tuple[float, str, str, bytes]] = []  # (time, method, path, body)
        self._cond = threading.Condition()
        script = list(statuses)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._cond:
                    receiver.hits.append((time.monotonic(), self.command, self.path, body))
                    status = script.pop(0) if len(script) > 1 else script[0]
                    receiver._cond.notify_all()
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            do_GET = do_HEAD = do_PUT = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.origin = ("http", "127.0.0.1", self.port)
        self.url = "http://127.0.0.1:%d/hook/1" % self.port
        serve_in_thread(test.addCleanup, self.server)

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """True once `count` requests came; False when `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.hits) >= count, timeout)

    def count(self) -> int:
        with self._cond:
            return len(self.hits)


class HeldOpener:
    """A urlopen for CallbackSender that answers 200 at once, except for
    URLs containing `hold`: those wait until release() (no sockets, so which
    POSTs are in flight is known exactly)."""

    def __init__(self, test: unittest.TestCase, hold: str = "/held"):
        self.hold = hold
        self.calls: List[str] = []  # URLs, in the order their POST began
        self._cond = threading.Condition()
        self._released = False
        test.addCleanup(self.release)

    def __call__(self, request: Any, timeout: float) -> Any:
        with self._cond:
            self.calls.append(request.full_url)
            self._cond.notify_all()
            if self.hold in request.full_url:
                self._cond.wait_for(lambda: self._released, 30)
        response = unittest.mock.MagicMock(status=200)
        response.__enter__.return_value = response
        return response

    def wait_calls(self, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.calls) >= count, timeout)

    def release(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()


############################################################################
# A journal whose writes can be made to fail
############################################################################

class BreakableJournal(autodeploy.Journal):
    """A real SQLite journal whose writes fail while broken: SQLite's
    authorizer denies them (every table, or the ones named), so they fail
    inside SQLite and take the same sqlite3.Error path as a full disk.
    Reads still work."""

    def __init__(self, test: unittest.TestCase, **kwargs: Any):
        folder = temp_folder(test, "autodeploy-breakable-")
        super().__init__(os.path.join(folder, "journal.sqlite3"), **kwargs)
        self.open()
        test.addCleanup(self.close)

    def break_writes(self, *tables: str) -> "BreakableJournal":
        import sqlite3
        writes = (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE)

        def deny(action: int, table: Optional[str], *rest: Any) -> int:
            if action in writes and (not tables or table in tables):
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        self._set_authorizer(deny)
        return self

    def mend(self) -> None:
        import sqlite3
        self._set_authorizer(lambda *args: sqlite3.SQLITE_OK)  # None is 3.11+ only

    def _set_authorizer(self, authorizer: Callable[..., int]) -> None:
        # Setting an authorizer also expires the statements SQLite has prepared.
        with self._lock:
            self._db.set_authorizer(authorizer)

    def row(self, job_id: str) -> Dict[str, Any]:
        found = self.get(job_id)
        assert found is not None, "no journal row for job %s" % job_id
        return found


############################################################################
# A fake Docker Engine, for targets, the health gate and recovery
############################################################################
#
# An in-process fake Docker Engine for unit tests of targets, the health
# gate and recovery: the calls autodeploy makes of dockerapi.DockerClient,
# on containers and images kept in dicts, with a fake clock.
#
# It exists for what a real Engine cannot do on demand: die mid-swap, come
# back, replay chosen events at chosen times. The end-to-end tests run the
# same code against a real Engine.
#
# - `FakeClock`: time that moves only when the code sleeps or waits for events.
# - `FakeEngine.events()` yields the scripted events whose time falls in
#   [since, until] and moves the clock to `until`, as the real stream does.
# - `engine.down = True`: every call fails as an unreachable Engine does
#   (DockerError with no status); `fail_at[method] = n` fails the n-th call.

class FakeEngine:
    """Containers and images in memory; each call is recorded in `calls`."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.containers: Dict[str, Dict[str, Any]] = {}  # id -> inspect document
        self.images: Dict[str, Dict[str, Any]] = {}      # reference or id -> inspect document
        self.events_script: List[Dict[str, Any]] = []    # {"time": t, "id": container, "Action": ...}
        self.calls: List[tuple] = []
        self.down = False
        self.fail_at: Dict[str, int] = {}  # method -> the call number (1-based) that fails
        self.on_call: Callable[[str], None] = lambda method: None  # runs before each call
        self.on_start: Callable[[Dict[str, Any]], None] = lambda info: None  # a start's outcome
        self._ids = itertools.count(1)
        self.services: Dict[str, Dict[str, Any]] = {}  # id -> inspect document and its script
        self.rollout: List[Tuple[str, str]] = [("updating", "update in progress"),
                                                ("completed", "update completed")]
        self.conflicts = 0  # updates answered 'out of sequence' (someone else updated first)
        self.task_error = "task: non-zero exit (1)"

    # -- set-up helpers -------------------------------------------------------

    def add_image(self, reference: str, image_id: str, config: Optional[Dict[str, Any]] = None) -> None:
        doc = {"Id": image_id, "Config": config or {"Cmd": ["serve"]}}
        self.images[reference] = self.images[image_id] = doc

    def add_container(self, name: str, image_id: str, running: bool = True,
                      health: Optional[str] = None) -> str:
        container_id = "c%04d" % next(self._ids) + "0" * 60
        self.containers[container_id] = {
            "Id": container_id, "Name": "/" + name, "Image": image_id,
            "Config": {"Image": name, "Cmd": ["serve"], "Labels": {}},
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}},
            "State": {"Running": running, "Status": "running" if running else "exited",
                      "ExitCode": 0, **({"Health": {"Status": health}} if health else {})},
            "RestartCount": 0, "Mounts": []}
        return container_id

    def named(self, name: str) -> Optional[Dict[str, Any]]:
        for info in self.containers.values():
            if info["Name"] == "/" + name:
                return info
        return None

    def names(self) -> List[str]:
        return sorted(info["Name"][1:] for info in self.containers.values())

    # -- the DockerClient calls -----------------------------------------------

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method,) + args)
        self.on_call(method)
        if self.down:
            raise DockerError("cannot reach the Docker Engine at fake: connection refused")
        count = sum(1 for call in self.calls if call[0] == method)
        if self.fail_at.get(method) == count:
            raise DockerError("%s failed (fake)" % method, 500, "POST", "/" + method)

    def _find(self, name: str) -> Dict[str, Any]:
        if name in self.containers:
            return self.containers[name]
        found = self.named(name)
        if found is None:
            raise NotFound("No such container: %s" % name, 404, "GET", "/containers/%s/json" % name)
        return found

    def ping(self) -> bool:
        self._call("ping")
        return True

    def api_at_least(self, version: str) -> bool:
        return True

    def inspect_container(self, name: str) -> Dict[str, Any]:
        self._call("inspect_container", name)
        return copy.deepcopy(self._find(name))

    def inspect_image(self, reference: str) -> Dict[str, Any]:
        self._call("inspect_image", reference)
        if reference not in self.images:
            raise NotFound("No such image: %s" % reference, 404, "GET", "/images/%s/json" % reference)
        return copy.deepcopy(self.images[reference])

    def pull_image(self, image: str, tag: str, auth: Any = None,
                   on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        self._call("pull_image", image, tag)
        # A digest is pulled as image@digest; a tag as image:tag.
        if "%s%s%s" % (image, "@" if tag.startswith("sha256:") else ":", tag) not in self.images:
            raise DockerError("manifest for %s:%s not found" % (image, tag), 404, "POST", "/images/create")
        if on_progress is not None:
            on_progress({"status": "Status: Downloaded newer image for %s:%s" % (image, tag)})

    def create_container(self, body: Dict[str, Any], name: Optional[str] = None) -> str:
        self._call("create_container", name)
        if name and self.named(name) is not None:
            raise Conflict("Conflict. The container name /%s is already in use" % name, 409)
        image = self._image_for(body["Image"])
        container_id = self.add_container(name or "anon", image["Id"], running=False)
        self.containers[container_id]["State"]["Status"] = "created"
        # What discovery reads again: the reference and labels it was created with.
        self.containers[container_id]["Config"].update(
            Image=body["Image"], Labels=dict(body.get("Labels") or {}))
        return container_id

    def _image_for(self, reference: str) -> Dict[str, Any]:
        """The image a create names: name:tag@digest runs the digest, pulled
        by digest or known by the image's RepoDigests."""
        if "@" not in reference:
            return self.images[reference]
        name, _, digest = reference.partition("@")
        by_digest = name.rsplit(":", 1)[0] + "@" + digest
        for key, doc in self.images.items():
            if key == by_digest or by_digest in (doc.get("RepoDigests") or ()):
                return doc
        raise KeyError(reference)

    def start_container(self, name: str) -> None:
        self._call("start_container", name)
        info = self._find(name)
        info["State"].update(Running=True, Status="running")
        self.on_start(info)

    def stop_container(self, name: str, timeout: Optional[int] = None) -> None:
        self._call("stop_container", name)
        self._find(name)["State"].update(Running=False, Status="exited")

    def rename_container(self, name: str, new_name: str) -> None:
        self._call("rename_container", name, new_name)
        if self.named(new_name) is not None:
            raise DockerError("Conflict: name %s in use" % new_name, 409)
        self._find(name)["Name"] = "/" + new_name

    def remove_container(self, name: str, force: bool = False, volumes: bool = False) -> None:
        self._call("remove_container", name)
        info = self._find(name)
        if info["State"]["Running"] and not force:
            raise DockerError("cannot remove a running container", 409)
        del self.containers[info["Id"]]

    def container_logs(self, name: str, tail: int = 20) -> str:
        self._call("container_logs", name)
        return "boom\n"

    def list_containers(self, all: bool = True, filters: Any = None) -> List[Dict[str, Any]]:
        """As the Engine lists them; filters={"label": ["name=value"]} keeps
        the containers carrying every such label."""
        self._call("list_containers")
        wanted = [item.split("=", 1) for item in (filters or {}).get("label", [])]
        return [{"Id": i, "ImageID": c["Image"], "Image": c["Config"]["Image"],
                 "Names": [c["Name"]], "Labels": dict(c["Config"]["Labels"])}
                for i, c in self.containers.items()
                if not [1 for name, value in wanted if c["Config"]["Labels"].get(name) != value]]

    def add_labelled(self, name: str, image_id: str, reference: str,
                     labels: Optional[Dict[str, str]] = None, running: bool = True) -> str:
        """A container created from `reference`, labelled autodeploy.enable=true
        and with `labels`."""
        container_id = self.add_container(name, image_id, running)
        config = self.containers[container_id]["Config"]
        config["Image"] = reference
        config["Labels"] = dict({"autodeploy.enable": "true"}, **(labels or {}))
        return container_id

    def remove_image(self, reference: str) -> None:
        self._call("remove_image", reference)
        image = self.images.pop(reference, None)
        for key in [k for k, v in self.images.items() if v is image]:
            del self.images[key]

    def connect_network(self, network: str, container: str, endpoint: Any = None) -> None:
        self._call("connect_network", network, container)

    def disconnect_network(self, network: str, container: str, force: bool = False) -> None:
        self._call("disconnect_network", network, container)

    def events(self, since: float, until: float,
               filters: Optional[Dict[str, List[str]]] = None) -> Iterator[Dict[str, Any]]:
        self._call("events", since, until)
        wanted = set((filters or {}).get("container") or [])
        for event in sorted(self.events_script, key=lambda e: e["time"]):
            if since <= event["time"] <= until and (not wanted or event["id"] in wanted):
                if event["time"] > self.clock.now:
                    self.clock.now = event["time"]  # a live event: time passes until it comes
                extra = {"HealthStatus": event["HealthStatus"]} if "HealthStatus" in event else {}
                yield {"Action": event["Action"], "Actor": {"Attributes": event.get("attributes", {})},
                       **extra}
        self.clock.now = max(self.clock.now, until)

    # -- Swarm services -------------------------------------------------------
    # A service's roll-out is scripted: after an update, each inspect takes
    # the next (State, Message) of `rollout` as its UpdateStatus. Its tasks
    # run the image the last state left running: the new one once
    # 'completed', the old one after a rollback (with a failed task of the
    # new one, whose Err is `task_error`).

    def add_service(self, name: str, image: str, replicas: int = 2) -> str:
        service_id = "svc%04d" % next(self._ids)
        self.services[service_id] = {
            "ID": service_id, "Version": {"Index": 10},
            "Spec": {"Name": name, "Labels": {}, "Mode": {"Replicated": {"Replicas": replicas}},
                     "TaskTemplate": {"ContainerSpec": {"Image": image, "Env": ["A=1"]}},
                     "UpdateConfig": {"Order": "start-first", "FailureAction": "rollback"}},
            "running": image, "replicas": replicas, "script": [], "failed": []}
        return service_id

    def _service(self, name: str) -> Dict[str, Any]:
        for service in self.services.values():
            if name in (service["ID"], service["Spec"]["Name"]):
                return service
        raise NotFound("service %s not found" % name, 404, "GET", "/services/" + name)

    def inspect_service(self, name: str) -> Dict[str, Any]:
        self._call("inspect_service", name)
        service = self._service(name)
        if service["script"]:
            state, message = service["script"].pop(0)
            service["UpdateStatus"] = {"State": state, "Message": message,
                                       "StartedAt": "update-%d" % service["Version"]["Index"]}
            if state == "completed":
                service["running"] = service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
            elif state == "rollback_completed":
                service["failed"].append(service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"])
                service["Spec"] = service["PreviousSpec"]
        return {key: value for key, value in service.items()
                if key not in ("running", "replicas", "script", "failed")}

    def list_services(self, filters: Optional[Dict[str, List[str]]] = None) -> List[Dict[str, Any]]:
        self._call("list_services", filters)
        wanted = [label.split("=", 1) for label in (filters or {}).get("label", [])]
        return [self.inspect_service(service["ID"]) for service in list(self.services.values())
                if all(service["Spec"].get("Labels", {}).get(key) == value for key, value in wanted)]

    def update_service(self, service_id: str, version: int, spec: Dict[str, Any],
                       registry_auth: Any = None) -> Dict[str, Any]:
        self._call("update_service", service_id, version, spec, registry_auth)
        service = self._service(service_id)
        if self.conflicts > 0:
            self.conflicts -= 1
            service["Version"]["Index"] += 1  # someone else's update
            raise dockerapi.OutOfSequence("update out of sequence", 500, "POST", "/services/update")
        if version != service["Version"]["Index"]:
            raise dockerapi.OutOfSequence("update out of sequence", 500, "POST", "/services/update")
        service["PreviousSpec"], service["Spec"] = service["Spec"], spec
        service["Version"]["Index"] += 1
        service["script"] = list(self.rollout)
        return {}

    def list_tasks(self, filters: Optional[Dict[str, List[str]]] = None) -> List[Dict[str, Any]]:
        self._call("list_tasks", filters)
        filters = filters or {}
        service = self._service(filters["service"][0])
        tasks = [{"ID": "t%d" % n, "DesiredState": "running",
                  "Spec": {"ContainerSpec": {"Image": service["running"]}},
                  "Status": {"State": "running", "Timestamp": "2026-01-01T00:00:0%dZ" % n}}
                 for n in range(service["replicas"] + service.get("surge", 0))]
        if "desired-state" not in filters:
            tasks += [{"ID": "f%d" % n, "DesiredState": "shutdown",
                       "Spec": {"ContainerSpec": {"Image": image}},
                       "Status": {"State": "failed", "Err": self.task_error,
                                  "Timestamp": "2026-01-01T00:01:0%dZ" % n}}
                      for n, image in enumerate(service["failed"])]
        return tasks

    def swarm_info(self) -> Dict[str, Any]:
        self._call("swarm_info")
        return {"LocalNodeState": "active", "ControlAvailable": bool(self.services)}

    def is_swarm_manager(self) -> bool:
        info = self.swarm_info()
        return info["LocalNodeState"] == "active" and info["ControlAvailable"]


def die_event(engine: FakeEngine, container_id: str, at: float, code: int = 3) -> None:
    """Script the container's death at `at` (and make inspect agree from then)."""
    engine.events_script.append({"time": at, "id": container_id, "Action": "die",
                                 "attributes": {"exitCode": str(code)}})


def app_config(name: str = "web", **settings: Any) -> autodeploy.AppConfig:
    settings.setdefault("settle", 3)
    settings.setdefault("tags", ("latest",))
    return autodeploy.AppConfig(repository="team/" + name, image="reg.example/team/" + name,
                                container=name, **settings)


def web_config(**fields: Any) -> autodeploy.Config:
    """make_config with one app, team/web (container web), and no token."""
    return make_config(**dict(dict(tokens=[], apps={"team/web": app_config(cooldown=0)}), **fields))


def new_job(app: autodeploy.AppConfig, job_id: str = "j1") -> autodeploy.Job:
    return autodeploy.Job(id=job_id, app=app, tag="latest", received=1.0)


def quiet_logs(test: "unittest.TestCase") -> None:
    """Keep the deploy log lines the test provokes off stderr, for this test."""
    logger = logging.getLogger("autodeploy")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    test.addCleanup(logger.setLevel, level)


class Rig:
    """A fake clock and Engine, with the real health gate, container target
    and job runner wired to them as build_service wires them. The Engine
    has the app's new image (v2) and the old one (v1)."""

    def __init__(self, test: "unittest.TestCase", probe: Callable[[str, float], bool] = lambda t, s: False):
        quiet_logs(test)
        self.clock = FakeClock()
        self.engine = FakeEngine(self.clock)
        self.engine.add_image("reg.example/team/web:latest", "sha256:v2")
        self.engine.add_image("sha256:v1", "sha256:v1")
        self.steps: List[Dict[str, Any]] = []
        self.deadline = autodeploy.StopDeadline(self.clock)
        self.gate = autodeploy.HealthGate(self.engine, self.clock, self.clock.sleep, probe,
                                          self.deadline.check)
        self.target = autodeploy.ContainerTarget(
            self.engine, self.gate, self.deadline, "/nonexistent/config.json",
            lambda job, **fields: self.steps.append(fields), self.clock)
        self.runner = autodeploy.JobRunner(self.target, self.deadline, engine_wait=60,
                                           clock=self.clock, sleep=self.clock.sleep)
