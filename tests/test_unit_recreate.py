"""Unit tests: the create body built from a real inspect document.

tests/fixtures/inspect-container-1.41.json is `docker inspect` of a container
started on Docker 20.10 with:
  docker run -d --name fixture-web --label app.tier=web
    --label com.docker.compose.project=shop -e APP_MODE=prod -e PATH=/usr/bin:/bin
    -p 127.0.0.1:18100:8080 -p 127.0.0.1:18101:8081/udp -v /tmp/fixture-bind:/bind:ro
    -v fixture-data:/data -v /anon --restart unless-stopped --network fixture-net
    --network-alias web --network-alias shop-web --stop-timeout 3 --memory 64m
    --cap-add NET_ADMIN --add-host db.local:10.9.9.9 --tmpfs /run/cache --init -w /www
    127.0.0.1:5555/test/app:v1
and inspect-image-1.41.json is that image (CMD httpd, EXPOSE-less, no ENV).

inspect-container-podman-4.3.json is `docker inspect` through Podman 4.3.1's
compat socket (default_ulimits nofile=20000, nproc=32768) of:
  docker run -d --name fixture-web --label app.tier=web -e APP_MODE=prod
    -p 127.0.0.1:18100:8080 -v fixture-data:/data --stop-timeout 3 127.0.0.1:5555/test/app:v1
and inspect-image-podman-4.3.json that image (CMD httpd, EXPOSE 8080,
ENV GREETING=hello), made with `docker import --change`.
"""

import copy
import json
import os
import socket
import unittest

from autodeploy import AppConfig, build_create_body, choose_order, probe_endpoint
from tests.unit_support import Receiver

HERE = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(name: str) -> dict:
    with open(os.path.join(HERE, name), encoding="utf-8") as fh:
        return json.load(fh)


class CreateBodyTest(unittest.TestCase):

    def setUp(self):
        self.old = fixture("inspect-container-1.41.json")
        self.image = fixture("inspect-image-1.41.json")["Config"]

    def build(self, old=None, image=None, multi=False):
        return build_create_body(old or self.old, self.image if image is None else image,
                                 "127.0.0.1:5555/test/app:v2", multi)

    def test_keeps_what_the_user_set(self):
        body, later = self.build()
        host = body["HostConfig"]
        self.assertEqual(body["Image"], "127.0.0.1:5555/test/app:v2")
        self.assertEqual(body["Env"], ["APP_MODE=prod", "PATH=/usr/bin:/bin"])
        self.assertEqual(body["Labels"], {"app.tier": "web", "com.docker.compose.project": "shop"})
        self.assertEqual(body["WorkingDir"], "/www")
        self.assertEqual(body["StopTimeout"], 3)
        self.assertEqual(host["PortBindings"], self.old["HostConfig"]["PortBindings"])
        self.assertEqual(set(body["ExposedPorts"]), {"8080/tcp", "8081/udp"})
        self.assertEqual(host["RestartPolicy"], {"MaximumRetryCount": 0, "Name": "unless-stopped"})
        self.assertEqual(host["Memory"], 64 * 1024 * 1024)
        self.assertEqual(host["CapAdd"], ["NET_ADMIN"])
        self.assertEqual(host["ExtraHosts"], ["db.local:10.9.9.9"])
        self.assertEqual(host["Tmpfs"], {"/run/cache": ""})
        self.assertTrue(host["Init"])
        self.assertEqual(host["NetworkMode"], "fixture-net")
        self.assertEqual(later, [])

    def test_the_image_defaults_are_left_to_the_new_image(self):
        body, _ = self.build()
        self.assertIsNone(body["Cmd"])         # equal to the old image's CMD
        self.assertIsNone(body["Entrypoint"])
        self.assertNotIn("Hostname", body)    # the Engine-generated short id

    def test_old_image_env_and_labels_are_dropped(self):
        image = copy.deepcopy(self.image)
        image["Env"] = ["PATH=/usr/bin:/bin", "OLD_ONLY=1"]
        image["Labels"] = {"app.tier": "web", "maintainer": "x"}
        old = copy.deepcopy(self.old)
        old["Config"]["Env"].append("OLD_ONLY=1")
        old["Config"]["Labels"]["maintainer"] = "x"
        body, _ = self.build(old, image)
        self.assertEqual(body["Env"], ["APP_MODE=prod"])
        self.assertEqual(body["Labels"], {"com.docker.compose.project": "shop"})

    def test_user_command_override_is_kept(self):
        old = copy.deepcopy(self.old)
        old["Config"]["Cmd"] = ["/bin/sh", "-c", "echo custom"]
        body, _ = self.build(old)
        self.assertEqual(body["Cmd"], ["/bin/sh", "-c", "echo custom"])

    def test_volumes_binds_and_anonymous_volume_by_name(self):
        body, _ = self.build()
        binds = body["HostConfig"]["Binds"]
        self.assertIn("/tmp/fixture-bind:/bind:ro", binds)
        self.assertIn("fixture-data:/data", binds)
        anon = [m for m in self.old["Mounts"] if m["Destination"] == "/anon"][0]
        self.assertIn("%s:/anon" % anon["Name"], binds)
        self.assertEqual(len(binds), 3)

    def test_network_endpoint_keeps_aliases_not_addresses(self):
        body, _ = self.build()
        endpoints = body["NetworkingConfig"]["EndpointsConfig"]
        self.assertEqual(list(endpoints), ["fixture-net"])
        endpoint = endpoints["fixture-net"]
        self.assertEqual(sorted(endpoint["Aliases"]), ["shop-web", "web"])
        for assigned in ("IPAddress", "MacAddress", "NetworkID", "EndpointID", "Gateway"):
            self.assertNotIn(assigned, endpoint)

    def test_second_network_is_connected_after_create_before_api_1_44(self):
        old = copy.deepcopy(self.old)
        networks = old["NetworkSettings"]["Networks"]
        networks["backend"] = dict(networks["fixture-net"], Aliases=["api", old["Id"][:12]])
        body, later = self.build(old)
        self.assertEqual(list(body["NetworkingConfig"]["EndpointsConfig"]), ["fixture-net"])
        self.assertEqual(later, [("backend", {"Aliases": ["api"]})])
        body, later = self.build(old, multi=True)
        self.assertEqual(sorted(body["NetworkingConfig"]["EndpointsConfig"]), ["backend", "fixture-net"])
        self.assertEqual(later, [])

    def test_host_and_container_network_modes(self):
        old = copy.deepcopy(self.old)
        old["HostConfig"]["NetworkMode"] = "host"
        old["Config"]["Hostname"] = "my-host"
        body, later = self.build(old)
        self.assertNotIn("NetworkingConfig", body)
        self.assertNotIn("Hostname", body)
        old["HostConfig"]["NetworkMode"] = "container:0123456789abcdef"
        body, _ = build_create_body(old, self.image, "x:v2", False, network_container="db")
        self.assertEqual(body["HostConfig"]["NetworkMode"], "container:db")

    def test_user_hostname_and_links(self):
        old = copy.deepcopy(self.old)
        old["Config"]["Hostname"] = "web-1"
        old["HostConfig"]["Links"] = ["/db:/fixture-web/database"]
        body, _ = self.build(old)
        self.assertEqual(body["Hostname"], "web-1")
        self.assertEqual(body["HostConfig"]["Links"], ["db:database"])

    def test_old_image_gone_keeps_everything(self):
        old = copy.deepcopy(self.old)
        body, _ = build_create_body(old, None, "x:v2", False)
        self.assertEqual(body["Cmd"], old["Config"]["Cmd"])

    def test_input_is_not_modified(self):
        before = copy.deepcopy(self.old)
        self.build()
        self.assertEqual(self.old, before)


class PodmanCreateBodyTest(unittest.TestCase):
    """What Podman 4.3's inspect reports that create must not take as is."""

    def setUp(self):
        self.old = fixture("inspect-container-podman-4.3.json")
        self.image = fixture("inspect-image-podman-4.3.json")["Config"]

    def build(self, old=None):
        return build_create_body(old or self.old, self.image, "127.0.0.1:5555/test/app:v2", False)

    def test_ulimits_take_the_names_create_accepts(self):
        self.assertEqual(self.old["HostConfig"]["Ulimits"][0]["Name"], "RLIMIT_NOFILE")
        body, _ = self.build()
        self.assertEqual(body["HostConfig"]["Ulimits"],
                         [{"Name": "nofile", "Soft": 20000, "Hard": 20000},
                          {"Name": "nproc", "Soft": 32768, "Hard": 32768}])

    def test_env_keeps_only_what_the_user_set(self):
        # Inspect: TERM, container=podman, the image's GREETING, APP_MODE,
        # Podman's default PATH and HOSTNAME=<old short id>.
        self.assertIn("HOSTNAME=" + self.old["Id"][:12], self.old["Config"]["Env"])
        body, _ = self.build()
        self.assertEqual(body["Env"], ["APP_MODE=prod"])

    def test_a_user_path_and_hostname_env_are_kept(self):
        old = copy.deepcopy(self.old)
        env = old["Config"]["Env"]
        env[env.index("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")] = "PATH=/opt/bin"
        env.append("HOSTNAME=db.example")
        body, _ = self.build(old)
        self.assertEqual(body["Env"], ["APP_MODE=prod", "PATH=/opt/bin", "HOSTNAME=db.example"])

    def test_term_and_path_are_podman_s_only_on_podman(self):
        # Without Podman's marker, TERM=xterm and that PATH are the user's.
        old = copy.deepcopy(self.old)
        old["Config"]["Env"].remove("container=podman")
        body, _ = self.build(old)
        self.assertEqual(body["Env"], ["TERM=xterm", "APP_MODE=prod",
                                       "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])

    def test_podman_s_defaults_leave_the_new_image_its_own(self):
        self.assertEqual((self.old["Config"]["Entrypoint"], self.old["Config"]["WorkingDir"],
                          self.old["Config"]["StopSignal"]), ([], "/", "15"))
        body, _ = self.build()
        self.assertIsNone(body["Cmd"])
        self.assertIsNone(body["Entrypoint"])
        self.assertEqual(body["WorkingDir"], "")
        self.assertNotIn("StopSignal", body)
        self.assertNotIn("Hostname", body)

    def test_a_user_workdir_and_stop_signal_are_kept(self):
        old = copy.deepcopy(self.old)
        old["Config"]["WorkingDir"], old["Config"]["StopSignal"] = "/srv", "2"
        body, _ = self.build(old)
        self.assertEqual((body["WorkingDir"], body["StopSignal"]), ("/srv", "2"))

    def test_named_volume_port_label_and_network_are_kept(self):
        body, later = self.build()
        host = body["HostConfig"]
        self.assertEqual(host["Binds"], ["fixture-data:/data:rw,rprivate,nosuid,nodev,rbind"])
        self.assertEqual(host["PortBindings"], {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18100"}]})
        self.assertEqual(body["Labels"], {"app.tier": "web"})
        self.assertEqual(body["StopTimeout"], 3)
        # Podman's default network is "podman" under NetworkMode "bridge";
        # its alias is the old short id: not kept.
        self.assertEqual(body["NetworkingConfig"], {"EndpointsConfig": {"podman": {}}})
        self.assertEqual(later, [])

    def test_an_exposed_unpublished_port_follows_the_image(self):
        # Seen: PortBindings {"8080/tcp": [...], "9001/tcp": null} for an
        # image that EXPOSEs 9001 and a container publishing only 8080.
        old = copy.deepcopy(self.old)
        old["HostConfig"]["PortBindings"]["9001/tcp"] = None
        old["Config"]["ExposedPorts"]["9001/tcp"] = {}
        image = dict(self.image, ExposedPorts={"8080/tcp": {}, "9001/tcp": {}})
        body, _ = build_create_body(old, image, "x:v2", False)
        self.assertEqual(body["ExposedPorts"], {"8080/tcp": {}})
        self.assertEqual(list(body["HostConfig"]["PortBindings"]), ["8080/tcp"])

    def test_cpus_is_sent_once(self):
        # Seen for --cpus 0.5: NanoCpus 500000000, CpuPeriod 100000, CpuQuota 50000.
        old = copy.deepcopy(self.old)
        old["HostConfig"].update(NanoCpus=500000000, CpuPeriod=100000, CpuQuota=50000)
        host = self.build(old)[0]["HostConfig"]
        self.assertEqual((host["NanoCpus"], host["CpuPeriod"], host["CpuQuota"]), (500000000, 0, 0))
        old["HostConfig"].update(NanoCpus=0)  # --cpu-quota/--cpu-period of the user's own
        host = self.build(old)[0]["HostConfig"]
        self.assertEqual((host["NanoCpus"], host["CpuPeriod"], host["CpuQuota"]), (0, 100000, 50000))


class OrderTest(unittest.TestCase):

    def setUp(self):
        self.old = fixture("inspect-container-1.41.json")
        self.app = AppConfig("a/b", "a/b", ("latest",), "web")

    def test_fixed_host_ports_mean_stop_first(self):
        self.assertEqual(choose_order(self.app, self.old), "stop-first")

    def test_no_host_ports_mean_start_first(self):
        old = copy.deepcopy(self.old)
        old["HostConfig"]["PortBindings"] = {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
        self.assertEqual(choose_order(self.app, old), "start-first")
        old["HostConfig"]["NetworkMode"] = "host"
        self.assertEqual(choose_order(self.app, old), "stop-first")

    def test_static_address_means_stop_first(self):
        old = copy.deepcopy(self.old)
        old["HostConfig"]["PortBindings"] = {}
        old["NetworkSettings"]["Networks"]["fixture-net"]["IPAMConfig"] = {"IPv4Address": "172.30.0.9"}
        self.assertEqual(choose_order(self.app, old), "stop-first")

    def test_configured_order_wins(self):
        self.app = self.app._replace(order="start-first")
        self.assertEqual(choose_order(self.app, self.old), "start-first")


class ProbeTest(unittest.TestCase):

    def serve(self, status):
        """A URL answering `status`, with a Location that must not be followed."""
        return Receiver(self, statuses=(status,), location="http://127.0.0.1:1/elsewhere").url

    def test_2xx_and_3xx_are_healthy_others_not(self):
        self.assertTrue(probe_endpoint(self.serve(200), 2))
        self.assertTrue(probe_endpoint(self.serve(302), 2))  # not followed
        self.assertFalse(probe_endpoint(self.serve(503), 2))

    def test_tcp_and_unreachable(self):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        self.assertTrue(probe_endpoint("tcp://127.0.0.1:%d" % port, 2))
        listener.close()
        self.assertFalse(probe_endpoint("tcp://127.0.0.1:%d" % port, 1))
        self.assertFalse(probe_endpoint("http://127.0.0.1:%d/" % port, 1))


if __name__ == "__main__":
    unittest.main()
