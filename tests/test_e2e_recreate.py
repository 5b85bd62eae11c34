"""End to end: faithful recreation, checked field by field on `docker inspect`.

For each scenario v1 and v2 of a test image go to a throwaway registry, v1 is
started with `docker run` and the options users really use (or with Docker
Compose), then `autodeploy.py deploy` -- the code path the service runs --
replaces it with v2. The old container's inspect document (taken before the
deploy) and the new one's are flattened to dotted paths and compared: every
path must be equal except an explicit allow-list of values the Engine
assigns afresh (ids, addresses, state, ...) and, per scenario, the settings
that are meant to follow the new image (asserted exactly first). Data
written into every volume and bind before the deploy must be readable after
it, and the app must answer v2.

Everything created carries the label autodeploy.test=<run id> or is named
autodeploy-test-<run id>-..., and is removed afterwards.
"""

import copy
import fnmatch
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import unittest
from typing import Dict, Iterable, List, Optional, Tuple

from tests import support
from tests.support import app_cmd, inspect

TOKEN = "recreate" + "0123456789abcdef" * 2  # 40 characters

# The app's command as a user would type it after the image name.
USER_SHELL_CMD = "trap 'exit 0' TERM INT; httpd -f -p 8080 -h /www & wait"

# Paths (fnmatch patterns on the dotted path) whose values the Engine
# assigns afresh to every container: they may differ between the old
# container and its recreation. Nothing a user can set is in here.
ENGINE_ASSIGNED = (
    "Id", "Created", "Image", "Config.Image",
    "State.*", "RestartCount", "ExecIDs", "ExecIDs.*",
    "GraphDriver.*",
    "MountLabel", "ProcessLabel", "AppArmorProfile",
    "NetworkSettings.SandboxID", "NetworkSettings.SandboxKey",
    "NetworkSettings.EndpointID", "NetworkSettings.IPAddress", "NetworkSettings.Gateway",
    "NetworkSettings.MacAddress", "NetworkSettings.IPPrefixLen", "NetworkSettings.IPv6Gateway",
    "NetworkSettings.GlobalIPv6Address", "NetworkSettings.GlobalIPv6PrefixLen",
    "NetworkSettings.Networks.*.EndpointID", "NetworkSettings.Networks.*.IPAddress",
    "NetworkSettings.Networks.*.Gateway", "NetworkSettings.Networks.*.MacAddress",
    "NetworkSettings.Networks.*.IPPrefixLen", "NetworkSettings.Networks.*.IPv6Gateway",
    "NetworkSettings.Networks.*.GlobalIPv6Address",
    "NetworkSettings.Networks.*.GlobalIPv6PrefixLen",
    "NetworkSettings.Networks.*.DNSNames", "NetworkSettings.Networks.*.DNSNames.*",
)

# HostConfig lists whose order means nothing; compared sorted.
UNORDERED_HOST_LISTS = ("CapAdd", "CapDrop", "ExtraHosts", "Dns", "DnsSearch", "DnsOptions",
                        "SecurityOpt", "GroupAdd", "Links")

_ABSENT = object()

# What Podman adds to Config.Env by itself (its marker, a terminal type,
# its default PATH when the image sets none); HOSTNAME is dropped by normalise.
PODMAN_ENV = ("container=podman", "TERM=xterm",
              "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


def user_env(doc: dict) -> List[str]:
    """A container's env, sorted, without what the engine added itself."""
    env = support.user_env(doc)
    return [e for e in env if e not in PODMAN_ENV] if support.is_podman() else env


# ---------------------------------------------------------------------------
# Comparing two inspect documents
# ---------------------------------------------------------------------------

def normalise(doc: dict) -> dict:
    """A copy of a container's inspect document made comparable with its
    recreation's: Mounts keyed by Destination; the container's own id
    replaced in the paths that contain it, and its own short id removed
    from its network aliases (the Engine adds it); Env and the HostConfig
    lists whose order means nothing sorted. HostConfig.Binds is dropped:
    check_binds compares it."""
    doc = copy.deepcopy(doc)
    own_id = doc["Id"]
    for key in ("ResolvConfPath", "HostnamePath", "HostsPath", "LogPath"):
        if doc.get(key):
            doc[key] = doc[key].replace(own_id, "<own id>")
    doc["Mounts"] = {m["Destination"]: m for m in doc.get("Mounts") or []}
    doc.pop("ExecIDs", None)  # Podman lists the exec sessions the test ran
    config = doc.get("Config") or {}
    if config.get("Env"):
        # Podman adds HOSTNAME=<the container's own hostname>.
        own_hostname = "HOSTNAME=" + (config.get("Hostname") or "")
        config["Env"] = sorted(e for e in config["Env"] if e != own_hostname)
    host = doc.get("HostConfig") or {}
    host.pop("Binds", None)
    for key in UNORDERED_HOST_LISTS:
        if host.get(key):
            host[key] = sorted(host[key])
    for endpoint in ((doc.get("NetworkSettings") or {}).get("Networks") or {}).values():
        if endpoint.get("Aliases"):
            endpoint["Aliases"] = sorted(a for a in endpoint["Aliases"] if a != own_id[:12])
    return doc


def flatten(value, path: str = "") -> Dict[str, object]:
    """{dotted path: leaf value}; list items are path[0], path[1], ...;
    an empty dict or list is a leaf."""
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(flatten(item, "%s.%s" % (path, key) if path else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, "%s[%d]" % (path, index)))
        return out
    return {path: value}


def differences(old: dict, new: dict, allowed: Iterable[str] = ()) -> List[str]:
    """Every path of the two (normalised) documents whose values differ,
    minus those matching an `allowed` fnmatch pattern, as readable lines."""
    allowed = list(allowed)
    flat_old, flat_new = flatten(old), flatten(new)
    lines = []
    for path in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(path, _ABSENT), flat_new.get(path, _ABSENT)
        if _same(before, after) or any(fnmatch.fnmatchcase(path, p) for p in allowed):
            continue
        lines.append("  %s: old=%s new=%s" % (path, _show(before), _show(after)))
    return lines


def _same(before, after) -> bool:
    """Equal, or both empty: null, {} and [] all mean "nothing set" (e.g.
    `docker network connect` sends IPAMConfig {} where create sends null)."""
    empty = (None, {}, [], _ABSENT)
    return before == after or (before in empty and after in empty and
                               _ABSENT not in (before, after))


def _show(value) -> str:
    if value is _ABSENT:
        return "<absent>"
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _literal(path: str) -> str:
    """An allow-list pattern matching exactly `path` (list indexes included)."""
    return "".join("[%s]" % c if c in "[]*?" else c for c in path)


def _mac_of(ip: str) -> str:
    """The MAC Docker 20.10 derives from an IPv4 address: 02:42:<4 bytes>."""
    return "02:42:" + ":".join("%02x" % int(part) for part in ip.split("."))


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------

class FaithfulRecreationTest(unittest.TestCase):
    """One registry, one autodeploy config with a section per scenario."""

    SCENARIOS = {
        # scenario -> deploy order (stop-first unless the scenario is about ordering)
        "env": "stop-first", "full": "stop-first", "entrypoint": "stop-first",
        "cmd": "stop-first", "bridge": "stop-first", "alias": "stop-first",
        "twonets": "stop-first", "host": "stop-first", "none": "stop-first",
        "netcontainer": "stop-first", "startfirst": "auto", "compose": "stop-first",
        "noentrypoint": "stop-first",
    }

    @classmethod
    def setUpClass(cls):
        cls.env = support.engine_env()
        cls.label = support.run_id()
        cls.images: List[str] = []
        cls.volumes: List[str] = []
        cls.networks: List[str] = []
        cls.folder = tempfile.mkdtemp(prefix="autodeploy-recreate-")
        cls.registry = support.Registry().start()
        try:
            cls._set_up_shared()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up_shared(cls):
        reg = cls.registry.host
        # The `deploy` command journals its jobs: in the test's folder, not /var/lib.
        sections = ["[autodeploy]\ntoken = %s\nstate_dir = %s\n"
                    % (TOKEN, os.path.join(cls.folder, "state"))]
        for key, order in cls.SCENARIOS.items():
            sections.append("[e2e/{key}]\nimage = {reg}/e2e/{key}\ncontainer = {name}\n"
                            "settle = 1\norder = {order}\n".format(
                                key=key, reg=reg, name=cls.container_name(key), order=order))
        cls.config = os.path.join(cls.folder, "autodeploy.conf")
        with open(cls.config, "w") as fh:
            fh.write("\n".join(sections))
        # Two user-defined networks; net1 with a subnet of our own so a
        # container can have a static address on it.
        cls.net1 = "autodeploy-test-%s-net1" % cls.label
        cls.net2 = "autodeploy-test-%s-net2" % cls.label
        cls.subnet_prefix = cls._create_network_with_subnet(cls.net1)
        support.docker("network", "create", "--label", "autodeploy.test=" + cls.label, cls.net2)
        cls.networks.append(cls.net2)
        # A peer on the default bridge: target of --link and of
        # --network container:<peer>, publishing 8080 for whoever shares
        # its network namespace.
        cls.peer = "e2e-peer-%s" % cls.label
        cls.peer_port = support.free_port()
        peer_ref = "autodeploy-test-%s/peer:latest" % cls.label
        cls.images.append(peer_ref)
        cls.images.append(support.make_image(
            peer_ref, "peer", push=False,
            cmd=["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]))
        support.docker("run", "-d", "--name", cls.peer, "--label", "autodeploy.test=" + cls.label,
                       "-p", "127.0.0.1:%d:8080" % cls.peer_port, peer_ref)
        support.wait_running(cls.peer)
        cls.peer_id = inspect(cls.peer)["Id"]

    @classmethod
    def _create_network_with_subnet(cls, name: str) -> str:
        errors = []
        for _ in range(8):
            prefix = "10.%d.%d" % (200 + secrets.randbelow(50), secrets.randbelow(256))
            result = support.docker("network", "create", "--label", "autodeploy.test=" + cls.label,
                                    "--subnet", prefix + ".0/24", name, check=False)
            if result.returncode == 0:
                cls.networks.append(name)
                return prefix
            errors.append(result.stderr.strip())
        raise AssertionError("cannot create network %s: %s" % (name, errors))

    @classmethod
    def tearDownClass(cls):
        # Volumes of containers still there (a test failed midway) are
        # noted before the containers go.
        found = support.docker("ps", "-aq", "--filter", "label=autodeploy.test=%s" % cls.label,
                               check=False).stdout.split()
        for container in found:
            cls._note_volumes(container)
        support.cleanup_containers(cls.label)
        for network in cls.networks:
            support.docker("network", "rm", network, check=False)
        for volume in sorted(set(cls.volumes)):
            support.docker("volume", "rm", "-f", volume, check=False)
        support.cleanup_images(cls.images)
        cls.registry.stop()
        shutil.rmtree(cls.folder, ignore_errors=True)

    @classmethod
    def _note_volumes(cls, container: str) -> None:
        """Remember the Engine volumes `container` uses, to remove them at the
        end: anonymous volumes re-attached by name outlive `docker rm -v`."""
        result = support.docker("inspect", container, check=False)
        if result.returncode == 0:
            for mount in json.loads(result.stdout)[0].get("Mounts") or []:
                if mount.get("Type") == "volume" and mount.get("Name"):
                    cls.volumes.append(mount["Name"])

    # -- helpers -------------------------------------------------------------

    @classmethod
    def container_name(cls, key: str) -> str:
        if key == "compose":
            return "autodeploy-test-%s_web_1" % cls.label
        return "e2e-%s-%s" % (key, cls.label)

    def ref(self, key: str) -> str:
        return "%s/e2e/%s:latest" % (self.registry.host, key)

    def push(self, key: str, version: str, image: Optional[dict]) -> str:
        """Build and push <registry>/e2e/<key>:latest holding `version`."""
        kwargs = dict(image or {})
        kwargs.setdefault("cmd", app_cmd())
        self.images.append(self.ref(key))
        image_id = support.make_image(self.ref(key), version, **kwargs)
        self.images.append(image_id)
        return image_id

    def push_v2(self, key: str, v2: Optional[dict], v1_id: str) -> str:
        """Push v2 to the registry; locally the tag goes back to v1, so the
        deploy really pulls."""
        v2_id = self.push(key, "v2", v2)
        support.docker("tag", v1_id, self.ref(key))
        return v2_id

    def run_v1(self, key: str, run_args: List[str], cmd: List[str] = ()) -> str:
        name = self.container_name(key)
        self.addCleanup(self._note_volumes, name)
        support.docker("run", "-d", "--name", name, "--label", "autodeploy.test=" + self.label,
                       *(list(run_args) + [self.ref(key)] + list(cmd)))
        support.wait_running(name)
        return name

    def deploy(self, key: str) -> str:
        """`autodeploy.py --config CONF deploy e2e/<key>:latest`; its stdout."""
        result = subprocess.run(
            [sys.executable, os.path.join(support.ROOT, "autodeploy.py"), "--config", self.config,
             "deploy", "e2e/%s:latest" % key],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=120)
        detail = "exit %d\nstdout: %s\nstderr: %s" % (result.returncode, result.stdout, result.stderr)
        self.assertEqual(result.returncode, 0, detail)
        self.assertIn("succeeded", result.stdout, detail)
        return result.stdout

    def write_marks(self, name: str, folders: Iterable[str]) -> None:
        """Write <folder>/autodeploy-mark (as root) in the container."""
        script = "".join('echo "%s %s" > %s/autodeploy-mark && ' % (f, self.label, f) for f in folders)
        support.docker("exec", "-u", "0", name, "sh", "-c", script + "true")

    def assert_marks(self, name: str, folders: Iterable[str]) -> None:
        """Each folder still holds its mark (a subTest each, so that a lost
        volume does not hide the field-by-field comparison)."""
        for folder in folders:
            got = support.docker("exec", name, "cat", folder + "/autodeploy-mark", check=False)
            with self.subTest("data kept", folder=folder):
                self.assertEqual((got.returncode, got.stdout), (0, "%s %s\n" % (folder, self.label)),
                                 "data written to %s before the deploy is gone: %s"
                                 % (folder, got.stderr.strip()))

    def answer(self, port: int, version: str) -> None:
        support.wait_http("http://127.0.0.1:%d/" % port, timeout=20, expect_body=version + "\n")

    def recreate(self, key: str, run_args: List[str], cmd: List[str] = (),
                 v1: Optional[dict] = None, v2: Optional[dict] = None, port: Optional[int] = None,
                 marks: Iterable[str] = (), after_run=None) -> Tuple[dict, dict, str]:
        """Run v1 with `run_args`, deploy v2; (old inspect, new inspect, deploy stdout).
        Checks the new container runs v2 under the same name, answers v2 on
        `port` and still holds the data written in `marks`."""
        v1_id = self.push(key, "v1", v1)
        name = self.run_v1(key, run_args, cmd)
        if after_run:
            after_run(name)
        if port:
            self.answer(port, "v1")
        self.write_marks(name, marks)
        v2_id = self.push_v2(key, v2, v1_id)
        old = inspect(name)
        self.volumes.extend(m["Name"] for m in old["Mounts"] if m.get("Name"))
        self.assertEqual(old["Image"], v1_id)
        out = self.deploy(key)
        new = inspect(name)
        self.assertEqual(new["Image"], v2_id, "the container does not run v2")
        self.assertEqual(new["Config"]["Image"], self.ref(key))
        self.assertNotEqual(new["Id"], old["Id"])
        self.assertEqual(support.containers_named(name), [name], "old container left behind")
        support.wait_running(name)
        if port:
            self.answer(port, "v2")
        self.assert_marks(name, marks)
        return old, new, out

    def assert_faithful(self, old: dict, new: dict, allowed: Iterable[str] = ()) -> None:
        """Fail listing every inspect path that differs between `old` and its
        recreation `new`, except the engine-assigned ones and `allowed`."""
        allowed = list(ENGINE_ASSIGNED) + list(allowed)
        if old["Config"].get("Hostname") == old["Id"][:12]:
            # Generated by the Engine: the new container gets its own.
            self.assertEqual(new["Config"].get("Hostname"), new["Id"][:12],
                             "the generated hostname was copied instead of generated afresh")
            allowed.append("Config.Hostname")
        self.assert_no_forced_mac(old, new)
        reattached = self.check_binds(old, new)
        # A volume re-attached by name ('<name>:<dest>' in Binds) shows the
        # Engine's default mode for named volumes, "z", where the anonymous
        # one showed "". Only that change is let through.
        old_mounts = {m["Destination"]: m for m in old.get("Mounts") or []}
        new_mounts = {m["Destination"]: m for m in new.get("Mounts") or []}
        for dest in reattached:
            modes = (old_mounts[dest].get("Mode"), (new_mounts.get(dest) or {}).get("Mode"))
            if modes == ("", "z"):
                allowed.append(_literal("Mounts.%s.Mode" % dest))
        # An anonymous volume from --mount (HostConfig.Mounts without a
        # Source) may be re-attached by naming it there instead.
        old_specs = old["HostConfig"].get("Mounts") or []
        new_specs = new["HostConfig"].get("Mounts") or []
        for index, (before, after) in enumerate(zip(old_specs, new_specs)):
            volume = old_mounts.get(before.get("Target")) or {}
            if before.get("Type") == "volume" and not before.get("Source") \
                    and after.get("Source") and after.get("Source") == volume.get("Name"):
                allowed.append(_literal("HostConfig.Mounts[%d].Source" % index))
        lines = differences(normalise(old), normalise(new), allowed)
        if lines:
            self.fail("the recreated container %s differs from the old one in %d path(s):\n%s"
                      % (new["Name"], len(lines), "\n".join(lines)))

    def assert_no_forced_mac(self, old: dict, new: dict) -> None:
        self.assertFalse(new["Config"].get("MacAddress"),
                         "a MAC address was forced on the new container")
        old_nets = old["NetworkSettings"]["Networks"] or {}
        if (new["HostConfig"].get("NetworkMode") or "").startswith("container:"):
            old_nets = {}  # the peer's endpoint (Podman shows it): its MAC is the same
        for network, endpoint in (new["NetworkSettings"]["Networks"] or {}).items():
            before = old_nets.get(network) or {}
            if not endpoint.get("MacAddress") or not before.get("MacAddress"):
                continue
            if before.get("IPAddress") and before["MacAddress"] == _mac_of(before["IPAddress"]):
                # Docker 20.10 derives the MAC from the address.
                self.assertEqual(endpoint["MacAddress"], _mac_of(endpoint["IPAddress"]),
                                 "MAC on %s not generated from the new address" % network)
            else:
                self.assertNotEqual(endpoint["MacAddress"], before["MacAddress"],
                                    "the old MAC on %s was copied" % network)

    def check_binds(self, old: dict, new: dict) -> List[str]:
        """New Binds = old Binds, plus one '<volume name>:<dest>[:ro]' per
        anonymous volume of the old container; returns those destinations."""
        old_binds = old["HostConfig"].get("Binds") or []
        new_binds = list(new["HostConfig"].get("Binds") or [])
        self.assertEqual(new_binds[:len(old_binds)], old_binds, "HostConfig.Binds changed")
        old_mounts = {m["Destination"]: m for m in old.get("Mounts") or []}
        named_by_user = {b.split(":")[1] for b in old_binds if ":" in b}
        reattached = []
        for bind in new_binds[len(old_binds):]:
            volume, _, rest = bind.partition(":")
            dest, _, mode = rest.partition(":")
            mount = old_mounts.get(dest)
            self.assertTrue(mount and mount.get("Type") == "volume" and mount.get("Name") == volume
                            and dest not in named_by_user and mode in ("", "ro")
                            and (mode == "ro") == (not mount.get("RW")),
                            "HostConfig.Binds entry %r added that re-attaches no anonymous volume "
                            "of the old container (old Mounts: %r)" % (bind, old.get("Mounts")))
            reattached.append(dest)
        return reattached

    # -- 1. image defaults against what the user set -------------------------

    def test_env_labels_and_image_defaults(self):
        port = support.free_port()
        v1 = dict(env=["OLD_ONLY=1", "SHARED=x", "OVERRIDE=image"],
                  labels={"img.old_only": "1", "img.shared": "x", "img.override": "image"},
                  exposed=[8080, "9001/tcp"], extra_changes=["WORKDIR /www"],
                  healthcheck={"test": "test -f /www/index.html", "interval": 1})
        podman = support.is_podman()
        if podman:  # Podman 4.3's import refuses HEALTHCHECK; without systemd none would run
            del v1["healthcheck"]
        v2 = dict(env=["SHARED=x", "NEW_ONLY=2", "OVERRIDE=image2"],
                  labels={"img.shared": "x", "img.new_only": "2", "img.override": "image2"},
                  exposed=[8080, "9002/tcp"], extra_changes=["WORKDIR /tmp"],
                  **({} if podman else {"healthcheck": {"test": "test -d /www", "interval": 1}}))
        old, new, out = self.recreate(
            "env", ["-e", "USER_SET=yes", "-e", "OVERRIDE=user",
                    "--label", "user.set=yes", "--label", "img.override=user",
                    "-p", "127.0.0.1:%d:8080" % port], v1=v1, v2=v2, port=port)
        self.assertIn("still running" if podman else "HEALTHCHECK healthy", out)
        self.assertEqual(user_env(old),
                         ["OLD_ONLY=1", "OVERRIDE=user", "SHARED=x", "USER_SET=yes"])
        self.assertEqual(user_env(new),
                         ["NEW_ONLY=2", "OVERRIDE=user", "SHARED=x", "USER_SET=yes"])
        self.assertEqual(new["Config"]["Labels"],
                         {"autodeploy.test": self.label, "user.set": "yes", "img.override": "user",
                          "img.shared": "x", "img.new_only": "2"})
        # What only the image said follows the new image.
        self.assertEqual(new["Config"]["WorkingDir"], "/tmp")
        self.assertEqual(new["Config"]["ExposedPorts"], {"8080/tcp": {}, "9002/tcp": {}})
        if not podman:
            self.assertEqual(new["Config"]["Healthcheck"]["Test"], ["CMD-SHELL", "test -d /www"])
        self.assert_faithful(old, new, allowed=[
            "Config.Env*", "Config.Labels.*", "Config.WorkingDir",
            "Config.ExposedPorts.*", "Config.Healthcheck.*",
            # exposed, unpublished ports follow the image's EXPOSE
            "NetworkSettings.Ports.9001/tcp", "NetworkSettings.Ports.9002/tcp",
            # (Podman also lists them, null, in PortBindings)
            "HostConfig.PortBindings.9001/tcp", "HostConfig.PortBindings.9002/tcp"])

    # -- 2. everything a user sets -------------------------------------------

    def test_everything_a_user_sets(self):
        port, udp_port = support.free_port(), support.free_port()
        bind = tempfile.mkdtemp(prefix="bind-", dir=self.folder)
        os.chmod(bind, 0o755)
        with open(os.path.join(bind, "autodeploy-mark"), "w") as fh:
            fh.write("/bind %s\n" % self.label)
        bind_rw = tempfile.mkdtemp(prefix="bind-rw-", dir=self.folder)
        os.chmod(bind_rw, 0o755)
        named = "autodeploy-test-%s-named" % self.label
        named2 = "autodeploy-test-%s-named2" % self.label
        self.volumes.extend([named, named2])
        # The image's own command listens on 9090: only the user's override
        # makes the app answer on the published 8080.
        image = dict(cmd=app_cmd(9090), port=9090, volumes=["/imgvol"])
        old, new, out = self.recreate("full", [
            "--hostname", "full-app", "--domainname", "example.test",
            "--user", "1000:1000", "--group-add", "2000", "-w", "/www",
            "-e", "APP_MODE=full", "--label", "com.example.role=web",
            "--restart", "unless-stopped",
            "--log-opt", "max-size=1m", "--log-opt", "max-file=2",
            "--memory", "64m", "--cpus", "0.5", "--pids-limit", "200", "--shm-size", "32m",
            "--oom-score-adj", "100",
            "--ulimit", "nofile=1024:2048", "--security-opt", "no-new-privileges",
            "--cap-add", "NET_ADMIN", "--cap-drop", "MKNOD",
            "--add-host", "db.local:10.9.9.9", "--dns", "10.0.0.53",
            "--tmpfs", "/run/cache", "--init", "--read-only",
            "--stop-signal", "SIGINT", "--stop-timeout", "7",
        ] + self.health_and_limits() + [
            "-p", "127.0.0.1:%d:8080" % port, "-p", "127.0.0.1:%d:8081/udp" % udp_port,
            "--expose", "7000",
            "-v", "%s:/bind:ro" % bind, "-v", "%s:/named" % named, "-v", "/anon",
            "--mount", "type=volume,destination=/anon-mount",
            "--mount", "type=volume,source=%s,target=/named2" % named2,
            "--mount", "type=bind,source=%s,target=/bind-mount" % bind_rw,
        ], cmd=["/bin/sh", "-c", USER_SHELL_CMD], v1=image, v2=image, port=port,
            marks=["/named", "/anon", "/imgvol", "/anon-mount", "/named2", "/bind-mount"])
        self.assertIn("still running" if support.is_podman() else "HEALTHCHECK healthy", out)
        self.assert_marks(new["Name"].lstrip("/"), ["/bind"])
        self.assertEqual(new["Config"]["User"], "1000:1000")
        self.assertEqual(new["Config"]["Cmd"], ["/bin/sh", "-c", USER_SHELL_CMD])
        self.assertEqual(new["Config"]["Hostname"], "full-app")
        self.assertTrue(new["HostConfig"]["Init"])
        self.assert_faithful(old, new)

    @staticmethod
    def health_and_limits() -> List[str]:
        """A healthcheck on Docker. On Podman none (without systemd it never
        runs), and nproc given: a --ulimit replaces containers.conf's
        default_ulimits, and Podman's own nproc default exceeds what this
        host lets it set."""
        if not support.is_podman():
            return ["--health-cmd", "test -f /www/index.html", "--health-interval", "1s"]
        nproc = support.podman_ulimits()[1]
        return ["--ulimit", "nproc=%d:%d" % (nproc, nproc)]

    def test_entrypoint_override(self):
        port = support.free_port()
        # The image's own entrypoint and command fail: only the user's run.
        image = dict(cmd=["exit 3"], extra_changes=['ENTRYPOINT ["/bin/sh", "-c"]'])
        old, new, _ = self.recreate(
            "entrypoint", ["--entrypoint", "/bin/sh", "-p", "127.0.0.1:%d:8080" % port],
            cmd=["-c", USER_SHELL_CMD], v1=image, v2=image, port=port)
        self.assertEqual(new["Config"]["Entrypoint"], ["/bin/sh"])
        self.assertEqual(new["Config"]["Cmd"], ["-c", USER_SHELL_CMD])
        self.assert_faithful(old, new)

    def test_entrypoint_reset(self):
        # `--entrypoint ""` clears the image's ENTRYPOINT; inspect then shows
        # Entrypoint null, and the recreation must not bring the image's back.
        port = support.free_port()
        image = dict(cmd=["exit 3"], extra_changes=['ENTRYPOINT ["/bin/sh", "-c"]'])
        old, new, _ = self.recreate(
            "noentrypoint", ["--entrypoint", "", "-p", "127.0.0.1:%d:8080" % port],
            cmd=["/bin/sh", "-c", USER_SHELL_CMD], v1=image, v2=image, port=port)
        # Podman shows the cleared entrypoint as [""].
        cleared = [""] if support.is_podman() else None
        self.assertEqual(old["Config"]["Entrypoint"], cleared)
        self.assertEqual(new["Config"]["Entrypoint"], cleared)
        self.assertEqual(new["Config"]["Cmd"], ["/bin/sh", "-c", USER_SHELL_CMD])
        self.assert_faithful(old, new)

    def test_command_override_under_the_image_entrypoint(self):
        port = support.free_port()
        image = dict(cmd=["exit 3"], extra_changes=['ENTRYPOINT ["/bin/sh", "-c"]'])
        old, new, _ = self.recreate(
            "cmd", ["-p", "127.0.0.1:%d:8080" % port], cmd=[USER_SHELL_CMD],
            v1=image, v2=image, port=port)
        self.assertEqual(new["Config"]["Entrypoint"], ["/bin/sh", "-c"])
        self.assertEqual(new["Config"]["Cmd"], [USER_SHELL_CMD])
        self.assert_faithful(old, new)

    # -- 3. networks ---------------------------------------------------------

    @support.skip_on_podman("Podman refuses --link (\"link is not supported\")")
    def test_default_bridge_with_a_link(self):
        port = support.free_port()
        old, new, _ = self.recreate(
            "bridge", ["-p", "127.0.0.1:%d:8080" % port, "--link", self.peer + ":db"], port=port)
        self.assertEqual(list(new["NetworkSettings"]["Networks"]), ["bridge"])
        self.assertEqual(new["HostConfig"]["Links"],
                         ["/%s:/%s/db" % (self.peer, self.container_name("bridge"))])
        self.assert_faithful(old, new)

    @support.skip_on_podman("Podman 4.3's inspect reports no IPAMConfig for --ip, so a static "
                            "address cannot be seen, nor kept (README, Podman)")
    def test_user_network_with_alias_and_static_address(self):
        port = support.free_port()
        address = self.subnet_prefix + ".50"
        old, new, _ = self.recreate(
            "alias", ["--network", self.net1, "--network-alias", "web-alias", "--ip", address,
                      "-p", "127.0.0.1:%d:8080" % port], port=port)
        endpoint = new["NetworkSettings"]["Networks"][self.net1]
        self.assertEqual(endpoint["IPAddress"], address)
        self.assertIn("web-alias", endpoint["Aliases"])
        self.assert_faithful(old, new)

    def test_two_user_networks(self):
        port = support.free_port()

        def connect(container):
            support.docker("network", "connect", "--alias", "a2", self.net2, container)
        old, new, _ = self.recreate(
            "twonets", ["--network", self.net1, "--network-alias", "a1",
                        "-p", "127.0.0.1:%d:8080" % port], port=port, after_run=connect)
        networks = new["NetworkSettings"]["Networks"]
        self.assertEqual(sorted(networks), sorted([self.net1, self.net2]))
        self.assertEqual(sorted(networks[self.net1]["Aliases"]), sorted(["a1", new["Id"][:12]]))
        self.assertEqual(sorted(networks[self.net2]["Aliases"]), sorted(["a2", new["Id"][:12]]))
        self.assert_faithful(old, new)

    def test_host_network(self):
        port = support.free_port()
        image = dict(cmd=app_cmd(port), port=port)
        old, new, _ = self.recreate("host", ["--network", "host"], v1=image, v2=image, port=port)
        self.assertEqual(new["HostConfig"]["NetworkMode"], "host")
        self.assert_faithful(old, new)

    def test_no_network(self):
        old, new, _ = self.recreate("none", ["--network", "none"])
        self.assertEqual(new["HostConfig"]["NetworkMode"], "none")
        served = support.docker("exec", new["Id"], "wget", "-qO-", "http://127.0.0.1:8080/")
        self.assertEqual(served.stdout, "v2\n")
        self.assert_faithful(old, new)

    def test_network_of_another_container(self):
        old, new, _ = self.recreate("netcontainer", ["--network", "container:" + self.peer],
                                    port=self.peer_port)
        # autodeploy creates the new one with container:<peer name>; the
        # Engine may store the mode with the name or with the peer's id.
        # Either way both must name this very peer.
        modes = ("container:" + self.peer, "container:" + self.peer_id)
        self.assertIn(old["HostConfig"]["NetworkMode"], modes)
        self.assertIn(new["HostConfig"]["NetworkMode"], modes)
        if not support.is_podman():  # Podman gives each its own UTS namespace, hostname
            self.assertEqual(new["Config"]["Hostname"], inspect(self.peer)["Config"]["Hostname"])
        self.assert_faithful(old, new, allowed=["HostConfig.NetworkMode"])

    def test_start_first_on_a_user_network(self):
        # No host port, no static address: order = auto starts v2 first.
        old, new, out = self.recreate(
            "startfirst", ["--network", self.net2, "--network-alias", "sf-alias"])
        self.assertIn("started before the old one stopped", out)
        served = support.docker("exec", new["Id"], "wget", "-qO-", "http://sf-alias:8080/")
        self.assertEqual(served.stdout, "v2\n")
        self.assert_faithful(old, new)

    # -- 4. Docker Compose ---------------------------------------------------

    def compose_command(self) -> str:
        found = shutil.which("docker-compose")
        if found:
            return found
        reason = "docker-compose is not installed"
        if os.geteuid() == 0:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            for command in (["apt-get", "install", "-y", "docker-compose"], ["apt-get", "update"],
                            ["apt-get", "install", "-y", "docker-compose"]):
                result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        universal_newlines=True, timeout=900)
                if command[1] == "install" and result.returncode == 0:
                    break
                reason = "apt-get install docker-compose failed: %s" % result.stdout[-1000:]
            found = shutil.which("docker-compose")
        if found:
            return found
        if os.environ.get("CI") == "true":
            self.fail(reason)
        self.skipTest(reason)

    def test_docker_compose_service(self):
        compose = self.compose_command()
        key, port = "compose", support.free_port()
        project = "autodeploy-test-%s" % self.label
        name = self.container_name(key)
        folder = tempfile.mkdtemp(prefix="compose-", dir=self.folder)
        path = os.path.join(folder, "docker-compose.yml")
        with open(path, "w") as fh:
            fh.write("""version: "2.4"
services:
  web:
    image: {ref}
    ports:
      - "127.0.0.1:{port}:8080"
    volumes:
      - data:/data
    labels:
      autodeploy.test: "{run}"
  client:
    image: {ref}
    command: ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
    labels:
      autodeploy.test: "{run}"
volumes:
  data: {{}}
""".format(ref=self.ref(key), port=port, run=self.label))
        client = "autodeploy-test-%s_client_1" % self.label

        def from_sibling() -> str:
            """What the project's other service gets from http://web:8080/ (by service name)."""
            return support.docker("exec", client, "wget", "-qO-",
                                  "http://web:8080/").stdout

        def compose_run(*args, check=True):
            result = subprocess.run([compose, "-p", project, "-f", path] + list(args),
                                    env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    universal_newlines=True, timeout=120)
            if check:
                self.assertEqual(result.returncode, 0, "docker-compose %s: %s%s"
                                 % (" ".join(args), result.stdout, result.stderr))
            return result

        v1_id = self.push(key, "v1", None)
        self.addCleanup(compose_run, "down", "-v", check=False)
        self.addCleanup(self._note_volumes, name)
        compose_run("up", "-d")
        support.wait_running(name)
        self.answer(port, "v1")
        support.wait_running(client)
        self.assertEqual(from_sibling(), "v1\n")
        self.write_marks(name, ["/data"])
        v2_id = self.push_v2(key, None, v1_id)
        old = inspect(name)
        self.assertEqual(old["Image"], v1_id)
        self.deploy(key)
        new = inspect(name)
        self.assertEqual(new["Image"], v2_id)
        support.wait_running(name)
        self.answer(port, "v2")
        self.assert_marks(name, ["/data"])
        self.assertEqual(support.containers_named(name), [name])
        listed = compose_run("ps")
        self.assertIn(name, listed.stdout)
        self.assertEqual(compose_run("ps", "-q", "web").stdout.split(), [new["Id"]])
        self.assertEqual(from_sibling(), "v2\n")  # the service name still reaches it

        def compose_labels(doc):
            return {k: v for k, v in doc["Config"]["Labels"].items()
                    if k.startswith("com.docker.compose.")}
        self.assertTrue(compose_labels(old))
        self.assertEqual(compose_labels(new), compose_labels(old))
        self.assert_faithful(old, new)


if __name__ == "__main__":
    unittest.main()
