"""End to end: deploying from a private registry (issue 13, "Private images").

A real `docker-registry` behind htpasswd basic auth (a bcrypt line made by
`htpasswd -B`, apache2-utils, installed when missing), images pushed to it
after a `docker login` into the test's own config folder (the host's
~/.docker is never touched), then the real service deploying v2 over a
running v1:

* without credentials the pull is refused, the job `failed` with the
  registry's reason and the credentials it went with, and v1 runs on;
* with the `auths` entry that `docker login` wrote, it deploys;
* with a credential helper script (docker-credential-autodeploytest) found
  on the service's PATH, it deploys, the helper having been asked;
* with the app's own registry_user + registry_password_file, it deploys.

The password is never in the service's log nor in its journal. Only
loopback is used; every wait is bounded.
"""

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import unittest

from tests import support
from tests.support import (FINAL_STATES, ServiceProcess, app_cmd, containers_named, hub_payload,
                           inspect, journal_rows, main_section)

USER = "alice"
PASSWORD = "pw-" + secrets.token_hex(12)  # a new one each run: found in a log only if leaked
HELPER = "autodeploytest"


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line (docker-registry accepts bcrypt only; the
    standard library has none), from apache2-utils' htpasswd."""
    if support._which("htpasswd") is None:
        if not support._is_root():
            support._fail("htpasswd (apache2-utils) is missing, and installing it needs root")
        support._apt_install(["apache2-utils"])
    made = subprocess.run([support._which("htpasswd") or "htpasswd", "-nbB", user, password],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    if made.returncode != 0:
        raise AssertionError("htpasswd failed: %s" % made.stderr.decode(errors="replace"))
    return made.stdout.decode().strip()


class PrivateRegistry(support.Registry):
    """support.Registry behind htpasswd basic auth: USER / PASSWORD."""

    def _config(self) -> str:
        path = os.path.join(self._dir, "htpasswd")
        with open(path, "w") as fh:
            fh.write(htpasswd_line(USER, PASSWORD) + "\n")
        return super()._config() + (
            "auth:\n"
            "  htpasswd:\n"
            "    realm: autodeploy-test\n"
            "    path: %s\n" % path)

    def _ready(self, status: int, headers) -> bool:
        """Up, and asking for credentials: 401 with a Basic challenge."""
        return status == 401 and "Basic" in (headers.get("WWW-Authenticate", "") if headers else "")


class PrivateRegistryTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        support.start_class_fixture(cls, PrivateRegistry())
        cls.addClassCleanup(support.stop_class_fixture, cls)
        cls.folder = tempfile.mkdtemp(prefix="autodeploy-private-")
        cls.addClassCleanup(shutil.rmtree, cls.folder, True)
        cls.login = os.path.join(cls.folder, "login")  # the test's own DOCKER_CONFIG
        support.registry_login(cls.login, cls.registry.host, USER, PASSWORD)
        cls.ref = "%s/e2e/private" % cls.registry.host
        cls.ids = support.make_versions(cls.images, cls.ref, ("v1", "v2"), cmd=app_cmd(), push=False)
        for version in ("v1", "v2"):
            support.docker("--config", cls.login, "push", "%s:%s" % (cls.ref, version))

    # -- shared steps -----------------------------------------------------

    def serve(self, name: str, docker_config: str, app_lines: str = "", env=None) -> ServiceProcess:
        """A service deploying e2e/private (tags v1 v2) to the container `name`."""
        port = support.free_port()
        config = main_section(port, self.callbacks, extra="docker_config = %s" % docker_config) + """
[e2e/private]
image = {ref}
tag = v1 v2
container = {name}
settle = 1
remove_old_image = no
{more}
""".format(ref=self.ref, name=name, more=app_lines)
        service = ServiceProcess(config, env or self.env)
        self.addCleanup(service.stop)
        return service.start(port)

    def deploy_v2(self, service: ServiceProcess, callback: str) -> dict:
        """POST a push of v2; its journal row once final, with its callback under "callback"."""
        status, answer = service.post(hub_payload("e2e/private", "v2", self.callbacks.url(callback)))
        self.assertEqual(status, 202, answer)
        self.callbacks.wait_for(callback)
        deadline = time.monotonic() + 30
        while True:  # the journal is written behind the callback, by the upkeep thread
            row = journal_rows(service).get(answer["job"], {})
            if row.get("state") in FINAL_STATES:
                return dict(row, callback=self.callbacks.wait_for(callback))
            if time.monotonic() > deadline:
                raise AssertionError("job %s not final in the journal: %r\n%s"
                                     % (answer["job"], row, service.log_text()[-3000:]))
            time.sleep(0.05)

    def assert_deployed_v2(self, name: str, port: int, row: dict) -> None:
        self.assertEqual(row["state"], "succeeded", row)
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % port, timeout=30,
                                           expect_body="v2\n"), "v2\n")
        self.assertEqual(inspect(name)["Image"], self.ids["v2"])
        self.assertEqual(containers_named(name), [name])

    def assert_no_password(self, service: ServiceProcess, row: dict) -> None:
        self.assertNotIn(PASSWORD, service.log_text())
        self.assertNotIn(PASSWORD, json.dumps(journal_rows(service), default=str))
        self.assertNotIn(PASSWORD, json.dumps(row, default=str))

    # -- the tests --------------------------------------------------------

    def test_without_credentials_the_pull_fails_with_the_reason_and_v1_runs_on(self):
        name, port = support.run_version(self, "private-anon", self.ref)
        before = inspect(name)["Id"]
        nowhere = os.path.join(self.folder, "no-such-config", "config.json")
        service = self.serve(name, nowhere)
        row = self.deploy_v2(service, "anon")
        self.assertEqual(row["state"], "failed", row)
        self.assertEqual(row["callback"]["state"], "failure")
        refusal = "authentication required" if support.is_podman() else "no basic auth credentials"
        for fragment in ("pull failed", refusal,
                         "credentials: anonymous: no credentials for %s in %s"
                         % (self.registry.host, nowhere)):
            self.assertIn(fragment, row["description"])
        self.assertEqual(inspect(name)["Id"], before)
        self.assertEqual(containers_named(name), [name])
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % port), "v1\n")
        self.assert_no_password(service, row)

    def test_the_auths_entry_docker_login_wrote_deploys(self):
        login_config = os.path.join(self.login, "config.json")
        with open(login_config) as fh:
            entry = json.load(fh)["auths"][self.registry.host]
        self.assertIn("auth", entry, "docker login stored the password elsewhere")
        name, port = support.run_version(self, "private-auths", self.ref)
        service = self.serve(name, login_config)
        row = self.deploy_v2(service, "auths")
        self.assert_deployed_v2(name, port, row)
        self.assertIn("credentials: auths entry for %s in %s" % (self.registry.host, login_config),
                      service.log_text())
        self.assert_no_password(service, row)

    def test_a_credential_helper_on_path_deploys(self):
        helpers = tempfile.mkdtemp(prefix="helpers-", dir=self.folder)
        asked = os.path.join(helpers, "asked")
        script = os.path.join(helpers, "docker-credential-" + HELPER)
        with open(script, "w") as fh:
            fh.write("""#!/bin/sh
# A credential helper with one login: `get` reads a server address on stdin.
[ "$1" = get ] || exit 1
server=$(cat)
echo "$server" >> {asked}
if [ "$server" = "{host}" ]; then
    printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{password}"}}' "$server"
else
    echo "credentials not found in native keychain"
    exit 1
fi
""".format(asked=asked, host=self.registry.host, user=USER, password=PASSWORD))
        os.chmod(script, 0o755)
        docker_config = os.path.join(helpers, "config.json")
        with open(docker_config, "w") as fh:
            json.dump({"credHelpers": {self.registry.host: HELPER}}, fh)
        env = dict(self.env, PATH=helpers + os.pathsep + self.env.get("PATH", os.defpath))
        name, port = support.run_version(self, "private-helper", self.ref)
        service = self.serve(name, docker_config, env=env)
        row = self.deploy_v2(service, "helper")
        self.assert_deployed_v2(name, port, row)
        with open(asked) as fh:
            self.assertEqual(fh.read(), self.registry.host + "\n")
        self.assertIn("credentials: credential helper docker-credential-%s for %s"
                      % (HELPER, self.registry.host), service.log_text())
        self.assert_no_password(service, row)

    def test_the_apps_own_registry_user_and_password_file_deploy(self):
        password_file = os.path.join(self.folder, "registry-password")
        with open(password_file, "w") as fh:
            fh.write(PASSWORD + "\n")
        nowhere = os.path.join(self.folder, "no-such-config", "config.json")
        name, port = support.run_version(self, "private-user", self.ref)
        service = self.serve(name, nowhere, "registry_user = %s\nregistry_password_file = %s\n"
                             % (USER, password_file))
        row = self.deploy_v2(service, "user")
        self.assert_deployed_v2(name, port, row)
        self.assertIn("credentials: registry_user %s" % USER, service.log_text())
        self.assert_no_password(service, row)


if __name__ == "__main__":
    unittest.main()
