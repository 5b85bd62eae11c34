"""End to end: the single file, built as README's quick start builds it,
copied alone into an empty folder: --version, `check` against the real
Engine, rebuilding itself, `config example`, and `install --root` /
`uninstall --root` leaving a layout that `check` accepts."""

import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import autodeploy
from tests import support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_build_command() -> str:
    """The documented build, taken from README.md itself."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("python3 autodeploy.py build"):
                return line.split("#")[0].strip()
    raise AssertionError("README.md has no `python3 autodeploy.py build` line")


def post(port: int, path: str, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


class ZipappTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.env = support.engine_env()
        cls.build_dir = tempfile.mkdtemp(prefix="autodeploy-build-")
        # Build in a copy of the checkout's files, so the checkout stays clean.
        for name in autodeploy.PACKAGED:
            shutil.copy(os.path.join(ROOT, name), cls.build_dir)
        command = readme_build_command().replace("python3", sys.executable, 1)
        subprocess.run(command.split(), cwd=cls.build_dir, check=True, timeout=60,
                       stdout=subprocess.DEVNULL)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.build_dir, True)

    def setUp(self):
        self.empty = tempfile.mkdtemp(prefix="autodeploy-host-")
        self.addCleanup(shutil.rmtree, self.empty, True)
        shutil.copy(os.path.join(self.build_dir, "autodeploy.pyz"), self.empty)
        self.assertEqual(os.listdir(self.empty), ["autodeploy.pyz"])

    def pyz(self, *args: str, env=None) -> subprocess.CompletedProcess:
        """Run the zipapp in the empty folder, as the unit runs it (-I -S)."""
        return subprocess.run([sys.executable, "-I", "-S", "autodeploy.pyz"] + list(args),
                              cwd=self.empty, env=env or {"PATH": os.environ.get("PATH", "")},
                              capture_output=True, text=True, timeout=60)

    def test_single_file_runs_from_an_empty_folder(self):
        version = self.pyz("--version")
        self.assertEqual(version.returncode, 0, version.stderr)
        self.assertEqual(version.stdout.strip(), "autodeploy " + autodeploy.__version__)

        with open(os.path.join(self.empty, "autodeploy.conf"), "w") as fh:
            fh.write("[autodeploy]\ntoken = %s\n\n[myname/myrepo]\n" % ("z" * 40))
        check = self.pyz("--config", "autodeploy.conf", "check",
                         env={"PATH": os.environ.get("PATH", ""), "DOCKER_HOST": self.env["DOCKER_HOST"]})
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertIn("myname/myrepo -> container myname-myrepo", check.stdout)
        engine = "Podman" if support.is_podman() else "Docker Engine"
        self.assertRegex(check.stdout, r"\n%s \d\S* \(API 1\.\d+\) at /" % engine)

        broken = self.pyz("--config", "missing.conf", "check")
        self.assertEqual(broken.returncode, 2)
        self.assertIn("missing.conf", broken.stderr)

    def test_the_zipapp_rebuilds_itself_and_prints_the_example_config(self):
        rebuilt = self.pyz("build", "-o", "again.pyz")
        self.assertEqual(rebuilt.returncode, 0, rebuilt.stderr)
        self.assertEqual(autodeploy.zipapp_sources(os.path.join(self.empty, "again.pyz")),
                         autodeploy.zipapp_sources(os.path.join(self.empty, "autodeploy.pyz")))
        example = self.pyz("config", "example")
        self.assertEqual(example.stdout, autodeploy.config_example())

    def test_install_into_a_root_gives_a_layout_check_accepts_and_uninstall_keeps_the_config(self):
        root = os.path.join(self.empty, "root")
        installed = self.pyz("install", "--root", root)
        self.assertEqual(installed.returncode, 0, installed.stdout + installed.stderr)
        with open(os.path.join(root, "etc/autodeploy/token")) as fh:
            token = fh.read().strip()
        self.assertIn("http://127.0.0.1:3456/deploy/%s" % token, installed.stdout)
        pyz = os.path.join(root, "usr/local/bin/autodeploy.pyz")
        config = os.path.join(root, "etc/autodeploy/autodeploy.conf")
        env = {"PATH": os.environ.get("PATH", ""), "DOCKER_HOST": self.env["DOCKER_HOST"]}
        check = subprocess.run([sys.executable, "-I", "-S", pyz, "--config", config, "check"],
                               env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertIn("passes to serve as its credential 'token'", check.stdout)
        self.assertNotIn(token, check.stdout + check.stderr)

        again = self.pyz("install", "--root", root)
        self.assertIn("already installed", again.stdout)
        removed = self.pyz("uninstall", "--root", root)
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertFalse(os.path.exists(pyz))
        self.assertTrue(os.path.exists(config))
        with open(os.path.join(root, "etc/autodeploy/token")) as fh:
            self.assertEqual(fh.read().strip(), token)

    def test_the_installed_service_takes_the_printed_url_with_its_token_as_a_credential(self):
        # As the unit runs it: the installed program and config, the token
        # handed in as the systemd credential 'token', a state directory.
        root = os.path.join(self.empty, "root")
        self.assertEqual(self.pyz("install", "--root", root).returncode, 0)
        with open(os.path.join(root, "etc/autodeploy/token")) as fh:
            token = fh.read().strip()
        credentials = os.path.join(self.empty, "credentials")
        os.mkdir(credentials, 0o700)
        shutil.copy(os.path.join(root, "etc/autodeploy/token"), credentials)
        port = support.free_port()
        env = {"PATH": os.environ.get("PATH", ""), "DOCKER_HOST": self.env["DOCKER_HOST"],
               "CREDENTIALS_DIRECTORY": credentials,
               "STATE_DIRECTORY": os.path.join(self.empty, "state")}
        log_path = os.path.join(self.empty, "serve.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-u", os.path.join(root, "usr/local/bin/autodeploy.pyz"),
                 "--config", os.path.join(root, "etc/autodeploy/autodeploy.conf"), "serve",
                 "--listen", "127.0.0.1:%d" % port], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: (process.terminate(), process.wait(30)))
        support.wait_healthz(port)
        body = b'{"image": "autodeploy-test/nothing-runs-this", "tag": "latest"}'
        # Accepted as a deploy token: what follows is the app's answer, not 404.
        self.assertEqual(post(port, "/deploy/" + token, body), 422)
        self.assertEqual(post(port, "/deploy/" + "x" * 40, body), 404)
        with open(log_path) as fh:
            log = fh.read()  # the line is written before the 404 is sent
        self.assertIn("unknown token (40 characters, starting xxxx", log)
        self.assertNotIn(token, log)

    @unittest.skipIf(os.geteuid() != 0, "needs a non-root user to be refused")
    def test_install_on_this_host_as_another_user_is_refused_with_a_reason(self):
        os.chmod(self.empty, 0o755)  # mkdtemp's 0700 would refuse nobody before autodeploy could
        refused = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                  sys.executable, "-I", "-S", "autodeploy.pyz", "install"],
                                 cwd=self.empty, capture_output=True, text=True, timeout=60)
        self.assertEqual(refused.returncode, 2, refused.stdout + refused.stderr)
        self.assertIn("run it as root", refused.stderr)


if __name__ == "__main__":
    unittest.main()
