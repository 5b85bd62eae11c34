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
import datetime
import email.utils
import grp
import hashlib
import http.client
import ipaddress
import json
import os
import pwd
import re
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
    "encode_registry_auth", "version_tuple", "repository_of", "is_loopback_registry",
    "RegistryError", "ManifestAnswer", "RegistryClient", "OutOfSequence",
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


class OutOfSequence(DockerError):
    """A service update named a version that is no longer the service's
    (someone updated it meanwhile): read it again and retry."""


def _error_for(status: int, message: str, method: str, path: str) -> DockerError:
    # Swarm answers a stale version with 500 on older Engines, 409 on newer
    # ones; either way only the message tells it from other failures.
    if status in (409, 500) and "out of sequence" in message:
        return OutOfSequence(message, status, method, path)
    kind = {404: NotFound, 409: Conflict}.get(status, DockerError)
    return kind(message + _hint(message), status, method, path)


# Engine messages that say a published host port is taken: Docker's for a
# port another container publishes, and the Engine's (or Podman's) bind error
# for a port another process listens on.
_PORT_TAKEN = re.compile(r"[:\s](\d+) failed: port is already allocated"
                         r"|:(\d+): bind: address already in use")
_OLD_CLIENT = re.compile(r"client version \S+ is too old")


def _hint(message: str) -> str:
    """What to do about an Engine error a person may not read at once ('' if nothing)."""
    taken = _PORT_TAKEN.search(message)
    if taken:
        port = taken.group(1) or taken.group(2)
        return (" (host port %s is taken by another container or process: see "
                "`docker ps --filter publish=%s` and `ss -ltnp 'sport = :%s'`)" % (port, port, port))
    if _OLD_CLIENT.search(message):
        return (" (the Engine was upgraded while autodeploy ran: restart autodeploy to "
                "negotiate again)")
    return ""


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


def _names_registry(image: str) -> bool:
    """True when the first part of an image name is a registry host, as the
    docker CLI decides: it has a '.' or a ':', or is 'localhost'."""
    first, sep, _ = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def registry_of(image: str) -> str:
    """The registry host an image name lives on (docker.io when none is named)."""
    if _names_registry(image):
        first = image.partition("/")[0]
        return DOCKER_HUB if first in ("index.docker.io", "registry-1.docker.io") else first
    return DOCKER_HUB


def repository_of(image: str) -> str:
    """The repository's name in its registry's API: 'team/app' for
    'host:5000/team/app' or 'team/app', 'library/nginx' for 'nginx' (Docker
    Hub keeps its official images under library/)."""
    name = image.partition("/")[2] if _names_registry(image) else image
    if registry_of(image) == DOCKER_HUB and "/" not in name:
        return "library/" + name
    return name


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
        raise CredentialsError("%s did not answer within %g s" % (said, timeout)) from None
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
# Registries: the Registry HTTP API v2
############################################################################

# What a manifest HEAD accepts: a multi-platform index or a single manifest,
# OCI or Docker. The digest of whichever the tag points at is what `docker
# pull` records in RepoDigests.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
# Docker Hub's images live here, whatever the reference calls it.
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_REGISTRY_TIMEOUT = 10.0
# Size caps on what a registry sends: a token answer is a few KB, a page of
# tags well under a MB even for images with thousands of tags.
TOKEN_BODY_LIMIT = 1 << 20
TAGS_BODY_LIMIT = 4 << 20
ERROR_BODY_LIMIT = 4096
# The token spec's lifetime when a token service names none.
DEFAULT_TOKEN_LIFETIME = 60.0
# A cached token is dropped this long before it expires, so that it does not
# expire on its way to the registry.
TOKEN_EXPIRY_MARGIN = 5.0
# The OAuth2 client_id the token spec requires when a refresh token is used.
OAUTH_CLIENT_ID = "autodeploy"
USER_AGENT = "autodeploy-dockerapi"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
# One auth-param of a challenge: key=token or key="quoted string".
_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*,?')


class RegistryError(DockerError):
    """A registry refused or failed a request; .status (HTTP status or None for
    no answer), .retry_after (seconds, from a 429/503 Retry-After, else None).
    Never holds a credential."""

    def __init__(self, message: str, status: Optional[int] = None, method: str = "",
                 path: str = "", retry_after: Optional[float] = None):
        super().__init__(message, status, method, path)
        self.retry_after = retry_after


class ManifestAnswer(NamedTuple):
    """What a manifest HEAD told: the digest the tag points at, and Docker
    Hub's pull quota left ("98;w=21600": pulls left in a 21600 s window)."""
    digest: str
    rate_limit: Optional[str]


class Challenge(NamedTuple):
    """A 401's WWW-Authenticate: 'bearer' with the token service's realm,
    service and scope, or 'basic'."""
    scheme: str
    realm: str = ""
    service: str = ""
    scope: str = ""


class _Answer(NamedTuple):
    status: int
    headers: Any  # an email.message.Message: case-insensitive get() and get_all()
    body: bytes


def is_loopback_registry(registry: str) -> bool:
    """True for a registry on this host (127.0.0.0/8, ::1, localhost, with or
    without a port), which the Docker Engine reaches over plain HTTP unless
    told otherwise: its default insecure registries are the loopback ones."""
    host = registry
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_challenge(values: List[str], name: str) -> Optional[Challenge]:
    """The challenge to answer among WWW-Authenticate values: Bearer (with
    scope repository:<name>:pull when the registry names none) before
    Basic; None when there is neither, or a Bearer challenge has no realm."""
    found = {}
    for value in values:
        scheme, _, rest = value.strip().partition(" ")
        params = {key.lower(): re.sub(r"\\(.)", r"\1", quoted) if quoted else bare
                  for key, quoted, bare in _AUTH_PARAM.findall(rest)}
        found.setdefault(scheme.lower(), params)
    if "bearer" in found and found["bearer"].get("realm"):
        params = found["bearer"]
        return Challenge("bearer", params["realm"], params.get("service", ""),
                         params.get("scope") or "repository:%s:pull" % name)
    if "basic" in found:
        return Challenge("basic")
    return None


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a Retry-After value: delay-seconds or an HTTP date
    (counted from `now`, a Unix time); None when absent or unreadable."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):  # which one depends on the Python version
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)


def registry_opener(use_proxy_env: bool = True) -> Callable[..., Any]:
    """urlopen that never follows a redirect (a 3xx comes back as an
    HTTPError); without `use_proxy_env` it never uses an http(s)_proxy."""
    import urllib.request  # loaded on first use: it costs start-up time

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    handlers = [NoRedirect]  # type: List[Any]
    if not use_proxy_env:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers).open


class RegistryClient:
    """Asks registries what a tag points at and which tags there are, with
    the Registry HTTP API v2 and the credentials a pull uses, spending none
    of Docker Hub's pull quota (a manifest HEAD is not counted; a GET is).

    https, except for registries `insecure` names (by default the loopback
    ones, which the Docker Engine treats as insecure: plain http). The
    registry's own auth is answered: a Bearer challenge with a token from
    its token service (cached per realm, service, scope and credentials
    until it expires, on `clock`), a Basic one with the user and password.

    Redirects are not followed: registries answer manifest HEADs and tag
    lists themselves (only blobs go to CDNs), and following one could carry
    credentials elsewhere; a 3xx is a RegistryError naming where it led.
    Requests to a loopback host never go through a proxy (as the Engine's
    Go client does); others honour https_proxy/http_proxy/no_proxy.

    `urlopen`: urllib.request.urlopen's shape, (request, timeout) -> response,
    raising urllib.error.HTTPError for a status of 300 and up.
    """

    def __init__(self, urlopen: Optional[Callable[..., Any]] = None,
                 timeout: float = DEFAULT_REGISTRY_TIMEOUT,
                 insecure: Callable[[str], bool] = is_loopback_registry,
                 clock: Callable[[], float] = time.time):
        self.urlopen = urlopen
        self.timeout = timeout
        self.insecure = insecure
        self.clock = clock
        self._lock = threading.Lock()
        self._challenges = {}  # type: Dict[Tuple[str, str], Challenge]  # (origin, name) -> last seen
        self._tokens = {}  # type: Dict[Tuple[str, str, str, str], Tuple[str, float]]  # -> (token, until)
        self._openers = {}  # type: Dict[bool, Callable[..., Any]]

    # -- the API -----------------------------------------------------------

    def manifest_digest(self, image: str, tag: str, auth: Optional[Dict[str, str]]) -> ManifestAnswer:
        """HEAD /v2/<name>/manifests/<tag> with Accept listing the OCI index, OCI manifest,
        Docker manifest list and Docker manifest v2 media types; the digest from
        Docker-Content-Digest. A HEAD is not counted against Docker Hub's pull rate limit; a GET is."""
        name = repository_of(image)
        url = "%s/v2/%s/manifests/%s" % (self.base_url(image), urllib.parse.quote(name, safe="/"),
                                         urllib.parse.quote(tag, safe=""))
        answer = self._ask("HEAD", url, image, name, auth, {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
                           ERROR_BODY_LIMIT, "no tag %s in %s" % (tag, name))
        digest = (answer.headers.get("Docker-Content-Digest") or "").strip()
        if not _DIGEST.match(digest):
            raise RegistryError("%s answered for %s:%s without a sha256 Docker-Content-Digest (%s)" % (
                registry_of(image), name, tag, "none" if not digest else "%r" % digest[:80]),
                answer.status, "HEAD", urllib.parse.urlsplit(url).path)
        return ManifestAnswer(digest, answer.headers.get("ratelimit-remaining"))

    def tags(self, image: str, auth: Optional[Dict[str, str]], max_pages: int = 50) -> List[str]:
        """GET /v2/<name>/tags/list, following Link: <...>; rel="next" pagination (bounded)."""
        name = repository_of(image)
        url = "%s/v2/%s/tags/list" % (self.base_url(image), urllib.parse.quote(name, safe="/"))
        found = []  # type: List[str]
        for _ in range(max_pages):
            answer = self._ask("GET", url, image, name, auth, {"Accept": "application/json"},
                               TAGS_BODY_LIMIT, "no repository %s on %s" % (name, registry_of(image)))
            found.extend(_tag_page(answer.body, url))
            url = _next_page(answer.headers, url)
            if url is None:
                return found
        raise RegistryError("%s lists the tags of %s in more than %d pages; not reading on" % (
            registry_of(image), name, max_pages), None, "GET", urllib.parse.urlsplit(url).path)

    def base_url(self, image: str) -> str:
        """'https://registry-1.docker.io' for 'nginx', 'http://127.0.0.1:5000' for '127.0.0.1:5000/app'."""
        registry = registry_of(image)
        scheme = "http" if self.insecure(registry) else "https"
        return "%s://%s" % (scheme, DOCKER_HUB_API if registry == DOCKER_HUB else registry)

    # -- auth ----------------------------------------------------------------

    def _ask(self, method: str, url: str, image: str, name: str, auth: Optional[Dict[str, str]],
             headers: Dict[str, str], limit: int, not_found: str) -> _Answer:
        """One request, answering the registry's challenge: the answer when
        2xx, else the RegistryError its status means."""
        origin = _origin(url)
        with self._lock:
            known = self._challenges.get((origin, name))
        where = (method, urllib.parse.urlsplit(url).path)
        # Answered at once when it was asked before; a Basic challenge without a
        # password is asked again, should the registry have dropped it.
        answerable = known and (known.scheme == "bearer" or (auth and auth.get("username")))
        sent = self._authorization(known, auth, image, where) if answerable else None
        answer = self._send(method, url, headers, sent, limit)
        if answer.status == 401:
            challenge = parse_challenge(answer.headers.get_all("WWW-Authenticate") or [], name)
            if challenge is not None and not (sent and challenge.scheme == "basic"):
                if sent and challenge == known:
                    self._forget_token(challenge, auth)  # revoked, or expired early
                with self._lock:
                    self._challenges[(origin, name)] = challenge
                answer = self._send(method, url, headers,
                                    self._authorization(challenge, auth, image, where), limit)
        if answer.status in (401, 403):
            raise self._refused(image, name, auth, answer, method, url)
        return self._checked(answer, image, method, url, not_found)

    def _authorization(self, challenge: Challenge, auth: Optional[Dict[str, str]], image: str,
                       where: Tuple[str, str]) -> str:
        """The Authorization header that answers `challenge` with `auth`;
        `where` is the challenged request's (method, path), for errors."""
        if challenge.scheme == "basic":
            if not auth or not auth.get("username"):
                raise RegistryError("%s asks for a user name and password, and %s" % (
                    registry_of(image), "an identity token is no password" if auth
                    else "no credentials were given"), 401, *where)
            return _basic(auth)
        return "Bearer " + self._token(challenge, auth, image, where)

    def _token(self, challenge: Challenge, auth: Optional[Dict[str, str]], image: str,
               where: Tuple[str, str]) -> str:
        """A token for `challenge`'s scope: the cached one while it lasts, else the token service's."""
        key = _token_key(challenge, auth)
        with self._lock:
            cached = self._tokens.get(key)
        if cached is not None and self.clock() < cached[1]:
            return cached[0]
        token, lifetime = self._fetch_token(challenge, auth, image, where)
        with self._lock:
            self._tokens[key] = (token, self.clock() + max(0.0, lifetime - TOKEN_EXPIRY_MARGIN))
        return token

    def _forget_token(self, challenge: Challenge, auth: Optional[Dict[str, str]]) -> None:
        with self._lock:
            self._tokens.pop(_token_key(challenge, auth), None)

    def _fetch_token(self, challenge: Challenge, auth: Optional[Dict[str, str]], image: str,
                     where: Tuple[str, str]) -> Tuple[str, float]:
        """(token, lifetime in seconds) from the token service at the realm.

        As the token spec says: a GET with service and scope, with basic auth
        when there is a user and password. An identity token (what `docker
        login` keeps for registries that issue one) is an OAuth2 refresh
        token: POSTed as grant_type=refresh_token; a token service without
        OAuth2 answers that POST 404 (or 405), and is then asked by GET.
        """
        realm = urllib.parse.urlsplit(challenge.realm)
        if realm.scheme not in ("http", "https") or not realm.hostname:
            raise RegistryError("%s names a token service that is no http(s) URL: %r" % (
                registry_of(image), _without_query(challenge.realm)[:200]), 401, *where)
        if auth and realm.scheme == "http" and not self.insecure(realm.netloc):
            # Credentials go over plain http only to this host, as they would to the registry.
            raise RegistryError("%s names a token service on plain http (%s); not sending it "
                                "credentials" % (registry_of(image), realm.netloc), 401, *where)
        params = [(key, value) for key, value in
                  (("service", challenge.service), ("scope", challenge.scope)) if value]
        answer, method = None, "POST"
        if auth and auth.get("identitytoken"):
            form = urllib.parse.urlencode([("grant_type", "refresh_token"),
                                           ("refresh_token", auth["identitytoken"]),
                                           ("client_id", OAUTH_CLIENT_ID)] + params)
            answer = self._send("POST", challenge.realm, {
                "Content-Type": "application/x-www-form-urlencoded"}, None, TOKEN_BODY_LIMIT,
                form.encode("ascii"))
            if answer.status in (404, 405):
                answer = None
        if answer is None:
            method, query = "GET", urllib.parse.urlencode(params)
            url = challenge.realm + (("&" if realm.query else "?") + query if query else "")
            answer = self._send("GET", url, {}, _basic(auth) if auth and auth.get("username")
                                else None, TOKEN_BODY_LIMIT)
        path = realm.path
        if answer.status in (401, 403):
            raise RegistryError("the token service of %s (%s) refused %s" % (
                registry_of(image), realm.netloc, "the credentials given" if auth
                else "an anonymous request"), answer.status, method, path)
        self._checked(answer, image, method, challenge.realm, "no token service at %s" % realm.netloc)
        try:
            doc = json.loads(answer.body)
            token = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, TypeError, AttributeError):
            token, lifetime = None, 0.0
        if not isinstance(token, str) or not token:
            raise RegistryError("the token service of %s (%s) answered without a token" % (
                registry_of(image), realm.netloc), answer.status, method, path)
        return token, lifetime

    # -- HTTP ----------------------------------------------------------------

    def _send(self, method: str, url: str, headers: Dict[str, str], authorization: Optional[str],
              limit: int, data: Optional[bytes] = None) -> _Answer:
        """One request; its answer whatever the status. RegistryError (status
        None) when there was no answer, or an answer larger than `limit` bytes."""
        import urllib.error
        import urllib.request
        headers = dict(headers, **{"User-Agent": USER_AGENT})
        if authorization:
            headers["Authorization"] = authorization
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        parts = urllib.parse.urlsplit(url)
        try:
            try:
                with self._opener(parts.hostname or "")(request, timeout=self.timeout) as response:
                    return _Answer(response.status, response.headers, _read(response, limit))
            except urllib.error.HTTPError as exc:
                if exc.fp is None:  # an HTTPError made without a body (Python 3.8 cannot read() it)
                    return _Answer(exc.code, exc.headers, b"")
                try:
                    return _Answer(exc.code, exc.headers, _read(exc, ERROR_BODY_LIMIT, cut=True))
                finally:
                    exc.close()
        except _TooLarge:
            raise RegistryError("%s sent more than %d bytes for %s %s" % (
                parts.netloc, limit, method, parts.path), None, method, parts.path) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise RegistryError("no answer from %s: %s" % (parts.netloc, _registry_reason(exc)),
                                None, method, parts.path) from None

    def _opener(self, host: str) -> Callable[..., Any]:
        if self.urlopen is not None:
            return self.urlopen
        direct = is_loopback_registry(host)
        with self._lock:
            if direct not in self._openers:
                self._openers[direct] = registry_opener(use_proxy_env=not direct)
            return self._openers[direct]

    def _checked(self, answer: _Answer, image: str, method: str, url: str, not_found: str) -> _Answer:
        """`answer` when 2xx; else the RegistryError for its status."""
        if 200 <= answer.status < 300:
            return answer
        path = urllib.parse.urlsplit(url).path
        registry = registry_of(image)
        if answer.status in (429, 503):
            retry_after = parse_retry_after(answer.headers.get("Retry-After"), self.clock())
            raise RegistryError("%s asks to wait%s (%s)%s" % (
                registry, " %g s" % round(retry_after, 1) if retry_after is not None else "",
                "too many requests" if answer.status == 429 else "unavailable",
                _quota(answer.headers)), answer.status, method, path, retry_after)
        if 300 <= answer.status < 400:
            raise RegistryError("%s redirected to %s; redirects are not followed" % (
                registry, _without_query(answer.headers.get("Location") or "nowhere")),
                answer.status, method, path)
        if answer.status == 404:
            raise RegistryError(not_found, 404, method, path)
        raise RegistryError("%s failed: %s" % (registry, _registry_message(answer.body)),
                            answer.status, method, path)

    def _refused(self, image: str, name: str, auth: Optional[Dict[str, str]], answer: _Answer,
                 method: str, url: str) -> RegistryError:
        # Docker Hub answers 401, not 404, for a repository that does not exist.
        return RegistryError("%s refused %s for %s (or it has no such repository)" % (
            registry_of(image), "the credentials given" if auth else
            "an anonymous request (no credentials were given)", name),
            answer.status, method, urllib.parse.urlsplit(url).path)


class _TooLarge(Exception):
    """An answer over its size cap."""


def _read(response: Any, limit: int, cut: bool = False) -> bytes:
    """At most `limit` bytes of a body: more is _TooLarge, or cut off with `cut`."""
    body = response.read(limit + 1) or b""
    if len(body) > limit:
        if not cut:
            raise _TooLarge()
        body = body[:limit]
    return body


def _tag_page(body: bytes, url: str) -> List[str]:
    """The tags of one tags/list answer ({"name": ..., "tags": [...] or null})."""
    try:
        tags = json.loads(body).get("tags") or []
    except (ValueError, AttributeError):
        tags = None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise RegistryError("%s answered a tag list that is not {\"tags\": [strings]}" % (
            urllib.parse.urlsplit(url).netloc,), 200, "GET", urllib.parse.urlsplit(url).path)
    return tags


def _next_page(headers: Any, url: str) -> Optional[str]:
    """The rel="next" URL of a Link header, resolved against `url`; None on
    the last page. A next page on another host is refused: it would get the
    credentials."""
    for value in headers.get_all("Link") or []:
        for link in value.split(","):
            target, _, params = link.partition(";")
            target = target.strip()
            if target.startswith("<") and target.endswith(">") and re.search(
                    r'rel\s*=\s*"?next"?', params):
                following = urllib.parse.urljoin(url, target[1:-1])
                if _origin(following) != _origin(url):
                    raise RegistryError("%s links its next page of tags to another host (%s)" % (
                        urllib.parse.urlsplit(url).netloc, urllib.parse.urlsplit(following).netloc),
                        200, "GET", urllib.parse.urlsplit(url).path)
                return following
    return None


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return "%s://%s" % (parts.scheme, parts.netloc.lower())


def _basic(auth: Dict[str, str]) -> str:
    pair = "%s:%s" % (auth.get("username", ""), auth.get("password", ""))
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def _token_key(challenge: Challenge, auth: Optional[Dict[str, str]]) -> Tuple[str, str, str, str]:
    """(realm, service, scope, whose): two logins never share a token. `whose`
    is a digest, so that no secret sits in the cache's keys."""
    whose = "" if not auth else hashlib.sha256(json.dumps(
        [auth.get("username"), auth.get("password"), auth.get("identitytoken")]).encode()).hexdigest()
    return challenge.realm, challenge.service, challenge.scope, whose


def _quota(headers: Any) -> str:
    remaining = headers.get("ratelimit-remaining")
    return "; pulls left: %s" % remaining if remaining else ""


def _without_query(url: str) -> str:
    """A URL without its query and fragment, where a signed URL keeps its secrets."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _registry_message(body: bytes) -> str:
    """The registry's {"errors": [{"code", "message"}]}, else the start of its answer."""
    try:
        errors = json.loads(body).get("errors") or []
        said = "; ".join("%s: %s" % (e.get("code", "?"), e.get("message", "")) for e in errors[:3])
        if said:
            return _first_line(said)
    except (ValueError, AttributeError, TypeError):
        pass
    return _first_line(body.decode("utf-8", "replace").strip()) or "no message"


def _registry_reason(exc: BaseException) -> str:
    """Why a registry gave no answer, in words."""
    reason = getattr(exc, "reason", None)  # urllib.error.URLError wraps the OSError
    if isinstance(reason, BaseException):
        exc = reason
    elif isinstance(reason, str):
        return reason
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.HTTPException):
        return "bad HTTP (%s)" % exc.__class__.__name__
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


def _socket_permission(path: str) -> str:
    """Why connecting to the Engine's socket was refused, and the fix: the
    socket's owner, group and mode, and whether this process is in that group."""
    try:
        st = os.stat(path)
    except OSError:
        return "permission denied (on the socket or a folder above it)"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    where = "the socket is %s:%s, mode %04o" % (owner, group, st.st_mode & 0o7777)
    if st.st_gid != os.getegid() and st.st_gid not in os.getgroups():
        return ("permission denied: %s, and this process (uid %d) is not in group %s: "
                "add the service's user to group %s (SupplementaryGroups=%s in a systemd "
                "unit), then restart it" % (where, os.geteuid(), group, group, group))
    return "permission denied: %s (a folder above it, or a security module, refuses)" % where


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
            reason = _reason(exc)
            if isinstance(exc, PermissionError) and self.scheme == "unix":
                reason = _socket_permission(self.address)
            raise DockerError("cannot reach the Docker Engine at %s: %s"
                              % (self.where, reason), None, method, path) from exc
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

    def describe(self) -> str:
        """The Engine by name, version and negotiated API, e.g.
        'Podman 4.3.1 (API 1.41)' or 'Docker Engine 20.10.24 (API 1.41)'."""
        doc = self.version()
        return "%s %s (API %s)" % (engine_name(doc), doc.get("Version") or "?", self.api_version)

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

    # -- swarm -------------------------------------------------------------

    def swarm_info(self) -> Dict[str, Any]:
        """GET /info's Swarm part: LocalNodeState ('active', 'inactive'...),
        ControlAvailable (True on a manager); {} when the Engine has none
        (Podman)."""
        return (self._call("GET", self._url("/info")) or {}).get("Swarm") or {}

    def is_swarm_manager(self) -> bool:
        """True when this Engine is an active Swarm manager (can update services)."""
        info = self.swarm_info()
        return info.get("LocalNodeState") == "active" and bool(info.get("ControlAvailable"))

    def inspect_service(self, id_or_name: str) -> Dict[str, Any]:
        """GET /services/{id}: ID, Version.Index, Spec, UpdateStatus..."""
        return self._call("GET", self._url("/services/{}", id_or_name))

    def list_services(self, filters: Optional[Dict[str, List[str]]] = None
                      ) -> List[Dict[str, Any]]:
        """GET /services, e.g. filters={"label": ["autodeploy.enable=true"]}."""
        return self._call("GET", self._url("/services", filters=filters)) or []

    def update_service(self, service_id: str, version: int, spec: Dict[str, Any],
                       registry_auth: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """POST /services/{id}/update?version=N with the whole new spec; the
        registry credentials go along so every node can pull. OutOfSequence
        when `version` is stale. The answer's Warnings, if any."""
        headers = {"X-Registry-Auth": encode_registry_auth(registry_auth)} if registry_auth else {}
        return self._call("POST", self._url("/services/{}/update", service_id, version=version),
                          body=spec, headers=headers) or {}

    def list_tasks(self, filters: Optional[Dict[str, List[str]]] = None) -> List[Dict[str, Any]]:
        """GET /tasks, e.g. filters={"service": ["web"]}."""
        return self._call("GET", self._url("/tasks", filters=filters)) or []


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
            "up to %s: use a newer autodeploy, or let dockerd accept API %s "
            "(DOCKER_MIN_API_VERSION=%s in its environment)"
            % (version_doc.get("Version", "?"), engine_min, CLIENT_API_VERSION,
               CLIENT_API_VERSION, CLIENT_API_VERSION))
    if chosen < version_tuple(OLDEST_API_VERSION):
        raise DockerError(
            "the Docker Engine (version %s) speaks API %s; this client needs %s or newer: "
            "upgrade the Engine (Docker 19.03 and later speak %s)"
            % (version_doc.get("Version", "?"), engine_max, OLDEST_API_VERSION,
               OLDEST_API_VERSION))
    return ".".join(str(part) for part in chosen)


def engine_name(version_doc: Dict[str, Any]) -> str:
    """'Podman' or 'Docker Engine', from a GET /version answer: Podman's
    compat API lists a 'Podman Engine' component (its Platform.Name is the
    OS, e.g. linux/amd64/debian-12); Docker's are 'Engine', 'containerd'..."""
    names = [str(c.get("Name") or "") for c in version_doc.get("Components") or []
             if isinstance(c, dict)]
    platform = str((version_doc.get("Platform") or {}).get("Name") or "")
    if any(n.lower().startswith("podman") for n in names) or "podman" in platform.lower():
        return "Podman"
    return "Docker Engine"


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
