"""Unit tests: `signing_secret` (global and per app) and the
X-Hub-Signature-256 header it asks for."""

import hashlib
import hmac
import unittest

from autodeploy import ConfigError, load_config, signature_ok
from tests.unit_support import (APP_SECRET, GLOBAL_SECRET, GLOBAL_TOKEN, ServerTestCase, hub_body,
                                make_apps, sign, write_config)


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

    def test_short_signing_secret_is_a_config_error(self):
        for text in ("[autodeploy]\nsigning_secret = short\n",
                     "[autodeploy]\n[myname/myrepo]\nsigning_secret = short\n"):
            with self.subTest(text=text), self.assertRaises(ConfigError):
                load_config(write_config(self, text), environ={})


if __name__ == "__main__":
    unittest.main()
