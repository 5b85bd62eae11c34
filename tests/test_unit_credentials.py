"""Unit tests: the credentials a pull uses (an app's registry_user, else the
Docker config file), what pull() does with them, and what `check` says."""

import base64
import contextlib
import io
import json
import logging
import unittest

import autodeploy
import dockerapi
from autodeploy import DeployFailed
from dockerapi import DockerError
from tests.unit_support import app_config, temp_folder, web_config, write_file

SECRET = "s3cr3t-Pa55"  # never to be seen in a message or a log line
NO_ENGINE = "unix:///nonexistent/docker.sock"


def no_helpers(argv, stdin, timeout):
    raise AssertionError("no credential helper may run here: %r" % (argv,))


class PullingEngine:
    """Just what pull() calls: notes each pull's auth; refuses with `refusal`."""

    def __init__(self, refusal=None):
        self.refusal = refusal
        self.pulls = []

    def pull_image(self, image, tag, auth=None, on_progress=None):
        self.pulls.append((image, tag, auth))
        if self.refusal is not None:
            raise self.refusal

    def inspect_image(self, reference):
        return {"Id": "sha256:v2"}


class AppCredentialsTest(unittest.TestCase):

    def setUp(self):
        folder = temp_folder(self, "docker-config-")
        self.docker_config = write_file(folder, "config.json", json.dumps({
            "credHelpers": {"reg.example": "autodeploy-unit-missing"},
            "auths": {"reg.example": {"auth": base64.b64encode(b"bob:other").decode()},
                      "ghcr.io": {"auth": base64.b64encode(b"bob:other").decode()}}}))
        self.logs = []
        logger = logging.getLogger("autodeploy.test.credentials")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        handler = logging.Handler()
        handler.emit = lambda record: self.logs.append(record.getMessage())
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        self.jlog = logging.LoggerAdapter(logger, {})

    def test_an_apps_registry_user_wins_over_the_docker_config_file(self):
        app = app_config(registry_user="alice", registry_password=SECRET)
        found = autodeploy.app_registry_auth(app, self.docker_config, no_helpers)
        self.assertEqual(found.auth, {"username": "alice", "password": SECRET,
                                      "serveraddress": "reg.example"})
        self.assertEqual(found.source, "registry_user alice")

    def test_without_one_the_docker_config_file_is_asked(self):
        asked = []

        def helper(argv, stdin, timeout):
            asked.append((argv, stdin))
            raise FileNotFoundError(argv[0])
        with self.assertRaises(dockerapi.CredentialsError):
            autodeploy.app_registry_auth(app_config(), self.docker_config, helper)
        self.assertEqual(asked, [(["docker-credential-autodeploy-unit-missing", "get"], b"reg.example")])

    def test_pull_hands_the_engine_the_credentials_and_logs_only_their_source(self):
        engine = PullingEngine()
        app = app_config(registry_user="alice", registry_password=SECRET)
        autodeploy.pull(engine, app, "v2", self.docker_config, self.jlog, lambda: None)
        self.assertEqual(engine.pulls, [("reg.example/team/web", "v2", {
            "username": "alice", "password": SECRET, "serveraddress": "reg.example"})])
        self.assertIn("pulling reg.example/team/web:v2, credentials: registry_user alice", self.logs)
        self.assertNotIn(SECRET, "\n".join(self.logs))

    def test_credentials_that_cannot_be_had_fail_the_pull_before_the_engine_is_asked(self):
        engine = PullingEngine()
        with self.assertRaises(DeployFailed) as caught:
            autodeploy.pull(engine, app_config(), "v2", self.docker_config, self.jlog, lambda: None)
        self.assertEqual(engine.pulls, [])
        self.assertIn("pull failed: credential helper docker-credential-autodeploy-unit-missing "
                      "for reg.example: cannot run it: not found on PATH", str(caught.exception))

    def test_a_refused_pull_says_which_credentials_it_went_with(self):
        refusal = DockerError("Head http://reg.example/v2/team/web/manifests/v2: no basic auth "
                              "credentials", 500, "POST", "/images/create")
        app = app_config()._replace(image="127.0.0.1:5000/team/web")
        with self.assertRaises(DeployFailed) as caught:
            autodeploy.pull(PullingEngine(refusal), app, "v2", self.docker_config, self.jlog, lambda: None)
        self.assertIn("no basic auth credentials (credentials: anonymous: no credentials for "
                      "127.0.0.1:5000 in %s)" % self.docker_config, str(caught.exception))

    def test_check_says_where_each_apps_credentials_come_from_never_what_they_are(self):
        apps = {"team/web": app_config(registry_user="alice", registry_password=SECRET),
                "team/api": app_config("api")._replace(image="127.0.0.1:5000/team/api"),
                "team/db": app_config("db")}
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = autodeploy.check(web_config(apps=apps, docker_host=NO_ENGINE,
                                                 docker_config=self.docker_config))
        self.assertEqual(status, 1)
        self.assertIn("team/web -> ", out.getvalue())
        self.assertIn("    credentials: registry_user alice\n", out.getvalue())
        self.assertIn("    credentials: anonymous: no credentials for 127.0.0.1:5000 in %s\n"
                      % self.docker_config, out.getvalue())
        self.assertIn("team/db credentials: credential helper docker-credential-autodeploy-unit-missing "
                      "for reg.example: cannot run it: not found on PATH", err.getvalue())
        self.assertNotIn(SECRET, out.getvalue() + err.getvalue())


if __name__ == "__main__":
    unittest.main()
