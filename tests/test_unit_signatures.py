"""Unit tests: `signing_secret` (global and per app) and what it asks of
each sender: GitHub's X-Hub-Signature-256 (also for Docker Hub, Quay and
the native format, through a signing proxy), JFrog's X-JFrog-Event-Auth,
and the Authorization header Harbor, ACR and the distribution registry are
configured to send."""

import hashlib
import hmac
import io
import http.client
import unittest

from autodeploy import (ANY_APP, SENDER_NAMES, ConfigError, PayloadError, Push, check_sender, load_config,
                        signature_ok, signature_problem)
from tests.unit_support import (APP_SECRET, GLOBAL_SECRET, GLOBAL_TOKEN, ServerTestCase, hub_body,
                                make_apps, make_config, sign, write_config)

BODY = b'{"events": []}'


def jfrog_signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def received(headers: dict) -> http.client.HTTPMessage:
    """Headers as http.server parses them (Latin-1, case-insensitive)."""
    text = "".join("%s: %s\r\n" % item for item in headers.items())
    return http.client.parse_headers(io.BytesIO(text.encode("latin-1") + b"\r\n"))


class SignatureTest(ServerTestCase):

    def test_global_secret(self):
        self.start_server(signing_secret=GLOBAL_SECRET)
        body = hub_body()
        cases = [({"X-Hub-Signature-256": sign(GLOBAL_SECRET, body)}, 202),
                 ({}, 401),
                 ({"X-Hub-Signature-256": ""}, 401),
                 ({"X-Hub-Signature-256": "sha256=" + "0" * 64}, 401),
                 ({"X-Hub-Signature-256": sign(GLOBAL_SECRET + "x", body)}, 401),
                 ({"X-Hub-Signature-256": sign(GLOBAL_SECRET, hub_body(tag="v2"))}, 401),
                 ({"X-Hub-Signature-256": sign(GLOBAL_SECRET, body + b" ")}, 401),
                 ({"X-Hub-Signature-256": sign(GLOBAL_SECRET, body)[7:]}, 401),
                 ({"X-Hub-Signature": "sha1=" + hmac.new(GLOBAL_SECRET.encode(), body,
                                                         hashlib.sha1).hexdigest()}, 401)]
        for headers, expected in cases:
            with self.subTest(headers=headers):
                status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, body, headers)
                self.assertEqual(status, expected, doc)
                if expected == 401:
                    self.assertIn("X-Hub-Signature-256", doc["error"])
        self.assertEqual(self.service.queue.depth(), 1)

    def test_per_app_secret_replaces_the_global_one_for_that_app(self):
        apps = make_apps()
        apps["myname/myrepo"] = apps["myname/myrepo"]._replace(signing_secret=APP_SECRET)
        self.start_server(apps=apps, signing_secret=GLOBAL_SECRET)
        mine, api = hub_body("myname/myrepo"), hub_body("team/api")
        for body, secret, expected in ((mine, APP_SECRET, 202), (mine, GLOBAL_SECRET, 401),
                                       (mine, None, 401), (api, GLOBAL_SECRET, 202),
                                       (api, APP_SECRET, 401), (api, None, 401)):
            with self.subTest(body=body, secret=secret):
                headers = {"X-Hub-Signature-256": sign(secret, body)} if secret else {}
                self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, body, headers)[0], expected)

    def test_per_app_secret_without_a_global_one(self):
        apps = make_apps()
        apps["myname/myrepo"] = apps["myname/myrepo"]._replace(signing_secret=APP_SECRET)
        self.start_server(apps=apps)
        mine = hub_body("myname/myrepo")
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, mine)[0], 401)
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, mine,
                                   {"X-Hub-Signature-256": sign(APP_SECRET, hub_body("team/api"))})[0], 401)
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, mine,
                                   {"X-Hub-Signature-256": sign(APP_SECRET, mine)})[0], 202)
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body("team/api"))[0], 202)

    def test_a_wrong_token_is_404_before_any_signature_check(self):
        self.start_server(signing_secret=GLOBAL_SECRET)
        body = hub_body()
        self.assertEqual(self.post("/deploy/" + "x" * 40, body,
                                   {"X-Hub-Signature-256": sign(GLOBAL_SECRET, body)})[0], 404)

    def test_signature_ok(self):
        body = b'{"a": 1}'
        good = sign(GLOBAL_SECRET, body)
        self.assertTrue(signature_ok(GLOBAL_SECRET, body, good))
        self.assertTrue(signature_ok(GLOBAL_SECRET, body, " ".join([good[:7], good[7:].upper()])
                                     .replace(" ", "")))
        for header in (None, "", "sha256=", good[7:], "sha1=" + good[7:], good + "0", good[:-1],
                       "sha256=" + "\u00e9" * 64, "sha256=" + "z" * 64, sign(GLOBAL_SECRET, body + b"\n")):
            with self.subTest(header=header):
                self.assertFalse(signature_ok(GLOBAL_SECRET, body, header))

    def test_a_missing_signature_says_which_header(self):
        self.start_server(signing_secret=GLOBAL_SECRET)
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body())[1],
                         {"error": "missing X-Hub-Signature-256"})

    def test_short_signing_secret_is_a_config_error(self):
        for text in ("[autodeploy]\nsigning_secret = short\n",
                     "[autodeploy]\n[myname/myrepo]\nsigning_secret = short\n"):
            with self.subTest(text=text), self.assertRaises(ConfigError):
                load_config(write_config(self, text), environ={})


class SignatureSchemeTest(unittest.TestCase):
    """signature_problem(): None, or the reason for a 401, per sender."""

    def assertScheme(self, senders, cases):
        for sender in senders:
            for headers, expected in cases:
                with self.subTest(sender=sender, headers=headers):
                    self.assertEqual(signature_problem(sender, GLOBAL_SECRET, BODY, received(headers)), expected)
                    self.assertEqual(signature_problem(sender, GLOBAL_SECRET, BODY, headers), expected)

    def test_every_sender_has_a_scheme(self):
        for sender in SENDER_NAMES:
            with self.subTest(sender=sender):
                self.assertIsNotNone(signature_problem(sender, GLOBAL_SECRET, BODY, {}))

    def test_github_scheme_for_github_docker_hub_quay_and_native(self):
        good = sign(GLOBAL_SECRET, BODY)
        self.assertScheme(("github", "dockerhub", "quay", "native", "cli"), [
            ({"X-Hub-Signature-256": good}, None),
            ({"x-hub-signature-256": good.upper().replace("SHA256=", "sha256=")}, None),
            ({}, "missing X-Hub-Signature-256"),
            ({"X-Hub-Signature-256": ""}, "bad X-Hub-Signature-256"),
            ({"X-Hub-Signature-256": sign(GLOBAL_SECRET, BODY + b" ")}, "bad X-Hub-Signature-256"),
            ({"X-Hub-Signature-256": good[7:]}, "bad X-Hub-Signature-256"),
            ({"Authorization": GLOBAL_SECRET}, "missing X-Hub-Signature-256"),
            ({"X-JFrog-Event-Auth": GLOBAL_SECRET}, "missing X-Hub-Signature-256")])

    def test_jfrog_the_secret_itself_or_the_hmac_of_the_body(self):
        signed = jfrog_signature(GLOBAL_SECRET, BODY)
        self.assertScheme(("jfrog",), [
            ({"X-JFrog-Event-Auth": GLOBAL_SECRET}, None),
            ({"X-JFrog-Event-Auth": signed}, None),
            ({"X-JFrog-Event-Auth": signed.upper()}, None),
            ({"x-jfrog-event-auth": " %s " % GLOBAL_SECRET}, None),
            ({}, "missing X-JFrog-Event-Auth"),
            ({"X-JFrog-Event-Auth": ""}, "bad X-JFrog-Event-Auth"),
            ({"X-JFrog-Event-Auth": GLOBAL_SECRET + "x"}, "bad X-JFrog-Event-Auth"),
            ({"X-JFrog-Event-Auth": jfrog_signature(GLOBAL_SECRET, BODY + b" ")}, "bad X-JFrog-Event-Auth"),
            ({"X-JFrog-Event-Auth": jfrog_signature(APP_SECRET, BODY)}, "bad X-JFrog-Event-Auth"),
            ({"X-JFrog-Event-Auth": "sha256=" + signed}, "bad X-JFrog-Event-Auth"),
            ({"X-Hub-Signature-256": sign(GLOBAL_SECRET, BODY)}, "missing X-JFrog-Event-Auth")])

    def test_authorization_header_for_harbor_acr_and_distribution(self):
        self.assertScheme(("harbor", "acr", "distribution"), [
            ({"Authorization": GLOBAL_SECRET}, None),
            ({"authorization": "Bearer " + GLOBAL_SECRET}, None),
            ({}, "missing Authorization"),
            ({"Authorization": ""}, "bad Authorization"),
            ({"Authorization": "Bearer"}, "bad Authorization"),
            ({"Authorization": "Basic " + GLOBAL_SECRET}, "bad Authorization"),
            ({"Authorization": "bearer  " + GLOBAL_SECRET + "x"}, "bad Authorization"),
            ({"Authorization": GLOBAL_SECRET[:-1]}, "bad Authorization"),
            ({"Authorization": "\u00e9" + GLOBAL_SECRET}, "bad Authorization"),
            ({"X-Hub-Signature-256": sign(GLOBAL_SECRET, BODY)}, "missing Authorization")])

    def test_a_header_in_latin_1_or_beyond_is_refused_not_a_crash(self):
        for sender in SENDER_NAMES:
            for value in ("\u00e9" * 64, "sha256=" + "\u00e9" * 64, "\u20ac" + GLOBAL_SECRET):
                headers = {"X-Hub-Signature-256": value, "X-JFrog-Event-Auth": value, "Authorization": value}
                with self.subTest(sender=sender, value=value):
                    self.assertIn("bad", signature_problem(sender, GLOBAL_SECRET, BODY, headers))

    def test_a_secret_beyond_ascii_matches_its_utf_8_bytes_as_sent(self):
        secret = "s\u00e9cret-" + "x" * 16
        headers = received({"Authorization": secret.encode("utf-8").decode("latin-1")})
        self.assertIsNone(signature_problem("harbor", secret, BODY, headers))


class CheckSenderTest(unittest.TestCase):

    def test_the_token_scope_comes_before_any_signature(self):
        config = make_config(signing_secret=GLOBAL_SECRET)
        push = Push("team/api", "latest", sender="harbor")
        with self.assertRaises(PayloadError) as caught:
            check_sender(config, push, frozenset(["myname/myrepo"]), BODY, {"Authorization": GLOBAL_SECRET})
        self.assertEqual((caught.exception.status, caught.exception.message), (404, "not found"))

    def test_each_sender_is_checked_in_its_own_scheme(self):
        config = make_config(signing_secret=GLOBAL_SECRET)
        cases = [("harbor", {"Authorization": GLOBAL_SECRET}, None),
                 ("harbor", {"X-Hub-Signature-256": sign(GLOBAL_SECRET, BODY)}, "missing Authorization"),
                 ("jfrog", {"X-JFrog-Event-Auth": jfrog_signature(GLOBAL_SECRET, BODY)}, None),
                 ("jfrog", {"Authorization": GLOBAL_SECRET}, "missing X-JFrog-Event-Auth"),
                 ("github", {"X-Hub-Signature-256": sign(GLOBAL_SECRET, BODY)}, None),
                 ("distribution", {"Authorization": "Bearer " + GLOBAL_SECRET}, None),
                 ("acr", {"Authorization": "Bearer x"}, "bad Authorization")]
        for sender, headers, problem in cases:
            with self.subTest(sender=sender, headers=headers):
                push = Push("team/api", "latest", sender=sender)
                if problem is None:
                    check_sender(config, push, ANY_APP, BODY, headers)
                    continue
                with self.assertRaises(PayloadError) as caught:
                    check_sender(config, push, ANY_APP, BODY, headers)
                self.assertEqual((caught.exception.status, caught.exception.message), (401, problem))

    def test_the_app_secret_replaces_the_global_one(self):
        apps = make_apps()
        apps["team/api"] = apps["team/api"]._replace(signing_secret=APP_SECRET)
        config = make_config(apps=apps, signing_secret=GLOBAL_SECRET)
        push = Push("team/api", "latest", sender="harbor")
        check_sender(config, push, ANY_APP, BODY, {"Authorization": APP_SECRET})
        with self.assertRaises(PayloadError):
            check_sender(config, push, ANY_APP, BODY, {"Authorization": GLOBAL_SECRET})

    def test_no_secret_no_check(self):
        check_sender(make_config(), Push("team/api", "latest", sender="jfrog"), ANY_APP, BODY, {})


if __name__ == "__main__":
    unittest.main()
