"""Helpers for end-to-end tests against a real Docker Engine and registry.

Everything here is lazy: importing this module starts no process and opens
no socket, so unit tests can import it freely.  The first call that needs
Docker goes through `engine_env()`, which finds (or installs and starts) an
engine and caches the answer for the rest of the process.

When no engine can be had, tests are skipped -- except under CI
(CI=true), where a missing engine is a failure, so that a broken
environment can never pass as "everything skipped".

Only the standard library is used, and the code runs on Python 3.8+.
"""

import glob
import http.client
import http.server
import io
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from typing import Any, Dict, Iterable, List, Optional, Tuple

# Label put on every container a test creates, so cleanup can find exactly
# those and nothing else: --label autodeploy.test=<run_id()>.
TEST_LABEL = "autodeploy.test"

# The engine that the host may already run.
SYSTEM_SOCKET = "/var/run/docker.sock"

# Where we keep our own engine when the host has none.  It lives outside
# /tmp and outside the test process so later runs can reuse it.
RUN_DIR = "/run/autodeploy-tests"
OWN_SOCKET = RUN_DIR + "/docker.sock"
OWN_PIDFILE = RUN_DIR + "/docker.pid"
OWN_EXEC_ROOT = RUN_DIR + "/exec"
OWN_LOG = RUN_DIR + "/dockerd.log"
OWN_DATA_ROOT = "/var/lib/autodeploy-tests/docker"
OWN_START_TIMEOUT = 60.0

# Which engine the end-to-end tests run against: AUTODEPLOY_TEST_ENGINE=
# docker (the default) or podman.  Podman always runs as our own service on
# a socket of its own, so it never disturbs (or depends on) a host's Podman.
ENGINE = os.environ.get("AUTODEPLOY_TEST_ENGINE", "docker").strip().lower() or "docker"
PODMAN_SOCKET = RUN_DIR + "/podman.sock"
PODMAN_RUN_DIR = RUN_DIR + "/podman"  # its --runroot, pidfile, log and config files
PODMAN_PIDFILE = PODMAN_RUN_DIR + "/podman.pid"
PODMAN_LOG = PODMAN_RUN_DIR + "/podman.log"
PODMAN_DATA_ROOT = "/var/lib/autodeploy-tests/podman"

# Statically linked busybox (Debian's busybox-static): the only binary in
# the test images, so it must not need a dynamic loader.
BUSYBOX = "/bin/busybox"

# Applets linked into the test images' /bin.
BUSYBOX_APPLETS = (
    "sh", "httpd", "cat", "echo", "sleep", "ls", "wget", "nc", "true",
    "false", "test", "env", "id", "mkdir", "touch", "rm", "kill",
    "ps", "grep", "printf", "head", "hostname", "date",
    "nslookup", "awk", "tail", "seq",
)

# Fixed mtime for files in test images: identical content gives an
# identical layer, so images of the same version share it.
_IMAGE_MTIME = 1_000_000_000

# urllib honours http_proxy & co. by default; test traffic must stay on
# this machine, so never use a proxy.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Unavailable(Exception):
    """No usable Docker Engine (or tool) could be had; the text says why."""


# ---------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def run_id() -> str:
    """A short random hex id for this test process, used to label things."""
    return secrets.token_hex(4)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0,
              expect_body: Optional[str] = None) -> str:
    """Poll `url` every 0.1 s until it answers 2xx; return the body.

    With `expect_body`, keep polling until the body equals it (useful while
    a deployment switches versions).  On timeout raise AssertionError
    naming the last error or the last body seen.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        try:
            with _NO_PROXY_OPENER.open(url, timeout=max(0.5, min(5.0, remaining))) as resp:
                body = resp.read().decode("utf-8", "replace")
            if expect_body is None or body == expect_body:
                return body
            last = "body %r, expected %r" % (body, expect_body)
        except urllib.error.HTTPError as exc:
            last = "HTTP %s: %r" % (exc.code, exc.read()[:200])
        except (OSError, http.client.HTTPException) as exc:
            last = "%s: %s" % (type(exc).__name__, exc)
        if time.monotonic() >= deadline:
            raise AssertionError("%s not ready after %.1fs: %s" % (url, timeout, last))
        time.sleep(0.1)


def _fail(reason: str):
    """Skip the test -- or, under CI, fail it: CI must not pass by skipping."""
    if os.environ.get("CI") == "true":
        raise RuntimeError(reason)
    raise unittest.SkipTest(reason)


def _tail(path: str, lines: int = 20) -> str:
    """Last lines of a log file, for error messages."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError as exc:
        return "(no log: %s)" % exc


def _which(name: str) -> Optional[str]:
    """shutil.which, also looking in the sbin folders a CI PATH may lack."""
    extra = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + extra)


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------------------
# Finding a Docker Engine
# ---------------------------------------------------------------------------

def _ping(socket_path: str, timeout: float = 2.0) -> bool:
    """True if a Docker Engine answers GET /_ping with 200 OK on this socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            # HTTP/1.0: the engine closes the connection after answering,
            # so reading to EOF gives the whole reply.
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    head, _, body = reply.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    return len(status) >= 2 and status[1] == b"200" and body.strip() == b"OK"


def _running_engine() -> Optional[str]:
    """DOCKER_HOST of an engine that is already up, or None."""
    configured = os.environ.get("DOCKER_HOST", "")
    # Only unix sockets are supported; anything else falls through.
    if configured.startswith("unix://") and _ping(configured[len("unix://"):]):
        return configured
    if _ping(SYSTEM_SOCKET):
        return "unix://" + SYSTEM_SOCKET
    return None


_engine_result = None  # ("ok", DOCKER_HOST) or ("error", reason), once known


def engine_env() -> Dict[str, str]:
    """Return a copy of os.environ with DOCKER_HOST naming a working engine.

    Tries, in order: $DOCKER_HOST (unix:// only), /var/run/docker.sock, and
    finally (as root) an engine of our own on /run/autodeploy-tests, after
    installing whatever packages are missing.  The outcome -- success or
    failure -- is cached for the process, so a missing engine costs the
    wait only once.  Without an engine, raises unittest.SkipTest, or
    RuntimeError when CI=true.
    """
    global _engine_result
    if _engine_result is None:
        try:
            _engine_result = ("ok", _find_or_start_engine())
        except _Unavailable as exc:
            _engine_result = ("error", str(exc))
    kind, value = _engine_result
    if kind == "error":
        _fail(value)
    env = dict(os.environ)
    env["DOCKER_HOST"] = value
    env.pop("DOCKER_CONTEXT", None)  # would conflict with DOCKER_HOST
    return env


def is_podman() -> bool:
    """True when this run's tests go to Podman (AUTODEPLOY_TEST_ENGINE=podman)."""
    return ENGINE == "podman"


def skip_on_podman(reason: str):
    """Decorator: skip a test (or class) on Podman, saying why -- a check
    that only means something on Docker must say so, never pass silently."""
    return unittest.skipIf(is_podman(), "not on Podman: " + reason)


def _find_or_start_engine() -> str:
    """Make sure the tools exist and an engine runs; return its DOCKER_HOST."""
    if ENGINE not in ("docker", "podman"):
        raise _Unavailable("AUTODEPLOY_TEST_ENGINE=%s: expected docker or podman" % ENGINE)
    if is_podman():
        _ensure_tools(need_daemon=False, podman=True)
        return _start_own_podman()
    host = _running_engine()
    _ensure_tools(need_daemon=host is None)
    if host is None:
        host = _start_own_engine()
    return host


def _start_own_engine() -> str:
    """Start (or reuse) our detached dockerd; return its DOCKER_HOST."""
    if _ping(OWN_SOCKET):  # left running by an earlier test run
        return "unix://" + OWN_SOCKET
    if not _is_root():
        raise _Unavailable("no Docker Engine reachable, and starting one needs root")
    os.makedirs(RUN_DIR, exist_ok=True)
    os.makedirs(OWN_DATA_ROOT, exist_ok=True)
    pid = _read_pid(OWN_PIDFILE)
    if pid is None or not _is_dockerd(pid):
        # A dead daemon leaves its pidfile and socket behind; dockerd
        # refuses to start over the pidfile, so clear both.
        for stale in (OWN_PIDFILE, OWN_SOCKET):
            if os.path.lexists(stale):
                os.unlink(stale)
        _spawn_own_dockerd()
    # Either way (just started, or a live one still booting): wait for it.
    return _wait_for_daemon("our dockerd", OWN_SOCKET, OWN_PIDFILE, OWN_LOG)


def _wait_for_daemon(name: str, sock: str, pidfile: str, log: str) -> str:
    """DOCKER_HOST of the daemon we started, once it answers /_ping;
    _Unavailable (with its log's tail) when it exits or stays silent."""
    deadline = time.monotonic() + OWN_START_TIMEOUT
    while time.monotonic() < deadline:
        if _ping(sock):
            return "unix://" + sock
        pid = _read_pid(pidfile)
        if pid is not None and not _pid_alive(pid):
            raise _Unavailable("%s exited at start; %s says:\n%s" % (name, log, _tail(log)))
        time.sleep(0.2)
    raise _Unavailable("%s did not answer /_ping within %ds; %s says:\n%s"
                       % (name, OWN_START_TIMEOUT, log, _tail(log)))


def _spawn_own_dockerd() -> None:
    """Launch dockerd fully detached: new session, no pipes to us.

    It goes through `sh -c '... &'` so dockerd is re-parented to init at
    once: it outlives this process (later runs reuse it), never becomes our
    zombie, and Python does not warn about a still-running child.
    """
    argv = [
        _which("dockerd") or "/usr/sbin/dockerd",
        "--pidfile", OWN_PIDFILE,
        "--exec-root", OWN_EXEC_ROOT,
        "--data-root", OWN_DATA_ROOT,
        "-H", "unix://" + OWN_SOCKET,
    ]
    env = dict(os.environ)
    env.pop("DOCKER_HOST", None)
    # dockerd runs iptables, modprobe & co. from sbin.
    env["PATH"] = env.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    subprocess.run(
        ["/bin/sh", "-c", 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 &',
         "sh", OWN_LOG] + argv,
        env=env, start_new_session=True, check=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _start_own_podman() -> str:
    """Start (or reuse) our detached `podman system service`; return its DOCKER_HOST."""
    if _ping(PODMAN_SOCKET):  # left running by an earlier test run
        return "unix://" + PODMAN_SOCKET
    if not _is_root():
        raise _Unavailable("Podman tests run a rootful podman service, which needs root")
    os.makedirs(PODMAN_RUN_DIR, exist_ok=True)
    os.makedirs(PODMAN_DATA_ROOT, exist_ok=True)
    pid = _read_pid(PODMAN_PIDFILE)
    if pid is None or not _is_process(pid, "podman"):
        if os.path.lexists(PODMAN_SOCKET):
            os.unlink(PODMAN_SOCKET)
        _write_podman_config()
        _spawn_own_podman()
    return _wait_for_daemon("our podman service", PODMAN_SOCKET, PODMAN_PIDFILE, PODMAN_LOG)


def podman_ulimits() -> Tuple[int, int]:
    """(nofile, nproc) for containers.conf's default_ulimits.

    Without CAP_SYS_RESOURCE a container's rlimits cannot exceed the
    service's own hard limits, or every start fails ("error setting rlimit
    type 7").  Podman also caps its own nproc at kernel.pid_max (seen:
    32768), so that bounds nproc too.
    """
    import resource
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    try:
        with open("/proc/sys/kernel/pid_max") as fh:
            pid_max = int(fh.read())
    except (OSError, ValueError):
        pid_max = nproc
    caps = [limit for limit in (nproc, pid_max) if limit != resource.RLIM_INFINITY]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    return nofile, min(caps) if caps else 1048576


def _write_podman_config() -> None:
    """Our service's containers.conf and registries.conf (passed through
    CONTAINERS_CONF / CONTAINERS_REGISTRIES_CONF, so /etc stays as it is)."""
    nofile, nproc = podman_ulimits()
    with open(PODMAN_RUN_DIR + "/containers.conf", "w") as fh:
        fh.write('[containers]\ndefault_ulimits = ["nofile=%d:%d", "nproc=%d:%d"]\n'
                 % (nofile, nofile, nproc, nproc))
    # The test registries listen on 127.0.0.1:<port> over plain HTTP. A
    # location is a prefix matched up to a ':' or '/', so "127.0.0.1"
    # covers every port.
    with open(PODMAN_RUN_DIR + "/registries.conf", "w") as fh:
        fh.write('unqualified-search-registries = []\n\n'
                 '[[registry]]\nlocation = "127.0.0.1"\ninsecure = true\n')


def _spawn_own_podman() -> None:
    """Launch `podman system service` detached, as _spawn_own_dockerd does;
    vfs storage of its own (no overlay mounts needed)."""
    argv = [
        _which("podman") or "/usr/bin/podman",
        "--root", PODMAN_DATA_ROOT + "/storage",
        "--runroot", PODMAN_RUN_DIR + "/run",
        "--storage-driver", "vfs",
        "system", "service", "--time=0", "unix://" + PODMAN_SOCKET,
    ]
    env = dict(os.environ)
    env.pop("DOCKER_HOST", None)
    env["CONTAINERS_CONF"] = PODMAN_RUN_DIR + "/containers.conf"
    env["CONTAINERS_REGISTRIES_CONF"] = PODMAN_RUN_DIR + "/registries.conf"
    env["PATH"] = env.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    subprocess.run(
        ["/bin/sh", "-c",
         'log=$1; pidfile=$2; shift 2; "$@" </dev/null >>"$log" 2>&1 & echo $! >"$pidfile"',
         "sh", PODMAN_LOG, PODMAN_PIDFILE] + argv,
        env=env, start_new_session=True, check=True, cwd="/",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            # The state letter follows the parenthesised command name.
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_dockerd(pid: int) -> bool:
    """True if `pid` is a live dockerd (a recycled pid is not)."""
    return _is_process(pid, "dockerd")


def _is_process(pid: int, command: str) -> bool:
    """True if `pid` is a live process running `command`."""
    try:
        with open("/proc/%d/comm" % pid) as fh:
            return fh.read().strip() == command and _pid_alive(pid)
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Tools: docker CLI, dockerd, docker-registry, static busybox
# ---------------------------------------------------------------------------

def _docker_cli() -> Optional[str]:
    """The docker CLI: Debian's /usr/bin/docker (matches the 20.10 engine)
    is preferred over whatever else PATH offers."""
    if os.path.exists("/usr/bin/docker"):
        return "/usr/bin/docker"
    return _which("docker")


def _is_static_elf(path: str) -> bool:
    """True if `path` is an ELF executable without a program interpreter,
    i.e. runs in an image that has no /lib at all."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 16)
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only
        return False
    order = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    for i in range(phnum):
        start = phoff + i * phentsize
        if int.from_bytes(data[start:start + 4], order) == 3:  # PT_INTERP
            return False
    return True


def _missing_packages(need_daemon: bool, podman: bool = False) -> List[str]:
    """Debian packages to install so every tool the tests use is present."""
    missing = []
    if podman and _which("podman") is None:
        missing.append("podman")
    if podman and not os.path.exists("/usr/libexec/podman/catatonit"):
        missing.append("catatonit")  # Podman's --init; a Recommends apt may skip
    if _docker_cli() is None or (need_daemon and _which("dockerd") is None):
        missing.append("docker.io")
    if _which("docker-registry") is None:
        missing.append("docker-registry")
    if not _is_static_elf(BUSYBOX):
        missing.append("busybox-static")
    return missing


def _ensure_tools(need_daemon: bool, podman: bool = False) -> None:
    """Install missing packages (as root) or raise _Unavailable."""
    packages = _missing_packages(need_daemon, podman)
    if not packages:
        return
    if not _is_root():
        raise _Unavailable("missing packages %s, and installing them needs root"
                           % " ".join(packages))
    _apt_install(packages)
    still = _missing_packages(need_daemon, podman)
    if still:
        raise _Unavailable("packages %s still missing after apt-get install"
                           % " ".join(still))


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get"] + list(args), env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)


def _apt_install(packages: List[str]) -> None:
    """apt-get install; refresh the package lists only when needed, since
    `apt-get update` is the slow part."""
    print("tests.support: installing %s" % " ".join(packages), file=sys.stderr)
    if not glob.glob("/var/lib/apt/lists/*_Packages*"):
        _apt("update")
    result = _apt("install", "-y", *packages)
    if result.returncode != 0:
        _apt("update")
        result = _apt("install", "-y", *packages)
    if result.returncode != 0:
        raise _Unavailable("apt-get install %s failed:\n%s"
                           % (" ".join(packages), result.stdout[-2000:]))


# ---------------------------------------------------------------------------
# Running the docker CLI
# ---------------------------------------------------------------------------

def docker(*args, input: Optional[bytes] = None, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the docker CLI against engine_env(); stdout/stderr come back as text.

    `input` may be bytes (e.g. a tar for `docker import -`) or str.
    With check=True a non-zero exit raises AssertionError showing stderr.
    """
    env = engine_env()
    argv = [_docker_cli() or "docker"] + [str(a) for a in args]
    if isinstance(input, str):
        input = input.encode("utf-8")
    raw = subprocess.run(argv, input=input, env=env, timeout=timeout,
                         stdin=None if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    result = subprocess.CompletedProcess(
        raw.args, raw.returncode,
        raw.stdout.decode("utf-8", "replace"),
        raw.stderr.decode("utf-8", "replace"))
    if check and result.returncode != 0:
        command = " ".join(["docker"] + argv[1:])
        raise AssertionError("%s failed (exit %d): %s"
                             % (command[:300], result.returncode,
                                result.stderr.strip() or result.stdout.strip()))
    return result


def registry_login(config_dir: str, registry: str, username: str, password: str) -> None:
    """`docker --config <config_dir> login` to a test registry. On Podman the
    login is written as the CLI would write it: Podman 4.3's /auth pings
    the registry over HTTPS whatever registries.conf says."""
    if not is_podman():
        docker("--config", config_dir, "login", "--username", username, "--password-stdin",
               registry, input=password)
        return
    import base64
    os.makedirs(config_dir, exist_ok=True)
    token = base64.b64encode(("%s:%s" % (username, password)).encode()).decode()
    with open(os.path.join(config_dir, "config.json"), "w") as fh:
        json.dump({"auths": {registry: {"auth": token}}}, fh)


def run_version(test: unittest.TestCase, app: str, ref: str, version: str = "v1",
                publish: bool = True, answers: Optional[str] = None) -> Tuple[str, Optional[int]]:
    """docker run <ref>:<version> as e2e-<app>-<run id> (this run's label;
    removed when the test ends), its port 8080 published on a free loopback
    port unless not `publish`; once it answers its version (or `answers`):
    (name, port or None)."""
    name = "e2e-%s-%s" % (app, run_id())
    test.addCleanup(docker, "rm", "-f", name, check=False)
    args = ["run", "-d", "--name", name, "--label", "%s=%s" % (TEST_LABEL, run_id())]
    port = free_port() if publish else None
    if port is not None:
        args += ["-p", "127.0.0.1:%d:8080" % port]
    docker(*(args + ["%s:%s" % (ref, version)]))
    wait_running(name)
    wait_http(app_url(name, port), expect_body=(answers or version) + "\n")
    return name, port


def app_url(name: str, port: Optional[int]) -> str:
    """The app's URL: its published loopback port, else its address on the default bridge."""
    if port is not None:
        return "http://127.0.0.1:%d/" % port
    return "http://%s:8080/" % inspect(name)["NetworkSettings"]["IPAddress"]


def wait_running(container: str, timeout: float = 20.0) -> None:
    """Wait until the container's State.Running is true.

    Probe a published port only after this: before the container runs,
    a connection to it stalls for about a second.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = docker("inspect", "-f", "{{.State.Status}} {{.State.Running}}",
                       container, check=False)
        if state.stdout.strip().endswith("true"):
            return
        if state.stdout.startswith("exited") or state.stdout.startswith("dead"):
            logs = docker("logs", "--tail", "20", container, check=False)
            raise AssertionError("container %s stopped: %s%s"
                                 % (container, logs.stdout, logs.stderr))
        if time.monotonic() >= deadline:
            raise AssertionError("container %s not running after %.1fs: %s"
                                 % (container, timeout,
                                    state.stdout.strip() or state.stderr.strip()))
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# A throwaway registry
# ---------------------------------------------------------------------------

class Registry:
    """A `docker-registry` on 127.0.0.1:<free port> with storage in a temp dir.

    The engine treats 127.0.0.0/8 registries as insecure (plain HTTP) by
    default, so `docker push 127.0.0.1:PORT/...` works without setup.
    Use as a context manager, or call start() and stop().
    """

    def __init__(self, notify_url: Optional[str] = None,
                 notify_headers: Optional[Dict[str, str]] = None) -> None:
        """`notify_url`: send the registry's own notifications (events of
        pushes and pulls) there, with `notify_headers`."""
        self.notify_url, self.notify_headers = notify_url, notify_headers or {}
        self.port = None  # type: Optional[int]
        self._dir = None  # type: Optional[str]
        self._proc = None  # type: Optional[subprocess.Popen]
        self._log = None

    @property
    def host(self) -> str:
        """"127.0.0.1:PORT", the registry part of image references."""
        if self.port is None:
            raise RuntimeError("registry not started")
        return "127.0.0.1:%d" % self.port

    @property
    def url(self) -> str:
        return "http://" + self.host

    def start(self) -> "Registry":
        """Start the registry and wait (15 s max) until /v2/ answers 200."""
        engine_env()  # makes sure docker-registry is installed
        self._dir = tempfile.mkdtemp(prefix="autodeploy-registry-")
        self.port = free_port()
        config = os.path.join(self._dir, "config.yml")
        with open(config, "w") as fh:
            fh.write(self._config())
        self._log = open(os.path.join(self._dir, "registry.log"), "wb")
        self._proc = subprocess.Popen(
            [_which("docker-registry") or "docker-registry", "serve", config],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(15.0)
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self) -> str:
        return (
            "version: 0.1\n"
            "log:\n"
            "  level: error\n"
            "storage:\n"
            "  filesystem:\n"
            "    rootdirectory: %s\n"
            "  delete:\n"
            "    enabled: true\n"
            "http:\n"
            "  addr: %s\n" % (os.path.join(self._dir, "data"), self.host)
        ) + self._notifications()

    def _notifications(self) -> str:
        if not self.notify_url:
            return ""
        headers = "".join("        %s: [%s]\n" % (name, json.dumps(value))
                          for name, value in self.notify_headers.items())
        return ("notifications:\n"
                "  endpoints:\n"
                "    - name: autodeploy\n"
                "      url: %s\n"
                "      timeout: 5s\n"
                "      threshold: 3\n"
                "      backoff: 1s\n"
                "%s" % (json.dumps(self.notify_url), "      headers:\n" + headers if headers else ""))

    def _ready(self, status: int, headers: Any) -> bool:
        """Whether /v2/ answering `status` means the registry is up as configured."""
        return status == 200

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise AssertionError("docker-registry exited (%s):\n%s"
                                     % (self._proc.returncode, self._log_text()))
            try:
                with _NO_PROXY_OPENER.open(self.url + "/v2/", timeout=2) as resp:
                    status, headers = resp.status, resp.headers
            except urllib.error.HTTPError as exc:
                status, headers = exc.code, exc.headers
            except (OSError, http.client.HTTPException) as exc:
                status, headers, last = 0, None, str(exc)
            if status and self._ready(status, headers):
                return
            if status:
                last = "HTTP %s" % status
            time.sleep(0.05)
        raise AssertionError("docker-registry not ready after %.0fs (%s):\n%s"
                             % (timeout, last, self._log_text()))

    def _log_text(self) -> str:
        return _tail(os.path.join(self._dir, "registry.log"))

    def stop(self) -> None:
        """Stop the registry and delete its storage.  Safe to call twice."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# Test images without a Dockerfile
# ---------------------------------------------------------------------------

def _rootfs_tar(version: str) -> bytes:
    """A tiny root filesystem: static busybox plus applet links, and
    /www/index.html holding the version, for busybox httpd to serve."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, kind=tarfile.REGTYPE, mode=0o644, data=b"", target=""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, _IMAGE_MTIME
            info.linkname = target
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("bin", tarfile.DIRTYPE, 0o755)
        with open(BUSYBOX, "rb") as fh:
            add("bin/busybox", mode=0o755, data=fh.read())
        for applet in BUSYBOX_APPLETS:
            add("bin/" + applet, tarfile.SYMTYPE, 0o777, target="busybox")
        add("www", tarfile.DIRTYPE, 0o755)
        add("www/index.html", data=(version + "\n").encode("utf-8"))
        add("tmp", tarfile.DIRTYPE, 0o1777)
    return buf.getvalue()


def _quote(value: str) -> str:
    """Double-quote a word for an ENV/LABEL change line."""
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def _duration(value) -> str:
    """10 -> "10s", 0.5 -> "0.5s"; strings such as "1m" pass through."""
    return "%gs" % value if isinstance(value, (int, float)) else str(value)


def _healthcheck_change(spec: dict) -> str:
    """Turn a healthcheck dict into a HEALTHCHECK change line.

    spec["test"] is a shell command string, or an exec-form list (optionally
    starting with "CMD"), or ["CMD-SHELL", cmd], or ["NONE"].  Optional:
    interval, timeout, start_period (seconds, or Go duration strings like
    "500ms") and retries.
    """
    test = spec["test"]
    if isinstance(test, (list, tuple)):
        if list(test) == ["NONE"]:
            return "HEALTHCHECK NONE"
        if test and test[0] == "CMD-SHELL":
            command = test[1]
        else:
            command = json.dumps(list(test[1:] if test and test[0] == "CMD" else test))
    else:
        command = test
    options = []
    for key in ("interval", "timeout", "start_period"):
        if spec.get(key) is not None:
            options.append("--%s=%s" % (key.replace("_", "-"), _duration(spec[key])))
    if spec.get("retries") is not None:
        options.append("--retries=%d" % spec["retries"])
    return " ".join(["HEALTHCHECK"] + options + ["CMD", command])


def make_image(ref: str, version: str, cmd: Optional[List[str]] = None,
               port: int = 8080, healthcheck: Optional[dict] = None,
               env: Optional[List[str]] = None,
               labels: Optional[Dict[str, str]] = None,
               volumes: Optional[List[str]] = None,
               exposed: Optional[List] = None,
               extra_changes: Optional[List[str]] = None,
               push: bool = True) -> str:
    """Build image `ref` with `docker import` (no Dockerfile, no build, no
    base image) and push it unless push=False; return its sha256: ID.

    By default it runs busybox httpd on `port`, serving "<version>\\n" at /.
    `env` holds "KEY=value" strings, `exposed` "8080/tcp" strings or port
    numbers (default: just `port`), `healthcheck` a dict described in
    _healthcheck_change, `extra_changes` raw change lines.

    Docker 20.10's `docker import --change` accepts only CMD, ENTRYPOINT,
    ENV, EXPOSE, HEALTHCHECK, LABEL, ONBUILD, USER, VOLUME and WORKDIR
    (STOPSIGNAL, SHELL, RUN, ... are refused by the engine).
    """
    engine_env()  # makes sure busybox-static is installed
    if cmd is None:
        cmd = ["/bin/httpd", "-f", "-p", str(port), "-h", "/www"]
    changes = ["CMD " + json.dumps(list(cmd))]
    for item in ([port] if exposed is None else exposed):
        item = str(item)
        changes.append("EXPOSE " + (item if "/" in item else item + "/tcp"))
    for item in env or ():
        key, _, value = item.partition("=")
        changes.append("ENV %s=%s" % (key, _quote(value)))
    for key, value in (labels or {}).items():
        changes.append("LABEL %s=%s" % (_quote(key), _quote(value)))
    if volumes:
        changes.append("VOLUME " + json.dumps(list(volumes)))
    if healthcheck is not None:
        changes.append(_healthcheck_change(healthcheck))
    changes.extend(extra_changes or ())

    args = ["import"]
    for change in changes:
        args += ["--change", change]
    result = docker(*(args + ["-", ref]), input=_rootfs_tar(version))
    # Docker prints the ID; Podman's stream makes the CLI print "ID: ID".
    image_id = result.stdout.strip().split()[-1]
    if push:
        docker("push", ref)
    return image_id


# ---------------------------------------------------------------------------
# Cleanup
# ---------------------------------------------------------------------------

def cleanup_containers(label_value: str) -> None:
    """Force-remove (with their anonymous volumes) the containers labelled
    autodeploy.test=<label_value>, and nothing else."""
    if not label_value:
        raise ValueError("label_value must not be empty")
    found = docker("ps", "-aq", "--filter",
                   "label=%s=%s" % (TEST_LABEL, label_value), check=False)
    ids = found.stdout.split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False)


def cleanup_images(refs: Iterable[str]) -> None:
    """`docker rmi -f` each reference, ignoring errors (e.g. already gone)."""
    for ref in refs:
        docker("rmi", "-f", ref, check=False)


# ---------------------------------------------------------------------------
# Driving the service end to end
# ---------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "e2e-" + "0123456789abcdef" * 3


def app_cmd(port: int = 8080) -> List[str]:
    """A test app's command. busybox httpd as PID 1 ignores SIGTERM; a shell
    that traps it stops at once, as a well-behaved app does."""
    return ["/bin/sh", "-c", "trap 'exit 0' TERM; httpd -f -p %d -h /www & wait" % port]


def hub_payload(repo: str, tag: str, callback: Optional[str] = None) -> bytes:
    """A Docker Hub push payload, as Docker Hub sends it."""
    doc = {"push_data": {"pushed_at": int(time.time()), "pusher": "e2e", "tag": tag},
           "repository": {"repo_name": repo, "name": repo.split("/")[-1],
                          "namespace": repo.split("/")[0]}}
    if callback:
        doc["callback_url"] = callback
    return json.dumps(doc).encode()


def inspect(name: str) -> dict:
    """docker inspect of one container or image."""
    return json.loads(docker("inspect", name).stdout)[0]


def user_env(info: dict) -> List[str]:
    """A container's Config.Env, sorted, without the HOSTNAME=<its own
    hostname> that Podman adds (which differs on every container)."""
    own = "HOSTNAME=" + (info["Config"].get("Hostname") or "")
    return sorted(e for e in info["Config"].get("Env") or [] if e != own)


def containers_named(name: str) -> List[str]:
    """This run's containers whose name is `name` or starts with `name-`
    (so -autodeploy-old- leftovers show)."""
    out = docker("ps", "-a", "--filter", "label=%s=%s" % (TEST_LABEL, run_id()),
                 "--format", "{{.Names}}").stdout.split()
    return sorted(n for n in out if n == name or n.startswith(name + "-"))


class EngineProxy:
    """A Unix socket that forwards to the real Engine's, and that a test can
    cut (every connection closed, new ones refused, as when the Engine
    dies) and restore, without touching the shared daemon."""

    def __init__(self, engine_socket: str, folder: str):
        self.engine_socket = engine_socket
        self.path = os.path.join(folder, "engine-proxy.sock")
        self.url = "unix://" + self.path
        self._lock = threading.Lock()
        self._open: List[socket.socket] = []
        self._listener: Optional[socket.socket] = None
        self.restore()

    def restore(self) -> None:
        """Answer again (a no-op when not cut)."""
        with self._lock:
            if self._listener is not None:
                return
            if os.path.exists(self.path):
                os.unlink(self.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.path)
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and close the ones open."""
        with self._lock:
            listener, self._listener = self._listener, None
            held, self._open = self._open, []
        if listener is not None:
            listener.close()
        for sock in held:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.cut()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client = listener.accept()[0]
            except OSError:
                return  # cut
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.engine_socket)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class CallbackReceiver:
    """A local HTTP server standing in for Docker Hub's callback_url. Each
    path is answered with `statuses` in turn (the last one repeats);
    `arrivals` notes (time.monotonic(), path, status) of each POST."""

    def __init__(self, statuses: Iterable[int] = (200,)):
        self.received = []
        self.arrivals = []
        self.cond = threading.Condition()
        script = list(statuses)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.cond:
                    seen = sum(1 for path, _ in receiver.received if path == self.path)
                    status = script[min(seen, len(script) - 1)]
                    receiver.received.append((self.path, json.loads(body)))
                    receiver.arrivals.append((time.monotonic(), self.path, status))
                    receiver.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return "http://127.0.0.1:%d/cb/%s" % (self.port, name)

    def count(self, name: str) -> int:
        """How many POSTs /cb/<name> got so far."""
        with self.cond:
            return sum(1 for path, _ in self.received if path == "/cb/" + name)

    def wait_count(self, name: str, count: int, timeout: float = 60.0) -> List[float]:
        """Until /cb/<name> got `count` POSTs; the arrival times of its POSTs."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count(name) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("%d of %d callbacks for %s in %.0fs; got %r"
                                         % (self.count(name), count, name, timeout, self.received))
                self.cond.wait(remaining)
            return [at for at, path, _ in self.arrivals if path == "/cb/" + name]

    def wait_for(self, name: str, timeout: float = 60.0) -> dict:
        """The body of the first callback to /cb/<name>."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for path, body in self.received:
                    if path == "/cb/" + name:
                        return body
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("no callback for %s in %.0fs; got %r" % (name, timeout, self.received))
                self.cond.wait(remaining)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class ServiceProcess:
    """`python3 autodeploy.py serve` with a config written for the test."""

    def __init__(self, config_text: str, env: dict):
        self.folder = tempfile.mkdtemp(prefix="autodeploy-e2e-")
        self.config = os.path.join(self.folder, "autodeploy.conf")
        with open(self.config, "w") as fh:
            fh.write(config_text)
        self.log_path = os.path.join(self.folder, "service.log")
        # As systemd's StateDirectory= would: the journal lives in the test's folder.
        self.env = dict(env, STATE_DIRECTORY=os.path.join(self.folder, "state"))

    def start(self, port: int) -> "ServiceProcess":
        self.port = port
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "autodeploy.py"), "--config", self.config, "serve"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while "listening on" not in self.log_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("service did not start:\n" + self.log_text())
            time.sleep(0.02)
        return self

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def post(self, body: bytes, token: str = TOKEN):
        """POST to /deploy/<token>; (status, decoded JSON answer)."""
        request = urllib.request.Request("http://127.0.0.1:%d/deploy/%s" % (self.port, token),
                                         data=body, method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def stop(self, keep_folder: bool = False):
        """SIGTERM (SIGKILL after 30 s), close the log, delete the folder; safe on a dead or unstarted one."""
        process = getattr(self, "process", None)
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.log.close()
        # AUTODEPLOY_TEST_KEEP=1 keeps every service's folder (config, log,
        # journal) to read after a failure.
        if os.environ.get("AUTODEPLOY_TEST_KEEP") == "1":
            print("tests.support: kept %s" % self.folder, file=sys.stderr)
        elif not keep_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------------------
# Shared by the e2e test classes
# ---------------------------------------------------------------------------

ADMIN_TOKEN = "admin-" + "0f1e2d3c4b5a6978" * 3
FINAL_STATES = ("succeeded", "up_to_date", "failed", "rolled_back", "error", "superseded")


def main_section(port: int, callbacks: CallbackReceiver, workers: int = 2,
                 admin_token: Optional[str] = ADMIN_TOKEN, extra: str = "",
                 also_allow: Iterable[str] = ()) -> str:
    """The [autodeploy] section of a test config (admin_token=None leaves that
    line out); `also_allow`: more callback_allow origins."""
    return """
[autodeploy]
listen = 127.0.0.1:{port}
token = {token}
{admin}workers = {workers}
callback_allow = http://127.0.0.1:{cb}{more}
{extra}
""".format(port=port, token=TOKEN, workers=workers, cb=callbacks.port, extra=extra,
           more="".join(" " + origin for origin in also_allow),
           admin="admin_token = %s\n" % admin_token if admin_token else "")


def journal_rows(service: ServiceProcess) -> dict:
    """The journal read directly (the service may be down): id -> row."""
    path = os.path.join(service.env["STATE_DIRECTORY"], "journal.sqlite3")
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in db.execute("SELECT * FROM jobs")}
    finally:
        db.close()


def http_get(port: int, path: str, token: str = ADMIN_TOKEN, timeout: float = 10.0):
    """GET on the service with a bearer token; (status, headers dict, body bytes). No proxy."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": "Bearer " + token} if token else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def wait_for_jobs(service: ServiceProcess, count: int = 1, timeout: float = 60.0) -> list:
    """Until /jobs lists `count` jobs; them, newest first."""
    deadline = time.monotonic() + timeout
    while True:
        status, doc = get_json(service.port, "/jobs")
        if status == 200 and len(doc["jobs"]) >= count:
            return doc["jobs"]
        if time.monotonic() > deadline:
            raise AssertionError("%d job(s) not there after %.0fs:\n%s"
                                 % (count, timeout, service.log_text()[-3000:]))
        time.sleep(0.1)


def get_json(port: int, path: str, token: str = ADMIN_TOKEN):
    """http_get with the body decoded as JSON; (status, document)."""
    status, _, body = http_get(port, path, token)
    return status, json.loads(body or b"null")


def start_class_fixture(cls, registry: Optional["Registry"] = None) -> None:
    """Give a test class env, label, images (removed by stop_class_fixture),
    a registry (`registry`, started; default a plain one) and callbacks."""
    cls.env = engine_env()
    cls.label = run_id()
    cls.images = []
    cls.registry = (registry or Registry()).start()
    cls.callbacks = CallbackReceiver()


def start_app_fixture(cls, name: str, versions: Iterable[str], **image) -> Dict[str, str]:
    """start_class_fixture (stopped by a class cleanup), then images
    <registry>/e2e/<name>:<version> pushed; cls.ref is that repository.
    Returns version -> image ID."""
    start_class_fixture(cls)
    cls.addClassCleanup(stop_class_fixture, cls)
    cls.ref = "%s/e2e/%s" % (cls.registry.host, name)
    return make_versions(cls.images, cls.ref, versions, **image)


def stop_class_fixture(cls) -> None:
    """Close the callbacks, remove the run's containers and cls.images, stop the registry."""
    cls.callbacks.close()
    cleanup_containers(cls.label)
    cleanup_images(cls.images)
    cls.registry.stop()


def make_versions(images: List[str], ref: str, versions: Iterable[str], **image) -> Dict[str, str]:
    """make_image("<ref>:<version>", version) for each version, noted in `images`; version -> ID."""
    ids = {}
    for version in versions:
        tagged = "%s:%s" % (ref, version)
        ids[version] = make_image(tagged, version, **image)
        images += [tagged, ids[version]]
    return ids


# ---------------------------------------------------------------------------
# Faults: a full disk, a callback host that never answers
# ---------------------------------------------------------------------------

def mount_tmpfs(test: unittest.TestCase, path: str, size: str = "1m") -> None:
    """Mount a tmpfs of `size` on `path` (created), unmounted by a cleanup
    of `test` (register it before cleanups that must run after the unmount).
    Skips the test when mounting is refused, unless CI=true."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size,
                              "autodeploy-test", path],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if mounted.returncode != 0:
        _fail("mount -t tmpfs refused: %s" % mounted.stdout.decode().strip())
    test.addCleanup(subprocess.run, ["umount", "-l", path])


def fill_file_system(path: str) -> None:
    """Write the file `path` until its file system has not one byte left."""
    import errno
    with open(path, "wb", buffering=0) as fh:
        for size in (1 << 16, 1 << 12, 512, 64, 1):
            while True:
                try:
                    fh.write(b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break


class StalledHost:
    """A callback host on 127.0.0.1 that accepts connections and never
    answers. `events` notes (time.monotonic(), "accepted" or "given up")
    per connection: "given up" when the client closed it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.origin = "http://127.0.0.1:%d" % self.port
        self.events = []
        self.cond = threading.Condition()
        self._conns = []
        self._closed = False
        threading.Thread(target=self._accept, name="stalled-host", daemon=True).start()

    def url(self, name: str) -> str:
        return "http://127.0.0.1:%d/stalled/%s" % (self.port, name)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                if self._closed:
                    conn.close()
                    return
                self._conns.append(conn)
                self.events.append((time.monotonic(), "accepted"))
                self.cond.notify_all()
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        """Read (and ignore) until the client gives up."""
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        with self.cond:
            if not self._closed:
                self.events.append((time.monotonic(), "given up"))
                self.cond.notify_all()

    def times(self, kind: str) -> List[float]:
        with self.cond:
            return [at for at, what in self.events if what == kind]

    def wait_accepted(self, count: int, timeout: float = 30.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.times("accepted")) >= count, timeout):
                raise AssertionError("the stalled host accepted %d of %d connections in %.0fs"
                                     % (len(self.times("accepted")), count, timeout))

    def close(self) -> None:
        with self.cond:
            self._closed = True
            conns, self._conns = self._conns, []
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()  # wakes accept()
        except OSError:
            pass
        self.sock.close()
        for conn in conns:
            conn.close()


def wait_healthz(port: int, status: int = 200, timeout: float = 30.0) -> float:
    """Poll GET /healthz every 20 ms until it answers `status`; the
    time.monotonic() it first did. AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            got, _, body = http_get(port, "/healthz", token="", timeout=5)
            last = (got, body)
            if got == status:
                return time.monotonic()
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError("/healthz not %d within %.0fs: %r" % (status, timeout, last))
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# Registry proxies
# ---------------------------------------------------------------------------

class RecordingProxy:
    """A reverse proxy on 127.0.0.1:<free port> in front of a registry (or
    any HTTP server) at `target` ("http://127.0.0.1:5000"): each request is
    forwarded as it came (Host included, so the registry's own URLs point
    back here) and noted. Image references name it by `host`, as they
    would the registry; the Engine treats it as insecure (loopback) too.

    `requests`: (method, path) in arrival order; `hits`: (time.monotonic(),
    method, path, status). throttle(n, s) answers the next n requests with
    429 and Retry-After: s itself, without forwarding them.
    Use as a context manager, or call close().
    """

    # Hop-by-hop headers (RFC 9110 7.6.1): for one connection, never forwarded.
    HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer",
                            "transfer-encoding", "upgrade", "proxy-authorization",
                            "proxy-authenticate"))

    def __init__(self, target: str, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("RecordingProxy forwards to http://host:port, not %r" % target)
        self.target_host, self.target_port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self.requests = []  # type: List[Tuple[str, str]]
        self.hits = []  # type: List[Tuple[float, str, str, int]]
        self._cond = threading.Condition()
        self._throttled = 0
        self._retry_after = "1"
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self) -> None:
                body = proxy._request_body(self)
                with proxy._cond:
                    throttled = proxy._throttled > 0
                    proxy._throttled -= 1 if throttled else 0
                if throttled:
                    status, headers, data = 429, [("Retry-After", proxy._retry_after),
                                                  ("Content-Type", "application/json")], \
                        b'{"errors":[{"code":"TOOMANYREQUESTS","message":"throttled by the test"}]}'
                else:
                    status, headers, data = proxy._forward(self.command, self.path,
                                                           self.headers.items(), body)
                with proxy._cond:
                    proxy.requests.append((self.command, self.path))
                    proxy.hits.append((time.monotonic(), self.command, self.path, status))
                    proxy._cond.notify_all()
                self.send_response(status)
                length = str(len(data))
                for name, value in headers:
                    if name.lower() == "content-length":
                        length = value if self.command == "HEAD" else length
                    elif name.lower() not in proxy.HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = relay

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="recording-proxy", daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        """"127.0.0.1:PORT", the registry part of image references through the proxy."""
        return "127.0.0.1:%d" % self.port

    @property
    def url(self) -> str:
        return "http://" + self.host

    def throttle(self, count: int, retry_after: float = 1) -> None:
        """Answer the next `count` requests with 429 and Retry-After: `retry_after` (seconds)."""
        with self._cond:
            self._throttled, self._retry_after = count, "%d" % retry_after

    def wait_for(self, method: str, path_part: str, count: int = 1,
                 timeout: float = 60.0) -> List[float]:
        """Wait until `count` requests of `method` with `path_part` in their
        path came; their times (time.monotonic()). AssertionError after `timeout`."""
        def matching() -> List[float]:
            return [at for at, seen, path, _ in self.hits if seen == method and path_part in path]
        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= count, timeout):
                raise AssertionError("%d of %d %s requests for %r in %.0fs; seen: %r"
                                     % (len(matching()), count, method, path_part, timeout,
                                        self.requests[-20:]))
            return matching()

    def close(self) -> None:
        """Stop serving and close the listening socket. Safe to call twice."""
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(10)
            self.server.server_close()
            self._thread = None

    def __enter__(self) -> "RecordingProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @staticmethod
    def _request_body(handler: http.server.BaseHTTPRequestHandler) -> Optional[bytes]:
        """The request's body, by Content-Length or chunked; None when it has none."""
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else None

    def _forward(self, method: str, path: str, headers: Iterable[Tuple[str, str]],
                 body: Optional[bytes]) -> Tuple[int, List[Tuple[str, str]], bytes]:
        """The target's answer to the request: (status, headers, body);
        502 when it gives none."""
        conn = http.client.HTTPConnection(self.target_host, self.target_port, timeout=self.timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in self.HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        except (OSError, http.client.HTTPException) as exc:
            return 502, [("Content-Type", "text/plain")], ("proxy: %s" % exc).encode()
        finally:
            conn.close()
