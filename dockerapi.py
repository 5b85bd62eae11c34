"""A small Docker Engine API client: http.client over the Engine's Unix socket.

Standard library only. Knows HTTP and the Engine API, nothing about webhooks.

    engine = DockerClient()                     # DOCKER_HOST or /var/run/docker.sock
    engine.pull_image("nginx", "1.27")
    engine.inspect_container("web")["State"]["Status"]

Every call uses a versioned path (/vX.Y/...). The version is negotiated once,
on first use, from GET /version: min(CLIENT_API_VERSION, the Engine's
ApiVersion), refused when below the Engine's MinAPIVersion. Every failure,
HTTP or connection, is raised as DockerError (NotFound and Conflict for 404
and 409) with a message a person can act on.
"""

import base64
import http.client
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

__all__ = [
    "CLIENT_API_VERSION", "DEFAULT_SOCKET", "DockerClient", "DockerError",
    "NotFound", "Conflict", "CredentialsError", "RegistryAuth", "split_image", "registry_of",
    "server_address", "find_registry_auth", "load_registry_auth", "login_auth",
    "encode_registry_auth", "version_tuple",
]

# Highest API version this client speaks. 1.44 lets us create a container on
# several networks at once, and Docker 29.0-29.2 refuses anything older.
CLIENT_API_VERSION = "1.47"
# Oldest Engine API this client still drives correctly (Docker 20.10 is 1.41).
OLDEST_API_VERSION = "1.40"
DEFAULT_SOCKET = "/var/run/docker.sock"
DEFAULT_TIMEOUT = 30.0
DEFAULT_PULL_IDLE_TIMEOUT = 120.0
DOCKER_HUB = "docker.io"
# The key Docker Hub's credentials go by, in config files and credential helpers.
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
# Seconds a docker-credential-* helper may take (one may wait on a keyring).
CREDENTIAL_HELPER_TIMEOUT = 10.0
# What a helper prints (exit status 1) when it holds nothing for a registry.
CREDENTIALS_NOT_FOUND = "credentials not found in native keychain"
# A helper's Username meaning "Secret is an identity token".
TOKEN_USERNAME = "<token>"


############################################################################
# Errors
############################################################################

class DockerError(Exception):
    """A failed Engine call: HTTP status (None when the Engine was not
    reached at all), method, path and the Engine's own message."""

    def __init__(self, message: str, status: Optional[int] = None,
                 method: str = "", path: str = ""):
        super().__init__(message)
        self.message = message
        self.status = status
        self.method = method
        self.path = path

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return "%s (HTTP %s from %s %s)" % (self.message, self.status, self.method, self.path)


class NotFound(DockerError):
    """The Engine answered 404: no such container, image or network."""


class Conflict(DockerError):
    """The Engine answered 409: a name in use, or a container in the way."""


class CredentialsError(DockerError):
    """Credentials for a registry could not be had: the Docker config file
    is unreadable, or a credential helper failed. Never holds a secret."""


def _error_for(status: int, message: str, method: str, path: str) -> DockerError:
    kind = {404: NotFound, 409: Conflict}.get(status, DockerError)
    return kind(message, status, method, path)


############################################################################
# Image references and registry credentials
############################################################################

def split_image(reference: str) -> Tuple[str, str]:
    """Split 'host:5000/ns/app:tag' into ('host:5000/ns/app', 'tag').

    A digest ('app@sha256:...') is returned as the tag part; no tag means
    'latest'. A ':' inside the registry host is not mistaken for a tag.
    """
    if "@" in reference:
        name, digest = reference.split("@", 1)
        return name, digest
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon + 1:]
    return reference, "latest"


def registry_of(image: str) -> str:
    """The registry host an image name lives on (docker.io when none is named)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return DOCKER_HUB if first in ("index.docker.io", "registry-1.docker.io") else first
    return DOCKER_HUB


def _normalise_registry_key(key: str) -> str:
    """'https://index.docker.io/v1/' -> 'docker.io'; 'https://h:5000/x' -> 'h:5000'."""
    if "://" in key:
        key = key.split("://", 1)[1]
    host = key.split("/", 1)[0]
    if host in ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"):
        return DOCKER_HUB
    return host


def docker_config_path(environ: Optional[Dict[str, str]] = None) -> str:
    """Where the Docker CLI keeps credentials: $DOCKER_CONFIG/config.json or ~/.docker/config.json."""
    environ = os.environ if environ is None else environ
    folder = environ.get("DOCKER_CONFIG") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".docker")
    return os.path.join(folder, "config.json")


class RegistryAuth(NamedTuple):
    """Credentials for a pull, and where they come from in words a person
    can check (never the secret): "auths entry for 127.0.0.1:5000 in ...",
    "credential helper docker-credential-pass for ...", "anonymous ..."."""
    auth: Optional[Dict[str, str]]  # the X-Registry-Auth document; None: pull anonymously
    source: str


def server_address(image: str) -> str:
    """The name the docker CLI gives a registry's credentials: Docker Hub's
    https://index.docker.io/v1/, else the registry host."""
    registry = registry_of(image)
    return DOCKER_HUB_SERVER if registry == DOCKER_HUB else registry


def login_auth(image: str, username: str, password: str) -> Dict[str, str]:
    """The X-Registry-Auth document for a user name and password."""
    return {"username": username, "password": password, "serveraddress": server_address(image)}


def run_program(argv: List[str], stdin: bytes, timeout: float) -> "subprocess.CompletedProcess[bytes]":
    """Run a helper program, its stdout and stderr captured. OSError when it
    cannot be started; subprocess.TimeoutExpired (it is killed) after `timeout`."""
    return subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)


Runner = Callable[[List[str], bytes, float], "subprocess.CompletedProcess[bytes]"]


def find_registry_auth(image: str, config_path: str, run: Runner = run_program,
                       timeout: float = CREDENTIAL_HELPER_TIMEOUT) -> RegistryAuth:
    """Credentials for the registry of `image` from a Docker config file,
    looked up as the docker CLI does: the registry's `credHelpers` entry,
    else the `credsStore` helper, else the `auths` entry, else anonymous.
    A helper is run (through `run`) as `docker-credential-<name> get`.
    CredentialsError when the file or a helper fails.
    """
    config = _read_docker_config(config_path)
    registry = registry_of(image)
    helper = _helper_for(config, registry)
    if helper:
        return _ask_helper(helper, registry, server_address(image), run, timeout)
    auth = _auths_entry(config, registry, config_path)
    if auth is not None:
        return RegistryAuth(auth, "auths entry for %s in %s" % (registry, config_path))
    return RegistryAuth(None, "anonymous: no credentials for %s in %s" % (registry, config_path))


def load_registry_auth(image: str, config_path: str,
                       run: Runner = run_program) -> Optional[Dict[str, str]]:
    """find_registry_auth's credentials alone: the X-Registry-Auth document, or None."""
    return find_registry_auth(image, config_path, run).auth


def _read_docker_config(config_path: str) -> Dict[str, Any]:
    """The Docker config file as a dict; {} when there is none."""
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CredentialsError("cannot read Docker credentials from %s: %s"
                               % (config_path, getattr(exc, "strerror", None) or exc)) from None
    if not isinstance(config, dict):
        raise CredentialsError("cannot read Docker credentials from %s: not a JSON object"
                               % config_path)
    return config


def _helper_for(config: Dict[str, Any], registry: str) -> str:
    """The credential helper's name for `registry`: its credHelpers entry,
    else credsStore; "" for none. As with the docker CLI, a helper set here
    hides any auths entry for the same registry."""
    for key, name in _section(config, "credHelpers").items():
        if _normalise_registry_key(key) == registry and name:
            return str(name)
    return str(config.get("credsStore") or "")


def _section(config: Dict[str, Any], key: str) -> Dict[str, Any]:
    """config[key] when it is an object, else {}: a malformed entry is no credentials."""
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _ask_helper(helper: str, registry: str, server: str, run: Runner,
                timeout: float) -> RegistryAuth:
    """`docker-credential-<helper> get` with the server address on stdin;
    its {"ServerURL", "Username", "Secret"} as credentials. "credentials not
    found" means anonymous, as the docker CLI then pulls anonymously too."""
    program = "docker-credential-" + helper
    said = "credential helper %s for %s" % (program, registry)
    try:
        done = run([program, "get"], server.encode("utf-8"), timeout)
    except subprocess.TimeoutExpired:
        raise CredentialsError("%s did not answer within %gs" % (said, timeout)) from None
    except OSError as exc:
        reason = "not found on PATH" if isinstance(exc, FileNotFoundError) else (
            exc.strerror or str(exc))
        raise CredentialsError("%s: cannot run it: %s" % (said, reason)) from None
    if done.returncode != 0:
        message = (done.stdout or b"").decode("utf-8", "replace").strip()
        if message == CREDENTIALS_NOT_FOUND:
            return RegistryAuth(None, "anonymous: %s has none" % said)
        # A failing helper says why on stdout (the protocol) or stderr; no
        # secret is in that answer, since it gave none.
        detail = message or (done.stderr or b"").decode("utf-8", "replace").strip()
        raise CredentialsError("%s failed (exit status %s)%s" % (
            said, done.returncode, ": " + _first_line(detail) if detail else ""))
    try:
        answer = json.loads(done.stdout)
        username, secret = str(answer.get("Username") or ""), str(answer.get("Secret") or "")
    except (ValueError, AttributeError, UnicodeDecodeError):
        # Never quote the answer: it may be a secret in the wrong shape.
        raise CredentialsError("%s answered something other than the JSON "
                               "{ServerURL, Username, Secret}" % said) from None
    if not secret:
        return RegistryAuth(None, "anonymous: %s has none" % said)
    if username == TOKEN_USERNAME:
        return RegistryAuth({"identitytoken": secret, "serveraddress": server}, said)
    return RegistryAuth({"username": username, "password": secret, "serveraddress": server}, said)


def _first_line(text: str, limit: int = 200) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _auths_entry(config: Dict[str, Any], registry: str, config_path: str) -> Optional[Dict[str, str]]:
    """The X-Registry-Auth document from the `auths` entry for `registry`, or None."""
    for key, entry in _section(config, "auths").items():
        if _normalise_registry_key(key) != registry or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):
            return {"identitytoken": entry["identitytoken"], "serveraddress": key}
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                raise CredentialsError("the auths entry for %s in %s is not valid base64 "
                                       "user:password" % (key, config_path)) from None
            return {"username": user, "password": password, "serveraddress": key}
        if entry.get("username"):
            return {"username": entry["username"], "password": entry.get("password", ""),
                    "serveraddress": key}
    return None


def encode_registry_auth(auth: Dict[str, str]) -> str:
    """The X-Registry-Auth header value: URL-safe base64 of the JSON, padded."""
    return base64.urlsafe_b64encode(json.dumps(auth).encode("utf-8")).decode("ascii")


def version_tuple(version: str) -> Tuple[int, ...]:
    """'1.41' -> (1, 41), for comparing API versions."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise DockerError("not an API version: %r" % (version,)) from None


############################################################################
# Transport
############################################################################

class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX socket; the host name is a placeholder the
    Engine ignores but Go's server requires."""

    def __init__(self, socket_path: str, timeout: Optional[float]):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def parse_docker_host(value: Optional[str]) -> Tuple[str, str]:
    """('unix', path) or ('tcp', 'host:port') from a DOCKER_HOST value or a bare socket path."""
    if not value:
        return "unix", DEFAULT_SOCKET
    if value.startswith("unix://"):
        return "unix", value[len("unix://"):] or DEFAULT_SOCKET
    if value.startswith("/"):
        return "unix", value
    if value.startswith(("tcp://", "http://")):
        hostport = value.split("://", 1)[1].rstrip("/")
        if not hostport or "/" in hostport:
            raise DockerError("DOCKER_HOST %r: expected tcp://HOST:PORT" % value)
        return "tcp", hostport
    raise DockerError("DOCKER_HOST %r is not supported: use unix:///path or tcp://host:port "
                      "(TLS is not supported)" % value)


def _reason(exc: BaseException) -> str:
    """A person's words for why the Engine could not be reached."""
    if isinstance(exc, FileNotFoundError):
        return "no such socket (is dockerd running?)"
    if isinstance(exc, PermissionError):
        return "permission denied (is this user in the docker group?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is dockerd running?)"
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return "the Engine closed the connection"
    if isinstance(exc, http.client.HTTPException):
        return "bad HTTP from the Engine (%s)" % (exc.__class__.__name__,)
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


############################################################################
# The client
############################################################################

class DockerClient:
    """A thread-safe Engine API client. Each call opens its own connection
    (a Unix socket connect costs microseconds), so worker threads never
    share one and a stream (pull) never blocks other calls.

    `host`: DOCKER_HOST-style ('unix:///path', 'tcp://h:p') or a socket path;
    default: $DOCKER_HOST, else /var/run/docker.sock.
    `timeout`: seconds for ordinary calls. `pull_idle_timeout`: seconds a
    pull may go without a progress line (an idle limit, not a total one).
    """

    def __init__(self, host: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 pull_idle_timeout: float = DEFAULT_PULL_IDLE_TIMEOUT,
                 api_version: Optional[str] = None,
                 environ: Optional[Dict[str, str]] = None):
        environ = os.environ if environ is None else environ
        self.host = host or environ.get("DOCKER_HOST") or DEFAULT_SOCKET
        self.scheme, self.address = parse_docker_host(self.host)
        self.timeout = timeout
        self.pull_idle_timeout = pull_idle_timeout
        self._api_version = api_version
        self._version_lock = threading.Lock()

    def __repr__(self) -> str:
        return "DockerClient(%r)" % (self.host,)

    @property
    def where(self) -> str:
        """The Engine's address as a person would write it."""
        return self.address if self.scheme == "unix" else "tcp://" + self.address

    # -- plumbing ----------------------------------------------------------

    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self.scheme == "unix":
            return UnixHTTPConnection(self.address, timeout)
        return http.client.HTTPConnection(self.address, timeout=timeout)

    def _open(self, method: str, path: str, body: Any = None,
              headers: Optional[Dict[str, str]] = None,
              timeout: Optional[float] = None) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request; return the connection and the response (status
        already checked: an HTTP error becomes DockerError)."""
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn = self._connection(self.timeout if timeout is None else timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise DockerError("cannot reach the Docker Engine at %s: %s"
                              % (self.where, _reason(exc)), None, method, path) from exc
        if response.status >= 400:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            conn.close()
            raise _error_for(response.status, _engine_message(raw, response.reason), method, path)
        return conn, response

    def _call(self, method: str, path: str, body: Any = None,
              headers: Optional[Dict[str, str]] = None,
              timeout: Optional[float] = None) -> Any:
        """One complete request; the decoded JSON answer, or None when empty."""
        conn, response = self._open(method, path, body, headers, timeout)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DockerError("the Docker Engine at %s stopped answering: %s"
                              % (self.where, _reason(exc)), None, method, path) from exc
        finally:
            conn.close()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _url(self, template: str, *args: str, **query: Any) -> str:
        """A versioned path with every argument and query value percent-encoded."""
        path = "/v%s%s" % (self.api_version, template.format(
            *(urllib.parse.quote(str(arg), safe="") for arg in args)))
        params = {k: _query_value(v) for k, v in query.items() if v is not None}
        if params:
            path += "?" + urllib.parse.urlencode(params)
        return path

    # -- version -----------------------------------------------------------

    def version(self) -> Dict[str, Any]:
        """GET /version (unversioned): Version, ApiVersion, MinAPIVersion..."""
        return self._call("GET", "/version")

    def ping(self) -> bool:
        """True when the Engine answers /_ping."""
        return self._call("GET", "/_ping") == "OK"

    @property
    def api_version(self) -> str:
        """The negotiated API version, asked of the Engine on first use."""
        if self._api_version is None:
            with self._version_lock:
                if self._api_version is None:
                    self._api_version = negotiate_api_version(self.version())
        return self._api_version

    def api_at_least(self, version: str) -> bool:
        """True when the negotiated API version is `version` or newer."""
        return version_tuple(self.api_version) >= version_tuple(version)

    # -- containers --------------------------------------------------------

    def inspect_container(self, name: str) -> Dict[str, Any]:
        """GET /containers/{name}/json."""
        return self._call("GET", self._url("/containers/{}/json", name))

    def list_containers(self, all: bool = True,
                        filters: Optional[Dict[str, List[str]]] = None) -> List[Dict[str, Any]]:
        """GET /containers/json, e.g. filters={"label": ["app=web"]}."""
        return self._call("GET", self._url("/containers/json", all=all, filters=filters))

    def create_container(self, body: Dict[str, Any], name: Optional[str] = None) -> str:
        """POST /containers/create; returns the new container's id."""
        return self._call("POST", self._url("/containers/create", name=name), body=body)["Id"]

    def start_container(self, name: str) -> None:
        """POST /containers/{name}/start (already running is not an error)."""
        self._call("POST", self._url("/containers/{}/start", name))

    def stop_container(self, name: str, timeout: Optional[int] = None) -> None:
        """POST /containers/{name}/stop. Without `timeout` the Engine uses the
        container's own StopTimeout and StopSignal."""
        grace = 10 if timeout is None or timeout < 0 else timeout
        self._call("POST", self._url("/containers/{}/stop", name, t=timeout),
                   timeout=self.timeout + grace)

    def rename_container(self, name: str, new_name: str) -> None:
        """POST /containers/{name}/rename."""
        self._call("POST", self._url("/containers/{}/rename", name, name=new_name))

    def remove_container(self, name: str, force: bool = False, volumes: bool = False) -> None:
        """DELETE /containers/{name}. Anonymous volumes are kept unless `volumes`."""
        self._call("DELETE", self._url("/containers/{}", name, force=force, v=volumes))

    def container_logs(self, name: str, tail: int = 20) -> str:
        """The last `tail` lines of stdout and stderr, demultiplexed, as text."""
        conn, response = self._open("GET", self._url(
            "/containers/{}/logs", name, stdout=True, stderr=True, tail=tail))
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DockerError("cannot read logs: %s" % _reason(exc)) from exc
        finally:
            conn.close()
        return _demultiplex(raw).decode("utf-8", "replace")

    # -- images and networks -----------------------------------------------

    def inspect_image(self, reference: str) -> Dict[str, Any]:
        """GET /images/{reference}/json."""
        return self._call("GET", self._url("/images/{}/json", reference))

    def remove_image(self, reference: str) -> None:
        """DELETE /images/{reference} (never forced: an image in use stays)."""
        self._call("DELETE", self._url("/images/{}", reference))

    def connect_network(self, network: str, container: str,
                        endpoint: Optional[Dict[str, Any]] = None) -> None:
        """POST /networks/{network}/connect."""
        self._call("POST", self._url("/networks/{}/connect", network),
                   body={"Container": container, "EndpointConfig": endpoint or {}})

    def disconnect_network(self, network: str, container: str, force: bool = False) -> None:
        """POST /networks/{network}/disconnect."""
        self._call("POST", self._url("/networks/{}/disconnect", network),
                   body={"Container": container, "Force": force})

    def events(self, since: float, until: float,
               filters: Optional[Dict[str, List[str]]] = None) -> Iterator[Dict[str, Any]]:
        """GET /events from `since` to `until` (Unix times, fractions allowed):
        the Engine replays what happened since `since`, then streams live
        events and ends the stream at `until`. Runs on its own connection."""
        path = self._url("/events", since="%.6f" % since, until="%.6f" % until, filters=filters)
        conn, response = self._open("GET", path, timeout=max(1.0, until - time.time()) + self.timeout)
        try:
            for message in _json_stream(response):
                yield message
        except (OSError, http.client.HTTPException) as exc:
            raise DockerError("the event stream of the Docker Engine at %s broke off: %s"
                              % (self.where, _reason(exc)), None, "GET", path) from exc
        finally:
            conn.close()

    def pull_image(self, image: str, tag: str, auth: Optional[Dict[str, str]] = None,
                   on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        """POST /images/create?fromImage=image&tag=tag, reading the progress
        stream to its end. An error reported inside the 200 stream raises
        DockerError, as does a stream idle for longer than pull_idle_timeout.
        """
        if not tag:
            raise DockerError("refusing to pull %s without a tag (that would pull every tag)" % image)
        headers = {"X-Registry-Auth": encode_registry_auth(auth)} if auth else {}
        path = self._url("/images/create", fromImage=image, tag=tag)
        conn, response = self._open("POST", path, headers=headers,
                                    timeout=self.pull_idle_timeout)
        try:
            for message in _json_stream(response):
                error = message.get("errorDetail") or (
                    {"message": message["error"]} if message.get("error") else None)
                if error:
                    raise DockerError("pull of %s:%s failed: %s"
                                      % (image, tag, error.get("message") or error),
                                      200, "POST", path)
                if on_progress is not None:
                    on_progress(message)
        except (OSError, http.client.HTTPException) as exc:
            raise DockerError("pull of %s:%s from the Docker Engine at %s broke off: %s"
                              % (image, tag, self.where, _reason(exc)), None, "POST", path) from exc
        finally:
            conn.close()


############################################################################
# Helpers
############################################################################

def negotiate_api_version(version_doc: Dict[str, Any]) -> str:
    """The API version to speak with an Engine, given its GET /version answer."""
    engine_max = str(version_doc.get("ApiVersion") or "")
    engine_min = str(version_doc.get("MinAPIVersion") or "1.12")
    if not engine_max:
        raise DockerError("the Docker Engine did not report its ApiVersion")
    chosen = min(version_tuple(CLIENT_API_VERSION), version_tuple(engine_max))
    if chosen < version_tuple(engine_min):
        raise DockerError(
            "the Docker Engine (version %s) needs API %s or newer; this client speaks "
            "up to %s" % (version_doc.get("Version", "?"), engine_min, CLIENT_API_VERSION))
    if chosen < version_tuple(OLDEST_API_VERSION):
        raise DockerError(
            "the Docker Engine (version %s) speaks API %s; this client needs %s or newer"
            % (version_doc.get("Version", "?"), engine_max, OLDEST_API_VERSION))
    return ".".join(str(part) for part in chosen)


def _query_value(value: Any) -> str:
    """Query values as the Engine expects them: 1/0 for booleans, JSON for filters."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _engine_message(raw: bytes, reason: str) -> str:
    """The Engine's {"message": ...} or, failing that, the raw body or HTTP reason."""
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])
    except ValueError:
        pass
    text = raw.decode("utf-8", "replace").strip()
    return text[:500] or reason or "no message"


def _json_stream(response: http.client.HTTPResponse) -> Iterator[Dict[str, Any]]:
    """JSON objects from a progress stream, however the Engine split them
    (\\r\\n, \\n, or several on one line)."""
    decoder = json.JSONDecoder()
    while True:
        line = response.readline()
        if not line:
            return
        text = line.decode("utf-8", "replace").strip()
        while text:
            try:
                obj, end = decoder.raw_decode(text)
            except ValueError:
                break  # a line we cannot read is progress noise, not an error
            if isinstance(obj, dict):
                yield obj
            text = text[end:].lstrip()


def _demultiplex(raw: bytes) -> bytes:
    """Strip the 8-byte stream headers from a non-TTY log stream (kept as is for TTY)."""
    out, pos = [], 0
    while pos + 8 <= len(raw) and raw[pos] in (0, 1, 2) and raw[pos + 1:pos + 4] == b"\0\0\0":
        size = int.from_bytes(raw[pos + 4:pos + 8], "big")
        out.append(raw[pos + 8:pos + 8 + size])
        pos += 8 + size
    if pos == 0:
        return raw
    return b"".join(out)
