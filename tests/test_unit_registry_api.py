"""Unit tests of dockerapi's registry client (Registry HTTP API v2) against
an in-process fake registry on 127.0.0.1: manifest HEADs, the token dance
with and without credentials, basic auth, tag pagination, 429s and every
other way a registry says no; and of tests/support.py's RecordingProxy."""

import base64
import email.message
import email.utils
import http.server
import json
import re
import socket
import threading
import unittest
import unittest.mock
import urllib.error
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

import dockerapi
from dockerapi import DockerError, ManifestAnswer, RegistryClient, RegistryError
from tests.support import RecordingProxy
from tests.unit_support import BoundedTestCase, FakeClock, serve_in_thread

USER = "alice"
PASSWORD = "pw-Sekr1t-" + "p" * 12  # never to be seen in a message
IDENTITY_TOKEN = "idtok-Sekr1t-" + "i" * 12  # ditto
DIGEST_V1 = "sha256:" + "1" * 64
DIGEST_V2 = "sha256:" + "2" * 64
MANIFEST_TYPES = ("application/vnd.oci.image.index.v1+json",
                  "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
NO_PROXY = dockerapi.registry_opener(use_proxy_env=False)


class Request:
    """One request the fake registry received."""

    def __init__(self, method: str, target: str, headers: Dict[str, str], body: bytes):
        self.method, self.target, self.headers, self.body = method, target, headers, body
        self.path, _, query = target.partition("?")
        self.query = dict(urllib.parse.parse_qsl(query))
        self.form = dict(urllib.parse.parse_qsl(body.decode())) if body else {}

    def __repr__(self) -> str:
        return "%s %s" % (self.method, self.target)


class FakeRegistry:
    """A registry on 127.0.0.1 serving manifests (HEAD and GET) and tag
    lists of `repos` ({name: {tag: digest}}), every request recorded.

    auth: "none"; "bearer": tokens from its own /token (GET with basic auth
    or anonymous; POST with grant_type=refresh_token and IDENTITY_TOKEN
    unless oauth=False), an anonymous token reading only public repos; or
    "basic": USER / PASSWORD on every request. `page_size` paginates tag
    lists with Link headers; script() answers the next requests itself.
    """

    def __init__(self, test: unittest.TestCase, auth: str = "none", private: Tuple[str, ...] = (),
                 page_size: Optional[int] = None, token_lifetime: Optional[int] = 300,
                 oauth: bool = True):
        self.auth, self.private, self.page_size = auth, set(private), page_size
        self.token_lifetime, self.oauth = token_lifetime, oauth
        self.repos = {"team/app": {"v1": DIGEST_V1, "v2": DIGEST_V2},
                      "library/nginx": {"latest": DIGEST_V1}}  # type: Dict[str, Dict[str, str]]
        self.requests = []  # type: List[Request]
        self.tokens = {}  # type: Dict[str, Tuple[Optional[str], str]]  # token -> (user, scope)
        self.scripted = []  # type: List[Tuple[int, Dict[str, str], bytes]]
        self.rate_limit = None  # type: Optional[str]
        self.lock = threading.Lock()
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = Request(self.command, self.path, dict(self.headers), body)
                with registry.lock:
                    registry.requests.append(request)
                    scripted = registry.scripted.pop(0) if registry.scripted else None
                status, headers, data = scripted or registry.answer(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = handle_one

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = "127.0.0.1:%d" % self.server.server_address[1]
        serve_in_thread(test.addCleanup, self.server)

    def script(self, status: int, headers: Optional[Dict[str, str]] = None, body: bytes = b"",
               count: int = 1) -> None:
        """Answer the next `count` requests with `status`, `headers` and `body`, whatever they ask."""
        with self.lock:
            self.scripted.extend([(status, headers or {}, body)] * count)

    def seen(self) -> List[str]:
        """'METHOD path' of every request so far, query left off."""
        with self.lock:
            return ["%s %s" % (r.method, r.path) for r in self.requests]

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    # -- answers -------------------------------------------------------------

    def answer(self, request: Request) -> Tuple[int, Dict[str, str], bytes]:
        if request.path == "/token":
            return self.token(request)
        found = re.match(r"/v2/(.+)/(manifests/([^/]+)|tags/list)\Z", request.path)
        if not found:
            return self.error(404, "NOT_FOUND", "no route")
        name = found.group(1)
        refusal = self.refusal(request, name)
        if refusal:
            return refusal
        if name not in self.repos:
            return self.error(404, "NAME_UNKNOWN", "repository name not known to registry")
        if found.group(3) is not None:
            return self.manifest(name, found.group(3))
        return self.tag_page(request, name)

    def refusal(self, request: Request, name: str) -> Optional[Tuple[int, Dict[str, str], bytes]]:
        """The 401 an unauthorised request gets; None when it may go on."""
        given = request.headers.get("Authorization", "")
        if self.auth == "basic":
            if given == basic(USER, PASSWORD):
                return None
            return self.error(401, "UNAUTHORIZED", "authentication required",
                              {"WWW-Authenticate": 'Basic realm="fake-registry"'})
        if self.auth == "bearer":
            scope = "repository:%s:pull" % name
            with self.lock:
                user, granted = self.tokens.get(given[len("Bearer "):], (None, "")) if \
                    given.startswith("Bearer ") else (None, "")
            if granted == scope and (user or name not in self.private):
                return None
            return self.error(401, "UNAUTHORIZED", "authentication required", {
                "WWW-Authenticate": 'Bearer realm="http://%s/token",service="fake-registry",'
                                    'scope="%s"' % (self.host, scope)})
        return None

    def token(self, request: Request) -> Tuple[int, Dict[str, str], bytes]:
        if request.method == "POST":
            if not self.oauth:
                return 404, {}, b"404 page not found"
            form = request.form
            if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != IDENTITY_TOKEN:
                return self.error(401, "UNAUTHORIZED", "bad refresh token")
            user, params = USER, form
        else:
            given = request.headers.get("Authorization")
            if given not in (None, basic(USER, PASSWORD)):
                return self.error(401, "UNAUTHORIZED", "bad credentials")
            user, params = (USER if given else None), request.query
        token = "tok-%d" % len(self.requests)
        with self.lock:
            self.tokens[token] = (user, params.get("scope", ""))
        doc = {"token": token} if request.method == "GET" else {"access_token": token}
        if self.token_lifetime is not None:
            doc["expires_in"] = self.token_lifetime
        return 200, {"Content-Type": "application/json"}, json.dumps(doc).encode()

    def manifest(self, name: str, tag: str) -> Tuple[int, Dict[str, str], bytes]:
        if tag not in self.repos[name]:
            return self.error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        headers = {"Docker-Content-Digest": self.repos[name][tag],
                   "Content-Type": MANIFEST_TYPES[3]}
        if self.rate_limit:
            headers["ratelimit-remaining"] = self.rate_limit
        return 200, headers, b'{"schemaVersion": 2}'

    def tag_page(self, request: Request, name: str) -> Tuple[int, Dict[str, str], bytes]:
        tags = sorted(self.repos[name])
        last = request.query.get("last")
        if last is not None:
            tags = [tag for tag in tags if tag > last]
        headers = {"Content-Type": "application/json"}
        if self.page_size and len(tags) > self.page_size:
            tags = tags[:self.page_size]
            headers["Link"] = '</v2/%s/tags/list?last=%s&n=%d>; rel="next"' % (
                name, tags[-1], self.page_size)
        return 200, headers, json.dumps({"name": name, "tags": tags}).encode()

    @staticmethod
    def error(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None
              ) -> Tuple[int, Dict[str, str], bytes]:
        return status, dict(headers or {}, **{"Content-Type": "application/json"}), json.dumps(
            {"errors": [{"code": code, "message": message}]}).encode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def login() -> Dict[str, str]:
    return {"username": USER, "password": PASSWORD, "serveraddress": "127.0.0.1"}


def identity() -> Dict[str, str]:
    return {"identitytoken": IDENTITY_TOKEN, "serveraddress": "127.0.0.1"}


class RegistryTestCase(BoundedTestCase):

    def setUp(self) -> None:
        super().setUp()
        self.clock = FakeClock()

    def start(self, **options: Any) -> FakeRegistry:
        self.registry = FakeRegistry(self, **options)
        self.client = RegistryClient(urlopen=NO_PROXY, timeout=5, clock=self.clock)
        self.image = self.registry.host + "/team/app"
        return self.registry

    def refusal(self, call: Any, *args: Any) -> RegistryError:
        """The RegistryError `call(*args)` raises; checked to hold no secret."""
        with self.assertRaises(RegistryError) as caught:
            call(*args)
        error = caught.exception
        for secret in (PASSWORD, IDENTITY_TOKEN, base64.b64encode(PASSWORD.encode()).decode()):
            self.assertNotIn(secret, str(error))
            self.assertNotIn(secret, repr(error.args))
        return error


class ManifestDigestTest(RegistryTestCase):

    def test_the_digest_comes_from_a_head_with_every_manifest_media_type_accepted(self):
        registry = self.start()
        answer = self.client.manifest_digest(self.image, "v2", None)
        self.assertEqual(answer, ManifestAnswer(DIGEST_V2, None))
        self.assertEqual(registry.seen(), ["HEAD /v2/team/app/manifests/v2"])
        accepted = [part.strip() for part in registry.requests[0].headers["Accept"].split(",")]
        self.assertEqual(sorted(accepted), sorted(MANIFEST_TYPES))

    def test_never_a_get_for_a_manifest_even_through_the_token_dance(self):
        registry = self.start(auth="bearer", private=("team/app",))
        self.client.manifest_digest(self.image, "v1", login())
        self.client.manifest_digest(self.image, "v2", login())
        manifests = [seen for seen in registry.seen() if "/manifests/" in seen]
        self.assertTrue(manifests)
        self.assertTrue(all(seen.startswith("HEAD ") for seen in manifests), manifests)

    def test_docker_hubs_remaining_pull_quota_is_passed_on(self):
        registry = self.start()
        registry.rate_limit = "98;w=21600"
        self.assertEqual(self.client.manifest_digest(self.image, "v1", None).rate_limit, "98;w=21600")

    def test_an_unknown_tag_is_named(self):
        self.start()
        error = self.refusal(self.client.manifest_digest, self.image, "v9", None)
        self.assertEqual(error.status, 404)
        self.assertIn("no tag v9 in team/app", str(error))

    def test_a_digest_header_that_is_no_sha256_digest_is_refused(self):
        registry = self.start()
        for bad in ("sha256:" + "1" * 63, "sha512:" + "1" * 128, "sha256:" + "A" * 64, "latest"):
            registry.repos["team/app"]["v1"] = bad
            with self.subTest(bad):
                error = self.refusal(self.client.manifest_digest, self.image, "v1", None)
                self.assertIn("Docker-Content-Digest", str(error))

    def test_no_digest_header_is_refused(self):
        self.start()
        self.registry.script(200, {"Content-Type": MANIFEST_TYPES[3]})
        error = self.refusal(self.client.manifest_digest, self.image, "v1", None)
        self.assertIn("without a sha256 Docker-Content-Digest (none)", str(error))

    def test_only_docker_hub_keeps_one_word_names_under_library(self):
        registry = self.start()
        registry.repos["nginx"] = {"latest": DIGEST_V1}
        self.client.manifest_digest(registry.host + "/nginx", "latest", None)
        self.assertEqual(registry.seen(), ["HEAD /v2/nginx/manifests/latest"])
        self.assertEqual(dockerapi.repository_of("nginx"), "library/nginx")

    def test_a_tag_is_percent_encoded_in_the_path(self):
        registry = self.start()
        self.refusal(self.client.manifest_digest, self.image, "a/b?c", None)
        self.assertEqual(registry.requests[0].target, "/v2/team/app/manifests/a%2Fb%3Fc")


class TokenAuthTest(RegistryTestCase):

    def test_anonymous_token_dance(self):
        registry = self.start(auth="bearer")
        self.assertEqual(self.client.manifest_digest(self.image, "v1", None).digest, DIGEST_V1)
        self.assertEqual(registry.seen(), ["HEAD /v2/team/app/manifests/v1", "GET /token",
                                           "HEAD /v2/team/app/manifests/v1"])
        token_request = registry.requests[1]
        self.assertEqual(token_request.query, {"service": "fake-registry",
                                               "scope": "repository:team/app:pull"})
        self.assertNotIn("Authorization", token_request.headers)
        self.assertTrue(registry.requests[2].headers["Authorization"].startswith("Bearer tok-"))

    def test_token_dance_with_a_user_and_password_sends_them_to_the_token_service_only(self):
        registry = self.start(auth="bearer", private=("team/app",))
        self.assertEqual(self.client.manifest_digest(self.image, "v2", login()).digest, DIGEST_V2)
        self.assertEqual(registry.seen(), ["HEAD /v2/team/app/manifests/v2", "GET /token",
                                           "HEAD /v2/team/app/manifests/v2"])
        self.assertEqual(registry.requests[1].headers["Authorization"], basic(USER, PASSWORD))
        self.assertNotIn("Authorization", registry.requests[0].headers)

    def test_an_identity_token_is_posted_as_an_oauth2_refresh_token(self):
        registry = self.start(auth="bearer", private=("team/app",))
        self.assertEqual(self.client.manifest_digest(self.image, "v1", identity()).digest, DIGEST_V1)
        self.assertEqual(registry.seen(), ["HEAD /v2/team/app/manifests/v1", "POST /token",
                                           "HEAD /v2/team/app/manifests/v1"])
        posted = registry.requests[1]
        self.assertEqual(posted.headers["Content-Type"], "application/x-www-form-urlencoded")
        self.assertEqual(posted.form, {"grant_type": "refresh_token", "refresh_token": IDENTITY_TOKEN,
                                       "client_id": "autodeploy", "service": "fake-registry",
                                       "scope": "repository:team/app:pull"})
        self.assertNotIn("Authorization", posted.headers)

    def test_a_token_service_without_oauth2_is_asked_by_get_instead(self):
        registry = self.start(auth="bearer", oauth=False)
        self.assertEqual(self.client.manifest_digest(self.image, "v1", identity()).digest, DIGEST_V1)
        self.assertEqual(registry.seen(), ["HEAD /v2/team/app/manifests/v1", "POST /token",
                                           "GET /token", "HEAD /v2/team/app/manifests/v1"])
        self.assertNotIn(IDENTITY_TOKEN, registry.requests[2].target)

    def test_a_token_is_reused_until_it_expires(self):
        registry = self.start(auth="bearer", token_lifetime=300)
        self.client.manifest_digest(self.image, "v1", None)
        self.clock.advance(290)
        self.client.manifest_digest(self.image, "v2", None)
        self.client.tags(self.image, None)
        self.assertEqual(registry.seen()[3:], ["HEAD /v2/team/app/manifests/v2",
                                               "GET /v2/team/app/tags/list"])  # no 401, no /token
        self.clock.advance(10)  # 300 s since it came: too close to its end to be sent again
        self.client.manifest_digest(self.image, "v1", None)
        self.assertEqual(registry.seen()[5:], ["GET /token", "HEAD /v2/team/app/manifests/v1"])

    def test_a_token_without_expires_in_lasts_the_specs_60_seconds(self):
        registry = self.start(auth="bearer", token_lifetime=None)
        self.client.manifest_digest(self.image, "v1", None)
        self.clock.advance(50)
        self.client.manifest_digest(self.image, "v1", None)
        self.assertEqual(registry.seen().count("GET /token"), 1)
        self.clock.advance(10)
        self.client.manifest_digest(self.image, "v1", None)
        self.assertEqual(registry.seen().count("GET /token"), 2)

    def test_tokens_are_not_shared_between_logins(self):
        registry = self.start(auth="bearer")
        self.client.manifest_digest(self.image, "v1", None)
        self.client.manifest_digest(self.image, "v1", login())
        token_requests = [r for r in registry.requests if r.path == "/token"]
        self.assertEqual([r.headers.get("Authorization") for r in token_requests],
                         [None, basic(USER, PASSWORD)])

    def test_a_token_the_registry_no_longer_takes_is_replaced_once(self):
        registry = self.start(auth="bearer")
        self.client.manifest_digest(self.image, "v1", None)
        registry.revoke_tokens()
        self.assertEqual(self.client.manifest_digest(self.image, "v2", None).digest, DIGEST_V2)
        self.assertEqual(registry.seen()[3:], ["HEAD /v2/team/app/manifests/v2", "GET /token",
                                               "HEAD /v2/team/app/manifests/v2"])

    def test_refused_credentials_say_so_and_name_the_registry(self):
        registry = self.start(auth="bearer", private=("team/app",))
        wrong = dict(login(), password="not-it")
        error = self.refusal(self.client.manifest_digest, self.image, "v1", wrong)
        self.assertEqual(error.status, 401)
        self.assertIn("token service of %s" % registry.host, str(error))
        self.assertIn("refused the credentials given", str(error))

    def test_a_refused_identity_token_says_so(self):
        self.start(auth="bearer", private=("team/app",))
        error = self.refusal(self.client.manifest_digest, self.image, "v1",
                             dict(identity(), identitytoken="expired"))
        self.assertEqual(error.status, 401)
        self.assertIn("refused the credentials given", str(error))

    def test_a_private_repository_without_credentials_says_none_were_given(self):
        registry = self.start(auth="bearer", private=("team/app",))
        error = self.refusal(self.client.manifest_digest, self.image, "v1", None)
        self.assertEqual(error.status, 401)
        self.assertIn("%s refused an anonymous request (no credentials were given) for team/app"
                      % registry.host, str(error))
        self.assertEqual(registry.seen().count("HEAD /v2/team/app/manifests/v1"), 2)  # no loop

    def test_credentials_never_go_to_a_token_service_on_plain_http_elsewhere(self):
        opener = StubOpener([(401, {"WWW-Authenticate": 'Bearer realm="http://auth.example/token"'})])
        client = RegistryClient(urlopen=opener, clock=self.clock)
        error = self.refusal(client.manifest_digest, "ghcr.io/o/a", "v1", login())
        self.assertIn("plain http (auth.example)", str(error))
        self.assertEqual(opener.urls, ["https://ghcr.io/v2/o/a/manifests/v1"])


class BasicAuthTest(RegistryTestCase):

    def test_a_basic_challenge_is_answered_with_the_user_and_password(self):
        registry = self.start(auth="basic")
        self.assertEqual(self.client.manifest_digest(self.image, "v1", login()).digest, DIGEST_V1)
        self.assertEqual(registry.seen(), ["HEAD /v2/team/app/manifests/v1"] * 2)
        self.assertEqual(registry.requests[1].headers["Authorization"], basic(USER, PASSWORD))
        self.client.tags(self.image, login())  # known to want basic auth: asked at once
        self.assertEqual(registry.seen()[2:], ["GET /v2/team/app/tags/list"])

    def test_basic_auth_without_credentials_says_none_were_given(self):
        registry = self.start(auth="basic")
        error = self.refusal(self.client.manifest_digest, self.image, "v1", None)
        self.assertEqual(error.status, 401)
        self.assertIn("%s asks for a user name and password, and no credentials were given"
                      % registry.host, str(error))

    def test_a_registry_that_stops_asking_for_a_password_is_read_anonymously(self):
        registry = self.start(auth="basic")
        self.refusal(self.client.manifest_digest, self.image, "v1", None)
        registry.auth = "none"
        self.assertEqual(self.client.manifest_digest(self.image, "v1", None).digest, DIGEST_V1)

    def test_a_wrong_password_is_refused_after_one_try(self):
        registry = self.start(auth="basic")
        error = self.refusal(self.client.manifest_digest, self.image, "v1",
                             dict(login(), password="not-it"))
        self.assertIn("refused the credentials given", str(error))
        self.assertEqual(len(registry.requests), 2)


class TagsTest(RegistryTestCase):

    def test_tags_of_one_page(self):
        self.start()
        self.assertEqual(self.client.tags(self.image, None), ["v1", "v2"])

    def test_link_pagination_is_followed(self):
        registry = self.start(page_size=2)
        registry.repos["team/app"] = {tag: DIGEST_V1 for tag in ("a", "b", "c", "d", "e")}
        self.assertEqual(self.client.tags(self.image, None), ["a", "b", "c", "d", "e"])
        self.assertEqual([r.target for r in registry.requests],
                         ["/v2/team/app/tags/list", "/v2/team/app/tags/list?last=b&n=2",
                          "/v2/team/app/tags/list?last=d&n=2"])

    def test_pagination_is_bounded(self):
        registry = self.start(page_size=1)
        registry.repos["team/app"] = {tag: DIGEST_V1 for tag in ("a", "b", "c", "d")}
        error = self.refusal(self.client.tags, self.image, None, 3)
        self.assertIn("more than 3 pages", str(error))
        self.assertEqual(len(registry.requests), 3)

    def test_a_next_page_on_another_host_is_not_followed(self):
        self.start()
        self.registry.script(200, {"Link": '<https://elsewhere.example/v2/x>; rel="next"'},
                             b'{"tags": ["v1"]}')
        error = self.refusal(self.client.tags, self.image, None)
        self.assertIn("another host (elsewhere.example)", str(error))

    def test_pagination_goes_through_the_token_dance(self):
        registry = self.start(auth="bearer", private=("team/app",), page_size=1)
        self.assertEqual(self.client.tags(self.image, login()), ["v1", "v2"])
        self.assertEqual(registry.seen(), ["GET /v2/team/app/tags/list", "GET /token",
                                           "GET /v2/team/app/tags/list", "GET /v2/team/app/tags/list"])

    def test_an_unknown_repository_is_named(self):
        registry = self.start()
        error = self.refusal(self.client.tags, registry.host + "/team/gone", None)
        self.assertEqual(error.status, 404)
        self.assertIn("no repository team/gone on %s" % registry.host, str(error))

    def test_a_tag_list_that_is_not_a_list_of_strings_is_refused(self):
        self.start()
        for body in (b'{"tags": [1, 2]}', b'{"tags": "v1"}', b'["v1"]', b"not json"):
            self.registry.script(200, {}, body)
            with self.subTest(body):
                self.assertIn("not {\"tags\": [strings]}",
                              str(self.refusal(self.client.tags, self.image, None)))

    def test_an_answer_over_the_size_cap_is_refused(self):
        registry = self.start()
        registry.repos["team/app"] = {"t%04d" % n: DIGEST_V1 for n in range(100)}
        with unittest.mock.patch.object(dockerapi, "TAGS_BODY_LIMIT", 300):
            error = self.refusal(self.client.tags, self.image, None)
        self.assertIn("more than 300 bytes", str(error))
        self.assertIsNone(error.status)


class RefusalsTest(RegistryTestCase):

    def test_429_gives_retry_after_in_seconds(self):
        registry = self.start()
        registry.script(429, {"Retry-After": "7", "ratelimit-remaining": "0;w=21600"})
        error = self.refusal(self.client.manifest_digest, self.image, "v1", None)
        self.assertEqual((error.status, error.retry_after), (429, 7.0))
        self.assertIn("pulls left: 0;w=21600", str(error))

    def test_503_gives_retry_after_from_an_http_date(self):
        registry = self.start()
        registry.script(503, {"Retry-After": email.utils.formatdate(self.clock() + 30, usegmt=True)})
        error = self.refusal(self.client.tags, self.image, None)
        self.assertEqual((error.status, error.retry_after), (503, 30.0))

    def test_429_without_retry_after_has_none(self):
        self.start().script(429)
        error = self.refusal(self.client.manifest_digest, self.image, "v1", None)
        self.assertEqual((error.status, error.retry_after), (429, None))

    def test_a_token_service_that_rate_limits_gives_retry_after_too(self):
        registry = self.start(auth="bearer")
        registry.script(401, {"WWW-Authenticate": 'Bearer realm="http://%s/token"' % registry.host})
        registry.script(429, {"Retry-After": "12"})
        error = self.refusal(self.client.manifest_digest, self.image, "v1", None)
        self.assertEqual((error.status, error.retry_after), (429, 12.0))

    def test_a_server_error_carries_the_registrys_message(self):
        self.start()
        self.registry.script(*FakeRegistry.error(500, "UNKNOWN", "storage is on fire"))
        error = self.refusal(self.client.tags, self.image, None)
        self.assertEqual(error.status, 500)
        self.assertIn("UNKNOWN: storage is on fire", str(error))

    def test_redirects_are_not_followed_and_their_query_not_repeated(self):
        self.start().script(307, {"Location": "https://cdn.example/blob?X-Amz-Signature=abc123"})
        error = self.refusal(self.client.manifest_digest, self.image, "v1", None)
        self.assertEqual(error.status, 307)
        self.assertIn("redirected to https://cdn.example/blob", str(error))
        self.assertNotIn("abc123", str(error))
        self.assertEqual(len(self.registry.requests), 1)

    def test_no_answer_has_no_status(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = RegistryClient(urlopen=NO_PROXY, timeout=5)
        error = self.refusal(client.manifest_digest, "127.0.0.1:%d/team/app" % port, "v1", login())
        self.assertEqual((error.status, error.retry_after), (None, None))
        self.assertIn("no answer from 127.0.0.1:%d" % port, str(error))

    def test_a_registry_that_never_answers_times_out(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)  # connections are taken by the kernel, and never answered
            client = RegistryClient(urlopen=NO_PROXY, timeout=0.05)
            error = self.refusal(client.manifest_digest, "127.0.0.1:%d/team/app" % sock.getsockname()[1],
                                 "v1", None)
        self.assertIsNone(error.status)
        self.assertIn("timed out", str(error))

    def test_a_registry_error_is_a_docker_error(self):
        self.assertTrue(issubclass(RegistryError, DockerError))


class AddressesTest(unittest.TestCase):

    def test_https_by_default_and_http_for_loopback_registries(self):
        client = RegistryClient()
        self.assertEqual(client.base_url("nginx"), "https://registry-1.docker.io")
        self.assertEqual(client.base_url("team/app"), "https://registry-1.docker.io")
        self.assertEqual(client.base_url("ghcr.io/o/a"), "https://ghcr.io")
        self.assertEqual(client.base_url("registry.example:5000/team/app"), "https://registry.example:5000")
        for host in ("127.0.0.1:5000", "127.8.9.1", "localhost:5000", "[::1]:5000"):
            self.assertEqual(client.base_url(host + "/app"), "http://" + host)
        self.assertEqual(RegistryClient(insecure=lambda registry: True).base_url("ghcr.io/o/a"),
                         "http://ghcr.io")

    def test_loopback_registries(self):
        for loopback in ("127.0.0.1", "127.0.0.1:5000", "127.255.0.3:80", "localhost",
                         "LOCALHOST:5000", "[::1]:5000", "::1"):
            self.assertTrue(dockerapi.is_loopback_registry(loopback), loopback)
        for other in ("128.0.0.1:5000", "10.0.0.1", "localhost.example.com", "ghcr.io",
                      "[::2]:5000", "docker.io"):
            self.assertFalse(dockerapi.is_loopback_registry(other), other)

    def test_repository_names(self):
        cases = {"nginx": "library/nginx", "team/app": "team/app", "ghcr.io/o/a": "o/a",
                 "registry.example:5000/team/app": "team/app", "localhost/app": "app",
                 "docker.io/nginx": "library/nginx", "index.docker.io/team/app": "team/app",
                 "quay.io/org/sub/app": "org/sub/app"}
        for image, name in cases.items():
            self.assertEqual(dockerapi.repository_of(image), name, image)

    def test_requests_go_to_the_images_registry(self):
        opener = StubOpener([])
        client = RegistryClient(urlopen=opener)
        for image in ("nginx", "ghcr.io/o/a"):
            with self.assertRaises(RegistryError):
                client.manifest_digest(image, "1.27", None)
        self.assertEqual(opener.urls, ["https://registry-1.docker.io/v2/library/nginx/manifests/1.27",
                                       "https://ghcr.io/v2/o/a/manifests/1.27"])

    def test_challenges(self):
        parse = dockerapi.parse_challenge
        hub = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
               'scope="repository:samalba/my-app:pull,push"')
        self.assertEqual(parse([hub], "x"), dockerapi.Challenge(
            "bearer", "https://auth.docker.io/token", "registry.docker.io",
            "repository:samalba/my-app:pull,push"))
        self.assertEqual(parse(['Bearer realm="https://ghcr.io/token"'], "o/a").scope,
                         "repository:o/a:pull")
        self.assertEqual(parse(['Bearer realm=https://q.example/t, service=q, error="a\\"b"'], "o/a"),
                         dockerapi.Challenge("bearer", "https://q.example/t", "q", "repository:o/a:pull"))
        self.assertEqual(parse(['Basic realm="x"', hub], "x").scheme, "bearer")
        self.assertEqual(parse(['basic realm="Registry Realm"'], "x"), dockerapi.Challenge("basic"))
        self.assertIsNone(parse(['Bearer service="no-realm"'], "x"))
        self.assertIsNone(parse(['Negotiate'], "x"))
        self.assertIsNone(parse([], "x"))

    def test_retry_after_values(self):
        parse = dockerapi.parse_retry_after
        self.assertEqual(parse("120", 0.0), 120.0)
        self.assertEqual(parse(email.utils.formatdate(1_000_060, usegmt=True), 1_000_000.0), 60.0)
        self.assertEqual(parse(email.utils.formatdate(1_000_000, usegmt=True), 1_000_060.0), 0.0)
        for unreadable in (None, "", "soon", "-5", "1.5"):
            self.assertIsNone(parse(unreadable, 0.0), unreadable)


class StubOpener:
    """A urlopen answering from `answers` ((status, headers)) in turn, then
    "no answer"; notes each URL."""

    def __init__(self, answers: List[Tuple[int, Dict[str, str]]]):
        self.answers = list(answers)
        self.urls = []  # type: List[str]

    def __call__(self, request: Any, timeout: float) -> Any:
        self.urls.append(request.full_url)
        if not self.answers:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        status, headers = self.answers.pop(0)
        message = email.message.Message()
        for name, value in headers.items():
            message[name] = value
        raise urllib.error.HTTPError(request.full_url, status, "stub", message, None)


class RecordingProxyTest(RegistryTestCase):

    def test_it_forwards_and_records_each_request(self):
        registry = self.start(auth="basic")
        with RecordingProxy("http://" + registry.host) as proxy:
            image = proxy.host + "/team/app"
            self.assertEqual(self.client.manifest_digest(image, "v2", login()).digest, DIGEST_V2)
            self.assertEqual(self.client.tags(image, login()), ["v1", "v2"])
            self.assertEqual(proxy.requests, [("HEAD", "/v2/team/app/manifests/v2")] * 2 + [
                ("GET", "/v2/team/app/tags/list")])
            self.assertEqual([status for _, _, _, status in proxy.hits], [401, 200, 200])
        self.assertEqual(registry.seen(), ["%s %s" % pair for pair in proxy.requests])
        self.assertEqual(registry.requests[1].headers["Authorization"], basic(USER, PASSWORD))
        self.assertEqual(registry.requests[1].headers["Host"], proxy.host)

    def test_it_answers_429_with_retry_after_when_told(self):
        registry = self.start()
        with RecordingProxy("http://" + registry.host) as proxy:
            proxy.throttle(2, retry_after=9)
            image = proxy.host + "/team/app"
            for _ in range(2):
                error = self.refusal(self.client.manifest_digest, image, "v1", None)
                self.assertEqual((error.status, error.retry_after), (429, 9.0))
            self.assertEqual(self.client.manifest_digest(image, "v1", None).digest, DIGEST_V1)
            self.assertEqual([status for _, _, _, status in proxy.hits], [429, 429, 200])
        self.assertEqual(registry.seen(), ["HEAD /v2/team/app/manifests/v1"])


if __name__ == "__main__":
    unittest.main()
