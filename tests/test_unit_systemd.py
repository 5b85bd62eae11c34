"""Unit tests: autodeploy.service, checked by systemd's own tools.

`systemd-analyze verify` must have nothing to say about the unit, and
`systemd-analyze security --offline=true` must rate its sandbox 2.0 ("OK")
or better. Both skip when systemd-analyze is not installed, except under
CI (CI=true), where they fail: CI must not pass by skipping.

verify checks that the ExecStart binary exists (/usr/bin/python3 here), not
its arguments, so the unit is verified as it is, without the zipapp being
installed. Only on a machine without /usr/bin/python3 is a copy verified,
with this interpreter in its place.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import unittest
from typing import Dict, List, Optional

UNIT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "..", "autodeploy.service"))
NAME = "autodeploy.service"
MAX_EXPOSURE = 2.0
TIMEOUT = 60  # seconds for each systemd-analyze run


def find_analyze() -> Optional[str]:
    """systemd-analyze on PATH, or in the bin folder a CI PATH may lack."""
    return shutil.which("systemd-analyze") or next(
        (path for path in ("/usr/bin/systemd-analyze", "/bin/systemd-analyze")
         if os.access(path, os.X_OK)), None)


def read_unit() -> str:
    with open(UNIT, encoding="utf-8") as fh:
        return fh.read()


def unit_settings(text: str) -> Dict[str, Dict[str, List[str]]]:
    """{section: {key: [values, in order]}}; a key may repeat (SystemCallFilter=)."""
    sections = {}  # type: Dict[str, Dict[str, List[str]]]
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if section is None or not sep:
            raise AssertionError("%s: not a setting: %r" % (UNIT, line))
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


class SystemdAnalyzeTest(unittest.TestCase):

    def setUp(self):
        self.tool = find_analyze()
        if self.tool is None:
            self.skip_or_fail("systemd-analyze is not installed")
        self.folder = tempfile.TemporaryDirectory(prefix="autodeploy-systemd-")
        self.addCleanup(self.folder.cleanup)

    def skip_or_fail(self, reason: str) -> None:
        if os.environ.get("CI") == "true":
            self.fail(reason + " (CI=true: failing instead of skipping)")
        self.skipTest(reason)

    def unit_path(self) -> str:
        """The unit itself, or a copy whose ExecStart runs this interpreter
        when the unit's own is not on this machine."""
        text = read_unit()
        binary = shlex.split(unit_settings(text)["Service"]["ExecStart"][0])[0]
        if os.access(binary, os.X_OK):
            return UNIT
        path = os.path.join(self.folder.name, NAME)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text.replace("ExecStart=" + binary + " ", "ExecStart=" + sys.executable + " "))
        return path

    def analyze(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0")
        try:
            return subprocess.run([self.tool] + list(args), env=env, cwd=self.folder.name,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, universal_newlines=True,
                                  timeout=TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            self.fail("systemd-analyze %s did not finish within %ds:\n%s"
                      % (" ".join(args), TIMEOUT, exc.output or ""))

    def test_verify_is_silent(self):
        """No warning and no error about the unit (its syntax, settings,
        ExecStart binary). Lines about other units that it pulls in
        (docker.service...) belong to those packages and are not counted."""
        path = self.unit_path()
        result = self.analyze("verify", "--man=no", path)
        ours = []
        for line in result.stdout.splitlines():
            other = re.match(r"^(\S+?\.(?:service|socket|target|mount|path|timer))(?::\d+)?: ", line)
            if other and os.path.basename(other.group(1)) != NAME:
                continue
            ours.append(line)
        self.assertEqual(ours, [], "systemd-analyze verify %s:\n%s" % (path, result.stdout))
        self.assertEqual(result.returncode, 0, "systemd-analyze verify %s exited %d:\n%s"
                         % (path, result.returncode, result.stdout))

    def test_security_exposure_at_most_2(self):
        path = self.unit_path()
        result = self.analyze("security", "--no-pager", "--offline=true", path)
        if result.returncode != 0 and "offline" in result.stdout and "unrecognized" in result.stdout:
            self.skip_or_fail("systemd-analyze is too old for --offline (systemd 250+): "
                              + result.stdout.strip())
        found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
        self.assertIsNotNone(found, "no exposure level in the output of systemd-analyze "
                                    "security (exit %d):\n%s" % (result.returncode, result.stdout))
        exposure = float(found.group(1))
        self.assertLessEqual(exposure, MAX_EXPOSURE, "exposure %.1f > %.1f:\n%s"
                             % (exposure, MAX_EXPOSURE, result.stdout))


class UnitFileTest(unittest.TestCase):
    """What the code and tests/bench.py rely on, without systemd."""

    def setUp(self):
        self.text = read_unit()
        self.service = unit_settings(self.text)["Service"]

    def test_execstart_form(self):
        # tests/bench.py reads the first ExecStart= line and takes the words
        # up to the one ending in .pyz as the interpreter and its flags.
        line = next(l for l in self.text.splitlines() if l.startswith("ExecStart="))
        argv = shlex.split(line[len("ExecStart="):])
        pyz = next((n for n, word in enumerate(argv) if word.endswith(".pyz")), None)
        self.assertIsNotNone(pyz, line)
        self.assertEqual(argv[:pyz], ["/usr/bin/python3", "-I", "-S", "-u"])
        self.assertEqual(argv[pyz:], ["/usr/local/bin/autodeploy.pyz", "--config",
                                      "/etc/autodeploy/autodeploy.conf", "serve"])
        self.assertEqual(self.service["ExecStart"], [line[len("ExecStart="):]])

    def test_notify_and_lifecycle(self):
        self.assertEqual(self.service["Type"], ["notify"])
        self.assertEqual(self.service["NotifyAccess"], ["main"])
        self.assertEqual(self.service["WatchdogSec"], ["30s"])
        self.assertEqual(self.service["Restart"], ["on-failure"])
        self.assertEqual(self.service["ExecReload"][1:], ["/bin/kill -HUP $MAINPID"])

    def test_reload_checks_the_config_before_it_signals(self):
        # The first ExecReload= is ExecStart's program with `check
        # --config-only`: run here on the checkout's module, it must fail
        # on a broken file (so `systemctl reload` fails) and pass a good one.
        start = shlex.split(self.service["ExecStart"][0])
        check = shlex.split(self.service["ExecReload"][0])
        self.assertEqual(check[:-2], start[:3] + start[4:-1])  # without -u and serve
        self.assertEqual(check[-2:], ["check", "--config-only"])
        folder = tempfile.mkdtemp(prefix="autodeploy-reload-")
        self.addCleanup(shutil.rmtree, folder, True)
        module = os.path.join(os.path.dirname(UNIT), "autodeploy.py")
        config = os.path.join(folder, "autodeploy.conf")
        for text, status in (("[autodeploy]\nlisten = 127.0.0.1:3456\n", 0),
                             ("[autodeploy]\nlisen = 127.0.0.1:3456\n", 2)):
            with open(config, "w") as fh:
                fh.write(text)
            # Without -I: it would keep the checkout's folder, and so
            # dockerapi.py, off sys.path (the zipapp is on it either way).
            done = subprocess.run([sys.executable, "-S", module, "--config", config]
                                  + check[-2:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=TIMEOUT, env={})
            self.assertEqual(done.returncode, status, done.stdout + done.stderr)
        self.assertIn("line 2: unknown setting 'lisen' (did you mean 'listen'?)", done.stderr)

    def test_identity_and_secrets(self):
        # Unprivileged, and the Docker socket through group docker only.
        self.assertTrue(self.service.get("DynamicUser") == ["yes"] or "User" in self.service)
        self.assertNotIn("root", self.service.get("User", []))
        self.assertEqual(self.service["SupplementaryGroups"], ["docker"])
        self.assertEqual(self.service["CapabilityBoundingSet"], [""])
        self.assertEqual(self.service["StateDirectory"], ["autodeploy"])
        # The service reads $CREDENTIALS_DIRECTORY/token.
        self.assertIn("token:/etc/autodeploy/token", self.service["LoadCredential"])
        self.assertEqual(self.service["RestrictAddressFamilies"], ["AF_UNIX AF_INET AF_INET6"])


if __name__ == "__main__":
    unittest.main()
