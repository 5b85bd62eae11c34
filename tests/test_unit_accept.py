"""Unit tests: what one webhook request becomes, through the in-process
server (its service not started, so accepted jobs stay queued): the
sender named in the path or detected, several pushes in one request with
one status, events to ignore, redeliveries, pushes no app follows."""

import json
import unittest

from tests.unit_support import GLOBAL_TOKEN, ServerTestCase, hub_body, sign

DISTRIBUTION = "application/vnd.docker.distribution.events.v1+json"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DIGEST = "sha256:" + "3f" * 32


def registry_event(event_id: str, repository: str, tag: str = "latest", action: str = "push",
                   media_type: str = MANIFEST) -> dict:
    """One event of a distribution registry's notification, from its documented fields."""
    return {"id": event_id, "timestamp": "2026-12-02T10:00:00Z", "action": action,
            "target": {"mediaType": media_type, "digest": DIGEST, "size": 708, "length": 708,
                       "repository": repository, "url": "http://127.0.0.1:5000/v2/x", "tag": tag},
            "request": {"id": "r-" + event_id, "addr": "127.0.0.1:4000", "host": "127.0.0.1:5000",
                        "method": "PUT", "useragent": "docker/20.10"},
            "actor": {}, "source": {"addr": "registry:5000", "instanceID": "i-1"}}


def notification(*events: dict) -> bytes:
    return json.dumps({"events": list(events)}).encode()


class AcceptTest(ServerTestCase):

    def setUp(self):
        super().setUp()
        self.start_server()

    def post_events(self, *events: dict, path: str = "/deploy/" + GLOBAL_TOKEN):
        return self.post(path, notification(*events), {"Content-Type": DISTRIBUTION})

    def test_a_registry_notification_queues_its_manifest_push_and_ignores_the_rest(self):
        status, doc, _ = self.post_events(
            registry_event("e1", "team/api", action="push", media_type="application/octet-stream"),
            registry_event("e2", "team/api"),
            registry_event("e3", "team/api", action="pull"))
        self.assertEqual(status, 202, doc)
        self.assertEqual((doc["app"], doc["tag"]), ("team/api", "latest"))
        self.assertEqual(len(doc["ignored"]), 2)
        self.assertEqual(self.service.queue.depth(), 1)

    def test_a_request_with_only_events_to_ignore_is_200_and_queues_nothing(self):
        status, doc, _ = self.post_events(registry_event("e1", "team/api", action="pull"))
        self.assertEqual(status, 200, doc)
        self.assertTrue(doc["ignored"])
        self.assertEqual(self.service.queue.depth(), 0)

    def test_a_redelivered_event_is_answered_as_a_duplicate_not_deployed_twice(self):
        self.assertEqual(self.post_events(registry_event("e9", "team/api"))[0], 202)
        status, doc, _ = self.post_events(registry_event("e9", "team/api"))
        self.assertEqual(status, 200, doc)
        self.assertIn("accepted already", " ".join(doc["ignored"]))
        self.assertEqual(len(self.service.job_list()), 1)

    def test_a_registry_is_never_refused_for_a_repository_nobody_follows(self):
        # A refused event would be retried by the registry, holding back every later one.
        status, doc, _ = self.post_events(registry_event("e1", "team/other"))
        self.assertEqual(status, 200, doc)
        self.assertIn("[team/other]", " ".join(doc["ignored"]))

    def test_the_sender_can_be_named_in_the_path(self):
        status, doc, _ = self.post("/deploy/dockerhub/" + GLOBAL_TOKEN, hub_body("team/api"))
        self.assertEqual(status, 202, doc)
        status, doc, _ = self.post("/deploy/quay/" + GLOBAL_TOKEN, hub_body("team/api"))
        self.assertEqual(status, 400, doc)  # a Docker Hub body is no Quay payload

    def test_an_unknown_sender_in_the_path_is_404_naming_the_known_ones(self):
        status, doc, _ = self.post("/deploy/nexus/" + GLOBAL_TOKEN, hub_body("team/api"))
        self.assertEqual(status, 404, doc)
        self.assertIn("distribution", doc["error"])

    def test_json_from_no_known_sender_is_400_naming_the_senders(self):
        status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, b'{"hello": "world"}')
        self.assertEqual(status, 400, doc)
        self.assertIn("dockerhub", doc["error"])

    def test_a_push_naming_a_registry_host_matches_on_its_path(self):
        body = json.dumps({"image": "127.0.0.1:5000/team/api", "tag": "latest"}).encode()
        status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, body)
        self.assertEqual((status, doc.get("app")), (202, "team/api"))

    def test_a_push_no_app_follows_is_422_naming_the_section_it_would_need(self):
        body = json.dumps({"image": "127.0.0.1:5000/nc/web", "tag": "latest"}).encode()
        status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, body)
        self.assertEqual(status, 422, doc)
        self.assertIn("[nc/web]", doc["error"])
        self.assertIn("127.0.0.1:5000/nc/web", doc["error"])

    def test_a_push_by_digest_alone_has_no_tag_to_follow_and_is_acknowledged(self):
        body = json.dumps({"image": "team/api", "digest": DIGEST}).encode()
        status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, body)
        self.assertEqual(status, 200, doc)
        self.assertIn("no tag", " ".join(doc["ignored"]))

    def test_a_malformed_digest_is_400(self):
        body = json.dumps({"image": "team/api", "tag": "latest", "digest": "sha256:xxxx"}).encode()
        status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, body)
        self.assertEqual(status, 400, doc)
        self.assertEqual(self.service.queue.depth(), 0)


class SignedAcceptTest(ServerTestCase):

    SECRET = "a-signing-secret-" + "9" * 16

    def setUp(self):
        super().setUp()
        self.start_server(signing_secret=self.SECRET)

    def github_ping(self, signature: str) -> tuple:
        body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
        return self.post("/deploy/" + GLOBAL_TOKEN, body,
                         {"X-GitHub-Event": "ping", "X-GitHub-Delivery": "d-1",
                          "X-Hub-Signature-256": signature(body)})

    def test_a_signed_github_ping_is_acknowledged_with_nothing_queued(self):
        status, doc, _ = self.github_ping(lambda body: sign(self.SECRET, body))
        self.assertEqual(status, 200, doc)
        self.assertEqual(self.service.queue.depth(), 0)

    def test_a_registry_notification_needs_its_configured_authorization_header(self):
        body = notification(registry_event("e1", "team/api"))
        status, _, _ = self.post("/deploy/" + GLOBAL_TOKEN, body, {"Content-Type": DISTRIBUTION})
        self.assertEqual(status, 401)
        status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, body,
                                   {"Content-Type": DISTRIBUTION,
                                    "Authorization": "Bearer " + self.SECRET})
        self.assertEqual(status, 202, doc)


if __name__ == "__main__":
    unittest.main()
