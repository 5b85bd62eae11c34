"""Unit tests: `build` (the single-file zipapp) and `install` / `uninstall`
into a folder standing for the host's root; systemctl is a recorder."""

import importlib.util
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest
import zipfile

import autodeploy
from tests.unit_support import temp_folder


class Systemctl:
    """Records the systemctl command lines; fails those named in `failing`."""

    def __init__(self, failing=()):
        self.calls = []
        self.failing = failing

    def __call__(self, argv, **kwargs):
        self.calls.append(argv[1:])
        status = 1 if argv[1] in self.failing else 0
        return subprocess.CompletedProcess(argv, status, "Failed to connect to bus" if status else "")


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


BUILT = {}  # the one zipapp the module's tests share (a build compiles both modules)


def setUpModule():
    BUILT["folder"] = tempfile.mkdtemp(prefix="autodeploy-build-test-")
    BUILT["pyz"] = autodeploy.build_zipapp(os.path.join(BUILT["folder"], "autodeploy.pyz"))


def tearDownModule():
    shutil.rmtree(BUILT["folder"], True)


class BuildTest(unittest.TestCase):

    def setUp(self):
        self.pyz = BUILT["pyz"]

    def test_the_zipapp_is_executable_with_an_env_shebang(self):
        self.assertEqual(mode(self.pyz) & 0o111, 0o111)
        with open(self.pyz, "rb") as fh:
            self.assertEqual(fh.readline(), b"#!/usr/bin/env python3\n")

    def test_it_carries_both_modules_with_this_pythons_bytecode_the_unit_and_readme(self):
        with zipfile.ZipFile(self.pyz) as archive:
            names = set(archive.namelist())
            self.assertLessEqual(set(autodeploy.PACKAGED) | {"__main__.py"}, names)
            for module in ("autodeploy", "dockerapi"):
                # Beside the source, where zipimport looks for it.
                self.assertEqual(archive.read(module + ".pyc")[:4], importlib.util.MAGIC_NUMBER)
            self.assertEqual(archive.read("autodeploy.service"),
                             autodeploy.packaged_file("autodeploy.service"))
        self.assertEqual(autodeploy.zipapp_version(self.pyz), autodeploy.__version__)

    def test_a_file_that_is_no_zipapp_has_no_version(self):
        path = os.path.join(temp_folder(self), "x.pyz")
        with open(path, "w") as fh:
            fh.write("#!/bin/sh\n")
        self.assertIsNone(autodeploy.zipapp_version(path))
        self.assertIsNone(autodeploy.zipapp_sources(path))


class InstallTest(unittest.TestCase):

    def setUp(self):
        self.root = temp_folder(self, "autodeploy-root-")
        self.systemctl = Systemctl()
        self.builds = 0

    def build(self, target: str) -> str:
        self.builds += 1
        shutil.copy(BUILT["pyz"], target)
        return target

    def installer(self, systemd=True, group="docker", systemctl=None):
        self.out = io.StringIO()
        return autodeploy.Installer(self.root, systemd=systemd, run=systemctl or self.systemctl,
                                    out=self.out, group=group, build=self.build)

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def read(self, relative: str) -> str:
        with open(self.path(relative), encoding="utf-8") as fh:
            return fh.read()

    def test_install_puts_each_file_where_the_unit_expects_it(self):
        self.assertEqual(self.installer().install(), 0)
        self.assertEqual(mode(self.path("usr/local/bin/autodeploy.pyz")), 0o755)
        self.assertEqual(self.read("etc/systemd/system/autodeploy.service"),
                         autodeploy.packaged_file("autodeploy.service").decode())
        self.assertEqual(self.read("etc/autodeploy/autodeploy.conf"), autodeploy.config_example())
        self.assertTrue(os.path.exists(self.path("usr/local/share/doc/autodeploy/README.md")))
        folder = self.path("etc/autodeploy")
        if os.geteuid() == 0:  # only root can give them to group docker
            self.assertEqual(os.stat(folder).st_gid, __import__("grp").getgrnam("docker").gr_gid)
        self.assertEqual(mode(folder), 0o750)
        self.assertEqual(mode(os.path.join(folder, "autodeploy.conf")), 0o640)

    def test_the_token_is_new_root_only_and_in_the_printed_webhook_url(self):
        self.installer().install()
        token_file = self.path("etc/autodeploy/token")
        self.assertEqual(mode(token_file), 0o600)
        token = self.read("etc/autodeploy/token").strip()
        autodeploy._check_token(token, "test")
        self.assertIn("http://127.0.0.1:3456/deploy/%s\n" % token, self.out.getvalue())
        self.assertIn("reverse proxy", self.out.getvalue())

    def test_the_printed_url_follows_the_configs_listen(self):
        os.makedirs(self.path("etc/autodeploy"))
        with open(self.path("etc/autodeploy/autodeploy.conf"), "w") as fh:
            fh.write("[autodeploy]\nlisten = 0.0.0.0:8088\n")
        self.installer().install()
        self.assertIn("http://127.0.0.1:8088/deploy/", self.out.getvalue())
        self.assertNotIn("listens on 127.0.0.1 only", self.out.getvalue())

    def test_first_install_reloads_systemd_and_enables_and_starts_the_unit(self):
        self.installer().install()
        self.assertEqual(self.systemctl.calls, [["daemon-reload"],
                                                ["enable", "--now", "autodeploy.service"]])

    def test_a_host_without_the_units_python_is_warned_about(self):
        self.installer().install()
        self.assertIn("warning: no %s/usr/bin/python3, which the unit runs" % self.root,
                      self.out.getvalue())
        os.makedirs(self.path("usr/bin"))
        os.symlink(sys.executable, self.path("usr/bin/python3"))
        self.installer().install()
        self.assertNotIn("warning: no", self.out.getvalue())

    def test_no_start_runs_no_systemctl_and_says_how_to_start(self):
        self.installer().install(start=False)
        self.assertEqual(self.systemctl.calls, [])
        self.assertIn("systemctl daemon-reload && systemctl enable --now autodeploy",
                      self.out.getvalue())

    def test_reinstalling_keeps_config_and_token_and_rebuilds_nothing_unchanged(self):
        self.installer().install()
        with open(self.path("etc/autodeploy/autodeploy.conf"), "a") as fh:
            fh.write("\n[team/app]\n")
        token = self.read("etc/autodeploy/token")
        self.systemctl.calls.clear()
        self.assertEqual(self.installer().install(), 0)
        self.assertTrue(self.read("etc/autodeploy/autodeploy.conf").endswith("[team/app]\n"))
        self.assertEqual(self.read("etc/autodeploy/token"), token)
        self.assertEqual(self.builds, 1)
        self.assertIn("already installed", self.out.getvalue())
        self.assertEqual(self.systemctl.calls, [["daemon-reload"],
                                                ["enable", "--now", "autodeploy.service"]])

    def test_an_upgrade_replaces_the_program_and_restarts_a_running_service(self):
        os.makedirs(self.path("usr/local/bin"))
        with zipfile.ZipFile(self.path("usr/local/bin/autodeploy.pyz"), "w") as archive:
            archive.writestr("autodeploy.py", '__version__ = "0.0.9"\n')
        self.installer().install()
        self.assertIn("autodeploy %s (was 0.0.9)" % autodeploy.__version__, self.out.getvalue())
        self.assertEqual(autodeploy.zipapp_version(self.path("usr/local/bin/autodeploy.pyz")),
                         autodeploy.__version__)
        self.assertEqual(self.systemctl.calls, [["daemon-reload"],
                                                ["try-restart", "autodeploy.service"],
                                                ["enable", "--now", "autodeploy.service"]])

    def test_a_failing_systemctl_is_said_and_exits_1_with_the_files_in_place(self):
        installer = self.installer(systemctl=Systemctl(failing=("daemon-reload",)))
        self.assertEqual(installer.install(), 1)
        self.assertIn("error: systemctl daemon-reload failed (exit 1): Failed to connect to bus",
                      self.out.getvalue())
        self.assertTrue(os.path.exists(self.path("etc/autodeploy/token")))

    def test_without_a_docker_group_it_warns_and_keeps_the_config_private(self):
        self.installer(group="no-such-group-here").install()
        self.assertIn("no group 'no-such-group-here'", self.out.getvalue())
        self.assertEqual(mode(self.path("etc/autodeploy")), 0o700)
        self.assertEqual(mode(self.path("etc/autodeploy/autodeploy.conf")), 0o600)

    def test_uninstall_removes_what_install_made_and_keeps_config_token_and_journal(self):
        self.installer().install()
        os.makedirs(self.path("var/lib/private/autodeploy"))
        self.systemctl.calls.clear()
        self.assertEqual(self.installer().uninstall(), 0)
        self.assertEqual(self.systemctl.calls, [["disable", "--now", "autodeploy.service"],
                                                ["daemon-reload"]])
        for gone in ("usr/local/bin/autodeploy.pyz", "etc/systemd/system/autodeploy.service",
                     "usr/local/share/doc/autodeploy"):
            self.assertFalse(os.path.exists(self.path(gone)), gone)
        for kept in ("etc/autodeploy/autodeploy.conf", "etc/autodeploy/token",
                     "var/lib/private/autodeploy"):
            self.assertTrue(os.path.exists(self.path(kept)), kept)
        self.assertIn("uninstall --purge removes them", self.out.getvalue())

    def test_uninstall_purge_removes_config_token_and_journal_too(self):
        self.installer().install()
        os.makedirs(self.path("var/lib/private/autodeploy"))
        self.installer(systemd=False).uninstall(purge=True)
        for gone in ("etc/autodeploy", "var/lib/private/autodeploy"):
            self.assertFalse(os.path.exists(self.path(gone)), gone)


if __name__ == "__main__":
    unittest.main()
