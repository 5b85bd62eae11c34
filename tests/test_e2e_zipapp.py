"""End to end: the single-file build of README.md, copied alone into an
empty folder, answers --version and `check` against the real Engine."""

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
    """The documented one-line zipapp build, taken from README.md itself."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        for line in fh:
            if "-m zipapp" in line and line.lstrip().startswith("d=$("):
                return line.strip()
    raise AssertionError("README.md has no one-line zipapp build command")


class ZipappTest(unittest.TestCase):

    def test_single_file_runs_from_an_empty_folder(self):
        env = support.engine_env()
        build_dir = tempfile.mkdtemp(prefix="autodeploy-build-")
        empty = tempfile.mkdtemp(prefix="autodeploy-host-")
        self.addCleanup(shutil.rmtree, build_dir, True)
        self.addCleanup(shutil.rmtree, empty, True)
        # Build in a copy of the two modules, so the checkout stays clean.
        for name in ("autodeploy.py", "dockerapi.py", "README.md"):
            shutil.copy(os.path.join(ROOT, name), build_dir)
        subprocess.run(["bash", "-c", readme_build_command()], cwd=build_dir, check=True, timeout=60)
        target = os.path.join(empty, "autodeploy.pyz")
        shutil.copy(os.path.join(build_dir, "autodeploy.pyz"), target)
        self.assertEqual(os.listdir(empty), ["autodeploy.pyz"])

        version = subprocess.run([sys.executable, "autodeploy.pyz", "--version"], cwd=empty,
                                 env={"PATH": os.environ.get("PATH", "")},
                                 capture_output=True, text=True, timeout=30)
        self.assertEqual(version.returncode, 0, version.stderr)
        self.assertEqual(version.stdout.strip(), "autodeploy " + autodeploy.__version__)

        with open(os.path.join(empty, "autodeploy.conf"), "w") as fh:
            fh.write("[autodeploy]\ntoken = %s\n\n[myname/myrepo]\n" % ("z" * 40))
        check = subprocess.run([sys.executable, "autodeploy.pyz", "--config", "autodeploy.conf", "check"],
                               cwd=empty, env={"PATH": os.environ.get("PATH", ""),
                                               "DOCKER_HOST": env["DOCKER_HOST"]},
                               capture_output=True, text=True, timeout=30)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertIn("myname/myrepo -> container myname-myrepo", check.stdout)
        engine = "Podman" if support.is_podman() else "Docker Engine"
        self.assertRegex(check.stdout, r"\n%s \d\S* \(API 1\.\d+\) at /" % engine)

        broken = subprocess.run([sys.executable, "autodeploy.pyz", "--config", "missing.conf", "check"],
                                cwd=empty, capture_output=True, text=True, timeout=30)
        self.assertEqual(broken.returncode, 2)
        self.assertIn("missing.conf", broken.stderr)


if __name__ == "__main__":
    unittest.main()
