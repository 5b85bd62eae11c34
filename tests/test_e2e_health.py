"""End to end: the health gate, rollback, start-first and a burst of webhooks,
on the real service, a real Docker Engine and a real registry."""

import time
import unittest

from tests import support
from tests.support import (ServiceProcess, app_cmd, containers_named, hub_payload, inspect,
                           main_section)

BURST_APPS = ("burst-a", "burst-b", "burst-c")
BURST_TAGS = ["t%d" % n for n in range(1, 8)]


# Why the HEALTHCHECK tests cannot run on Podman here.
PODMAN_NO_HEALTHCHECK = ("Podman runs healthchecks from systemd timers and this VM has no "
                         "systemd, so a health status never comes; Podman 4.3's import also "
                         "refuses a HEALTHCHECK change")


class HealthGateTest(unittest.TestCase):
    """One service with an app per scenario."""

    @classmethod
    def setUpClass(cls):
        support.start_class_fixture(cls)
        cls.ports = {name: support.free_port() for name in ("crash", "unhealthy", "healthy", "loop", "probe")}
        cls.network = "autodeploy-test-%s-zero" % cls.label
        support.docker("network", "create", "--label", "autodeploy.test=" + cls.label, cls.network)
        sections = []
        for name, port in cls.ports.items():
            sections.append("""
[e2e/{name}]
image = {reg}/e2e/{name}
container = e2e-{name}-{run}
ports = 127.0.0.1:{port}:8080
restart = {restart}
settle = 2
health_timeout = {timeout}{probe}
labels = autodeploy.test={run}
""".format(name=name, reg=cls.registry.host, run=cls.label, port=port,
           restart="always" if name == "loop" else "unless-stopped",
           timeout=3 if name == "probe" else 20,
           probe="\nhealth_url = http://{ip}:8080/" if name == "probe" else ""))
        sections.append("""
[e2e/zero]
image = {reg}/e2e/zero
container = e2e-zero-{run}
settle = 1
""".format(reg=cls.registry.host, run=cls.label))
        for app in BURST_APPS:
            sections.append("""
[e2e/{app}]
image = {reg}/e2e/{app}
container = e2e-{app}-{run}
tag = {tags}
settle = 1
labels = autodeploy.test={run}
""".format(app=app, reg=cls.registry.host, run=cls.label, tags=" ".join(BURST_TAGS)))
        cls.service_port = support.free_port()
        config = main_section(cls.service_port, cls.callbacks, workers=3, admin_token=None) + "".join(sections)
        cls.service = ServiceProcess(config, cls.env).start(cls.service_port)

    @classmethod
    def tearDownClass(cls):
        cls.service.stop()
        support.stop_class_fixture(cls)
        support.docker("network", "rm", cls.network, check=False)

    # -- helpers -------------------------------------------------------------

    def push(self, app: str, version: str, tag: str = "latest", **image) -> str:
        ref = "%s/e2e/%s:%s" % (self.registry.host, app, tag)
        image.setdefault("cmd", app_cmd())
        image_id = support.make_image(ref, version, **image)
        self.images += [ref, image_id]
        return image_id

    def deploy(self, app: str, callback_name: str, tag: str = "latest") -> dict:
        status, answer = self.service.post(hub_payload("e2e/" + app, tag, self.callbacks.url(callback_name)))
        self.assertEqual(status, 202, answer)
        return self.callbacks.wait_for(callback_name)

    def start_v1(self, app: str) -> str:
        """Push v1 and deploy it (first deploy, from the config section)."""
        v1 = self.push(app, "v1")
        outcome = self.deploy(app, app + "-v1")
        self.assertEqual(outcome["state"], "success", outcome)
        self.assertAnswers(app, "v1")
        return v1

    def assertAnswers(self, app: str, version: str) -> None:
        name = "e2e-%s-%s" % (app, self.label)
        support.wait_running(name)
        self.assertEqual(support.wait_http("http://127.0.0.1:%d/" % self.ports[app],
                                           expect_body=version + "\n"), version + "\n")

    def assertRolledBack(self, app: str, v1: str, outcome: dict, *reasons: str) -> None:
        name = "e2e-%s-%s" % (app, self.label)
        self.assertEqual(outcome["state"], "failure", outcome)
        for reason in reasons:
            self.assertIn(reason, outcome["description"])
        self.assertEqual(containers_named(name), [name])
        self.assertEqual(inspect(name)["Image"], v1)
        self.assertTrue(inspect(name)["State"]["Running"])
        self.assertAnswers(app, "v1")

    # -- the scenarios ---------------------------------------------------------

    def test_new_version_that_exits_at_once_is_rolled_back(self):
        v1 = self.start_v1("crash")
        self.push("crash", "v2", cmd=["/bin/sh", "-c", "echo boom: no config; exit 3"])
        outcome = self.deploy("crash", "crash-v2")
        self.assertRolledBack("crash", v1, outcome, "exit code 3", "old one runs again", "boom: no config")

    @support.skip_on_podman(PODMAN_NO_HEALTHCHECK)
    def test_failing_healthcheck_is_rolled_back(self):
        v1 = self.start_v1("unhealthy")
        self.push("unhealthy", "v2", healthcheck={"test": "false", "interval": 0.3, "retries": 1})
        outcome = self.deploy("unhealthy", "unhealthy-v2")
        self.assertRolledBack("unhealthy", v1, outcome, "unhealthy")

    @support.skip_on_podman(PODMAN_NO_HEALTHCHECK)
    def test_passing_healthcheck_swaps_and_removes_the_old_image(self):
        v1 = self.start_v1("healthy")
        v2 = self.push("healthy", "v2", healthcheck={"test": "test -f /www/index.html", "interval": 0.3})
        outcome = self.deploy("healthy", "healthy-v2")
        self.assertEqual(outcome["state"], "success", outcome)
        self.assertIn("HEALTHCHECK healthy", outcome["description"])
        name = "e2e-healthy-%s" % self.label
        self.assertEqual(containers_named(name), [name])
        self.assertEqual(inspect(name)["Image"], v2)
        self.assertAnswers("healthy", "v2")
        gone = support.docker("image", "inspect", v1, check=False)
        self.assertNotEqual(gone.returncode, 0, "the unused v1 image should be removed")

    def test_crash_loop_under_restart_always_is_rolled_back(self):
        v1 = self.start_v1("loop")
        self.push("loop", "v2", cmd=["/bin/sh", "-c", "sleep 0.3; exit 1"])
        outcome = self.deploy("loop", "loop-v2")
        self.assertRolledBack("loop", v1, outcome, "exit code 1")
        self.assertEqual(inspect("e2e-loop-%s" % self.label)["HostConfig"]["RestartPolicy"]["Name"], "always")

    def test_health_url_that_never_answers_is_rolled_back(self):
        v1 = self.start_v1("probe")
        # v2 listens on another port than the one its health URL names.
        self.push("probe", "v2", cmd=app_cmd(port=9999))
        outcome = self.deploy("probe", "probe-v2")
        self.assertRolledBack("probe", v1, outcome, ":8080/ did not answer within 3 s")
        v3 = self.push("probe", "v3")
        outcome = self.deploy("probe", "probe-v3")
        self.assertEqual(outcome["state"], "success", outcome)
        self.assertIn(":8080/ answered", outcome["description"])
        self.assertEqual(inspect("e2e-probe-%s" % self.label)["Image"], v3)

    @support.skip_on_podman("its client container's lookups through Podman's aardvark-dns can "
                            "stall mid-swap (it stopped printing once in three CI runs here); "
                            "start-first is checked on Podman by test_e2e_recreate")
    def test_start_first_without_host_ports_loses_no_request(self):
        name = "e2e-zero-%s" % self.label
        v1 = self.push("zero", "v1")
        support.docker("run", "-d", "--name", name, "--label", "autodeploy.test=" + self.label,
                       "--network", self.network, "--network-alias", "zeroapp",
                       "%s/e2e/zero:latest" % self.registry.host)
        support.wait_running(name)
        client = "e2e-zero-client-%s" % self.label
        # A client on the app's network, as a reverse proxy is: it resolves the
        # alias for every request, asks for / every 50 ms, and, like nginx's
        # proxy_next_upstream or Traefik's retry, tries once more (resolving
        # again) when a connection fails: an address that left the network
        # between the DNS answer and the connect is not an outage. At most
        # 600 requests (~40 s).
        fetch = ("ip=$(nslookup zeroapp 2>/dev/null | awk '/^Address: /{print $2; exit}'); "
                 "body=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 \"$ip\" 8080 2>/dev/null | tail -n 1); ")
        script = ("i=0; while [ $i -lt 600 ]; do retry=''; " + fetch +
                  "if [ -z \"$body\" ]; then retry=retried; " + fetch + "fi; "
                  "echo \"$i ${body:-FAIL(ip=$ip)} $retry\"; i=$((i+1)); sleep 0.05; done")
        support.docker("run", "-d", "--name", client, "--label", "autodeploy.test=" + self.label,
                       "--network", self.network, "%s/e2e/zero:latest" % self.registry.host, "sh", "-c", script)
        self.addCleanup(support.docker, "rm", "-f", client, check=False)
        self.wait_for_lines(client, 10)
        self.push("zero", "v2")
        outcome = self.deploy("zero", "zero-v2")
        self.assertEqual(outcome["state"], "success", outcome)
        self.assertIn("started before the old one stopped", outcome["description"])
        seen = self.wait_for_lines(client, len(self.client_lines(client)) + 10)
        bodies = [line.split()[1] for line in seen if len(line.split()) > 1]
        failures = [b for b in bodies if b not in ("v1", "v2")]
        self.assertEqual(failures, [], "requests failed during a start-first deploy")
        retried = [line for line in seen if line.endswith("retried")]
        self.assertLessEqual(len(retried), 2, "more than a moment where the old address answered")
        self.assertEqual(bodies[0], "v1")
        self.assertEqual(bodies[-1], "v2")
        self.assertEqual(containers_named(name), [name])
        self.assertNotEqual(inspect(name)["Image"], v1)

    def client_lines(self, client: str) -> list:
        return support.docker("logs", client).stdout.split("\n")[:-1]

    def wait_for_lines(self, client: str, count: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.client_lines(client)
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline:
                raise AssertionError("client printed %d lines, not %d" % (len(lines), count))
            time.sleep(0.1)

    def test_burst_of_20_webhooks_across_3_apps(self):
        images = {}
        for app in BURST_APPS:
            for n, tag in enumerate(BURST_TAGS):
                images[app, tag] = self.push(app, "%s-%s" % (app, tag), tag=tag)
        last = {}
        for n in range(20):
            app, tag = BURST_APPS[n % 3], BURST_TAGS[n // 3]
            status, answer = self.service.post(
                hub_payload("e2e/" + app, tag, self.callbacks.url("burst-%d" % n)))
            self.assertEqual(status, 202, answer)
            last[app] = tag
        outcomes = [self.callbacks.wait_for("burst-%d" % n, timeout=90) for n in range(20)]
        self.assertEqual([o["state"] for o in outcomes], ["success"] * 20, outcomes)
        for app in BURST_APPS:
            name = "e2e-%s-%s" % (app, self.label)
            self.assertEqual(containers_named(name), [name])
            self.assertEqual(inspect(name)["Image"], images[app, last[app]], app)
        self.assertEqual(last, {"burst-a": "t7", "burst-b": "t7", "burst-c": "t6"})
        log = self.service.log_text()
        for bad in (" ERROR ", "Traceback", "Conflict", "already in use"):
            self.assertNotIn(bad, log)


if __name__ == "__main__":
    unittest.main()
