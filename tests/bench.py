#!/usr/bin/env python3
"""Benchmark autodeploy against its performance targets.

    python3 tests/bench.py [--seconds 5] [--warmup 1] [--deploys 5] [--launches 5] [--downtime-runs 3]
                           [--client auto|wrk|own] [--callbacks local|omit]
                           [--python PATH | --script]
                           [--json FILE] [--keep-logs DIR] [--profile [cpu|wall]]
    python3 tests/bench.py --faults [--python PATH | --script] [--json FILE]
    python3 -m tests.bench ...

Run from the repository root. It needs a Docker Engine (tests/support.py
finds or starts one), docker-registry and busybox-static, like the
end-to-end tests; wrk is used as the load client when installed
(`apt-get install wrk`), else the bench's own multi-process client.

What it measures, against the real service process run as autodeploy.service
runs it (its ExecStart interpreter and flags, on the zipapp built as README
says; --script: `python3 autodeploy.py`), a real Engine and a throwaway
registry:

1. webhook acks per second and p50/p99 latency with 1 and with 8 keep-alive
   clients POSTing a Docker Hub payload for an app that is already up to
   date (each job the queue runs is a cheap "already runs" pull);
2. the service's resident memory at idle, after start-up and after the load;
3. time from launching the process to its first answered HTTP request;
4. time from the webhook POST to the app's published port answering the new
   version, next to the same Engine calls made directly (the raw floor);
5. downtime: the longest gap between two consecutive answers a client
   polling the app every 50 ms (1 s timeout each) sees during one deploy:
   stop-first through the service (fixed host port; the bench polls it),
   the raw floor's same swap, and start-first through the service (no host
   port; a client container on the app's network asks by alias, retrying
   once); and the health gate's overhead: new container started -> old
   one removed, less `settle`, and with a HEALTHCHECK the Engine's healthy
   event -> old one removed;
6. the journal's cost: acks/s and latency at 8 clients from a service with
   `journal = no`, next to (1), which runs with the journal;
7. recovery after kill -9: a deploy is killed mid-swap (the new container
   just started), the service started again; the time from the restart to
   its first answer, to the job's final callback (the new container gated
   again, `settle` seconds) and to the app answering the pushed version;
8. with --faults (and nothing else): each fault scenario of FAULTS and its
   time to convergence, from the fault's end to the record being true.

All traffic goes to 127.0.0.1; every loop is bounded in count and time.
Everything created is labelled autodeploy.test=<run id> and removed at the
end, also on Ctrl-C. Not a unit test: unittest does not collect this file.
"""

import argparse
import array
import asyncio
import collections
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

AUTODEPLOY = os.path.join(ROOT, "autodeploy.py")
PROGRAM = [AUTODEPLOY]  # what `python3 PROGRAM --config X serve` runs: the zipapp, or --script's autodeploy.py
INTERPRETER = [sys.executable]  # and with what: by default the unit's ExecStart interpreter and flags
TOKEN = "bench-" + "0123456789abcdef" * 3
APP_PORT_IN_CONTAINER = 8080
# A shell that traps SIGTERM in front of busybox httpd: stops at once.
APP_CMD = ["/bin/sh", "-c", "trap 'exit 0' TERM; httpd -f -p %d -h /www & wait" % APP_PORT_IN_CONTAINER]
STOP_TIMEOUT = 5
# The apps' settle time (seconds): the health gate of an app without a
# HEALTHCHECK or probe. Short, so deploys end quickly; whole seconds only.
SETTLE = 1

TARGETS = {
    "acks_per_s_8": 3000.0,     # at 8 keep-alive clients, at least
    "p99_ms_8": 5.0,            # at 8 keep-alive clients, below
    "rss_idle_mib": 25.0,       # below
    "launch_ms": 150.0,         # below
    "deploy_ratio": 1.2,        # at most
}


class BenchError(Exception):
    """A measurement that could not be made; the text says why."""


def log(message: str) -> None:
    print("bench: " + message, file=sys.stderr, flush=True)


############################################################################
# Small helpers
############################################################################

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Any, pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(-(-pct * len(sorted_values) // 100)))  # ceil
    return sorted_values[min(rank, len(sorted_values)) - 1]


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a process, from /proc/PID/status."""
    out = {}
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


DOCKER_STACK = ("dockerd", "containerd", "docker-registry", "docker-proxy", "containerd-shim",
                "containerd-shim-runc-v2", "registry")


def docker_stack_cpu() -> float:
    """CPU seconds so far of the Engine's processes and the registries."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % entry) as fh:
                if fh.read().strip() not in DOCKER_STACK:
                    continue
            total += proc_cpu_seconds(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return total


def children_and_self_cpu() -> Tuple[float, float]:
    """CPU seconds of this process's waited-for children (the load client), and its own."""
    import resource
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return children.ru_utime + children.ru_stime, own.ru_utime + own.ru_stime


def machine_cpu() -> Tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def http_post(port: int, path: str, body: bytes, timeout: float = 10.0) -> Tuple[int, Dict[str, Any]]:
    """One POST on its own connection; (status, JSON answer)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {"raw": raw[:200].decode("utf-8", "replace")}
    return response.status, doc


def hub_payload(repo: str, tag: str, callback_url: Optional[str]) -> bytes:
    """A push webhook shaped like Docker Hub's (as in its documentation)."""
    namespace, _, name = repo.partition("/")
    doc = {
        "push_data": {"pushed_at": 1417566161, "pusher": "bench", "tag": tag},
        "repository": {
            "comment_count": 0, "date_created": 1417494799, "description": "",
            "dockerfile": "FROM busybox\n", "full_description": "autodeploy benchmark app",
            "is_official": False, "is_private": True, "is_trusted": False,
            "name": name, "namespace": namespace, "owner": namespace, "repo_name": repo,
            "repo_url": "https://registry.hub.docker.com/u/%s/" % repo,
            "star_count": 0, "status": "Active",
        },
    }
    if callback_url:
        doc["callback_url"] = callback_url
    return json.dumps(doc).encode("utf-8")


############################################################################
# Callback receiver: stands in for Docker Hub's callback_url
############################################################################

class CallbackReceiver:
    """An asyncio HTTP server on 127.0.0.1 in a thread of its own; counts the
    callbacks per path and keeps the last body of each."""

    def __init__(self) -> None:
        self.counts = collections.Counter()  # type: collections.Counter
        self.states = collections.Counter()  # type: collections.Counter
        self.last = {}  # type: Dict[str, Dict[str, Any]]
        self.cond = threading.Condition()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error = None  # type: Optional[BaseException]
        self._thread = threading.Thread(target=self._run, name="bench-callbacks", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise BenchError("callback receiver did not start: %s" % self._error)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=256))
        except BaseException as exc:  # reported by __init__
            self._error = exc
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path, body = "", b""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
            length = 0
            for line in lines[1:]:
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-length" and value.strip().isdigit():
                    length = min(int(value.strip()), 1 << 20)
            if length:
                body = await asyncio.wait_for(reader.readexactly(length), 10)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {"raw": body[:200].decode("utf-8", "replace")}
        with self.cond:
            self.counts[path] += 1
            self.states[(path, doc.get("state") if isinstance(doc, dict) else None)] += 1
            self.last[path] = doc
            self.cond.notify_all()

    def url(self, name: str) -> str:
        return "http://127.0.0.1:%d/cb/%s" % (self.port, name)

    def total(self) -> int:
        with self.cond:
            return sum(self.counts.values())

    def wait_for(self, name: str, count: int = 1, timeout: float = 60.0) -> Dict[str, Any]:
        """The last body sent to /cb/<name>, once `count` have arrived."""
        path = "/cb/" + name
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.counts[path] < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError("no callback for %s within %.0f s" % (name, timeout))
                self.cond.wait(remaining)
            return self.last[path]

    def close(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


############################################################################
# The service process
############################################################################

def service_env() -> Dict[str, str]:
    """The Engine's environment, without proxies: callbacks stay on 127.0.0.1."""
    from tests import support
    env = support.engine_env()
    for key in list(env):
        if key.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            del env[key]
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


class ServiceProcess:
    """`python3 autodeploy.py --config X serve`, its log in a file."""

    def __init__(self, folder: str, config_text: str, port: int, env: Dict[str, str],
                 argv: Optional[List[str]] = None, name: str = "service") -> None:
        self.port = port
        self.config = os.path.join(folder, "%s.conf" % name)
        with open(self.config, "w") as fh:
            fh.write(config_text)
        self.log_path = os.path.join(folder, "%s.log" % name)
        self.argv = argv or INTERPRETER + [PROGRAM[0], "--config", self.config, "serve"]
        self.env = env
        self.process = None  # type: Optional[subprocess.Popen]
        self._log = None

    def launch(self) -> float:
        """Start the process; return the perf_counter() just before Popen."""
        self._log = open(self.log_path, "ab")
        t0 = time.perf_counter()
        self.process = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # Ctrl-C reaches only the bench
        return t0

    def wait_answer(self, timeout: float = 20.0, interval: float = 0.002) -> float:
        """Poll connect + GET every `interval` until an HTTP answer; its perf_counter()."""
        deadline = time.monotonic() + timeout
        request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        while True:
            if self.process.poll() is not None:
                raise BenchError("the service exited (%s) at start:\n%s"
                                 % (self.process.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise BenchError("the service did not answer within %.0f s:\n%s" % (timeout, self.log_tail()))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
                    sock.sendall(request)
                    data = sock.recv(64)
                if data.startswith(b"HTTP/1."):
                    return time.perf_counter()
            except OSError:
                pass
            time.sleep(interval)

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "".join(self.log_text().splitlines(True)[-lines:])

    def stop(self, timeout: float = 35.0) -> Optional[int]:
        """SIGTERM, wait (the service finishes running deploys), else SIGKILL."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def autodeploy_section(port: int, callback_port: int, state_dir: str, workers: int = 3) -> str:
    """The [autodeploy] section: callbacks to the local receiver."""
    return """\
[autodeploy]
listen = 127.0.0.1:{port}
token = {token}
workers = {workers}
callback_allow = http://127.0.0.1:{cb}
state_dir = {state}
""".format(port=port, token=TOKEN, workers=workers, cb=callback_port, state=state_dir)


def web_section(repo: str, registry: str, run: str, app_port: int) -> str:
    """An app on the bench's web image, v1 <-> v2, its port published on 127.0.0.1."""
    return """
[{repo}]
image = {reg}/bench/web
tag = v1 v2
container = {container}-{run}
stop_timeout = {stop}
settle = {settle}
ports = 127.0.0.1:{app_port}:{inner}
labels =
    autodeploy.test={run}
""".format(repo=repo, container=repo.replace("/", "-"), reg=registry, run=run, stop=STOP_TIMEOUT,
           settle=SETTLE, app_port=app_port, inner=APP_PORT_IN_CONTAINER)


def service_config(port: int, callback_port: int, registry: str, run: str, app_port: int,
                   state_dir: str) -> str:
    """The service's config: the bench's apps, callbacks to the local receiver."""
    return autodeploy_section(port, callback_port, state_dir) + """
# Already deployed and up to date: every webhook job is a cheap "already runs".
[bench/idle]
image = {reg}/bench/web
tag = v1
container = bench-idle-{run}
settle = {settle}
labels =
    autodeploy.test={run}
""".format(reg=registry, run=run, settle=SETTLE) + """
# Redeployed v1 <-> v2 to time webhook -> new version answering, and the
# downtime of a stop-first swap (its fixed host port makes `order = auto`
# stop-first).""" + web_section("bench/web", registry, run, app_port) + """
# Downtime of a start-first swap: no host port, on a network of its own
# under the alias {alias} (the bench creates the first container, with the
# alias; the service keeps network and alias when it replaces it).
[bench/zero]
image = {reg}/bench/web
tag = v1 v2
container = bench-zero-{run}
network = {network}
stop_timeout = {stop}
settle = {settle}
labels =
    autodeploy.test={run}

# The health gate with a HEALTHCHECK: healthy event -> old container removed.
[bench/healthy]
image = {reg}/bench/healthy
tag = v1 v2
container = bench-healthy-{run}
order = stop-first
stop_timeout = {stop}
labels =
    autodeploy.test={run}
""".format(reg=registry, run=run, stop=STOP_TIMEOUT, settle=SETTLE, alias=ALIAS,
           network=bench_network(run))


############################################################################
# 3. Launch to first answer
############################################################################

def measure_launch(folder: str, config_for_port: Any, env: Dict[str, str], runs: int) -> Dict[str, Any]:
    times = []
    for n in range(runs):
        port = free_port()
        service = ServiceProcess(folder, config_for_port(port), port, env, name="launch-%d" % n)
        try:
            t0 = service.launch()
            t1 = service.wait_answer(timeout=20.0, interval=0.002)
            times.append((t1 - t0) * 1000)
        finally:
            service.stop(10)
    # For comparison: the bare interpreter and the import alone.
    def timed(argv: List[str]) -> float:
        # A blocking wait() (with a watchdog): wait(timeout) polls with sleeps
        # of up to 50 ms, which would be counted.
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        watchdog = threading.Timer(30.0, proc.kill)
        watchdog.start()
        try:
            code = proc.wait()
        finally:
            watchdog.cancel()
        elapsed = (time.perf_counter() - t0) * 1000
        if code != 0:
            raise BenchError("%s exited %s" % (" ".join(argv), code))
        return elapsed
    importing = "import sys; sys.path.insert(0, %r); import autodeploy" % (
        ROOT if PROGRAM[0] == AUTODEPLOY else PROGRAM[0])
    bare = [timed(INTERPRETER + ["-c", "pass"]) for _ in range(runs)]
    imported = [timed(INTERPRETER + ["-c", importing]) for _ in range(runs)]

    def rss_of(code: str) -> int:
        out = subprocess.run(INTERPRETER + ["-c", code + "\nimport sys\n"
                              "sys.stdout.write([l for l in open('/proc/self/status') "
                              "if l.startswith('VmRSS')][0].split()[1])"],
                             cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=30, check=True).stdout
        return int(out)
    return {"runs_ms": times, "median_ms": median(times), "python_bare_ms": median(bare),
            "python_import_autodeploy_ms": median(imported),
            "python_bare_rss_kb": rss_of("pass"), "python_import_autodeploy_rss_kb": rss_of(importing)}


############################################################################
# 1. Webhook acks: wrk, or the bench's own multi-process client
############################################################################

WRK_LUA = """\
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"

-- Count answers other than 202 in each thread; done() adds them up.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) not202 = 0 end
function response(status, headers, body)
  if status ~= 202 then not202 = not202 + 1 end
end

done = function(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + (thread:get("not202") or 0) end
  io.write(string.format(
    "BENCHJSON {\\"not202\\": %%.0f, \\"requests\\": %%.0f, \\"duration_us\\": %%.0f, \\"connect\\": %%.0f, " ..
    "\\"read\\": %%.0f, \\"write\\": %%.0f, \\"status\\": %%.0f, \\"timeout\\": %%.0f, " ..
    "\\"p50_us\\": %%.1f, \\"p90_us\\": %%.1f, \\"p99_us\\": %%.1f, \\"max_us\\": %%.1f, " ..
    "\\"mean_us\\": %%.1f}\\n",
    bad, summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def wrk_version(wrk: str) -> str:
    try:
        out = subprocess.run([wrk, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=10).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return "wrk"
    first = out.strip().splitlines()[0] if out.strip() else "wrk"
    return " ".join(first.split()[:2])


def run_wrk(wrk: str, folder: str, port: int, path: str, body: bytes, clients: int,
            seconds: float, warmup: float) -> Dict[str, Any]:
    script = os.path.join(folder, "post.lua")
    if b"]==]" in body:
        raise BenchError("payload cannot be quoted for Lua")
    with open(script, "w") as fh:
        fh.write(WRK_LUA % body.decode("utf-8"))
    threads = 1 if clients == 1 else min(2, clients)
    url = "http://127.0.0.1:%d%s" % (port, path)

    def one(duration: float) -> Tuple[Dict[str, Any], str]:
        argv = [wrk, "-t", str(threads), "-c", str(clients), "-d", "%ds" % max(1, round(duration)),
                "--timeout", "2s", "--latency", "-s", script, url]
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=duration + 30, start_new_session=True)
        text = result.stdout.decode("utf-8", "replace")
        match = re.search(r"^BENCHJSON (\{.*\})$", text, re.M)
        if result.returncode != 0 or not match:
            raise BenchError("wrk failed (exit %s):\n%s" % (result.returncode, text[-2000:]))
        return json.loads(match.group(1)), text

    if warmup > 0:
        one(warmup)
    doc, text = one(seconds)
    duration = doc["duration_us"] / 1e6
    return {
        "clients": clients, "client": "wrk", "requests": int(doc["requests"]),
        "seconds": duration, "acks_per_s": doc["requests"] / duration if duration else 0.0,
        "p50_ms": doc["p50_us"] / 1000, "p90_ms": doc["p90_us"] / 1000,
        "p99_ms": doc["p99_us"] / 1000, "max_ms": doc["max_us"] / 1000,
        "non_2xx": int(doc["status"]), "not_202": int(doc["not202"]),
        "socket_errors": int(doc["connect"] + doc["read"] + doc["write"] + doc["timeout"]),
        "wrk_output": text,
    }


def client_worker(spec: Dict[str, Any]) -> int:
    """One keep-alive connection POSTing as fast as answers come back
    (run in its own process: `bench.py --_client-worker JSON`)."""
    request = (("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n" % (spec["path"], spec["port"], len(spec["body"])))
               .encode("ascii") + spec["body"].encode("utf-8"))
    start_at, measure_at, end_at = spec["start_at"], spec["measure_at"], spec["end_at"]
    max_requests = spec["max_requests"]
    latencies = array.array("d")
    statuses = collections.Counter()  # type: collections.Counter
    errors = 0
    done = 0
    now = time.monotonic()
    if start_at > now:
        time.sleep(start_at - now)
    sock = None
    buf = b""
    perf = time.perf_counter
    while done < max_requests:
        now = time.monotonic()
        if now >= end_at:
            break
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", spec["port"]), timeout=5.0)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            t0 = perf()
            sock.sendall(request)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by the server")
                buf += chunk
            head = buf[:end].lower()
            status = int(head[9:12])
            at = head.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:stop if stop >= 0 else len(head)])
            need = end + 4 + length
            while len(buf) < need:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by the server")
                buf += chunk
            buf = buf[need:]
            elapsed = perf() - t0
            done += 1
            if now >= measure_at:
                latencies.append(elapsed)
                statuses[status] += 1
            if b"\r\nconnection: close" in head:
                sock.close()
                sock = None
        except (OSError, ValueError):
            errors += 1 if now >= measure_at else 0
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.01)
    if sock is not None:
        sock.close()
    with open(spec["out"], "wb") as fh:
        latencies.tofile(fh)
    print(json.dumps({"statuses": {str(k): v for k, v in statuses.items()}, "errors": errors}), flush=True)
    return 0


def run_own_client(folder: str, port: int, path: str, body: bytes, clients: int,
                   seconds: float, warmup: float) -> Dict[str, Any]:
    start_at = time.monotonic() + 0.3 + 0.05 * clients  # time for the processes to start
    measure_at = start_at + warmup
    end_at = measure_at + seconds
    procs = []
    try:
        for n in range(clients):
            spec = {"port": port, "path": path, "body": body.decode("utf-8"), "start_at": start_at,
                    "measure_at": measure_at, "end_at": end_at, "max_requests": 5000000,
                    "out": os.path.join(folder, "latencies-%d-%d.bin" % (clients, n))}
            procs.append((spec, subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--_client-worker", json.dumps(spec)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)))
        latencies = array.array("d")
        statuses = collections.Counter()  # type: collections.Counter
        errors = 0
        for spec, proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, end_at - time.monotonic()) + 30)
            if proc.returncode != 0:
                raise BenchError("client worker exited %s" % proc.returncode)
            doc = json.loads(out.decode("utf-8").strip().splitlines()[-1])
            statuses.update({int(k): v for k, v in doc["statuses"].items()})
            errors += doc["errors"]
            with open(spec["out"], "rb") as fh:
                chunk = array.array("d")
                chunk.frombytes(fh.read())
            latencies.extend(chunk)
            os.unlink(spec["out"])
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ordered = sorted(latencies)
    total = sum(statuses.values())
    return {
        "clients": clients, "client": "own", "requests": total, "seconds": seconds,
        "acks_per_s": total / seconds, "p50_ms": percentile(ordered, 50) * 1000,
        "p90_ms": percentile(ordered, 90) * 1000, "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] * 1000) if ordered else float("nan"),
        "non_2xx": sum(v for k, v in statuses.items() if not 200 <= k < 300),
        "not_202": sum(v for k, v in statuses.items() if k != 202),
        "socket_errors": errors,
    }


def measure_acks(client: str, wrk: Optional[str], folder: str, service: ServiceProcess,
                 body: bytes, clients: int, seconds: float, warmup: float) -> Dict[str, Any]:
    path = "/deploy/" + TOKEN
    pid = service.process.pid
    cpu0, machine0 = proc_cpu_seconds(pid), machine_cpu()
    docker0, (client0, self0) = docker_stack_cpu(), children_and_self_cpu()
    wall0 = time.monotonic()
    if client == "wrk":
        result = run_wrk(wrk, folder, service.port, path, body, clients, seconds, warmup)
    else:
        result = run_own_client(folder, service.port, path, body, clients, seconds, warmup)
    wall = time.monotonic() - wall0
    cpu1, machine1 = proc_cpu_seconds(pid), machine_cpu()
    docker1, (client1, self1) = docker_stack_cpu(), children_and_self_cpu()
    result["service_cpu_pct"] = 100.0 * (cpu1 - cpu0) / wall  # warm-up included
    result["cpu_cores"] = {"service": (cpu1 - cpu0) / wall, "client": (client1 - client0) / wall,
                           "docker_registry": (docker1 - docker0) / wall,
                           "bench_receiver": (self1 - self0) / wall}
    busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
    result["machine_cpu_pct"] = 100.0 * busy / total if total else float("nan")
    result["service_status"] = proc_status(pid)
    return result


############################################################################
# 4. Webhook -> new version answering, and the raw Engine floor
############################################################################

def wait_for_version(port: int, expected: bytes, t0: float, timeout: float = 60.0,
                     interval: float = 0.01, attempt_timeout: float = 1.0) -> Tuple[float, int]:
    """Probe http://127.0.0.1:port/ every `interval` (a new connection each
    time, not waiting for earlier probes, which may stall while the
    container's network comes up) until a body equals `expected`; return
    (monotonic time of that answer, probes made)."""
    request = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    sel = selectors.DefaultSelector()
    probes = {}  # sock -> [started, received bytes, sent?]
    made = 0
    next_probe = time.monotonic()
    deadline = t0 + timeout

    def drop(sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()
        probes.pop(sock, None)

    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                raise BenchError("port %d did not answer %r within %.0f s" % (port, expected, timeout))
            if now >= next_probe and len(probes) < 500:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                probes[sock] = [now, b"", False]
                sel.register(sock, selectors.EVENT_WRITE)
                made += 1
                next_probe = now + interval
            for sock in [s for s, p in probes.items() if now - p[0] > attempt_timeout]:
                drop(sock)
            events = sel.select(max(0.0, next_probe - time.monotonic())) if probes else []
            if not probes:
                time.sleep(max(0.0, next_probe - time.monotonic()))
            for key, _ in events:
                sock = key.fileobj
                state = probes.get(sock)
                if state is None:
                    continue
                if not state[2]:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        drop(sock)
                        continue
                    try:
                        sock.send(request)
                    except OSError:
                        drop(sock)
                        continue
                    state[2] = True
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    drop(sock)
                    continue
                if chunk:
                    state[1] += chunk
                    continue
                answer = state[1]
                drop(sock)
                head, _, body = answer.partition(b"\r\n\r\n")
                if head.startswith(b"HTTP/1.") and head[9:12] == b"200" and body == expected:
                    return time.monotonic(), made
    finally:
        for sock in list(probes):
            drop(sock)
        sel.close()


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ job=(\w+) repo=\S+ (.*)$")
MILESTONES = (("pulling", "job started"), ("renamed old container", "renamed"),
              ("created new container", "created"), ("stopped old container", "stopped"),
              ("started new container", "started"), ("removed old container", "removed"),
              ("succeeded:", "job done"))


def log_milestones(log_text: str, job_id: str, t0_wall: float) -> Dict[str, float]:
    """ms after t0 at which the service logged each step of the job."""
    marks = {}
    for line in log_text.splitlines():
        match = LOG_LINE.match(line)
        if not match or match.group(3) != job_id:
            continue
        when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
        for prefix, name in MILESTONES:
            if match.group(4).startswith(prefix) and name not in marks:
                marks[name] = (when - t0_wall) * 1000
    return marks


def service_redeploy(service: ServiceProcess, receiver: CallbackReceiver, app_port: int,
                     tag: str, n: int) -> Dict[str, Any]:
    callback = "deploy-%d" % n
    body = hub_payload("bench/web", tag, receiver.url(callback))
    t0_wall, t0 = time.time(), time.monotonic()
    status, answer = http_post(service.port, "/deploy/" + TOKEN, body)
    if status != 202:
        raise BenchError("deploy webhook answered %s: %s" % (status, answer))
    t_answer, probes = wait_for_version(app_port, tag.encode() + b"\n", t0)
    done = receiver.wait_for(callback, timeout=60)
    if done.get("state") != "success":
        raise BenchError("deploy %d of %s failed: %s" % (n, tag, done))
    marks = log_milestones(service.log_text(), answer["job"], t0_wall)
    marks["answering"] = (t_answer - t0) * 1000
    return {"ms": (t_answer - t0) * 1000, "probes": probes, "marks": marks}


def floor_create_body(reference: str, app_port: int, run: str) -> Dict[str, Any]:
    """What autodeploy creates for [bench/web] (first_create_body's shape)."""
    from tests import support
    port = "%d/tcp" % APP_PORT_IN_CONTAINER
    return {"Image": reference, "Env": None, "Labels": {support.TEST_LABEL: run},
            "ExposedPorts": {port: {}}, "StopTimeout": STOP_TIMEOUT,
            "HostConfig": {"PortBindings": {port: [{"HostIp": "127.0.0.1", "HostPort": str(app_port)}]},
                           "Binds": None, "RestartPolicy": {"Name": "", "MaximumRetryCount": 0}}}


def floor_swap(engine: Any, name: str, image: str, tag: str, app_port: int, run: str, aside: str,
               marks: Dict[str, float], t0: float) -> None:
    """The Engine calls Deployer.deploy + replace make, made directly:
    pull, inspect image, inspect container, inspect old image, rename old
    aside, create new, stop old, start new, inspect new, remove old.
    Puts in `marks` the ms after `t0` (monotonic) at which each step ended."""
    reference = "%s:%s" % (image, tag)

    def mark(what: str) -> None:
        marks[what] = (time.monotonic() - t0) * 1000
    engine.pull_image(image, tag)
    new_image = engine.inspect_image(reference)
    old = engine.inspect_container(name)
    engine.inspect_image(old["Image"])
    if old["Image"] == new_image["Id"]:
        raise BenchError("floor container already runs %s" % reference)
    mark("pulled")
    engine.rename_container(old["Id"], aside)
    mark("renamed")
    new_id = engine.create_container(floor_create_body(reference, app_port, run), name)
    mark("created")
    engine.stop_container(old["Id"], STOP_TIMEOUT)
    mark("stopped")
    engine.start_container(new_id)
    engine.inspect_container(new_id)
    mark("started")
    engine.remove_container(old["Id"])
    mark("removed")


def floor_redeploy(engine: Any, name: str, image: str, tag: str, app_port: int, run: str,
                   n: int) -> Dict[str, Any]:
    """floor_swap in a thread, timed to the app's port answering `tag`."""
    marks = {}  # type: Dict[str, float]
    failure = []  # type: List[BaseException]
    t0 = time.monotonic()

    def sequence() -> None:
        try:
            floor_swap(engine, name, image, tag, app_port, run, "%s-old-%d" % (name, n), marks, t0)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    thread = threading.Thread(target=sequence, name="bench-floor", daemon=True)
    thread.start()
    try:
        t_answer, probes = wait_for_version(app_port, tag.encode() + b"\n", t0)
    except BenchError:
        thread.join(30)
        if failure:
            raise BenchError("raw floor deploy %d failed: %r" % (n, failure[0]))
        raise
    thread.join(60)
    if failure:
        raise BenchError("raw floor deploy %d failed: %r" % (n, failure[0]))
    marks["answering"] = (t_answer - t0) * 1000
    return {"ms": (t_answer - t0) * 1000, "probes": probes, "marks": marks}


############################################################################
# 5. Downtime during a deploy: the longest gap between answers
############################################################################

VERSIONS = ("v1", "v2")
ALIAS = "benchapp"  # the start-first app's network alias
POLL_INTERVAL = 0.05  # a request every 50 ms ...
POLL_TIMEOUT = 1.0  # ... each given up after 1 s (then it is just not an answer)
POLL_MAX_REQUESTS = 1200
POLL_MAX_SECONDS = 60.0
CLIENT_MAX_REQUESTS = 600  # the start-first client container's bound (~40 s)
# busybox httpd answering inside the container; checked every 0.25 s.
HEALTHCHECK = {"test": "wget -q -O /dev/null http://127.0.0.1:%d/" % APP_PORT_IN_CONTAINER,
               "interval": 0.25}


def bench_network(run: str) -> str:
    """The user-defined network of the start-first app and its client."""
    return "autodeploy-bench-%s" % run


def fetch_version(port: int, timeout: float = POLL_TIMEOUT) -> Optional[str]:
    """GET http://127.0.0.1:port/ on a new connection, `timeout` in all;
    the version the app answered with, or None (refused, reset, stalled,
    not 200 or another body)."""
    deadline = time.monotonic() + timeout
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            for _ in range(64):  # the answer is ~150 bytes
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                sock.settimeout(remaining)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    version = body.decode("ascii", "replace").strip()
    return version if head[9:12] == b"200" and version in VERSIONS else None


class AnswerPoller:
    """A client in a thread of its own asking 127.0.0.1:port every
    POLL_INTERVAL (at once after a request that took longer), keeping the
    monotonic time of each answer, and how long each request that got none
    took (refused at once, or stalled up to POLL_TIMEOUT).
    Bounded: POLL_MAX_REQUESTS requests, POLL_MAX_SECONDS."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers = []  # type: List[Tuple[float, str]]
        self.failures = []  # type: List[float]
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-poller", daemon=True)

    def start(self) -> "AnswerPoller":
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + POLL_MAX_SECONDS
        next_at = time.monotonic()
        for _ in range(POLL_MAX_REQUESTS):
            if self._stop.wait(max(0.0, next_at - time.monotonic())) or time.monotonic() > deadline:
                break
            sent = time.monotonic()
            next_at = sent + POLL_INTERVAL
            version = fetch_version(self.port)
            with self.cond:
                if version:
                    self.answers.append((time.monotonic(), version))
                else:
                    self.failures.append(time.monotonic() - sent)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def count(self) -> int:
        with self.cond:
            return len(self.answers)

    def wait_answers(self, count: int, since: int = 0, version: Optional[str] = None,
                     timeout: float = 15.0) -> None:
        """Until `count` answers (of `version`, if given) came after the first `since`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while sum(1 for _, v in self.answers[since:] if version in (None, v)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    raise BenchError("port %d: %d answers%s not seen within %.0f s (%d failed requests)"
                                     % (self.port, count, " of " + version if version else "",
                                        timeout, len(self.failures)))
                self.cond.wait(min(remaining, 0.5))

    def stop(self) -> Tuple[List[Tuple[float, str]], List[float]]:
        """End the polling; (answers, seconds each failed request took)."""
        self._stop.set()
        self._thread.join(POLL_TIMEOUT + 5)
        with self.cond:
            return list(self.answers), list(self.failures)


def poller_result(answers: List[Tuple[float, str]], failures: List[float], t0: float) -> Dict[str, Any]:
    """gap_stats of a poller's answers, with its failed requests: how many,
    and how many stalled (ran into the timeout, e.g. at the userland proxy)."""
    result = gap_stats([t for t, _ in answers], t0)
    result.update({"failed_requests": len(failures),
                   "stalled_requests": sum(1 for f in failures if f >= 0.9 * POLL_TIMEOUT),
                   "failed_request_ms": [f * 1000 for f in failures]})
    return result


def gap_stats(times: List[float], t0: Optional[float]) -> Dict[str, Any]:
    """The longest gap between consecutive answers (ms), where it lies
    (ms after t0, same clock; None when t0 is) and the median gap."""
    gaps = [(b - a, a, b) for a, b in zip(times, times[1:])]
    if not gaps:
        raise BenchError("fewer than two answers: no gap to measure")
    longest, start, end = max(gaps)
    return {"longest_gap_ms": longest * 1000, "median_gap_ms": median([g[0] for g in gaps]) * 1000,
            "gap_from_ms": None if t0 is None else (start - t0) * 1000,
            "gap_to_ms": None if t0 is None else (end - t0) * 1000, "answers": len(times)}


def webhook_deploy(service: ServiceProcess, receiver: CallbackReceiver, repo: str, tag: str,
                   callback: str, t0_wall: float) -> Tuple[Dict[str, float], str]:
    """POST the push of repo:tag and wait for its success callback;
    (the job's log marks in ms after t0_wall, the job's description)."""
    body = hub_payload(repo, tag, receiver.url(callback))
    status, answer = http_post(service.port, "/deploy/" + TOKEN, body)
    if status != 202:
        raise BenchError("deploy webhook for %s:%s answered %s: %s" % (repo, tag, status, answer))
    done = receiver.wait_for(callback, timeout=60)
    if done.get("state") != "success":
        raise BenchError("deploy of %s:%s failed: %s" % (repo, tag, done))
    return log_milestones(service.log_text(), answer["job"], t0_wall), done.get("description", "")


def order_used(description: str) -> str:
    """The swap order a succeeded job's description tells."""
    return "start-first" if "started before the old one stopped" in description else "stop-first"


def stop_first_downtime(service: ServiceProcess, receiver: CallbackReceiver, app_port: int,
                        tag: str, n: int) -> Dict[str, Any]:
    """Redeploy [bench/web] (fixed host port: stop-first) to `tag` through
    the service while the bench polls its published port."""
    poller = AnswerPoller(app_port).start()
    try:
        poller.wait_answers(3)
        t0, t0_wall = time.monotonic(), time.time()
        marks, description = webhook_deploy(service, receiver, "bench/web", tag, "down-stop-%d" % n, t0_wall)
        poller.wait_answers(3, since=poller.count(), version=tag)
    finally:
        answers, failures = poller.stop()
    result = poller_result(answers, failures, t0)
    result.update({"marks": marks, "order": order_used(description)})
    return result


def floor_downtime(engine: Any, name: str, image: str, tag: str, port: int, run: str,
                   n: int) -> Dict[str, Any]:
    """The raw floor's stop-first swap (floor_swap) while the bench polls its port."""
    poller = AnswerPoller(port).start()
    marks = {}  # type: Dict[str, float]
    try:
        poller.wait_answers(3)
        t0 = time.monotonic()
        floor_swap(engine, name, image, tag, port, run, "%s-down-%d" % (name, n), marks, t0)
        poller.wait_answers(3, since=poller.count(), version=tag)
    finally:
        answers, failures = poller.stop()
    result = poller_result(answers, failures, t0)
    result["marks"] = marks
    return result


def start_aliased_app(engine: Any, name: str, network: str, reference: str, run: str) -> None:
    """The start-first app's first container: no host port, on `network`
    under the alias ALIAS (as `docker run --network N --network-alias A`)."""
    from tests import support
    body = {"Image": reference, "Labels": {support.TEST_LABEL: run}, "StopTimeout": STOP_TIMEOUT,
            "HostConfig": {"NetworkMode": network, "RestartPolicy": {"Name": "", "MaximumRetryCount": 0}},
            "NetworkingConfig": {"EndpointsConfig": {network: {"Aliases": [ALIAS]}}}}
    engine.start_container(engine.create_container(body, name))


def alias_client_script() -> str:
    """The start-first client's shell loop (busybox), as
    tests/test_e2e_health.py's: resolve ALIAS at Docker's DNS for every
    request, GET / with a 1 s timeout, retry once (resolving again) on
    failure as a reverse proxy does, print "TIME BODY [retried]" or "TIME
    FAIL", sleep 50 ms; at most CLIENT_MAX_REQUESTS. TIME is $EPOCHREALTIME
    (busybox ash, microseconds; busybox `date` has no %N), else
    /proc/uptime (10 ms); the first line says which."""
    fetch = ("ip=$(nslookup %s 127.0.0.11 2>/dev/null | awk '/^Address: /{print $2; exit}'); "
             "body=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 \"$ip\" %d 2>/dev/null | tail -n 1); "
             % (ALIAS, APP_PORT_IN_CONTAINER))
    return ("if [ -n \"$EPOCHREALTIME\" ]; then echo clock=epoch; else echo clock=uptime; fi; "
            "i=0; while [ $i -lt %d ]; do retry=''; " % CLIENT_MAX_REQUESTS + fetch +
            "if [ -z \"$body\" ]; then retry=retried; " + fetch + "fi; "
            "t=$EPOCHREALTIME; [ -n \"$t\" ] || read t _ < /proc/uptime; "
            "case \"$body\" in v1|v2) echo \"$t $body $retry\";; *) echo \"$t FAIL $retry\";; esac; "
            "i=$((i+1)); sleep %g; done" % POLL_INTERVAL)


def start_alias_client(name: str, network: str, reference: str, run: str) -> None:
    """The client container on the app's network, running alias_client_script."""
    from tests import support
    support.docker("run", "-d", "--name", name, "--label", "%s=%s" % (support.TEST_LABEL, run),
                   "--network", network, reference, "sh", "-c", alias_client_script(), timeout=30)


def client_lines(engine: Any, name: str) -> Tuple[str, List[Tuple[float, str, bool]]]:
    """The client's clock and its (time, body or FAIL, retried) lines so far."""
    clock, lines = "?", []
    for line in engine.container_logs(name, tail=CLIENT_MAX_REQUESTS + 10).splitlines():
        words = line.split()
        if line.startswith("clock="):
            clock = line[len("clock="):].strip()
        elif len(words) >= 2:
            lines.append((float(words[0]), words[1], words[-1] == "retried"))
    return clock, lines


def wait_client_answers(engine: Any, name: str, count: int, version: Optional[str] = None,
                        timeout: float = 15.0) -> List[Tuple[float, str, bool]]:
    """The client's lines, once `count` answers (of `version`, if given) are among them."""
    deadline = time.monotonic() + timeout
    while True:
        _, lines = client_lines(engine, name)
        if sum(1 for _, body, _ in lines if body in VERSIONS and version in (None, body)) >= count:
            return lines
        if time.monotonic() > deadline:
            raise BenchError("client %s: %d answers%s not seen within %.0f s; last lines %s"
                             % (name, count, " of " + version if version else "", timeout, lines[-5:]))
        time.sleep(0.1)


def start_first_downtime(engine: Any, service: ServiceProcess, receiver: CallbackReceiver,
                         network: str, reference: str, run: str, tag: str, n: int) -> Dict[str, Any]:
    """Redeploy [bench/zero] (no host port: start-first) to `tag` through
    the service while a client container on its network asks for it by alias."""
    client = "bench-client-%s-%d" % (run, n)
    start_alias_client(client, network, reference, run)
    try:
        before = len(wait_client_answers(engine, client, 3))
        t0_wall = time.time()
        marks, description = webhook_deploy(service, receiver, "bench/zero", tag, "down-zero-%d" % n, t0_wall)
        clock, lines = client_lines(engine, client)
        lines = wait_client_answers(engine, client, 3 + sum(1 for _, b, _ in lines if b == tag), version=tag)
    finally:
        engine.remove_container(client, force=True)
    if len(lines) >= CLIENT_MAX_REQUESTS:
        raise BenchError("client %s ran out of requests before the deploy was over" % client)
    answered = [t for t, body, _ in lines if body in VERSIONS]
    result = gap_stats(answered, t0_wall if clock == "epoch" else None)
    result.update({"failed_requests": sum(1 for _, body, _ in lines if body not in VERSIONS),
                   "retried": sum(1 for _, _, retried in lines if retried), "client_clock": clock,
                   "requests_before_deploy": before, "marks": marks, "order": order_used(description)})
    return result


def healthy_event_time(engine: Any, container_id: str, since: float) -> Optional[float]:
    """Unix time of the Engine's first 'health_status: healthy' event of the container since `since`."""
    for event in engine.events(since, time.time(), {"type": ["container"], "container": [container_id]}):
        if (event.get("Action") or event.get("status") or "").startswith("health_status: healthy"):
            return event["timeNano"] / 1e9
    return None


def healthcheck_gate(engine: Any, service: ServiceProcess, receiver: CallbackReceiver, run: str,
                     tag: str, n: int) -> Dict[str, Any]:
    """Redeploy [bench/healthy] (image HEALTHCHECK, stop-first) to `tag`;
    ms from the Engine's healthy event to the old container removed, and to
    the job done (which also removes the previous image, remove_old_image)."""
    t0_wall = time.time()
    marks, _ = webhook_deploy(service, receiver, "bench/healthy", tag, "healthy-%d" % n, t0_wall)
    healthy = healthy_event_time(engine, engine.inspect_container("bench-healthy-%s" % run)["Id"], t0_wall - 1)
    if healthy is None or "removed" not in marks or "job done" not in marks:
        raise BenchError("healthcheck deploy %d: no healthy event, or no 'removed'/'succeeded' log line" % n)
    marks["healthy"] = (healthy - t0_wall) * 1000
    return {"healthy_to_removed_ms": marks["removed"] - marks["healthy"],
            "healthy_to_done_ms": marks["job done"] - marks["healthy"], "marks": marks}


def gate_overheads(deploys: List[Dict[str, Any]], settle: float) -> List[float]:
    """Per deploy: ms from the new container started to the old one removed,
    less the settle time: what the health gate and the swap's end cost
    beyond the wait (start-first: also taking the old one off its network
    and stopping it). 'job done' comes later when the previous image is
    removed too (remove_old_image)."""
    return [d["marks"]["removed"] - d["marks"]["started"] - settle * 1000
            for d in deploys if "started" in d["marks"] and "removed" in d["marks"]]


def redeploy_tag(n: int) -> str:
    """The tag an app's n-th redeploy deploys (from n = 0; every app starts at v1)."""
    return "v2" if n % 2 == 0 else "v1"


def prepare_downtime(engine: Any, service: ServiceProcess, receiver: CallbackReceiver, image: str,
                     run: str, state: Dict[str, Any]) -> str:
    """The start-first app's network and first container, and [bench/healthy]'s
    first container (through the service); returns the network."""
    from tests import support
    network = bench_network(run)
    support.docker("network", "create", "--label", "%s=%s" % (support.TEST_LABEL, run), network)
    state["networks"].append(network)
    start_aliased_app(engine, "bench-zero-%s" % run, network, image + ":v1", run)
    webhook_deploy(service, receiver, "bench/healthy", "v1", "first-healthy", time.time())
    return network


def measure_downtime(engine: Any, service: ServiceProcess, receiver: CallbackReceiver,
                     ports: Dict[str, int], image: str, run: str, runs: int, first_n: int,
                     state: Dict[str, Any]) -> Dict[str, Any]:
    """`runs` rounds of: stop-first via the service, the raw floor's swap,
    start-first via the service, and a HEALTHCHECK-gated deploy.
    ports: "web" and "floor", the published ports; first_n: the next
    number of the web/floor redeploy sequence (their current tag follows it)."""
    from dockerapi import DockerError
    out = {"runs": runs, "poll_interval_ms": POLL_INTERVAL * 1000, "request_timeout_ms": POLL_TIMEOUT * 1000,
           "stop_first": [], "floor": [], "start_first": [], "healthcheck": []}  # type: Dict[str, Any]
    try:
        network = prepare_downtime(engine, service, receiver, image, run, state)
        for k in range(runs):
            n = first_n + k
            tag = redeploy_tag(n)
            log("downtime %d/%d: stop-first, raw floor, start-first, HEALTHCHECK gate" % (k + 1, runs))
            out["stop_first"].append(stop_first_downtime(service, receiver, ports["web"], tag, n))
            out["floor"].append(floor_downtime(engine, "bench-floor-%s" % run, image, tag, ports["floor"], run, n))
            out["start_first"].append(start_first_downtime(engine, service, receiver, network, image + ":v1",
                                                           run, redeploy_tag(k), k))
            out["healthcheck"].append(healthcheck_gate(engine, service, receiver, run, redeploy_tag(k), k))
    except DockerError as exc:
        raise BenchError("downtime measurement: the Engine refused a call: %s" % exc) from exc
    for key, wanted in (("stop_first", "stop-first"), ("start_first", "start-first")):
        if any(r["order"] != wanted for r in out[key]):
            log("warning: the %s runs did not all use %s: %s" % (key, wanted, [r["order"] for r in out[key]]))
    return out


############################################################################
# Profiling the service under load (--profile)
############################################################################

def profiled_service(config: str, out: str, timer: str) -> int:
    """Run `serve` with every thread of the service under cProfile, then
    write the merged stats to `out` (`bench.py --_profiled-service CONFIG OUT
    cpu|wall`). With `cpu` each thread's own CPU time is counted (where the
    work is); with `wall` the elapsed time (where threads wait: locks, I/O)."""
    import cProfile
    import pstats
    import socketserver
    import autodeploy

    profiles = []  # type: List[Any]
    lock = threading.Lock()

    def profiled(function: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            profile = cProfile.Profile(time.thread_time) if timer == "cpu" else cProfile.Profile()
            profile.enable()
            try:
                return function(*args, **kwargs)
            finally:
                profile.disable()
                with lock:
                    profiles.append(profile)
        return run

    autodeploy.WebhookServer.process_request_thread = profiled(
        socketserver.ThreadingMixIn.process_request_thread)
    autodeploy.WebhookServer.serve_forever = profiled(socketserver.BaseServer.serve_forever)
    autodeploy.Service._work = profiled(autodeploy.Service._work)
    autodeploy.CallbackSender._serve = profiled(autodeploy.CallbackSender._serve)
    code = autodeploy.main(["--config", config, "serve"])
    time.sleep(0.5)  # connection threads finishing after the clients left
    with lock:
        if profiles:
            stats = pstats.Stats(profiles[0])
            for profile in profiles[1:]:
                stats.add(profile)
            stats.dump_stats(out)
    return code


def run_profile(client: str, wrk: Optional[str], folder: str, config_for_port: Any,
                env: Dict[str, str], body: bytes, seconds: float, timer: str) -> str:
    import io
    import pstats
    if sys.version_info >= (3, 12):
        return ("(--profile needs Python <= 3.11: from 3.12 cProfile cannot profile "
                "several threads at once)")
    port = free_port()
    out = os.path.join(folder, "service.pstats")
    service = ServiceProcess(folder, config_for_port(port), port, env, name="profiled")
    service.argv = [sys.executable, os.path.abspath(__file__), "--_profiled-service",
                    service.config, out, timer]
    try:
        service.launch()
        service.wait_answer()
        result = measure_acks(client, wrk, folder, service, body, 8, seconds, 1.0)
    finally:
        service.stop()
    if not os.path.exists(out):
        return "(no profile written:\n%s)" % service.log_tail()
    text = io.StringIO()
    stats = pstats.Stats(out, stream=text)
    text.write("acks/s under the profiler (8 clients): %.0f; timer: %s\n" % (
        result["acks_per_s"], "per-thread CPU time" if timer == "cpu" else "wall clock"))
    stats.strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    return text.getvalue()


############################################################################
# The run
############################################################################

def unit_interpreter(python: Optional[str]) -> List[str]:
    """The interpreter and flags of autodeploy.service's ExecStart, e.g.
    ['/usr/bin/python3', '-I', '-S', '-u']: the bench runs the service as
    the unit would. `python` (or this interpreter, when the unit's is not
    installed) replaces the path, keeping the flags."""
    import shlex
    with open(os.path.join(ROOT, "autodeploy.service")) as fh:
        line = next(l for l in fh if l.startswith("ExecStart="))
    argv = shlex.split(line[len("ExecStart="):])
    words = argv[:next(n for n, word in enumerate(argv) if word.endswith(".pyz"))]
    if python or not os.path.exists(words[0]):
        words[0] = python or sys.executable
    return words


def build_pyz(folder: str) -> str:
    """The zipapp the README installs, built by `autodeploy.py build` with
    the service's interpreter (so its bytecode is the one a start uses)."""
    target = os.path.join(folder, "autodeploy.pyz")
    subprocess.run(INTERPRETER[:1] + [os.path.join(ROOT, "autodeploy.py"), "build", "-o", target],
                   check=True, timeout=60, stdout=subprocess.DEVNULL)
    return target


def machine_info(engine: Any) -> Dict[str, Any]:
    version = engine.version()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"nproc": affinity, "cpu_count": os.cpu_count(),
            "python": "%s %s" % (platform.python_implementation(), platform.python_version()),
            "engine": "Docker Engine %s (API %s)" % (version.get("Version"), version.get("ApiVersion")),
            "kernel": platform.release()}


def code_version() -> str:
    """The commit measured, and whether the work tree differs from it."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=10).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "autodeploy.py",
                                "dockerapi.py"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               timeout=10).stdout.decode().strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (head or "unknown") + (" + uncommitted changes to autodeploy.py/dockerapi.py" if dirty else "")


def wait_settled(receiver: CallbackReceiver, quiet: float = 1.0, timeout: float = 30.0) -> None:
    """Until no callback has arrived for `quiet` seconds (the queue drained)."""
    deadline = time.monotonic() + timeout
    last, since = receiver.total(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = receiver.total()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


############################################################################
# 6. The journal's cost, and 7. recovery after kill -9
############################################################################

# Attacks on the listener, each from sources of its own on 127.0.0.0/8 and
# bounded in connections; the load (wrk) keeps coming from 127.0.0.1.
ATTACKS = {
    # name: (sources, connections per source, what each connection does)
    "huge headers": (("127.0.0.3", "127.0.0.4", "127.0.0.5"), 16, "huge"),
    "silent sockets": (tuple("127.0.0.%d" % n for n in range(3, 11)), 8, "silent"),
    "slowloris": (tuple("127.0.0.%d" % n for n in range(3, 12)), 8, "slowloris"),
}


def attack_connection(port: int, source: str, action: str, stop: threading.Event) -> None:
    """One attacking connection, opened again each time the service drops it, until `stop`."""
    huge_line = b"X-Pad: " + b"p" * 64990 + b"\r\n"
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0))
        except OSError:
            stop.wait(0.1)
            continue
        try:
            if action == "huge":
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                for _ in range(98):
                    sock.sendall(huge_line)
            elif action == "silent":
                while not stop.is_set() and sock.recv(1):
                    pass
            else:
                for byte in b"POST /deploy/x HTTP/1.1\r\nHost: x\r\n" * 10:
                    if stop.wait(0.2):
                        break
                    sock.sendall(bytes([byte]))
        except OSError:
            pass  # dropped by the service: the attack goes on with a new connection
        finally:
            sock.close()


def measure_under_attack(client: str, wrk: Optional[str], folder: str, service: ServiceProcess,
                         body: bytes, seconds: float, warmup: float) -> Dict[str, Any]:
    """acks at 8 clients from 127.0.0.1 while each attack of ATTACKS runs,
    and the service's peak resident memory over them."""
    results: Dict[str, Any] = {}
    for name, (sources, per_source, action) in ATTACKS.items():
        stop = threading.Event()
        threads = [threading.Thread(target=attack_connection, args=(service.port, source, action, stop),
                                    daemon=True)
                   for source in sources for _ in range(per_source)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)  # the attack is under way
            results[name] = measure_acks(client, wrk, folder, service, body, 8, seconds, warmup)
        finally:
            stop.set()
            for thread in threads:
                thread.join(5)
    results["peak_rss_kib"] = proc_status(service.process.pid).get("VmHWM")
    return results


def measure_without_journal(client: str, wrk: Optional[str], folder: str, config_for_port: Any,
                            env: Dict[str, str], body: bytes, seconds: float,
                            warmup: float) -> Dict[str, Any]:
    """acks at 8 clients from a second service, the same but for `journal = no`."""
    port = free_port()
    config = config_for_port(port).replace("[autodeploy]\n", "[autodeploy]\njournal = no\n", 1)
    # Its own state directory: a second service on the first one's is refused.
    config = config.replace(os.path.join(folder, "state"), os.path.join(folder, "state-no-journal"))
    service = ServiceProcess(folder, config, port, env, name="no-journal")
    try:
        service.launch()
        service.wait_answer()
        return measure_acks(client, wrk, folder, service, body, 8, seconds, warmup)
    finally:
        service.stop()


def recovery_config(port: int, callback_port: int, registry: str, run: str, app_port: int,
                    state_dir: str) -> str:
    """A service of its own for the kill -9 runs: one app, its own journal."""
    return (autodeploy_section(port, callback_port, state_dir, workers=1)
            + web_section("bench/rec", registry, run, app_port))


def wait_log(service: ServiceProcess, fragments: Tuple[str, ...], timeout: float = 60.0) -> None:
    """Until one line of the service's log holds every fragment."""
    deadline = time.monotonic() + timeout
    while not any(all(f in line for f in fragments) for line in service.log_text().splitlines()):
        if time.monotonic() > deadline:
            raise BenchError("no log line with %r within %.0f s:\n%s" % (fragments, timeout, service.log_tail()))
        time.sleep(0.005)


def measure_recovery(folder: str, receiver: CallbackReceiver, registry: str, env: Dict[str, str],
                     run: str, runs: int, state: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Kill -9 mid-swap and restart, `runs` times; ms from the restart's launch."""
    port, app_port = free_port(), free_port()
    config = recovery_config(port, receiver.port, registry, run, app_port,
                             os.path.join(folder, "recovery-state"))
    service = state["recovery"] = ServiceProcess(folder, config, port, env, name="recovery")
    service.launch()
    service.wait_answer()
    status, answer = http_post(port, "/deploy/" + TOKEN, hub_payload("bench/rec", "v1", receiver.url("rec-first")))
    if status != 202 or receiver.wait_for("rec-first", timeout=120).get("state") != "success":
        raise BenchError("first deploy of bench/rec failed: %s %s" % (status, answer))
    results = []
    for n in range(runs):
        tag = "v2" if n % 2 == 0 else "v1"
        name = "rec-%d" % n
        status, answer = http_post(port, "/deploy/" + TOKEN, hub_payload("bench/rec", tag, receiver.url(name)))
        if status != 202:
            raise BenchError("recovery deploy answered %s: %s" % (status, answer))
        wait_log(service, ("job=%s " % answer["job"], "started new container"))
        service.process.kill()
        service.process.wait(10)
        t0 = service.launch()
        t_answer = service.wait_answer()
        done = receiver.wait_for(name, timeout=120)
        t_final = time.perf_counter()
        wait_for_version(app_port, tag.encode() + b"\n", time.monotonic(), timeout=30)
        t_version = time.perf_counter()
        results.append({"answer_ms": (t_answer - t0) * 1000, "final_ms": (t_final - t0) * 1000,
                        "version_ms": (t_version - t0) * 1000, "state": done.get("state")})
    service.stop()
    return results


############################################################################
# 8. Faults (--faults): how long until the record is true again
############################################################################
#
# Each scenario is a function of a FaultRig, returning a dict with
# "converged_ms" (from the end of the fault to the record being true) and
# "detail" (what that time is, in words), plus whatever else it measured.
# FAULTS lists them: append new ones there.

class FaultRig:
    """What a fault scenario gets: a folder, the Engine's environment, the
    bench's web image (v1, v2) in the registry, the run id, and `state`
    (services put in state["faults"] are stopped by the cleanup)."""

    def __init__(self, folder: str, env: Dict[str, str], image: str, run: str,
                 state: Dict[str, Any]) -> None:
        self.folder, self.env, self.image, self.run, self.state = folder, env, image, run, state

    def app(self, name: str) -> Tuple[str, int]:
        """v1 running under a container name of its own, its port published; (name, port)."""
        from tests import support
        container = "bench-fault-%s-%s" % (name, self.run)
        port = free_port()
        support.docker("run", "-d", "--name", container, "--label", "%s=%s" % (support.TEST_LABEL, self.run),
                       "-p", "127.0.0.1:%d:%d" % (port, APP_PORT_IN_CONTAINER), self.image + ":v1")
        wait_for_version(port, b"v1\n", time.monotonic(), timeout=30)
        return container, port

    def bad_image(self) -> None:
        """Push <image>:bad, which exits 3 at once (for rollbacks), once."""
        from tests import support
        ref = self.image + ":bad"
        if ref not in self.state["images"]:
            self.state["images"].append(ref)
            self.state["images"].append(support.make_image(ref, "bad", cmd=["/bin/sh", "-c", "exit 3"]))

    def service(self, name: str, container: str, receiver_port: int,
                also_allow: Tuple[str, ...] = (), extra: str = "",
                app_lines: str = "") -> ServiceProcess:
        """A service (not launched) deploying bench/<name> (v1, v2, bad) to
        `container`, and bench/junk, whose image is on a closed port: its
        jobs fail at once. `extra`: more [autodeploy] lines."""
        port = free_port()
        state_dir = os.path.join(self.folder, "fault-%s-state" % name)
        config = autodeploy_section(port, receiver_port, state_dir, workers=2).replace(
            "callback_allow = http://127.0.0.1:%d" % receiver_port,
            " ".join(("callback_allow = http://127.0.0.1:%d" % receiver_port,) + also_allow)) + extra + """
[bench/{name}]
image = {image}
tag = v1 v2 bad
{app_lines}
container = {container}
settle = {settle}
remove_old_image = no

[bench/junk]
image = 127.0.0.1:{closed}/bench/nothing
container = bench-junk-{name}-{run}
cooldown = 0
""".format(name=name, image=self.image, container=container, settle=SETTLE, closed=free_port(),
           run=self.run, app_lines=app_lines)
        service = ServiceProcess(self.folder, config, port, self.env, name="fault-" + name)
        service.state_dir = state_dir
        self.state["faults"].append(service)
        return service


def post_job(service: ServiceProcess, repo: str, tag: str, callback: Optional[str]) -> str:
    status, answer = http_post(service.port, "/deploy/" + TOKEN, hub_payload(repo, tag, callback))
    if status != 202:
        raise BenchError("%s:%s answered %s: %s" % (repo, tag, status, answer))
    return answer["job"]


def journal_state(state_dir: str, job_id: str) -> Optional[str]:
    """The job's state in the journal, read directly (read-only)."""
    import sqlite3
    db = sqlite3.connect("file:%s?mode=ro" % os.path.join(state_dir, "journal.sqlite3"), uri=True, timeout=5)
    try:
        row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None
    finally:
        db.close()


def log_time(service: ServiceProcess, job_id: str, prefix: str) -> float:
    """The wall-clock time (to the ms) of the job's first log line starting with `prefix`."""
    for line in service.log_text().splitlines():
        match = LOG_LINE.match(line)
        if match and match.group(3) == job_id and match.group(4).startswith(prefix):
            return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
    raise BenchError("no log line of job %s starting %r:\n%s" % (job_id, prefix, service.log_tail()))


def fault_full_disk(rig: FaultRig) -> Dict[str, Any]:
    """The state dir on a 1 MiB tmpfs, filled while a deploy runs (webhooks
    until one is refused 503); the deploy ends meanwhile. From the filler's
    removal to /healthz 200 and the job final in the journal, no webhook sent."""
    from tests import support
    receiver = support.CallbackReceiver()
    container, _ = rig.app("full")
    service = rig.service("full", container, receiver.port)
    os.makedirs(service.state_dir)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "autodeploy-bench",
                              service.state_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if mounted.returncode != 0:
        receiver.close()
        raise BenchError("mount -t tmpfs refused: %s" % mounted.stdout.decode().strip())
    filler = os.path.join(service.state_dir, "filler")
    try:
        service.launch()
        service.wait_answer()
        job = post_job(service, "bench/full", "v2", receiver.url("full"))
        support.fill_file_system(filler)
        for accepted in range(300):
            status, _ = http_post(service.port, "/deploy/" + TOKEN, hub_payload("bench/junk", "latest", None))
            if status != 202:
                break
        else:
            raise BenchError("300 webhooks accepted on a full disk")
        receiver.wait_for("full", timeout=60)
        wait_log(service, ("held in memory: ",))
        if journal_state(service.state_dir, job) == "succeeded":
            raise BenchError("the job's end reached the full journal: the disk was not full")
        freed = time.monotonic()
        os.unlink(filler)
        healthy = support.wait_healthz(service.port, 200, timeout=30)
        while journal_state(service.state_dir, job) != "succeeded":
            if time.monotonic() > freed + 30:
                raise BenchError("job %s not final in the journal 30 s after space was freed" % job)
            time.sleep(0.005)
        final = time.monotonic()
    finally:
        receiver.close()
        if os.path.exists(filler):
            os.unlink(filler)
        service.stop()
        subprocess.run(["umount", "-l", service.state_dir])
    return {"converged_ms": (max(healthy, final) - freed) * 1000,
            "healthz_ms": (healthy - freed) * 1000, "journal_ms": (final - freed) * 1000,
            "accepted_on_full_disk": accepted,
            "detail": "space freed -> /healthz 200 and the job final in the journal (no webhook)"}


def fault_stalled_host(rig: FaultRig, stalled: int) -> Dict[str, Any]:
    """`stalled` callbacks queued for a host that accepts and never answers,
    then a deploy of another app: its callback's delay after its job ended."""
    from tests import support
    hole, receiver = support.StalledHost(), support.CallbackReceiver()
    try:
        container, _ = rig.app("stalled-%d" % stalled)
        service = rig.service("stalled-%d" % stalled, container, receiver.port, (hole.origin,))
        service.launch()
        service.wait_answer()
        for n in range(stalled):
            post_job(service, "bench/junk", "latest", hole.url("s%d" % n))
        hole.wait_accepted(1)
        job = post_job(service, "bench/stalled-%d" % stalled, "v2", receiver.url("unrelated"))
        [arrived] = receiver.wait_count("unrelated", 1, timeout=120)
        arrived_wall = time.time() - (time.monotonic() - arrived)
        ended = log_time(service, job, "succeeded:")
        given_up = len([at for at in hole.times("given up") if at < arrived])
        service.stop()
    finally:
        hole.close()
        receiver.close()
    return {"converged_ms": (arrived_wall - ended) * 1000, "stalled_given_up_before": given_up,
            "detail": "job ended -> its callback arrived; %d stalled post(s) given up before it"
                      % given_up}


def fault_retry_across_restart(rig: FaultRig, how: str) -> Dict[str, Any]:
    """A callback answered 500 once, the service stopped (SIGTERM, or kill -9)
    before the retry and started again: from the restart to the 200."""
    from tests import support
    receiver = support.CallbackReceiver(statuses=(500, 200))
    try:
        container, _ = rig.app("retry-" + how)
        service = rig.service("retry-" + how, container, receiver.port)
        service.launch()
        service.wait_answer()
        post_job(service, "bench/retry-" + how, "v2", receiver.url("retry"))
        receiver.wait_count("retry", 1, timeout=60)
        if how == "kill":
            service.process.kill()
            service.process.wait(10)
        else:
            service.stop()
        if receiver.count("retry") != 1:
            raise BenchError("the retry went out before the stop")
        restarted = time.monotonic()
        launched = service.launch()
        answered_ms = (service.wait_answer() - launched) * 1000
        [_, sent] = receiver.wait_count("retry", 2, timeout=60)
        service.stop()
    finally:
        receiver.close()
    return {"converged_ms": (sent - restarted) * 1000, "answer_ms": answered_ms,
            "detail": "restart -> the callback's 200 (the service answered after %.0f ms)" % answered_ms}


# (remove-image: these apps keep their old images; tests/test_e2e_faults crashes there too)
CRASH_STEPS = ("rename-aside", "create-new", "stop-old", "start-new", "gate", "remove-old",
               "remove-new", "rename-back", "start-old")
ROLLBACK_STEPS = ("remove-new", "rename-back", "start-old")  # crashed while rolling back `bad`


def fault_crash_at(rig: FaultRig, step: str) -> Dict[str, Any]:
    """The service kills itself (AUTODEPLOY_CRASH_AT) right after recording
    `step`'s intent, and is started again: from the launch to the job's
    callback and the app answering what it must (v2, or v1 after a rollback)."""
    from tests import support
    rig.bad_image()
    receiver = support.CallbackReceiver()
    try:
        container, app_port = rig.app("crash-" + step)
        service = rig.service("crash-" + step, container, receiver.port)
        service.env = dict(rig.env, AUTODEPLOY_CRASH_AT=step)
        service.launch()
        service.wait_answer()
        rollback = step in ROLLBACK_STEPS
        post_job(service, "bench/crash-" + step, "bad" if rollback else "v2", receiver.url("crash"))
        try:
            service.process.wait(60)
        except subprocess.TimeoutExpired:
            pass
        if service.process.returncode != -signal.SIGKILL:
            raise BenchError("the service did not crash at %s:\n%s" % (step, service.log_tail()))
        service.env = rig.env
        restarted = time.monotonic()
        service.launch()
        [called] = receiver.wait_count("crash", 1, timeout=120)
        answered, _ = wait_for_version(app_port, b"v1\n" if rollback else b"v2\n", restarted, timeout=60)
        state = receiver.wait_for("crash").get("state")
        service.stop()
    finally:
        receiver.close()
    return {"converged_ms": (max(called, answered) - restarted) * 1000, "state": state,
            "detail": "restart -> callback (%s) and the app answering %s"
                      % (state, "v1 again" if rollback else "v2")}


def fault_engine_away(rig: FaultRig, away: float = 5.0) -> Dict[str, Any]:
    """The Engine cut (a proxy) mid-gate for `away` s, longer than engine_wait
    (2 s), the new container stopped meanwhile as an Engine restart stops
    it: from the Engine's return to /healthz 200, the callback and v2 answering."""
    from tests import support
    receiver = support.CallbackReceiver()
    proxy = support.EngineProxy(rig.env["DOCKER_HOST"][len("unix://"):], rig.folder)
    try:
        container, app_port = rig.app("away")
        service = rig.service("away", container, receiver.port,
                              extra="docker_host = %s\nengine_wait = 2\n" % proxy.url)
        service.launch()
        service.wait_answer()
        job = post_job(service, "bench/away", "v2", receiver.url("away"))
        wait_log(service, ("job=%s " % job, "checking it stays up"))
        proxy.cut()
        support.docker("kill", container)
        wait_log(service, ("job=%s " % job, "waiting for it to put the swap in order"))
        time.sleep(away)
        back = time.monotonic()
        proxy.restore()
        [called] = receiver.wait_count("away", 1, timeout=120)
        answered, _ = wait_for_version(app_port, b"v2\n", back, timeout=60)
        healthy = support.wait_healthz(service.port, 200, timeout=30)
        state = receiver.wait_for("away").get("state")
        service.stop()
    finally:
        proxy.close()
        receiver.close()
    return {"converged_ms": (max(called, answered, healthy) - back) * 1000, "state": state,
            "detail": "Engine back -> /healthz 200 (%.0f ms), callback (%s) and v2 answering"
                      % ((healthy - back) * 1000, state)}


FAULTS = [
    ("Engine away 5 s mid-gate (engine_wait 2 s)", fault_engine_away),
] + [("kill -9 at step %s" % step, lambda rig, step=step: fault_crash_at(rig, step))
     for step in CRASH_STEPS] + [
    ("journal on a full 1 MiB disk", fault_full_disk),
    ("callback host stalled, 8 posts", lambda rig: fault_stalled_host(rig, 8)),
    ("callback host stalled, 20 posts", lambda rig: fault_stalled_host(rig, 20)),
    ("callback retry across SIGTERM", lambda rig: fault_retry_across_restart(rig, "term")),
    ("callback retry across kill -9", lambda rig: fault_retry_across_restart(rig, "kill")),
]


def polling_cost(rig: FaultRig, seconds: float = 10.0, heads: int = 50) -> Dict[str, Any]:
    """An app polling every second: the service's CPU per poll (over
    `seconds`, idle otherwise), one HEAD's latency from a client of our own,
    and from a re-push of the followed tag to the app answering the new
    version (converged_ms), with no webhook."""
    import dockerapi
    from tests import support
    receiver = support.CallbackReceiver()
    try:
        container, app_port = rig.app("polled")
        service = rig.service("polled", container, receiver.port, app_lines="poll = 1s")
        service.launch()
        service.wait_answer()
        time.sleep(3)  # past start-up and the first polls
        cpu_before = proc_cpu_seconds(service.process.pid)
        time.sleep(seconds)
        cpu_per_poll_ms = (proc_cpu_seconds(service.process.pid) - cpu_before) / seconds * 1000
        client, times = dockerapi.RegistryClient(), []
        for _ in range(heads):
            started = time.perf_counter()
            client.manifest_digest(rig.image, "v1", None)
            times.append((time.perf_counter() - started) * 1000)
        # The followed tag (v1) now names v2's image: the next poll deploys it.
        support.docker("tag", rig.image + ":v2", rig.image + ":v1")
        support.docker("push", rig.image + ":v1")
        pushed = time.monotonic()
        answered, _ = wait_for_version(app_port, b"v2\n", pushed, timeout=60)
        service.stop()
    finally:
        receiver.close()
    return {"converged_ms": (answered - pushed) * 1000, "cpu_per_poll_ms": cpu_per_poll_ms,
            "head_ms": median(times),
            "detail": "re-push of the followed tag -> the new version answering (poll = 1s); "
                      "service CPU %.2f ms per poll; one HEAD %.1f ms (median of %d)"
                      % (cpu_per_poll_ms, median(times), heads)}


POLLING = [("poll every 1 s, a re-pushed tag", polling_cost)]


def choose_program(args: argparse.Namespace, folder: str) -> str:
    """Set what the services run (--script: autodeploy.py; else the zipapp
    built in `folder`, as the unit runs it); that, in words."""
    if args.script:
        INTERPRETER[:] = [sys.executable]
        return "%s autodeploy.py --config X serve" % sys.executable
    INTERPRETER[:] = unit_interpreter(args.python)
    PROGRAM[0] = build_pyz(folder)
    return "%s autodeploy.pyz --config X serve (as autodeploy.service runs it)" % " ".join(INTERPRETER)


def run_faults(args: argparse.Namespace, state: Dict[str, Any]) -> Dict[str, Any]:
    """Each scenario of FAULTS (or POLLING, with --polling) once, on the
    service as bench() runs it."""
    from tests import support
    import dockerapi
    env = service_env()
    results = {"machine": machine_info(dockerapi.DockerClient(env["DOCKER_HOST"])),
               "code": code_version(), "faults": []}  # type: Dict[str, Any]
    run = support.run_id()
    folder = state["folder"] = tempfile.mkdtemp(prefix="autodeploy-bench-")
    results["program"] = choose_program(args, folder)
    registry = state["registry"] = support.Registry().start()
    image = "%s/bench/web" % registry.host
    for version in ("v1", "v2"):
        push_bench_image(state, "%s:%s" % (image, version), version)
    rig = FaultRig(folder, env, image, run, state)
    for name, scenario in (POLLING if args.polling else FAULTS):
        log("fault: %s" % name)
        try:
            outcome = scenario(rig)
        except BenchError as exc:
            log("fault %s: %s" % (name, exc))
            outcome = {"error": str(exc)}
        outcome["fault"] = name
        results["faults"].append(outcome)
    return results


def push_bench_image(state: Dict[str, Any], ref: str, version: str, **image: Any) -> None:
    """Build and push the bench's app image `ref` (APP_CMD on APP_PORT_IN_CONTAINER);
    it and its id are noted in state["images"], for the clean-up at the end."""
    from tests import support
    state["images"].append(ref)
    state["images"].append(support.make_image(ref, version, cmd=APP_CMD, port=APP_PORT_IN_CONTAINER,
                                              **image))


def faults_report(results: Dict[str, Any]) -> str:
    m = results["machine"]
    out = ["autodeploy faults: time to convergence",
           "machine: nproc %s, %s, %s, kernel %s" % (m["nproc"], m["python"], m["engine"], m["kernel"]),
           "code: %s" % results["code"], "service: %s" % results["program"], ""]
    width = max(len(f["fault"]) for f in results["faults"])
    for fault in results["faults"]:
        if "error" in fault:
            out.append("%-*s  not measured: %s" % (width, fault["fault"], fault["error"]))
        else:
            out.append("%-*s  %7.0f ms  %s" % (width, fault["fault"], fault["converged_ms"], fault["detail"]))
    return "\n".join(out)


def bench(args: argparse.Namespace, state: Dict[str, Any]) -> Dict[str, Any]:
    from tests import support
    import dockerapi

    results = {"targets": TARGETS}  # type: Dict[str, Any]
    env = service_env()
    engine = dockerapi.DockerClient(env["DOCKER_HOST"])
    results["machine"] = machine_info(engine)
    results["code"] = code_version()
    engine.api_version  # negotiated now, not inside a timed floor deploy

    wrk = shutil.which("wrk")
    client = args.client
    if client == "auto":
        client = "wrk" if wrk else "own"
    if client == "wrk" and not wrk:
        raise BenchError("--client wrk, but wrk is not installed (apt-get install wrk)")
    results["client"] = (wrk_version(wrk) + " (-t1 -c1, -t2 -c8)" if client == "wrk"
                         else "own (a process per keep-alive connection, raw sockets)")

    run = support.run_id()
    folder = state["folder"] = tempfile.mkdtemp(prefix="autodeploy-bench-")
    log("run %s, temp folder %s, load client %s" % (run, folder, results["client"]))

    results["program"] = choose_program(args, folder)

    registry = state["registry"] = support.Registry().start()
    image = "%s/bench/web" % registry.host
    for version in ("v1", "v2"):
        push_bench_image(state, "%s:%s" % (image, version), version, labels={support.TEST_LABEL: run})
        if args.downtime_runs:
            push_bench_image(state, "%s/bench/healthy:%s" % (registry.host, version), version,
                             labels={support.TEST_LABEL: run}, healthcheck=HEALTHCHECK)
    log("images pushed to %s" % registry.host)

    receiver = state["receiver"] = CallbackReceiver()
    app_port = free_port()

    def config_for_port(port: int) -> str:
        return service_config(port, receiver.port, registry.host, run, app_port,
                              os.path.join(folder, "state"))

    # 3. Launch to first answer (first, while the machine is quiet).
    log("launch to first answer, %d launches" % args.launches)
    results["launch"] = measure_launch(folder, config_for_port, env, args.launches)

    # 2. RSS after start-up.
    port = free_port()
    service = state["service"] = ServiceProcess(folder, config_for_port(port), port, env)
    service.launch()
    service.wait_answer()
    time.sleep(1.0)
    results["rss_startup"] = proc_status(service.process.pid)

    # The apps' first containers, through the service itself.
    for repo, tag, name in (("bench/idle", "v1", "first-idle"), ("bench/web", "v1", "first-web")):
        status, answer = http_post(port, "/deploy/" + TOKEN, hub_payload(repo, tag, receiver.url(name)))
        if status != 202:
            raise BenchError("first deploy of %s answered %s: %s" % (repo, status, answer))
        done = receiver.wait_for(name, timeout=120)
        if done.get("state") != "success":
            raise BenchError("first deploy of %s failed: %s" % (repo, done))
    wait_for_version(app_port, b"v1\n", time.monotonic(), timeout=30)
    floor_name = "bench-floor-%s" % run
    floor_port = free_port()
    floor_id = engine.create_container(floor_create_body(image + ":v1", floor_port, run), floor_name)
    engine.start_container(floor_id)
    wait_for_version(floor_port, b"v1\n", time.monotonic(), timeout=30)

    # 1. Webhook acks for the up-to-date app.
    callback = receiver.url("load") if args.callbacks == "local" else None
    body = hub_payload("bench/idle", "v1", callback)
    status, answer = http_post(port, "/deploy/" + TOKEN, body)
    if status != 202:
        raise BenchError("the load's webhook answered %s, not 202: %s" % (status, answer))
    wait_settled(receiver)
    callbacks_before = receiver.counts["/cb/load"]
    log_before = service.log_text().count("repo=bench/idle up_to_date:")
    queued_before = service.log_text().count("repo=bench/idle queued ")
    cpu_before = proc_cpu_seconds(service.process.pid)
    results["acks"] = []
    for clients in (1, 8):
        log("acks: %d keep-alive client(s), %.0f s + %.0f s warm-up, client %s"
            % (clients, args.seconds, args.warmup, client))
        results["acks"].append(measure_acks(client, wrk, folder, service, body, clients,
                                            args.seconds, args.warmup))
    log("acks under attack: 8 keep-alive clients while each attack on the listener runs")
    results["under_attack"] = measure_under_attack(client, wrk, folder, service, body,
                                                   args.seconds, args.warmup)
    log("acks without the journal: 8 keep-alive clients, a second service with journal = no")
    results["acks_no_journal"] = measure_without_journal(client, wrk, folder, config_for_port, env, body,
                                                         args.seconds, args.warmup)
    sent = sum(level["requests"] for level in results["acks"])
    wait_settled(receiver, quiet=1.0, timeout=30)
    time.sleep(1.0)
    results["rss_after_load"] = proc_status(service.process.pid)
    results["jobs_during_load"] = {
        "up_to_date_runs": service.log_text().count("repo=bench/idle up_to_date:") - log_before,
        "callbacks_received": receiver.counts["/cb/load"] - callbacks_before,
        "jobs_accepted": service.log_text().count("repo=bench/idle queued ") - queued_before,
        "acks_measured": sent,
        "service_cpu_s_total": proc_cpu_seconds(service.process.pid) - cpu_before,
    }

    # 4. Redeploys through the service, and the raw Engine floor, interleaved.
    results["deploy"] = {"service": [], "floor": []}
    for n in range(args.deploys):
        tag = redeploy_tag(n)
        log("redeploy %d/%d to %s: service, then raw floor" % (n + 1, args.deploys, tag))
        results["deploy"]["service"].append(service_redeploy(service, receiver, app_port, tag, n))
        time.sleep(0.3)
        results["deploy"]["floor"].append(floor_redeploy(engine, floor_name, image, tag, floor_port, run, n))
        time.sleep(0.3)

    # 5. Downtime during a deploy, and what the health gate costs beyond the settle time.
    if args.downtime_runs:
        results["downtime"] = measure_downtime(engine, service, receiver, {"web": app_port, "floor": floor_port},
                                               image, run, args.downtime_runs, args.deploys, state)
    results["gate_overhead"] = {
        "settle_s": SETTLE,
        "stop_first_ms": gate_overheads(results["deploy"]["service"], SETTLE),
        "start_first_ms": gate_overheads(results.get("downtime", {}).get("start_first", []), SETTLE),
    }

    if args.recovery_runs:
        log("recovery after kill -9 mid-swap, %d runs" % args.recovery_runs)
        results["recovery"] = measure_recovery(folder, receiver, registry.host, env, run,
                                               args.recovery_runs, state)

    if args.profile:
        log("profiling the service under 8 clients")
        results["profile"] = run_profile(client, wrk, folder, config_for_port, env, body, args.seconds,
                                         args.profile)
    return results


def keep_logs(state: Dict[str, Any]) -> None:
    """Copy the service logs to --keep-logs DIR before the temp folder goes."""
    if not state.get("keep_logs") or not state.get("folder"):
        return
    os.makedirs(state["keep_logs"], exist_ok=True)
    for name in sorted(os.listdir(state["folder"])):
        if name.endswith((".log", ".conf", ".pstats")):
            shutil.copy(os.path.join(state["folder"], name), state["keep_logs"])


def cleanup(state: Dict[str, Any]) -> None:
    """Everything the run created, in dependency order; never raises."""
    from tests import support
    steps = [
        ("service", lambda: state["service"] and state["service"].stop()),
        ("recovery service", lambda: state.get("recovery") and state["recovery"].stop()),
        ("fault services", lambda: [service.stop() for service in state.get("faults", [])]),
        ("callback receiver", lambda: state["receiver"] and state["receiver"].close()),
        ("containers", lambda: support.cleanup_containers(support.run_id())),
        ("networks", lambda: [support.docker("network", "rm", name, check=False) for name in state["networks"]]),
        ("images", lambda: support.cleanup_images(state["images"])),
        ("registry", lambda: state["registry"] and state["registry"].stop()),
        ("logs", lambda: keep_logs(state)),
        ("temp folder", lambda: state["folder"] and shutil.rmtree(state["folder"], ignore_errors=True)),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # keep cleaning
            log("cleanup of %s failed: %r" % (what, exc))


############################################################################
# Report
############################################################################

def verdict(ok: Optional[bool]) -> str:
    return "" if ok is None else ("yes" if ok else "NO")


def runs_cell(values: List[float], unit: str = " ms") -> str:
    """'12 15 11 ms', or '-' when there are none."""
    return " ".join("%.0f" % v for v in values) + unit if values else "-"


def downtime_rows(results: Dict[str, Any]) -> List[Tuple[str, str, str, str]]:
    """The table's downtime and health gate lines."""
    rows = []  # type: List[Tuple[str, str, str, str]]
    down = results.get("downtime")
    if not down:
        rows.append(("downtime during a deploy", "skipped (--downtime-runs 0)", "", ""))
    else:
        for key, label in (("stop_first", "stop-first via the service"), ("floor", "raw floor (stop old, start new)"),
                           ("start_first", "start-first via the service")):
            gaps = [r["longest_gap_ms"] for r in down[key]]
            rows.append(("downtime, %s, med of %d" % (label, len(gaps)), "%.0f ms" % median(gaps), "", ""))
            if key == "start_first":  # its client retries once, as a reverse proxy does
                label, failed = "  runs; failed requests (retried)", " ".join(
                    "%d(%d)" % (r["failed_requests"], r["retried"]) for r in down[key])
            else:
                label, failed = "  runs; failed requests (stalled 1 s)", " ".join(
                    "%d(%d)" % (r["failed_requests"], r["stalled_requests"]) for r in down[key])
            rows.append((label, "%s; %s" % (runs_cell(gaps), failed), "", ""))
        rows.append(("  usual gap: stop-first; floor; start-first", "%.0f; %.0f; %.0f ms" % tuple(
            median([r["median_gap_ms"] for r in down[key]]) for key in ("stop_first", "floor", "start_first")),
            "", ""))
    gate = results["gate_overhead"]
    rows.append(("health gate overhead: started -> old removed - settle %gs" % gate["settle_s"],
                 "%.0f ms" % median(gate["stop_first_ms"]), "", ""))
    rows.append(("  runs: stop-first; start-first", "%s; %s" % (
        runs_cell(gate["stop_first_ms"]), runs_cell(gate["start_first_ms"])), "", ""))
    if down:
        healthy = [r["healthy_to_removed_ms"] for r in down["healthcheck"]]
        rows.append(("HEALTHCHECK healthy event -> old removed, med of %d" % len(healthy),
                     "%.0f ms" % median(healthy), "", ""))
        rows.append(("  runs; to job done (+ old image removed)", "%s; %s" % (
            runs_cell(healthy), runs_cell([r["healthy_to_done_ms"] for r in down["healthcheck"]])), "", ""))
    return rows


def journal_and_recovery_rows(results: Dict[str, Any]) -> List[Tuple[str, str, str, str]]:
    rows = []
    off = results["acks_no_journal"]
    on = [level for level in results["acks"] if level["clients"] == 8][0]
    rows.append(("acks/s, 8 clients, journal = no", "%.0f /s (journal on: %.0f, %+.0f%%)" % (
        off["acks_per_s"], on["acks_per_s"], 100.0 * (on["acks_per_s"] / off["acks_per_s"] - 1)), "", ""))
    rows.append(("  latency p50 / p99 (max), journal = no", "%.2f / %.2f ms (%.1f)" % (
        off["p50_ms"], off["p99_ms"], off["max_ms"]), "", ""))
    rows.append(("  journal cost per webhook (1/on - 1/off)", "%.0f us" % (
        1e6 / on["acks_per_s"] - 1e6 / off["acks_per_s"]), "", ""))
    attacked = results.get("under_attack") or {}
    for name in ATTACKS:
        if name in attacked:
            level = attacked[name]
            share = level["acks_per_s"] / on["acks_per_s"]
            slots = name != "huge headers"  # that one's target is memory (below), not the rate
            rows.append(("acks/s, 8 clients, under attack: " + name, "%.0f /s (%.0f%% of normal), p99 %.2f ms"
                         % (level["acks_per_s"], 100 * share, level["p99_ms"]), ">= 50%" if slots else "",
                         ("yes" if share >= 0.5 else "NO") if slots else ""))
    if attacked.get("peak_rss_kib"):
        peak = attacked["peak_rss_kib"] / 1024.0
        rows.append(("  peak RSS through the attacks (VmHWM)", "%.1f MiB" % peak, "< 64 MiB",
                     "yes" if peak < 64 else "NO"))
    runs = results.get("recovery")
    if runs:
        rows.append(("kill -9 mid-swap, restart -> first answer", "%.0f ms (median of %d)" % (
            median([r["answer_ms"] for r in runs]), len(runs)), "", ""))
        rows.append(("  restart -> job final, callback received", "%.0f ms (settle %d s inside)" % (
            median([r["final_ms"] for r in runs]), SETTLE), "", ""))
        rows.append(("  outcomes", " ".join(r["state"] or "?" for r in runs), "all success",
                     verdict(all(r["state"] == "success" for r in runs))))
    return rows


def downtime_steps(results: Dict[str, Any]) -> List[str]:
    """Where the longest gaps lie next to the deploy steps: medians of ms after t0."""
    down = results.get("downtime")
    if not down:
        return []
    names = ["gap from", "gap to", "stopped", "started", "job done"]
    out = ["", "downtime: longest gap and deploy steps, median ms after t0 (service: after the POST;"
               " floor: before the pull):", "  %-11s" % "" + "".join("%11s" % n for n in names)]
    for key in ("stop_first", "floor", "start_first"):
        cells = []
        for name in names:
            field = {"gap from": "gap_from_ms", "gap to": "gap_to_ms"}.get(name)
            values = [r[field] if field else r["marks"].get(name) for r in down[key]]
            values = [v for v in values if v is not None]
            cells.append("%11s" % ("%.0f" % median(values) if values else "-"))
        out.append("  %-11s" % key.replace("_", "-") + "".join(cells))
    out.append("  (start-first 'stopped' is the old container's, after the gate; requests time out after"
               " %.0f s; the bench polls every %.0f ms, the start-first client sleeps %.0f ms between"
               " requests)" % (POLL_TIMEOUT, POLL_INTERVAL * 1000, POLL_INTERVAL * 1000))
    return out


def report(results: Dict[str, Any]) -> str:
    m = results["machine"]
    rows = []  # type: List[Tuple[str, str, str, str]]
    for level in results["acks"]:
        c = level["clients"]
        eight = c == 8
        rows.append(("acks/s, %d keep-alive client%s" % (c, "s" if c > 1 else ""),
                     "%.0f /s" % level["acks_per_s"],
                     ">= %.0f /s" % TARGETS["acks_per_s_8"] if eight else "",
                     verdict(level["acks_per_s"] >= TARGETS["acks_per_s_8"]) if eight else ""))
        rows.append(("  latency p50 / p99 (max)", "%.2f / %.2f ms (%.1f)" % (
            level["p50_ms"], level["p99_ms"], level["max_ms"]),
            "p99 < %.0f ms" % TARGETS["p99_ms_8"] if eight else "",
            verdict(level["p99_ms"] < TARGETS["p99_ms_8"]) if eight else ""))
        rows.append(("  requests; not 202 (non-2xx); socket errors", "%d; %d (%d); %d" % (
            level["requests"], level["not_202"], level["non_2xx"], level["socket_errors"]), "all 202",
            verdict(level["not_202"] == 0 and level["socket_errors"] == 0)))
        cores = level["cpu_cores"]
        rows.append(("  CPU busy, whole machine", "%.0f%% of %d cores" % (
            level["machine_cpu_pct"], m["nproc"]), "", ""))
        rows.append(("  cores: service; client; Engine+registry; bench", "%.2f; %.2f; %.2f; %.2f" % (
            cores["service"], cores["client"], cores["docker_registry"], cores["bench_receiver"]), "", ""))
    jobs = results["jobs_during_load"]
    rows.append(("jobs accepted in the load (warm-ups too)", "%d" % jobs["jobs_accepted"], "", ""))
    rows.append(("  of which run (the rest coalesced)", "%d" % jobs["up_to_date_runs"], "", ""))
    if results["callbacks"].startswith("callback_url"):
        rows.append(("  callbacks received (of jobs accepted)", "%d (%.0f%%)" % (
            jobs["callbacks_received"], 100.0 * jobs["callbacks_received"] / max(1, jobs["jobs_accepted"])),
            "", ""))
    for key, label in (("rss_startup", "RSS idle after start-up"), ("rss_after_load", "RSS idle after load")):
        rss = results[key]["VmRSS"] / 1024
        rows.append((label, "%.1f MiB (%d threads)" % (rss, results[key]["Threads"]),
                     "< %.0f MiB" % TARGETS["rss_idle_mib"], verdict(rss < TARGETS["rss_idle_mib"])))
    launch = results["launch"]
    rows.append(("  peak RSS (VmHWM) over the run", "%.1f MiB" % (results["rss_after_load"]["VmHWM"] / 1024), "", ""))
    rows.append(("  RSS of python3 -c pass; -c 'import autodeploy'", "%.1f; %.1f MiB" % (
        launch["python_bare_rss_kb"] / 1024, launch["python_import_autodeploy_rss_kb"] / 1024), "", ""))
    rows.append(("launch to first answer, median of %d" % len(launch["runs_ms"]), "%.0f ms" % launch["median_ms"],
                 "< %.0f ms" % TARGETS["launch_ms"], verdict(launch["median_ms"] < TARGETS["launch_ms"])))
    rows.append(("  runs", " ".join("%.0f" % t for t in launch["runs_ms"]) + " ms", "", ""))
    rows.append(("  run time of python3 -c pass; -c 'import ...'", "%.0f; %.0f ms" % (
        launch["python_bare_ms"], launch["python_import_autodeploy_ms"]), "", ""))
    service = [d["ms"] for d in results["deploy"]["service"]]
    floor = [d["ms"] for d in results["deploy"]["floor"]]
    ratio = median(service) / median(floor) if floor else float("nan")
    rows.append(("webhook -> new version answering, med of %d" % len(service), "%.0f ms" % median(service), "", ""))
    rows.append(("  runs", " ".join("%.0f" % t for t in service) + " ms", "", ""))
    rows.append(("raw Engine floor, median of %d" % len(floor), "%.0f ms" % median(floor), "", ""))
    rows.append(("  runs", " ".join("%.0f" % t for t in floor) + " ms", "", ""))
    rows.append(("deploy time / raw floor", "%.2fx" % ratio, "<= %.1fx" % TARGETS["deploy_ratio"],
                 verdict(ratio <= TARGETS["deploy_ratio"])))
    rows += downtime_rows(results)
    rows += journal_and_recovery_rows(results)

    widths = [max(len(r[i]) for r in rows + [("metric", "value", "target", "ok")]) for i in range(4)]
    line = "  ".join("%%-%ds" % w for w in widths)
    out = ["autodeploy benchmark",
           "machine: nproc %s, %s, %s, kernel %s" % (m["nproc"], m["python"], m["engine"], m["kernel"]),
           "code: %s" % results["code"],
           "service: %s" % results["program"],
           "load client: %s; callbacks: %s" % (results["client"], results["callbacks"]),
           "", line % ("metric", "value", "target", "ok"), line % tuple("-" * w for w in widths)]
    out += [(line % row).rstrip() for row in rows]

    # Where the deploy time goes: medians of ms after the POST / the first call.
    names = ["job started", "renamed", "created", "stopped", "started", "answering", "removed", "job done"]
    out += ["", "deploy steps, median ms after t0 (service: after the POST; floor: before the pull):",
            "  %-8s" % "" + "".join("%12s" % n for n in names)]
    for who in ("service", "floor"):
        cells = []
        for name in names:
            values = [d["marks"][name] for d in results["deploy"][who] if name in d["marks"]]
            cells.append("%12s" % ("%.0f" % median(values) if values else "-"))
        out.append("  %-8s" % who + "".join(cells))
    out.append("  (service marks come from its log, to the millisecond; floor 'renamed' follows"
               " pull + 3 inspects, as the service's does)")
    out += downtime_steps(results)
    if results.get("profile"):
        out += ["", "cProfile of the service under 8 clients (all its threads merged):", results["profile"]]
    return "\n".join(out)


# The in-process harness `--instructions` runs under callgrind: a service
# built as serve builds it (no Engine), one keep-alive connection, COUNT
# pipelined webhooks for one app (each with a callback_url, as the load's).
INSTRUCTIONS_HARNESS = r"""
import logging, os, socket, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
import autodeploy
count, journal = int(sys.argv[2]), sys.argv[3]
logging.basicConfig(level="INFO", stream=open(os.devnull, "w"), format="%(asctime)s %(levelname)s %(message)s")
logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
folder, token = tempfile.mkdtemp(), "x" * 40
with open(folder + "/c.conf", "w") as fh:
    fh.write("[autodeploy]\nlisten = 127.0.0.1:0\ntoken = %s\nstate_dir = %s/state\njournal = %s\n"
             "docker_host = unix:///nonexistent.sock\ncallback_allow = http://127.0.0.1:9\n"
             "[bench/app]\ncontainer = app\ncooldown = 30\n" % (token, folder, journal))
config = autodeploy.load_config(folder + "/c.conf")
server = autodeploy.WebhookServer(("127.0.0.1", 0), autodeploy.build_service(config, autodeploy.make_engine(config)))
body = b'{"repository": {"repo_name": "bench/app"}, "push_data": {"tag": "latest"}, "callback_url": "http://127.0.0.1:9/cb"}'
request = (b"POST /deploy/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (token.encode(), len(body), body))
listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
served, _ = listener.accept()
def feed():
    client.sendall(request * count)
    client.shutdown(socket.SHUT_WR)
def drain():
    while client.recv(65536):
        pass
threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
for thread in threads:
    thread.start()
server.finish_request(served, ("127.0.0.1", 1))
served.close()
for thread in threads:
    thread.join()
"""


def measure_instructions(count: int, python: str) -> int:
    """CPU instructions per accepted webhook (callgrind: the same count on a
    busy machine as on an idle one), with the journal on and off: the
    difference between COUNT webhooks and one, divided by COUNT - 1."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("bench: --instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for journal in ("yes", "no"):
        totals = []
        for n in (1, count):
            run = subprocess.run([valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
                                  python, "-c", INSTRUCTIONS_HARNESS, root, str(n), journal],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 universal_newlines=True, timeout=1800)
            totals.append(int(re.search(r"Collected : (\d+)", run.stderr).group(1)))
        print("instructions per accepted webhook, journal = %s: %.1fk (%s, %d webhooks)"
              % (journal, (totals[1] - totals[0]) / (count - 1) / 1000.0, python, count))
    return 0


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tests/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per load level (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per load level (default 1)")
    parser.add_argument("--deploys", type=int, default=5, help="redeploys timed, each way (default 5)")
    parser.add_argument("--launches", type=int, default=5, help="launches timed (default 5)")
    parser.add_argument("--downtime-runs", type=int, default=3, metavar="N",
                        help="deploys per downtime measurement (stop-first, raw floor, start-first, "
                             "HEALTHCHECK gate; default 3, 0 skips them)")
    parser.add_argument("--recovery-runs", type=int, default=3, metavar="N",
                        help="kill -9 mid-swap and restart, N times (default 3, 0 skips it)")
    parser.add_argument("--polling", action="store_true",
                        help="only measure polling: CPU per poll, a HEAD's latency, a re-pushed "
                             "tag deployed by a poll")
    parser.add_argument("--faults", action="store_true",
                        help="only run the fault scenarios (FAULTS: a full journal disk, a stalled "
                             "callback host, callback retries across a restart, ...) and print each "
                             "one's time to convergence")
    parser.add_argument("--client", choices=("auto", "wrk", "own"), default="auto",
                        help="load client: wrk when installed (auto), or the bench's own")
    parser.add_argument("--callbacks", choices=("local", "omit"), default="local",
                        help="load payloads carry a callback_url to a local receiver (default), "
                             "or none")
    parser.add_argument("--python", metavar="PATH",
                        help="interpreter for the service (default: the one autodeploy.service names, "
                             "else this one), run with the unit's flags")
    parser.add_argument("--script", action="store_true",
                        help="run autodeploy.py with this interpreter, not the zipapp as the unit runs it")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="copy the service logs, configs and profile to DIR before cleaning up")
    parser.add_argument("--instructions", type=int, metavar="COUNT",
                        help="only count CPU instructions per accepted webhook under callgrind "
                             "(COUNT webhooks in-process, no Engine; 3000 takes about 2 min)")
    parser.add_argument("--profile", nargs="?", const="cpu", choices=("cpu", "wall"),
                        help="also profile the service under 8 clients with cProfile (Python <= 3.11), "
                             "counting per-thread CPU time (cpu, the default) or elapsed time (wall)")
    parser.add_argument("--_client-worker", dest="client_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_profiled-service", dest="profiled_service", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be 1..600 and --warmup 0..60")
    if not 1 <= args.deploys <= 100 or not 1 <= args.launches <= 100:
        parser.error("--deploys and --launches must be 1..100")
    if not 0 <= args.downtime_runs <= 50 or not 0 <= args.recovery_runs <= 20:
        parser.error("--downtime-runs must be 0..50, --recovery-runs 0..20")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.client_worker:
        return client_worker(json.loads(args.client_worker))
    if args.profiled_service:
        return profiled_service(*args.profiled_service)
    if args.instructions:
        return measure_instructions(args.instructions, "/usr/bin/python3"
                                    if os.path.exists("/usr/bin/python3") else sys.executable)

    import unittest
    state = {"service": None, "receiver": None, "registry": None, "folder": None, "faults": [],
             "images": [], "networks": [], "keep_logs": args.keep_logs}  # type: Dict[str, Any]

    def terminated(*_: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminated)
    # Ctrl-C cleans up even when started with SIGINT ignored (e.g. `cmd &` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        if args.faults or args.polling:
            results = run_faults(args, state)
        else:
            results = bench(args, state)
            results["callbacks"] = ("callback_url to a local receiver" if args.callbacks == "local"
                                    else "no callback_url")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    except (BenchError, unittest.SkipTest, RuntimeError, AssertionError) as exc:
        log("failed: %s" % exc)
        if state.get("service") is not None:
            log("service log tail:\n" + state["service"].log_tail())
        return 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("cleaning up")
        cleanup(state)
        signal.signal(signal.SIGINT, previous)
    results["total_seconds"] = time.monotonic() - started
    if args.faults or args.polling:
        print(faults_report(results))
        print("\ntotal bench time %.0f s" % results["total_seconds"])
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2, sort_keys=True, default=str)
        return 0
    print(report(results))
    print("\ntotal bench time %.0f s" % results["total_seconds"])
    if args.json:
        for level in results["acks"] + [results["acks_no_journal"]]:
            level.pop("wrk_output", None)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, sort_keys=True, default=str)
        print("results written to %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
