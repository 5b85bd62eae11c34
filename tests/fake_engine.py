"""An in-process fake Docker Engine for unit tests of targets, the health
gate and recovery: the calls autodeploy makes of dockerapi.DockerClient,
on containers and images kept in dicts, with a fake clock.

It exists for what a real Engine cannot do on demand: die mid-swap, come
back, replay chosen events at chosen times. The end-to-end tests run the
same code against a real Engine.

- `FakeClock`: time that moves only when the code sleeps or waits for events.
- `FakeEngine.events()` yields the scripted events whose time falls in
  [since, until] and moves the clock to `until`, as the real stream does.
- `engine.down = True`: every call fails as an unreachable Engine does
  (DockerError with no status); `fail_at[method] = n` fails the n-th call.
"""

import copy
import itertools
import logging
import unittest
from typing import Any, Callable, Dict, Iterator, List, Optional

import autodeploy
from dockerapi import DockerError, NotFound


class FakeClock:
    """time.time and time.sleep for code under test: sleeping advances it."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now
        self.slept: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class FakeEngine:
    """Containers and images in memory; each call is recorded in `calls`."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.containers: Dict[str, Dict[str, Any]] = {}  # id -> inspect document
        self.images: Dict[str, Dict[str, Any]] = {}      # reference or id -> inspect document
        self.events_script: List[Dict[str, Any]] = []    # {"time": t, "id": container, "Action": ...}
        self.calls: List[tuple] = []
        self.down = False
        self.fail_at: Dict[str, int] = {}  # method -> the call number (1-based) that fails
        self.on_call: Callable[[str], None] = lambda method: None  # runs before each call
        self.on_start: Callable[[Dict[str, Any]], None] = lambda info: None  # a start's outcome
        self._ids = itertools.count(1)

    # -- set-up helpers -------------------------------------------------------

    def add_image(self, reference: str, image_id: str, config: Optional[Dict[str, Any]] = None) -> None:
        doc = {"Id": image_id, "Config": config or {"Cmd": ["serve"]}}
        self.images[reference] = self.images[image_id] = doc

    def add_container(self, name: str, image_id: str, running: bool = True,
                      health: Optional[str] = None) -> str:
        container_id = "c%04d" % next(self._ids) + "0" * 60
        self.containers[container_id] = {
            "Id": container_id, "Name": "/" + name, "Image": image_id,
            "Config": {"Image": name, "Cmd": ["serve"], "Labels": {}},
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}},
            "State": {"Running": running, "Status": "running" if running else "exited",
                      "ExitCode": 0, **({"Health": {"Status": health}} if health else {})},
            "RestartCount": 0, "Mounts": []}
        return container_id

    def named(self, name: str) -> Optional[Dict[str, Any]]:
        for info in self.containers.values():
            if info["Name"] == "/" + name:
                return info
        return None

    def names(self) -> List[str]:
        return sorted(info["Name"][1:] for info in self.containers.values())

    # -- the DockerClient calls -----------------------------------------------

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method,) + args)
        self.on_call(method)
        if self.down:
            raise DockerError("cannot reach the Docker Engine at fake: connection refused")
        count = sum(1 for call in self.calls if call[0] == method)
        if self.fail_at.get(method) == count:
            raise DockerError("%s failed (fake)" % method, 500, "POST", "/" + method)

    def _find(self, name: str) -> Dict[str, Any]:
        if name in self.containers:
            return self.containers[name]
        found = self.named(name)
        if found is None:
            raise NotFound("No such container: %s" % name, 404, "GET", "/containers/%s/json" % name)
        return found

    def ping(self) -> bool:
        self._call("ping")
        return True

    def api_at_least(self, version: str) -> bool:
        return True

    def inspect_container(self, name: str) -> Dict[str, Any]:
        self._call("inspect_container", name)
        return copy.deepcopy(self._find(name))

    def inspect_image(self, reference: str) -> Dict[str, Any]:
        self._call("inspect_image", reference)
        if reference not in self.images:
            raise NotFound("No such image: %s" % reference, 404, "GET", "/images/%s/json" % reference)
        return copy.deepcopy(self.images[reference])

    def pull_image(self, image: str, tag: str, auth: Any = None,
                   on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        self._call("pull_image", image, tag)
        if "%s:%s" % (image, tag) not in self.images:
            raise DockerError("manifest for %s:%s not found" % (image, tag), 404, "POST", "/images/create")
        if on_progress is not None:
            on_progress({"status": "Status: Downloaded newer image for %s:%s" % (image, tag)})

    def create_container(self, body: Dict[str, Any], name: Optional[str] = None) -> str:
        self._call("create_container", name)
        if name and self.named(name) is not None:
            raise DockerError("Conflict. The container name /%s is already in use" % name, 409)
        image = self.images[body["Image"]]
        container_id = self.add_container(name or "anon", image["Id"], running=False)
        self.containers[container_id]["State"]["Status"] = "created"
        return container_id

    def start_container(self, name: str) -> None:
        self._call("start_container", name)
        info = self._find(name)
        info["State"].update(Running=True, Status="running")
        self.on_start(info)

    def stop_container(self, name: str, timeout: Optional[int] = None) -> None:
        self._call("stop_container", name)
        self._find(name)["State"].update(Running=False, Status="exited")

    def rename_container(self, name: str, new_name: str) -> None:
        self._call("rename_container", name, new_name)
        if self.named(new_name) is not None:
            raise DockerError("Conflict: name %s in use" % new_name, 409)
        self._find(name)["Name"] = "/" + new_name

    def remove_container(self, name: str, force: bool = False, volumes: bool = False) -> None:
        self._call("remove_container", name)
        info = self._find(name)
        if info["State"]["Running"] and not force:
            raise DockerError("cannot remove a running container", 409)
        del self.containers[info["Id"]]

    def container_logs(self, name: str, tail: int = 20) -> str:
        self._call("container_logs", name)
        return "boom\n"

    def list_containers(self, all: bool = True, filters: Any = None) -> List[Dict[str, Any]]:
        self._call("list_containers")
        return [{"Id": i, "ImageID": c["Image"]} for i, c in self.containers.items()]

    def remove_image(self, reference: str) -> None:
        self._call("remove_image", reference)
        image = self.images.pop(reference, None)
        for key in [k for k, v in self.images.items() if v is image]:
            del self.images[key]

    def connect_network(self, network: str, container: str, endpoint: Any = None) -> None:
        self._call("connect_network", network, container)

    def disconnect_network(self, network: str, container: str, force: bool = False) -> None:
        self._call("disconnect_network", network, container)

    def events(self, since: float, until: float,
               filters: Optional[Dict[str, List[str]]] = None) -> Iterator[Dict[str, Any]]:
        self._call("events", since, until)
        wanted = set((filters or {}).get("container") or [])
        for event in sorted(self.events_script, key=lambda e: e["time"]):
            if since <= event["time"] <= until and (not wanted or event["id"] in wanted):
                if event["time"] > self.clock.now:
                    self.clock.now = event["time"]  # a live event: time passes until it comes
                yield {"Action": event["Action"], "Actor": {"Attributes": event.get("attributes", {})}}
        self.clock.now = max(self.clock.now, until)


def die_event(engine: FakeEngine, container_id: str, at: float, code: int = 3) -> None:
    """Script the container's death at `at` (and make inspect agree from then)."""
    engine.events_script.append({"time": at, "id": container_id, "Action": "die",
                                 "attributes": {"exitCode": str(code)}})


def app_config(name: str = "web", **settings: Any) -> autodeploy.AppConfig:
    settings.setdefault("settle", 3)
    return autodeploy.AppConfig(repository="team/" + name, image="reg.example/team/" + name,
                                tags=("latest",), container=name, **settings)


def make_config(**fields: Any) -> autodeploy.Config:
    """A Config with one app, team/web (container web), changed by `fields`."""
    defaults = dict(path="x.conf", listen_host="127.0.0.1", listen_port=1, tokens=[], workers=1,
                    state_dir="/nonexistent", callback_allow=[], max_body=1024, max_queue=10,
                    docker_host=None, docker_config=None,
                    apps={"team/web": app_config(cooldown=0)})
    defaults.update(fields)
    return autodeploy.Config(**defaults)


def new_job(app: autodeploy.AppConfig, job_id: str = "j1") -> autodeploy.Job:
    return autodeploy.Job(id=job_id, app=app, tag="latest", received=1.0)


def quiet_logs(test: "unittest.TestCase") -> None:
    """Keep the deploy log lines the test provokes off stderr, for this test."""
    logger = logging.getLogger("autodeploy")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    test.addCleanup(logger.setLevel, level)


class Rig:
    """A fake clock and Engine, with the real health gate, container target
    and job runner wired to them as build_service wires them. The Engine
    has the app's new image (v2) and the old one (v1)."""

    def __init__(self, test: "unittest.TestCase", probe: Callable[[str, float], bool] = lambda t, s: False):
        quiet_logs(test)
        self.clock = FakeClock()
        self.engine = FakeEngine(self.clock)
        self.engine.add_image("reg.example/team/web:latest", "sha256:v2")
        self.engine.add_image("sha256:v1", "sha256:v1")
        self.steps: List[Dict[str, Any]] = []
        self.deadline = autodeploy.StopDeadline(self.clock)
        self.gate = autodeploy.HealthGate(self.engine, self.clock, self.clock.sleep, probe,
                                          self.deadline.check)
        self.target = autodeploy.ContainerTarget(
            self.engine, self.gate, self.deadline, "/nonexistent/config.json",
            lambda job, **fields: self.steps.append(fields), self.clock)
        self.runner = autodeploy.JobRunner(self.target, self.deadline, engine_wait=60,
                                           clock=self.clock, sleep=self.clock.sleep)
