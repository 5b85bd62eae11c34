"""Unit tests: the samples registries really send (../shared/payloads, from
the repository root, when that folder is present) are each accepted with
the pushes written down here, or refused for the reason written down here.

A sample with no expectation here fails the test: a new one is looked at,
not passed over. The samples are read, never copied into the project.
"""

import os
import re
import unittest
from typing import Any, Dict, List, Tuple, Union

from autodeploy import PayloadError, parse_request

PAYLOADS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "payloads")
UNDERSTOOD = "not a push from a sender autodeploy understands"

# What each sample is sent with, where the README of the samples names it.
HEADERS = {
    "github-package-ghcr.json": {"X-GitHub-Event": "package"},
    "github-package-published-octokit.json": {"X-GitHub-Event": "package"},
    "github-registry-package-published-octokit.json": {"X-GitHub-Event": "registry_package"},
    "github-registry-package.json": {"X-GitHub-Event": "registry_package"},
    "distribution-notification-push.json": {
        "Content-Type": "application/vnd.docker.distribution.events.v2+json"},
    "gitlab-registry-notification-push.json": {
        "Content-Type": "application/vnd.docker.distribution.events.v1+json"},
}

Pushes = List[Tuple[str, str, str]]  # (repository, tag, digest) of each push
Refusal = Tuple[int, str]  # (status, a fragment of the reason)

D = "sha256:"
EXPECTED: Dict[str, Tuple[str, Union[Pushes, Refusal]]] = {
    # Docker Hub: no digest, ever.
    "dockerhub-push.json": ("dockerhub", [("svendowideit/testhook", "latest", "")]),
    "dockerhub-push-2.json": ("dockerhub", [("bluebrown/busybox", "latest", "")]),
    "dockerhub-push-3.json": ("dockerhub", [("karolisr/keel", "0.1.7", "")]),
    "dockerhub-push-4.json": ("dockerhub", [("spaceone/plugin-dockerhub-mon-webhook", "v1.0.0", "")]),
    # Quay: one push per updated tag, no digest; 2013's object of tags too.
    "quay-push.json": ("quay", [("dgangaia/test", "latest", "")]),
    "quay-push-2.json": ("quay", [("mynamespace/repository", "1.2.3", "")]),
    "quay-push-legacy-2013.json": ("quay", [("devtable/ubuntu", "latest", "")]),
    # Harbor: by digest, the tag is the digest, so there is no tag.
    "harbor-push.json": ("harbor", [("test-webhook/debian", "latest",
                                     D + "8a9e9863dbb6e10edb5adfe917c00da84e1700fa76e7ed02476aa6e6fb8ee0d8")]),
    "harbor-push-2.json": ("harbor", [("library/rumput", "v1",
                                       D + "76525f02955aec223342400a080c73024c995c9db1ba2eabf7505cf3bdf3f1f0")]),
    "harbor-push-by-digest.json": ("harbor", [(
        "harbor/alpine", "", D + "954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4")]),
    "harbor-push-cloudevents.jsonc": ("harbor", [(
        "harbor/alpine", "", D + "954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4")]),
    "harbor-push-legacy-pushimage.json": ("harbor", [(
        "library/ai-rag", "1.2.3", D + "b4758aaed11c155a476b9857e1178f157759c99cb04c907a04993f5481eff848")]),
    # GitHub: ghcr.io names images in lower case.
    "github-package-ghcr.json": ("github", [(
        "utaitebox/utaitebox-server", "3.2.1",
        D + "7d3848ba2f2e7f69bebb4b576e5fad0379b64a0b1512aee6ad0ec9e7c6319fed")]),
    # octokit's curated examples carry a 40-digit "digest": refused, never pulled.
    "github-package-published-octokit.json": (
        "github", (400, "package.package_version.container_metadata.tag.digest is not a valid digest")),
    "github-registry-package-published-octokit.json": (
        "github", (400, "registry_package.package_version.container_metadata.tag.digest is not a valid digest")),
    # The retired docker.pkg.github.com registry sent no container_metadata.
    "github-registry-package.json": ("github", (400, "only container images on ghcr.io are understood")),
    # ACR: the current docs' sample has "xxxx" in its digest.
    "azure-acr-push.json": ("acr", (400, "target.digest is not a valid digest")),
    "azure-acr-push-2.json": ("acr", [(
        "hello-world", "v1", D + "80f0d5c8786bb9e621a45ece0db56d11cdc624ad20da9fe62e9d25490f331d7d")]),
    "azure-acr-push-3.json": ("acr", [(
        "hello-world", "test-v1", D + "c766679d161d4ffe3dc4503b4c9f90b978f0d363fcedb02d1ae0cd271e645c0a")]),
    # JFrog: the path under Artifactory's repository path access method.
    "jfrog-push.json": ("jfrog", [(
        "docker-remote-cache/library/ubuntu", "latest",
        D + "35c4a2c15539c6c1e4e5fa4e554dac323ad0107d8eb5c582d6ff386b383b7dce")]),
    # distribution: the manifest push only (by digest here), not the two blob pushes.
    "distribution-notification-push.json": ("distribution", [(
        "library/test", "", D + "fea8895f450959fa676bcc1df0611ea93823a735a01205fd8622846041d0c7cf")]),
    "gitlab-registry-notification-push.json": ("distribution", [(
        "foo/bar", "1.6.1", D + "4afff550708506c5b8b7384ad10d401a02b29ed587cb2730cb02753095b5178d")]),
    # Not webhooks autodeploy takes (README, Senders): named as what they are.
    "aws-ecr-eventbridge-push.json": ("", (400, "an Amazon ECR event from EventBridge")),
    "google-artifact-registry-pubsub-push.json": ("", (400, "a Google Artifact Registry Pub/Sub message")),
    "google-artifact-registry-pubsub-push-digest-only.json": (
        "", (400, "a Google Artifact Registry Pub/Sub message")),
    # Other tools' own formats: the native one is {"image", "tag", "digest"}.
    "generic-keel-native.json": ("", (400, UNDERSTOOD)),
    "generic-kobold.json": ("", (400, UNDERSTOOD)),
}

# Hosts the accepted samples name, checked apart from the (repository, tag, digest) above.
HOSTS = {"quay-push.json": "quay.io", "harbor-push-2.json": "hb.nicolas.my.id",
         "harbor-push-by-digest.json": "localhost", "github-package-ghcr.json": "ghcr.io",
         "azure-acr-push-3.json": "mojrodevops.azurecr.io", "jfrog-push.json": "example.jfrog.io",
         "gitlab-registry-notification-push.json": "registry.git.erxes.io",
         "distribution-notification-push.json": "registrycluster.local"}


def without_comments(raw: bytes) -> bytes:
    """A .jsonc sample as JSON: its whole-line // comments dropped."""
    return re.sub(rb"(?m)^[ \t]*//[^\n]*\n", b"", raw)


def read_sample(name: str) -> bytes:
    with open(os.path.join(PAYLOADS, name), "rb") as fh:
        raw = fh.read()
    return without_comments(raw) if name.endswith(".jsonc") else raw


@unittest.skipUnless(os.path.isdir(PAYLOADS), "no ../shared/payloads next to the repository")
class PayloadSamplesTest(unittest.TestCase):

    def samples(self) -> List[str]:
        return sorted(name for name in os.listdir(PAYLOADS) if name.endswith((".json", ".jsonc")))

    def test_every_sample_has_an_expectation(self):
        self.assertEqual(sorted(set(self.samples()) - set(EXPECTED)), [])

    def test_every_expectation_has_its_sample(self):
        self.assertEqual(sorted(set(EXPECTED) - set(self.samples())), [])

    def test_each_sample_is_accepted_or_refused_as_written_down(self):
        for name in self.samples():
            if name not in EXPECTED:
                continue  # test_every_sample_has_an_expectation fails for it
            sender, expected = EXPECTED[name]
            with self.subTest(name=name):
                if isinstance(expected, list):
                    self.assertAccepted(name, sender, expected)
                else:
                    self.assertRefused(name, sender, expected)

    def test_the_same_with_the_sender_named_in_the_url(self):
        for name, (sender, expected) in EXPECTED.items():
            if not sender or name not in self.samples():
                continue
            with self.subTest(name=name):
                if isinstance(expected, list):
                    self.assertAccepted(name, sender, expected, explicit=True)
                else:
                    self.assertRefused(name, sender, expected, explicit=True)

    def test_hosts(self):
        for name, host in HOSTS.items():
            with self.subTest(name=name):
                parsed = parse_request(read_sample(name), HEADERS.get(name, {}))
                self.assertEqual({push.host for push in parsed.pushes}, {host})

    def test_ignored_events_are_noted(self):
        parsed = parse_request(read_sample("distribution-notification-push.json"),
                               HEADERS["distribution-notification-push.json"])
        self.assertEqual(parsed.ignored, ["blob push of library/test", "blob push of library/test"])

    def assertAccepted(self, name: str, sender: str, expected: Any, explicit: bool = False) -> None:
        parsed = parse_request(read_sample(name), HEADERS.get(name, {}), sender if explicit else None)
        self.assertEqual(parsed.sender, sender)
        self.assertEqual([push[:3] for push in parsed.pushes], expected)
        self.assertEqual({push.sender for push in parsed.pushes}, {sender})

    def assertRefused(self, name: str, sender: str, expected: Any, explicit: bool = False) -> None:
        status, fragment = expected
        with self.assertRaises(PayloadError) as caught:
            parse_request(read_sample(name), HEADERS.get(name, {}), sender if explicit else None)
        self.assertEqual(caught.exception.status, status)
        self.assertIn(fragment, caught.exception.message)


if __name__ == "__main__":
    unittest.main()
