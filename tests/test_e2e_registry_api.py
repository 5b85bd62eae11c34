"""End to end: dockerapi's registry client against a real `docker-registry`.

Images pushed with the docker CLI; the client's manifest digest of each tag
is the digest `docker push` left in the image's RepoDigests, and its tag
list is what was pushed. Through tests/support.py's RecordingProxy the
manifest request is a HEAD (a GET would count against Docker Hub's pull
quota), a 429 with Retry-After from the proxy comes back as
RegistryError.retry_after, and the Engine can pull through the proxy.
Behind htpasswd basic auth (the registry of test_e2e_private_registry)
the credentials `docker login` wrote are used, and none, or a wrong
password, are refused. Loopback only; every wait is bounded.
"""

import json
import shutil
import tempfile
import unittest

import dockerapi
from dockerapi import RegistryClient, RegistryError
from tests import support
from tests.test_e2e_private_registry import PASSWORD, USER, PrivateRegistry

# Never through a proxy: the registries here are on loopback.
CLIENT = RegistryClient(urlopen=dockerapi.registry_opener(use_proxy_env=False), timeout=10)


def repo_digests(ref: str) -> list:
    """The RepoDigests ("name@sha256:...") `docker inspect` gives for `ref`."""
    return json.loads(support.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout)


class RegistryApiTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        support.start_class_fixture(cls)
        cls.addClassCleanup(support.stop_class_fixture, cls)
        cls.ref = "%s/e2e/registry-api" % cls.registry.host
        support.make_versions(cls.images, cls.ref, ("v1", "v2"))

    @support.skip_on_podman("Podman's RepoDigests name the manifest it built before pushing, "
                            "not the one the registry stores")
    def test_manifest_digest_is_the_digest_docker_push_recorded(self):
        digests = set()
        for version in ("v1", "v2"):
            answer = CLIENT.manifest_digest(self.ref, version, None)
            self.assertIn("%s@%s" % (self.ref, answer.digest), repo_digests("%s:%s" % (self.ref, version)))
            self.assertIsNone(answer.rate_limit)
            digests.add(answer.digest)
        self.assertEqual(len(digests), 2)

    def test_tags_lists_the_pushed_tags(self):
        self.assertEqual(sorted(CLIENT.tags(self.ref, None)), ["v1", "v2"])

    def test_an_unknown_tag_and_repository_are_named(self):
        with self.assertRaises(RegistryError) as caught:
            CLIENT.manifest_digest(self.ref, "v9", None)
        self.assertEqual(caught.exception.status, 404)
        self.assertIn("no tag v9 in e2e/registry-api", str(caught.exception))
        with self.assertRaises(RegistryError) as caught:
            CLIENT.tags(self.registry.host + "/e2e/nothing-here", None)
        self.assertEqual(caught.exception.status, 404)

    def test_through_a_recording_proxy_the_manifest_request_is_a_head(self):
        with support.RecordingProxy(self.registry.url) as proxy:
            through = "%s/e2e/registry-api" % proxy.host
            direct = CLIENT.manifest_digest(self.ref, "v2", None).digest
            self.assertEqual(CLIENT.manifest_digest(through, "v2", None).digest, direct)
            self.assertEqual(proxy.requests, [("HEAD", "/v2/e2e/registry-api/manifests/v2")])

    def test_the_engine_pulls_through_a_recording_proxy(self):
        with support.RecordingProxy(self.registry.url) as proxy:
            through = "%s/e2e/registry-api:v1" % proxy.host
            self.images.append(through)
            support.docker("pull", through)
            self.assertIn("%s@%s" % (through.rpartition(":")[0], CLIENT.manifest_digest(
                self.ref, "v1", None).digest), repo_digests(through))
            self.assertIn("/v2/e2e/registry-api/manifests/v1", [path for _, path in proxy.requests])

    def test_a_429_with_retry_after_comes_back_as_retry_after(self):
        with support.RecordingProxy(self.registry.url) as proxy:
            through = "%s/e2e/registry-api" % proxy.host
            proxy.throttle(1, retry_after=7)
            with self.assertRaises(RegistryError) as caught:
                CLIENT.manifest_digest(through, "v1", None)
            self.assertEqual((caught.exception.status, caught.exception.retry_after), (429, 7.0))
            CLIENT.manifest_digest(through, "v1", None)
            self.assertEqual([status for _, _, _, status in proxy.hits], [429, 200])


class PrivateRegistryApiTest(unittest.TestCase):
    """The same behind htpasswd basic auth, with the credentials `docker login` wrote."""

    @classmethod
    def setUpClass(cls):
        cls.env = support.engine_env()
        cls.images = []
        cls.registry = PrivateRegistry()
        cls.addClassCleanup(cls.registry.stop)
        cls.addClassCleanup(support.cleanup_images, cls.images)
        cls.registry.start()
        cls.folder = tempfile.mkdtemp(prefix="autodeploy-registry-api-")
        cls.addClassCleanup(shutil.rmtree, cls.folder, True)
        support.registry_login(cls.folder, cls.registry.host, USER, PASSWORD)
        cls.ref = "%s/e2e/private-api" % cls.registry.host
        support.make_versions(cls.images, cls.ref, ("v1",), push=False)
        support.docker("--config", cls.folder, "push", cls.ref + ":v1")

    def test_the_docker_login_credentials_read_the_digest_and_tags(self):
        found = dockerapi.find_registry_auth(self.ref, self.folder + "/config.json")
        self.assertIsNotNone(found.auth, found.source)
        answer = CLIENT.manifest_digest(self.ref, "v1", found.auth)
        self.assertRegex(answer.digest, r"\Asha256:[0-9a-f]{64}\Z")
        if not support.is_podman():  # Podman's RepoDigests name the manifest before the push
            self.assertIn("%s@%s" % (self.ref, answer.digest), repo_digests(self.ref + ":v1"))
        self.assertEqual(CLIENT.tags(self.ref, found.auth), ["v1"])

    def test_no_credentials_and_a_wrong_password_are_refused_without_the_secret(self):
        for auth, said in ((None, "no credentials were given"),
                           (dockerapi.login_auth(self.ref, USER, "wrong-" + PASSWORD),
                            "refused the credentials given")):
            with self.subTest(said):
                with self.assertRaises(RegistryError) as caught:
                    CLIENT.manifest_digest(self.ref, "v1", auth)
                self.assertEqual(caught.exception.status, 401)
                self.assertIn(said, str(caught.exception))
                self.assertNotIn(PASSWORD, str(caught.exception))


if __name__ == "__main__":
    unittest.main()
