"""Unit tests of dockerapi against an in-process fake Engine on a temporary
Unix socket: what the real Engine cannot be made to do on demand (report
another API version, hang up mid-stream, go quiet)."""

import base64
import concurrent.futures
import http.server
import json
import os
import socketserver
import subprocess
import threading
import time
import unittest
import unittest.mock
import urllib.parse

import dockerapi
from dockerapi import DockerClient, DockerError, NotFound, Conflict
from tests.unit_support import serve_in_thread, temp_folder, write_file


class FakeEngine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Answers from `routes`: {(method, path-without-query): handler(request)}."""
    daemon_threads = True

    def __init__(self, path, version="1.41", min_version="1.12"):
        self.routes = {}
        self.requests = []
        self.version_doc = {"Version": "fake", "ApiVersion": version, "MinAPIVersion": min_version}
        super().__init__(path, FakeHandler)

    def handle_error(self, request, client_address):
        pass  # the client hanging up on a stalled stream is the point of some tests


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_one(self):
        path, _, query = self.path.partition("?")
        self.server.requests.append((self.command, self.path, dict(self.headers)))
        if path == "/version":
            return self.send_json(200, self.server.version_doc)
        handler = self.server.routes.get((self.command, path))
        if handler is None:
            return self.send_json(404, {"message": "no route %s %s" % (self.command, path)})
        handler(self)

    do_GET = do_POST = do_DELETE = handle_one

    def send_json(self, status, doc):
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_chunks(self, chunks, hang_up=False, pause=0.0, hold=None):
        """A chunked 200 with `chunks`, `pause` s apart; then a chunk cut
        short (`hang_up`), or nothing until the Event `hold` is set, or the end."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            time.sleep(pause)
        if hold is not None:
            hold.wait(10)
        if hang_up:
            self.wfile.write(b"40\r\n{\"status\":")  # a chunk cut short
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args):
        pass


class FakeEngineTest(unittest.TestCase):

    def start_engine(self, **kwargs):
        self.socket_path = os.path.join(temp_folder(self, "fake-engine-"), "docker.sock")
        return serve_in_thread(self.addCleanup, FakeEngine(self.socket_path, **kwargs))

    def client(self, **kwargs):
        return DockerClient("unix://" + self.socket_path, environ={}, **kwargs)


class NegotiationTest(FakeEngineTest):

    def test_docker_29_engine_that_refuses_old_clients(self):
        engine = self.start_engine(version="1.52", min_version="1.44")
        engine.routes[("GET", "/v1.47/containers/web/json")] = lambda h: h.send_json(200, {"Id": "abc"})
        client = self.client()
        self.assertEqual(client.inspect_container("web"), {"Id": "abc"})
        self.assertEqual(client.api_version, dockerapi.CLIENT_API_VERSION)
        self.assertTrue(client.api_at_least("1.44"))
        paths = [path for _, path, _ in engine.requests]
        self.assertEqual(paths, ["/version", "/v1.47/containers/web/json"])  # negotiated once

    def test_docker_20_10_engine(self):
        engine = self.start_engine(version="1.41", min_version="1.12")
        engine.routes[("GET", "/v1.41/containers/web/json")] = lambda h: h.send_json(200, {"Id": "abc"})
        client = self.client()
        client.inspect_container("web")
        self.assertEqual(client.api_version, "1.41")
        self.assertFalse(client.api_at_least("1.44"))

    def test_engine_newer_than_this_client_refuses_clearly(self):
        self.start_engine(version="1.60", min_version="1.50")
        with self.assertRaises(DockerError) as caught:
            self.client().inspect_container("web")
        self.assertIn("needs API 1.50 or newer", str(caught.exception))
        self.assertIn("use a newer autodeploy, or let dockerd accept API 1.47 "
                      "(DOCKER_MIN_API_VERSION=1.47 in its environment)", str(caught.exception))

    def test_engine_older_than_this_client_refuses_saying_to_upgrade_it(self):
        self.start_engine(version="1.39", min_version="1.12")
        with self.assertRaises(DockerError) as caught:
            self.client().inspect_container("web")
        self.assertEqual(str(caught.exception),
                         "the Docker Engine (version fake) speaks API 1.39; this client needs 1.40 "
                         "or newer: upgrade the Engine (Docker 19.03 and later speak 1.40)")

    def test_an_engine_upgraded_under_a_running_client_says_to_restart(self):
        engine = self.start_engine(version="1.41", min_version="1.12")
        engine.routes[("GET", "/v1.41/containers/web/json")] = lambda h: h.send_json(400, {
            "message": "client version 1.41 is too old. Minimum supported API version is 1.44, "
                       "please upgrade your client to a newer version"})
        with self.assertRaises(DockerError) as caught:
            self.client().inspect_container("web")
        self.assertIn("restart autodeploy to negotiate again", str(caught.exception))

    def test_negotiate_pure(self):
        negotiate = dockerapi.negotiate_api_version
        self.assertEqual(negotiate({"ApiVersion": "1.52", "MinAPIVersion": "1.44"}), "1.47")
        self.assertEqual(negotiate({"ApiVersion": "1.43", "MinAPIVersion": "1.12"}), "1.43")
        self.assertEqual(negotiate({"ApiVersion": "1.55", "MinAPIVersion": "1.40"}), "1.47")
        with self.assertRaises(DockerError):
            negotiate({"ApiVersion": "1.30", "MinAPIVersion": "1.12"})
        with self.assertRaises(DockerError):
            negotiate({})


class EngineNameTest(FakeEngineTest):
    """GET /version as Docker 20.10 and Podman 4.3.1 answer it (fixtures,
    component details left out)."""

    @staticmethod
    def version_doc(name):
        path = os.path.join(os.path.dirname(__file__), "fixtures", name)
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)

    def test_docker_and_podman_are_told_apart(self):
        self.assertEqual(dockerapi.engine_name(self.version_doc("version-docker-20.10.json")),
                         "Docker Engine")
        self.assertEqual(dockerapi.engine_name(self.version_doc("version-podman-4.3.json")), "Podman")
        self.assertEqual(dockerapi.engine_name({}), "Docker Engine")

    def test_describe_names_the_engine_its_version_and_the_api_spoken(self):
        engine = self.start_engine()
        engine.version_doc = self.version_doc("version-podman-4.3.json")
        self.assertEqual(self.client().describe(), "Podman 4.3.1 (API 1.41)")
        engine.version_doc = self.version_doc("version-docker-20.10.json")
        self.assertEqual(self.client().describe(), "Docker Engine 20.10.24+dfsg1 (API 1.41)")


class ErrorsTest(FakeEngineTest):

    def test_http_errors_carry_status_and_engine_message(self):
        engine = self.start_engine()
        engine.routes[("POST", "/v1.41/containers/create")] = lambda h: h.send_json(
            409, {"message": "Conflict. The container name \"/web\" is already in use"})
        client = self.client()
        with self.assertRaises(NotFound) as caught:
            client.inspect_container("missing")
        self.assertEqual(caught.exception.status, 404)
        with self.assertRaises(Conflict) as caught:
            client.create_container({"Image": "x"}, "web")
        self.assertIn("already in use", caught.exception.message)
        self.assertEqual(caught.exception.method, "POST")

    def test_every_path_and_query_argument_is_percent_encoded(self):
        engine = self.start_engine()
        client = self.client()
        with self.assertRaises(NotFound):
            client.inspect_container("../../images/x y?z")
        with self.assertRaises(NotFound):
            client.rename_container("web", "a&b=c")
        paths = [path for _, path, _ in engine.requests]
        self.assertIn("/v1.41/containers/..%2F..%2Fimages%2Fx%20y%3Fz/json", paths)
        self.assertIn("/v1.41/containers/web/rename?name=a%26b%3Dc", paths)

    def test_missing_socket_is_explained(self):
        client = DockerClient("unix:///nonexistent/docker.sock", environ={})
        with self.assertRaises(DockerError) as caught:
            client.version()
        self.assertIsNone(caught.exception.status)
        self.assertIn("cannot reach the Docker Engine at /nonexistent/docker.sock: no such socket",
                      str(caught.exception))

    def test_a_socket_refused_for_want_of_its_group_names_the_group_and_the_fix(self):
        path = write_file(temp_folder(self, "socket-"), "docker.sock", "")
        os.chmod(path, 0o660)
        group = __import__("grp").getgrgid(os.stat(path).st_gid).gr_name
        client = DockerClient("unix://" + path, environ={})
        with unittest.mock.patch.object(dockerapi.UnixHTTPConnection, "connect",
                                        side_effect=PermissionError(13, "Permission denied")), \
                unittest.mock.patch.object(dockerapi.os, "getegid", return_value=65534), \
                unittest.mock.patch.object(dockerapi.os, "getgroups", return_value=[]):
            with self.assertRaises(DockerError) as caught:
                client.version()
        self.assertIsNone(caught.exception.status)
        self.assertEqual(str(caught.exception), (
            "cannot reach the Docker Engine at {path}: permission denied: the socket is "
            "{owner}:{group}, mode 0660, and this process (uid {uid}) is not in group {group}: "
            "add the service's user to group {group} (SupplementaryGroups={group} in a "
            "systemd unit), then restart it").format(
                path=path, owner=__import__("pwd").getpwuid(os.stat(path).st_uid).pw_name,
                group=group, uid=os.geteuid()))

    def test_a_published_port_taken_gets_a_hint_naming_the_port(self):
        engine = self.start_engine()
        engine.routes[("POST", "/v1.41/containers/web/start")] = lambda h: h.send_json(500, {
            "message": "driver failed programming external connectivity on endpoint web (0123): "
                       "Bind for 127.0.0.1:39480 failed: port is already allocated"})
        engine.routes[("POST", "/v1.41/containers/api/start")] = lambda h: h.send_json(500, {
            "message": "driver failed programming external connectivity on endpoint api (4567): "
                       "Error starting userland proxy: listen tcp4 0.0.0.0:8080: bind: "
                       "address already in use"})
        client = self.client()
        with self.assertRaises(DockerError) as caught:
            client.start_container("web")
        self.assertTrue(caught.exception.message.endswith(
            "port is already allocated (host port 39480 is taken by another container or "
            "process: see `docker ps --filter publish=39480` and `ss -ltnp 'sport = :39480'`)"))
        with self.assertRaises(DockerError) as caught:
            client.start_container("api")
        self.assertIn("(host port 8080 is taken", caught.exception.message)

    def test_reasons_a_person_understands(self):
        self.assertIn("permission denied", dockerapi._reason(PermissionError(13, "x")))
        self.assertIn("refused", dockerapi._reason(ConnectionRefusedError()))
        self.assertIn("closed the connection", dockerapi._reason(ConnectionResetError()))

    def test_docker_host(self):
        self.assertEqual(dockerapi.parse_docker_host(None), ("unix", "/var/run/docker.sock"))
        self.assertEqual(dockerapi.parse_docker_host("unix:///run/d.sock"), ("unix", "/run/d.sock"))
        self.assertEqual(dockerapi.parse_docker_host("tcp://127.0.0.1:2375"), ("tcp", "127.0.0.1:2375"))
        with self.assertRaises(DockerError):
            dockerapi.parse_docker_host("ssh://host")
        client = DockerClient(environ={"DOCKER_HOST": "unix:///x.sock"})
        self.assertEqual(client.where, "/x.sock")


class PullTest(FakeEngineTest):

    def test_progress_then_success(self):
        engine = self.start_engine()
        lines = [b'{"status":"Pulling from app","id":"v1"}\r\n',
                 b'{"status":"Downloading"}\r\n{"status":"Digest: sha256:ab"}\r\n',
                 b'{"status":"Status: Downloaded newer image for app:v1"}\r\n']
        engine.routes[("POST", "/v1.41/images/create")] = lambda h: h.send_chunks(lines)
        seen = []
        self.client().pull_image("reg:5000/app", "v1", on_progress=seen.append)
        self.assertEqual(len(seen), 4)
        method, path, headers = engine.requests[-1]
        self.assertEqual(path, "/v1.41/images/create?fromImage=reg%3A5000%2Fapp&tag=v1")
        self.assertNotIn("X-Registry-Auth", headers)

    def test_error_inside_a_200_stream_raises(self):
        engine = self.start_engine()
        lines = [b'{"status":"Pulling"}\r\n',
                 b'{"errorDetail":{"message":"unauthorized: access denied"},"error":"unauthorized"}\r\n']
        engine.routes[("POST", "/v1.41/images/create")] = lambda h: h.send_chunks(lines)
        with self.assertRaises(DockerError) as caught:
            self.client().pull_image("app", "v1")
        self.assertIn("unauthorized: access denied", str(caught.exception))

    def test_engine_hanging_up_mid_stream_raises(self):
        engine = self.start_engine()
        engine.routes[("POST", "/v1.41/images/create")] = lambda h: h.send_chunks(
            [b'{"status":"Pulling"}\r\n'], hang_up=True)
        with self.assertRaises(DockerError) as caught:
            self.client().pull_image("app", "v1")
        self.assertIn("broke off", str(caught.exception))

    def test_idle_timeout_not_total_timeout(self):
        engine = self.start_engine()
        silence = threading.Event()
        self.addCleanup(silence.set)

        def pull(handler):
            if "fromImage=steady" in handler.path:  # 0.12 s in all, never 0.1 s idle
                handler.send_chunks([b'{"status":"Downloading"}\r\n'] * 6, pause=0.02)
            else:  # then nothing
                handler.send_chunks([b'{"status":"Downloading"}\r\n'], hold=silence)
        engine.routes[("POST", "/v1.41/images/create")] = pull
        # The two at once: one wait for both.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            steady, stalled = (pool.submit(self.client(pull_idle_timeout=0.1).pull_image, image, "v1")
                               for image in ("steady", "stalled"))
            steady.result(5)
            with self.assertRaises(DockerError) as caught:
                stalled.result(5)
        self.assertIn("timed out", str(caught.exception))

    def test_never_pulls_without_a_tag(self):
        self.start_engine()
        with self.assertRaises(DockerError):
            self.client().pull_image("app", "")

    def test_registry_credentials_from_docker_config(self):
        engine = self.start_engine()
        engine.routes[("POST", "/v1.41/images/create")] = lambda h: h.send_chunks([b'{"status":"ok"}\r\n'])
        config = write_file(temp_folder(self, "docker-config-"), "config.json", json.dumps({"auths": {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hubpass").decode()},
            "127.0.0.1:5000": {"auth": base64.b64encode(b"me:se:cret").decode()},
        }}))
        auth = dockerapi.load_registry_auth("127.0.0.1:5000/team/app", config)
        self.assertEqual(auth, {"username": "me", "password": "se:cret", "serveraddress": "127.0.0.1:5000"})
        self.assertEqual(dockerapi.load_registry_auth("myname/myrepo", config)["username"], "hubuser")
        self.assertIsNone(dockerapi.load_registry_auth("ghcr.io/a/b", config))
        self.client().pull_image("127.0.0.1:5000/team/app", "v1", auth=auth)
        header = engine.requests[-1][2]["X-Registry-Auth"]
        self.assertEqual(json.loads(base64.urlsafe_b64decode(header)), auth)
        self.assertEqual(dockerapi.docker_config_path({"DOCKER_CONFIG": "/etc/dc"}), "/etc/dc/config.json")
        self.assertEqual(dockerapi.docker_config_path({"HOME": "/home/u"}), "/home/u/.docker/config.json")

    def test_image_reference_helpers(self):
        self.assertEqual(dockerapi.split_image("host:5000/ns/app:v2"), ("host:5000/ns/app", "v2"))
        self.assertEqual(dockerapi.split_image("host:5000/ns/app"), ("host:5000/ns/app", "latest"))
        self.assertEqual(dockerapi.split_image("app@sha256:ab"), ("app", "sha256:ab"))
        self.assertEqual(dockerapi.registry_of("myname/myrepo"), "docker.io")
        self.assertEqual(dockerapi.registry_of("localhost/x"), "localhost")
        self.assertEqual(dockerapi.registry_of("ghcr.io/a/b"), "ghcr.io")


SECRET = "s3cr3t-Pa55"  # never to be seen in a message


class SwarmTest(FakeEngineTest):
    """The service calls: the requests they send, and how a stale version
    is told from other failures."""

    def test_update_sends_the_spec_the_version_and_the_credentials(self):
        engine = self.start_engine()
        seen = {}

        def update(handler):
            seen["body"] = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
            handler.send_json(200, {"Warnings": None})
        engine.routes[("POST", "/v1.41/services/svc1/update")] = update
        spec = {"Name": "web", "TaskTemplate": {"ContainerSpec": {"Image": "app:v2@sha256:" + "a" * 64}}}
        self.client().update_service("svc1", 17, spec, {"username": "u", "password": "p"})
        method, path, headers = engine.requests[-1]
        self.assertEqual(path, "/v1.41/services/svc1/update?version=17")
        self.assertEqual(seen["body"], spec)
        sent = json.loads(base64.urlsafe_b64decode(headers["X-Registry-Auth"] + "=="))
        self.assertEqual(sent["username"], "u")

    def test_update_without_credentials_sends_no_auth_header(self):
        engine = self.start_engine()
        engine.routes[("POST", "/v1.41/services/svc1/update")] = lambda h: h.send_json(200, {})
        self.client().update_service("svc1", 3, {"Name": "web"})
        self.assertNotIn("X-Registry-Auth", engine.requests[-1][2])

    def test_a_stale_version_is_out_of_sequence_as_409_or_500(self):
        engine = self.start_engine()
        for status in (409, 500):
            engine.routes[("POST", "/v1.41/services/svc1/update")] = (
                lambda h, status=status: h.send_json(status, {
                    "message": "rpc error: code = Unknown desc = update out of sequence"}))
            with self.assertRaises(dockerapi.OutOfSequence) as caught:
                self.client().update_service("svc1", 3, {})
            self.assertEqual(caught.exception.status, status)

    def test_other_update_failures_are_not_out_of_sequence(self):
        engine = self.start_engine()
        engine.routes[("POST", "/v1.41/services/svc1/update")] = (
            lambda h: h.send_json(409, {"message": "name conflicts with an existing object"}))
        with self.assertRaises(Conflict) as caught:
            self.client().update_service("svc1", 3, {})
        self.assertNotIsInstance(caught.exception, dockerapi.OutOfSequence)

    def test_inspect_list_services_and_tasks_with_filters(self):
        engine = self.start_engine()
        engine.routes[("GET", "/v1.41/services/web")] = lambda h: h.send_json(200, {"ID": "svc1"})
        engine.routes[("GET", "/v1.41/services")] = lambda h: h.send_json(200, [{"ID": "svc1"}])
        engine.routes[("GET", "/v1.41/tasks")] = lambda h: h.send_json(200, [{"ID": "t1"}])
        client = self.client()
        self.assertEqual(client.inspect_service("web"), {"ID": "svc1"})
        self.assertEqual(client.list_services({"label": ["autodeploy.enable=true"]}), [{"ID": "svc1"}])
        self.assertEqual(client.list_tasks({"service": ["svc1"]}), [{"ID": "t1"}])
        queries = [urllib.parse.parse_qs(path.partition("?")[2]) for _, path, _ in engine.requests[-2:]]
        self.assertEqual(json.loads(queries[0]["filters"][0]), {"label": ["autodeploy.enable=true"]})
        self.assertEqual(json.loads(queries[1]["filters"][0]), {"service": ["svc1"]})

    def test_a_missing_service_is_not_found(self):
        self.start_engine()
        with self.assertRaises(NotFound):
            self.client().inspect_service("nope")

    def test_manager_worker_and_no_swarm(self):
        engine = self.start_engine()
        answers = {"manager": {"Swarm": {"LocalNodeState": "active", "ControlAvailable": True}},
                   "worker": {"Swarm": {"LocalNodeState": "active", "ControlAvailable": False}},
                   "none": {"Swarm": {"LocalNodeState": "inactive"}},
                   "podman": {"host": {}}}
        for name, info in answers.items():
            engine.routes[("GET", "/v1.41/info")] = lambda h, info=info: h.send_json(200, info)
            self.assertEqual(self.client().is_swarm_manager(), name == "manager", name)
        self.assertEqual(self.client().swarm_info(), {})


class FakeHelpers:
    """An injected `run` for credential helpers: answers per program name,
    noting (argv, stdin, timeout) of each call. An answer is (exit status,
    stdout) or an exception to raise."""

    def __init__(self, **answers):
        self.answers = answers
        self.calls = []

    def __call__(self, argv, stdin, timeout):
        self.calls.append((argv, stdin, timeout))
        answer = self.answers.get(argv[0])
        if answer is None:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        if isinstance(answer, BaseException):
            raise answer
        status, stdout = answer
        return subprocess.CompletedProcess(argv, status, stdout.encode(), b"")


def helper_answer(username="alice", secret=SECRET, server="127.0.0.1:5000"):
    return 0, json.dumps({"ServerURL": server, "Username": username, "Secret": secret})


def basic(user, password):
    return base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


class RegistryCredentialsTest(unittest.TestCase):
    """find_registry_auth: where credentials come from, as the docker CLI looks."""

    IMAGE = "127.0.0.1:5000/team/app"

    def config(self, doc):
        return write_file(temp_folder(self, "docker-config-"), "config.json", json.dumps(doc))

    def find(self, doc, run=None, image=IMAGE):
        return dockerapi.find_registry_auth(image, self.config(doc), run or FakeHelpers())

    def assertFails(self, doc, run, *fragments):
        with self.assertRaises(dockerapi.CredentialsError) as caught:
            self.find(doc, run)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))
        self.assertNotIn(SECRET, str(caught.exception))
        self.assertIsNone(caught.exception.__cause__)
        return str(caught.exception)

    def test_a_registry_helper_wins_over_the_default_helper_and_auths(self):
        run = FakeHelpers(**{"docker-credential-reg": helper_answer(),
                             "docker-credential-store": helper_answer("bob")})
        found = self.find({"credHelpers": {"127.0.0.1:5000": "reg"}, "credsStore": "store",
                           "auths": {"127.0.0.1:5000": {"auth": basic("carol", "x")}}}, run)
        self.assertEqual(found.auth, {"username": "alice", "password": SECRET,
                                      "serveraddress": "127.0.0.1:5000"})
        self.assertEqual(found.source, "credential helper docker-credential-reg for 127.0.0.1:5000")
        self.assertEqual(run.calls, [(["docker-credential-reg", "get"], b"127.0.0.1:5000",
                                      dockerapi.CREDENTIAL_HELPER_TIMEOUT)])

    def test_the_default_helper_wins_over_auths_and_another_registrys_helper(self):
        run = FakeHelpers(**{"docker-credential-store": helper_answer("bob")})
        found = self.find({"credHelpers": {"ghcr.io": "gh"}, "credsStore": "store",
                           "auths": {"127.0.0.1:5000": {"auth": basic("carol", "x")}}}, run)
        self.assertEqual(found.auth["username"], "bob")
        self.assertIn("docker-credential-store", found.source)

    def test_auths_serve_when_no_helper_is_configured(self):
        found = self.find({"auths": {"127.0.0.1:5000": {"auth": basic("carol", SECRET)}}})
        self.assertEqual(found.auth, {"username": "carol", "password": SECRET,
                                      "serveraddress": "127.0.0.1:5000"})
        self.assertTrue(found.source.startswith("auths entry for 127.0.0.1:5000 in "), found.source)
        self.assertNotIn(SECRET, found.source)

    def test_nothing_for_the_registry_is_anonymous_and_says_so(self):
        found = self.find({"auths": {"ghcr.io": {"auth": basic("carol", "x")}}})
        self.assertIsNone(found.auth)
        self.assertTrue(found.source.startswith("anonymous: no credentials for 127.0.0.1:5000 in "))
        missing = dockerapi.find_registry_auth(self.IMAGE, "/nonexistent/config.json", FakeHelpers())
        self.assertIsNone(missing.auth)

    def test_docker_hub_is_asked_for_under_its_v1_url_whatever_the_helper_key(self):
        for key in ("https://index.docker.io/v1/", "docker.io", "index.docker.io"):
            with self.subTest(key=key):
                run = FakeHelpers(**{"docker-credential-hub": helper_answer(server="x")})
                found = self.find({"credHelpers": {key: "hub"}}, run, image="myname/myrepo")
                self.assertEqual(run.calls[0][1], b"https://index.docker.io/v1/")
                self.assertEqual(found.auth["serveraddress"], "https://index.docker.io/v1/")

    def test_a_token_username_means_the_secret_is_an_identity_token(self):
        run = FakeHelpers(**{"docker-credential-reg": helper_answer("<token>")})
        found = self.find({"credsStore": "reg"}, run)
        self.assertEqual(found.auth, {"identitytoken": SECRET, "serveraddress": "127.0.0.1:5000"})

    def test_a_helper_without_credentials_means_anonymous_as_with_the_docker_cli(self):
        run = FakeHelpers(**{"docker-credential-reg": (1, "credentials not found in native keychain\n")})
        found = self.find({"credsStore": "reg",
                           "auths": {"127.0.0.1:5000": {"auth": basic("carol", "x")}}}, run)
        self.assertIsNone(found.auth)
        self.assertEqual(found.source, "anonymous: credential helper docker-credential-reg "
                                       "for 127.0.0.1:5000 has none")
        empty = FakeHelpers(**{"docker-credential-reg": helper_answer("", "")})
        self.assertIsNone(self.find({"credsStore": "reg"}, empty).auth)

    def test_a_helper_missing_from_path_is_named(self):
        self.assertFails({"credsStore": "gone"}, FakeHelpers(),
                         "docker-credential-gone for 127.0.0.1:5000", "not found on PATH")

    def test_a_helper_that_times_out_is_named_with_the_limit(self):
        run = FakeHelpers(**{"docker-credential-slow": subprocess.TimeoutExpired("x", 10)})
        self.assertFails({"credsStore": "slow"}, run, "docker-credential-slow", "within 10 s")

    def test_a_failing_helper_is_named_with_its_own_words(self):
        run = FakeHelpers(**{"docker-credential-reg": (3, "gpg: decryption failed\nmore\n")})
        message = self.assertFails({"credsStore": "reg"}, run, "docker-credential-reg for 127.0.0.1:5000",
                                   "exit status 3", "gpg: decryption failed")
        self.assertNotIn("more", message)

    def test_an_answer_that_is_not_the_protocols_json_is_not_quoted(self):
        for stdout in (SECRET, json.dumps([SECRET])):
            with self.subTest(stdout=stdout):
                run = FakeHelpers(**{"docker-credential-reg": (0, stdout)})
                self.assertFails({"credsStore": "reg"}, run, "docker-credential-reg", "ServerURL")

    def test_an_unreadable_config_file_fails_without_quoting_it(self):
        path = write_file(temp_folder(self), "config.json", '{"auths": {"x": "%s"' % SECRET)
        with self.assertRaises(dockerapi.CredentialsError) as caught:
            dockerapi.find_registry_auth(self.IMAGE, path, FakeHelpers())
        self.assertIn(path, str(caught.exception))
        self.assertNotIn(SECRET, str(caught.exception))
        self.assertFails({"auths": {"127.0.0.1:5000": {"auth": "%%" + SECRET}}}, FakeHelpers(),
                         "auths entry for 127.0.0.1:5000", "base64")

    def test_the_real_runner_runs_a_helper_from_path_and_kills_a_slow_one(self):
        folder = temp_folder(self, "helpers-")
        for name, body in (("quick", 'read -r server; printf \'{"Username":"u","Secret":"%s"}\' "$server"'),
                           ("slow", "exec sleep 30")):
            path = write_file(folder, "docker-credential-" + name, "#!/bin/sh\n%s\n" % body)
            os.chmod(path, 0o755)
        config = self.config({"credHelpers": {"127.0.0.1:5000": "quick", "ghcr.io": "slow"}})
        with unittest.mock.patch.dict(os.environ, {"PATH": folder + os.pathsep + os.environ["PATH"]}):
            found = dockerapi.find_registry_auth(self.IMAGE, config)
            started = time.monotonic()
            with self.assertRaises(dockerapi.CredentialsError) as caught:
                dockerapi.find_registry_auth("ghcr.io/a/b", config, timeout=0.1)
        self.assertEqual(found.auth, {"username": "u", "password": "127.0.0.1:5000",
                                      "serveraddress": "127.0.0.1:5000"})
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("did not answer within 0.1 s", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
