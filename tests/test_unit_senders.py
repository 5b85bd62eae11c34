"""Unit tests: what each sender's webhook says was pushed (parse_request),
which sender a request to /deploy/<token> comes from, what is ignored,
and what is refused.

The fixtures are small dict literals written from each sender's documented
fields; the real samples in ../shared/payloads are checked by
test_unit_payload_samples.
"""

import json
import random
import unittest
from typing import Any, Dict, List, Optional

from autodeploy import (MAX_IGNORED_NOTES, MAX_PUSHES, SENDER_NAMES, Parsed, PayloadError, Push,
                        parse_request, split_reference)

DIGEST = "sha256:" + "0123456789abcdef" * 4
OTHER_DIGEST = "sha256:" + "fedcba9876543210" * 4
V2 = "application/vnd.docker.distribution.manifest.v2+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
BAD_DIGESTS = ["sha256:" + "0" * 63, "sha256:" + "0" * 65, "sha256:" + "0" * 60,
               "sha256:xxxxd5c8786bb9e621a45ece0dbxxxx1cdc624ad20da9fe62e9d25490f33xxxx",
               "sha256:" + "A" * 64, "sha512:" + "0" * 128, "0" * 64, "sha256:", "sha256:6ec128e26cd5...",
               "sha256:" + "0" * 63 + "\n"]


def body(doc: Dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def parse(doc: Dict[str, Any], headers: Optional[Dict[str, str]] = None,
          sender: Optional[str] = None) -> Parsed:
    return parse_request(body(doc), headers or {}, sender)


def hub(repo: str = "team/app", tag: str = "v1", **extra: Any) -> Dict[str, Any]:
    return dict({"push_data": {"tag": tag, "pusher": "me"}, "repository": {"repo_name": repo}}, **extra)


def quay(tags: Any = ("v1",), docker_url: Optional[str] = "quay.io/team/app") -> Dict[str, Any]:
    doc = {"repository": "team/app", "namespace": "team", "name": "app",
           "updated_tags": list(tags) if isinstance(tags, tuple) else tags}
    if docker_url is not None:
        doc["docker_url"] = docker_url
    return doc


def harbor(kind: str = "PUSH_ARTIFACT", resources: Optional[List[Dict[str, Any]]] = None,
           repo: str = "team/app") -> Dict[str, Any]:
    resources = [{"digest": DIGEST, "tag": "v1", "resource_url": "harbor.example:8443/team/app:v1"}] \
        if resources is None else resources
    return {"type": kind, "occur_at": 1700000000, "operator": "admin",
            "event_data": {"resources": resources,
                           "repository": {"name": repo.split("/")[-1], "namespace": repo.split("/")[0],
                                          "repo_full_name": repo, "repo_type": "private"}}}


def harbor_cloudevent(kind: str = "harbor.artifact.pushed", event_id: Any = "66e18103-09c1-41f6") \
        -> Dict[str, Any]:
    legacy = harbor()
    return {"specversion": "1.0", "id": event_id, "source": "/projects/2/webhook/policies/15",
            "type": kind, "datacontenttype": "application/json", "data": legacy["event_data"],
            "operator": "admin"}


def github(event: str = "package", tag: str = "v1", digest: str = DIGEST,
           package_url: Optional[str] = "ghcr.io/Team/App:v1", action: str = "published",
           package_type: str = "CONTAINER") -> Dict[str, Any]:
    version = {"id": 1, "name": digest, "container_metadata": {"tag": {"name": tag, "digest": digest}}}
    if package_url is not None:
        version["package_url"] = package_url
    return {"action": action,
            event: {"id": 7, "name": "App", "namespace": "Team", "package_type": package_type,
                    "ecosystem": package_type, "owner": {"login": "Team"}, "package_version": version}}


GITHUB_HEADERS = {"X-GitHub-Event": "package", "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}


def acr(action: str = "push", tag: Optional[str] = "v1", digest: str = DIGEST,
        host: str = "myregistry.azurecr.io") -> Dict[str, Any]:
    target = {"mediaType": V2, "size": 524, "digest": digest, "length": 524, "repository": "team/app"}
    if tag is not None:
        target["tag"] = tag
    return {"id": "cb8c3971-9adc-488b-bdd8-43cbb4974ff5", "timestamp": "2023-11-17T16:52:01Z",
            "action": action, "target": target,
            "request": {"id": "3cbb6949", "host": host, "method": "PUT"}}


def jfrog(event_type: str = "pushed", domain: str = "docker", sha256: str = DIGEST[7:],
          origin: Optional[str] = "https://example.jfrog.io") -> Dict[str, Any]:
    doc = {"domain": domain, "event_type": event_type,
           "data": {"repo_key": "docker-local", "event_type": event_type,
                    "path": "team/app/v1/manifest.json", "name": "manifest.json", "sha256": sha256,
                    "size": 1206, "image_name": "team/app", "tag": "v1"},
           "subscription_key": "deploys"}
    if origin is not None:
        doc["jpd_origin"] = origin
    return doc


def event(action: str = "push", media_type: str = V2, tag: Optional[str] = "v1", digest: str = DIGEST,
          repo: str = "team/app", event_id: str = "e-1", host: str = "127.0.0.1:5000") -> Dict[str, Any]:
    target = {"mediaType": media_type, "digest": digest, "size": 1, "length": 1, "repository": repo,
              "url": "http://%s/v2/%s/manifests/%s" % (host, repo, digest)}
    if tag is not None:
        target["tag"] = tag
    return {"id": event_id, "timestamp": "2024-01-02T15:04:05Z", "action": action, "target": target,
            "request": {"id": "r-1", "addr": "10.0.0.9", "host": host, "method": "PUT",
                        "useragent": "docker/27"},
            "actor": {"name": "ci"}, "source": {"addr": "registry:5000"}}


DISTRIBUTION_HEADERS = {"Content-Type": "application/vnd.docker.distribution.events.v1+json"}


class SenderTestCase(unittest.TestCase):

    def assertRefused(self, doc: Any, fragment: str, headers: Optional[Dict[str, str]] = None,
                      sender: Optional[str] = None, status: int = 400) -> PayloadError:
        raw = doc if isinstance(doc, bytes) else body(doc)
        with self.assertRaises(PayloadError) as caught:
            parse_request(raw, headers or {}, sender)
        self.assertEqual(caught.exception.status, status, caught.exception.message)
        self.assertIn(fragment, caught.exception.message)
        return caught.exception

    def assertPushes(self, parsed: Parsed, sender: str, *expected: Push) -> None:
        self.assertEqual(parsed.sender, sender)
        self.assertEqual(parsed.pushes, list(expected))


class DockerHubTest(SenderTestCase):

    def test_a_push(self):
        doc = hub(callback_url="https://registry.hub.docker.com/u/team/app/hook/1/")
        self.assertPushes(parse(doc), "dockerhub",
                          Push("team/app", "v1", callback_url="https://registry.hub.docker.com/u/team/app/hook/1/"))

    def test_no_digest_no_host_no_delivery(self):
        push = parse(hub()).pushes[0]
        self.assertEqual((push.digest, push.host, push.delivery, push.callback_url), ("", "", "", None))

    def test_a_name_with_a_host_is_refused_with_the_form_expected(self):
        error = self.assertRefused(hub("127.0.0.1:5000/nc/web"), "repository.repo_name is not a valid "
                                                                  "repository name")
        self.assertIn('"127.0.0.1:5000/nc/web"', error.message)
        self.assertIn("team/app", error.message)


class QuayTest(SenderTestCase):

    def test_one_push_per_updated_tag_with_the_host_of_docker_url(self):
        self.assertPushes(parse(quay(["latest", "v1"])), "quay",
                          Push("team/app", "latest", sender="quay", host="quay.io"),
                          Push("team/app", "v1", sender="quay", host="quay.io"))

    def test_updated_tags_as_2013s_object_of_tag_to_image_id(self):
        doc = quay({"latest": "b750fe79269d2ec9", "v1": "b750fe79269d2ec9"})
        self.assertEqual([p.tag for p in parse(doc).pushes], ["latest", "v1"])

    def test_a_self_hosted_quay_with_a_port(self):
        push = parse(quay(docker_url="quay.example:8443/team/app")).pushes[0]
        self.assertEqual((push.host, push.repository), ("quay.example:8443", "team/app"))

    def test_repository_when_there_is_no_docker_url(self):
        self.assertEqual(parse(quay(docker_url=None)).pushes, [Push("team/app", "v1", sender="quay")])

    def test_no_tag_updated_is_ignored(self):
        parsed = parse(quay([]))
        self.assertEqual((parsed.pushes, parsed.ignored), ([], ["Quay push of team/app naming no tag"]))

    def test_malformed(self):
        self.assertRefused(quay("latest"), "updated_tags is not a list")
        self.assertRefused(quay(["ok", "a/b"]), "updated_tags[1] is not a valid tag")
        self.assertRefused(quay(["ok", 3]), "updated_tags[1] is not a valid tag")
        self.assertRefused(quay(docker_url="quay.io/Team/App"), "docker_url is not a valid repository")
        self.assertRefused(quay(docker_url="bad_host.io:x/team/app"), "docker_url is not a valid registry host")
        self.assertRefused(dict(quay(), docker_url=5), "docker_url is not a string")
        self.assertRefused({"updated_tags": ["v1"]}, "no repository in the payload")
        self.assertRefused({"repository": "team/app", "docker_url": "quay.io/team/app"}, "no updated_tags",
                           sender="quay")


class HarborTest(SenderTestCase):

    def test_push_artifact(self):
        self.assertPushes(parse(harbor()), "harbor",
                          Push("team/app", "v1", DIGEST, "harbor", host="harbor.example:8443"))

    def test_harbor_1_push_image(self):
        self.assertEqual(parse(harbor("pushImage")).pushes[0].tag, "v1")

    def test_a_push_by_digest_names_the_digest_as_the_tag_and_has_no_tag(self):
        url = "harbor.example/team/app@" + DIGEST
        for digest in (DIGEST, ""):
            with self.subTest(digest=digest):
                doc = harbor(resources=[{"digest": digest, "tag": DIGEST, "resource_url": url}])
                self.assertPushes(parse(doc), "harbor",
                                  Push("team/app", "", DIGEST, "harbor", host="harbor.example"))

    def test_cloudevents_form_with_its_event_id(self):
        self.assertPushes(parse(harbor_cloudevent()), "harbor",
                          Push("team/app", "v1", DIGEST, "harbor", host="harbor.example:8443",
                               delivery="66e18103-09c1-41f6"))

    def test_one_push_per_resource(self):
        doc = harbor(resources=[{"digest": DIGEST, "tag": "v1"}, {"digest": OTHER_DIGEST, "tag": "latest"}])
        self.assertEqual([(p.tag, p.digest, p.host) for p in parse(doc).pushes],
                         [("v1", DIGEST, ""), ("latest", OTHER_DIGEST, "")])

    def test_other_events_are_ignored(self):
        for kind in ("PULL_ARTIFACT", "DELETE_ARTIFACT", "SCANNING_COMPLETED", "QUOTA_EXCEED",
                     "pullImage", "REPLICATION"):
            with self.subTest(kind=kind):
                self.assertEqual(parse(harbor(kind)), Parsed("harbor", [], ["Harbor %s event of team/app" % kind]))
        parsed = parse(harbor_cloudevent("harbor.artifact.pulled"))
        self.assertEqual(parsed.ignored, ["Harbor harbor.artifact.pulled event of team/app"])

    def test_malformed(self):
        self.assertRefused(harbor(resources=[]), "event_data.resources lists no artifact")
        self.assertRefused(harbor(resources=["x"]), "event_data.resources[0] is not an object")
        self.assertRefused(harbor(resources=[{"digest": DIGEST, "tag": "v1"}, {"tag": ""}]),
                           "no event_data.resources[1].tag in the payload, and no digest")
        self.assertRefused(harbor(resources=[{"tag": "v1", "digest": "sha256:xxxx"}]),
                           "event_data.resources[0].digest is not a valid digest")
        self.assertRefused(harbor(resources=[{"tag": "sha256:abc"}]),
                           "event_data.resources[0].tag is not a valid digest")
        self.assertRefused(harbor(repo="Team/App"), "event_data.repository.repo_full_name is not a valid")
        self.assertRefused({"type": "PUSH_ARTIFACT", "event_data": {"resources": []}},
                           "no event_data.repository.repo_full_name")
        self.assertRefused({"type": "PUSH_ARTIFACT", "event_data": []}, "no event_data object", sender="harbor")
        self.assertRefused(harbor_cloudevent(event_id="a b"), "id is not a valid delivery id")
        self.assertRefused(harbor_cloudevent(event_id=None), "id is not a valid delivery id")


class GitHubTest(SenderTestCase):

    def test_a_package_event_on_ghcr(self):
        self.assertPushes(parse(github(), GITHUB_HEADERS), "github",
                          Push("team/app", "v1", DIGEST, "github", host="ghcr.io",
                               delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958"))

    def test_a_registry_package_event(self):
        headers = dict(GITHUB_HEADERS, **{"X-GitHub-Event": "registry_package"})
        self.assertEqual(parse(github("registry_package"), headers).pushes[0].repository, "team/app")

    def test_an_empty_tag_name_is_a_push_by_digest(self):
        push = parse(github(tag="", package_url="ghcr.io/Team/App:"), GITHUB_HEADERS).pushes[0]
        self.assertEqual((push.repository, push.tag, push.digest), ("team/app", "", DIGEST))

    def test_the_image_is_owner_and_name_without_a_package_url(self):
        push = parse(github(package_url=None), GITHUB_HEADERS).pushes[0]
        self.assertEqual((push.host, push.repository), ("ghcr.io", "team/app"))

    def test_a_package_named_with_a_path(self):
        push = parse(github(package_url="ghcr.io/team/app/worker:v1"), GITHUB_HEADERS).pushes[0]
        self.assertEqual(push.repository, "team/app/worker")

    def test_detected_without_the_headers(self):
        parsed = parse(github())
        self.assertEqual((parsed.sender, parsed.pushes[0].delivery), ("github", ""))

    def test_ping_other_events_and_other_packages_are_ignored(self):
        cases = [({"zen": "Design for failure.", "hook_id": 1}, {"X-GitHub-Event": "ping"}, "GitHub ping"),
                 ({"zen": "Design for failure.", "hook_id": 1}, {}, "GitHub ping"),
                 ({"ref": "refs/heads/main"}, {"X-GitHub-Event": "push"}, "GitHub push event"),
                 (github(package_type="npm"), GITHUB_HEADERS,
                  "GitHub package event published of a non-container package"),
                 (github(action="deleted"), GITHUB_HEADERS, "GitHub package event deleted of App")]
        for doc, headers, note in cases:
            with self.subTest(note=note):
                self.assertEqual(parse(doc, headers), Parsed("github", [], [note]))

    def test_updated_and_the_2021_beta_create_are_pushes(self):
        for action in ("updated", "create"):
            with self.subTest(action=action):
                self.assertEqual(len(parse(github(action=action), GITHUB_HEADERS).pushes), 1)

    def test_malformed(self):
        self.assertRefused(github(digest="sha256:" + "6c62fb45" * 5), "container_metadata.tag.digest is not a "
                                                                    "valid digest", GITHUB_HEADERS)
        self.assertRefused(github(tag="", digest=""), "no package.package_version.container_metadata.tag.name "
                                                      "in the payload, and no digest", GITHUB_HEADERS)
        doc = github()
        del doc["package"]["package_version"]["container_metadata"]
        self.assertRefused(doc, "only container images on ghcr.io", GITHUB_HEADERS)
        self.assertRefused({"action": "published"}, "no package object", GITHUB_HEADERS)
        doc = github(package_url=None)
        del doc["package"]["owner"], doc["package"]["namespace"]
        self.assertRefused(doc, "nor package.owner.login and package.name", GITHUB_HEADERS)
        self.assertRefused(github(package_url="ghcr.io/team/app!:v1"), "package_url is not a valid repository",
                           GITHUB_HEADERS)
        self.assertRefused(github(), "X-GitHub-Delivery is not a valid delivery id",
                           dict(GITHUB_HEADERS, **{"X-GitHub-Delivery": "x" * 200}))

    def test_a_form_encoded_delivery_says_what_to_change(self):
        headers = dict(GITHUB_HEADERS, **{"Content-Type": "application/x-www-form-urlencoded"})
        self.assertRefused(b"payload=%7B%7D", "set the webhook's content type to application/json", headers)


class AcrTest(SenderTestCase):

    def test_a_push(self):
        self.assertPushes(parse(acr()), "acr", Push("team/app", "v1", DIGEST, "acr", host="myregistry.azurecr.io",
                                                    delivery="cb8c3971-9adc-488b-bdd8-43cbb4974ff5"))

    def test_a_push_by_digest(self):
        self.assertEqual(parse(acr(tag=None)).pushes[0][:3], ("team/app", "", DIGEST))

    def test_ping_delete_and_chart_events_are_ignored(self):
        cases = [({"id": "1", "timestamp": "2023-11-17T16:52:01Z", "action": "ping"}, "ACR ping"),
                 (acr("delete"), "ACR delete of team/app"), (acr("chart_push"), "ACR chart_push of team/app")]
        for doc, note in cases:
            with self.subTest(note=note):
                self.assertEqual(parse(doc), Parsed("acr", [], [note]))

    def test_malformed(self):
        self.assertRefused(acr(digest=BAD_DIGESTS[3]), "target.digest is not a valid digest")
        self.assertRefused(acr(tag=None, digest=""), "no target.tag in the payload, and no digest")
        self.assertRefused(acr(host="my registry"), "request.host is not a valid registry host")
        self.assertRefused({"action": "push", "target": {}}, "no target.repository", sender="acr")
        self.assertRefused({"action": 1, "target": {}}, "action is not a string", sender="acr")


class JfrogTest(SenderTestCase):

    def test_a_pushed_docker_tag(self):
        self.assertPushes(parse(jfrog()), "jfrog",
                          Push("docker-local/team/app", "v1", DIGEST, "jfrog", host="example.jfrog.io"))

    def test_the_host_of_a_self_hosted_origin_and_a_prefixed_sha256(self):
        push = parse(jfrog(sha256=DIGEST, origin="http://artifactory.lan:8082/")).pushes[0]
        self.assertEqual((push.host, push.digest), ("artifactory.lan:8082", DIGEST))
        self.assertEqual(parse(jfrog(origin=None)).pushes[0].host, "")
        self.assertEqual(parse(jfrog(origin="example.jfrog.io")).pushes[0].host, "example.jfrog.io")

    def test_detected_by_its_header(self):
        doc = {"domain": "docker", "event_type": "pushed"}
        self.assertRefused(doc, "no data object", {"X-JFrog-Event-Auth": "x"})

    def test_other_events_and_domains_are_ignored(self):
        self.assertEqual(parse(jfrog("deleted")), Parsed("jfrog", [], ["JFrog docker event deleted of team/app"]))
        self.assertEqual(parse(jfrog("promoted")).ignored, ["JFrog docker event promoted of team/app"])
        self.assertEqual(parse(jfrog("deployed", "artifact")).ignored, ["JFrog artifact event deployed"])

    def test_malformed(self):
        self.assertRefused(jfrog(sha256="0" * 63), "data.sha256 is not a valid digest")
        self.assertRefused(jfrog(origin="https://bad host/"), "jpd_origin is not a valid registry host")
        doc = jfrog()
        doc["data"]["repo_key"] = "Docker-Local"
        self.assertRefused(doc, "data.repo_key and data.image_name is not a valid repository")
        doc = jfrog()
        del doc["data"]["tag"]
        self.assertRefused(doc, "no data.tag in the payload")


class DistributionTest(SenderTestCase):

    def test_only_manifest_pushes_are_acted_on(self):
        doc = {"events": [event(media_type=LAYER, tag=None, event_id="e-0"), event(event_id="e-1"),
                          event("pull", event_id="e-2"), event("delete", event_id="e-3"),
                          event(media_type="application/vnd.docker.container.image.v1+json", tag=None)]}
        parsed = parse(doc, DISTRIBUTION_HEADERS)
        self.assertPushes(parsed, "distribution",
                          Push("team/app", "v1", DIGEST, "distribution", host="127.0.0.1:5000", delivery="e-1"))
        self.assertEqual(parsed.ignored, ["blob push of team/app", "pull of team/app", "delete of team/app",
                                          "blob push of team/app"])

    def test_every_image_manifest_type_and_a_push_by_digest(self):
        for media_type in (V2, "application/vnd.docker.distribution.manifest.list.v2+json",
                           "application/vnd.oci.image.manifest.v1+json",
                           "application/vnd.oci.image.index.v1+json"):
            with self.subTest(media_type=media_type):
                push = parse({"events": [event(media_type=media_type, tag=None)]}).pushes[0]
                self.assertEqual(push[:3], ("team/app", "", DIGEST))

    def test_several_pushes_in_one_request_each_with_its_id(self):
        doc = {"events": [event(tag="v1", event_id="a"), event(tag="latest", event_id="b", digest=OTHER_DIGEST)]}
        self.assertEqual([(p.tag, p.digest, p.delivery) for p in parse(doc).pushes],
                         [("v1", DIGEST, "a"), ("latest", OTHER_DIGEST, "b")])

    def test_detected_by_content_type_v1_and_v2_or_by_shape(self):
        for headers in (DISTRIBUTION_HEADERS,
                        {"content-type": "application/vnd.docker.distribution.events.v2+json; charset=utf-8"}, {}):
            with self.subTest(headers=headers):
                self.assertEqual(parse({"events": [event()]}, headers).sender, "distribution")
        self.assertRefused({"events": "x"}, "no events list", DISTRIBUTION_HEADERS)

    def test_other_manifest_types_are_named(self):
        doc = {"events": [event(media_type="application/vnd.docker.distribution.manifest.v1+prettyjws")]}
        self.assertEqual(parse(doc).ignored, ["push of team/app of type "
                                              "application/vnd.docker.distribution.manifest.v1+prettyjws"])

    def test_a_request_of_ignored_events_only(self):
        parsed = parse({"events": [event("pull"), event(media_type=LAYER)]})
        self.assertEqual((parsed.pushes, parsed.ignored), ([], ["pull of team/app", "blob push of team/app"]))
        self.assertEqual(parse({"events": []}).ignored, ["no events"])

    def test_one_malformed_event_refuses_the_whole_request(self):
        for bad, fragment in ((event(digest="sha256:abc"), "events[1].target.digest is not a valid digest"),
                              (event(repo="../etc"), "events[1].target.repository is not a valid"),
                              (event(tag="-x"), "events[1].target.tag is not a valid tag"),
                              (event(host="a b"), "events[1].request.host is not a valid registry host"),
                              (event(event_id="\n"), "events[1].id is not a valid delivery id"),
                              ("push", "events[1] is not an object"),
                              ({"target": {}}, "no events[1].action in the payload")):
            with self.subTest(fragment=fragment):
                self.assertRefused({"events": [event(), bad]}, fragment)

    def test_ignored_events_are_not_checked_but_are_shown_printable(self):
        parsed = parse({"events": [event("pull", repo="evil\nrepo", digest="xxxx")]})
        self.assertEqual(parsed.ignored, ["pull of evil\\x0arepo"])

    def test_limits(self):
        many = {"events": [event(event_id="e%d" % i) for i in range(MAX_PUSHES + 1)]}
        self.assertRefused(many, "more than %d pushes in one request" % MAX_PUSHES)
        self.assertEqual(len(parse({"events": many["events"][:MAX_PUSHES]}).pushes), MAX_PUSHES)
        blobs = parse({"events": [event(media_type=LAYER)] * (MAX_IGNORED_NOTES + 5)})
        self.assertEqual(blobs.ignored[-1], "and 5 more")
        self.assertEqual(len(blobs.ignored), MAX_IGNORED_NOTES + 1)


class NativeTest(SenderTestCase):

    def test_an_image_with_a_registry_host_and_port(self):
        doc = {"image": "127.0.0.1:5000/nc/web", "tag": "v2", "digest": DIGEST}
        self.assertPushes(parse(doc), "native", Push("nc/web", "v2", DIGEST, "native", host="127.0.0.1:5000"))

    def test_other_hosts(self):
        for image, host, repository in (("team/app", "", "team/app"), ("localhost/app", "localhost", "app"),
                                        ("registry.example/team/app", "registry.example", "team/app"),
                                        ("[::1]:5000/team/app", "[::1]:5000", "team/app")):
            with self.subTest(image=image):
                push = parse({"image": image, "tag": "v1"}).pushes[0]
                self.assertEqual((push.host, push.repository), (host, repository))

    def test_a_tag_or_a_digest_or_both_and_a_callback(self):
        self.assertEqual(parse({"image": "team/app", "digest": DIGEST}).pushes[0][:3], ("team/app", "", DIGEST))
        doc = {"image": "team/app", "tag": "v1", "callback_url": "https://ci.example/cb"}
        self.assertEqual(parse(doc).pushes[0].callback_url, "https://ci.example/cb")

    def test_malformed(self):
        self.assertRefused({"image": "team/app"}, "no tag in the payload, and no digest")
        self.assertRefused({"image": "team/app:v1"}, 'image names a tag or a digest: give them as "tag"')
        self.assertRefused({"image": "team/app@" + DIGEST, "tag": "v1"}, "image names a tag or a digest")
        self.assertRefused({"image": "team/app", "tag": "v1", "digets": DIGEST},
                           'unknown field "digets": the fields are image, tag, digest, callback_url')
        self.assertRefused({"image": "Team/App", "tag": "v1"}, "image is not a valid repository name")
        self.assertRefused({"image": "bad_host:1/app", "tag": "v1"}, "image is not a valid registry host")
        self.assertRefused({"image": "team/app", "tag": "v1", "callback_url": 1}, "callback_url is not a string")


class DetectionTest(SenderTestCase):

    def test_every_sender_is_detected_from_its_own_body(self):
        bodies = {"dockerhub": hub(), "quay": quay(), "harbor": harbor(), "github": github(), "acr": acr(),
                  "jfrog": jfrog(), "distribution": {"events": [event()]},
                  "native": {"image": "team/app", "tag": "v1"}}
        self.assertEqual(sorted(bodies), sorted(SENDER_NAMES))
        for name, doc in bodies.items():
            with self.subTest(sender=name):
                self.assertEqual(parse(doc).sender, name)
                self.assertEqual(parse(doc, sender=name).sender, name)

    def test_sender_names(self):
        self.assertEqual(SENDER_NAMES, ("dockerhub", "quay", "harbor", "github", "acr", "jfrog", "distribution",
                                        "native"))

    def test_an_unknown_sender_name_is_404_naming_the_known_ones(self):
        error = self.assertRefused(hub(), "no sender is named \"gitlab\": the senders are dockerhub, quay, ",
                                   sender="gitlab", status=404)
        self.assertIn("native", error.message)

    def test_json_from_no_known_sender_is_400_naming_the_senders(self):
        for doc in ({}, {"name": "gcr.io/x/app", "tag": "1"}, {"registry": "r", "repository": "app", "tag": "1"},
                    {"events": {}}, {"action": "push"}):
            with self.subTest(doc=doc):
                error = self.assertRefused(doc, "not a push from a sender autodeploy understands (dockerhub, ")
                self.assertIn("native; see the README, Senders)", error.message)

    def test_cloud_events_that_are_not_webhooks_are_named(self):
        self.assertRefused({"source": "aws.ecr", "detail-type": "ECR Image Action", "detail": {}},
                           "an Amazon ECR event from EventBridge")
        self.assertRefused({"action": "INSERT", "digest": "us-docker.pkg.dev/p/r/app@" + DIGEST},
                           "a Google Artifact Registry Pub/Sub message")
        self.assertRefused({"message": {"data": "e30="}, "subscription": "projects/p/subscriptions/s"},
                           "a Google Artifact Registry Pub/Sub message")

    def test_an_explicit_sender_reads_its_own_fields_only(self):
        self.assertRefused(hub(), "no updated_tags in the payload", sender="quay")
        self.assertRefused(quay(), "no repository.repo_name in the payload", sender="dockerhub")
        self.assertRefused(hub(), "no events list", sender="distribution")
        self.assertRefused(acr(), 'unknown field "action"', sender="native")

    def test_headers_come_first(self):
        self.assertEqual(parse(hub(), {"x-github-event": "ping"}).ignored, ["GitHub ping"])
        self.assertRefused(hub(), "no events list", {"Content-Type": DISTRIBUTION_HEADERS["Content-Type"]})

    def test_not_json_object(self):
        for raw, fragment in ((b"", "not JSON"), (b"\xff", "not UTF-8"), (b"[]", "not a JSON object"),
                              (b'{"a": 1, "a": 2}', "duplicate key"), (b"[" * 100000, "")):
            for sender in (None, "native", "distribution"):
                with self.subTest(raw=raw[:10], sender=sender):
                    self.assertRefused(raw, fragment, sender=sender)


class SplitReferenceTest(unittest.TestCase):

    def test_the_first_component_is_a_host_when_docker_reads_it_as_one(self):
        cases = [("127.0.0.1:5000/nc/web", ("127.0.0.1:5000", "nc/web")), ("nc/web", ("", "nc/web")),
                 ("localhost/web", ("localhost", "web")), ("localhost:5000/a/b", ("localhost:5000", "a/b")),
                 ("ghcr.io/o/n", ("ghcr.io", "o/n")), ("web", ("", "web")), ("docker.io/library/nginx",
                                                                              ("docker.io", "library/nginx"))]
        for reference, expected in cases:
            with self.subTest(reference=reference):
                self.assertEqual(split_reference(reference, "image"), expected)

    def test_a_bad_host_is_refused(self):
        for reference in ("a b.io/x", "-x.io/x", "x.io:port/x", "x.io:123456/x", "[zz]:1/x", ".:1/x"):
            with self.subTest(reference=reference), self.assertRaises(PayloadError):
                split_reference(reference, "image")


class MalformedDigestTest(SenderTestCase):

    def test_every_sender_refuses_a_malformed_digest(self):
        makers = {"harbor": lambda d: harbor(resources=[{"digest": d, "tag": "v1"}]),
                  "github": lambda d: github(digest=d), "acr": lambda d: acr(digest=d),
                  "jfrog": lambda d: jfrog(sha256=d), "distribution": lambda d: {"events": [event(digest=d)]},
                  "native": lambda d: {"image": "team/app", "tag": "v1", "digest": d}}
        for sender, make in makers.items():
            for digest in BAD_DIGESTS:
                if sender == "jfrog" and digest == "0" * 64:
                    continue  # JFrog's own form: data.sha256 is the bare hex
                with self.subTest(sender=sender, digest=digest):
                    self.assertRefused(make(digest), "is not a valid digest", sender=sender)

    def test_a_digest_that_is_not_a_string(self):
        self.assertRefused({"image": "team/app", "tag": "v1", "digest": ["x"]}, "digest is not a string")


class RobustnessTest(SenderTestCase):
    """Whatever a body holds, each parser answers Parsed or PayloadError, never a crash."""

    VALUES = [None, True, 0, -1, 1.5, "", "x", "team/app", "v1", DIGEST, "sha256:zz", "\u00e9\ud800", [], {},
              ["v1"], {"v1": "x"}, [{}], "push", "ping", "PUSH_ARTIFACT", "docker", "pushed", V2, "a" * 300]

    def mutations(self, doc: Any, rng: random.Random) -> Any:
        if isinstance(doc, dict):
            return {key: (rng.choice(self.VALUES) if rng.random() < 0.2 else self.mutations(value, rng))
                    for key, value in doc.items() if rng.random() > 0.05}
        if isinstance(doc, list):
            return [self.mutations(value, rng) for value in doc]
        return rng.choice(self.VALUES) if rng.random() < 0.2 else doc

    def test_mutated_bodies_of_every_sender(self):
        rng = random.Random(13)
        seeds = [hub(), quay(), harbor(), harbor_cloudevent(), github(), acr(), jfrog(),
                 {"events": [event(), event(media_type=LAYER)]}, {"image": "team/app", "tag": "v1"}]
        for _ in range(300):
            for seed in seeds:
                doc = self.mutations(seed, rng)
                raw = json.dumps(doc).encode("utf-8", "surrogatepass")
                for sender in (None, rng.choice(SENDER_NAMES)):
                    try:
                        parsed = parse_request(raw, GITHUB_HEADERS if "package" in doc else {}, sender)
                    except PayloadError as exc:
                        self.assertIn(exc.status, (400, 404))
                        continue
                    for push in parsed.pushes:
                        self.assertTrue(push.tag or push.digest, (doc, push))
                    for note in parsed.ignored:
                        self.assertNotRegex(note, r"[\x00-\x1f\x7f]")


if __name__ == "__main__":
    unittest.main()
