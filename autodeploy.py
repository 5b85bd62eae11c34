#!/usr/bin/env python3
"""autodeploy: turn "I pushed a new image" into "the new version is running".

A registry (Docker Hub, ...) POSTs a push webhook to /deploy/<token>. The
service checks it, answers 202 at once and queues a job; a worker pulls the
image and replaces the app's container with one that keeps the old one's
configuration but runs the new image, then reports to the registry's
callback_url. Standard library only; talks to the Docker Engine through
dockerapi.py.

    python3 autodeploy.py serve  --config /etc/autodeploy/autodeploy.conf
    python3 autodeploy.py deploy --config ... myname/myrepo[:tag]
    python3 autodeploy.py check  --config ...

The module reads top to bottom, one section per concern: errors, config,
sources (what a registry pushed), tag policies (which pushed tag to
deploy), jobs, container recreation, targets (what a job deploys to), the
health gate, running a job and recovery, outbound HTTP, the journal,
metrics, the service, who may deploy, HTTP, lifecycle, and the command
line.
"""

import argparse
import collections
import configparser
import copy
import fcntl
import fnmatch
import grp
import hmac
import http.client
import heapq
import http.server
import io
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shutil
import shlex
import signal
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, NamedTuple,
                    Optional, Sequence, Set, Tuple, Union, FrozenSet)

import dockerapi
from dockerapi import Conflict, DockerClient, DockerError, NotFound

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

__version__ = "0.1.0"
__all__ = [
    "__version__", "AutodeployError", "ConfigError", "PayloadError", "DeployFailed",
    "AppConfig", "Config", "load_config", "Push", "Parsed", "parse_request", "Job", "JobQueue",
    "RolledBack", "ContainerTarget", "SwarmServiceTarget", "HealthGate", "JobRunner", "build_create_body",
    "choose_order", "probe_endpoint", "Journal", "MemoryJournal", "Service", "WebhookServer",
    "Ignored", "SemVer", "tag_refusal", "choose_tag", "running_tag_of", "main",
]


class QuickLogger(logging.Logger):
    """A Logger that does not look up its caller: the log format names no
    file, line or function, and the lookup walks every frame of the stack
    on each line (15% of the CPU an accepted webhook costs)."""

    def findCaller(self, stack_info: bool = False, stacklevel: int = 1) -> Any:
        return "(unknown file)", 0, "(unknown function)", None


def _quick_logger(name: str) -> logging.Logger:
    """logging.getLogger(name), made a QuickLogger if it does not exist yet."""
    usual = logging.getLoggerClass()
    logging.setLoggerClass(QuickLogger)
    try:
        return logging.getLogger(name)
    finally:
        logging.setLoggerClass(usual)


log = _quick_logger("autodeploy")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def printable(text: Any) -> str:
    """`text` for a log line: control characters (and backslashes) as \\xNN,
    so nothing a client sent can forge or hide a line."""
    return _UNPRINTABLE.sub(lambda m: "\\x%02x" % ord(m.group()), str(text))


DEFAULT_CONFIG = "/etc/autodeploy/autodeploy.conf"
DEFAULT_LISTEN = "127.0.0.1:3456"
DEFAULT_LABEL_PREFIX = "autodeploy"
NO_CONFIG = "(no config file)"  # Config.path when serving on the defaults
LABEL_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_WORKERS = 3
DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_CALLBACK_ALLOW = "https://registry.hub.docker.com"
MIN_TOKEN_LENGTH = 32
MIN_SECRET_LENGTH = 16
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds a client has to send one whole request
DEFAULT_HEADER_TIMEOUT = 5.0  # seconds from accept (or a request's first byte) to the end of its headers
DEFAULT_KEEPALIVE_TIMEOUT = 5.0  # seconds a connection may sit idle between requests
DEFAULT_MAX_HEADER_BYTES = 16 * 1024  # request line and headers together
DEFAULT_MAX_CONNECTIONS_PER_SOURCE = 8  # one address (an IPv6 /64) of max_connections
CALLBACK_TIMEOUT = 5.0
CALLBACK_RETRY_DELAYS = (1.0, 5.0, 30.0)  # seconds before the 2nd, 3rd and 4th attempt
CALLBACK_DESTINATIONS = 32  # callback destinations (scheme, host, port) sent to at once, a thread each
KEPT_JOBS = 1000
# Delivery ids (GitHub's, a registry event's) remembered to answer redeliveries as duplicates.
SEEN_DELIVERIES = 10000
SEEN_DELIVERY_DAYS = 7
ENGINE_WAIT = 120.0  # seconds a job waits for a Docker Engine that is down or restarting
ENGINE_LOSSES = 3  # times a job starts over after losing the Engine before it is an error
ENGINE_RETRY_MAX = 15.0  # seconds: the longest pause between attempts to converge a swap
MAX_JOB_LINES = 200  # log lines kept per job
MAX_SUPERSEDED = 100  # callbacks kept waiting for one container's next outcome
# Docker's reference grammar, simplified: what may stand in a tag.
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
REPOSITORY_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                           r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
IMAGE_RE = re.compile(r"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?" + REPOSITORY_RE.pattern[1:])
CONTAINER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


############################################################################
# Errors
############################################################################

class AutodeployError(Exception):
    """Root of this module's errors."""


class ConfigError(AutodeployError):
    """The configuration file is missing, unreadable or wrong."""


class PayloadError(AutodeployError):
    """A webhook the service will not act on; carries the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Ignored(AutodeployError):
    """A push the app's tag policy does not deploy (outside its bound, older
    than the running version, a pre-release): acknowledged, not an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class QueueFull(AutodeployError):
    """More jobs wait than the queue may hold."""


class DeployFailed(AutodeployError):
    """A deploy that did not happen; the old container is left (or put back) running."""


class RolledBack(DeployFailed):
    """The new container failed after the old one was stopped; the old one runs again."""


class CutOff(DeployFailed):
    """The service is stopping and its stop_deadline passed mid-deploy."""


class JournalError(AutodeployError):
    """The journal cannot be read or written (disk full, read-only, corrupt)."""


class ControlError(AutodeployError):
    """The `deploy` command could not hand its job to a running service."""


class InstallError(AutodeployError):
    """`build`, `install` or `uninstall` could not do what it was asked."""


############################################################################
# Configuration
############################################################################

class AppConfig(NamedTuple):
    """One [repository] section: what may deploy, and where to."""
    repository: str
    image: str
    # exact: the tags followed; glob: their patterns; patch/minor/major:
    # nothing, or the version to start from while no version runs.
    tags: Tuple[str, ...]
    container: str
    tag_policy: str = "exact"  # which pushed tags deploy: TAG_POLICIES
    prerelease: bool = False  # glob and semver policies: follow SemVer pre-releases too
    poll: float = 0.0  # seconds between asking the registry for the followed tag's digest; 0: never
    stop_timeout: Optional[int] = None
    order: str = "auto"
    health_url: str = ""
    health_tcp: str = ""
    health_timeout: int = 60
    settle: float = 3.0
    cooldown: float = 1.0
    tokens: Tuple[str, ...] = ()  # deploy tokens for this app only, besides the global ones
    signing_secret: str = ""  # when set, requests for this app must carry X-Hub-Signature-256
    remove_old_image: bool = True
    # The app's own registry login, which wins over the Docker config file.
    registry_user: str = ""
    registry_password: str = ""
    registry_password_file: str = ""  # where the password was read, for `check`
    # Outbound notifications (from [autodeploy] unless the section sets its own).
    notify_url: str = ""   # generic JSON webhook
    slack_url: str = ""    # Slack-compatible incoming webhook
    notify_on: FrozenSet[str] = frozenset(("failure", "rollback"))
    # Used only for the first deploy, when no container exists yet.
    ports: Sequence[Tuple[str, str, str]] = ()
    env: Sequence[str] = ()
    volumes: Sequence[str] = ()
    labels: Mapping[str, str] = {}  # shared default: never mutated
    restart: str = ""
    network: str = ""
    command: Sequence[str] = ()
    # The settings the section wrote (a label cannot override those).
    settings: FrozenSet[str] = frozenset()
    depends_on: str = ""  # label discovery: a container deployed before this one
    labelled: bool = False  # no section: an app made from its containers' labels
    service: str = ""  # a Docker Swarm service to deploy to, instead of a container
    swarm_timeout: int = 300  # seconds Swarm's roll-out of the service may take

    def __repr__(self) -> str:
        """As a NamedTuple's, with the secrets masked: an AppConfig may end
        up in a log line or an error."""
        return "AppConfig(%s)" % ", ".join(
            "%s=%s" % (name, "'***'" if name in SECRET_FIELDS and value else repr(value))
            for name, value in zip(self._fields, self))


SECRET_FIELDS = frozenset(("tokens", "signing_secret", "registry_password"))


class Config(NamedTuple):
    """The whole configuration file, checked."""
    path: str
    listen_host: str
    listen_port: int
    tokens: List[str]
    workers: int
    state_dir: str
    callback_allow: List[Tuple[str, str, int]]
    max_body: int
    max_queue: int
    docker_host: Optional[str]
    docker_config: Optional[str]
    apps: Dict[str, AppConfig]
    signing_secret: str = ""
    allow_from: Tuple[Network, ...] = ()  # empty: any source address
    trusted_proxies: Tuple[Network, ...] = ()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_connections_per_source: int = DEFAULT_MAX_CONNECTIONS_PER_SOURCE
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    insecure_no_token: bool = False  # serve --insecure-no-token
    engine_wait: float = ENGINE_WAIT
    journal: bool = True
    keep_jobs: int = 200
    keep_days: float = 30.0
    admin_tokens: Tuple[str, ...] = ()
    metrics_public: bool = False
    stop_deadline: float = 30.0  # SIGTERM: seconds running deploys get before they roll back
    label_prefix: str = DEFAULT_LABEL_PREFIX  # <prefix>.enable=true opts a container in

    def app_for(self, repository: str) -> Optional[AppConfig]:
        """The app configured for a pushed repository, if any."""
        return self.apps.get(repository)

    def has_tokens(self) -> bool:
        """Some deploy token is configured: a global one or an app's own."""
        return bool(self.tokens) or any(app.tokens for app in self.apps.values())

    def state_file(self, name: str) -> str:
        """A file in the state directory (journal, lock, control socket)."""
        return os.path.join(self.state_dir, name)


class Setting(NamedTuple):
    """One row of the configuration reference. README.md's tables and
    `config example` are both made from these rows (a test compares the
    README with them), and they are the settings a section may use."""
    keys: Tuple[str, ...]  # () for a row that is no setting (tokens from the environment)
    default: str  # Markdown; for FIRST_DEPLOY_SETTINGS, an example
    meaning: str  # Markdown
    examples: Tuple[str, ...] = ()  # per key, the value `config example` shows; else the default


MAIN_SETTINGS = (
    Setting(('listen',), '`127.0.0.1:3456`',
            'address and port of the webhook listener (`[::]:3456` for IPv6)'),
    Setting(('token',), '—',
            'the secret in `/deploy/<token>`; several, separated by spaces or commas, are all '
            'accepted (rotation). At least 32 of `A-Z a-z 0-9 . _ ~ -` each',
            examples=('',)),
    Setting(('token_file',), '—',
            "a file holding the token(s), relative to the config file's folder; added to `token`",
            examples=('token',)),
    Setting((), '—',
            'tokens are also read from `$AUTODEPLOY_TOKEN` and from the systemd credential '
            '`token` (`LoadCredential=token:/etc/autodeploy/token`, read from '
            '`$CREDENTIALS_DIRECTORY/token`)'),
    Setting(('signing_secret', 'signing_secret_file'), '—',
            'when set, every webhook must carry it as its sender can (see [Senders](#senders)): a'
            " GitHub-style `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body>`, JFrog's "
            '`X-JFrog-Event-Auth`, or the `Authorization` header Harbor, ACR and the distribution'
            ' registry send (checked in constant time); at least 16 characters',
            examples=('', 'signing-secret')),
    Setting(('allow_from',), 'any',
            'source networks allowed to send anything at all, CIDRs separated by spaces or commas'
            ' (`192.0.2.0/24, 2001:db8::/32`); others get `403` when they connect, before a byte '
            'is read and without a thread of their own (logged at most once a second, with the '
            'count of those left out)',
            examples=('192.0.2.0/24, 2001:db8::/32',)),
    Setting(('trusted_proxies',), 'none',
            'reverse proxies whose `Forwarded: for=` / `X-Forwarded-For` is believed when '
            'checking `allow_from` (the nearest address that is not itself a trusted proxy '
            'counts); from anyone else those headers are ignored',
            examples=('127.0.0.1, ::1',)),
    Setting(('max_connections',), '`64`',
            'connections served at once. When all are taken, a newcomer takes the place of the '
            'oldest connection that is still sending its head or idle between requests (that one '
            'is closed); only when every one is answering a request does the newcomer get `503` '
            'with `Retry-After: 5`, at once, without a thread of its own'),
    Setting(('max_connections_per_source',), '`8`',
            'connections one source may hold (an IPv4 address, an IPv6 /64; `trusted_proxies` are'
            ' exempt). A source at its share replaces its own oldest waiting connection, or gets '
            '`503` when all of its are answering'),
    Setting(('header_timeout',), '`5`',
            'seconds from accept (from its first byte, for a later request on the connection) to '
            "the end of a request's headers: a socket that sends nothing is dropped after this"),
    Setting(('keepalive_timeout',), '`5`',
            'seconds a connection may sit idle between requests'),
    Setting(('max_header_bytes',), '`16384`',
            'the request line and headers together (each line at most 8 KiB); more gets `431`. '
            'Memory held per connection is bounded by it'),
    Setting(('request_timeout',), '`10`',
            'seconds a client has, from the first byte, to send one whole request (a slow client '
            'trickling bytes is dropped)'),
    Setting(('tls_cert', 'tls_key'), '—',
            "PEM files (relative to the config file's folder): serve HTTPS, TLS 1.2 or newer, for"
            ' hosts without a reverse proxy',
            examples=('cert.pem', 'key.pem')),
    Setting(('workers',), '`3`',
            "deploys that may run at once (for different apps: one app's job, however many "
            'containers it deploys, runs alone)'),
    Setting(('label_prefix',), '`autodeploy`',
            'the prefix of the labels that opt containers in and set their options '
            '(`autodeploy.enable=true`; see [Labelled '
            'containers](#labelled-containers-no-section-needed))'),
    Setting(('state_dir',),
            "`$STATE_DIRECTORY` (systemd's `StateDirectory=`), else `/var/lib/autodeploy` for "
            "root, else `./state`",
            "where the journal (`journal.sqlite3`) is kept; relative to the config file's folder",
            examples=('/var/lib/autodeploy',)),
    Setting(('journal',), '`yes`',
            'record every job in the journal (see [Journal and recovery](#journal-and-recovery));'
            ' `no` keeps jobs in memory only, and a crash loses the queued ones'),
    Setting(('keep_jobs', 'keep_days'), '`200`, `30`',
            'finished jobs the journal keeps per app, and for how long'),
    Setting(('poll',), '`no`',
            'how often apps that set no `poll` of their own ask their registry whether the '
            'followed tag changed: a duration (`30s`, `5m`, `2h`, `1h30m`, at least `1s`) or `no`',
            examples=('no',)),
    Setting(('stop_deadline',), '`30`',
            'on SIGTERM: seconds running deploys get to finish. Past it, a deploy stops waiting, '
            'puts back what it changed (the old container runs again under its name) and its job '
            "stays queued for the next start. The unit's `TimeoutStopSec=90` leaves room for that"
            ' rollback'),
    Setting(('notify_url',), '—',
            'a URL that gets a JSON POST when a job fails or rolls back (see '
            '[Notifications](#notifications)); an app section may set its own, or turn it off '
            'with an empty value',
            examples=('https://alerts.example/autodeploy',)),
    Setting(('slack_url',), '—',
            'a Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat) that gets a '
            'one-line message on the same events',
            examples=('https://hooks.slack.com/services/T000/B000/XXXX',)),
    Setting(('notify_on',), '`failure, rollback`',
            'which outcomes are notified: any of `success`, `failure`, `rollback`'),
    Setting(('engine_wait',), '`120`',
            'seconds a job that has changed nothing yet waits (asking every second) for a Docker '
            'Engine that is down or restarting, before it fails (a shutdown ends the wait at '
            'once, the job staying queued); a swap under way waits as long as it takes'),
    Setting(('admin_token', 'admin_token_file'), '—',
            'token(s) for `GET /jobs` and `/metrics`, sent as `Authorization: Bearer <token>`; '
            'separate from deploy tokens, same rules; `admin_token_file` (relative to the config '
            "file's folder) and the systemd credential `admin_token` are added to it. Without one "
            'those paths answer `404`',
            examples=('', 'admin-token')),
    Setting(('metrics_public',), '`no`',
            'serve `/metrics` without the admin token (for a scraper on a private network)'),
    Setting(('callback_allow',), '`https://registry.hub.docker.com`',
            'origins (`scheme://host[:port]`) callbacks may go to; a `callback_url` elsewhere is '
            'not called (logged)'),
    Setting(('max_body',), '`65536`',
            'largest webhook body accepted, in bytes'),
    Setting(('max_queue',), '`100`',
            'jobs that may wait at once (at most one per app, since a newer push replaces a '
            'waiting one); beyond it webhooks get `503` with `Retry-After`'),
    Setting(('docker_host',), '`$DOCKER_HOST`, else `unix:///var/run/docker.sock`',
            'the Engine: `unix:///path` or plain `tcp://host:port`. `serve` warns at start when '
            'it does not answer (and keeps accepting webhooks: their jobs wait `engine_wait`)',
            examples=('unix:///var/run/docker.sock',)),
    Setting(('docker_config',), '`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`',
            'the Docker config file that registry credentials come from: `credHelpers`, '
            '`credsStore`, `auths` (see [Private images](#private-images))',
            examples=('/etc/autodeploy/docker/config.json',)),
)
APP_SETTINGS = (
    Setting(('image',), 'the section name',
            'the image to pull, with its registry if not Docker Hub: `ghcr.io/me/app`, '
            '`registry.example:5000/team/app` (no tag)',
            examples=('myname/myrepo',)),
    Setting(('tag',), '`latest`',
            'the tag(s) to follow, separated by spaces or commas; a push of another tag is '
            'answered `422`. With another `tag_policy` it means something else: see [Tag '
            'policies](#tag-policies)'),
    Setting(('tag_policy',), '`exact`',
            'which pushed tags deploy: `exact` (the tags listed in `tag`), `glob` (tags matching '
            'a pattern in `tag`), or `patch`, `minor`, `major` (newer SemVer versions within that'
            ' bound of the running one). See [Tag policies](#tag-policies)'),
    Setting(('prerelease',), '`no`',
            'with `glob`, `patch`, `minor` or `major`: follow SemVer pre-releases (`v1.3.0-rc.1`,'
            ' and variant tags such as `1.25.3-alpine`) too'),
    Setting(('poll',), 'the `[autodeploy]` one',
            'how often to ask the registry whether the followed tag changed: `30s`, `5m`, `2h`, '
            '`1h30m` (at least `1s`), or `no`. Below a minute for a Docker Hub image, a warning '
            'is logged at start (and shows in `check`)',
            examples=('5m',)),
    Setting(('container',), 'section name with `/` replaced by `-`',
            'the container to replace (`myname/myrepo` → `myname-myrepo`)',
            examples=('myname-myrepo',)),
    Setting(('service',), '—',
            'a Docker Swarm service to deploy to instead of a container: Swarm rolls it out (see '
            '[Docker Swarm](#docker-swarm)); not with `container`',
            examples=('myrepo',)),
    Setting(('swarm_timeout',), '`300`',
            "seconds Swarm's roll-out of the `service` may take before the job fails (Swarm goes "
            'on with it)'),
    Setting(('stop_timeout',), "the container's own (`--stop-timeout`, else 10 s)",
            'seconds the old container gets to stop before it is killed (its own `--stop-signal` '
            'is used); a kill is logged as "old container … did not stop within N s and was '
            'killed"',
            examples=('10',)),
    Setting(('order',), '`auto`',
            '`stop-first`, `start-first`, or `auto`: start-first when the container publishes no '
            "fixed host port, has no static IP and does not share another's network (`host`, "
            '`container:`), else stop-first'),
    Setting(('health_url',), '—',
            'when the image has no `HEALTHCHECK`: the new container is healthy once this URL '
            "answers 2xx/3xx (redirects are not followed). `{ip}` stands for the new container's "
            'address, e.g. `http://{ip}:8080/health`',
            examples=('http://{ip}:8080/health',)),
    Setting(('health_tcp',), '—',
            'the same with a TCP connect, `HOST:PORT` (`{ip}` allowed)',
            examples=('{ip}:8080',)),
    Setting(('health_timeout',), '`60`',
            'seconds the new container gets to become healthy'),
    Setting(('settle',), '`3`',
            'with neither a `HEALTHCHECK` nor a probe: seconds the new container must stay up, '
            'without exiting or restarting'),
    Setting(('cooldown',), '`1`',
            'seconds after a deploy of this container ends before the next one starts; webhooks '
            'arriving meanwhile coalesce into that one job. A flood of pushes then costs one pull'
            " a second, not pulls back to back (each counts against Docker Hub's pull rate "
            'limit). `0` turns it off'),
    Setting(('token', 'token_file'), '—',
            'tokens that may deploy this app only (besides the global ones); a per-app token used'
            ' for another app gets `404`',
            examples=('', '')),
    Setting(('signing_secret', 'signing_secret_file'), 'the global one',
            "this app's webhooks must carry this secret, as their sender can ([Senders](#senders))",
            examples=('', '')),
    Setting(('remove_old_image',), '`yes`',
            'after a successful deploy, remove the previous image unless some container (running '
            'or not) still uses it'),
    Setting(('registry_user', 'registry_password_file'), '—',
            "this app's own registry login (give both), which wins over the Docker config file; "
            "the file (relative to the config file's folder) holds the password, one trailing "
            'newline ignored. Read at start and at reload, so a bad file is an error then and a '
            'new password takes a reload',
            examples=('deploy-bot', 'registry-password')),
    Setting(('notify_url', 'slack_url', 'notify_on'), 'the `[autodeploy]` ones',
            "this app's notifications; an empty URL turns one off for this app",
            examples=('', '', 'failure, rollback')),
)
FIRST_DEPLOY_SETTINGS = (
    Setting(('ports',), '`127.0.0.1:8080:80, 8443:443/tcp`',
            'published ports, `[IP:]HOST_PORT:CONTAINER_PORT[/tcp\\|udp]`'),
    Setting(('env',), 'one `NAME=value` per line',
            'environment',
            examples=('TZ=UTC',)),
    Setting(('volumes',), '`/srv/app:/data:ro, app-cache:/cache`',
            'bind mounts and named volumes'),
    Setting(('labels',), 'one `name=value` per line',
            'container labels',
            examples=('team=web',)),
    Setting(('restart',), '`unless-stopped`',
            '`no`, `always`, `unless-stopped`, `on-failure[:N]`'),
    Setting(('network',), '`shop`',
            'network to attach to'),
    Setting(('command',), '`httpd -f -p 80`',
            "command (shell-like quoting), instead of the image's"),
)

MAIN_KEYS = {key for setting in MAIN_SETTINGS for key in setting.keys}
APP_KEYS = {key for setting in APP_SETTINGS + FIRST_DEPLOY_SETTINGS for key in setting.keys}


def settings_table(settings: Sequence[Setting], second: str = "default") -> str:
    """The settings as README.md's Markdown table."""
    rows = ["| setting | %s | meaning |" % second, "|---|---|---|"]
    for setting in settings:
        keys = ", ".join("`%s`" % key for key in setting.keys) or "*(environment)*"
        rows.append("| %s | %s | %s |" % (keys, setting.default, setting.meaning))
    return "\n".join(rows) + "\n"


def config_reference() -> str:
    """`config reference`: the three tables of README.md's Configuration."""
    return "\n".join((settings_table(MAIN_SETTINGS), settings_table(APP_SETTINGS),
                      settings_table(FIRST_DEPLOY_SETTINGS, "example")))


def config_example() -> str:
    """`config example`: a configuration with every setting explained and
    commented out. As it stands it is valid and follows the labelled
    containers; `install` writes it as /etc/autodeploy/autodeploy.conf."""
    parts = [_comment(EXAMPLE_HEADER % __version__), "", "[autodeploy]", ""]
    parts += _commented_settings(MAIN_SETTINGS)
    parts += [_comment(EXAMPLE_APP_HEADER), "", "#[myname/myrepo]", ""]
    parts += _commented_settings(APP_SETTINGS)
    parts += [_comment("Used only for the first deploy, when no container of that name exists "
                       "yet (afterwards the running container's own configuration is kept):"), ""]
    parts += _commented_settings(FIRST_DEPLOY_SETTINGS, defaults=False)
    return "\n".join(parts)


EXAMPLE_HEADER = (
    "autodeploy %s configuration (printed by autodeploy.pyz config example). Every "
    "setting is shown commented out, with its default or an example; README.md, "
    "Configuration, has the same text. Unknown settings are errors.\n\n"
    "As it stands this file follows every container labelled autodeploy.enable=true. The "
    "deploy token is not written here: the systemd unit passes /etc/autodeploy/token to "
    "the service as its credential \"token\". autodeploy.pyz check tests a change, "
    "systemctl reload autodeploy applies it.")
EXAMPLE_APP_HEADER = (
    "One section per repository allowed to deploy, named as the webhook names it "
    "([myname/myrepo], or [team/app] for registry.example:5000/team/app). Uncomment "
    "the section's name and what you need.")


def _commented_settings(settings: Sequence[Setting], defaults: bool = True) -> List[str]:
    """Each setting: its meaning, then `#key = value` (its default, or an
    example; the default is then said in words)."""
    lines = []
    for setting in settings:
        literals = re.findall(r"`([^`]*)`", setting.default)
        only_literals = re.fullmatch(r"(`[^`]*`(, )?)+", setting.default) is not None
        heading = "%s: %s" % (", ".join(setting.keys) or "environment", _plain(setting.meaning))
        if defaults and setting.keys and setting.default not in ("—", "none", "any") and (
                setting.examples or not only_literals):
            heading += " (default: %s)" % _plain(setting.default)
        lines.append(_comment(heading))
        for index, key in enumerate(setting.keys):
            if setting.examples:
                value = setting.examples[index]
            else:
                value = literals[index] if only_literals and index < len(literals) else ""
            lines.append(("#%s = %s" % (key, value)).rstrip())
        lines.append("")
    return lines


def _plain(markdown: str) -> str:
    """Markdown as plain text for a comment: links keep their text."""
    text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", markdown)
    return text.replace("`", "").replace("**", "").replace("\\|", "|").replace("*", "")


def _comment(text: str) -> str:
    """`text` as '# ' lines of at most 79 characters; paragraphs kept."""
    return "\n".join("\n".join(textwrap.wrap(paragraph, 77, initial_indent="# ",
                                              subsequent_indent="# ", break_on_hyphens=False))
                     or "#" for paragraph in text.split("\n"))


def load_config(path: str, environ: Optional[Mapping[str, str]] = None) -> Config:
    """Read and check the INI file at `path`; ConfigError names the file,
    section or line, and what is wrong. Deploy tokens also come from
    $AUTODEPLOY_TOKEN and from systemd's $CREDENTIALS_DIRECTORY/token."""
    environ = os.environ if environ is None else environ
    parser = configparser.ConfigParser(interpolation=None, default_section="\0defaults")
    parser.optionxform = str  # keys as written: env and label names are case-sensitive
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh, source=path)
    except OSError as exc:
        raise ConfigError("%s: cannot read the configuration: %s" % (path, exc.strerror or exc)) from exc
    except configparser.Error as exc:
        raise ConfigError("%s: %s" % (path, " ".join(str(exc).split()))) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: not UTF-8 text (%s)" % (path, exc.reason)) from exc
    return config_from(parser, path, environ)


def default_config(environ: Optional[Mapping[str, str]] = None) -> Config:
    """The configuration with no file: every setting's default, tokens from
    the environment, every labelled container followed (no sections)."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0defaults")
    parser.read_dict({"autodeploy": {}})
    path = os.path.join(os.getcwd(), NO_CONFIG)
    return config_from(parser, path, os.environ if environ is None else environ)


def config_from(parser: configparser.ConfigParser, path: str, environ: Mapping[str, str]) -> Config:
    """Check a parsed configuration (`path`: where it was read, its folder
    the base of relative paths)."""
    if not parser.has_section("autodeploy"):
        raise ConfigError("%s: no [autodeploy] section" % path)
    main = parser["autodeploy"]
    where = "%s: [autodeploy]" % path
    base = os.path.dirname(os.path.abspath(path))
    _reject_unknown_keys(main, MAIN_KEYS, where, path)
    host, port = _parse_listen(main.get("listen", DEFAULT_LISTEN), where)
    notify = _parse_notify(main, where, ("", "", AppConfig._field_defaults["notify_on"]))
    default_poll = _poll_option(main, where, 0.0)
    apps = {}
    for name in parser.sections():
        if name != "autodeploy":
            _reject_unknown_keys(parser[name], APP_KEYS, "%s: [%s]" % (path, name), path)
            apps[name] = _parse_app(name, parser[name], "%s: [%s]" % (path, name), base, notify,
                                    default_poll)
            warning = poll_warning(apps[name])
            if warning:
                log.warning("%s: [%s] %s", path, name, warning)
    containers = collections.Counter(app.container for app in apps.values())
    for container, count in containers.items():
        if count > 1:
            raise ConfigError("%s: %d sections deploy to the same container %r"
                              % (path, count, container))
    tls_cert, tls_key = main.get("tls_cert") or None, main.get("tls_key") or None
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("%s tls_cert and tls_key: give both, or neither" % where)
    return Config(
        path=path, listen_host=host, listen_port=port,
        tokens=_read_tokens(main, where, base) + _tokens_from_environment(environ, where),
        workers=_int_option(main, "workers", DEFAULT_WORKERS, where, 1, 64),
        state_dir=os.path.join(base, main.get("state_dir") or default_state_dir(environ)),
        callback_allow=[_parse_origin(o, where) for o in _split_list(
            main.get("callback_allow", DEFAULT_CALLBACK_ALLOW))],
        max_body=_int_option(main, "max_body", DEFAULT_MAX_BODY, where, 1024, 16 * 1024 * 1024),
        max_queue=_int_option(main, "max_queue", 100, where, 1, 100000),
        docker_host=main.get("docker_host") or None,
        docker_config=main.get("docker_config") or None,
        apps=apps,
        signing_secret=_read_secret(main, where, base),
        allow_from=_parse_networks(main, "allow_from", where),
        trusted_proxies=_parse_networks(main, "trusted_proxies", where),
        max_connections=_int_option(main, "max_connections", DEFAULT_MAX_CONNECTIONS, where, 1, 10000),
        request_timeout=_float_option(main, "request_timeout", DEFAULT_REQUEST_TIMEOUT, where, 0.5, 600),
        header_timeout=_float_option(main, "header_timeout", DEFAULT_HEADER_TIMEOUT, where, 0.5, 600),
        keepalive_timeout=_float_option(main, "keepalive_timeout", DEFAULT_KEEPALIVE_TIMEOUT, where,
                                        0.5, 600),
        max_header_bytes=_int_option(main, "max_header_bytes", DEFAULT_MAX_HEADER_BYTES, where,
                                     1024, 65536),
        max_connections_per_source=_int_option(main, "max_connections_per_source",
                                               DEFAULT_MAX_CONNECTIONS_PER_SOURCE, where, 1, 10000),
        tls_cert=tls_cert and os.path.join(base, tls_cert),
        tls_key=tls_key and os.path.join(base, tls_key),
        engine_wait=_float_option(main, "engine_wait", ENGINE_WAIT, where, 0, 3600),
        journal=_bool_option(main, "journal", True, where),
        keep_jobs=_int_option(main, "keep_jobs", 200, where, 1, 1000000),
        keep_days=_float_option(main, "keep_days", 30, where, 0.001, 36500),
        admin_tokens=tuple(_read_tokens(main, where, base, "admin_token") + _checked_tokens(
            _credential(environ, "admin_token", where), where + " (credential 'admin_token')")),
        metrics_public=_bool_option(main, "metrics_public", False, where),
        stop_deadline=_float_option(main, "stop_deadline", 30, where, 0, 3600),
        label_prefix=_label_prefix(main, where))


def _label_prefix(main: configparser.SectionProxy, where: str) -> str:
    prefix = main.get("label_prefix", DEFAULT_LABEL_PREFIX).strip()
    if not LABEL_PREFIX_RE.match(prefix):
        raise ConfigError("%s label_prefix: %r; letters, digits and . _ - (such as autodeploy)"
                          % (where, prefix))
    return prefix


def _parse_app(repository: str, section: configparser.SectionProxy, where: str, base: str,
               notify: Tuple[str, str, FrozenSet[str]], default_poll: float = 0.0) -> AppConfig:
    _reject_unknown_keys(section, APP_KEYS, where)
    tag_policy = section.get("tag_policy", "exact").strip()
    if tag_policy not in TAG_POLICIES:
        raise ConfigError("%s tag_policy: %r; use %s" % (where, tag_policy, ", ".join(TAG_POLICIES)))
    prerelease = _bool_option(section, "prerelease", False, where)
    tags = _followed_tags(section, tag_policy, prerelease, where)
    service = section.get("service", "").strip()
    if service and not CONTAINER_NAME_RE.match(service):
        raise ConfigError("%s service: %r is not a valid Swarm service name" % (where, service))
    if service and "container" in section:
        raise ConfigError("%s: set container or service, not both" % where)
    # A service's name stands in the journal's and /jobs' `container` too.
    container = section.get("container") or service or repository.replace("/", "-")
    if not CONTAINER_NAME_RE.match(container):
        raise ConfigError("%s container: %r is not a valid container name" % (where, container))
    image = section.get("image") or repository
    if not IMAGE_RE.match(image):
        raise ConfigError("%s image: %r is not an image name such as registry.example:5000/team/app "
                          "(give the tag with 'tag =')" % (where, image))
    stop = section.get("stop_timeout")
    restart = section.get("restart", "")
    if restart and not re.match(r"^(no|always|unless-stopped|on-failure(:\d+)?)$", restart):
        raise ConfigError("%s restart: %r; use no, always, unless-stopped or on-failure[:N]"
                          % (where, restart))
    try:
        command = shlex.split(section.get("command", ""))
    except ValueError as exc:
        raise ConfigError("%s command: %s" % (where, exc)) from exc
    order = section.get("order", "auto")
    if order not in ("auto", "stop-first", "start-first"):
        raise ConfigError("%s order: %r; use auto, stop-first or start-first" % (where, order))
    health_url = section.get("health_url", "")
    if health_url and not re.match(r"^https?://[^/\s]+(/\S*)?$", health_url):
        raise ConfigError("%s health_url: %r; expected http://HOST:PORT/PATH ({ip} stands for "
                          "the new container's address)" % (where, health_url))
    health_tcp = section.get("health_tcp", "")
    if health_tcp and not re.match(r"^[^\s:/]+:\d+$|^\[[0-9a-fA-F:]+\]:\d+$", health_tcp):
        raise ConfigError("%s health_tcp: %r; expected HOST:PORT" % (where, health_tcp))
    try:
        remove_old_image = section.getboolean("remove_old_image", True)
    except ValueError:
        raise ConfigError("%s remove_old_image: use yes or no" % where) from None
    return AppConfig(
        repository=repository, image=image, tags=tags, container=container,
        tag_policy=tag_policy, prerelease=prerelease, poll=_poll_option(section, where, default_poll),
        stop_timeout=None if stop is None else _int_option(section, "stop_timeout", 10, where, -1, 3600),
        order=order, health_url=health_url, health_tcp=health_tcp,
        health_timeout=_int_option(section, "health_timeout", 60, where, 1, 3600),
        service=service, swarm_timeout=_int_option(section, "swarm_timeout", 300, where, 1, 86400),
        settle=_int_option(section, "settle", 3, where, 0, 600),
        cooldown=_float_option(section, "cooldown", 1.0, where, 0, 3600),
        remove_old_image=remove_old_image,
        ports=[_parse_port(p, where) for p in _split_list(section.get("ports", ""))],
        env=[_parse_assignment(line, "env", where) for line in _lines(section.get("env", ""))],
        volumes=[_parse_volume(v, where) for v in _split_list(section.get("volumes", ""))],
        labels=dict(_parse_assignment(line, "labels", where).split("=", 1)
                    for line in _lines(section.get("labels", ""))),
        restart=restart, network=section.get("network", ""), command=command,
        tokens=tuple(_read_tokens(section, where, base)),
        signing_secret=_read_secret(section, where, base),
        settings=frozenset(section.keys()),
        **_read_registry_login(section, where, base),
        **dict(zip(("notify_url", "slack_url", "notify_on"), _parse_notify(section, where, notify))))


TAG_POLICIES = ("exact", "glob", "patch", "minor", "major")
SEMVER_POLICIES = ("patch", "minor", "major")
# fnmatch patterns over Docker tags: a tag's characters and the wildcards * ? [...] [!...].
TAG_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,128}$")
DURATION_RE = re.compile(r"^(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?$")
POLL_WARN_BELOW = 60.0  # seconds: a shorter poll of a Docker Hub image is warned about


def _followed_tags(section: configparser.SectionProxy, policy: str, prerelease: bool,
                   where: str) -> Tuple[str, ...]:
    """`tag` as the policy reads it: exact, the tags (default latest); glob,
    the patterns (required); patch/minor/major, nothing or the one version
    to start from while the running version is unknown."""
    values = _split_list(section.get("tag", "latest" if policy == "exact" else ""))
    if policy == "exact":
        if prerelease:
            raise ConfigError("%s prerelease: no effect with tag_policy = exact, which follows the "
                              "listed tags whatever they are" % where)
        for tag in values:
            if not TAG_RE.match(tag):
                raise ConfigError("%s tag: %r is not a valid Docker tag" % (where, tag))
        if not values:
            raise ConfigError("%s tag: empty; name at least one tag to follow" % where)
    elif policy == "glob":
        for pattern in values:
            if not TAG_PATTERN_RE.match(pattern):
                raise ConfigError("%s tag: %r is not a tag pattern (a tag's letters, digits and "
                                  "_ . -, with the wildcards * ? [...])" % (where, pattern))
        if not values:
            raise ConfigError("%s tag: tag_policy = glob follows the tags matching the patterns "
                              "given here, such as v1.*; none is" % where)
    else:
        if len(values) > 1:
            raise ConfigError("%s tag: with tag_policy = %s, at most one version, the one to start "
                              "from; %d are given" % (where, policy, len(values)))
        for tag in values:
            version = SemVer.parse(tag) if TAG_RE.match(tag) else None
            if version is None:
                raise ConfigError("%s tag: %r is not a version such as v1.2.0 (with tag_policy = %s "
                                  "it names the version to start from)" % (where, tag, policy))
            if version.prerelease and not prerelease:
                raise ConfigError("%s tag: %s is a pre-release, and prerelease = no" % (where, tag))
    return tuple(values)


def parse_duration(text: str) -> Optional[float]:
    """Seconds in '90s', '5m', '2h' or '1h30m' (whole numbers, h m s in that
    order); None when `text` is no such duration."""
    match = DURATION_RE.match(text.strip().lower())
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def format_seconds(seconds: float) -> str:
    """A duration for a log line or a description: 3.39299 -> '3.4 s',
    0.26 -> '0.3 s', 0.013 -> '0.01 s', 12.7 -> '13 s', 120 -> '120 s' (tenths under 10 s,
    hundredths under 0.1 s, whole seconds from 10 s; no trailing .0)."""
    if seconds >= 10:
        return "%d s" % round(seconds)
    return "%g s" % round(seconds, 1 if seconds >= 0.1 else 2)


def format_duration(seconds: float) -> str:
    """90 -> '1m30s', 3600 -> '1h': as `poll` is written."""
    whole = int(seconds)
    parts = [(whole // 3600, "h"), (whole % 3600 // 60, "m"), (whole % 60, "s")]
    return "".join("%d%s" % (count, unit) for count, unit in parts if count) or "0s"


def _poll_option(section: configparser.SectionProxy, where: str, default: float) -> float:
    """`poll` in seconds: a duration of at least 1 s, or no (0: no polling)."""
    raw = section.get("poll")
    if raw is None:
        return default
    if raw.strip().lower() in ("no", "off", "false"):
        return 0.0
    seconds = parse_duration(raw)
    if seconds is None:
        raise ConfigError("%s poll: %r; use a duration such as 30s, 5m or 1h30m, or no" % (where, raw))
    if seconds < 1:
        raise ConfigError("%s poll: %r; at least 1s (no turns polling off)" % (where, raw))
    return seconds


def poll_warning(app: AppConfig) -> Optional[str]:
    """What is unwise about the app's poll interval, or None: under a minute
    for an image on Docker Hub, which rate-limits its registry's requests."""
    if 0 < app.poll < POLL_WARN_BELOW and dockerapi.registry_of(app.image) == dockerapi.DOCKER_HUB:
        return ("poll = %s asks Docker Hub more than once a minute, and Docker Hub rate-limits "
                "its registry's requests; 1m or more is advised" % format_duration(app.poll))
    return None


def _parse_notify(section: configparser.SectionProxy, where: str,
                  inherited: Tuple[str, str, FrozenSet[str]]) -> Tuple[str, str, FrozenSet[str]]:
    """(notify_url, slack_url, notify_on): the section's own, else `inherited`.
    An empty URL turns off one the [autodeploy] section set."""
    urls = []
    for key, default in zip(("notify_url", "slack_url"), inherited):
        url = section.get(key, default).strip()
        problem = url and outbound_url_problem(url)
        if problem:
            raise ConfigError("%s %s: %s (%s)" % (where, key, problem, _mask_url(url)))
        urls.append(url)
    events = inherited[2]
    if "notify_on" in section:
        events = frozenset(_split_list(section["notify_on"]))
        choices = {meaning.event for meaning in STATES.values() if meaning.event}
        unknown = events - choices
        if unknown:
            raise ConfigError("%s notify_on: %s; use any of %s" % (
                where, ", ".join(sorted(unknown)), ", ".join(sorted(choices, reverse=True))))
    return urls[0], urls[1], events


def outbound_url_problem(url: str) -> Optional[str]:
    """Why `url` may not receive notifications, or None: http(s) only, no
    credentials in it, and https unless the receiver is on this host (the
    URL of an incoming webhook is its password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # a ValueError for a port out of range
    except ValueError as exc:
        return "not a URL: %s" % exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "use an http(s)://HOST/... URL"
    if "@" in parts.netloc:
        return "no user or password in the URL"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return "use https (plain http only to this host)"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reject_unknown_keys(section: configparser.SectionProxy, known: Set[str], where: str,
                         path: str = "") -> None:
    """A setting nobody reads is an error, not a silent no-op: named with
    its line in `path` and the known setting it most resembles."""
    for key in section:
        if key not in known:
            line = _line_of(path, section.name, key) if path else None
            import difflib  # here: only a wrong config needs it (~0.2 MiB a service need not hold)
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            raise ConfigError("%s%s: unknown setting %r (%s)" % (
                where, " line %d" % line if line else "", key,
                "did you mean %r?" % close[0] if close else "known: " + ", ".join(sorted(known))))


def _line_of(path: str, section: str, key: str) -> Optional[int]:
    """The line of `path` that sets `key` in [section]; None when it cannot
    be told (no file). Read again only for an error message: configparser
    keeps no line numbers."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    current = None
    for number, line in enumerate(lines, 1):
        header = re.match(r"\s*\[(.*)\]\s*$", line)
        if header:
            current = header.group(1)
        elif current == section and re.match(r"%s\s*[=:]" % re.escape(key), line):
            return number
    return None


def _read_tokens(main: configparser.SectionProxy, where: str, base: str,
                 key: str = "token") -> List[str]:
    """The tokens of `key` (token, admin_token), and those of the file
    `<key>_file` names (relative to the config file's folder)."""
    tokens = _split_list(main.get(key, ""))
    token_file = main.get(key + "_file")
    if token_file:
        token_path = os.path.join(base, token_file)
        try:
            with open(token_path, encoding="utf-8") as fh:
                tokens += _split_list(fh.read())
        except OSError as exc:
            raise ConfigError("%s %s_file: cannot read %s: %s"
                              % (where, key, token_path, exc.strerror or exc)) from exc
    return _checked_tokens(tokens, where)


def default_state_dir(environ: Mapping[str, str]) -> str:
    """$STATE_DIRECTORY under systemd (StateDirectory=), else
    /var/lib/autodeploy for root, else ./state."""
    if environ.get("STATE_DIRECTORY"):
        return environ["STATE_DIRECTORY"].split(":")[0]
    return "/var/lib/autodeploy" if os.geteuid() == 0 else "state"


def _bool_option(section: configparser.SectionProxy, key: str, default: bool, where: str) -> bool:
    try:
        return section.getboolean(key, default)
    except ValueError:
        raise ConfigError("%s %s: use yes or no" % (where, key)) from None


def _tokens_from_environment(environ: Mapping[str, str], where: str) -> List[str]:
    """Tokens from $AUTODEPLOY_TOKEN and systemd's LoadCredential=token:..."""
    tokens = _split_list(environ.get("AUTODEPLOY_TOKEN", ""))
    tokens += _credential(environ, "token", where)
    return _checked_tokens(tokens, where + " (AUTODEPLOY_TOKEN or credential 'token')")


def _credential(environ: Mapping[str, str], name: str, where: str) -> List[str]:
    """The tokens in systemd's credential `name` ($CREDENTIALS_DIRECTORY/name);
    none when it was not given. One that cannot be read is an error that
    says why: reporting it as "no token" would hide a permission problem."""
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        return []
    path = os.path.join(credentials, name)
    try:
        with open(path, encoding="utf-8") as fh:
            return _split_list(fh.read())
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("%s: cannot read the systemd credential %r (%s): %s"
                          % (where, name, path, reason or exc)) from None


def _checked_tokens(tokens: List[str], where: str) -> List[str]:
    for token in tokens:
        _check_token(token, where)
    return tokens


def _check_token(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH or not re.match(r"^[A-Za-z0-9._~-]+$", token):
        raise ConfigError("%s token: each token must be at least %d URL-safe characters "
                          "(letters, digits, . _ ~ -); one is not" % (where, MIN_TOKEN_LENGTH))


def _read_secret(section: configparser.SectionProxy, where: str, base: str) -> str:
    """signing_secret, or the first line of signing_secret_file."""
    secret = section.get("signing_secret", "")
    secret_file = section.get("signing_secret_file")
    if secret_file:
        try:
            with open(os.path.join(base, secret_file), encoding="utf-8") as fh:
                secret = fh.readline().strip()
        except OSError as exc:
            raise ConfigError("%s signing_secret_file: cannot read %s: %s"
                              % (where, secret_file, exc.strerror or exc)) from exc
    if secret and len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError("%s signing_secret: at least %d characters" % (where, MIN_SECRET_LENGTH))
    return secret


def _read_registry_login(section: configparser.SectionProxy, where: str, base: str) -> Dict[str, str]:
    """registry_user, and the password from registry_password_file (read
    now, as the other secret files are: a bad file shows at `check` and at
    start, not at the next push; a new password takes a reload)."""
    user = section.get("registry_user", "").strip()
    password_file = section.get("registry_password_file", "").strip()
    if not user and not password_file:
        return {}
    if not user or not password_file:
        raise ConfigError("%s registry_user and registry_password_file: give both, or neither" % where)
    path = os.path.join(base, password_file)
    try:
        with open(path, encoding="utf-8") as fh:
            password = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("%s registry_password_file: cannot read %s: %s"
                          % (where, path, reason or exc)) from None
    if password.endswith("\n"):  # one trailing newline is the editor's, not the password's
        password = password[:-2] if password.endswith("\r\n") else password[:-1]
    if not password:
        raise ConfigError("%s registry_password_file: %s is empty" % (where, path))
    return {"registry_user": user, "registry_password": password, "registry_password_file": path}


def _parse_networks(section: configparser.SectionProxy, key: str, where: str) -> Tuple[Network, ...]:
    networks = []
    for value in _split_list(section.get(key, "")):
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ConfigError("%s %s: %r is not an address or CIDR network such as "
                              "192.0.2.0/24 or 2001:db8::/32" % (where, key, value)) from None
    return tuple(networks)


def _int_option(section: configparser.SectionProxy, key: str, default: int, where: str,
                low: int, high: int) -> int:
    return _number_option(section, key, default, where, low, high, int, "a whole number")


def _float_option(section: configparser.SectionProxy, key: str, default: float, where: str,
                  low: float, high: float) -> float:
    return _number_option(section, key, default, where, low, high, float, "a number")


def _number_option(section: configparser.SectionProxy, key: str, default: Any, where: str,
                   low: Any, high: Any, kind: Callable[[str], Any], what: str) -> Any:
    raw = section.get(key)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError("%s %s: %r is not %s" % (where, key, raw, what)) from None
    if not low <= value <= high:
        raise ConfigError("%s %s: %s is outside %s..%s" % (where, key, raw, low, high))
    return value


def _parse_listen(value: str, where: str) -> Tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError("%s listen: %r; expected HOST:PORT such as 127.0.0.1:3456" % (where, value))
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_origin(value: str, where: str) -> Tuple[str, str, int]:
    """'https://host[:port]' (or a bare host, meaning https) -> (scheme, host, port)."""
    parts = urllib.parse.urlsplit(value if "://" in value else "https://" + value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 \
            or parts.path not in ("", "/") or parts.username or parts.query:
        raise ConfigError("%s callback_allow: %r; expected https://HOST[:PORT]" % (where, value))
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _parse_port(value: str, where: str) -> Tuple[str, str, str]:
    """'[IP:]HOST:CONTAINER[/proto]' -> (host_ip, host_port, 'container/proto')."""
    spec, _, proto = value.partition("/")
    proto = proto or "tcp"
    parts = spec.rsplit(":", 2)
    if len(parts) == 2:
        parts.insert(0, "")
    if len(parts) != 3 or proto not in ("tcp", "udp", "sctp") \
            or not parts[2].isdigit() or not (parts[1] == "" or parts[1].isdigit()):
        raise ConfigError("%s ports: %r; expected [IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]" % (where, value))
    return parts[0].strip("[]"), parts[1], "%s/%s" % (parts[2], proto)


def _parse_volume(value: str, where: str) -> str:
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
        raise ConfigError("%s volumes: %r; expected SOURCE:/PATH[:ro]" % (where, value))
    return value


def _parse_assignment(line: str, key: str, where: str) -> str:
    if "=" not in line or not line.split("=", 1)[0].strip():
        raise ConfigError("%s %s: %r; expected NAME=VALUE, one per line" % (where, key, line))
    return line


def _split_list(value: str) -> List[str]:
    return [item for item in re.split(r"[\s,]+", value or "") if item]


def _lines(value: str) -> List[str]:
    return [line.strip() for line in (value or "").splitlines() if line.strip()]


############################################################################
# Sources: what a registry told us was pushed
############################################################################

class Push(NamedTuple):
    """One push, whoever sent it: the repository path as the sender names
    it, without the registry host ("team/app"); the tag ("" when the sender
    named none: a push by digest); the image digest when the sender gives
    one; the sender's name (SENDERS); where it wants the outcome posted; the
    registry host it named ("" if none); and its id for this delivery ("" if
    none), for telling a redelivery from a new push."""
    repository: str
    tag: str
    digest: str = ""
    sender: str = "dockerhub"
    callback_url: Optional[str] = None
    host: str = ""
    delivery: str = ""


class Parsed(NamedTuple):
    """What one request asked for: the pushes to act on (a distribution
    request may carry several, Quay names several tags) and short notes on
    what it carried that is not to be acted on (a pull, a blob push, a ping)."""
    sender: str
    pushes: List[Push]
    ignored: List[str]


# A digest we pass on to the Engine: sha256 only, as every sender here
# sends; anything else (samples in official docs have "xxxx" or 60 hex
# digits) is refused rather than pulled.
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# A registry host as an image reference names it: a DNS name or an address,
# IPv6 in brackets, and an optional port.
HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
                     r"(?::[0-9]{1,5})?$")
# A sender's delivery id (a GUID, an event id): kept to spot redeliveries.
DELIVERY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# The manifest media types a deployable push carries; a distribution push of
# anything else is a blob (a layer, a config) or an artifact that is no image.
MANIFEST_TYPES = frozenset([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])
DISTRIBUTION_TYPES = ("application/vnd.docker.distribution.events.v1+json",  # registry 2.x, GitLab
                      "application/vnd.docker.distribution.events.v2+json")  # registry 3.x
MAX_PUSHES = 50  # pushes one request may carry: each becomes a job
MAX_IGNORED_NOTES = 10  # notes on ignored events kept per request; the rest are counted


def check_sender_name(sender: Optional[str]) -> None:
    """PayloadError(404) naming the senders, when `sender` (from the URL) is none of them."""
    if sender is not None and sender not in SENDERS:
        raise PayloadError(404, "no sender is named %s: the senders are %s"
                           % (_shown(sender), ", ".join(SENDER_NAMES)))


def parse_request(body: bytes, headers: Any, sender: Optional[str] = None) -> Parsed:
    """What a webhook request asks for. `headers` answers get(name),
    case-insensitively; `sender` is the name the URL gave, or None to tell
    the sender from the headers and the body's shape. PayloadError 404 for a
    sender name not in SENDERS, 400 for a body no sender sends, or one whose
    sender's fields are missing or invalid (a digest included)."""
    check_sender_name(sender)
    if (sender in (None, "github") and header(headers, "X-GitHub-Event") is not None
            and _media_type(headers) == "application/x-www-form-urlencoded"):
        raise PayloadError(400, "GitHub sent a form-encoded payload: set the webhook's "
                           "content type to application/json")
    doc = read_json_object(body)
    name = sender or detect_sender(doc, headers)
    if name is None:
        raise PayloadError(400, "%snot a push from a sender autodeploy understands (%s; see the "
                           "README, Senders)" % (_known_non_webhook(doc), ", ".join(SENDER_NAMES)))
    parsed = SENDERS[name](doc, headers)
    if len(parsed.pushes) > MAX_PUSHES:
        raise PayloadError(400, "more than %d pushes in one request" % MAX_PUSHES)
    return parsed._replace(ignored=_counted(parsed.ignored))


def detect_sender(doc: Dict[str, Any], headers: Any) -> Optional[str]:
    """The sender of a request to /deploy/<token>: a header only one sender
    sets, else the shape of the body; None when no sender sends this."""
    if header(headers, "X-GitHub-Event") is not None:
        return "github"
    if header(headers, "X-JFrog-Event-Auth") is not None:
        return "jfrog"
    if _media_type(headers) in DISTRIBUTION_TYPES:
        return "distribution"
    for name, looks_like in SHAPES:
        if looks_like(doc):
            return name
    return None


def _known_non_webhook(doc: Dict[str, Any]) -> str:
    # Events some users will point here first: say what they are.
    if doc.get("source") == "aws.ecr":
        return ("an Amazon ECR event from EventBridge (an API destination's input transformer "
                "can send the native format instead): ")
    if "subscription" in doc and "message" in doc or doc.get("action") in ("INSERT", "DELETE"):
        return "a Google Artifact Registry Pub/Sub message: "
    return ""


def header(headers: Any, name: str) -> Optional[str]:
    """A request header's value, or None; `headers` is an HTTP message (or
    anything with get()), a plain dict (looked up case-insensitively), or None."""
    if headers is None:
        return None
    if isinstance(headers, dict):
        wanted = name.lower()
        return next((value for key, value in headers.items() if key.lower() == wanted), None)
    return headers.get(name)


def _media_type(headers: Any) -> str:
    return (header(headers, "Content-Type") or "").split(";", 1)[0].strip().lower()


# -- one parser per sender: a JSON object and the headers in, Parsed out ---

def parse_dockerhub(doc: Dict[str, Any], headers: Any = None) -> Parsed:
    """Docker Hub's push webhook: repository.repo_name, push_data.tag and
    a callback_url to report the outcome to. No digest, no delivery id."""
    repository = _text(doc, "repository.repo_name")
    tag = _text(doc, "push_data.tag")
    push = Push(repository=_repository(repository, "repository.repo_name"),
                tag=_tag(tag, "push_data.tag"), sender="dockerhub",
                callback_url=_callback_url(doc))
    return Parsed("dockerhub", [push], [])


def parse_quay(doc: Dict[str, Any], headers: Any = None) -> Parsed:
    """Quay's "Push to Repository" notification: docker_url (host/ns/name)
    or repository (ns/name), and updated_tags, a list of tags (in 2013's
    payloads an object {tag: image id}): one push per tag, no digest."""
    tags = doc.get("updated_tags")
    if isinstance(tags, dict):
        tags = list(tags)
    if not isinstance(tags, list):
        raise PayloadError(400, "updated_tags is not a list of tags" if tags is not None
                           else "no updated_tags in the payload")
    field = "docker_url" if doc.get("docker_url") is not None else "repository"
    host, path = split_reference(_text(doc, field), field)
    repository = _repository(path, field)
    pushes = [Push(repository, _tag(tag, "updated_tags[%d]" % i), sender="quay", host=host)
              for i, tag in enumerate(tags)]
    return Parsed("quay", pushes, [] if pushes else ["Quay push of %s naming no tag" % repository])


HARBOR_PUSHES = ("PUSH_ARTIFACT", "pushImage", "harbor.artifact.pushed")  # 2.x, 1.x, CloudEvents


def parse_harbor(doc: Dict[str, Any], headers: Any = None) -> Parsed:
    """Harbor's artifact push: type PUSH_ARTIFACT (2.x), pushImage (1.x) or,
    in the CloudEvents format, harbor.artifact.pushed with `data` for
    `event_data` and an event `id`. One push per resource: repository from
    repository.repo_full_name, host from resource_url, its tag (which is the
    digest when pushed by digest: then no tag) and digest. Other events
    (pulls, deletes, scans) are ignored."""
    cloud = "specversion" in doc
    kind, data_key = _text(doc, "type"), "data" if cloud else "event_data"
    data = doc.get(data_key)
    if kind not in HARBOR_PUSHES:
        return Parsed("harbor", [], ["Harbor %s event of %s" % (
            _shown_name(kind), _shown_name(_dig(data, "repository", "repo_full_name")))])
    if not isinstance(data, dict):
        raise PayloadError(400, "no %s object in the payload" % data_key)
    repository = _repository(_text(data, "repository.repo_full_name", data_key + "."),
                             data_key + ".repository.repo_full_name")
    delivery = _delivery(doc.get("id"), "id") if cloud else ""
    resources = data.get("resources")
    if not isinstance(resources, list) or not resources:
        raise PayloadError(400, "%s.resources lists no artifact" % data_key)
    pushes = []
    for i, resource in enumerate(resources):
        where = "%s.resources[%d]." % (data_key, i)
        if not isinstance(resource, dict):
            raise PayloadError(400, "%s is not an object" % where[:-1])
        digest = _digest(_text(resource, "digest", where, required=False), where + "digest")
        tag = _text(resource, "tag", where, required=False)
        if tag.startswith("sha256:"):  # pushed by digest: Harbor names the digest as the tag
            digest = digest or _digest(tag, where + "tag")
            tag = ""
        url = _text(resource, "resource_url", where, required=False)
        host = split_reference(url, where + "resource_url")[0] if url else ""
        pushes.append(Push(repository, _tag(tag, where + "tag", digest), digest, "harbor",
                           host=host, delivery=delivery))
    return Parsed("harbor", pushes, [])


GITHUB_PACKAGE_EVENTS = ("package", "registry_package")
GITHUB_PUSHES = ("published", "updated", "create")  # "create": ghcr.io's 2021 beta (package_v2)


def parse_github(doc: Dict[str, Any], headers: Any = None) -> Parsed:
    """GitHub's `package` (repository and organization webhooks) and
    `registry_package` (GitHub Apps) events for container images on
    ghcr.io: the image from package_version.package_url (else owner/name),
    lower-cased as ghcr.io names it; the tag and digest from
    container_metadata.tag (the tag name may be empty: a push by digest).
    A ping, other events and other packages are ignored."""
    event = header(headers, "X-GitHub-Event") or _github_event_of(doc)
    if event == "ping":
        return Parsed("github", [], ["GitHub ping"])
    if event not in GITHUB_PACKAGE_EVENTS:
        return Parsed("github", [], ["GitHub %s event" % _shown_name(event)])
    package = doc.get(event)
    if not isinstance(package, dict):
        raise PayloadError(400, "no %s object in the payload" % event)
    action = doc.get("action")
    kinds = {str(package.get(key) or "").lower() for key in ("package_type", "ecosystem")}
    if not kinds & {"container", "docker"}:
        return Parsed("github", [], ["GitHub package event %s of a non-container package"
                                     % _shown_name(action)])
    if action not in GITHUB_PUSHES:
        return Parsed("github", [], ["GitHub package event %s of %s"
                                     % (_shown_name(action), _shown_name(package.get("name")))])
    where = event + ".package_version."
    metadata = _dig(package, "package_version", "container_metadata")
    if not isinstance(metadata, dict):
        raise PayloadError(400, "no %scontainer_metadata in the payload: only container images on "
                           "ghcr.io are understood" % where)
    tag = _text(metadata, "tag.name", where + "container_metadata.", required=False)
    digest = _digest(_text(metadata, "tag.digest", where + "container_metadata.", required=False),
                     where + "container_metadata.tag.digest")
    host, path, field = _github_image(package, event)
    delivery = header(headers, "X-GitHub-Delivery")
    push = Push(_repository(path, field), _tag(tag, where + "container_metadata.tag.name", digest),
                digest, "github", host=host,
                delivery=_delivery(delivery, "X-GitHub-Delivery") if delivery else "")
    return Parsed("github", [push], [])


def _github_event_of(doc: Dict[str, Any]) -> str:
    # No X-GitHub-Event (a relay dropped it): the body tells.
    for event in GITHUB_PACKAGE_EVENTS:
        if event in doc:
            return event
    return "ping" if "zen" in doc and "hook_id" in doc else "unknown"


def _github_image(package: Dict[str, Any], event: str) -> Tuple[str, str, str]:
    """(host, path, field it came from) of a GitHub package's image."""
    url = _dig(package, "package_version", "package_url")
    if isinstance(url, str) and url:  # "ghcr.io/Owner/name:tag", with an empty tag at times
        field = event + ".package_version.package_url"
        host, path = split_reference(_without_tag(url), field)
        return host or "ghcr.io", path.lower(), field
    owner = _dig(package, "owner", "login") or package.get("namespace")
    name = package.get("name")
    if not isinstance(owner, str) or not isinstance(name, str) or not owner or not name:
        raise PayloadError(400, "no %s.package_version.package_url, nor %s.owner.login and "
                           "%s.name, in the payload" % (event, event, event))
    return "ghcr.io", ("%s/%s" % (owner, name)).lower(), event + ".name"


def parse_acr(doc: Dict[str, Any], headers: Any = None) -> Parsed:
    """Azure Container Registry's webhook: action push with request.host and
    target.repository, target.tag (none when pushed by digest) and
    target.digest; the event id. Pings, deletes and chart events are ignored."""
    action = _text(doc, "action")
    if action != "push":
        what = "ACR ping" if action == "ping" else "ACR %s of %s" % (
            _shown_name(action), _shown_name(_dig(doc, "target", "repository")))
        return Parsed("acr", [], [what])
    digest = _digest(_text(doc, "target.digest", required=False), "target.digest")
    host = _text(doc, "request.host", required=False)
    push = Push(_repository(_text(doc, "target.repository"), "target.repository"),
                _tag(_text(doc, "target.tag", required=False), "target.tag", digest), digest, "acr",
                host=_host(host, "request.host") if host else "",
                delivery=_delivery(doc.get("id"), "id") if doc.get("id") is not None else "")
    return Parsed("acr", [push], [])


def parse_jfrog(doc: Dict[str, Any], headers: Any = None) -> Parsed:
    """JFrog Artifactory's docker "pushed" event: the image is
    data.repo_key/data.image_name, the path `docker pull` uses with
    Artifactory's default (repository path) access method; the host from
    jpd_origin; data.tag; data.sha256, the pushed manifest's digest.
    Other domains and event types are ignored."""
    domain, event = _text(doc, "domain"), _text(doc, "event_type")
    data = doc.get("data")
    if domain != "docker":
        return Parsed("jfrog", [], ["JFrog %s event %s" % (_shown_name(domain), _shown_name(event))])
    if event != "pushed":
        return Parsed("jfrog", [], ["JFrog docker event %s of %s" % (
            _shown_name(event), _shown_name(_dig(data, "image_name")))])
    if not isinstance(data, dict):
        raise PayloadError(400, "no data object in the payload")
    path = "%s/%s" % (_text(data, "repo_key", "data."), _text(data, "image_name", "data."))
    sha256 = _text(data, "sha256", "data.", required=False)
    digest = _digest(sha256 if not sha256 or sha256.startswith("sha256:") else "sha256:" + sha256,
                     "data.sha256")
    origin = _text(doc, "jpd_origin", required=False)
    push = Push(_repository(path, "data.repo_key and data.image_name"),
                _tag(_text(data, "tag", "data."), "data.tag"), digest, "jfrog",
                host=_url_host(origin, "jpd_origin") if origin else "")
    return Parsed("jfrog", [push], [])


def parse_distribution(doc: Dict[str, Any], headers: Any = None) -> Parsed:
    """The CNCF distribution registry's notifications (GitLab's registry
    sends them too): {"events": [...]}, several per request. A push of an
    image manifest is a push (tag "" when pushed by digest); blob pushes,
    pulls, deletes and the rest are ignored."""
    events = doc.get("events")
    if not isinstance(events, list):
        raise PayloadError(400, "no events list in the payload")
    pushes, ignored = [], []
    for i, event in enumerate(events):
        where = "events[%d]." % i
        if not isinstance(event, dict):
            raise PayloadError(400, "%s is not an object" % where[:-1])
        action = _text(event, "action", where)
        media_type = _dig(event, "target", "mediaType")
        name = _shown_name(_dig(event, "target", "repository"))
        if action == "push" and isinstance(media_type, str) and media_type in MANIFEST_TYPES:
            pushes.append(_distribution_push(event, where))
        elif action == "push":
            ignored.append("blob push of %s" % name if _is_blob(media_type)
                           else "push of %s of type %s" % (name, _shown_name(media_type)))
        else:
            ignored.append("%s of %s" % (_shown_name(action), name))
    return Parsed("distribution", pushes, ignored if events else ["no events"])


def _distribution_push(event: Dict[str, Any], where: str) -> Push:
    digest = _digest(_text(event, "target.digest", where), where + "target.digest")
    host = _text(event, "request.host", where, required=False)
    event_id = event.get("id")
    return Push(_repository(_text(event, "target.repository", where), where + "target.repository"),
                _tag(_text(event, "target.tag", where, required=False), where + "target.tag", digest),
                digest, "distribution", host=_host(host, where + "request.host") if host else "",
                delivery=_delivery(event_id, where + "id") if event_id is not None else "")


def _is_blob(media_type: Any) -> bool:
    # Layers and image configs; an unknown manifest type (a schema 1
    # manifest, an artifact) is named as what it is instead.
    return not isinstance(media_type, str) or not ("manifest" in media_type or "index" in media_type)


NATIVE_FIELDS = ("image", "tag", "digest", "callback_url")


def parse_native(doc: Dict[str, Any], headers: Any = None) -> Parsed:
    """autodeploy's own format, for CI scripts: {"image": "[host/]team/app",
    "tag": "v2", "digest": "sha256:..."}; a tag, a digest or both, and an
    optional callback_url. Any other field is refused (a typo would
    otherwise go unnoticed)."""
    unknown = sorted(set(doc) - set(NATIVE_FIELDS))
    if unknown:
        raise PayloadError(400, "unknown field %s: the fields are %s"
                           % (_shown(unknown[0]), ", ".join(NATIVE_FIELDS)))
    image = _text(doc, "image")
    if image != _without_tag(image):
        raise PayloadError(400, 'image names a tag or a digest: give them as "tag" and "digest"')
    host, path = split_reference(image, "image")
    digest = _digest(_text(doc, "digest", required=False), "digest")
    push = Push(_repository(path, "image"), _tag(_text(doc, "tag", required=False), "tag", digest),
                digest, "native", callback_url=_callback_url(doc), host=host)
    return Parsed("native", [push], [])


# Sender name (as in /deploy/<sender>/<token>) -> its parser.
SENDERS: Dict[str, Callable[[Dict[str, Any], Any], Parsed]] = {
    "dockerhub": parse_dockerhub,
    "quay": parse_quay,
    "harbor": parse_harbor,
    "github": parse_github,
    "acr": parse_acr,
    "jfrog": parse_jfrog,
    "distribution": parse_distribution,
    "native": parse_native,
}
SENDER_NAMES: Tuple[str, ...] = tuple(SENDERS)

# How each sender's body looks, for a request to /deploy/<token> whose
# headers did not tell (no sender's fields overlap another's here).
SHAPES: Tuple[Tuple[str, Callable[[Dict[str, Any]], bool]], ...] = (
    ("dockerhub", lambda doc: "push_data" in doc and "repository" in doc),
    ("quay", lambda doc: "updated_tags" in doc),
    ("harbor", lambda doc: "event_data" in doc and "type" in doc
     or "specversion" in doc and str(doc.get("type", "")).startswith("harbor.")),
    ("github", lambda doc: any(event in doc for event in GITHUB_PACKAGE_EVENTS) and "action" in doc
     or "zen" in doc and "hook_id" in doc),
    ("jfrog", lambda doc: "domain" in doc and "event_type" in doc),
    ("distribution", lambda doc: isinstance(doc.get("events"), list)),
    ("acr", lambda doc: "action" in doc and ("target" in doc or doc.get("action") == "ping")),
    ("native", lambda doc: "image" in doc),
)


# -- fields: found, then checked ---------------------------------------------

def _text(doc: Any, path: str, where: str = "", required: bool = True) -> str:
    """The string at dotted `path` in `doc` ("" when absent and not
    required); PayloadError(400) naming where+path otherwise."""
    value = _dig(doc, *path.split("."))
    if value is None and not required:
        return ""
    if value is None or value == "" and required:
        raise PayloadError(400, "no %s%s in the payload" % (where, path))
    if not isinstance(value, str):
        raise PayloadError(400, "%s%s is not a string" % (where, path))
    return value


def _repository(value: str, field: str) -> str:
    if not REPOSITORY_RE.fullmatch(value) or len(value) > 255:
        raise PayloadError(400, "%s is not a valid repository name: %s (a path such as team/app: "
                           "lower-case letters, digits and . _ - between slashes, no registry "
                           "host, no tag)" % (field, _shown(value)))
    return value


def _tag(value: Any, field: str, digest: str = "") -> str:
    if value == "":  # fine when there is a digest to deploy: a push by digest
        if digest:
            return ""
        raise PayloadError(400, "no %s in the payload, and no digest" % field)
    if not isinstance(value, str) or not TAG_RE.fullmatch(value):
        raise PayloadError(400, "%s is not a valid tag: %s" % (field, _shown(value)))
    return value


def _digest(value: str, field: str) -> str:
    if value and not DIGEST_RE.fullmatch(value):
        raise PayloadError(400, "%s is not a valid digest (sha256: and 64 lower-case hex "
                           "digits): %s" % (field, _shown(value)))
    return value


def _host(value: str, field: str) -> str:
    if not HOST_RE.fullmatch(value):
        raise PayloadError(400, "%s is not a valid registry host: %s" % (field, _shown(value)))
    return value


def _url_host(url: str, field: str) -> str:
    try:
        netloc = urllib.parse.urlsplit(url if "//" in url else "//" + url).netloc
    except ValueError:
        netloc = ""
    return _host(netloc.rpartition("@")[2], field)


def _delivery(value: Any, field: str) -> str:
    if not isinstance(value, str) or not DELIVERY_RE.fullmatch(value):
        raise PayloadError(400, "%s is not a valid delivery id: %s" % (field, _shown(value)))
    return value


def _callback_url(doc: Dict[str, Any]) -> Optional[str]:
    callback = doc.get("callback_url")
    if callback is not None and not isinstance(callback, str):
        raise PayloadError(400, "callback_url is not a string")
    if callback and not _encodable(callback):  # "\ud800": the journal could not store it
        raise PayloadError(400, "callback_url is not valid Unicode")
    return callback or None


def split_reference(reference: str, field: str) -> Tuple[str, str]:
    """("host[:port]", "path") of an image name without tag, as Docker reads
    one: the first component is a registry host when it has a dot or a
    colon, or is localhost ("127.0.0.1:5000/nc/web" -> ("127.0.0.1:5000",
    "nc/web"); "team/app" -> ("", "team/app")). The host is checked here,
    the path by the caller."""
    first, slash, rest = reference.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return _host(first, field), rest
    return "", reference


def _without_tag(reference: str) -> str:
    # "host:5000/team/app:v1" and "...@sha256:..." -> "host:5000/team/app";
    # a trailing ":" (GitHub's package_url for an untagged version) too.
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _shown(value: Any) -> str:
    """A client's value in an error message: a string JSON-quoted, at most
    80 characters of it; anything else by its JSON type only."""
    if not isinstance(value, str):
        return "(%s)" % _JSON_TYPES.get(type(value), "a value")
    return json.dumps(value[:80] + ("..." if len(value) > 80 else ""))


def _shown_name(value: Any) -> str:
    """A client's value in a note on an ignored event: printable, short."""
    text = printable(value if isinstance(value, str) else "(none)" if value is None else repr(value))
    return text[:100]


_JSON_TYPES = {dict: "an object", list: "a list", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def _counted(notes: List[str]) -> List[str]:
    # A request of 50 blob pushes needs no 50 notes.
    if len(notes) <= MAX_IGNORED_NOTES:
        return notes
    return notes[:MAX_IGNORED_NOTES] + ["and %d more" % (len(notes) - MAX_IGNORED_NOTES)]


def read_json_object(body: bytes) -> Dict[str, Any]:
    """The body as a JSON object; PayloadError(400) for anything else
    (not UTF-8, not JSON, nested too deeply, a key given twice)."""
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_object_without_duplicates)
    except UnicodeDecodeError:
        raise PayloadError(400, "the body is not UTF-8") from None
    except ValueError as exc:
        raise PayloadError(400, "the body is not JSON: %s" % exc) from None
    except RecursionError:
        raise PayloadError(400, "the body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise PayloadError(400, "the body is not a JSON object")
    return doc


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _object_without_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    # Two "tag"s could mean one thing to us and another to a proxy that checked it.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate key in an object")
    return doc


def _dig(doc: Dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


############################################################################
# Tag policies: which pushed tag to deploy
############################################################################
#
# tag_policy = exact follows the listed tags; glob, the tags matching one of
# the listed patterns (fnmatch, case-sensitive); patch, minor and major,
# SemVer 2.0.0 versions within a bound of the version they count from: the
# same major.minor, the same major, any. That version (the anchor) is the
# running container's tag when it is a version, else the one version the
# app's `tag` may name; with neither, any version satisfies the bound.
# Under every policy but exact, a version older than the running one is
# not deployed, nor a pre-release unless prerelease = yes.

# SemVer 2.0.0's grammar (its BNF, as the specification's own regular
# expression), with a leading v or V tolerated: no leading zeros in numeric
# identifiers, pre-release identifiers after '-', build metadata after '+'.
SEMVER_RE = re.compile(
    r"^[vV]?(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?\Z")


class SemVer:
    """A SemVer 2.0.0 version, as the tag `text` spells it. Versions compare
    by precedence (the specification's §11), so build metadata is ignored:
    1.0.0+a == 1.0.0+b, and v1.0.0 == 1.0.0."""
    __slots__ = ("major", "minor", "patch", "prerelease", "build", "text")

    def __init__(self, major: int, minor: int, patch: int, prerelease: Tuple[str, ...] = (),
                 build: Tuple[str, ...] = (), text: str = ""):
        self.major, self.minor, self.patch = major, minor, patch
        self.prerelease, self.build = prerelease, build
        self.text = text or "%d.%d.%d%s%s" % (major, minor, patch,
                                               "-" + ".".join(prerelease) if prerelease else "",
                                               "+" + ".".join(build) if build else "")

    @staticmethod
    def parse(text: str) -> Optional["SemVer"]:
        """The version `text` spells ('1.2.3', 'v1.2.3-rc.1+build.5'), or None."""
        match = SEMVER_RE.match(text)
        if match is None:
            return None
        major, minor, patch, prerelease, build = match.groups()
        return SemVer(int(major), int(minor), int(patch),
                      tuple(prerelease.split(".")) if prerelease else (),
                      tuple(build.split(".")) if build else (), text)

    @property
    def precedence(self) -> Tuple[Any, ...]:
        """A key that sorts as §11 orders versions: major, minor and patch
        numerically; a pre-release before its release; pre-release
        identifiers one by one, numeric ones numerically and before
        alphanumeric ones, those in ASCII order, and a longer set after a
        shorter one it starts with. Build metadata plays no part."""
        if not self.prerelease:
            release: Tuple[Any, ...] = (1,)
        else:
            release = (0,) + tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                                   for part in self.prerelease)
        return (self.major, self.minor, self.patch, release)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SemVer) and self.precedence == other.precedence

    def __lt__(self, other: "SemVer") -> bool:
        return self.precedence < other.precedence

    def __le__(self, other: "SemVer") -> bool:
        return self.precedence <= other.precedence

    def __gt__(self, other: "SemVer") -> bool:
        return self.precedence > other.precedence

    def __ge__(self, other: "SemVer") -> bool:
        return self.precedence >= other.precedence

    def __hash__(self) -> int:
        return hash(self.precedence)

    def __repr__(self) -> str:
        return "SemVer(%r)" % self.text

    def __str__(self) -> str:
        return self.text


def tag_refusal(app: AppConfig, tag: str, running_tag: Optional[str] = None) -> Optional[str]:
    """None when a push of `tag` is to be deployed under the app's tag
    policy, with `running_tag` the tag the app's container runs (None: no
    container, or its image names no tag); else why not, in words."""
    if app.tag_policy == "exact":
        return None if tag in app.tags else "tag %s is not one of %s" % (tag, ", ".join(app.tags))
    version = SemVer.parse(tag)
    if app.tag_policy == "glob":
        if not _matches_pattern(app, tag):
            return "tag %s matches no pattern of %s" % (tag, ", ".join(app.tags))
        if version is None:
            return None  # a tag that is no version has no order to keep
    elif version is None:
        return "tag %s is not a version such as v1.2.3 (tag_policy = %s)" % (tag, app.tag_policy)
    if version.prerelease and not app.prerelease:
        return "pre-release %s not followed (prerelease = no)" % tag
    anchor, named = _anchor(app, running_tag)
    if anchor is None:
        return None
    if version < anchor:
        return "%s is older than %s" % (tag, named)
    if not _within_bound(app.tag_policy, version, anchor):
        return "%s is outside the %s policy from %s" % (tag, app.tag_policy, anchor.text)
    return None


def choose_tag(app: AppConfig, tags: Iterable[str], running_tag: Optional[str]) -> Optional[str]:
    """For a poll: which of the registry's `tags` to deploy, None when none
    is newer than the running one.

    exact: the tag whose digest to compare, the running one when it is
    followed, else the first listed (`tags` is not read). glob and
    patch/minor/major: the newest version by precedence that tag_refusal
    allows and that is newer than the running version; with no running
    version, the newest allowed one (for a semver policy counted from the
    version `tag` names, which may itself be chosen). A tag that is no
    version is never chosen: under glob it is followed by its digest only,
    while a container runs it. Among versions of equal precedence (v1.2.3
    and 1.2.3), the greater tag string wins, so the choice does not depend
    on the registry's order."""
    if app.tag_policy == "exact":
        return running_tag if running_tag in app.tags else app.tags[0]
    running = _running_version(app, running_tag)
    best: Optional[Tuple[Tuple[Any, ...], str]] = None
    for tag in tags:
        version = SemVer.parse(tag) if isinstance(tag, str) and TAG_RE.match(tag) else None
        if version is None or tag_refusal(app, tag, running_tag) is not None:
            continue
        if running is not None and not version > running:
            continue
        if best is None or (version.precedence, tag) > best:
            best = (version.precedence, tag)
    return best[1] if best else None


def running_tag_of(inspect: Dict[str, Any]) -> Optional[str]:
    """The tag a container's image reference (Config.Image) names: 'tag' of
    repo:tag, repo:tag@sha256:..., host:5000/repo:tag; None for a bare
    digest or image id, or a name with no tag."""
    image = _dig(inspect, "Config", "Image")
    name = image.split("@", 1)[0] if isinstance(image, str) else ""
    if not name or name.startswith("sha256:"):
        return None
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = name[colon + 1:] if colon > slash else ""
    return tag if TAG_RE.match(tag) else None


def describe_policy(app: AppConfig) -> str:
    """Which tags the app follows, as `check` says it."""
    if app.tag_policy == "exact":
        return "tags " + " ".join(app.tags)
    too = ", pre-releases too" if app.prerelease else ""
    if app.tag_policy == "glob":
        return "tags matching %s%s" % (" ".join(app.tags), too)
    start = " (from %s while no version runs)" % app.tags[0] if app.tags else ""
    return "%s updates of the running version%s%s" % (app.tag_policy, start, too)


def _matches_pattern(app: AppConfig, tag: str) -> bool:
    return any(fnmatch.fnmatchcase(tag, pattern) for pattern in app.tags)


def _running_version(app: AppConfig, running_tag: Optional[str]) -> Optional[SemVer]:
    """The running tag's version, if it is one; under glob, only when the
    patterns match it: a container running another line (the patterns were
    changed to move to it) does not hold back the tags now followed."""
    version = SemVer.parse(running_tag) if running_tag else None
    if version is not None and app.tag_policy == "glob" and not _matches_pattern(app, running_tag or ""):
        return None
    return version


def _anchor(app: AppConfig, running_tag: Optional[str]) -> Tuple[Optional[SemVer], str]:
    """The version the policy counts from, and how a reason names it: the
    running version; else, for a semver policy, the one `tag` names; else none."""
    running = _running_version(app, running_tag)
    if running is not None:
        return running, "the running %s" % running_tag
    if app.tag_policy in SEMVER_POLICIES and app.tags:
        return SemVer.parse(app.tags[0]), "%s, the version tag = starts from" % app.tags[0]
    return None, ""


def _within_bound(policy: str, version: SemVer, anchor: SemVer) -> bool:
    if policy == "patch":
        return (version.major, version.minor) == (anchor.major, anchor.minor)
    if policy == "minor":
        return version.major == anchor.major
    return True  # major, and glob: any newer version


############################################################################
# Jobs: their states, the queue, their log lines
############################################################################

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, UP_TO_DATE, FAILED = "succeeded", "up_to_date", "failed"
ROLLED_BACK, ERROR, SUPERSEDED = "rolled_back", "error", "superseded"


class StateMeaning(NamedTuple):
    """What a job state means to everyone who hears of it."""
    final: bool
    callback: str = ""   # the state a Docker Hub callback_url is told
    event: str = ""      # the notify_on event it is ("": never notified)
    words: str = ""      # how a chat notification says it
    timed: bool = False  # counted in the deploy duration histogram


STATES: Dict[str, StateMeaning] = {
    QUEUED: StateMeaning(final=False),
    RUNNING: StateMeaning(final=False),
    SUCCEEDED: StateMeaning(True, "success", "success", "deployed", timed=True),
    UP_TO_DATE: StateMeaning(True, "success", timed=True),
    FAILED: StateMeaning(True, "failure", "failure", "FAILED to deploy", timed=True),
    ROLLED_BACK: StateMeaning(True, "failure", "rollback", "ROLLED BACK", timed=True),
    ERROR: StateMeaning(True, "error", "failure", "FAILED to deploy", timed=True),
    # A superseded job's callback hears the outcome of the job that replaced it.
    SUPERSEDED: StateMeaning(True, "error"),
}
FINAL_STATES = tuple(name for name, meaning in STATES.items() if meaning.final)


class Job:
    """One accepted webhook (or `deploy` command) and what became of it."""
    __slots__ = ("id", "app", "tag", "callback_url", "source", "received", "started",
                 "finished", "state", "description", "superseded", "lines", "resume", "swap",
                 "waiter", "digest", "pinned")

    def __init__(self, id: str, app: AppConfig, tag: str, callback_url: Optional[str] = None,
                 source: str = "dockerhub", received: float = 0.0) -> None:
        self.id = id
        self.app = app
        self.tag = tag
        self.callback_url = callback_url
        self.source = source
        self.received = received
        self.started: Optional[float] = None
        self.finished: Optional[float] = None
        self.state = QUEUED
        self.description = ""
        # Jobs this one replaced while they waited: they hear its outcome.
        self.superseded: List[Job] = []
        self.lines: List[str] = []  # its log lines, for the journal (at most MAX_JOB_LINES)
        self.resume: Optional[Dict[str, Any]] = None  # its journal row, when a crash interrupted it
        self.swap: Optional[Dict[str, Any]] = None  # what converge() needs, once the old one is set aside
        self.waiter: Optional["Waiter"] = None  # set when a `deploy` command awaits it
        # The image digest: the one the sender named (`pinned`: deployed
        # exactly), else the one the tag pointed to when the job pulled it.
        self.digest = ""
        self.pinned = False

    def __repr__(self) -> str:
        return "<Job %s %s:%s %s>" % (self.id, self.app.repository, self.tag, self.state)

    @property
    def reference(self) -> str:
        return "%s:%s" % (self.app.image, self.tag)

    @property
    def pinned_reference(self) -> str:
        """What the new container is created from: image:tag@digest when the
        sender named the digest (the container shows the tag, runs that
        digest), else image:tag."""
        return "%s@%s" % (self.reference, self.digest) if self.pinned else self.reference

    @property
    def awaited(self) -> bool:
        """Someone waits to hear its outcome (a callback URL, a `deploy` command)."""
        return bool(self.callback_url) or self.waiter is not None

    @property
    def final(self) -> bool:
        return STATES[self.state].final


def new_job_id() -> str:
    """A short unique id for log lines and answers."""
    return os.urandom(6).hex()


def queue_key(job: Job) -> str:
    """What the queue runs one job at a time for: the app (its repository).
    A section names one container, and one job deploys every container of
    its repository (label discovery), so no two jobs ever share one."""
    return job.app.repository


class JobQueue:
    """Jobs in arrival order, at most one running per app (queue_key: a
    section's container and the labelled containers of its repository).

    A job waiting for an app is replaced by a newer one for the same app
    (the newer push wins; the older job is kept on the newer one's
    `superseded` list so its callback still hears the outcome). So the queue
    never holds more than one waiting job per app.

    After a job ends, the next one for its container waits out the app's
    `cooldown`: a flood of webhooks for one app coalesces into one pull a
    second or so, instead of pulls back to back (each counts against the
    registry's rate limit and costs the Engine CPU).

    `on_superseded` hears of each job that ends in the queue (replaced, and
    nobody awaits its outcome), after the queue's lock is released.
    """

    def __init__(self, limit: int = 1000, clock: Callable[[], float] = time.monotonic,
                 on_superseded: Callable[[Job], None] = lambda job: None) -> None:
        self.limit = limit
        self.clock = clock
        self.on_superseded = on_superseded
        self._cond = threading.Condition()
        self._ready: Deque[str] = collections.deque()
        self._waiting: Dict[str, Job] = {}
        self._running: Set[str] = set()
        self._cool_until: Dict[str, float] = {}
        self._closed = False

    def put(self, job: Job, force: bool = False) -> Optional[Job]:
        """Queue `job`; returns the waiting job it replaced, if any.
        QueueFull when `limit` jobs already wait and none is replaced
        (unless `force`: recovery must queue every job it finds)."""
        key = queue_key(job)
        ended: List[Job] = []
        with self._cond:
            replaced = self._waiting.get(key)
            if replaced is None and len(self._waiting) >= self.limit and not force:
                raise QueueFull("%d jobs are waiting already" % len(self._waiting))
            if replaced is not None:
                job.superseded, replaced.superseded = replaced.superseded, []
                ended = self._supersede(job.superseded, replaced)
            elif key not in self._running:
                self._ready.append(key)
                self._cond.notify()  # only then: a worker woken for a replaced job finds nothing new
            self._waiting[key] = job
        for old in ended:
            self.on_superseded(old)
        return replaced

    @staticmethod
    def _supersede(waiting: List[Job], replaced: Job) -> List[Job]:
        """Add `replaced` to the jobs that await the outcome of the job that
        replaced it, if someone awaits it; keep the newest MAX_SUPERSEDED (a
        flood must not grow memory). Returns the jobs that end here."""
        ended = []
        if replaced.awaited:
            waiting.append(replaced)
        else:
            ended.append(replaced)
        while len(waiting) > MAX_SUPERSEDED:
            ended.append(waiting.pop(0))
        for job in ended:
            job.state, job.description = SUPERSEDED, "superseded by a newer push"
        return ended

    def get(self, timeout: Optional[float] = None) -> Optional[Job]:
        """The next job whose container is free; None once closed (or on timeout)."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None  # what waits stays queued (in the journal) for the next start
                now = self.clock()
                key, wake = self._first_ready(now)
                if key is not None:
                    self._ready.remove(key)
                    self._cool_until.pop(key, None)
                    self._running.add(key)
                    return self._waiting.pop(key)
                if deadline is not None:
                    if now >= deadline:
                        return None
                    wake = deadline if wake is None else min(wake, deadline)
                self._cond.wait(None if wake is None else max(0.0, wake - now))

    def _first_ready(self, now: float) -> Tuple[Optional[str], Optional[float]]:
        """The oldest ready container past its cooldown, else when the
        first one will be."""
        wake = None
        for key in self._ready:
            until = self._cool_until.get(key, 0.0)
            if until <= now:
                return key, None
            wake = until if wake is None else min(wake, until)
        return None, wake

    def task_done(self, job: Job) -> None:
        """Free the job's container; a job that waited for it becomes ready
        once the app's cooldown has passed."""
        key = queue_key(job)
        with self._cond:
            self._running.discard(key)
            if job.app.cooldown > 0:
                self._cool_until[key] = self.clock() + job.app.cooldown
            if key in self._waiting:
                self._ready.append(key)
                self._cond.notify()

    def close(self) -> None:
        """Wake every waiting worker; get() returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def depth(self) -> int:
        with self._cond:
            return len(self._waiting)


class JobLog(logging.LoggerAdapter):
    """Prefixes every line with the job id and repository, and keeps the
    job's own lines on the job (for the journal and /jobs)."""

    def __init__(self, logger: logging.Logger, job: Job):
        super().__init__(logger, {"job": job.id, "repo": job.app.repository})
        self.job = job

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if len(self.job.lines) < MAX_JOB_LINES and level >= logging.INFO:
            text = msg % args if args else str(msg)
            self.job.lines.append("%s %s %s" % (time.strftime("%H:%M:%S"),
                                                logging.getLevelName(level), text))
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: str, kwargs: Any) -> Tuple[str, Any]:
        return "job=%s repo=%s %s" % (self.extra["job"], self.extra["repo"], msg), kwargs


class StopDeadline:
    """The moment past which running deploys stop (SIGTERM's stop_deadline).
    Everything that waits inside a deploy calls check(), so a shutdown
    interrupts it at a point where what it changed can be put back; a wait
    that has changed nothing (for an Engine that is away) ends as soon as
    the stop begins. Pauses on the job path go through pause(), which a
    stop's start wakes and which never sleeps past the deadline."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.at: Optional[float] = None
        self.stopping = threading.Event()

    def start(self, seconds: float) -> None:
        self.at = self.clock() + seconds
        self.stopping.set()  # after `at`: a pause it wakes sees the deadline

    def check(self, idle: bool = False) -> None:
        """Raise CutOff once the deadline has passed; for a wait that has
        changed nothing yet (`idle`), once the stop has begun."""
        if self.at is None:
            return
        if idle:
            raise CutOff("the service is stopping, and the job had changed nothing yet")
        if self.clock() >= self.at:
            raise CutOff("the service is stopping and its stop_deadline passed")

    def pause(self, seconds: float, sleep: Optional[Callable[[float], None]] = None) -> None:
        """Wait `seconds`, but never past the deadline; until a stop begins,
        a stop's start ends the wait at once. `sleep`: an injected one
        (tests), called with the seconds to wait instead."""
        at = self.at
        if at is not None:
            seconds = max(0.0, min(seconds, at - self.clock()))
        if sleep is not None:
            sleep(seconds)
        elif at is None:
            self.stopping.wait(seconds)
        else:
            time.sleep(seconds)


def cut_off(exc: BaseException) -> bool:
    """True when `exc` comes from a shutdown's deadline (CutOff, or the rollback it caused)."""
    return isinstance(exc, CutOff) or isinstance(exc.__cause__, CutOff)

############################################################################
# Container recreation: the new container's configuration (pure functions)
############################################################################

def is_running(info: Dict[str, Any]) -> bool:
    """A container inspect document says it runs."""
    return bool((info.get("State") or {}).get("Running"))


def networks_of(info: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """A container inspect document's networks, by name, with their endpoints."""
    return (info.get("NetworkSettings") or {}).get("Networks") or {}


# Endpoint settings that describe what the user asked for; the rest
# (addresses, ids, gateway, DNSNames) the Engine assigns afresh.
ENDPOINT_KEYS = ("IPAMConfig", "Links", "Aliases", "DriverOpts", "GwPriority")


def build_create_body(old: Dict[str, Any], old_image_config: Optional[Dict[str, Any]],
                      new_reference: str, multi_network_create: bool,
                      network_container: Optional[str] = None
                      ) -> Tuple[Dict[str, Any], List[Tuple[str, Dict[str, Any]]]]:
    """The POST /containers/create body that recreates `old` (a container
    inspect document) on `new_reference`, and the (network, endpoint) pairs
    to connect after creating it (Engines before API 1.44 take one network
    at create time).

    What the user set is kept; what the old image supplied (env, labels,
    volumes, exposed ports, cmd/entrypoint, workdir, user, healthcheck,
    stop signal) is dropped so the new image's own defaults apply.
    `network_container` replaces the id in a 'container:<id>' network mode.
    """
    image = old_image_config or {}
    config = copy.deepcopy(old.get("Config") or {})
    host = copy.deepcopy(old.get("HostConfig") or {})
    short_id = (old.get("Id") or "")[:12]
    mode = host.get("NetworkMode") or "default"
    if mode.startswith("container:") and network_container:
        mode = host["NetworkMode"] = "container:" + network_container

    config["Image"] = new_reference
    if config.get("Hostname") == short_id or mode == "host" or mode.startswith("container:"):
        config.pop("Hostname", None)  # the Engine's generated name, not the user's
    config["Env"] = _user_env(config.get("Env") or [], image.get("Env") or [],
                              (config.get("Hostname"), short_id))
    image_labels = image.get("Labels") or {}
    config["Labels"] = {k: v for k, v in (config.get("Labels") or {}).items()
                        if image_labels.get(k) != v}
    config["Volumes"] = {k: v for k, v in (config.get("Volumes") or {}).items()
                         if k not in (image.get("Volumes") or {})} or None
    _drop_image_defaults(config, image)
    exposed = {k: v for k, v in (config.get("ExposedPorts") or {}).items()
               if k not in (image.get("ExposedPorts") or {})}
    # Podman lists exposed, unpublished ports in PortBindings with null:
    # those follow the image's EXPOSE, like the rest of ExposedPorts.
    host["PortBindings"] = {port: bindings for port, bindings in (host.get("PortBindings") or {}).items()
                            if bindings} or None
    for port in (host.get("PortBindings") or {}):
        exposed[port] = {}
    config["ExposedPorts"] = exposed or None
    mac = config.pop("MacAddress", "")
    for key in ("OnBuild", "Shell", "ArgsEscaped"):
        config.pop(key, None)

    host["Links"] = [_relative_link(link) for link in host.get("Links") or []] or None
    _one_cpu_limit(host)
    if host.get("Ulimits"):
        host["Ulimits"] = [dict(u, Name=_ulimit_name(u.get("Name") or "")) for u in host["Ulimits"]]
    _reattach_volumes(host, old.get("Mounts") or [])

    endpoints = _endpoints(old, mode, short_id)
    primary = _primary_network(mode, endpoints)
    if mac and primary:
        if multi_network_create:
            endpoints[primary]["MacAddress"] = mac
        else:
            config["MacAddress"] = mac
    body = dict(config)
    body["HostConfig"] = host
    later: List[Tuple[str, Dict[str, Any]]] = []
    if endpoints:
        if multi_network_create:
            body["NetworkingConfig"] = {"EndpointsConfig": endpoints}
        else:
            body["NetworkingConfig"] = {"EndpointsConfig": {primary: endpoints.pop(primary)}}
            later = sorted(endpoints.items())
    return body, later


# What Podman's inspect adds to Config.Env by itself (seen on 4.3), on top
# of the image's env and a HOSTNAME: its marker, a terminal type, and its
# default PATH when the image sets none. Copied, they would pin the new
# container to the old one's values as if the user had set them.
PODMAN_MARKER_ENV = "container=podman"
PODMAN_ADDED_ENV = (PODMAN_MARKER_ENV, "TERM=xterm")
PODMAN_DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _user_env(env: List[str], image_env: List[str], hostnames: Iterable[Optional[str]]) -> List[str]:
    """The env the user set: without the old image's, without a HOSTNAME
    naming the old container (Podman's), without Podman's additions."""
    added = {"HOSTNAME=" + name for name in hostnames if name}
    if PODMAN_MARKER_ENV in env:  # only Podman's inspect carries the marker
        added.update(PODMAN_ADDED_ENV)
        if not any(e.startswith("PATH=") for e in image_env):
            added.add(PODMAN_DEFAULT_PATH)
    return [e for e in env if e not in image_env and e not in added]


def _ulimit_name(name: str) -> str:
    """'RLIMIT_NOFILE' (Podman's inspect) -> 'nofile' (what create takes)."""
    return name[len("RLIMIT_"):].lower() if name.upper().startswith("RLIMIT_") else name


def _drop_image_defaults(config: Dict[str, Any], image: Dict[str, Any]) -> None:
    """Clear settings equal to the old image's, so the new image's apply."""
    if not config.get("Entrypoint") and image.get("Entrypoint"):
        # The user ran it with --entrypoint "": keep it cleared, or the
        # new image's entrypoint would come back.
        config["Entrypoint"] = [""]
    elif (config.get("Entrypoint") or None) == (image.get("Entrypoint") or None):
        # Podman shows no entrypoint as [], the image as null: the same.
        config["Entrypoint"] = None
        if config.get("Cmd") == image.get("Cmd"):
            config["Cmd"] = None
    for key in ("WorkingDir", "User", "StopSignal"):
        value = config.get(key)
        if value and (value == image.get(key) or _engine_default(key, value, image)):
            config[key] = "" if key != "StopSignal" else None
    if config.get("Healthcheck") and config.get("Healthcheck") == image.get("Healthcheck"):
        config["Healthcheck"] = None
    if config.get("StopSignal") is None:
        config.pop("StopSignal", None)


def _one_cpu_limit(host: Dict[str, Any]) -> None:
    """Podman reports --cpus as NanoCpus and also as the CpuPeriod and
    CpuQuota it became; create refuses both at once. Keep NanoCpus."""
    period, quota, nano = host.get("CpuPeriod"), host.get("CpuQuota"), host.get("NanoCpus")
    if nano and period and quota and quota * 10**9 == nano * period:
        host["CpuPeriod"] = host["CpuQuota"] = 0


def _engine_default(key: str, value: str, image: Dict[str, Any]) -> bool:
    """Podman's inspect fills in WorkingDir "/" and StopSignal "15" when
    the image sets none: its defaults, which must not pin the new image's."""
    if image.get(key):
        return False
    return value == "/" if key == "WorkingDir" else (key == "StopSignal" and value in ("15", "SIGTERM"))


def _relative_link(link: str) -> str:
    """'/db:/web/db' (as inspect shows it) -> 'db:db' (as create takes it)."""
    target, _, alias = link.partition(":")
    return "%s:%s" % (target.lstrip("/"), alias.rsplit("/", 1)[-1] or target.lstrip("/"))


def _reattach_volumes(host: Dict[str, Any], mounts: List[Dict[str, Any]]) -> None:
    """Mount the old container's volumes that no bind or mount names
    (anonymous ones, and the image's VOLUMEs) by name, so their data stays."""
    covered = {bind.split(":")[1] for bind in host.get("Binds") or [] if ":" in bind}
    covered |= {m.get("Target") for m in host.get("Mounts") or []}
    names = {m.get("Destination"): m.get("Name") for m in mounts
             if m.get("Type") == "volume" and m.get("Name")}
    for mount in host.get("Mounts") or []:
        # `--mount type=volume,target=/x` without a source made an
        # anonymous volume: name it, or the new container gets an empty one.
        if mount.get("Type") == "volume" and not mount.get("Source") \
                and names.get(mount.get("Target")):
            mount["Source"] = names[mount["Target"]]
    extra = []
    for mount in mounts:
        if mount.get("Type") == "volume" and mount.get("Name") \
                and mount.get("Destination") not in covered:
            extra.append("%s:%s%s" % (mount["Name"], mount["Destination"],
                                      "" if mount.get("RW", True) else ":ro"))
    if extra:
        host["Binds"] = list(host.get("Binds") or []) + extra


def _endpoints(old: Dict[str, Any], mode: str, short_id: str) -> Dict[str, Dict[str, Any]]:
    """The user's part of each network endpoint of `old`."""
    if mode in ("host", "none") or mode.startswith("container:"):
        return {}
    endpoints = {}
    for name, settings in networks_of(old).items():
        endpoint = {k: copy.deepcopy(settings[k]) for k in ENDPOINT_KEYS if settings.get(k)}
        aliases = [a for a in endpoint.get("Aliases") or [] if a != short_id]
        if aliases and name != "bridge":
            endpoint["Aliases"] = aliases
        else:
            endpoint.pop("Aliases", None)
        if name == "bridge":  # the default bridge takes no static address
            endpoint.pop("IPAMConfig", None)
        endpoints[name] = endpoint
    return endpoints


def _primary_network(mode: str, endpoints: Dict[str, Dict[str, Any]]) -> Optional[str]:
    if not endpoints:
        return None
    wanted = "bridge" if mode == "default" else mode
    return wanted if wanted in endpoints else sorted(endpoints)[0]


def first_create_body(app: AppConfig, reference: str) -> Dict[str, Any]:
    """The create body for an app's first container, from its config section."""
    bindings: Dict[str, List[Dict[str, str]]] = {}
    for host_ip, host_port, container_port in app.ports:
        bindings.setdefault(container_port, []).append({"HostIp": host_ip, "HostPort": host_port})
    restart_name, _, retries = app.restart.partition(":")
    host: Dict[str, Any] = {
        "PortBindings": bindings or None,
        "Binds": app.volumes or None,
        "RestartPolicy": {"Name": restart_name if restart_name != "no" else "",
                          "MaximumRetryCount": int(retries or 0)},
    }
    if app.network:
        host["NetworkMode"] = app.network
    body: Dict[str, Any] = {
        "Image": reference,
        "Env": app.env or None,
        "Labels": dict(app.labels),
        "ExposedPorts": {port: {} for port in bindings} or None,
        "HostConfig": host,
    }
    if app.command:
        body["Cmd"] = app.command
    if app.stop_timeout is not None:
        body["StopTimeout"] = app.stop_timeout
    return body


def choose_order(app: AppConfig, old: Dict[str, Any]) -> str:
    """'start-first' when two copies can run at once (no fixed host port,
    no static address, not sharing another's network), else 'stop-first'."""
    if app.order != "auto":
        return app.order
    host = old.get("HostConfig") or {}
    mode = host.get("NetworkMode") or ""
    if mode == "host" or mode.startswith("container:"):
        return "stop-first"
    for bindings in (host.get("PortBindings") or {}).values():
        if any(b.get("HostPort") not in (None, "", "0") for b in bindings or []):
            return "stop-first"
    for endpoint in networks_of(old).values():
        ipam = endpoint.get("IPAMConfig") or {}
        if ipam.get("IPv4Address") or ipam.get("IPv6Address"):
            return "stop-first"
    return "start-first"


############################################################################
# Registry credentials: whose login a pull uses
############################################################################

def app_registry_auth(app: AppConfig, docker_config: str,
                      run: dockerapi.Runner = dockerapi.run_program) -> dockerapi.RegistryAuth:
    """The credentials app.image is pulled with, and where they come from:
    the app's registry_user, else the Docker config file (its credHelpers,
    credsStore or auths, as the docker CLI looks; `run` runs the helper).
    CredentialsError when the file or a helper fails."""
    if app.registry_user:
        return dockerapi.RegistryAuth(
            dockerapi.login_auth(app.image, app.registry_user, app.registry_password),
            "registry_user %s" % app.registry_user)
    return dockerapi.find_registry_auth(app.image, docker_config, run)


############################################################################
# Targets: what a job deploys to
############################################################################
#
# A target takes a job and makes its app run the job's image. Each kind
# answers three things:
#   describe(app)            what it will replace, for log lines and `check`
#   deploy(job, jlog)        pull and replace; (state, description), or raises
#                            DeployFailed (nothing changed, or put back) or
#                            DockerError (the Engine failed us)
#   converge(job, row, jlog) put in order what a crash left of a job's swap
# ContainerTarget replaces a container on this host; SwarmServiceTarget
# hands a service's roll-out to Docker Swarm and follows it.

ASIDE_MARK = "-autodeploy-old-"


def aside_name(container: str, job_id: str) -> str:
    """The name the old container carries while job `job_id` replaces it."""
    return "%s%s%s" % (container, ASIDE_MARK, job_id)


def pull(engine: DockerClient, app: AppConfig, tag: str, docker_config: str,
         jlog: logging.LoggerAdapter, check: Callable[[], None], digest: str = "") -> Dict[str, Any]:
    """Pull app.image:tag (exactly `digest`, when the sender named one) with
    the registry's credentials; the image's inspect document. DeployFailed
    when the registry refuses, or its credentials cannot be had."""
    try:
        credentials = app_registry_auth(app, docker_config)
    except dockerapi.CredentialsError as exc:
        raise DeployFailed("pull failed: %s" % exc.message) from None
    jlog.info("pulling %s:%s%s, credentials: %s", app.image, tag, "@" + digest if digest else "",
              credentials.source)
    try:
        engine.pull_image(app.image, digest or tag, credentials.auth,
                          on_progress=_pull_logger(jlog, check))
    except DockerError as exc:
        if exc.status is None:
            raise
        raise DeployFailed("pull failed: %s (credentials: %s)"
                           % (exc.message, credentials.source)) from exc
    return engine.inspect_image("%s%s%s" % (app.image, "@" if digest else ":", digest or tag))


def digests_of(image: Dict[str, Any], name: str) -> List[str]:
    """The digests `name` (a repository) has in an image's RepoDigests.
    Podman may list two for one repository (the manifest as pushed, and as
    the registry converted it): any of them is this image."""
    found = []
    for entry in image.get("RepoDigests") or ():
        repository, _, digest = entry.partition("@")
        if repository == name:
            found.append(digest)
    return found


def digest_of(image: Dict[str, Any], name: str) -> str:
    """The first digest `name` has in an image's RepoDigests, or ''."""
    return (digests_of(image, name) or [""])[0]


def _pull_logger(jlog: logging.LoggerAdapter, check: Callable[[], None]
                 ) -> Callable[[Dict[str, Any]], None]:
    """Log the pull's summary lines (digest, outcome), not every progress
    tick; `check` may raise to stop the pull (a shutdown's deadline)."""
    def on_progress(message: Dict[str, Any]) -> None:
        check()
        status = str(message.get("status") or "")
        if status.startswith(("Digest:", "Status:")):
            jlog.info("pull: %s", status)
    return on_progress


def _reason_of(exc: Exception) -> str:
    return exc.message if isinstance(exc, DockerError) else str(exc)


def _short(image_or_container_id: Optional[str]) -> str:
    value = image_or_container_id or "?"
    return value.split(":", 1)[-1][:12]


def remove_unused_image(engine: DockerClient, image_id: Optional[str],
                        jlog: logging.LoggerAdapter) -> None:
    """Remove the previous image unless a container (any state) still uses it."""
    if not image_id:
        return
    try:
        if any(c.get("ImageID") == image_id for c in engine.list_containers(all=True)):
            jlog.info("kept previous image %s: a container still uses it", _short(image_id))
            return
        engine.remove_image(image_id)
        jlog.info("removed previous image %s", _short(image_id))
    except DockerError as exc:
        jlog.info("kept previous image %s: %s", _short(image_id), exc.message)


def last_logs(engine: DockerClient, container_id: str, lines: int = 10) -> str:
    """'; last output: ...' from the container, or '' when there is none."""
    try:
        text = engine.container_logs(container_id, tail=lines).strip()
    except DockerError:
        return ""
    return "; last output: %s" % " | ".join(text.splitlines()[-lines:]) if text else ""


# A swap's steps, each recorded in the journal (its `step` column) before it
# is done, so a crash lands on a step whose undo recovery knows. The
# `failure` column is set once the new version has failed: from then on the
# swap is a rollback, and recovery finishes it as one.
SWAP_STEPS = ("rename-aside", "create-new", "stop-old", "start-new", "gate", "retire-old",
              "remove-old", "remove-image")
ROLLBACK_STEPS = ("remove-new", "rename-back", "start-old")


class ContainerTarget:
    """The app's container, replaced by one that keeps its configuration
    but runs the new image.

    Nothing is touched until the new image is pulled and the new container's
    configuration is built. The old container is removed only once the new
    one has passed the health gate; any failure before that leaves the old
    one running under its name, or puts it back. `record_step(job, **fields)`
    hears each step before it is taken (the journal); while the old
    container is set aside, job.swap holds the same fields, for converge().
    `crash_at` names a step at which the process kills itself right after
    recording it: a seam for the crash tests (AUTODEPLOY_CRASH_AT).
    """

    def __init__(self, engine: DockerClient, gate: "HealthGate", deadline: StopDeadline,
                 docker_config: Optional[str] = None,
                 record_step: Callable[..., None] = lambda job, **fields: None,
                 clock: Callable[[], float] = time.time, crash_at: Optional[str] = None):
        self.engine = engine
        self.gate = gate
        self.deadline = deadline
        self.docker_config = docker_config or dockerapi.docker_config_path()
        self.record_step = record_step
        self.clock = clock
        self.crash_at = crash_at

    @staticmethod
    def describe(app: AppConfig) -> str:
        return "container %s" % app.container

    def step(self, job: Job, name: str, **fields: Any) -> None:
        """Record the intent to take step `name` (with `fields`) before taking it."""
        fields["step"] = name
        if job.swap is not None:
            job.swap.update(fields)
        self.record_step(job, **fields)
        if name == self.crash_at:
            log.warning("job=%s repo=%s crashing at step %s (AUTODEPLOY_CRASH_AT)",
                        job.id, job.app.repository, name)
            os.kill(os.getpid(), signal.SIGKILL)

    def deploy(self, job: Job, jlog: logging.LoggerAdapter) -> Tuple[str, str]:
        """Pull and replace; returns (state, description) or raises."""
        app = job.app
        # A digest the sender named is pinned in the container's image
        # (image:tag@digest); without one, the container names the tag, as before.
        reference = job.pinned_reference
        new_image = pull(self.engine, app, job.tag, self.docker_config, jlog, self.deadline.check,
                         job.digest if job.pinned else "")
        if not job.pinned:  # what the tag points to now: recorded, never pulled by
            job.digest = digest_of(new_image, app.image)
        self.record_step(job, new_image=new_image.get("Id"), digest=job.digest)
        old = self._inspect_or_none(app.container)
        if old is None:
            return self.create_first(app, reference, jlog)
        if old.get("Image") == new_image.get("Id"):
            if is_running(old):
                return UP_TO_DATE, "%s already runs %s (%s)" % (
                    app.container, job.reference, _short(new_image.get("Id")))
            return self.start_stopped(job, old, jlog)
        body, later_networks = self.new_container_config(old, reference)
        self.deadline.check()  # the last moment to stop with nothing changed
        how = self.replace(job, old, body, later_networks, jlog)
        self.clean_up(job, old.get("Image"), jlog)
        return SUCCEEDED, "%s now runs %s (%s), %s" % (
            app.container, job.reference, _short(new_image.get("Id")), how)

    def new_container_config(self, old: Dict[str, Any], reference: str
                             ) -> Tuple[Dict[str, Any], List[Tuple[str, Dict[str, Any]]]]:
        """Build the new container's create body from the old one's inspect."""
        try:
            old_image_config = self.engine.inspect_image(old["Image"]).get("Config")
        except NotFound:
            old_image_config = None  # the old image is gone: keep everything
        mode = (old.get("HostConfig") or {}).get("NetworkMode") or ""
        network_container = None
        if mode.startswith("container:"):
            network_container = self.engine.inspect_container(mode.split(":", 1)[1])["Name"].lstrip("/")
        return build_create_body(old, old_image_config, reference,
                                 self.engine.api_at_least("1.44"), network_container)

    def create_first(self, app: AppConfig, reference: str,
                     jlog: logging.LoggerAdapter) -> Tuple[str, str]:
        """No container yet: create and start one from the app's section."""
        jlog.info("no container %s yet: creating it", app.container)
        try:
            new_id = self.engine.create_container(first_create_body(app, reference), app.container)
        except Conflict as exc:  # another container took the name since we looked
            raise DeployFailed("cannot create %s: %s" % (app.container, exc.message)) from exc
        what = "did not start"
        try:
            started = self.clock()
            self.engine.start_container(new_id)
            what = "did not become healthy"
            how = self.gate.wait_healthy(new_id, app, started, jlog)
        except (DockerError, DeployFailed) as exc:
            logs = last_logs(self.engine, new_id)
            self.remove_quietly(new_id, jlog)
            raise DeployFailed("the first container %s: %s%s"
                               % (what, _reason_of(exc), logs)) from exc
        return SUCCEEDED, "created %s running %s, %s" % (app.container, reference, how)

    def start_stopped(self, job: Job, container: Dict[str, Any],
                      jlog: logging.LoggerAdapter) -> Tuple[str, str]:
        """The container has the image already but does not run (an Engine
        restart, a crash): start it and gate it. A stopped app is not up to date."""
        app = job.app
        jlog.info("%s has %s already but is not running: starting it", app.container, job.reference)
        try:
            started = self.clock()
            self.engine.start_container(container["Id"])
            how = self.gate.wait_healthy(container["Id"], app, started, jlog)
        except (DockerError, DeployFailed) as exc:
            if isinstance(exc, DockerError) and exc.status is None:
                raise
            if cut_off(exc):
                raise
            raise DeployFailed("%s has %s but did not start healthy: %s%s" % (
                app.container, job.reference, _reason_of(exc),
                last_logs(self.engine, container["Id"]))) from exc
        return SUCCEEDED, "%s was not running; started it with %s (%s), %s" % (
            app.container, job.reference, _short(container.get("Image")), how)

    def replace(self, job: Job, old: Dict[str, Any], body: Dict[str, Any],
                later_networks: List[Tuple[str, Dict[str, Any]]],
                jlog: logging.LoggerAdapter) -> str:
        """Rename the old container aside and create the new one under its
        name, then swap them in the app's order; returns how health was judged."""
        app = job.app
        old_id = old["Id"]
        aside = aside_name(app.container, job.id)
        was_running = is_running(old)
        job.swap = {"id": job.id}
        self.step(job, "rename-aside", old_container=old_id, old_image=old.get("Image"),
                  was_running=was_running, new_container=None, failure=None)
        self.engine.rename_container(old_id, aside)
        jlog.info("renamed old container %s to %s", _short(old_id), aside)
        new_id = None
        self.step(job, "create-new")
        try:
            new_id = self.engine.create_container(body, app.container)
            for network, endpoint in later_networks:
                self.engine.connect_network(network, new_id, endpoint)
        except DockerError as exc:
            if exc.status is None:
                raise  # the Engine is gone: converged once it is back
            failure = "cannot create the new container: %s" % exc.message
            self.restore_old(job, old_id, new_id, was_running, failure, jlog)
            job.swap = None
            raise DeployFailed(failure) from exc
        jlog.info("created new container %s", _short(new_id))
        order = choose_order(app, old) if was_running else "stop-first"
        try:
            if order == "start-first":
                how = self.start_first(job, old_id, new_id, jlog)
            else:
                how = self.stop_first(job, old_id, new_id, was_running, jlog)
        except DeployFailed:
            job.swap = None  # undone: the old container has its name back
            raise
        # (A DockerError keeps job.swap: the Engine may be gone mid-swap, and
        # the runner converges the swap once it is back.)
        self.remove_old(job, old_id, jlog)
        job.swap = None
        return how

    def stop_first(self, job: Job, old_id: str, new_id: str, was_running: bool,
                   jlog: logging.LoggerAdapter) -> str:
        """Stop the old container, start the new one, gate it; put the old one back on failure."""
        app = job.app
        try:
            if was_running:
                self.step(job, "stop-old", new_container=new_id)
                self.stop_old(old_id, app, jlog)
            self.step(job, "start-new", new_container=new_id)
            started = self.clock()
            self.engine.start_container(new_id)
            jlog.info("started new container %s", _short(new_id))
            self.step(job, "gate")
            return self.gate.wait_healthy(new_id, app, started, jlog)
        except (DockerError, DeployFailed) as exc:
            logs = self.roll_back(job, exc, old_id, new_id, was_running, jlog)
            raise RolledBack("the new container failed: %s; the old one runs again%s"
                             % (_reason_of(exc), logs)) from exc

    def start_first(self, job: Job, old_id: str, new_id: str,
                    jlog: logging.LoggerAdapter) -> str:
        """Start the new container beside the old one, gate it, then retire
        the old one: no downtime. On failure the old one never stopped."""
        app = job.app
        try:
            self.step(job, "start-new", new_container=new_id)
            started = self.clock()
            self.engine.start_container(new_id)
            jlog.info("started new container %s next to the old one", _short(new_id))
            self.step(job, "gate")
            how = self.gate.wait_healthy(new_id, app, started, jlog)
        except (DockerError, DeployFailed) as exc:
            logs = self.roll_back(job, exc, old_id, new_id, True, jlog)
            raise DeployFailed("the new container failed: %s; the old one kept running%s"
                               % (_reason_of(exc), logs)) from exc
        self.step(job, "retire-old")
        self.retire(old_id, app, jlog)
        return how + " (started before the old one stopped)"

    def roll_back(self, job: Job, exc: Exception, old_id: str, new_id: str, was_running: bool,
                  jlog: logging.LoggerAdapter) -> str:
        """The new container failed (or a shutdown cut its gate short): put
        the old one back; returns the new one's last output, for the message.
        A lost Engine is raised again instead: not the new version's fault,
        and the runner converges the swap once the Engine is back."""
        if isinstance(exc, DockerError) and exc.status is None:
            raise exc
        logs = last_logs(self.engine, new_id)
        failure = None if cut_off(exc) else "the new container failed: %s" % _reason_of(exc)
        self.restore_old(job, old_id, new_id, was_running, failure, jlog)
        return logs

    def retire(self, old_id: str, app: AppConfig, jlog: logging.LoggerAdapter) -> None:
        """Take the old container out of its networks, then stop it.

        Leaving a network removes its DNS names and aliases before its
        address goes, so clients resolving the app from then on reach only
        the new container; stopping first would leave its name answering
        with a dead address until the Engine tore the sandbox down.
        """
        try:
            for network in networks_of(self.engine.inspect_container(old_id)):
                if network != "bridge":  # the default bridge has no DNS to leave
                    self.engine.disconnect_network(network, old_id)
            self.stop_old(old_id, app, jlog)
        except DockerError as exc:
            if exc.status is None:
                raise
            jlog.warning("could not stop old container %s cleanly: %s", _short(old_id), exc)

    def stop_old(self, old_id: str, app: AppConfig, jlog: logging.LoggerAdapter,
                 prefix: str = "") -> None:
        """Stop the old container, and say whether it had to be killed."""
        began = self.clock()
        self.engine.stop_container(old_id, app.stop_timeout)
        limit = self.killed_after(old_id, app, self.clock() - began)
        if limit is None:
            jlog.info("%sstopped old container %s", prefix, _short(old_id))
        else:
            jlog.warning("%sold container %s did not stop within %s and was killed", prefix,
                         _short(old_id), format_seconds(limit))

    def killed_after(self, old_id: str, app: AppConfig, took: float) -> Optional[float]:
        """The stop timeout a stopped container ran out of, when its stop
        took that long and it ended by SIGKILL (exit code 137, on Docker and
        Podman alike); else None. A quick stop costs no inspect."""
        timeout = app.stop_timeout
        if timeout is not None and timeout < 0:
            return None  # it was waited for as long as it took
        if took < (timeout if timeout is not None else 1.0):
            return None
        try:
            info = self.engine.inspect_container(old_id)
        except DockerError:
            return None  # stopped all the same: the swap goes on
        if (info.get("State") or {}).get("ExitCode") != 137:
            return None
        if timeout is None:  # the container's own (Podman reports 0 for its default), else 10 s
            timeout = (info.get("Config") or {}).get("StopTimeout") or 10
        return float(timeout) if took >= timeout else None

    def remove_old(self, job: Job, old_id: str, jlog: logging.LoggerAdapter) -> None:
        """The new container passed: the old one goes (for good, even if
        stopping it failed). A lost Engine raises: the swap is not done."""
        self.step(job, "remove-old")
        try:
            self.engine.remove_container(old_id, force=True)
        except NotFound:
            pass
        except DockerError as exc:
            if exc.status is None:
                raise
            jlog.warning("could not remove old container %s: %s", _short(old_id), exc)
            return
        jlog.info("removed old container %s", _short(old_id))

    def clean_up(self, job: Job, old_image: Optional[str], jlog: logging.LoggerAdapter) -> None:
        """After a swap: the previous image goes when nothing uses it (remove_old_image)."""
        if job.app.remove_old_image:
            self.step(job, "remove-image")
            remove_unused_image(self.engine, old_image, jlog)

    def restore_old(self, job: Job, old_id: str, new_id: Optional[str], was_running: bool,
                    failure: Optional[str], jlog: logging.LoggerAdapter) -> None:
        """Put the old container back under its name, running if it was,
        and the new one away. Safe to repeat: each step checks first.
        `failure` (recorded) makes it a rollback; None, a put-back (a
        shutdown, a job that runs again)."""
        name = job.app.container
        self.step(job, "remove-new", failure=failure)
        if new_id is not None:
            try:
                self.engine.remove_container(new_id, force=True)
            except NotFound:
                pass
        self.step(job, "rename-back")
        if self.engine.inspect_container(old_id)["Name"].lstrip("/") != name:
            self.refuse_a_strangers_name(job, old_id, was_running, failure, jlog)
            self.engine.rename_container(old_id, name)
        if was_running:
            self.step(job, "start-old")
            self.engine.start_container(old_id)
            if not is_running(self.engine.inspect_container(old_id)):
                raise DockerError("the old container %s did not start again" % _short(old_id))
        jlog.warning("%s old container %s", "rolled back to" if failure else "put back",
                     _short(old_id))

    def refuse_a_strangers_name(self, job: Job, old_id: str, was_running: bool,
                                failure: Optional[str], jlog: logging.LoggerAdapter) -> None:
        """Before the old container gets its name back: when a container
        autodeploy did not create took the name while the old one was
        aside (by hand, by Compose), it is left alone, never removed; the
        old one runs on under its aside name, and the job fails saying
        what to do. The swap ends there."""
        name = job.app.container
        holder = self._inspect_or_none(name)
        if holder is None:
            return
        aside = aside_name(name, job.id)
        if was_running:
            self.engine.start_container(old_id)
        job.swap = None
        raise DeployFailed(
            "%scontainer %s (not created by autodeploy) took the name %s during the swap and "
            "was left alone; the old container %s as %s: remove or rename %s, then "
            "`docker rename %s %s` and deploy again"
            % (failure + "; " if failure else "", _short(holder["Id"]), name,
               "runs again" if was_running else "stays stopped", aside, name, aside, name))

    @staticmethod
    def created_by_swap(current: Optional[Dict[str, Any]], old_id: str,
                        row: Dict[str, Any]) -> bool:
        """Whether the container holding the app's name is the swap's new
        one: the one recorded, or, when a crash came between its creation
        and that record, one never started yet. A container someone else
        started under the name is not ours to start, gate or remove."""
        if current is None or current["Id"] == old_id:
            return False
        if row.get("new_container"):
            return current["Id"] == row["new_container"]
        return (current.get("State") or {}).get("Status") == "created"

    def converge(self, job: Job, row: Dict[str, Any], jlog: logging.LoggerAdapter) -> None:
        """Put in order what a crash or a lost Engine left of a swap (`row`:
        its journal row, or job.swap), deciding from what was recorded
        before each step (the old container, whether it ran, the failure)
        and the Engine's state now:
        - a failure was recorded: finish the rollback; the job rolled back;
        - no new container: put the old one back as it was; the job is left
          unfinished, to run again;
        - the old one is gone: it is removed only after the new one passed,
          so the job succeeded;
        - else the new one is started if need be and gated again: passing,
          the old one goes and the job succeeded; failing, it rolls back.
        Either way one container keeps the app's name and nothing named
        *-autodeploy-old-* remains. DockerError: not converged (yet)."""
        app = job.app
        recorded_old = row.get("old_container")
        old = self._inspect_or_none(recorded_old or aside_name(app.container, row.get("id") or job.id))
        current = self._inspect_or_none(app.container)
        if old is None:
            if recorded_old and current is not None:
                # The old one goes only after the new one passed the gate.
                how = "passed before the restart"
                if not is_running(current):  # stopped since (an Engine restart)
                    started = self.clock()
                    self.engine.start_container(current["Id"])
                    how = self.gate.wait_healthy(current["Id"], app, started, jlog)
                self.finish_converged(job, row.get("old_image"), current, how, jlog)
            else:
                jlog.info("resuming: no container was set aside; running the job again")
            return
        old_id = old["Id"]
        was_running = is_running(old) if row.get("was_running") is None else bool(row["was_running"])
        new = current if self.created_by_swap(current, old_id, row) else None
        new_id = new["Id"] if new is not None else None
        failure = row.get("failure")
        if failure:
            self.restore_old(job, old_id, new_id, was_running, failure, jlog)
            job.state = ROLLED_BACK
            job.description = "%s; the old one runs again (rollback finished after a restart)" % failure
            return
        if new is None:
            self.restore_old(job, old_id, None, was_running, None, jlog)
            jlog.info("resuming: old container %s is back; running the job again", _short(old_id))
            return
        try:
            started = self.clock()
            if not is_running(new):
                if is_running(old) and choose_order(app, old) == "stop-first":
                    self.step(job, "stop-old")
                    self.stop_old(old_id, app, jlog, "resuming: ")
                self.step(job, "start-new", new_container=new_id)
                jlog.info("resuming: starting new container %s", _short(new_id))
                self.engine.start_container(new_id)
            jlog.info("resuming: gating new container %s again", _short(new_id))
            self.step(job, "gate", new_container=new_id)
            how = self.gate.wait_healthy(new_id, app, started, jlog)
        except (DockerError, DeployFailed) as exc:
            if isinstance(exc, DockerError) and exc.status is None:
                raise
            logs = last_logs(self.engine, new_id)
            failure = None if cut_off(exc) else (
                "interrupted by a restart; the new container failed: %s" % _reason_of(exc))
            self.restore_old(job, old_id, new_id, was_running, failure, jlog)
            if failure is None:
                raise
            job.state = ROLLED_BACK
            job.description = "%s; the old one runs again%s" % (failure, logs)
            return
        if is_running(old):
            self.step(job, "retire-old")
            self.retire(old_id, app, jlog)
        self.remove_old(job, old_id, jlog)
        self.finish_converged(job, row.get("old_image") or old.get("Image"), new, how, jlog)

    def finish_converged(self, job: Job, old_image: Optional[str], new: Dict[str, Any], how: str,
                         jlog: logging.LoggerAdapter) -> None:
        """The new container runs under the app's name and the old one is
        gone: clean up as a deploy does, and the job succeeded."""
        self.clean_up(job, old_image, jlog)
        job.state = SUCCEEDED
        job.description = "%s now runs %s (%s), %s; finished after a restart" % (
            job.app.container, job.reference, _short(new.get("Image")), how)

    def running_version(self, app: AppConfig) -> Tuple[Optional[str], List[str]]:
        """(tag, digests) of what the app's container runs, for a poll to
        compare: its image's tag (None: no container, or no tag) and the
        digests the image has in app.image's repository."""
        container = self._inspect_or_none(app.container)
        if container is None:
            return None, []
        try:
            image = self.engine.inspect_image(container["Image"])
        except NotFound:
            image = {}
        return running_tag_of(container), digests_of(image, app.image)

    def _inspect_or_none(self, name: str) -> Optional[Dict[str, Any]]:
        try:
            return self.engine.inspect_container(name)
        except NotFound:
            return None

    def running_tag(self, app: AppConfig) -> Optional[str]:
        """The tag the app's container runs (see running_tag_of); None when
        there is none, or the Engine cannot say: a push is then judged
        without the running version, as before the first deploy."""
        try:
            found = self._inspect_or_none(app.container)
        except DockerError as exc:
            log.warning("repo=%s cannot inspect container %s for its running tag: %s",
                        app.repository, app.container, exc)
            return None
        return running_tag_of(found) if found is not None else None

    def remove_quietly(self, container_id: str, jlog: logging.LoggerAdapter, force: bool = True) -> None:
        try:
            self.engine.remove_container(container_id, force=force)
        except DockerError as exc:
            jlog.warning("could not remove container %s: %s", _short(container_id), exc)


# How a Swarm roll-out ends (UpdateStatus.State), and what the job makes of it.
SWARM_DONE = {"completed": SUCCEEDED, "rollback_completed": ROLLED_BACK,
              "rollback_paused": FAILED, "paused": FAILED}
SWARM_UPDATE_TRIES = 5  # version conflicts retried: someone else updates the service meanwhile
SWARM_QUIET = 5.0  # seconds without an UpdateStatus change before an unchanged service is up to date


def image_digest(reference: str) -> str:
    """The sha256 digest pinned in an image reference (repo:tag@sha256:...), or ''."""
    return reference.rpartition("@")[2] if "@" in reference else ""


def service_image(spec: Optional[Dict[str, Any]]) -> str:
    """TaskTemplate.ContainerSpec.Image of a service spec ('' when absent)."""
    return str(_dig(spec or {}, "TaskTemplate", "ContainerSpec", "Image") or "")


def task_image(task: Dict[str, Any]) -> str:
    """Spec.ContainerSpec.Image of a task ('' when absent)."""
    return str(_dig(task, "Spec", "ContainerSpec", "Image") or "")


def with_image(spec: Dict[str, Any], image: str) -> Dict[str, Any]:
    """A copy of a service spec with only TaskTemplate.ContainerSpec.Image changed."""
    new = copy.deepcopy(spec)
    new.setdefault("TaskTemplate", {}).setdefault("ContainerSpec", {})["Image"] = image
    return new


class SwarmServiceTarget:
    """A Docker Swarm service (the app's `service`), whose roll-out Swarm
    does itself: its UpdateConfig (parallelism, order, failure action,
    monitor) and RollbackConfig apply. This target resolves the tag's
    digest, so every node runs exactly that image, changes the service's
    image and nothing else, and follows UpdateStatus to its end.

    Before the update is submitted the journal hears step 'service-update'
    with the digest; converge() finds from the service itself whether the
    update reached Swarm, and follows it then (it never submits twice).
    """

    def __init__(self, engine: DockerClient, deadline: StopDeadline,
                 docker_config: Optional[str] = None,
                 registry: Optional[dockerapi.RegistryClient] = None,
                 record_step: Callable[..., None] = lambda job, **fields: None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, interval: float = 1.0):
        self.engine = engine
        self.deadline = deadline
        self.docker_config = docker_config or dockerapi.docker_config_path()
        self.registry = registry or dockerapi.RegistryClient()
        self.record_step = record_step
        self.clock, self.sleep, self.interval = clock, sleep, interval

    @staticmethod
    def describe(app: AppConfig) -> str:
        return "Swarm service %s" % app.service

    def deploy(self, job: Job, jlog: logging.LoggerAdapter) -> Tuple[str, str]:
        """Point the service at image:tag@digest and follow Swarm's roll-out."""
        app = job.app
        auth = self.credentials(app)
        if not job.pinned:
            job.digest = self.resolve(app, job.tag, auth.auth, jlog)
        image = "%s@%s" % (job.reference, job.digest)
        for attempt in range(1, SWARM_UPDATE_TRIES + 1):
            service = self.engine.inspect_service(app.service)
            if image_digest(service_image(service.get("Spec"))) == job.digest:
                if _dig(service, "UpdateStatus", "State") not in (None, "completed"):
                    # Set already (a job cut off by a shutdown, someone else):
                    # its roll-out, not a new update, says how it ends.
                    jlog.info("service %s is set to %s already: following its roll-out",
                              app.service, _short(job.digest))
                    return self.follow(job, service["ID"], None, jlog)
                return UP_TO_DATE, "service %s already runs %s (%s)" % (
                    app.service, job.reference, _short(job.digest))
            self.deadline.check()  # the last moment to stop with nothing changed
            self.record_step(job, step="service-update", digest=job.digest, container=app.service)
            try:
                self.engine.update_service(service["ID"], _dig(service, "Version", "Index"),
                                           with_image(service["Spec"], image), auth.auth)
                break
            except dockerapi.OutOfSequence as exc:
                jlog.info("service %s changed meanwhile (%s); reading it again", app.service,
                          exc.message)
                self.record_step(job, step=None)
        else:
            raise DeployFailed("service %s changed under every one of %d updates; not updated"
                               % (app.service, SWARM_UPDATE_TRIES))
        jlog.info("service %s: image set to %s; Swarm rolls it out (up to %s)",
                  app.service, image, format_seconds(app.swarm_timeout))
        return self.follow(job, service["ID"], _dig(service, "UpdateStatus", "StartedAt"), jlog)

    def credentials(self, app: AppConfig) -> dockerapi.RegistryAuth:
        try:
            return app_registry_auth(app, self.docker_config)
        except dockerapi.CredentialsError as exc:
            raise DeployFailed("no registry credentials: %s" % exc.message) from None

    def resolve(self, app: AppConfig, tag: str, auth: Optional[Dict[str, str]],
                jlog: logging.LoggerAdapter) -> str:
        """The digest app.image:tag points at now, asked of the registry."""
        try:
            digest = self.registry.manifest_digest(app.image, tag, auth).digest
        except dockerapi.RegistryError as exc:
            raise DeployFailed("cannot resolve %s:%s to a digest: %s"
                               % (app.image, tag, exc.message)) from exc
        jlog.info("%s:%s is %s", app.image, tag, digest)
        return digest

    def follow(self, job: Job, service_id: str, before: Optional[str],
               jlog: logging.LoggerAdapter) -> Tuple[str, str]:
        """Watch UpdateStatus (a status whose StartedAt is `before` is an
        earlier update's) until Swarm ends the roll-out, or the app's
        swarm_timeout passes."""
        app = job.app
        began = self.clock()
        reason, progress = "", (-1, -1)
        while True:
            service = self.engine.inspect_service(service_id)
            status = service.get("UpdateStatus") or {}
            ours = bool(status) and status.get("StartedAt") != before
            state = status.get("State", "") if ours else ""
            if state.startswith("rollback") and status.get("Message") and not reason:
                reason = status["Message"]  # why Swarm rolls back; the last one says only 'completed'
            now = self.updated_tasks(service, job.digest)
            if now != progress:
                progress = now
                jlog.info("service %s: %d/%d tasks updated%s", app.service, now[0], now[1],
                          " (%s)" % state if state else "")
            counted = "%d/%d tasks updated" % progress
            if state in SWARM_DONE:
                return self.outcome(job, service_id, SWARM_DONE[state], status, reason, counted)
            waited = self.clock() - began
            # An image string changed to the same digest starts no roll-out.
            if not ours and waited >= SWARM_QUIET and progress[0] == progress[1]:
                return UP_TO_DATE, "service %s already runs %s (%s), %s" % (
                    app.service, job.reference, _short(job.digest), counted)
            if waited >= app.swarm_timeout:
                raise DeployFailed("service %s: Swarm's roll-out did not end within %s (%s, %s); "
                                   "Swarm goes on with it" % (app.service, format_seconds(app.swarm_timeout),
                                                              state or "not started", counted))
            self.deadline.check()
            self.sleep(self.interval)

    def outcome(self, job: Job, service_id: str, state: str, status: Dict[str, Any],
                reason: str, progress: str) -> Tuple[str, str]:
        """(state, description) of an ended roll-out; raises for a failed one."""
        app = job.app
        if state == SUCCEEDED:
            return SUCCEEDED, "service %s now runs %s (%s), %s" % (
                app.service, job.reference, _short(job.digest), progress)
        message = "; ".join(part for part in (reason, status.get("Message"),
                                              self.task_error(service_id, job.digest)) if part)
        text = "service %s: Swarm %s: %s" % (app.service, status.get("State"), message)
        raise (RolledBack if state == ROLLED_BACK else DeployFailed)(text)

    def updated_tasks(self, service: Dict[str, Any], digest: str) -> Tuple[int, int]:
        """(running tasks on `digest`, replicas) of the service. Replicas
        from the spec when it has them: start-first runs one task more
        while it rolls out; a global service's are its tasks."""
        tasks = self.engine.list_tasks({"service": [service["ID"]], "desired-state": ["running"]})
        done = sum(1 for task in tasks if _dig(task, "Status", "State") == "running"
                   and image_digest(task_image(task)) == digest)
        replicas = _dig(service, "Spec", "Mode", "Replicated", "Replicas")
        return done, replicas if isinstance(replicas, int) else len(tasks)

    def task_error(self, service_id: str, digest: str) -> str:
        """The newest error of a task that ran `digest` ('' when none says one)."""
        failed = [task for task in self.engine.list_tasks({"service": [service_id]})
                  if _dig(task, "Status", "Err") and image_digest(task_image(task)) == digest]
        failed.sort(key=lambda task: str(_dig(task, "Status", "Timestamp") or ""))
        return str(_dig(failed[-1], "Status", "Err")) if failed else ""

    def converge(self, job: Job, row: Dict[str, Any], jlog: logging.LoggerAdapter) -> None:
        """A crash interrupted the job: when its update reached the service
        (the spec, or the spec Swarm rolled back from, names its digest),
        follow that roll-out to its end; else leave the job to run again."""
        if row.get("step") != "service-update" or not row.get("digest"):
            return
        job.digest = row["digest"]
        service = self.engine.inspect_service(job.app.service)
        images = (service_image(service.get("Spec")), service_image(service.get("PreviousSpec")))
        if job.digest not in (image_digest(images[0]), image_digest(images[1])):
            jlog.info("service %s never got %s: updating it now", job.app.service, _short(job.digest))
            return
        jlog.info("service %s got %s before the crash: following its roll-out",
                  job.app.service, _short(job.digest))
        try:
            job.state, job.description = self.follow(job, service["ID"], None, jlog)
        except RolledBack as exc:
            job.state, job.description = ROLLED_BACK, str(exc)
        except DeployFailed as exc:
            job.state, job.description = FAILED, str(exc)

    def running_version(self, app: AppConfig) -> Tuple[Optional[str], List[str]]:
        """(tag, digests) the service's spec names, for a poll to compare."""
        try:
            image = service_image(self.engine.inspect_service(app.service).get("Spec"))
        except NotFound:
            return None, []
        return running_tag_of({"Config": {"Image": image}}), [image_digest(image)] if "@" in image else []

    def running_tag(self, app: AppConfig) -> Optional[str]:
        """The tag the service's spec names; None when unknown."""
        try:
            return self.running_version(app)[0]
        except DockerError as exc:
            log.warning("repo=%s cannot inspect service %s for its running tag: %s",
                        app.repository, app.service, exc)
            return None


############################################################################
# The health gate: is the new container good?
############################################################################

EVENT_WINDOW = 1.0  # seconds: the gate watches events in slices, to notice a shutdown


def event_action(event: Dict[str, Any]) -> str:
    """What an Engine event says happened ('die', 'health_status: healthy'...);
    older Engines name it 'status'. Podman says 'health_status' and puts
    the status in a HealthStatus field of its own."""
    action = event.get("Action") or event.get("status") or ""
    if action == "health_status" and event.get("HealthStatus"):
        return "health_status: " + event["HealthStatus"]
    return action


def has_healthcheck(state: Dict[str, Any]) -> bool:
    """A container's State says a HEALTHCHECK watches it. Podman 4.3 always
    reports a Health, with an empty Status when there is no healthcheck."""
    return bool((state.get("Health") or {}).get("Status"))


def _events_of(container_id: str) -> Dict[str, List[str]]:
    """The /events filter for one container's events."""
    return {"type": ["container"], "container": [container_id]}


class HealthGate:
    """Waits until a new container is proven healthy, or says why not.

    In order of what the app has: the image's or container's HEALTHCHECK
    ('unhealthy' fails at once); else the configured HTTP URL or TCP port;
    else still running, not restarting, after the settle time. Dying at
    any point fails at once. The Engine's events are read in slices of
    EVENT_WINDOW seconds, and `check_cut_off` is called between them, so a
    shutdown interrupts a long wait.
    """

    def __init__(self, engine: DockerClient, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 probe: Optional[Callable[[str, float], bool]] = None,
                 check_cut_off: Callable[[], None] = lambda: None):
        self.engine = engine
        self.clock = clock
        self.sleep = sleep
        self.probe = probe or probe_endpoint
        self.check_cut_off = check_cut_off

    def wait_healthy(self, container_id: str, app: AppConfig, started: float,
                     jlog: logging.LoggerAdapter) -> str:
        """Return how the container proved healthy, or raise DeployFailed."""
        deadline = self.clock() + app.health_timeout
        try:
            state = self.alive_state(container_id)
        except DeployFailed:
            # Died already, and maybe restarted by its policy (exit code 0
            # then): the events say how it died.
            for event in self.engine.events(started, self.clock(), _events_of(container_id)):
                self.fail_on_death(event)
            raise
        if has_healthcheck(state):
            jlog.info("waiting for the HEALTHCHECK (up to %s)", format_seconds(app.health_timeout))
            return self.wait_for_healthcheck(container_id, started, deadline)
        if app.health_url or app.health_tcp:
            target = app.health_url or "tcp://" + app.health_tcp
            jlog.info("probing %s (up to %s)", target, format_seconds(app.health_timeout))
            return self.wait_for_probe(container_id, app, deadline)
        jlog.info("checking it stays up for %s", format_seconds(app.settle))
        return self.wait_settled(container_id, started, min(deadline, self.clock() + app.settle))

    def alive_state(self, container_id: str) -> Dict[str, Any]:
        """The container's State; DeployFailed when it exited or restarts."""
        info = self.engine.inspect_container(container_id)
        state = info.get("State") or {}
        if not state.get("Running") or state.get("Restarting") or info.get("RestartCount"):
            raise DeployFailed("it %s (exit code %s)" % (
                "keeps restarting" if state.get("Restarting") or info.get("RestartCount")
                else "exited", state.get("ExitCode")))
        return state

    def wait_for_healthcheck(self, container_id: str, started: float, deadline: float) -> str:
        status = (self.alive_state(container_id).get("Health") or {}).get("Status")
        if status == "healthy":
            return "HEALTHCHECK healthy"
        if status == "unhealthy":
            raise DeployFailed("its HEALTHCHECK reports unhealthy")
        for event in self.container_events(container_id, started, deadline):
            action = event_action(event)
            if action == "health_status: healthy":
                return "HEALTHCHECK healthy"
            if action == "health_status: unhealthy":
                raise DeployFailed("its HEALTHCHECK reports unhealthy")
            self.fail_on_death(event)
        raise DeployFailed("its HEALTHCHECK did not report healthy within the health timeout")

    def wait_for_probe(self, container_id: str, app: AppConfig, deadline: float) -> str:
        while True:
            self.check_cut_off()
            state = self.alive_state(container_id)
            target = self.probe_target(container_id, app)
            if self.probe(target, min(2.0, max(0.1, deadline - self.clock()))):
                return "%s answered" % target
            if self.clock() >= deadline:
                raise DeployFailed("%s did not answer within %s (state %s)"
                                   % (target, format_seconds(app.health_timeout), state.get("Status")))
            self.sleep(0.2)

    def probe_target(self, container_id: str, app: AppConfig) -> str:
        """The health URL or tcp://host:port, with {ip} as the container's address."""
        target = app.health_url or "tcp://" + app.health_tcp
        if "{ip}" in target:
            networks = networks_of(self.engine.inspect_container(container_id))
            addresses = [n.get("IPAddress") for n in networks.values() if n.get("IPAddress")]
            target = target.replace("{ip}", addresses[0] if addresses else "0.0.0.0")
        return target

    def wait_settled(self, container_id: str, started: float, until: float) -> str:
        for event in self.container_events(container_id, started, until):
            self.fail_on_death(event)
        self.alive_state(container_id)
        return "still running after %s" % format_seconds(max(0.0, until - started))

    def container_events(self, container_id: str, since: float, until: float) -> Iterator[Dict[str, Any]]:
        """The container's events from `since` (replayed) until `until` (live),
        a slice of EVENT_WINDOW seconds at a time."""
        filters = _events_of(container_id)
        while True:
            self.check_cut_off()
            now = self.clock()
            if until <= now:
                return
            window = min(until, now + EVENT_WINDOW)
            yield from self.engine.events(since, window, filters)
            # Slices overlap: an event at a seam comes twice (harmless), never not at all.
            since = max(since, window - EVENT_WINDOW / 2)

    @staticmethod
    def fail_on_death(event: Dict[str, Any]) -> None:
        action = event_action(event)
        if action in ("die", "oom"):
            attributes = (event.get("Actor") or {}).get("Attributes") or {}
            # Podman 4.3 sends both; the reference names containerExitCode alone.
            code = attributes.get("exitCode", attributes.get("containerExitCode", "?"))
            raise DeployFailed("it exited (exit code %s)" % code if action == "die" else "it ran out of memory")


def probe_endpoint(target: str, timeout: float) -> bool:
    """True when an http(s) URL answers 2xx/3xx, or a tcp://host:port accepts."""
    if target.startswith("tcp://"):
        host, _, port = target[len("tcp://"):].rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            return False
    import urllib.error
    try:
        with no_redirects_opener(use_proxy_env=False)(target, timeout=timeout) as response:
            return 200 <= response.status < 400
    except urllib.error.HTTPError as exc:
        return 300 <= exc.code < 400
    except (OSError, ValueError, http.client.HTTPException):
        return False


############################################################################
# Label discovery: every container a push reaches
############################################################################
#
# Besides the container a section names, a push reaches every container
# labelled <prefix>.enable=true whose image is the pushed repository and
# which follows the pushed tag. Labels with the settings' names set that
# container's options, checked by the same rules as the config file; a
# section's own settings win over them. A container whose labels are wrong
# is reported and skipped, never guessed at.

# The labels a container may carry (after "<prefix>."); all but enable and
# depends_on are the section settings of the same name.
LABEL_KEYS = ("enable", "tag", "tag_policy", "prerelease", "order", "health_url", "health_tcp",
              "health_timeout", "stop_timeout", "settle", "depends_on")
# The AppConfig fields a label sets; the tag settings go together.
LABEL_FIELDS = {"tag": ("tags", "tag_policy", "prerelease"),
                "tag_policy": ("tags", "tag_policy", "prerelease"),
                "prerelease": ("tags", "tag_policy", "prerelease"),
                "order": ("order",), "health_url": ("health_url",), "health_tcp": ("health_tcp",),
                "health_timeout": ("health_timeout",), "stop_timeout": ("stop_timeout",),
                "settle": ("settle",)}
TAG_SETTINGS = ("tag", "tag_policy", "prerelease")


def split_image_reference(reference: str) -> Tuple[str, str, str]:
    """'host:5000/team/app:v1@sha256:...' -> (image name 'host:5000/team/app',
    repository path 'team/app', tag 'v1'; '' when the reference names none).
    The first part is a registry host when it has a '.' or ':' or is
    localhost, as Docker reads it."""
    name = reference.partition("@")[0]
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    parts = name.split("/")
    host = len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost")
    return name, "/".join(parts[1:]) if host else name, tag


def label_options(labels: Mapping[str, str], prefix: str, where: str,
                  notes: List[str]) -> Dict[str, str]:
    """The <prefix>.* labels as settings (prefix dropped). One autodeploy
    does not know is noted, not refused: other tools may share the prefix
    (and `check` shows the note, for a typo)."""
    options = {}
    for key, value in (labels or {}).items():
        if key.startswith(prefix + "."):
            name = key[len(prefix) + 1:]
            if name not in LABEL_KEYS:
                notes.append("%s label %s: not one of %s.{%s}; ignored"
                             % (where, key, prefix, ",".join(LABEL_KEYS)))
                continue
            options[name] = value.strip()
    return options


def parse_labels(options: Dict[str, str], repository: str, where: str) -> AppConfig:
    """Check label settings with the config file's own rules (_parse_app)."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0defaults")
    parser.optionxform = str
    parser.read_dict({"labels": {k: v for k, v in options.items() if k in LABEL_FIELDS}})
    return _parse_app(repository, parser["labels"], where, "/",
                      ("", "", AppConfig._field_defaults["notify_on"]))


def label_view(info: Dict[str, Any], prefix: str, repository: str, base: Optional[AppConfig],
               notes: List[str]) -> AppConfig:
    """The app as one labelled container deploys it: `base` (the section, or
    None) with the container's name and label settings, where the section
    does not set them itself (the config wins; `notes` says what applied).
    Without a section the image is the one the container names, and an
    exact policy follows the tag the container runs. ConfigError: a bad label."""
    name = info["Name"].lstrip("/")
    where = "container %s (labels %s.*):" % (name, prefix)
    config = info.get("Config") or {}
    image, _, running = split_image_reference(config.get("Image") or "")
    options = label_options(config.get("Labels") or {}, prefix, where, notes)
    options.pop("enable", None)
    depends_on = options.pop("depends_on", "")
    if depends_on and not CONTAINER_NAME_RE.match(depends_on):
        raise ConfigError("%s depends_on: %r is not a container name" % (where, depends_on))
    settings = base.settings if base is not None else frozenset()
    for key in sorted(options):
        if key in settings or (key in TAG_SETTINGS and settings & set(TAG_SETTINGS)):
            notes.append("%s: label %s.%s ignored: [%s] sets %s (the config wins)"
                         % (name, prefix, key, repository, key))
            del options[key]
    if "tag" not in options and options.get("tag_policy", "exact") == "exact" \
            and not (base is not None and (name == base.container or settings & set(TAG_SETTINGS))):
        if not running:
            raise ConfigError("%s its image %s names no tag to follow: label %s.tag says which"
                              % (where, config.get("Image"), prefix))
        options["tag"] = running
    parsed = parse_labels(options, repository, where)
    view = base if base is not None else parsed._replace(image=image, labelled=True)
    fields = {field for key in options if key in LABEL_FIELDS for field in LABEL_FIELDS[key]}
    view = view._replace(container=name, depends_on=depends_on,
                         **{field: getattr(parsed, field) for field in fields})
    if base is None or name != base.container:
        view = view._replace(image=image)  # pulled as the container names it
    if options:
        notes.append("%s: labels applied: %s" % (name, ", ".join(
            "%s=%s" % (key, value) for key, value in sorted(options.items()))))
    return view


def follows(app: AppConfig, tag: str, running_tag: Optional[str]) -> bool:
    """The pushed tag is one this app (a container's view) deploys."""
    if app.tag_policy == "exact":
        return tag in app.tags
    return tag_refusal(app, tag, running_tag) is None


def deploy_order(views: List[AppConfig]) -> List[AppConfig]:
    """By name, except that a container comes after the one it depends on
    (depends_on naming no other target is met already; a cycle falls back
    to names)."""
    waiting = sorted(views, key=lambda view: view.container)
    names = {view.container for view in waiting}
    ordered: List[AppConfig] = []
    placed: Set[str] = set()
    while waiting:
        ready = [view for view in waiting
                 if view.depends_on in placed or view.depends_on not in names
                 or view.depends_on == view.container]
        chosen = ready[0] if ready else waiting[0]
        ordered.append(chosen)
        placed.add(chosen.container)
        waiting.remove(chosen)
    return ordered


class Discovery:
    """Finds the containers a push reaches, through the Engine: the
    section's container (if any) and the labelled ones."""

    def __init__(self, engine: DockerClient, prefix: str = DEFAULT_LABEL_PREFIX):
        self.engine = engine
        self.prefix = prefix

    def labelled(self) -> List[Dict[str, Any]]:
        """Inspect documents of the containers labelled <prefix>.enable=true
        (not those set aside mid-swap)."""
        found = []
        for summary in self.engine.list_containers(
                all=True, filters={"label": ["%s.enable=true" % self.prefix]}):
            names = [name.lstrip("/") for name in summary.get("Names") or ()]
            if any(ASIDE_MARK in name for name in names):
                continue
            try:
                found.append(self.engine.inspect_container(summary["Id"]))
            except NotFound:
                continue  # removed meanwhile
        return found

    def targets(self, repository: str, tag: str, base: Optional[AppConfig],
                notes: List[str], problems: List[str]) -> List[AppConfig]:
        """The views to deploy, in deploy order: the section's container
        (always, labelled or not: it may not exist yet) and each labelled
        container of `repository` that follows `tag`. Labels that are
        wrong go to `problems` and skip their container."""
        views = [] if base is None else [base]
        for info in self.labelled():
            name = info["Name"].lstrip("/")
            image = (info.get("Config") or {}).get("Image") or ""
            if split_image_reference(image)[1] != repository:
                continue
            try:
                view = label_view(info, self.prefix, repository, base, notes)
            except ConfigError as exc:
                problems.append("%s; %s skipped" % (exc, name))
                if base is not None and name == base.container:
                    problems[-1] = "%s; [%s] settings alone apply" % (exc, repository)
                continue
            if base is not None and name == base.container:
                views[0] = view
            elif follows(view, tag, running_tag_of(info)):
                views.append(view)
            else:
                notes.append("%s does not follow %s (%s)" % (name, tag, describe_policy(view)))
        return deploy_order(views) if len(views) > 1 else views

    def services(self, repository: str, tag: str) -> List[AppConfig]:
        """Apps of the Swarm services labelled <prefix>.enable=true that run
        `repository` and follow `tag` (their <prefix>.tag label, else the
        tag their image names), by name; [] when this Engine is no Swarm
        manager (it answers 503 then)."""
        try:
            found = self.engine.list_services({"label": ["%s.enable=true" % self.prefix]})
        except DockerError as exc:
            if exc.status == 503:
                return []
            raise
        apps = []
        for service in found:
            spec = service.get("Spec") or {}
            image, path, running = split_image_reference(service_image(spec))
            followed = (spec.get("Labels") or {}).get(self.prefix + ".tag") or running
            if path == repository and tag in followed.split():
                apps.append(AppConfig(repository=repository, image=image, tags=(tag,),
                                      container=spec.get("Name", ""), service=spec.get("Name", ""),
                                      labelled=True))
        return sorted(apps, key=lambda app: app.service)

    def view_of(self, name: str, aside: str, repository: str, base: AppConfig) -> AppConfig:
        """The view of one container by name (or set aside as `aside`), for
        a swap a crash interrupted; its labels if it has good ones."""
        for candidate in (name, aside):
            try:
                info = self.engine.inspect_container(candidate)
            except NotFound:
                continue
            info = dict(info, Name="/" + name)
            labels = (info.get("Config") or {}).get("Labels") or {}
            if labels.get(self.prefix + ".enable") == "true":
                try:
                    return label_view(info, self.prefix, repository,
                                       None if base.labelled else base, [])
                except ConfigError:
                    pass
            break
        return base._replace(container=name)


############################################################################
# Running a job, and recovery: outcomes, a lost Engine, resuming after a crash
############################################################################

class JobRunner:
    """Runs one job on its target and sorts the outcome into the job's
    state and description. A Docker Engine that is down is waited for (up
    to `engine_wait` seconds, when nothing is changed yet). A swap that a
    crash (the journal's row in job.resume) or a lost Engine (job.swap)
    interrupted is converged first, however long that takes: it is never
    abandoned, and `unconverged` names the jobs waiting to converge."""

    def __init__(self, target: ContainerTarget, deadline: StopDeadline,
                 engine_wait: float = ENGINE_WAIT, clock: Callable[[], float] = time.time,
                 sleep: Optional[Callable[[float], None]] = None,
                 discovery: Optional[Discovery] = None,
                 swarm: Optional["SwarmServiceTarget"] = None):
        self.target = target
        self.swarm = swarm or SwarmServiceTarget(target.engine, deadline, target.docker_config,
                                                 record_step=target.record_step, clock=clock,
                                                 sleep=sleep or deadline.pause)
        self.discovery = discovery  # None: each app deploys its section's container only
        self.engine = target.engine  # the Engine every target of this host talks to
        self.deadline, self.engine_wait = deadline, engine_wait
        # sleep: None (a service) pauses on the deadline, which a stop wakes; tests inject one.
        self.clock, self.sleep = clock, sleep
        self.unconverged: Set[str] = set()

    def target_for(self, app: AppConfig) -> Union[ContainerTarget, "SwarmServiceTarget"]:
        """The target an app deploys to: its Swarm service, else its container(s)."""
        return self.swarm if app.service else self.target

    def run(self, job: Job) -> None:
        """Deploy `job`, setting its state and description; never raises."""
        jlog = JobLog(log, job)
        try:
            job.state, job.description = self.deploy(job, jlog)
            jlog.info("%s: %s", job.state, job.description)
        except DeployFailed as exc:
            self.sort_failure(job, exc, jlog)
        except DockerError as exc:
            job.state, job.description = ERROR, str(exc)
            jlog.error("error: %s", exc)
        except Exception as exc:  # a bug: the job says so, the worker goes on
            job.state, job.description = ERROR, "internal error: %r" % exc
            jlog.exception("internal error")

    def deploy(self, job: Job, jlog: JobLog) -> Tuple[str, str]:
        """(state, description) of the deploy, resuming what was interrupted:
        each container the push reaches (see roll_out), or the app's one."""
        target = self.target_for(job.app)
        jlog.info("deploying %s to %s", job.reference, target.describe(job.app))
        if isinstance(target, SwarmServiceTarget):
            return self.deploy_service(target, job, jlog)
        converged: Optional[Tuple[str, str, str]] = None
        if job.resume is not None:
            swap, job.resume = dict(job.resume), None
            base = job.app
            job.app = self.view_for_swap(base, swap, jlog)
            try:
                self.converge(target, job, swap, jlog)
            finally:
                job.app = base
            if job.final:
                if swap.get("id") in (None, job.id):
                    if self.discovery is None:
                        return job.state, job.description
                    # The container mid-swap is done; the roll-out goes on from it.
                    converged = (swap.get("container") or base.container, job.state,
                                 job.description)
                # Else that was the swap of a job this one superseded: now deploy this one.
                job.state, job.description = RUNNING, ""
        views = self.targets_of(job, jlog)
        if len(views) == 1 and (converged is None or converged[0] == views[0].container):
            if converged is not None:
                return converged[1], converged[2]
            return self.deploy_one(target, job, views[0], jlog)
        return self.roll_out(target, job, views, converged, jlog)

    def deploy_service(self, target: "SwarmServiceTarget", job: Job, jlog: JobLog) -> Tuple[str, str]:
        """A Swarm service's job: what a crash left is followed to its end
        first (the update was submitted), else the service is updated."""
        self.wait_for_engine(jlog)
        if job.app.labelled:  # the image as the service names it (the journal keeps the repository)
            spec = self.engine.inspect_service(job.app.service).get("Spec")
            job.app = job.app._replace(image=split_image_reference(service_image(spec))[0])
        if job.resume is not None:
            row, job.resume = dict(job.resume), None
            target.converge(job, row, jlog)
            if job.final and row.get("id") in (None, job.id):
                return job.state, job.description
            job.state, job.description = RUNNING, ""
        return target.deploy(job, jlog)

    def targets_of(self, job: Job, jlog: JobLog) -> List[AppConfig]:
        """The app's views to deploy, in order: the section's container and
        the labelled containers that follow the pushed tag (Discovery).
        Wrong labels are logged to the job and their containers skipped."""
        if self.discovery is None:
            return [job.app]
        self.wait_for_engine(jlog)
        notes: List[str] = []
        problems: List[str] = []
        views = self.discovery.targets(job.app.repository, job.tag,
                                       None if job.app.labelled else job.app, notes, problems)
        for note in notes:
            jlog.info("%s", note)
        for problem in problems:
            jlog.warning("%s", problem)
        if not views:
            raise DeployFailed("no container follows %s:%s any more (no [%s] section, and no "
                               "container labelled %s.enable=true runs that image with that tag)%s"
                               % (job.app.repository, job.tag, job.app.repository,
                                  self.discovery.prefix,
                                  "; %s" % "; ".join(problems) if problems else ""))
        if len(views) > 1:
            jlog.info("%d containers to deploy, in this order: %s" % (
                len(views), ", ".join(view.container for view in views)))
        return views

    def view_for_swap(self, base: AppConfig, swap: Dict[str, Any], jlog: JobLog) -> AppConfig:
        """The view of the container a crash left mid-swap (its journal row
        names it), so converge puts that one in order."""
        name = swap.get("container") or base.container
        if self.discovery is None or (name == base.container and not base.labelled):
            return base if name == base.container else base._replace(container=name)
        self.wait_for_engine(jlog, forever=True)
        return self.discovery.view_of(name, aside_name(name, swap.get("id") or ""),
                                      base.repository, base)

    def roll_out(self, target: ContainerTarget, job: Job, views: List[AppConfig],
                 converged: Optional[Tuple[str, str, str]], jlog: JobLog) -> Tuple[str, str]:
        """Deploy each view in turn, each with the full swap and health gate.
        The first failure stops the roll-out: that container is rolled back
        (as any failed deploy), those done stay on the new version, the rest
        are not tried; the description says which is which. The journal
        row names the container being deployed (its `container`), so a
        crash mid-swap is put in order on the right one."""
        done: List[str] = []
        states: List[str] = []
        for index, view in enumerate(views):
            try:
                if converged is not None and converged[0] == view.container:
                    state, description = converged[1], converged[2]
                    if state not in (SUCCEEDED, UP_TO_DATE):
                        raise (RolledBack if state == ROLLED_BACK else DeployFailed)(description)
                else:
                    target.record_step(job, container=view.container)
                    state, description = self.deploy_one(target, job, view, jlog)
            except DeployFailed as exc:
                if cut_off(exc):
                    raise
                rest = [later.container for later in views[index + 1:]]
                failed = "%s %s: %s" % (view.container, "rolled back" if isinstance(exc, RolledBack)
                                        else "failed", exc)
                message = "; ".join(done + [failed] + (["not tried: %s" % ", ".join(rest)]
                                                       if rest else []))
                raise type(exc)(message) from exc
            jlog.info("%s: %s", view.container, description)
            done.append(description)
            states.append(state)
        return (SUCCEEDED if SUCCEEDED in states else UP_TO_DATE), "; ".join(done)

    def deploy_one(self, target: ContainerTarget, job: Job, view: AppConfig,
                   jlog: JobLog) -> Tuple[str, str]:
        """target.deploy for one container (job.app is its view meanwhile),
        waiting for an Engine that is away and converging a swap it left."""
        base, job.app = job.app, view
        try:
            for attempt in range(1, ENGINE_LOSSES + 1):
                self.wait_for_engine(jlog)
                try:
                    return target.deploy(job, jlog)
                except DockerError as exc:
                    if job.swap is None and (exc.status is not None or attempt == ENGINE_LOSSES
                                             or self.engine_answers()):
                        raise
                    jlog.warning("lost the Docker Engine: %s" if exc.status is None else
                                 "the Docker Engine refused a step of the swap: %s", exc)
                    if job.swap is None:
                        continue
                    # Mid-swap: put in order what the swap left, as after a crash
                    # of ours; done, or the old one is back and the job runs once more.
                    self.converge(target, job, job.swap, jlog)
                    if job.final:
                        return job.state, job.description
                    if attempt == ENGINE_LOSSES:
                        raise
            raise AssertionError("unreachable")
        finally:
            job.app = base

    def converge(self, target: ContainerTarget, job: Job, swap: Dict[str, Any],
                 jlog: JobLog) -> None:
        """target.converge(job, swap), retried until it is done: while the
        Engine is away (noticed back within a second) and after. Only a
        shutdown stops it (CutOff), leaving job.swap set: the job stays
        `running` in the journal and the next start goes on from there."""
        job.swap = swap
        self.unconverged.add(job.id)
        job.description = "not converged yet: putting the swap in order"
        target.record_step(job)
        delay = 1.0
        try:
            while True:
                self.wait_for_engine(jlog, forever=True)
                try:
                    target.converge(job, swap, jlog)
                    job.swap = None
                    return
                except DockerError as exc:
                    if exc.status is None and not self.engine_answers():
                        delay = 1.0  # gone again: wait_for_engine notices its return
                    job.description = "not converged yet: %s" % exc
                    jlog.warning("swap not converged yet (%s); trying again in %s", exc, format_seconds(delay))
                    target.record_step(job)
                self.deadline.check()
                self.deadline.pause(delay, self.sleep)  # not past the deadline: then check() ends it
                delay = min(delay * 2, ENGINE_RETRY_MAX)
        finally:
            self.unconverged.discard(job.id)

    @staticmethod
    def sort_failure(job: Job, exc: DeployFailed, jlog: JobLog) -> None:
        if cut_off(exc):
            # Not the new version's fault: the job runs again at the next
            # start. What it changed is put back, unless the Engine could
            # not be reached to do so: then the journal keeps it 'running',
            # and the next start converges it first.
            unresolved = job.resume is not None or job.swap is not None
            job.state = RUNNING if unresolved else QUEUED
            job.description = "cut off by a shutdown (%s); runs again at the next start" % exc
            jlog.warning("%s", job.description)
        elif isinstance(exc, RolledBack):
            job.state, job.description = ROLLED_BACK, str(exc)
            jlog.warning("rolled back: %s", exc)
        else:
            job.state, job.description = FAILED, str(exc)
            jlog.warning("failed: %s", exc)

    def wait_for_engine(self, jlog: logging.LoggerAdapter, forever: bool = False) -> None:
        """Return once the Engine answers. While it is down or restarting,
        ask again every second (its return is noticed at once), for up to
        engine_wait seconds, or `forever` (a swap to converge): only a
        shutdown's CutOff ends that wait."""
        began = self.clock()
        next_note = 0.0
        while True:
            try:
                self.engine.ping()
                if next_note:
                    jlog.info("the Docker Engine answers again (after %s)", format_seconds(self.clock() - began))
                return
            except DockerError as exc:
                waited = self.clock() - began
                if exc.status is not None or (not forever and waited + 1.0 > self.engine_wait):
                    raise
                if waited >= next_note:  # a line after 0, 1, 2, 4, 8... seconds, not every second
                    jlog.warning("the Docker Engine does not answer (%s); %s", exc,
                                 "waiting for it to put the swap in order" if forever
                                 else "waiting up to %s" % format_seconds(self.engine_wait))
                    next_note = max(1.0, waited * 2)
            # Waiting to begin changes nothing: a shutdown ends it at once (the
            # job stays queued); a swap to put in order waits for the deadline.
            self.deadline.check(idle=not forever)
            self.deadline.pause(1.0, self.sleep)

    def engine_answers(self) -> bool:
        try:
            return self.engine.ping()
        except DockerError:
            return False


def resume_unfinished(rows: List[Dict[str, Any]], config: Config, queue: JobQueue,
                      end: Callable[[Job], None], clock: Callable[[], float] = time.time) -> int:
    """Queue again the jobs the journal holds unfinished (`rows`, oldest
    first: a crash or a stop left them). A job that was mid-swap carries its
    row in job.resume, so the worker puts its containers in order first; a
    job whose app is no longer configured, or whose tag its tag policy no
    longer allows (judged without the running version: the job was accepted
    against it), ends in `end` as an error; a job of labelled containers
    (no section) is resumed as such. Returns how many rows there were."""
    for row in rows:
        app = config.app_for(row["app"])
        if app is None and row.get("labelled"):
            # An app of labelled containers: the job finds them again (and
            # fails when none follows its tag any more).
            app = AppConfig(row["app"], row["app"], (row["tag"],), row["container"], labelled=True,
                            service=row.get("service") or "")
        job = Job(id=row["id"], app=app or AppConfig(row["app"], row["app"], (), row["container"]),
                  tag=row["tag"], callback_url=row["callback_url"], source=row["source"],
                  received=row["received"] or 0.0)
        job.lines = (row["log"] or "").split("\n") if row["log"] else []
        job.digest = row.get("digest") or ""
        job.pinned = bool(row.get("pinned"))
        refusal = tag_refusal(app, row["tag"], None) if app is not None else ""
        if app is None or refusal:
            job.state, job.finished = ERROR, clock()
            job.description = "%s:%s is no longer configured%s; not resumed" % (
                row["app"], row["tag"], ": %s" % refusal if refusal else "")
            end(job)
            continue
        if row["state"] == RUNNING:
            job.resume = row
        replaced = queue.put(job, force=True)
        if replaced is not None and replaced.resume is not None and job.resume is None:
            # A newer push replaces a job a crash cut short mid-swap: the
            # newer one must put that swap in order before its own.
            job.resume = replaced.resume
    if rows:
        log.info("recovered %d unfinished job(s) from the journal", len(rows))
    return len(rows)


############################################################################
# Outbound HTTP: callbacks and notifications
############################################################################

def _mask_url(url: str) -> str:
    """Scheme and host only: paths of webhook URLs carry secrets."""
    try:
        parts = urllib.parse.urlsplit(url)
        return printable("%s://%s/..." % (parts.scheme, parts.hostname or "?"))
    except ValueError:
        return "(unparseable URL)"


def callback_allowed(url: str, allow: List[Tuple[str, str, int]]) -> bool:
    """True when `url` is http(s) to an allowed origin, with no credentials in it."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if "@" in parts.netloc or not parts.hostname:  # credentials, even empty ones
        return False
    return (parts.scheme, parts.hostname, port) in allow


def callback_body(job: Job, note: str = "") -> Dict[str, str]:
    """The JSON Docker Hub's callback_url expects."""
    description = job.description + (" " + note if note else "")
    return {"state": STATES[job.state].callback,
            "description": description[:255], "context": "autodeploy"}


def notification_body(job: Job, event: str, host: str) -> Dict[str, Any]:
    """The JSON a notify_url receives about a finished job."""
    took = job.finished - job.started if job.finished and job.started else None
    return {"event": event, "state": job.state, "app": job.app.repository,
            "container": job.app.container, "image": job.reference, "job": job.id,
            "description": job.description, "host": host, "source": job.source,
            "received": job.received, "started": job.started, "finished": job.finished,
            "took": round(took, 3) if took is not None else None}


def slack_body(job: Job, event: str, host: str) -> Dict[str, str]:
    """A Slack-compatible incoming-webhook message (Mattermost and Rocket.Chat
    take the same) about a finished job."""
    def escape(text: str) -> str:  # Slack's markup characters
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return {"text": "autodeploy on %s: %s %s (job %s): %s" % (
        escape(host), escape(job.reference), STATES[job.state].words, job.id,
        escape(job.description[:1000]))}


def no_redirects_opener(use_proxy_env: bool = True) -> Callable[..., Any]:
    """urlopen that reports a redirect as an HTTPError instead of following
    it; without `use_proxy_env` it never goes through an http_proxy."""
    import urllib.request  # loaded on first use: it costs start-up time

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    handlers: List[Any] = [NoRedirect]
    if not use_proxy_env:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers).open


Destination = Tuple[str, str, int]  # (scheme, host, port): one sender thread each at most


class Delivery:
    """One POST a finished job owes: its callback, or a notification. It is
    a row of the journal's `deliveries` table from the job's final state
    until it is sent or given up; `due` is on the sender's clock."""
    __slots__ = ("id", "job", "repo", "what", "url", "body", "attempt", "due", "from_request")

    def __init__(self, job: str, repo: str, what: str, url: str, body: Dict[str, Any],
                 due: float, attempt: int = 1, from_request: bool = False,
                 id: Optional[str] = None):
        self.id = id or new_job_id()
        self.job, self.repo, self.what, self.url, self.body = job, repo, what, url, body
        self.due, self.attempt = due, attempt
        # The URL came from a request, not the configuration: it must be in callback_allow.
        self.from_request = from_request

    def __repr__(self) -> str:
        return "<Delivery %s job %s %s attempt %d>" % (self.id, self.job, self.what, self.attempt)

    @property
    def who(self) -> str:
        """What log lines name it by: 'job=%s' % who gives 'job=<id> repo=<repo>'."""
        return "%s repo=%s" % (self.job, self.repo)

    @property
    def destination(self) -> Destination:
        try:
            parts = urllib.parse.urlsplit(self.url)
            return (parts.scheme, parts.hostname or "", parts.port or
                    (443 if parts.scheme == "https" else 80))
        except ValueError:
            return ("", self.url, 0)


class CallbackSender:
    """Posts outcomes to callback URLs (and notifications to the configured
    URLs) from threads of its own, so a slow or dead host never holds up a
    deploy, nor another host's callbacks: each destination (scheme, host,
    port) has its own queue and, while it has something due, its own thread,
    one POST in flight at a time; at most `max_destinations` such threads
    run at once (a destination beyond waits for one to end), and at most
    `max_pending` deliveries wait in all. A failed POST (no answer, 5xx,
    429) is tried again after each of `retry_delays`.

    With a `record` (the Service sets its Recorder), each delivery is a row
    of the journal until it is sent or given up, with its attempt and when
    it is due: resume() queues again what a previous run left."""

    def __init__(self, allow: List[Tuple[str, str, int]], urlopen: Optional[Callable[..., Any]] = None,
                 timeout: float = CALLBACK_TIMEOUT, max_pending: int = 1000,
                 retry_delays: Sequence[float] = CALLBACK_RETRY_DELAYS,
                 max_destinations: int = CALLBACK_DESTINATIONS,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, record: Optional["Recorder"] = None):
        self.allow = allow
        self.urlopen = urlopen
        self.timeout = timeout
        self.max_pending = max_pending
        self.retry_delays = tuple(retry_delays)
        self.max_destinations = max_destinations
        self.clock, self.wall_clock = clock, wall_clock
        self.record = record
        self._cond = threading.Condition()
        # Per destination, a heap of (due, sequence, delivery): earliest due first.
        self._queues: Dict[Destination, List[Tuple[float, int, Delivery]]] = {}
        self._busy: Set[Destination] = set()  # destinations whose thread runs
        self._pending = 0  # queued and in flight
        self._sequence = 0
        self._threads_started = 0
        self._dispatcher: Optional[threading.Thread] = None
        self._stopping = False  # send what is due, then stop
        self._closed = False  # stopped: nothing more is posted or written

    # -- what to send ---------------------------------------------------------

    def callback(self, job: Job, url: Optional[str], body: Dict[str, str]) -> Optional[Delivery]:
        """The delivery of a callback to `url`; None (with a log line when
        there was a URL) when there is none or its origin is not allowed."""
        if not url:
            return None
        if not callback_allowed(url, self.allow):
            log.warning("job=%s repo=%s callback to %s not sent: not an allowed callback origin",
                        job.id, job.app.repository, _mask_url(url))
            return None
        return Delivery(job.id, job.app.repository, "callback " + body["state"], url, body,
                        self.clock(), from_request=True)

    def notification(self, job: Job, what: str, url: str, body: Dict[str, Any]) -> Delivery:
        """The delivery of `body` to `url`, a URL from the configuration
        (checked when it was loaded: no origin check)."""
        return Delivery(job.id, job.app.repository, what, url, body, self.clock())

    def send(self, job: Job, url: Optional[str], body: Dict[str, str]) -> None:
        """Queue one callback (dropped, with a log line, when not allowed)."""
        delivery = self.callback(job, url, body)
        if delivery is not None:
            self.deliver([delivery])

    def post_later(self, job: Job, what: str, url: str, body: Dict[str, Any]) -> None:
        """Queue a POST of `body` to `url` with no origin check: for URLs
        from the configuration (checked when it was loaded)."""
        self.deliver([self.notification(job, what, url, body)])

    def row(self, delivery: Delivery) -> Dict[str, Any]:
        """The delivery as a journal row: its due time on the wall clock,
        which (unlike the sender's) means something after a restart."""
        return {"id": delivery.id, "job": delivery.job, "repo": delivery.repo,
                "what": delivery.what, "url": delivery.url, "body": json.dumps(delivery.body),
                "attempt": delivery.attempt, "from_request": int(delivery.from_request),
                "due": self.wall_clock() + max(0.0, delivery.due - self.clock())}

    def deliver(self, deliveries: List[Delivery], recorded: bool = False) -> None:
        """Queue `deliveries`. Their journal rows are written first, unless
        `recorded` (Service.finish writes them in the transaction of the
        job's final state); a row the journal cannot take is held by the
        Recorder, and the delivery is sent all the same."""
        if not recorded:
            self._write_rows(deliveries)
        dropped = [delivery for delivery in deliveries if not self._queue(delivery)]
        self._forget_rows(dropped)

    def resume(self, rows: List[Dict[str, Any]]) -> None:
        """Queue the deliveries a previous run left in the journal (`rows`);
        called before anything new is queued, so they go first. Overdue ones
        are due now; a callback whose origin is no longer allowed is dropped."""
        now, wall = self.clock(), self.wall_clock()
        queued, dropped = 0, []
        for row in rows:
            try:
                body = json.loads(row["body"])
            except (TypeError, ValueError):
                body = None
            delivery = Delivery(row["job"], row["repo"], row["what"], row["url"], body or {},
                                now + max(0.0, (row["due"] or 0.0) - wall), row["attempt"] or 1,
                                bool(row["from_request"]), row["id"])
            if body is None or (delivery.from_request and not callback_allowed(delivery.url, self.allow)):
                log.warning("job=%s %s to %s dropped: %s", delivery.who, delivery.what,
                            _mask_url(delivery.url), "not an allowed callback origin any more"
                            if body is not None else "its journal row is unreadable")
                dropped.append(delivery)
            elif self._queue(delivery):
                queued += 1
            else:
                dropped.append(delivery)
        self._forget_rows(dropped)
        if queued:
            log.info("%d callback(s) pending from before the restart: queued", queued)

    def _queue(self, delivery: Delivery) -> bool:
        with self._cond:
            if self._closed:
                log.warning("job=%s %s to %s not sent: stopped", delivery.who, delivery.what,
                            _mask_url(delivery.url))
                return False
            if self._pending >= self.max_pending:
                log.warning("job=%s %s to %s dropped: %d posts are waiting already",
                            delivery.who, delivery.what, _mask_url(delivery.url), self._pending)
                return False
            self._pending += 1
            self._push(delivery)
            return True

    def _push(self, delivery: Delivery) -> None:
        """Under the lock: into its destination's queue."""
        self._sequence += 1
        heapq.heappush(self._queues.setdefault(delivery.destination, []),
                       (delivery.due, self._sequence, delivery))
        self._cond.notify_all()

    def _write_rows(self, deliveries: List[Delivery]) -> None:
        if self.record is not None and deliveries and not self._closed:
            changes = Changes()
            for delivery in deliveries:
                changes.delivery(delivery.id, self.row(delivery))
            self.record.write(changes)

    def _forget_rows(self, deliveries: List[Delivery]) -> None:
        if self.record is not None and deliveries and not self._closed:
            changes = Changes()
            for delivery in deliveries:
                changes.delivery(delivery.id, None)
            self.record.write(changes)

    # -- the threads ------------------------------------------------------------

    def start(self) -> None:
        self._dispatcher = threading.Thread(target=self._dispatch, name="autodeploy-callbacks",
                                            daemon=True)
        self._dispatcher.start()

    def alive(self) -> bool:
        """The dispatching thread runs (or was never started)."""
        return self._dispatcher is None or self._dispatcher.is_alive()

    def pending(self) -> int:
        """Deliveries queued or in flight."""
        with self._cond:
            return self._pending

    def busy(self) -> List[Destination]:
        """The destinations a thread is sending to now."""
        with self._cond:
            return sorted(self._busy)

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is due (within `timeout`), then stop. What is not sent
        stays in the journal for the next start (journal = no: it is lost)."""
        with self._cond:
            if self._closed:
                return  # stopped already
            self._stopping = True
            self._cond.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        with self._cond:
            self._closed = True  # a POST still in flight no longer writes: its row stays
            self._cond.notify_all()
            pending = self._pending
        if not pending:
            return
        if self.record is not None and self.record.persistent:
            log.warning("%d callback(s) pending: sent after the next start", pending)
        else:
            log.warning("%d callback(s) not sent: stopping", pending)

    def _dispatch(self) -> None:
        """Start a thread for each destination with something due and none
        running, at most max_destinations at once; sleep until the next due."""
        with self._cond:
            while not self._closed:
                now = self.clock()
                wake: Optional[float] = None
                waiting = False  # something due, not yet given a thread
                for destination, heap in sorted(self._queues.items(), key=lambda item: item[1][:1]):
                    if destination in self._busy:
                        continue
                    if not heap:
                        del self._queues[destination]
                    elif heap[0][0] > now:
                        wake = heap[0][0] if wake is None else min(wake, heap[0][0])
                    elif len(self._busy) < self.max_destinations:
                        self._busy.add(destination)
                        self._threads_started += 1
                        threading.Thread(target=self._serve, args=(destination,), daemon=True,
                                         name="autodeploy-callback-%d" % self._threads_started).start()
                    else:
                        waiting = True  # woken when a thread ends
                if self._stopping and not self._busy and not waiting:
                    return  # all that was due is sent; the rest waits for the next start
                self._cond.wait(None if wake is None else wake - now)

    def _serve(self, destination: Destination) -> None:
        """One destination's deliveries, one at a time, while any is due."""
        while True:
            with self._cond:
                heap = self._queues.get(destination)
                if self._closed or not heap or heap[0][0] > self.clock():
                    self._busy.discard(destination)
                    self._cond.notify_all()  # the dispatcher: a free thread, a later due
                    return
                delivery = heapq.heappop(heap)[2]
            self._settle(delivery, self.post(delivery.who, delivery.what, delivery.url, delivery.body))

    def _settle(self, delivery: Delivery, outcome: str) -> None:
        """After an attempt: queue the next one, or forget the delivery."""
        if outcome == "retry" and delivery.attempt <= len(self.retry_delays):
            delay = self.retry_delays[delivery.attempt - 1]
            log.info("job=%s %s to %s: attempt %d failed, next in %s", delivery.who,
                     delivery.what, _mask_url(delivery.url), delivery.attempt, format_seconds(delay))
            delivery.attempt += 1
            delivery.due = self.clock() + delay
            self._write_rows([delivery])
            with self._cond:
                self._push(delivery)
            return
        if outcome == "retry":
            log.warning("job=%s %s to %s: given up after %d attempt(s)", delivery.who,
                        delivery.what, _mask_url(delivery.url), delivery.attempt)
        # At least once: a crash between the receiver's answer and this delete
        # sends it again after the restart; never again once the row is gone.
        self._forget_rows([delivery])
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def post(self, who: str, what: str, url: str, body: Dict[str, Any]) -> str:
        """POST `body` now and log the outcome: 'sent', 'failed', or 'retry'
        (no answer, 5xx or 429: another attempt may pass)."""
        import urllib.error
        import urllib.request
        if self.urlopen is None:
            self.urlopen = no_redirects_opener()
        request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "autodeploy/" + __version__})
        try:
            with self.urlopen(request, timeout=self.timeout) as response:
                response.read(4096)
                log.info("job=%s %s sent to %s: HTTP %s", who, what, _mask_url(url), response.status)
                return "sent"
        except urllib.error.HTTPError as exc:
            log.warning("job=%s %s to %s refused: HTTP %s", who, what, _mask_url(url), exc.code)
            # A redirect or another 4xx will not change; 5xx and 429 may.
            return "retry" if exc.code >= 500 or exc.code == 429 else "failed"
        except Exception as exc:  # no answer, or any other failure: logged, never raised
            log.warning("job=%s %s to %s failed: %s", who, what, _mask_url(url),
                        getattr(exc, "reason", None) or exc)
            return "retry"


class Reporter:
    """Says who hears of a finished job: its callback URL, those of the jobs
    it superseded (each hears its outcome), and the app's notify_url and
    slack_url when notify_on names the outcome's event."""

    def __init__(self, callbacks: CallbackSender, hostname: str):
        self.callbacks = callbacks
        self.hostname = hostname  # named in notifications

    def deliveries(self, job: Job) -> List[Delivery]:
        """The POSTs a finished job owes (Service.finish journals them with
        its final state, then hands them to the sender)."""
        found = [self.callbacks.callback(job, job.callback_url, callback_body(job))]
        for older in job.superseded:  # `older` was replaced by `job`: it hears `job`'s outcome
            found.append(self.callbacks.callback(older, older.callback_url,
                                                 callback_body(job, "(superseded by job %s)" % job.id)))
        return [delivery for delivery in found if delivery is not None] + self.notifications(job)

    def notifications(self, job: Job) -> List[Delivery]:
        event = STATES[job.state].event
        app = job.app
        if not event or event not in app.notify_on:
            return []
        found = []
        if app.notify_url:
            found.append(self.callbacks.notification(job, "notification " + event, app.notify_url,
                                                     notification_body(job, event, self.hostname)))
        if app.slack_url:
            found.append(self.callbacks.notification(job, "Slack notification " + event, app.slack_url,
                                                     slack_body(job, event, self.hostname)))
        return found


############################################################################
# The journal: every accepted job, on disk (or in memory)
############################################################################

JOURNAL_COLUMNS = ("id", "app", "container", "tag", "source", "callback_url", "received",
                   "started", "finished", "state", "description", "old_image", "new_image",
                   "old_container", "new_container", "was_running", "superseded_by", "log",
                   "step", "failure", "digest", "labelled", "pinned", "service")
# Columns added since the first journals: (name, type), added to an older file when opened.
# labelled: the app had no section, only labelled containers (resumed as such).
ADDED_COLUMNS = (("step", "TEXT"), ("failure", "TEXT"), ("digest", "TEXT"), ("labelled", "INTEGER"),
                 ("pinned", "INTEGER"), ("service", "TEXT"))


def job_row(job: Job) -> Dict[str, Any]:
    """An in-memory job as a journal row."""
    return {"id": job.id, "app": job.app.repository, "container": job.app.container,
            "tag": job.tag, "source": job.source, "callback_url": job.callback_url,
            "received": job.received, "started": job.started, "finished": job.finished,
            "state": job.state, "description": job.description, "log": "\n".join(job.lines),
            "digest": job.digest, "labelled": 1 if job.app.labelled else None,
            "service": job.app.service or None}


RUN_COLUMNS = ("started", "finished", "state", "description", "log")  # what a job's run changes


def job_columns(job: Job, **extra: Any) -> Dict[str, Any]:
    """What a job's run changes in its journal row: state, times,
    description, log, and `extra` columns (old_container, new_container,
    was_running, ...; names that are not columns are left out)."""
    columns = {"started": job.started, "finished": job.finished, "state": job.state,
               "description": job.description, "log": "\n".join(job.lines)}
    columns.update((key, value) for key, value in extra.items() if key in JOURNAL_COLUMNS)
    return columns


DELIVERY_COLUMNS = ("id", "job", "repo", "what", "url", "body", "attempt", "due", "from_request")


class Changes:
    """The writes of one journal transaction: columns to set per job id
    (None: delete its row), and delivery rows per delivery id (None: delete
    it). Merging keeps the latest write of each job column and each
    delivery, which is how writes held while the journal was unwritable
    catch up without an older state overwriting a newer one."""

    def __init__(self) -> None:
        self.jobs: Dict[str, Optional[Dict[str, Any]]] = {}
        self.deliveries: Dict[str, Optional[Dict[str, Any]]] = {}

    def __bool__(self) -> bool:
        return bool(self.jobs or self.deliveries)

    def __len__(self) -> int:
        return len(self.jobs) + len(self.deliveries)

    def job(self, job: Job, **extra: Any) -> "Changes":
        """The job's state, times, description, log and `extra` columns."""
        return self.set_columns(job.id, job_columns(job, **extra))

    def set_columns(self, job_id: str, columns: Dict[str, Any]) -> "Changes":
        if job_id in self.jobs and self.jobs[job_id] is None:
            return self  # deleted: an update would find no row anyway
        self.jobs[job_id] = dict(self.jobs.get(job_id) or {}, **columns)
        return self

    def forget(self, job_id: str) -> "Changes":
        self.jobs[job_id] = None
        return self

    def delivery(self, delivery_id: str, row: Optional[Dict[str, Any]]) -> "Changes":
        """Insert or replace a delivery's row (None: delete it)."""
        self.deliveries[delivery_id] = row
        return self

    def merge(self, later: "Changes") -> None:
        """Add `later`'s writes, which win over these."""
        for job_id, columns in later.jobs.items():
            if columns is None:
                self.forget(job_id)
            else:
                self.set_columns(job_id, columns)
        self.deliveries.update(later.deliveries)


def superseded_changes(rows: List[Tuple[float, str, str]]) -> Changes:
    """(finished, description, id) of jobs superseded while waiting, as Changes."""
    changes = Changes()
    for finished, description, job_id in rows:
        changes.set_columns(job_id, {"state": SUPERSEDED, "finished": finished,
                                     "description": description})
    return changes


def public_row(row: Dict[str, Any], with_log: bool = False) -> Dict[str, Any]:
    """A job row as /jobs shows it: no callback URL (it is a secret of the
    registry's), durations in seconds, log lines only in the detail."""
    out = {key: row.get(key) for key in ("id", "app", "container", "tag", "source", "state",
                                         "description", "received", "started", "finished",
                                         "old_image", "new_image", "digest", "superseded_by",
                                         "step")}
    out["waited"] = round(row["started"] - row["received"], 3) if row.get("started") else None
    out["took"] = round(row["finished"] - row["started"], 3) \
        if row.get("finished") and row.get("started") else None
    if with_log:
        out["log"] = (row.get("log") or "").split("\n") if row.get("log") else []
    return out


class Journal:
    """Jobs in SQLite (WAL mode) in the state directory: each accepted job is
    written before its 202, and every change of state after. On start, the
    jobs it holds unfinished are what recovery resumes.

    One connection behind a lock: a write is tens of microseconds. With
    synchronous=NORMAL a commit survives the process being killed; a power
    cut may lose the last ones (synchronous=FULL would fsync each webhook).
    The fsyncs left are the WAL checkpoints. Run by the committing
    connection (SQLite's default, every 1000 pages), each would hold the
    lock, and every webhook behind it, for its fsyncs; start_housekeeping()
    moves them to a thread of its own, small and frequent. The pages are
    small (1 KiB) and an accepted job touches few of them (no index on
    state, which every job changes): a few KiB of WAL per webhook, not 18.
    """

    persistent = True  # what it holds survives a restart

    def __init__(self, path: str, keep_per_app: int = 200, keep_days: float = 30.0,
                 clock: Callable[[], float] = time.time):
        self.path = path
        self.keep_per_app = keep_per_app
        self.keep_days = keep_days
        self.clock = clock
        self.error: Optional[str] = None  # the last write error, until a write succeeds
        self._lock = threading.Lock()
        self._db: Any = None
        self._last_open = 0.0
        self._closed = False
        self._writes = 0
        self._written = threading.Event()  # set by writes, cleared by each checkpoint
        self._housekeeper: Optional[threading.Thread] = None

    def open(self) -> "Journal":
        """Open (creating it and its folder if need be). When it cannot be
        opened, the error is logged and kept, and every use tries again (at
        most once a second): a disk that recovers brings the journal back."""
        try:
            self._open()
        except JournalError as exc:
            self.error = str(exc)
            log.error("%s", exc)
        return self

    def _open(self) -> None:
        import sqlite3  # loaded here: `check`, `deploy` and the tests without a journal skip it
        self._sqlite3 = sqlite3
        self._last_open = time.monotonic()
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=5, check_same_thread=False,
                                 isolation_level=None)
            db.execute("PRAGMA page_size=1024")  # for a new file; must precede WAL mode
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if self._housekeeper is not None:
                db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, app TEXT, "
                       "container TEXT, tag TEXT, source TEXT, callback_url TEXT, received REAL, "
                       "started REAL, finished REAL, state TEXT, description TEXT, "
                       "old_image TEXT, new_image TEXT, old_container TEXT, new_container TEXT, "
                       "was_running INTEGER, superseded_by TEXT, log TEXT)")
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in ADDED_COLUMNS:
                if name not in have:
                    db.execute("ALTER TABLE jobs ADD COLUMN %s %s" % (name, kind))
            # Callbacks and notifications not sent yet: written with their job's final state.
            db.execute("CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, job TEXT, "
                       "repo TEXT, what TEXT, url TEXT, body TEXT, attempt INTEGER, due REAL, "
                       "from_request INTEGER)")
            # One row, rewritten to learn whether an unwritable journal can be written again.
            db.execute("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL)")
            # The senders' delivery ids accepted lately: a redelivery is answered as a duplicate.
            db.execute("CREATE TABLE IF NOT EXISTS seen_deliveries (key TEXT PRIMARY KEY, at REAL)")
            db.execute("DROP INDEX IF EXISTS jobs_by_state")  # older journals had it
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_app ON jobs (app, received)")
            db.execute("SELECT count(*) FROM jobs").fetchone()
        except (OSError, sqlite3.Error) as exc:
            raise JournalError("cannot open the journal %s: %s" % (self.path, exc)) from exc
        self._db = db
        self.error = None

    def _ensure_open(self) -> None:
        """Under the lock: the connection, reopened when it was lost."""
        if self._db is None:
            if time.monotonic() - self._last_open < 1.0:
                raise JournalError(self.error or "the journal is closed")
            self._open()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()  # the last connection to close checkpoints the WAL
                self._db = None
        self._written.set()  # wakes the housekeeper, which sees _closed
        if self._housekeeper is not None:
            self._housekeeper.join(10)

    def start_housekeeping(self, interval: float = 0.05) -> None:
        """Checkpoint the WAL from a thread of its own, at most every
        `interval` seconds after writes, instead of in the commit of the
        webhook that happens to fill 1000 pages."""
        self._housekeeper = threading.Thread(target=self._checkpoints, args=(interval,),
                                             name="autodeploy-journal", daemon=True)
        with self._lock:
            if self._db is not None:
                self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._housekeeper.start()

    def alive(self) -> bool:
        """The housekeeping thread runs (or was never started)."""
        return self._housekeeper is None or self._housekeeper.is_alive()

    def _checkpoints(self, interval: float) -> None:
        db, failed = None, None
        while True:
            self._written.wait()
            time.sleep(interval if failed is None else 1.0)  # what arrives meanwhile joins in
            if self._closed:
                break
            self._written.clear()
            try:
                db = db or self._sqlite3.connect(self.path, timeout=5, isolation_level=None)
                # PASSIVE: copies what it can without waiting for the writer.
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                failed = None
            except self._sqlite3.Error as exc:
                if str(exc) != failed:
                    log.warning("journal %s: checkpoint failed: %s", self.path, exc)
                failed = str(exc)
                if db is not None:
                    db.close()
                db = None
                self._written.set()  # try again
        if db is not None:
            db.close()

    def add(self, job: Job) -> None:
        """Record an accepted job; JournalError when it cannot be written
        (the webhook then gets a 503, not a 202 that could be lost)."""
        self._write("INSERT INTO jobs (id, app, container, tag, source, callback_url, received, "
                    "state, description, digest, labelled, pinned) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.app.repository, job.app.container, job.tag, job.source,
                     job.callback_url, job.received, job.state, job.description, job.digest,
                     1 if job.app.labelled else None, 1 if job.pinned else None))

    def mark_superseded(self, rows: List[Tuple[float, str, str]]) -> None:
        """(finished, description, id) of jobs superseded while waiting, in one commit."""
        self.apply(superseded_changes(rows))

    def forget(self, job: Job) -> None:
        """Remove a job that was recorded but then refused (queue full)."""
        self.apply(Changes().forget(job.id))

    def save(self, job: Job, **extra: Any) -> None:
        """Write the job's state, times, description and log, and `extra`
        columns (old_container, new_container, was_running, ...)."""
        self.apply(Changes().job(job, **extra))

    def apply(self, changes: Changes) -> None:
        """Write `changes` in one transaction: all of them, or (JournalError) none."""
        with self._lock:
            self._check_open()
            try:
                self._db.execute("BEGIN")
                for job_id, columns in changes.jobs.items():
                    if columns is None:
                        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                        continue
                    names = [name for name in columns if name in JOURNAL_COLUMNS]
                    if names:
                        self._db.execute("UPDATE jobs SET %s WHERE id = ?"
                                         % ", ".join("%s = ?" % name for name in names),
                                         tuple(columns[name] for name in names) + (job_id,))
                for delivery_id, row in changes.deliveries.items():
                    if row is None:
                        self._db.execute("DELETE FROM deliveries WHERE id = ?", (delivery_id,))
                    else:
                        self._db.execute("INSERT OR REPLACE INTO deliveries (%s) VALUES (%s)" % (
                            ", ".join(DELIVERY_COLUMNS), ", ".join("?" * len(DELIVERY_COLUMNS))),
                            tuple(row.get(name) for name in DELIVERY_COLUMNS))
                self._db.execute("COMMIT")
            except self._sqlite3.Error as exc:
                try:
                    self._db.execute("ROLLBACK")
                except self._sqlite3.Error:
                    pass  # no transaction left to roll back
                self._failed(exc)
            self._succeeded()

    def probe(self) -> None:
        """A real write of one row: clears `error` when the journal can be
        written again (JournalError when it still cannot)."""
        self._write("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (self.clock(),))

    def deliveries(self) -> List[Dict[str, Any]]:
        """The deliveries not sent yet, earliest due first; JournalError when unreadable."""
        with self._lock:
            self._check_open()
            try:
                cursor = self._db.execute("SELECT %s FROM deliveries ORDER BY due, rowid"
                                          % ", ".join(DELIVERY_COLUMNS))
                return [dict(zip(DELIVERY_COLUMNS, row)) for row in cursor.fetchall()]
            except self._sqlite3.Error as exc:
                raise JournalError("the journal cannot be read: %s" % exc) from exc

    def _write(self, sql: str, args: Tuple[Any, ...]) -> int:
        """Run one write; how many rows it changed."""
        with self._lock:
            self._check_open()
            try:
                changed = self._db.execute(sql, args).rowcount
            except self._sqlite3.Error as exc:
                self._failed(exc)
            self._succeeded()
            return changed

    def first_delivery(self, key: str) -> bool:
        """Note a sender's delivery id as accepted; False when it was
        already (a redelivery). JournalError when it cannot be written."""
        return self._write("INSERT OR IGNORE INTO seen_deliveries (key, at) VALUES (?, ?)",
                           (key, self.clock())) == 1

    def forget_delivery(self, key: str) -> None:
        """Unnote a delivery id whose job was refused after all (a full queue)."""
        self._write("DELETE FROM seen_deliveries WHERE key = ?", (key,))

    def _check_open(self) -> None:
        """Under the lock: JournalError when closed; the connection, reopened when it was lost."""
        if self._closed:
            raise JournalError("the journal is closed")
        self._ensure_open()

    def _failed(self, exc: Exception) -> None:
        """Under the lock: a write failed; logged once until one succeeds."""
        if self.error is None:
            log.error("journal %s: cannot write: %s", self.path, exc)
        self.error = str(exc)
        raise JournalError("the journal cannot be written: %s" % exc) from exc

    def _succeeded(self) -> None:
        """Under the lock: a write went through."""
        if self.error is not None:
            log.info("journal %s: writable again", self.path)
            self.error = None
        self._writes += 1
        if not self._written.is_set():
            self._written.set()
        if self._writes % 1000 == 0:
            self._prune()

    def _prune(self) -> None:
        """Keep the newest `keep_per_app` finished jobs of each app, none older than `keep_days`."""
        try:
            self._db.execute(
                "DELETE FROM jobs WHERE state IN (%s) AND (received < ? OR id IN (SELECT id FROM "
                "(SELECT id, row_number() OVER (PARTITION BY app ORDER BY received DESC) AS n "
                "FROM jobs) WHERE n > ?))" % ",".join("?" * len(FINAL_STATES)),
                FINAL_STATES + (self.clock() - self.keep_days * 86400, self.keep_per_app))
            self._db.execute("DELETE FROM seen_deliveries WHERE at < ? OR key IN (SELECT key FROM "
                             "seen_deliveries ORDER BY at DESC LIMIT -1 OFFSET ?)",
                             (self.clock() - SEEN_DELIVERY_DAYS * 86400, SEEN_DELIVERIES))
        except self._sqlite3.Error as exc:
            log.warning("journal %s: pruning failed: %s", self.path, exc)

    def rows(self, where: str = "", args: Tuple[Any, ...] = (), limit: int = 100) -> List[Dict[str, Any]]:
        """Jobs as dicts, newest first; JournalError when unreadable."""
        with self._lock:
            if self._closed:
                raise JournalError("the journal is closed")
            self._ensure_open()
            try:
                cursor = self._db.execute("SELECT %s FROM jobs %s ORDER BY received DESC LIMIT ?"
                                          % (", ".join(JOURNAL_COLUMNS), where), args + (limit,))
                return [dict(zip(JOURNAL_COLUMNS, row)) for row in cursor.fetchall()]
            except self._sqlite3.Error as exc:
                raise JournalError("the journal cannot be read: %s" % exc) from exc

    def unfinished(self) -> List[Dict[str, Any]]:
        """Jobs left queued or running, oldest first."""
        return list(reversed(self.rows("WHERE state IN (?, ?)", (QUEUED, RUNNING), 100000)))

    def recent(self, app: Optional[str] = None, state: Optional[str] = None,
               limit: int = 100) -> List[Dict[str, Any]]:
        conditions, args = [], []  # type: List[str], List[Any]
        if app:
            conditions.append("app = ?")
            args.append(app)
        if state:
            conditions.append("state = ?")
            args.append(state)
        where = "WHERE " + " AND ".join(conditions) if conditions else ""
        return self.rows(where, tuple(args), limit)

    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        found = self.rows("WHERE id = ?", (job_id,), 1)
        return found[0] if found else None


class MemoryJournal:
    """The journal's interface, in memory (journal = no): the newest
    KEPT_JOBS jobs for /jobs, nothing to resume after a restart. It keeps
    the Job objects themselves, so a row is made only when one is read."""
    error: Optional[str] = None
    persistent = False  # nothing survives a restart: no job, no pending callback

    def __init__(self, limit: int = KEPT_JOBS):
        self.limit = limit
        self._jobs: "collections.OrderedDict[str, Job]" = collections.OrderedDict()
        self._extra: Dict[str, Dict[str, Any]] = {}  # columns save() was given besides the job's own
        self._seen: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def open(self) -> "MemoryJournal":
        return self

    def first_delivery(self, key: str) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            while len(self._seen) > SEEN_DELIVERIES:
                self._seen.popitem(last=False)
            return True

    def forget_delivery(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)

    def start_housekeeping(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.limit:
                self._extra.pop(self._jobs.popitem(last=False)[0], None)

    def save(self, job: Job, **extra: Any) -> None:
        self.apply(Changes().job(job, **extra))

    def mark_superseded(self, rows: List[Tuple[float, str, str]]) -> None:
        pass  # the jobs themselves say so already

    def forget(self, job: Job) -> None:
        self.apply(Changes().forget(job.id))

    def apply(self, changes: Changes) -> None:
        """Keep the columns a Job does not hold itself; deliveries are not kept."""
        with self._lock:
            for job_id, columns in changes.jobs.items():
                if columns is None:
                    self._jobs.pop(job_id, None)
                    self._extra.pop(job_id, None)
                elif job_id in self._jobs:
                    extra = {key: value for key, value in columns.items()
                             if key not in RUN_COLUMNS}
                    if extra:
                        self._extra.setdefault(job_id, {}).update(extra)

    def probe(self) -> None:
        pass

    def deliveries(self) -> List[Dict[str, Any]]:
        return []  # nothing survives a restart

    def unfinished(self) -> List[Dict[str, Any]]:
        return []  # nothing survives a restart

    def recent(self, app: Optional[str] = None, state: Optional[str] = None,
               limit: int = 100) -> List[Dict[str, Any]]:
        with self._lock:
            jobs = [job for job in reversed(self._jobs.values())
                    if (not app or job.app.repository == app) and (not state or job.state == state)]
            return [self._row(job) for job in jobs[:limit]]

    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            job = self._jobs.get(job_id)
            return self._row(job) if job is not None else None

    def _row(self, job: Job) -> Dict[str, Any]:
        row = job_row(job)
        row.update(self._extra.get(job.id, {}))
        return row


class Recorder:
    """Writes to the journal for whoever must not fail because it cannot be
    written: a deploy goes on, a callback is sent, and /healthz says why.

    A write that fails is held in memory, and every write after it joins
    the held ones (the latest of each job column and each delivery wins);
    they are written together, in one transaction, by the next write or
    flush() that gets through. So a job whose outcome is known is never left
    'running' in the journal once it can be written again (and is not run
    again at the next start), and an older state is never written over a
    newer one. What is held when the process dies is lost: close() logs it."""

    def __init__(self, journal: Union[Journal, MemoryJournal]):
        self.journal = journal
        self._lock = threading.Lock()
        self._held = Changes()

    @property
    def persistent(self) -> bool:
        """What is written survives a restart (journal = yes)."""
        return self.journal.persistent

    def save(self, job: Job, **extra: Any) -> None:
        """journal.save(job, **extra), held when it cannot be written."""
        self.write(Changes().job(job, **extra))

    def superseded(self, rows: List[Tuple[float, str, str]]) -> None:
        """journal.mark_superseded(rows), held when it cannot be written."""
        self.write(superseded_changes(rows))

    def forget(self, job: Job) -> None:
        """journal.forget(job), held when it cannot be written."""
        self.write(Changes().forget(job.id))

    def write(self, changes: Changes) -> bool:
        """Write `changes` (after whatever is held), or hold them; never
        raises. True when written."""
        if not changes:
            return True
        with self._lock:
            if self._held:
                self._held.merge(changes)  # never ahead of what is held: written with it
                return self._write_held()
            try:
                self.journal.apply(changes)
                return True
            except JournalError as exc:
                self._held = changes
                log.warning("%s held in memory: %s", self._describe_held(), exc)
                return False

    def flush(self) -> bool:
        """Write what is held; True when nothing is held any more."""
        with self._lock:
            return self._write_held() if self._held else True

    def held(self) -> int:
        """How many job updates and delivery rows are held."""
        with self._lock:
            return len(self._held)

    def probe(self) -> bool:
        """Try one real write; True when the journal could be written."""
        try:
            self.journal.probe()
            return True
        except JournalError:
            return False

    def close(self) -> None:
        """A last flush; what still cannot be written is logged, with the job
        ids: a stop while the disk stays full loses it (those jobs run again
        at the next start, their callbacks are not sent again)."""
        if self.flush():
            return
        with self._lock:
            jobs = sorted(job_id for job_id in self._held.jobs)
            log.error("journal: %s could not be written and are lost (jobs %s)",
                      self._describe_held(), ", ".join(jobs) or "none")

    def _write_held(self) -> bool:
        """Under the lock: write what is held."""
        try:
            self.journal.apply(self._held)
        except JournalError:
            return False
        log.info("journal: %s held in memory written", self._describe_held())
        self._held = Changes()
        return True

    def _describe_held(self) -> str:
        held = self._held
        return "%d job update(s)%s" % (len(held.jobs), " and %d callback row(s)" % len(held.deliveries)
                                       if held.deliveries else "")


############################################################################
# Metrics
############################################################################

DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters for GET /metrics, in Prometheus' text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.webhooks: Dict[int, int] = collections.Counter()
        self.deploys: Dict[Tuple[str, str], int] = collections.Counter()
        self.durations: Dict[str, List[int]] = {}  # app -> bucket counts, then +Inf
        self.duration_sums: Dict[str, float] = collections.Counter()
        self.last_success: Dict[str, float] = {}
        self.poll_errors: Dict[str, int] = collections.Counter()
        self.last_poll: Dict[str, float] = {}

    def count_webhook(self, status: int) -> None:
        with self._lock:
            self.webhooks[status] += 1

    def count_deploy(self, job: Job) -> None:
        app = job.app.repository
        with self._lock:
            self.deploys[app, job.state] += 1
            if job.state == SUCCEEDED and job.finished:
                self.last_success[app] = job.finished
            if job.started and job.finished and STATES[job.state].timed:
                took = job.finished - job.started
                counts = self.durations.setdefault(app, [0] * (len(DURATION_BUCKETS) + 1))
                for n, bound in enumerate(DURATION_BUCKETS):
                    if took <= bound:
                        counts[n] += 1
                counts[-1] += 1
                self.duration_sums[app] += took

    def count_poll(self, app: str, when: float, ok: bool) -> None:
        """A check of `app`'s registry by the poller: when it last succeeded, how many failed."""
        with self._lock:
            if ok:
                self.last_poll[app] = when
            else:
                self.poll_errors[app] += 1

    def render(self, queue_depth: int) -> str:
        """The exposition text."""
        out = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append("# HELP %s %s" % (name, help_text))
            out.append("# TYPE %s %s" % (name, kind))

        with self._lock:
            family("autodeploy_webhooks_total", "counter", "Webhook requests answered, by HTTP status.")
            for status, count in sorted(self.webhooks.items()):
                out.append('autodeploy_webhooks_total{code="%d"} %d' % (status, count))
            family("autodeploy_deploys_total", "counter", "Jobs that reached a final state, by app and outcome.")
            for (app, state), count in sorted(self.deploys.items()):
                out.append('autodeploy_deploys_total{app="%s",outcome="%s"} %d'
                           % (_label(app), state, count))
            family("autodeploy_rollbacks_total", "counter", "Deploys rolled back to the old container.")
            for (app, state), count in sorted(self.deploys.items()):
                if state == ROLLED_BACK:
                    out.append('autodeploy_rollbacks_total{app="%s"} %d' % (_label(app), count))
            family("autodeploy_deploy_duration_seconds", "histogram",
                   "Time from a job's start to its end.")
            for app, counts in sorted(self.durations.items()):
                for bound, count in zip(DURATION_BUCKETS, counts):
                    out.append('autodeploy_deploy_duration_seconds_bucket{app="%s",le="%s"} %d'
                               % (_label(app), bound, count))
                out.append('autodeploy_deploy_duration_seconds_bucket{app="%s",le="+Inf"} %d'
                           % (_label(app), counts[-1]))
                out.append('autodeploy_deploy_duration_seconds_sum{app="%s"} %s'
                           % (_label(app), repr(float(self.duration_sums[app]))))
                out.append('autodeploy_deploy_duration_seconds_count{app="%s"} %d'
                           % (_label(app), counts[-1]))
            family("autodeploy_last_success_timestamp_seconds", "gauge",
                   "When each app last deployed successfully (Unix time).")
            for app, when in sorted(self.last_success.items()):
                out.append('autodeploy_last_success_timestamp_seconds{app="%s"} %s'
                           % (_label(app), repr(float(when))))
            if self.last_poll or self.poll_errors:
                family("autodeploy_poll_errors_total", "counter",
                       "Checks of an app's registry by the poller that failed.")
                for app in sorted(set(self.last_poll) | set(self.poll_errors)):
                    out.append('autodeploy_poll_errors_total{app="%s"} %d'
                               % (_label(app), self.poll_errors.get(app, 0)))
                family("autodeploy_last_poll_timestamp_seconds", "gauge",
                       "When the poller last checked an app's registry successfully (Unix time).")
                for app, when in sorted(self.last_poll.items()):
                    out.append('autodeploy_last_poll_timestamp_seconds{app="%s"} %s'
                               % (_label(app), repr(float(when))))
        family("autodeploy_queue_depth", "gauge", "Jobs waiting to run.")
        out.append("autodeploy_queue_depth %d" % queue_depth)
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


############################################################################
# The service: accepted jobs, the workers that run them, who hears outcomes
############################################################################

# Seconds a deploy cut off by a shutdown gets to put the old container back
# (stop the new one, start the old one) before the process exits anyway.
ROLLBACK_GRACE = 30.0
# Senders that report every repository of a registry, and retry what is refused.
LENIENT_SENDERS = ("distribution",)
SUPERSEDED_BATCH = 256  # jobs superseded in the queue, written to the journal in one commit


class Waiter:
    """What a `deploy` command waits on: the outcome of its job, or of the
    newer job that superseded it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.outcome: Dict[str, Any] = {}

    def settle(self, job: Job) -> None:
        self.outcome = {"job": job.id, "state": job.state, "description": job.description}
        self.event.set()


class Service:
    """Takes pushes as jobs (journaled before they are answered), runs them
    on worker threads, one at a time per container, and reports each
    outcome to the journal, the metrics and the Reporter."""

    def __init__(self, config: Config, runner: JobRunner, callbacks: CallbackSender,
                 journal: Union["Journal", MemoryJournal], clock: Callable[[], float] = time.time,
                 hostname: Optional[str] = None, recorder: Optional[Recorder] = None,
                 upkeep_interval: float = 1.0):
        self.config = config
        self.runner = runner
        self.callbacks = callbacks
        self.reporter = Reporter(callbacks, hostname or socket.gethostname())
        self.journal = journal
        # One Recorder for every write that must not fail (the target's steps
        # too, in build_service): what the journal cannot take is held and
        # written in order by the next write or the upkeep thread.
        self.record = recorder or Recorder(journal)
        callbacks.record = self.record  # the deliveries' rows go to the same journal
        self.clock = clock
        self.upkeep_interval = upkeep_interval
        self._upkeep_thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.metrics = Metrics()
        self.queue = JobQueue(config.max_queue, on_superseded=self._superseded_in_queue)
        self._superseded_lock = threading.Lock()
        self._unsaved_superseded: List[Tuple[float, str, str]] = []
        self._workers: List[threading.Thread] = []
        self._last_health = "ok"
        self.poller: Optional["Poller"] = None  # set by serve()

    # -- taking jobs --------------------------------------------------------

    def submit(self, push: Push, waiter: Optional[Waiter] = None) -> Job:
        """Queue a deploy for a push; PayloadError(422) when not configured,
        503 when the journal cannot record it or the queue is full; Ignored
        when the app's tag policy (other than exact) does not deploy it."""
        app = self.config.app_for(push.repository) or self.labelled_app(push)
        if app.labelled:
            pass  # its containers were found following this tag
        elif app.tag_policy == "exact":
            if push.tag not in app.tags:
                raise PayloadError(422, "tag %s of %s is not configured for deploys (follows: %s)"
                                   % (push.tag, push.repository, ", ".join(app.tags)))
        else:
            refusal = tag_refusal(app, push.tag, self.runner.target_for(app).running_tag(app))
            if refusal:
                raise Ignored(refusal)
        job = Job(id=new_job_id(), app=app, tag=push.tag, callback_url=push.callback_url,
                  source=push.sender, received=self.clock())
        job.digest, job.pinned = push.digest, bool(push.digest)
        job.waiter = waiter
        try:
            self.journal.add(job)  # on disk before the 202
        except JournalError as exc:
            raise PayloadError(503, "cannot record the job (%s); retry later" % exc) from exc
        try:
            replaced = self.queue.put(job)
        except QueueFull as exc:
            self.record.forget(job)
            raise PayloadError(503, "too many deploys waiting (%s); retry later" % exc) from exc
        log.info("job=%s repo=%s queued %s%s", job.id, app.repository, job.reference,
                 " (replaces waiting job %s)" % replaced.id if replaced else "")
        return job

    def labelled_app(self, push: Push) -> AppConfig:
        """No section for the pushed repository: an app made from the
        containers labelled to follow it (the job finds them again when it
        runs). PayloadError 422 when there are none, or the Engine cannot
        be asked."""
        named = "%s/%s" % (push.host, push.repository) if push.host else push.repository
        refusal = "repository %s is not configured for deploys: a section [%s] would follow " \
                  "pushes of %s" % (push.repository, push.repository, named)
        discovery = self.runner.discovery
        if discovery is None:
            raise PayloadError(422, refusal)
        notes: List[str] = []
        problems: List[str] = []
        try:
            views = discovery.targets(push.repository, push.tag, None, notes, problems)
        except DockerError as exc:
            # Refused as not configured, as before discovery: a 503 would
            # make every registry retry pushes of repositories nobody follows.
            raise PayloadError(422, "%s (and the Docker Engine could not be asked for labelled "
                               "containers: %s)" % (refusal, exc)) from exc
        for problem in problems:
            log.warning("repo=%s %s", push.repository, problem)
        if not views:
            services = self.labelled_services(push)
            if services:
                return services[0]
            raise PayloadError(422, "%s, and no container labelled %s.enable=true runs %s:%s"
                               % (refusal, discovery.prefix, push.repository, push.tag))
        return AppConfig(repository=push.repository, image=views[0].image, tags=(push.tag,),
                         container=views[0].container, labelled=True)

    def labelled_services(self, push: Push) -> List[AppConfig]:
        """The labelled Swarm services that follow the push (see
        Discovery.services); one job deploys the first of them, by name."""
        try:
            services = self.runner.discovery.services(push.repository, push.tag)
        except DockerError as exc:
            log.warning("repo=%s cannot list labelled Swarm services: %s", push.repository, exc)
            return []
        if len(services) > 1:
            log.warning("repo=%s %d labelled services follow %s; deploying %s only", push.repository,
                        len(services), push.tag, services[0].service)
        return services

    def accept(self, parsed: "Parsed", check: Callable[[Push], None]) -> Tuple[int, Dict[str, Any]]:
        """Queue the pushes of one request; one (status, answer) for all of it.

        `check(push)` raises PayloadError when this request may not deploy
        the push (the token's scope: 404; its signature: 401). Then: 202 with
        the jobs when any was queued; else 422 naming the first push no app
        follows; else 200 with what was ignored (events to ignore, pushes by
        digest alone, redeliveries, tags the app's tag policy does not
        deploy, with the reason). A registry's own notifications
        (`distribution`) never get a 422 or a 404 for a repository nobody
        follows: the registry would retry the event, holding back every
        later one. 401 and 503 refuse the whole request."""
        jobs: List[Job] = []
        ignored = list(parsed.ignored)
        unmatched: List[str] = []
        lenient = parsed.sender in LENIENT_SENDERS
        for push in parsed.pushes:
            try:
                check(push)
                if not push.tag:
                    ignored.append("%s@%s was pushed with no tag: none to follow"
                                   % (push.repository, push.digest or "?"))
                    continue
                job = self.submit_once(push)
            except Ignored as exc:
                ignored.append("%s: %s" % (push.repository, exc.reason))
                continue
            except PayloadError as exc:
                if exc.status == 422 or (exc.status == 404 and lenient):
                    unmatched.append(exc.message)
                    continue
                raise
            if job is None:
                ignored.append("delivery %s (%s:%s) was accepted already"
                               % (push.delivery, push.repository, push.tag))
            else:
                jobs.append(job)
        if ignored or unmatched:
            log.info("webhook from %s: ignored %s", parsed.sender,
                     printable("; ".join(ignored + unmatched)))
        if jobs:
            first = jobs[0]
            answer: Dict[str, Any] = {"job": first.id, "state": QUEUED, "app": first.app.repository,
                                      "tag": first.tag}
            if len(jobs) > 1:
                answer["jobs"] = [{"job": job.id, "app": job.app.repository, "tag": job.tag}
                                  for job in jobs]
            if ignored or unmatched:
                answer["ignored"] = ignored + unmatched
            return 202, answer
        if unmatched and not lenient:
            raise PayloadError(422, unmatched[0])
        return 200, {"status": "nothing to deploy", "ignored": ignored + unmatched}

    def submit_once(self, push: Push) -> Optional[Job]:
        """submit(push), unless the sender's delivery id was accepted before
        (a redelivery, a registry retrying): then None."""
        if not push.delivery:
            return self.submit(push)
        key = "%s:%s:%s:%s" % (push.sender, push.delivery, push.repository, push.tag)
        try:
            if not self.journal.first_delivery(key):
                return None
        except JournalError as exc:
            raise PayloadError(503, "cannot record the delivery (%s); retry later" % exc) from exc
        try:
            return self.submit(push)
        except (PayloadError, Ignored):
            self._forget_delivery(key)
            raise

    def _forget_delivery(self, key: str) -> None:
        try:
            self.journal.forget_delivery(key)
        except JournalError:
            pass  # a refused delivery stays noted: its redelivery is answered as a duplicate

    def recover(self) -> int:
        """Queue again what the journal holds unfinished (see resume_unfinished)."""
        return resume_unfinished(self.journal.unfinished(), self.config, self.queue,
                                 self.finish, self.clock)

    # -- running them -------------------------------------------------------

    def start(self) -> None:
        """Queue the callbacks the journal holds pending (before anything new),
        resume the jobs it holds unfinished, then start the callback threads,
        the workers and the upkeep thread."""
        try:
            self.callbacks.resume(self.journal.deliveries())
        except JournalError as exc:
            log.error("cannot resume pending callbacks: %s", exc)
        try:
            self.recover()
        except JournalError as exc:
            log.error("cannot resume unfinished jobs: %s", exc)
        self.journal.start_housekeeping()
        self.callbacks.start()
        for n in range(self.config.workers):
            thread = threading.Thread(target=self._work, name="autodeploy-worker-%d" % (n + 1),
                                      daemon=True)
            thread.start()
            self._workers.append(thread)
        self._upkeep_thread = threading.Thread(target=self._upkeep, name="autodeploy-upkeep",
                                               daemon=True)
        self._upkeep_thread.start()

    def _upkeep(self) -> None:
        while not self._stopping.wait(self.upkeep_interval):
            try:
                self.upkeep_once()
            except Exception:  # a bug: logged, and the next round tries again
                log.exception("internal error in the journal's upkeep")

    def upkeep_once(self) -> None:
        """Write what the journal could not take; with nothing held, probe a
        journal that could not be written, so /healthz and the webhooks'
        503s recover by themselves when the disk does (no webhook needed)."""
        if self.record.held():
            self.record.flush()
        elif self.journal.error:
            self.record.probe()

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                self.run_job(job)
            except Exception:  # a bug in reporting: logged, and the worker goes on
                log.exception("job=%s repo=%s internal error while reporting",
                              job.id, job.app.repository)
            finally:
                self.queue.task_done(job)

    def run_job(self, job: Job) -> None:
        """Run one job to a final state and report it."""
        job.state, job.started = RUNNING, self.clock()
        self.flush_superseded()
        self.save(job)
        self.runner.run(job)
        if not job.final:  # cut off by a shutdown: for the next start
            self.save(job)
            return
        job.finished = self.clock()
        self.finish(job)

    def finish(self, job: Job) -> None:
        """Record a final outcome and tell whoever waits for it, and for the
        jobs it replaced. The final states and the callbacks they owe are
        one journal transaction: a crash leaves neither a final job without
        its callbacks nor callbacks of a job that will run again."""
        try:
            changes = Changes().job(job)
            for older in job.superseded:
                older.state, older.finished = SUPERSEDED, job.finished
                older.description = "superseded by job %s" % job.id
                changes.job(older, superseded_by=job.id)
            deliveries = self.reporter.deliveries(job)
            for delivery in deliveries:
                changes.delivery(delivery.id, self.callbacks.row(delivery))
            self.record.write(changes)  # held when the journal cannot take it
            for finished in [job] + job.superseded:
                self.metrics.count_deploy(finished)
            self.callbacks.deliver(deliveries, recorded=True)
        finally:  # whatever failed above, a waiting `deploy` command hears the outcome
            for waiting in [job] + job.superseded:
                if waiting.waiter is not None:
                    waiting.waiter.settle(job)
            job.superseded = []

    def _superseded_in_queue(self, job: Job) -> None:
        """A waiting job replaced by a newer push, nobody awaiting it. Its
        journal row is updated in batches (one commit per webhook is what
        the journal costs; two would halve a flood's throughput): a crash
        before the batch is written leaves it 'queued', and recovery
        queues it again, where the same newer push replaces it again."""
        job.finished = self.clock()
        self.metrics.count_deploy(job)
        if job.waiter is not None:
            job.waiter.settle(job)
        with self._superseded_lock:
            self._unsaved_superseded.append((job.finished, job.description, job.id))
            full = len(self._unsaved_superseded) >= SUPERSEDED_BATCH
        if full:
            self.flush_superseded()

    def flush_superseded(self) -> None:
        """Write the superseded jobs not yet written (when a job starts, and on stop)."""
        with self._superseded_lock:
            batch, self._unsaved_superseded = self._unsaved_superseded, []
        if batch:
            self.record.superseded(batch)  # held, not lost, when the journal cannot take it

    def save(self, job: Job, **extra: Any) -> None:
        """Write the job to the journal; never raises (see Recorder)."""
        self.record.save(job, **extra)

    # -- what it reports ----------------------------------------------------

    def health(self) -> Tuple[bool, str]:
        """(healthy, reason) for GET /healthz: the threads run, the Engine
        answers, the journal can be written. The reason is a class, with no
        path or address in it (anyone may ask); the details go to the log
        (once per change of reason)."""
        healthy, reason, detail = True, "ok", ""
        if not self.alive():
            healthy, reason = False, "a worker or callback thread has stopped"
        elif self.runner.unconverged:
            healthy, reason = False, "a deploy is not converged"
            detail = "job(s) %s: the app may be down until the swap is put in order" % ", ".join(
                sorted(self.runner.unconverged))
        elif self.journal.error:
            healthy, reason, detail = False, "journal not writable", self.journal.error
        else:
            try:
                self.runner.engine.ping()
            except DockerError as exc:
                healthy, reason, detail = False, "docker engine unreachable", str(exc)
        if reason != self._last_health:
            self._last_health = reason
            if not healthy:
                log.warning("unhealthy: %s%s", reason, ": %s" % detail if detail else "")
        return healthy, reason

    def job_list(self, app: Optional[str] = None, state: Optional[str] = None,
                 limit: int = 100) -> List[Dict[str, Any]]:
        """Recent jobs, newest first."""
        self.flush_superseded()
        return [public_row(row) for row in self.journal.recent(app, state, limit)]

    def job_detail(self, job_id: str) -> Optional[Dict[str, Any]]:
        self.flush_superseded()
        row = self.journal.get(job_id)
        return public_row(row, with_log=True) if row else None

    def alive(self) -> bool:
        """Every worker, callback and upkeep thread still runs (for the watchdog)."""
        return (all(t.is_alive() for t in self._workers) and self.callbacks.alive()
                and self.journal.alive()
                and (self._upkeep_thread is None or self._upkeep_thread.is_alive()))

    # -- reload and stop ----------------------------------------------------

    def reload(self, config: Config) -> None:
        """Use a new configuration (SIGHUP): apps, tokens and limits change at
        once; the listen address and the worker count need a restart."""
        old = self.config
        if (config.listen_host, config.listen_port, config.tls_cert) != \
                (old.listen_host, old.listen_port, old.tls_cert):
            log.warning("reload: listen and TLS settings change only with a restart")
        if config.workers != old.workers:
            log.warning("reload: workers changes only with a restart")
        self.config = config
        self.queue.limit = config.max_queue
        self.callbacks.allow = config.callback_allow
        self.runner.engine_wait = config.engine_wait
        if self.runner.discovery is not None:
            self.runner.discovery.prefix = config.label_prefix

    def stop(self, deadline: Optional[float] = None) -> None:
        """Stop taking jobs from the queue (they stay in the journal). Running
        deploys get `deadline` seconds (the config's stop_deadline) to finish;
        past it, each puts back what it changed and its job stays queued for
        the next start. Then the threads stop."""
        deadline = self.config.stop_deadline if deadline is None else deadline
        self.queue.close()
        self.runner.deadline.start(deadline)
        give_up = time.monotonic() + deadline + ROLLBACK_GRACE
        for thread in self._workers:
            thread.join(max(0.0, give_up - time.monotonic()))
        self.flush_superseded()
        self.callbacks.stop()
        self._stopping.set()
        if self._upkeep_thread is not None:
            self._upkeep_thread.join(5)
        self.record.close()  # a last flush; what the journal still cannot take is logged, and lost
        self.journal.close()


############################################################################
# Polling: for hosts no registry can reach
############################################################################

POLL_BACKOFF_MAX = 3600.0  # seconds: the longest a failing registry makes an app wait
POLL_JITTER = 0.1  # each interval stretched or shrunk by up to this share, so apps spread


class PollState:
    """What the poller knows of one app between its checks."""
    __slots__ = ("due", "failures", "last_error", "job")

    def __init__(self, due: float) -> None:
        self.due = due
        self.failures = 0
        self.last_error = ""
        self.job: Optional[Job] = None  # the last job a poll queued, until it ends


class Poller:
    """Asks the registry of each app with `poll` set, every `poll` seconds
    (with jitter), what its followed tag points to (with a glob or semver
    policy: the newest tag the policy allows), with a HEAD of the manifest,
    which Docker Hub does not count as a pull; and queues a job, like a
    webhook's, when that digest is not what the app's container runs.

    One thread checks the apps in turn, so an app is never checked twice at
    once; a registry that fails or is down backs its app off (doubling, up
    to an hour), and a 429's Retry-After is honoured. A digest a job of a
    poll is still deploying is not queued again."""

    def __init__(self, service: "Service", registry: "dockerapi.RegistryClient",
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = lambda: random.uniform(-1.0, 1.0)):
        self.service = service
        self.registry = registry
        self.clock, self.wall_clock, self.jitter = clock, wall_clock, jitter
        self.states: Dict[str, PollState] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def apps(self) -> List[AppConfig]:
        """The apps that poll, from the configuration in force (a reload applies)."""
        return [app for app in self.service.config.apps.values() if app.poll]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="autodeploy-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def failing(self) -> int:
        """How many apps' last check failed (for /healthz)."""
        return sum(1 for state in self.states.values() if state.failures)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.clock()
            due = [app for app in self.apps() if self.state_of(app, now).due <= now]
            for app in due:
                if self._stop.is_set():
                    return
                try:
                    self.check(app)
                except Exception:  # a bug: logged, the app waits one interval, the others go on
                    log.exception("repo=%s internal error while polling", app.repository)
                    self.state_of(app, now).due = self.clock() + app.poll
            waits = [self.state_of(app, now).due - self.clock() for app in self.apps()]
            # At least every 5 s: a reload may have added an app that polls.
            self._stop.wait(min([5.0] + [max(0.05, w) for w in waits]))

    def state_of(self, app: AppConfig, now: float) -> PollState:
        state = self.states.get(app.repository)
        if state is None:
            # The first check soon after start, spread over up to 10 s.
            state = self.states[app.repository] = PollState(
                now + min(app.poll, 10.0) * (1 + self.jitter()) / 2)
        return state

    def check(self, app: AppConfig) -> str:
        """Check `app` once and schedule its next check; what was found, in words."""
        state = self.state_of(app, self.clock())
        try:
            found = self.look(app, state)
        except (DockerError, DeployFailed, PayloadError) as exc:
            return self.failed(app, state, exc)
        state.failures, state.last_error = 0, ""
        state.due = self.clock() + app.poll * (1 + POLL_JITTER * self.jitter())
        self.service.metrics.count_poll(app.repository, self.wall_clock(), ok=True)
        log.debug("repo=%s poll: %s", app.repository, printable(found))
        return found

    def look(self, app: AppConfig, state: PollState) -> str:
        """Ask the registry; queue a job when the app runs something else."""
        if state.job is not None and not state.job.final:
            return "job %s still deploying what the last poll found" % state.job.id
        target = self.service.runner.target_for(app)
        running_tag, running_digests = target.running_version(app)
        auth = app_registry_auth(app, target.docker_config).auth
        tag = self.tag_to_check(app, running_tag, auth)
        if tag is None:
            return "no tag to follow"
        answer = self.registry.manifest_digest(app.image, tag, auth)
        if answer.rate_limit is not None:
            log.info("repo=%s registry rate limit left: %s", app.repository, printable(answer.rate_limit))
        if tag == running_tag and answer.digest in running_digests:
            return "%s:%s is running already (%s)" % (app.image, tag, _short(answer.digest))
        try:
            job = self.service.submit(Push(app.repository, tag, answer.digest, sender="poll"))
        except Ignored as exc:
            return "not deployed: %s" % exc.reason
        state.job = job
        log.info("job=%s repo=%s poll found %s:%s at %s (the container runs %s)", job.id,
                 app.repository, app.image, tag, _short(answer.digest),
                 "%s@%s" % (running_tag, _short((running_digests or [""])[0]))
                 if running_tag else "nothing")
        return "queued job %s for %s:%s" % (job.id, app.image, tag)

    def tag_to_check(self, app: AppConfig, running_tag: Optional[str],
                     auth: Optional[Dict[str, str]]) -> Optional[str]:
        """Which tag's digest to ask for: with `exact`, the followed tag the
        container runs (else the first); with a glob or semver policy, the
        newest the registry lists that the policy allows, else the running one."""
        if app.tag_policy == "exact":
            return running_tag if running_tag in app.tags else (app.tags[0] if app.tags else None)
        chosen = choose_tag(app, self.registry.tags(app.image, auth), running_tag)
        return chosen or running_tag

    def failed(self, app: AppConfig, state: PollState, exc: Exception) -> str:
        """Back the app off: Retry-After when the registry gave one, else
        doubling intervals up to POLL_BACKOFF_MAX."""
        state.failures += 1
        retry_after = getattr(exc, "retry_after", None)
        delay = retry_after if retry_after is not None else min(
            app.poll * 2 ** min(state.failures, 20), max(POLL_BACKOFF_MAX, app.poll))
        state.due = self.clock() + delay
        reason = _reason_of(exc)
        self.service.metrics.count_poll(app.repository, self.wall_clock(), ok=False)
        if reason != state.last_error or retry_after is not None:
            log.warning("repo=%s poll failed (%d in a row): %s; next in %s", app.repository,
                        state.failures, printable(reason), format_seconds(delay))
        state.last_error = reason
        return "failed: %s" % reason


############################################################################
# Who may deploy: tokens, signatures, source addresses
############################################################################

ANY_APP = frozenset(["*"])  # token_scope(): a global token may deploy every app


def token_scope(config: Config, given: str) -> Optional[FrozenSet[str]]:
    """Which repositories the token in the URL may deploy: ANY_APP for a
    global token, the apps naming it for a per-app token, None for no
    match. Compares against every token, in constant time each."""
    globally = token_matches(given, config.tokens)
    apps = {app.repository for app in config.apps.values() if token_matches(given, app.tokens)}
    if globally or (config.insecure_no_token and not config.has_tokens()):
        return ANY_APP
    return frozenset(apps) if apps else None


def token_hint(given: str) -> str:
    """A token from a URL, for a log line: its length, and its first 4
    characters when it has 12 or more (a third at most); never all of it, as
    it may be a real token with a typo."""
    if not given:
        return "none given"
    shown = ", starting %s" % printable(given[:4]) if len(given) >= 12 else ""
    return "%d characters%s" % (len(given), shown)


def token_matches(given: str, tokens: Sequence[str]) -> bool:
    """True when `given` is one of `tokens`; every one is compared, each in constant time."""
    given_bytes = given.encode("utf-8", "replace")
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given_bytes, token.encode("utf-8"))
    return found


def check_sender(config: Config, push: Push, scope: FrozenSet[str], body: bytes,
                 headers: Any) -> None:
    """PayloadError(404) when the token may not deploy this repository,
    401 when a signing secret applies and the request does not carry the
    signature the push's sender makes with it (signature_problem)."""
    app = config.app_for(push.repository)
    if scope is not ANY_APP and push.repository not in scope:
        raise PayloadError(404, "not found")
    secret = (app.signing_secret if app else "") or config.signing_secret
    problem = signature_problem(push.sender, secret, body, headers) if secret else None
    if problem:
        raise PayloadError(401, problem)


def signature_problem(sender: str, secret: str, body: bytes, headers: Any) -> Optional[str]:
    """None when the request carries what `secret` calls for in `sender`'s
    scheme (SIGNATURE_SCHEMES); else why not, for a 401. Every comparison
    takes constant time."""
    return SIGNATURE_SCHEMES.get(sender, _hub_signature_problem)(secret, body, headers)


def _hub_signature_problem(secret: str, body: bytes, headers: Any) -> Optional[str]:
    value = header(headers, "X-Hub-Signature-256")
    if value is None:
        return "missing X-Hub-Signature-256"
    return None if signature_ok(secret, body, value) else "bad X-Hub-Signature-256"


def _jfrog_auth_problem(secret: str, body: bytes, headers: Any) -> Optional[str]:
    # JFrog sends the secret itself, or, with "Use secret for payload
    # signing", the hex HMAC-SHA256 of the body keyed with it: either will do
    # (whoever knows the secret can make both).
    value = header(headers, "X-JFrog-Event-Auth")
    if value is None:
        return "missing X-JFrog-Event-Auth"
    given = _header_bytes(value.strip())
    signed = hmac.new(secret.encode("utf-8"), body, "sha256").hexdigest().encode("ascii")
    plain = hmac.compare_digest(given, secret.encode("utf-8"))
    hashed = hmac.compare_digest(given.lower(), signed)
    return None if plain | hashed else "bad X-JFrog-Event-Auth"


def _authorization_problem(secret: str, body: bytes, headers: Any) -> Optional[str]:
    # The Authorization header the sender was configured to add: the secret
    # as it is, or as a bearer token.
    value = header(headers, "Authorization")
    if value is None:
        return "missing Authorization"
    given = _header_bytes(value.strip())
    plain = hmac.compare_digest(given, secret.encode("utf-8"))
    bearer = hmac.compare_digest(given, b"Bearer " + secret.encode("utf-8"))
    return None if plain | bearer else "bad Authorization"


def _header_bytes(value: str) -> bytes:
    # A header value as it came: http.client decodes them as Latin-1.
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


# Sender -> how it signs. Docker Hub and Quay sign nothing: a signing
# secret for their apps needs a signing proxy in front (GitHub's scheme).
SIGNATURE_SCHEMES: Dict[str, Callable[[str, bytes, Any], Optional[str]]] = {
    "dockerhub": _hub_signature_problem,
    "quay": _hub_signature_problem,
    "github": _hub_signature_problem,
    "native": _hub_signature_problem,
    "jfrog": _jfrog_auth_problem,
    "harbor": _authorization_problem,
    "acr": _authorization_problem,
    "distribution": _authorization_problem,
}


def signature_ok(secret: str, body: bytes, header: Optional[str]) -> bool:
    """GitHub-style 'sha256=<hex HMAC of the raw body>', checked in constant time."""
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode("utf-8"), body, "sha256").hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), header[7:].strip().lower().encode("ascii", "replace"))


def client_address(peer: str, headers: Any, trusted: Sequence[Network]) -> str:
    """The address a request came from: the peer, unless the peer is a trusted
    proxy; then the nearest address in Forwarded / X-Forwarded-For that is
    not one (headers from anyone else are ignored: they are trivial to forge)."""
    if not trusted or not in_networks(peer, trusted):
        return peer
    # A proxy may keep one of the headers and pass the client's own copy of
    # the other through untouched: when both name a client, it must be the same.
    found, first = set(), None
    for header in ("Forwarded", "X-Forwarded-For"):
        hops = forwarded_for(headers, header)
        untrusted = [hop for hop in hops if not in_networks(hop, trusted)]
        if untrusted:
            found.add(untrusted[-1])
        first = first or (hops[0] if hops else None)
    if len(found) > 1:
        return "unknown"  # in no network: refused by allow_from
    return found.pop() if found else first or peer


def forwarded_for(headers: Any, only: Optional[str] = None) -> List[str]:
    """The client chain from RFC 7239 Forwarded (for=...), else X-Forwarded-For
    (`only`: from that header alone)."""
    forwarded = headers.get_all("Forwarded") \
        if hasattr(headers, "get_all") and only != "X-Forwarded-For" else None
    hops = []
    if forwarded or only == "Forwarded":
        for element in ",".join(forwarded or []).split(","):
            for pair in element.split(";"):
                key, _, value = pair.strip().partition("=")
                if key.lower() == "for":
                    value = value.strip().strip('"')
                    if value.startswith("["):  # "[2001:db8::1]:4711"
                        value = value[1:].split("]", 1)[0]
                    elif value.count(":") == 1:  # "192.0.2.1:4711"
                        value = value.split(":", 1)[0]
                    hops.append(value)
        return hops
    for header in (headers.get_all("X-Forwarded-For") or []) if hasattr(headers, "get_all") else []:
        hops += [hop.strip() for hop in header.split(",") if hop.strip()]
    return hops


def in_networks(address: str, networks: Sequence[Network]) -> bool:
    """True when `address` parses and lies in one of `networks` (an IPv4
    client seen on an IPv6 socket, ::ffff:a.b.c.d, counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


############################################################################
# HTTP: the listener, the request parser, the handler and its routes
############################################################################

class Slot:
    """One open connection, as the listener sees it."""
    __slots__ = ("sock", "source", "accepted", "phase")

    def __init__(self, sock: socket.socket, source: str, accepted: float):
        self.sock = sock
        self.source = source
        self.accepted = accepted
        self.phase = "head"  # reading a head; "busy" answering it; "idle" between requests


def source_of(address: str) -> str:
    """Whose share of the connections a peer uses: its IPv4 address, or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return str(ipaddress.ip_network("%s/64" % ip, strict=False))
        ip = ip.ipv4_mapped
    return str(ip)


class LogLimiter:
    """At most one log line per `interval` seconds for each kind of event,
    with the count of those left out since: an attack cannot flood the log."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._next: Dict[str, float] = {}
        self._skipped: Dict[str, int] = collections.Counter()
        self._lock = threading.Lock()

    def allow(self, kind: str) -> Optional[int]:
        """None: leave this line out; else how many were left out before it."""
        with self._lock:
            now = self.clock()
            if now < self._next.get(kind, 0.0):
                self._skipped[kind] += 1
                return None
            self._next[kind] = now + self.interval
            return self._skipped.pop(kind, 0)


class WebhookServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """The webhook listener: one thread per connection, state in `service`.

    Before a byte is read, a connection from a source not in allow_from is
    answered 403 and closed (no thread). A source holds at most
    max_connections_per_source connections, and all of them at most
    max_connections: a newcomer past either takes the place of the slowest
    waiting connection of the same pool (the oldest still sending its head,
    else the oldest idle between requests), or gets 503 at once when every
    one of them is answering a request.
    """
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: Tuple[str, int], service: Service,
                 tls: Optional[Any] = None):
        self.service = service
        self.admin = AdminPages(service)
        self.tls = tls  # an ssl.SSLContext, or None for plain HTTP
        self._slots: Dict[socket.socket, Slot] = {}
        self._slots_lock = threading.Lock()
        self._log_limiter = LogLimiter()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, WebhookHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        peer, config = client_address[0], self.service.config
        if config.allow_from and not in_networks(peer, config.allow_from) \
                and not in_networks(peer, config.trusted_proxies):
            self._log_limited("not-allowed", "%s refused: not in allow_from" % peer)
            self._refuse(request, 403, b'{"error": "forbidden"}\n')
            return
        slot, displaced, why = self._take_slot(request, peer, config)
        if displaced is not None:
            self._log_limited("displaced", "%s connection closed to make room (it was %s for %s)"
                              % (displaced.source, displaced.phase,
                                 format_seconds(time.monotonic() - displaced.accepted)))
            try:
                displaced.sock.shutdown(socket.SHUT_RDWR)  # its thread sees the end and goes
            except OSError:
                pass
        if slot is None:  # one kind of line per pool, whatever the counts in it
            self._log_limited("refused-share" if "source" in why else "refused-full",
                              "%s refused: %s" % (peer, why))
            self._refuse(request)
            return
        super().process_request(request, client_address)

    def _take_slot(self, request: socket.socket, peer: str, config: Config
                   ) -> Tuple[Optional[Slot], Optional[Slot], str]:
        """(the new connection's slot or None, a slot to close for it, why refused)."""
        source = source_of(peer)
        capped = not in_networks(peer, config.trusted_proxies)  # a proxy carries many clients
        with self._slots_lock:
            own = [s for s in self._slots.values() if s.source == source]
            if capped and len(own) >= config.max_connections_per_source:
                # Its share is taken: it may only replace one of its own.
                candidates, why = own, "%d connections from this source open already" % len(own)
            elif len(self._slots) >= config.max_connections:
                candidates, why = list(self._slots.values()), \
                    "%d connections open already" % len(self._slots)
            else:
                candidates, why = [], ""
            displaced = None
            if why:
                # The slowest first: the oldest still sending its head (a
                # slowloris, a silent socket), else the oldest idle keep-alive.
                waiting = [s for s in candidates if s.phase == "head"] \
                    or [s for s in candidates if s.phase == "idle"]
                if not waiting:
                    return None, None, why
                displaced = min(waiting, key=lambda s: s.accepted)
                del self._slots[displaced.sock]
            slot = self._slots[request] = Slot(request, source, time.monotonic())
        return slot, displaced, ""

    def slot_of(self, request: socket.socket) -> Slot:
        with self._slots_lock:
            return self._slots.get(request) or Slot(request, "?", time.monotonic())

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._slots_lock:
                self._slots.pop(request, None)

    def phases(self) -> Dict[str, int]:
        """How many open connections are reading a head, answering, idle."""
        with self._slots_lock:
            return dict(collections.Counter(slot.phase for slot in self._slots.values()))

    def _log_limited(self, kind: str, line: str) -> None:
        skipped = self._log_limiter.allow(kind)
        if skipped is not None:
            log.warning("%s%s", line, " (%d more like it not logged)" % skipped if skipped else "")

    def _refuse(self, request: socket.socket, status: int = 503,
                body: bytes = b'{"error": "too many connections; retry later"}\n') -> None:
        """Answer without reading the request (nor starting a thread), and close."""
        if self.tls is None:  # a TLS client would not understand plain text
            reason = {403: b"Forbidden", 503: b"Service Unavailable"}[status]
            retry = b"Retry-After: 5\r\n" if status == 503 else b""
            try:
                request.settimeout(0.5)
                request.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n%s"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                                % (status, reason, retry, len(body), body))
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line, not a traceback on stderr, for a connection that broke."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            log.info("%s connection dropped: %s", client_address[0], exc.__class__.__name__)
        elif isinstance(exc, OSError) and exc.__class__.__module__ == "ssl":
            log.info("%s TLS failed: %s", client_address[0], printable(getattr(exc, "reason", None) or exc))
        else:
            log.error("%s request failed: %r", client_address[0], exc)


class DeadlineReader(io.RawIOBase):
    """A socket's reads, with deadlines: a client that trickles a byte at a
    time (slowloris) or sends nothing is dropped when one passes.

    - the headers: within `header_timeout` of accept for the first request,
      of its first byte for later ones;
    - the whole request: within `request_timeout` of its first byte;
    - between requests: `keepalive_timeout` of silence ends the connection.
    """

    def __init__(self, sock: socket.socket, keepalive_timeout: float, header_timeout: float,
                 request_timeout: float, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.sock = sock
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.request_timeout = request_timeout
        self.clock = clock
        self.head_deadline: Optional[float] = clock() + header_timeout  # from accept
        self.request_deadline: Optional[float] = None
        self.started = False  # the request's first byte came

    def readable(self) -> bool:
        return True

    def between_requests(self) -> None:
        self.head_deadline = self.request_deadline = None
        self.started = False

    def headers_done(self) -> None:
        self.head_deadline = None

    def readinto(self, buffer: Any) -> int:
        now = self.clock()
        deadlines = [d for d in (self.head_deadline, self.request_deadline) if d is not None]
        timeout = min(deadlines) - now if deadlines else self.keepalive_timeout
        if timeout <= 0:
            what, limit = ("headers", self.header_timeout) if min(deadlines) == self.head_deadline \
                else ("request", self.request_timeout)
            raise socket.timeout("the %s took longer than %s" % (what, format_seconds(limit)))
        self.sock.settimeout(timeout)
        count = self.sock.recv_into(buffer)
        if count and not self.started:
            self.started = True
            self.request_deadline = now + self.request_timeout
            if self.head_deadline is None:
                self.head_deadline = now + self.header_timeout
        return count


# A request line and header lines in their plainest form: for those,
# WebhookHandler parses the request itself, with the very outcome
# http.server's parse_request() would have, at a fraction of its cost (it
# runs the email package's parser on the headers: a quarter of the CPU an
# accepted webhook costs). Anything else goes to http.server as it came.
PLAIN_REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) (HTTP/1\.[01])\r?\n")
PLAIN_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e]*)\r?\n")
# Any header line that is not this (RFC 9112 field-line: a token, the colon
# right after it, a value of visible characters, blanks and obs-text) is a
# 400 that closes the connection: whitespace before the colon, no colon, a
# bare CR, obs-fold, control characters. Parsing on after such a line is how
# a request is smuggled past a proxy that reads it otherwise.
FIELD_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*(?:\r?\n)?")
MAX_LINE = 8192  # the request line (longer: 414) and each header line (longer: 431)
MAX_HEADERS = 100  # header lines, the blank one that ends them included, as http.client counts


class RequestHeaders:
    """Request headers as http.client.HTTPMessage answers get() and
    get_all(): names compared case-insensitively, values as sent after the
    colon and leading blanks."""
    __slots__ = ("_items",)

    def __init__(self, items: List[Tuple[str, str]]):
        self._items = items  # (lower-case name, value), in order

    def get(self, name: str, default: Any = None) -> Any:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str, failobj: Any = None) -> Any:
        name = name.lower()
        return [value for key, value in self._items if key == name] or failobj

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

class PlainHead:
    """A request head read by RequestParser: the request line's parts, then
    the headers, or the error to answer, or (when a header line is not
    plain) the header block read so far, for http.server to parse."""
    __slots__ = ("plain", "command", "path", "version", "requestline", "headers", "error",
                 "header_block")

    def __init__(self, request: Optional[Tuple[str, str, str, str]],
                 headers: Optional[RequestHeaders] = None,
                 error: Optional[Tuple[int, str, Optional[str]]] = None, header_block: bytes = b""):
        self.plain = request is not None
        self.command, self.path, self.version, self.requestline = request or ("", "", "", "")
        self.headers = headers
        self.error = error
        self.header_block = header_block


class RequestParser:
    """Reads a request's head from a connection's buffered reader, within
    a budget of bytes for the whole head (request line and headers) and of
    MAX_LINE per line, whichever parser then reads it: memory held per
    connection is bounded by the budget."""

    @staticmethod
    def parse(raw_requestline: bytes, rfile: Any, budget: int = DEFAULT_MAX_HEADER_BYTES) -> PlainHead:
        """The head. A plain request line (PLAIN_REQUEST_LINE) with plain
        header lines is parsed here; otherwise the head's request tuple is
        None (the request line is not plain) or its header_block is set (a
        header is not), and http.server parses what was read."""
        line = PLAIN_REQUEST_LINE.fullmatch(raw_requestline)
        request = None
        if line is not None and not line.group(2).startswith(b"//"):
            command, path, version = (part.decode("latin-1") for part in line.groups())
            request = (command, path, version, raw_requestline.decode("latin-1").rstrip("\r\n"))
        lines, size = [], len(raw_requestline)
        while True:
            raw = rfile.readline(MAX_LINE + 1)
            size += len(raw)
            if len(raw) > MAX_LINE:
                return PlainHead(request, error=(431, "Line too long", "header line"))
            if size > budget:
                return PlainHead(request, error=(431, "Request header fields too large", None))
            lines.append(raw)
            if len(lines) > MAX_HEADERS:
                return PlainHead(request, error=(431, "Too many headers", None))
            if raw in (b"\r\n", b"\n", b""):
                break
        for raw in lines[:-1]:
            if FIELD_LINE.fullmatch(raw) is None:
                return PlainHead(request, error=(400, "Bad header line", None))
        if request is None:
            return PlainHead(None, header_block=b"".join(lines))
        items = []
        for raw in lines[:-1]:
            header = PLAIN_HEADER.fullmatch(raw)
            if header is None:
                return PlainHead(request, header_block=b"".join(lines))
            items.append((header.group(1).decode("ascii").lower(), header.group(2).decode("ascii")))
        return PlainHead(request, RequestHeaders(items))


Answer = Tuple[int, Dict[str, Any], Optional[Dict[str, str]]]


class AdminPages:
    """What /healthz, /metrics, /jobs and /jobs/<id> answer, and who may see them."""

    def __init__(self, service: Service):
        self.service = service

    def denial(self, authorization: str) -> Optional[Answer]:
        """None when `authorization` carries an admin token ('Bearer <token>'),
        else the answer: 404 with no admin token configured, 401 otherwise."""
        tokens = self.service.config.admin_tokens
        if not tokens:
            return 404, {"error": "not found (set admin_token to use this)"}, None
        given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if token_matches(given, tokens):
            return None
        return (401, {"error": "an admin token is needed: Authorization: Bearer <token>"},
                {"WWW-Authenticate": 'Bearer realm="autodeploy"'})

    def healthz(self) -> Answer:
        healthy, reason = self.service.health()
        # The reason only when there is one: healthy is {"status": "ok"}.
        doc: Dict[str, Any] = {"status": "ok"} if healthy else {"status": "unhealthy", "reason": reason}
        poller = self.service.poller
        if poller is not None and poller.apps():
            # A registry that is down delays deploys; it does not make the service unhealthy.
            doc["polling"] = {"apps": len(poller.apps()), "failing": poller.failing()}
        return 200 if healthy else 503, doc, None

    def metrics_text(self) -> bytes:
        return self.service.metrics.render(self.service.queue.depth()).encode("utf-8")

    def jobs(self, query: str) -> Answer:
        first = {key: values[0] for key, values in urllib.parse.parse_qs(query).items() if values}
        try:
            limit = max(1, min(1000, int(first.get("limit", "100"))))
        except ValueError:
            return 400, {"error": "limit must be a number"}, None
        state = first.get("state")
        if state and state not in STATES:  # else a typo answers an empty list, as if no job had it
            return 400, {"error": "state must be one of %s" % ", ".join(STATES)}, None
        return 200, {"jobs": self.service.job_list(first.get("app"), first.get("state"), limit)}, None

    def job(self, job_id: str) -> Answer:
        job = self.service.job_detail(job_id)
        return (200, job, None) if job is not None else (404, {"error": "no such job"}, None)


def page_of(target: str) -> Optional[str]:
    """Which page a request target names: 'deploy', 'healthz', 'metrics',
    'jobs', 'job', or None."""
    path = target.split("?", 1)[0]
    if path.startswith("/deploy/") or target == "/deploy":
        return "deploy"
    if path.startswith("/jobs/"):
        return "job"
    return {"/healthz": "healthz", "/metrics": "metrics", "/jobs": "jobs"}.get(path)


def deploy_path(target: str) -> Tuple[Optional[str], str]:
    """(sender or None, token) of /deploy/<token> or /deploy/<sender>/<token>."""
    rest = target.split("?", 1)[0][len("/deploy/"):].rstrip("/")
    sender, _, token = rest.rpartition("/")
    return sender or None, token


# (method, page) -> the WebhookHandler method that answers it. A page asked
# for with another method gets 405 for the deploy path, 404 for the rest.
ROUTES = {
    ("POST", "deploy"): "deploy",
    ("GET", "healthz"): "healthz",
    ("GET", "metrics"): "metrics",
    ("GET", "jobs"): "admin_page",
    ("GET", "job"): "admin_page",
}


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    """POST /deploy/<token> with a push payload, GET for the admin pages;
    everything else is 404/405."""
    server: WebhookServer
    protocol_version = "HTTP/1.1"
    # Not "HTTP/0.9": a request line the parser cannot read gets a status line with its 400.
    default_request_version = "HTTP/1.0"
    server_version = "autodeploy/" + __version__
    disable_nagle_algorithm = True
    timeout = 10  # seconds the answer's send may block (reads have DeadlineReader's deadlines)
    # Buffer the answer so headers and body leave in one send (handle_one_request flushes).
    wbufsize = 64 * 1024
    _body_read = False

    def version_string(self) -> str:
        """The Server header: http.server's adds the Python version after a space."""
        return self.server_version

    # -- the connection and the request head -------------------------------

    def setup(self) -> None:
        config = self.server.service.config
        self.slot = self.server.slot_of(self.request)
        if self.server.tls is not None:
            self.request.settimeout(config.header_timeout)  # bounds the handshake
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()
        self.reader = DeadlineReader(self.connection, config.keepalive_timeout,
                                     config.header_timeout, config.request_timeout)
        self.rfile = io.BufferedReader(self.reader)
        self._requests = 0

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.server.tls is not None:
                # wrap_socket() detached the socket socketserver will close: close ours
                self.server.shutdown_request(self.request)

    def handle_one_request(self) -> None:
        """http.server's, with the request line bounded (MAX_LINE), the
        reader's deadlines moved on, and the connection's phase kept for the
        listener (a connection reading its head or idle may be displaced)."""
        if self._requests:
            self.reader.between_requests()
            self.slot.phase = "idle"
        self._requests += 1
        self._body_read = False
        try:
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
            if len(self.raw_requestline) > MAX_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            self.slot.phase = "head"
            if not self.parse_request():
                return  # answered already
            self.reader.headers_done()
            self.slot.phase = "busy"
            getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except socket.timeout as exc:
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True

    def parse_request(self) -> bool:
        """The head (400/414/431/505), then the source address check."""
        if not self._parse_head():
            return False
        config = self.server.service.config
        if config.allow_from:
            source = client_address(self.client_address[0], self.headers, config.trusted_proxies)
            if not in_networks(source, config.allow_from):
                log.warning("%s refused: not in allow_from (peer %s)", printable(source),
                            self.client_address[0])
                self.answer(403, {"error": "forbidden"}, close=True)
                return False
        if not hasattr(self, "do_" + self.command):  # http.server would answer 501
            self.route()
            self.wfile.flush()
            return False
        return True

    def _parse_head(self) -> bool:
        """Read the head with RequestParser (bounded) and parse it: plain
        heads here, anything else with http.server's parse_request(), which
        the outcome always matches. False once an error is answered."""
        head = RequestParser.parse(self.raw_requestline, self.rfile,
                                   self.server.service.config.max_header_bytes)
        self.head_was_plain = head.plain and head.error is None and head.headers is not None
        if head.plain:
            self.command, self.path, self.request_version = head.command, head.path, head.version
            self.requestline = head.requestline
            self.close_connection = head.version == "HTTP/1.0"
        if head.error is not None:
            if not head.plain:
                self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
                self.command, self.request_version = "", self.default_request_version
                self.close_connection = True
            self.send_error(*head.error)
            return False
        if head.headers is None:
            return self._parse_request_from(head.header_block)
        self.headers = head.headers  # type: ignore[assignment]
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if self.headers.get("Expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def _parse_request_from(self, header_bytes: bytes) -> bool:
        """http.server's parse_request(), reading the header block from
        `header_bytes` (already read from the connection), the rest as usual."""
        connection_file = self.rfile
        self.rfile = io.BytesIO(header_bytes)  # type: ignore[assignment]
        try:
            return super().parse_request()
        finally:
            self.rfile = connection_file

    def handle_expect_100(self) -> bool:
        """Send the 100 Continue now: wfile is buffered until the final answer."""
        super().handle_expect_100()
        self.wfile.flush()
        return True

    # -- routes -------------------------------------------------------------

    def route(self) -> None:
        """Answer the request with the ROUTES entry for its method and page."""
        page = page_of(self.path)
        method = "GET" if self.command == "HEAD" else self.command
        name = ROUTES.get((method, page))
        if name is not None:
            getattr(self, name)()
        elif page == "deploy":
            self.answer(405, {"error": "use POST"}, {"Allow": "POST"})
        else:
            self.answer(404, {"error": "not found"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = route

    def deploy(self) -> None:
        """POST /deploy/<token> or /deploy/<sender>/<token>: check, journal
        and queue the pushes; 202 (200 when there is nothing to deploy)."""
        service = self.server.service
        sender, token = deploy_path(self.path)
        scope = token_scope(service.config, token)
        if scope is None:
            self._log_unknown_token(sender, token)
            return self.answer(404, {"error": "not found"})
        try:
            check_sender_name(sender)  # before the body is read
        except PayloadError as exc:
            return self.answer(exc.status, {"error": exc.message})
        body = self._read_body()
        if body is None:
            return
        config, headers = service.config, self.headers
        try:
            parsed = parse_request(body, headers, sender)
            status, answer = service.accept(
                parsed, lambda push: check_sender(config, push, scope, body, headers))
        except PayloadError as exc:
            log.info("webhook refused (%d): %s", exc.status, printable(exc.message))
            retry = {"Retry-After": "30"} if exc.status == 503 else None
            return self.answer(exc.status, {"error": exc.message}, retry)
        self.answer(status, answer)

    def _log_unknown_token(self, sender: Optional[str], token: str) -> None:
        """A mistyped webhook URL shows in the log (at most a line a second):
        who sent it, and a hint of the token, never the token itself."""
        config = self.server.service.config
        source = client_address(self.client_address[0], self.headers, config.trusted_proxies)
        named = sender if sender in SENDERS else detect_sender({}, self.headers)
        agent = self.headers.get("User-Agent")
        who = "sender %s" % named if named else \
            "User-Agent %s" % printable(agent[:80]) if agent else "sender unknown"
        self.server._log_limited("unknown-token", "%s deploy refused (404): unknown token (%s; %s)"
                                 % (printable(source), token_hint(token), who))

    def healthz(self) -> None:
        self.answer(*self.server.admin.healthz())

    def metrics(self) -> None:
        if self.server.service.config.metrics_public:
            return self.answer_bytes(200, self.server.admin.metrics_text(), METRICS_TYPE)
        self.admin_page()

    def admin_page(self) -> None:
        """/metrics, /jobs and /jobs/<id>, for an admin token only."""
        admin = self.server.admin
        denial = admin.denial(self.headers.get("Authorization", ""))
        if denial is not None:
            return self.answer(*denial)
        path, _, query = self.path.partition("?")
        try:
            if path == "/metrics":
                return self.answer_bytes(200, admin.metrics_text(), METRICS_TYPE)
            self.answer(*(admin.jobs(query) if path == "/jobs" else admin.job(path[len("/jobs/"):])))
        except JournalError as exc:
            self.answer(503, {"error": str(exc)})

    # -- the body and the answer --------------------------------------------

    def _read_body(self) -> Optional[bytes]:
        """The request body, or None after answering 411/413/400."""
        if self.headers.get("Transfer-Encoding"):
            if self.headers.get("Content-Length") is not None:  # which one frames it? (RFC 9112 6.1)
                self.answer(400, {"error": "Transfer-Encoding and Content-Length together"}, close=True)
            else:
                self.answer(411, {"error": "send the body with a Content-Length, not chunked"},
                            close=True)
            return None
        raw = self.headers.get_all("Content-Length") or []
        if not raw:
            self.answer(411, {"error": "Content-Length required"}, close=True)
            return None
        value = raw[0].strip() if len(raw) == 1 else ""
        if not re.fullmatch(r"[0-9]+", value):
            self.answer(400, {"error": "bad Content-Length"}, close=True)
            return None
        max_body = self.server.service.config.max_body
        digits = value.lstrip("0") or "0"  # int() refuses over 4300 digits: over max_body anyway
        length = int(digits) if len(digits) <= 18 else max_body + 1
        if length > max_body:
            self.answer(413, {"error": "body over %d bytes" % max_body}, close=True)
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            log.info("%s connection dropped: the body ended after %d of %d bytes",
                     self.client_address[0], len(body), length)
            self.close_connection = True
            return None
        self._body_read = True
        return body

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Errors found while parsing the request (400, 414, 431, 505...), as JSON."""
        message = _mask_path(message or self.responses.get(code, ("error",))[0])
        self.answer(code, {"error": message}, close=True)

    def answer(self, status: int, doc: Dict[str, Any], headers: Optional[Dict[str, str]] = None,
               close: bool = False) -> None:
        """Send a JSON answer."""
        data = (json.dumps(doc) + "\n").encode("utf-8")
        self.answer_bytes(status, data, "application/json", headers, close)

    def answer_bytes(self, status: int, data: bytes, content_type: str,
                     headers: Optional[Dict[str, str]] = None, close: bool = False) -> None:
        """Send an answer with `data` as its body."""
        if self.command == "POST" and self.path.startswith("/deploy"):
            self.server.service.metrics.count_webhook(status)
        self.connection.settimeout(self.timeout)  # reads may have left it shorter
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if not close and not self._body_read and (self.headers.get("Transfer-Encoding")
                                                  or self.headers.get("Content-Length", "0").strip() != "0"):
            close = True  # an unread body would be taken for the next request
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s %s", self.client_address[0], printable(self.command),
                      printable(_mask_path(getattr(self, "path", ""))), code)

    def log_error(self, format: str, *args: Any) -> None:
        log.info("%s bad request: %s", self.client_address[0], printable(_mask_path(format % args)))

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.client_address[0], printable(_mask_path(format % args)))


METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _mask_path(text: str) -> str:
    """Hide the token in '/deploy/<token>'."""
    return re.sub(r"/deploy/[^\s?\"']+", "/deploy/***", str(text))


############################################################################
# Lifecycle: wiring, the instance lock, the control socket, serve
############################################################################

def make_engine(config: Config) -> DockerClient:
    return DockerClient(config.docker_host)


def build_service(config: Config, engine: DockerClient,
                  urlopen: Optional[Callable[..., Any]] = None,
                  clock: Callable[[], float] = time.time,
                  sleep: Optional[Callable[[float], None]] = None,
                  crash_at: Optional[str] = None) -> Service:
    """Wire the service for `config`: journal, health gate, target, runner,
    callbacks. `crash_at`: see ContainerTarget (a seam for crash tests);
    `sleep`: None waits on the stop deadline, so a shutdown wakes the runner."""
    deadline = StopDeadline(clock)
    gate = HealthGate(engine, clock, sleep or time.sleep, check_cut_off=deadline.check)
    journal: Union[Journal, MemoryJournal] = MemoryJournal()
    if config.journal:
        journal = Journal(config.state_file("journal.sqlite3"), config.keep_jobs,
                          config.keep_days).open()
    # One Recorder: the target's steps, the jobs' states and the callbacks'
    # rows are held, and written in order, together.
    recorder = Recorder(journal)
    target = ContainerTarget(engine, gate, deadline, config.docker_config,
                             record_step=recorder.save, clock=clock, crash_at=crash_at)
    runner = JobRunner(target, deadline, config.engine_wait, clock, sleep,
                       Discovery(engine, config.label_prefix))
    return Service(config, runner, CallbackSender(config.callback_allow, urlopen), journal, clock,
                   recorder=recorder)


class InstanceLock:
    """An exclusive lock on the state directory, held by `serve`, or by a
    `deploy` command that found no service: one of them at a time deploys
    from this journal. The file names its holder."""

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = None

    def acquire(self, who: str) -> bool:
        """Take the lock if it is free; OSError when the folder is unusable."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, ("%d %s\n" % (os.getpid(), who)).encode("utf-8"))
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds it, as its file says ('1234 serve')."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                return fh.read(200).strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Unix socket in the state directory (mode 0600: its owner and root)
    through which the `deploy` command hands a job to the running service.
    One JSON line in: {"repository": ..., "tag": ...}; lines out: the
    job accepted (or the error, or why the tag policy ignores the push),
    then its outcome once it has one."""
    daemon_threads = True

    def __init__(self, path: str, service: Service):
        self.service = service
        if os.path.exists(path):
            os.unlink(path)  # left by a process that died: we hold the instance lock
        old_umask = os.umask(0o177)
        try:
            super().__init__(path, ControlHandler)
        finally:
            os.umask(old_umask)


class ControlHandler(socketserver.StreamRequestHandler):
    timeout = 10  # for the request line; the wait for the outcome has none

    def handle(self) -> None:
        service = self.server.service  # type: ignore[attr-defined]
        try:
            request = read_json_object(self.rfile.readline(4096))
            push = Push(str(request["repository"]), str(request["tag"]), sender="cli")
            waiter = Waiter()
            job = service.submit(push, waiter)
        except Ignored as exc:
            return self._send({"ignored": exc.reason})
        except (KeyError, PayloadError) as exc:
            message = exc.message if isinstance(exc, PayloadError) else "missing %s" % exc
            return self._send({"error": message})
        self._send({"job": job.id, "state": QUEUED})
        self.connection.settimeout(None)
        waiter.event.wait()
        self._send(waiter.outcome)

    def _send(self, doc: Dict[str, Any]) -> None:
        self.wfile.write((json.dumps(doc) + "\n").encode("utf-8"))
        self.wfile.flush()


def serve(config: Config, stop_event: Optional[threading.Event] = None,
          environ: Optional[Mapping[str, str]] = None) -> int:
    """Run the webhook server until SIGTERM/SIGINT (or `stop_event`),
    telling systemd (Type=notify) when it is ready, alive and stopping."""
    environ = os.environ if environ is None else environ
    if not config.has_tokens():
        if not config.insecure_no_token:
            raise SystemExit("%s: no token configured: set token or token_file in [autodeploy] "
                             "(or $AUTODEPLOY_TOKEN, or a systemd credential 'token')" % config.path)
        log.warning("INSECURE: no token configured and --insecure-no-token given: anyone who "
                    "reaches this port can deploy")
    stop_event = stop_event or threading.Event()
    reload_wanted = threading.Event()
    tls = tls_context(config) if config.tls_cert else None
    lock = take_instance_lock(config, stop_event)
    service = build_service(config, make_engine(config),
                            crash_at=environ.get("AUTODEPLOY_CRASH_AT") or None)
    server = WebhookServer((config.listen_host, config.listen_port), service, tls)
    service.start()
    poller = service.poller = Poller(service, dockerapi.RegistryClient())
    poller.start()
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        # Handlers only set flags: the loop below acts on them.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: reload_wanted.set())
    thread = threading.Thread(target=server.serve_forever, name="autodeploy-http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    log.info("autodeploy %s listening on %s://%s:%d/deploy/<token> (%d apps, %d workers)",
             __version__, "https" if tls else "http", host if ":" not in host else "[%s]" % host,
             port, len(config.apps), config.workers)
    sd_notify("READY=1\nSTATUS=listening on port %d" % port, environ)
    control = start_control_server(config, service)  # after the first answer can be given
    # On a thread: an Engine behind an unanswering TCP address takes its timeout to fail.
    threading.Thread(target=check_engine_at_start, args=(service.runner.engine, config),
                     name="autodeploy-engine-check", daemon=True).start()
    interval = watchdog_interval(environ)
    # Wake at least once a second: a SIGHUP's reload waits no longer than that.
    while not stop_event.wait(min(interval or 1.0, 1.0)):
        if reload_wanted.is_set():
            reload_wanted.clear()
            reload_config(service, environ)
        if interval and thread.is_alive() and service.alive() and poller.alive():
            sd_notify("WATCHDOG=1", environ)
    sd_notify("STOPPING=1", environ)
    log.info("stopping: finishing running deploys")
    server.shutdown()
    server.server_close()
    poller.stop()
    if control is not None:
        control.shutdown()
        control.server_close()
    service.stop()
    if lock is not None:
        lock.release()
    log.info("stopped")
    return 0


def check_engine_at_start(engine: DockerClient, config: Config) -> bool:
    """Ask the Engine once as the service starts: a wrong docker_host shows
    in the log at once, not at the first deploy. A WARNING, not a refusal:
    the Engine may come up later, and webhooks are journaled meanwhile."""
    try:
        if engine.ping():
            return True
        problem = "its /_ping did not answer OK"
    except DockerError as exc:
        problem = str(exc)
    log.warning("the Docker Engine at %s does not answer (%s); webhooks are still accepted and "
                "journaled, and each job waits up to %s (engine_wait) for the Engine",
                getattr(engine, "host", config.docker_host), problem, format_seconds(config.engine_wait))
    return False


def take_instance_lock(config: Config, stop_event: threading.Event,
                       pause: float = 0.2) -> Optional[InstanceLock]:
    """The state directory's lock, waiting while a `deploy` command holds it;
    SystemExit when another service holds it (two services on one journal
    would each resume the other's jobs); None when the folder cannot be
    used (logged: the service runs anyway)."""
    lock = InstanceLock(config.state_file("autodeploy.lock"))
    try:
        told = False
        while not lock.acquire("serve"):
            if stop_event.wait(pause):
                return None
            holder = lock.holder()  # read after a pause: a new holder writes its name first
            if holder.endswith(" serve"):
                raise SystemExit("%s: another autodeploy serve (pid %s) uses the state directory "
                                 "%s; give each service its own state_dir"
                                 % (config.path, holder.split()[0], config.state_dir))
            if not told:
                log.warning("waiting for the state directory %s: held by pid %s",
                            config.state_dir, holder)
                told = True
    except OSError as exc:
        log.warning("cannot lock the state directory %s: %s; a `deploy` command run meanwhile "
                    "may overlap this service's jobs", config.state_dir, exc)
        return None
    return lock


def start_control_server(config: Config, service: Service) -> Optional[ControlServer]:
    """The control socket on a thread of its own; None (logged) when it cannot be made."""
    try:
        control = ControlServer(config.state_file("control.sock"), service)
    except OSError as exc:
        log.warning("no control socket (%s): `deploy` commands cannot reach this service", exc)
        return None
    threading.Thread(target=control.serve_forever, name="autodeploy-control", daemon=True).start()
    return control


def reload_config(service: Service, environ: Mapping[str, str]) -> bool:
    """SIGHUP: read the config file again; a bad one is logged and the
    configuration in force stays."""
    path = service.config.path
    try:
        config = load_config(path, environ)
    except ConfigError as exc:
        log.error("reload refused, the configuration in force stays: %s", exc)
        return False
    service.reload(config._replace(insecure_no_token=service.config.insecure_no_token))
    log.info("reloaded %s: %d apps", path, len(config.apps))
    return True


def tls_context(config: Config) -> Any:
    """A server-side SSLContext for the configured certificate: TLS 1.2 or newer."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit("%s: tls_cert %s / tls_key %s: %s"
                         % (config.path, config.tls_cert, config.tls_key, exc)) from None
    return context


def sd_notify(message: str, environ: Mapping[str, str]) -> bool:
    """Send `message` to systemd over $NOTIFY_SOCKET; False when not run by
    systemd with Type=notify (or the send failed, which is logged)."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", environ.get("NOTIFY_SOCKET"), exc)
        return False


def watchdog_interval(environ: Mapping[str, str]) -> Optional[float]:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


############################################################################
# Building and installing
############################################################################

PYZ = "autodeploy.pyz"
# What the zipapp carries: the two modules (with bytecode), and what
# `install` puts on the host besides itself.
PACKAGED = ("autodeploy.py", "dockerapi.py", "autodeploy.service", "README.md")
ZIPAPP_SHEBANG = "/usr/bin/env python3"
# Where `install` puts things: the paths autodeploy.service names.
INSTALLED_PYZ = "usr/local/bin/autodeploy.pyz"
INSTALLED_UNIT = "etc/systemd/system/autodeploy.service"
INSTALLED_DOC = "usr/local/share/doc/autodeploy/README.md"
INSTALLED_ETC = "etc/autodeploy"
INSTALLED_STATE = ("var/lib/autodeploy", "var/lib/private/autodeploy")  # the latter: DynamicUser=
UNIT_NAME = "autodeploy.service"


def packaged_file(name: str) -> bytes:
    """One of PACKAGED, read from wherever this module was loaded: the
    zipapp (so it can rebuild and install itself) or the checkout."""
    loader = globals().get("__loader__")
    archive = getattr(loader, "archive", None)  # a zipimporter's zip file, as sys.path named it
    if archive:
        path = os.path.join(archive, name)
        try:
            return loader.get_data(path)  # type: ignore[union-attr]
        except OSError as exc:
            raise InstallError("%s holds no %s" % (archive, name)) from exc
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InstallError("cannot read %s: %s" % (path, exc.strerror or exc)) from exc


def build_zipapp(output: str) -> str:
    """Write the single-file zipapp to `output` (replacing it at once):
    both modules with bytecode for the running Python (a start then skips
    compiling: ~40 ms and ~4 MiB less; another Python falls back to the
    sources), the unit and README, `#!/usr/bin/env python3`, executable."""
    # Imported here: only build and install need them, and they would add
    # ~0.9 MiB (pathlib, importlib.util, random...) to every running service.
    import py_compile
    import tempfile
    import zipapp
    with tempfile.TemporaryDirectory(prefix="autodeploy-build-") as folder:
        for name in PACKAGED:
            with open(os.path.join(folder, name), "wb") as fh:
                fh.write(packaged_file(name))
        for name in ("autodeploy.py", "dockerapi.py"):
            source = os.path.join(folder, name)
            # Beside the source, where zipimport looks (not __pycache__).
            py_compile.compile(source, cfile=source + "c", dfile=name, doraise=True)
        partial = "%s.%d.partial" % (output, os.getpid())
        try:
            zipapp.create_archive(folder, partial, interpreter=ZIPAPP_SHEBANG,
                                  main="autodeploy:cli", compressed=True)
            os.chmod(partial, 0o755)
            os.replace(partial, output)
        except OSError as exc:
            raise InstallError("cannot write %s: %s" % (output, exc.strerror or exc)) from exc
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return output


def zipapp_version(path: str) -> Optional[str]:
    """The __version__ of the zipapp at `path`; None when there is none
    (or it is no autodeploy zipapp)."""
    import zipfile  # see build_zipapp
    try:
        with zipfile.ZipFile(path) as archive:
            source = archive.read("autodeploy.py").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    found = re.search(r'^__version__ = "([^"]+)"', source, re.M)
    return found.group(1) if found else None


def zipapp_sources(path: str) -> Optional[Dict[str, bytes]]:
    """The PACKAGED files in the zipapp at `path`, to tell whether an
    install would change anything; None when it cannot be read."""
    import zipfile  # see build_zipapp
    try:
        with zipfile.ZipFile(path) as archive:
            return {name: archive.read(name) for name in PACKAGED}
    except (OSError, KeyError, zipfile.BadZipFile):
        return None


class Installer:
    """`install` and `uninstall`: what README's manual steps did, under
    `root` ("/" on a host; a folder in the tests). `systemctl` runs through
    `run` only when `systemd` is true (a real host), else the commands to
    run are printed."""

    def __init__(self, root: str = "/", systemd: bool = True,
                 run: Callable[..., Any] = subprocess.run, out: Any = None,
                 group: str = "docker", build: Callable[[str], str] = build_zipapp):
        self.root = root
        self.systemd = systemd
        self.run = run
        self.build = build
        self.out = out or sys.stdout
        self.group = group
        self.failed = False

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- install ----------------------------------------------------------

    def install(self, start: bool = True) -> int:
        """Install or upgrade; never overwrite a config or a token. Prints
        the webhook URL. 0, or 1 when systemctl failed (the files are in
        place then)."""
        upgrade = os.path.exists(self.path(INSTALLED_PYZ))
        changed = self.install_zipapp()
        changed = self.write_if_changed(INSTALLED_UNIT, packaged_file("autodeploy.service")) or changed
        self.write_if_changed(INSTALLED_DOC, packaged_file("README.md"))
        gid = self.docker_gid()
        self.make_config_folder(gid)
        self.make_config(gid)
        token = self.make_token()
        interpreter = self.path("usr/bin/python3")  # the unit's ExecStart=
        if self.systemd and not os.access(interpreter, os.X_OK):
            self.say("warning: no %s, which the unit runs: apt-get install python3-minimal"
                     % interpreter)
        if self.systemd and start:
            self.systemctl("daemon-reload")
            if upgrade and changed:
                self.systemctl("try-restart", UNIT_NAME)  # a running service takes the new code
            self.systemctl("enable", "--now", UNIT_NAME)
        else:
            self.say("not started%s; to start it: systemctl daemon-reload && systemctl enable "
                     "--now autodeploy" % (" (--no-start)" if self.systemd else
                                           " (installed under %s)" % self.root))
        self.print_webhook_url(token)
        return 1 if self.failed else 0

    def install_zipapp(self) -> bool:
        """Build this program into INSTALLED_PYZ; False when the one there
        already has the same files."""
        target = self.path(INSTALLED_PYZ)
        old = zipapp_sources(target)
        if old is not None and old == {name: packaged_file(name) for name in PACKAGED}:
            self.say("%s: autodeploy %s, already installed" % (target, __version__))
            return False
        os.makedirs(os.path.dirname(target), exist_ok=True)
        before = zipapp_version(target) if os.path.exists(target) else None
        self.build(target)
        self.say("%s: autodeploy %s%s" % (target, __version__, " (was %s)" % before if before
                                          else " installed"))
        return True

    def write_if_changed(self, relative: str, content: bytes) -> bool:
        """A file install owns (unit, README): replaced when it differs."""
        target = self.path(relative)
        try:
            with open(target, "rb") as fh:
                if fh.read() == content:
                    return False
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + ".partial"
        with open(partial, "wb") as fh:
            fh.write(content)
        os.chmod(partial, 0o644)
        os.replace(partial, target)
        self.say("%s: written" % target)
        return True

    def docker_gid(self) -> Optional[int]:
        """The group the unit runs in (SupplementaryGroups=docker): it must
        read the config. None (warned) when the host has no such group."""
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            self.say("warning: no group %r on this host: the unit's SupplementaryGroups=%s will "
                     "stop it from starting; install Docker first, or edit the unit (README, "
                     "Podman)" % (self.group, self.group))
            return None

    def make_config_folder(self, gid: Optional[int]) -> None:
        folder = self.path(INSTALLED_ETC)
        os.makedirs(folder, mode=0o750, exist_ok=True)
        self.own(folder, gid, 0o750)

    def make_config(self, gid: Optional[int]) -> None:
        """The commented example as the config, when there is none."""
        target = os.path.join(self.path(INSTALLED_ETC), "autodeploy.conf")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            self.say("%s: kept as it is" % target)
            return
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(config_example())
        self.own(target, gid, 0o640)
        self.say("%s: written (every setting commented out: it follows containers labelled "
                 "autodeploy.enable=true)" % target)

    def make_token(self) -> str:
        """The deploy token the unit passes as its credential: root's only
        (0600), made when there is none."""
        target = os.path.join(self.path(INSTALLED_ETC), "token")
        existed = os.path.exists(target)
        try:
            token = read_or_make_token(target).split()[0]
        except (OSError, IndexError) as exc:
            raise InstallError("%s: cannot read or write the token: %s" % (target, exc)) from exc
        self.say("%s: %s" % (target, "kept as it is" if existed else "a new token (mode 0600)"))
        return token

    def own(self, path: str, gid: Optional[int], mode: int) -> None:
        """root:<group> and `mode`, as far as this user may set them."""
        if gid is not None and os.geteuid() == 0:
            os.chown(path, 0, gid)
        os.chmod(path, mode if gid is not None else mode & 0o700)

    def print_webhook_url(self, token: str) -> None:
        """The URL to paste into the registry, and what to do next."""
        host, port = self.listen_address()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = "http://%s:%d/deploy/%s" % ("[%s]" % shown if ":" in shown else shown, port, token)
        self.say("\nwebhook URL (a secret: whoever has it can deploy):\n  %s\n" % url)
        self.say("Next: label the containers to follow (docker run --label autodeploy.enable=true "
                 "...) or add a section to %s; then push, or try:\n  curl -X POST -d "
                 "'{\"image\": \"myname/myrepo\", \"tag\": \"latest\"}' %s"
                 % (os.path.join(self.path(INSTALLED_ETC), "autodeploy.conf"), url))
        if _is_loopback(host):
            self.say("It listens on %s only: for a registry on the internet, put a reverse proxy "
                     "with TLS in front (README: Behind a reverse proxy) and give the registry "
                     "https://<your host>/deploy/<token>." % shown)

    def listen_address(self) -> Tuple[str, int]:
        """The installed config's listen (the default if it cannot say)."""
        parser = configparser.ConfigParser(interpolation=None, default_section="\0defaults")
        try:
            parser.read(os.path.join(self.path(INSTALLED_ETC), "autodeploy.conf"), encoding="utf-8")
            return _parse_listen(parser.get("autodeploy", "listen", fallback=DEFAULT_LISTEN), "")
        except (configparser.Error, ConfigError, UnicodeDecodeError, OSError):
            return _parse_listen(DEFAULT_LISTEN, "")

    def systemctl(self, *args: str) -> bool:
        try:
            done = self.run(["systemctl"] + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            self.say("error: systemctl %s: %s" % (" ".join(args), exc))
            self.failed = True
            return False
        if done.returncode != 0:
            self.say("error: systemctl %s failed (exit %d): %s"
                     % (" ".join(args), done.returncode, " ".join((done.stdout or "").split())))
            self.failed = True
            return False
        self.say("systemctl %s" % " ".join(args))
        return True

    # -- uninstall --------------------------------------------------------

    def uninstall(self, purge: bool = False) -> int:
        """Remove what install made; the config, token and journal too
        only when `purge`."""
        if self.systemd:
            self.systemctl("disable", "--now", UNIT_NAME)
        for relative in (INSTALLED_UNIT, INSTALLED_PYZ, INSTALLED_DOC):
            self.remove(self.path(relative))
        self.remove_empty(os.path.dirname(self.path(INSTALLED_DOC)))
        if self.systemd:
            self.systemctl("daemon-reload")
        kept = [self.path(INSTALLED_ETC)] + [self.path(state) for state in INSTALLED_STATE]
        kept = [path for path in kept if os.path.exists(path)]
        if purge:
            for path in kept:
                shutil.rmtree(path)
                self.say("%s: removed" % path)
        elif kept:
            self.say("kept (uninstall --purge removes them): %s" % ", ".join(kept))
        return 1 if self.failed else 0

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
            self.say("%s: removed" % path)
        except FileNotFoundError:
            pass

    @staticmethod
    def remove_empty(folder: str) -> None:
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty, or not there


def install_command(args: argparse.Namespace) -> int:
    """The `install` and `uninstall` commands."""
    root = os.path.abspath(args.root)
    if root == "/" and os.geteuid() != 0:
        print("autodeploy: %s writes to /usr/local, /etc and /etc/systemd: run it as root "
              "(or with --root DIR to fill another root)" % args.command, file=sys.stderr)
        return 2
    installer = Installer(root, systemd=root == "/")
    try:
        if args.command == "install":
            return installer.install(start=not args.no_start)
        return installer.uninstall(purge=args.purge)
    except (InstallError, OSError) as exc:
        print("autodeploy: %s failed: %s" % (args.command, exc), file=sys.stderr)
        return 1


############################################################################
# Command line
############################################################################

HANDOVER_WAIT = 60.0  # seconds `deploy` waits for a service to take its job or free the lock


def deploy_command(config: Config, target: str, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> int:
    """The `deploy` command: hand the job to the running service through
    its control socket; with no service running, run it here through a
    service of its own (same journal, same code). Either way it is in the
    journal, `history`, `show` and (when a service runs) /jobs and /metrics,
    and never overlaps a service's job for the same container."""
    repository, tag = target, ""
    if ":" in target.rsplit("/", 1)[-1]:
        repository, tag = target.rsplit(":", 1)
    app = config.app_for(repository)
    if app is None:
        print("%s is not configured in %s" % (repository, config.path), file=sys.stderr)
        return 2
    if not tag and app.tag_policy != "exact":
        print("%s follows tag_policy = %s: name the tag to deploy, as %s:TAG"
              % (repository, app.tag_policy, repository), file=sys.stderr)
        return 2
    push = Push(repository, tag or app.tags[0], sender="cli")
    lock = InstanceLock(config.state_file("autodeploy.lock"))
    give_up = clock() + HANDOVER_WAIT
    told = False
    while True:
        try:
            return deploy_through_service(config, push)
        except ControlError:
            pass  # no service listens
        try:
            if lock.acquire("deploy"):
                try:
                    return deploy_here(config, push)
                finally:
                    lock.release()
        except OSError as exc:
            print("autodeploy: cannot use the state directory %s: %s" % (config.state_dir, exc),
                  file=sys.stderr)
            return 2
        if clock() > give_up:
            print("autodeploy: the state directory %s is held by pid %s, which takes no jobs"
                  % (config.state_dir, lock.holder()), file=sys.stderr)
            return 1
        if not told:
            print("waiting for pid %s, which holds %s" % (lock.holder(), config.state_dir),
                  file=sys.stderr)
            told = True
        sleep(0.2)


def deploy_through_service(config: Config, push: Push) -> int:
    """Hand `push` to the running service and print its outcome; ControlError
    when no service listens on the control socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(config.state_file("control.sock"))
        except OSError as exc:
            raise ControlError(str(exc)) from exc
        sock.sendall((json.dumps({"repository": push.repository, "tag": push.tag}) + "\n").encode())
        replies = sock.makefile("rb")
        accepted = json.loads(replies.readline() or b"{}")
        if "ignored" in accepted:
            return print_ignored(push, accepted["ignored"])
        if "job" not in accepted:
            print("autodeploy: %s" % accepted.get("error", "the service did not answer"),
                  file=sys.stderr)
            return 1
        print("job %s queued by the running service" % accepted["job"])
        line = replies.readline()
    finally:
        sock.close()
    if not line:
        print("the service stopped before job %s finished; it stays queued for its next start"
              % accepted["job"], file=sys.stderr)
        return 1
    return print_outcome(json.loads(line), accepted["job"])


def deploy_here(config: Config, push: Push) -> int:
    """No service runs: run one without its listener until `push` is
    deployed. Like serve's start, it first resumes what the journal holds
    unfinished."""
    service = build_service(config, make_engine(config))
    service.start()
    try:
        waiter = Waiter()
        try:
            job = service.submit(push, waiter)
        except Ignored as exc:
            return print_ignored(push, exc.reason)
        except PayloadError as exc:
            print("autodeploy: %s" % exc.message, file=sys.stderr)
            return 1
        print("job %s" % job.id)
        waiter.event.wait()
    finally:
        service.stop()
    return print_outcome(waiter.outcome, job.id)


def print_ignored(push: Push, reason: str) -> int:
    """A push the tag policy does not deploy: not a failure, so 0."""
    print("%s: nothing to deploy: %s" % (push.repository, reason))
    return 0


def print_outcome(outcome: Dict[str, Any], job_id: str) -> int:
    """Print a deploy's outcome; 0 when the app runs the image."""
    if outcome.get("job") not in (None, job_id):
        print("superseded by job %s:" % outcome["job"])
    print("%s: %s" % (outcome.get("state"), outcome.get("description")))
    return 0 if outcome.get("state") in (SUCCEEDED, UP_TO_DATE) else 1


def print_history(config: Config, args: argparse.Namespace) -> int:
    """The `history` and `show` commands: the journal, for a terminal."""
    path = config.state_file("journal.sqlite3")
    if not os.path.exists(path):
        print("no journal at %s (nothing deployed yet, or another state_dir)" % path, file=sys.stderr)
        return 1
    journal = Journal(path).open()
    try:
        if journal.error:
            raise JournalError(journal.error)
        if args.command == "show":
            row = journal.get(args.job_id)
            if row is None:
                print("no job %s in %s" % (args.job_id, path), file=sys.stderr)
                return 1
            print(format_job(public_row(row, with_log=True)))
            return 0
        rows = [public_row(row) for row in journal.recent(args.app, args.state, args.limit)]
    except JournalError as exc:
        print("autodeploy: %s" % exc, file=sys.stderr)
        return 1
    finally:
        journal.close()
    print("%-19s  %-12s  %-24s  %-12s  %7s  %s" % ("RECEIVED", "JOB", "APP:TAG", "STATE", "TOOK", "DESCRIPTION"))
    for row in rows:
        print("%-19s  %-12s  %-24s  %-12s  %7s  %s" % (
            _when(row["received"]), row["id"], "%s:%s" % (row["app"], row["tag"]), row["state"],
            "%.1fs" % row["took"] if row["took"] is not None else "-",
            (row["description"] or "")[:100]))
    return 0


def format_job(row: Dict[str, Any]) -> str:
    """One job, as `show` prints it."""
    lines = ["job          %s" % row["id"],
             "app          %s:%s -> %s %s" % (row["app"], row["tag"], "service" if row.get("service")
                                              else "container", row["container"]),
             "state        %s" % row["state"],
             "description  %s" % (row["description"] or "-"),
             "received     %s (from %s)" % (_when(row["received"]), row["source"]),
             "started      %s" % _when(row["started"]),
             "finished     %s" % _when(row["finished"])]
    if row.get("old_image") or row.get("new_image"):
        lines.append("images       %s -> %s" % (_short(row.get("old_image")), _short(row.get("new_image"))))
    if row.get("superseded_by"):
        lines.append("superseded   by job %s" % row["superseded_by"])
    lines.append("log:")
    lines += ["  " + line for line in row.get("log") or []] or ["  (none)"]
    return "\n".join(lines)


def _when(timestamp: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def check(config: Config) -> int:
    """The `check` command: the config is valid, each app's registry
    credentials can be had, and the Engine answers."""
    print("config %s: OK, %d app(s), listening on %s:%d"
          % (config.path, len(config.apps), config.listen_host, config.listen_port))
    failed = False
    for app in config.apps.values():
        print("  %s -> %s, image %s, %s%s"
              % (app.repository, (SwarmServiceTarget if app.service else ContainerTarget).describe(app),
                 app.image, describe_policy(app),
                 ", polled every %s" % format_duration(app.poll) if app.poll else ""))
        try:
            print("    credentials: %s" % app_registry_auth(
                app, config.docker_config or dockerapi.docker_config_path()).source)
        except dockerapi.CredentialsError as exc:
            print("%s credentials: %s" % (app.repository, exc), file=sys.stderr)
            failed = True
    if not check_tokens(config):
        failed = True
    engine = make_engine(config)
    try:
        version = engine.version()
        described = engine.describe()
    except DockerError as exc:
        print("Docker Engine: %s" % exc, file=sys.stderr)
        return 1
    print("%s at %s (engine max API %s, min %s)"
          % (described, engine.where, version.get("ApiVersion"), version.get("MinAPIVersion")))
    failed = not check_labels(config, Discovery(engine, config.label_prefix)) or failed
    failed = not check_swarm(config, engine) or failed
    return 1 if failed else 0


def check_tokens(config: Config) -> bool:
    """`check`'s line on the deploy token: where serve gets it from. False
    (said on stderr) when it has none, as serve would then refuse to start."""
    if config.has_tokens():
        print("deploy tokens: %d global, %d app-only; admin tokens: %d" % (
            len(config.tokens), sum(len(app.tokens) for app in config.apps.values()),
            len(config.admin_tokens)))
        return True
    if is_default_config(config):
        print("deploy token: serve makes one on its first start, in %s"
              % config.state_file("token"))
        return True
    # The installed layout: the unit passes this file as its credential, so
    # the service has a token that `check`, run from a shell, is not given.
    credential = os.path.join(os.path.dirname(config.path), "token")
    if os.path.exists(credential):
        try:
            with open(credential, encoding="utf-8") as fh:
                _checked_tokens(_split_list(fh.read()), credential)
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            print("deploy token: %s" % (exc if isinstance(exc, ConfigError) else
                                        "cannot read %s: %s" % (credential, exc)), file=sys.stderr)
            return False
        print("deploy token: none in the config or the environment; %s holds one, which "
              "autodeploy.service passes to serve as its credential 'token'" % credential)
        return True
    print("error: no deploy token configured, so serve will refuse to start: set token_file "
          "in [autodeploy], or $AUTODEPLOY_TOKEN, or the systemd credential 'token' (%s)"
          % credential, file=sys.stderr)
    return False


def check_config_only(config: Config) -> int:
    """`check --config-only`: the file is valid (read_config said so before
    this runs). systemd's ExecReload= runs it before it signals the service,
    so a reload with a broken file fails where the admin sees it. No token
    is needed: a reload keeps the tokens the service started with."""
    print("config %s: OK, %d app(s)" % (config.path, len(config.apps)))
    return 0


def check_swarm(config: Config, engine: DockerClient) -> bool:
    """`check`'s lines on Swarm services: those the sections name (each
    must exist), and those labelled <prefix>.enable=true. False (said on
    stderr) when a section names a service and this Engine is no Swarm
    manager, which alone can update services."""
    named = [app for app in config.apps.values() if app.service]
    try:
        manager = engine.is_swarm_manager()
    except DockerError as exc:
        print("Swarm: %s" % exc, file=sys.stderr)
        return not named
    if not manager:
        if named:
            print("Swarm: this Engine is not a Swarm manager; service(s) %s cannot be deployed "
                  "(run autodeploy on a manager node)" % ", ".join(app.service for app in named),
                  file=sys.stderr)
            return False
        print("Swarm: this Engine is not a Swarm manager (no services followed)")
        return True
    good = True
    for app in named:
        try:
            image = service_image(engine.inspect_service(app.service).get("Spec"))
            print("  service %s (%s) runs %s" % (app.service, app.repository, image))
        except DockerError as exc:
            print("service %s (%s): %s" % (app.service, app.repository, exc), file=sys.stderr)
            good = False
    labelled = engine.list_services({"label": ["%s.enable=true" % config.label_prefix]})
    print("Swarm manager: %d service(s) named in sections, %d labelled %s.enable=true"
          % (len(named), len(labelled), config.label_prefix))
    for service in labelled:
        print("  labelled service %s runs %s" % (_dig(service, "Spec", "Name"),
                                                  service_image(service.get("Spec"))))
    return good


def check_labels(config: Config, discovery: Discovery) -> bool:
    """`check`'s lines on the labelled containers: what each follows, or
    why its labels are refused (printed to stderr; returns False then)."""
    try:
        found = discovery.labelled()
    except DockerError as exc:
        print("labelled containers: %s" % exc, file=sys.stderr)
        return False
    print("%d container(s) labelled %s.enable=true" % (len(found), discovery.prefix))
    good = True
    for info in found:
        name = info["Name"].lstrip("/")
        image = (info.get("Config") or {}).get("Image") or ""
        repository = split_image_reference(image)[1]
        base = config.app_for(repository)
        notes: List[str] = []
        try:
            view = label_view(info, discovery.prefix, repository, base, notes)
        except ConfigError as exc:
            print("%s; skipped by deploys" % exc, file=sys.stderr)
            good = False
            continue
        print("  %s -> %s:%s, %s%s" % (name, view.image, "/".join(view.tags) or "*",
                                       describe_policy(view),
                                       ", after %s" % view.depends_on if view.depends_on else ""))
        for note in notes:
            print("    %s" % note)
    return good


def read_config(given: Optional[str], environ: Mapping[str, str]) -> Config:
    """--config, else $AUTODEPLOY_CONFIG, else the default file; when none
    is named and the default file does not exist, the defaults (label
    discovery only)."""
    path = given or environ.get("AUTODEPLOY_CONFIG") or None  # set but empty: not given
    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return default_config(environ)
    return load_config(path or DEFAULT_CONFIG, environ)


def is_default_config(config: Config) -> bool:
    return os.path.basename(config.path) == NO_CONFIG


def with_state_token(config: Config, out: Any = None) -> Config:
    """Serving on the defaults: the token in state_dir/token (made on the
    first start, mode 0600, kept for the next ones) is the deploy token,
    and the webhook URL is printed once, at start (never logged)."""
    path = config.state_file("token")
    try:
        token = read_or_make_token(path)
    except OSError as exc:
        raise ConfigError("%s: cannot read or write the token: %s" % (path, exc.strerror or exc)) \
            from exc
    _check_token(token, path)
    host = config.listen_host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    print("no config file: serving on the defaults; webhook URL (the token is in %s):\n"
          "http://%s:%d/deploy/%s" % (path, "[%s]" % shown if ":" in shown else shown,
                                      config.listen_port, token),
          file=out or sys.stdout, flush=True)
    return config._replace(tokens=config.tokens + [token])


def read_or_make_token(path: str) -> str:
    """The token in `path`; a new random one written there (0600) if none."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(token + "\n")
    return token


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="autodeploy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="autodeploy " + __version__)
    parser.add_argument("--config", "-c", default=None,
                        help="configuration file (default: $AUTODEPLOY_CONFIG or %s; serve "
                             "runs on the defaults when neither is given and %s does not exist)"
                             % (DEFAULT_CONFIG, DEFAULT_CONFIG))
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    serve_command = commands.add_parser("serve", help="receive webhooks and deploy")
    serve_command.add_argument("--insecure-no-token", action="store_true",
                               help="serve even with no token configured: anyone who reaches "
                                    "the port can deploy (for a private network only)")
    serve_command.add_argument("--listen", metavar="HOST:PORT",
                               help="listen here instead of the config's listen (default %s)"
                                    % DEFAULT_LISTEN)
    deploy = commands.add_parser("deploy", help="deploy one repository now and wait for the "
                                 "outcome (through the running service, if any)")
    deploy.add_argument("target", metavar="REPO[:TAG]")
    check_command = commands.add_parser("check", help="validate the config and reach the Docker Engine")
    check_command.add_argument("--config-only", action="store_true",
                               help="only validate the config file (what `systemctl reload` runs "
                                    "before it signals the service)")
    history = commands.add_parser("history", help="recent jobs, from the journal")
    history.add_argument("--app", help="only this repository")
    history.add_argument("--state", choices=tuple(STATES))
    history.add_argument("--limit", type=int, default=30)
    show = commands.add_parser("show", help="one job, with its log lines")
    show.add_argument("job_id", metavar="JOB_ID")
    build = commands.add_parser("build", help="write the single-file zipapp (both modules, "
                                "bytecode for this Python)")
    build.add_argument("--output", "-o", default=PYZ, help="where (default: ./%s)" % PYZ)
    install = commands.add_parser("install", help="as root: install this program, its systemd "
                                  "unit, a config and a token, and start it")
    install.add_argument("--root", default="/", help="install under this folder instead of / "
                         "(systemctl is not run then)")
    install.add_argument("--no-start", action="store_true",
                         help="do not run systemctl daemon-reload and enable --now")
    uninstall = commands.add_parser("uninstall", help="as root: stop and remove what install made; "
                                    "the config, token and journal stay unless --purge")
    uninstall.add_argument("--root", default="/", help="uninstall from this folder instead of /")
    uninstall.add_argument("--purge", action="store_true",
                           help="also remove /etc/autodeploy (config, token) and the journal")
    config_command = commands.add_parser("config", help="print the commented example config, or "
                                         "README's configuration tables")
    config_command.add_argument("what", choices=("example", "reference"))
    for sub in commands.choices.values():
        sub.add_argument("--config", "-c", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: serve, deploy, check, history, show, build,
    install, uninstall, config."""
    args = parse_args(argv)
    # The format uses none of the process or thread fields: skip collecting
    # them for every line (the logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.command in ("build", "install", "uninstall", "config"):
        return program_command(args)  # no config needed: a broken one must not stop an upgrade
    try:
        config = read_config(args.config, os.environ)
        if args.command == "serve" and args.listen:
            host, port = _parse_listen(args.listen, "--listen")
            config = config._replace(listen_host=host, listen_port=port)
        if args.command == "serve" and is_default_config(config) and not args.insecure_no_token:
            config = with_state_token(config)
    except ConfigError as exc:
        print("autodeploy: %s" % exc, file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(config._replace(insecure_no_token=args.insecure_no_token))
    if args.command == "deploy":
        return deploy_command(config, args.target)
    if args.command in ("history", "show"):
        return print_history(config, args)
    return check_config_only(config) if args.config_only else check(config)


def program_command(args: argparse.Namespace) -> int:
    """build, install, uninstall, config example / reference."""
    if args.command == "config":
        sys.stdout.write(config_example() if args.what == "example" else config_reference())
        return 0
    if args.command == "build":
        try:
            print("%s: autodeploy %s for Python %d.%d" % (build_zipapp(args.output), __version__,
                                                         *sys.version_info[:2]))
        except InstallError as exc:
            print("autodeploy: build failed: %s" % exc, file=sys.stderr)
            return 1
        return 0
    return install_command(args)


def cli() -> None:
    """Entry point of the zipapp: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
