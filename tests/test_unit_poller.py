"""Unit tests: the Poller, against the in-process fake Engine and a fake
registry (what a real one cannot do on demand: fail, answer 429), with a
fake clock: what it asks, when it deploys, how it backs off."""

import unittest
from typing import Dict, List, Optional

import dockerapi
from autodeploy import Poller, Service, CallbackSender, MemoryJournal
from tests.unit_support import Rig, app_config, web_config

DIGEST_V1 = "sha256:" + "11" * 32
DIGEST_V2 = "sha256:" + "22" * 32


class FakeRegistry:
    """Tags and their digests; records what was asked; can be told to fail."""

    def __init__(self, tags: Dict[str, str]):
        self.digests = dict(tags)
        self.asked: List[tuple] = []
        self.error: Optional[dockerapi.RegistryError] = None

    def manifest_digest(self, image: str, tag: str, auth=None) -> dockerapi.ManifestAnswer:
        self.asked.append(("HEAD", image, tag))
        if self.error is not None:
            raise self.error
        if tag not in self.digests:
            raise dockerapi.RegistryError("no tag %s in %s" % (tag, image), 404)
        return dockerapi.ManifestAnswer(self.digests[tag], None)

    def tags(self, image: str, auth=None, max_pages: int = 50) -> List[str]:
        self.asked.append(("TAGS", image))
        if self.error is not None:
            raise self.error
        return sorted(self.digests)


class PollerTest(unittest.TestCase):

    def setUp(self):
        self.rig = Rig(self)
        self.engine, self.clock = self.rig.engine, self.rig.clock
        self.old = self.engine.add_container("web", "sha256:v1")
        self.engine.containers[self.old]["Config"]["Image"] = "reg.example/team/web:latest"
        self.engine.images["sha256:v1"]["RepoDigests"] = ["reg.example/team/web@" + DIGEST_V1]
        self.registry = FakeRegistry({"latest": DIGEST_V1})

    def poller(self, **settings) -> Poller:
        settings.setdefault("poll", 60.0)
        app = app_config(**settings)
        config = web_config()._replace(apps={app.repository: app})
        self.service = Service(config, self.rig.runner, CallbackSender([]), MemoryJournal(),
                               clock=self.clock, hostname="host")
        self.app = app
        return Poller(self.service, self.registry, clock=self.clock, wall_clock=self.clock,
                      jitter=lambda: 0.0)

    def test_the_digest_the_container_runs_is_left_alone_and_asked_with_head(self):
        poller = self.poller()
        self.assertIn("running already", poller.check(self.app))
        self.assertEqual(self.registry.asked, [("HEAD", "reg.example/team/web", "latest")])
        self.assertEqual(self.service.queue.depth(), 0)

    def test_a_new_digest_under_the_followed_tag_queues_a_job_from_the_poll(self):
        poller = self.poller()
        self.registry.digests["latest"] = DIGEST_V2
        self.assertIn("queued job", poller.check(self.app))
        job = self.service.queue.get(timeout=0)
        self.assertEqual((job.source, job.tag, job.digest, job.callback_url),
                         ("poll", "latest", DIGEST_V2, None))

    def test_a_job_still_deploying_what_a_poll_found_is_not_queued_again(self):
        poller = self.poller()
        self.registry.digests["latest"] = DIGEST_V2
        poller.check(self.app)
        self.assertIn("still deploying", poller.check(self.app))
        self.assertEqual(self.service.queue.depth(), 1)

    def test_the_next_check_comes_one_interval_later(self):
        poller = self.poller()
        poller.check(self.app)
        self.assertEqual(poller.states["team/web"].due, self.clock() + 60.0)

    def test_a_failing_registry_backs_off_doubling_and_counts_errors(self):
        poller = self.poller()
        self.registry.error = dockerapi.RegistryError("no answer from reg.example", None)
        with self.assertLogs("autodeploy", "WARNING"):
            poller.check(self.app)
            first = poller.states["team/web"].due - self.clock()
            poller.check(self.app)
            second = poller.states["team/web"].due - self.clock()
        self.assertEqual((first, second), (120.0, 240.0))
        self.assertEqual(poller.failing(), 1)
        self.assertIn('autodeploy_poll_errors_total{app="team/web"} 2',
                      self.service.metrics.render(0))
        self.registry.error = None
        poller.check(self.app)
        self.assertEqual(poller.failing(), 0)
        self.assertIn('autodeploy_last_poll_timestamp_seconds{app="team/web"}',
                      self.service.metrics.render(0))

    def test_a_429_retry_after_is_waited_out(self):
        poller = self.poller()
        self.registry.error = dockerapi.RegistryError("too many requests", 429, retry_after=900.0)
        with self.assertLogs("autodeploy", "WARNING"):
            poller.check(self.app)
        self.assertEqual(poller.states["team/web"].due, self.clock() + 900.0)

    def test_a_semver_policy_asks_for_the_newest_tag_it_allows(self):
        self.engine.containers[self.old]["Config"]["Image"] = "reg.example/team/web:v1.2.3"
        self.registry = FakeRegistry({"v1.2.3": DIGEST_V1, "v1.2.4": DIGEST_V2,
                                      "v2.0.0": "sha256:" + "33" * 32})
        poller = self.poller(tag_policy="minor", tags=())
        poller.check(self.app)
        job = self.service.queue.get(timeout=0)
        self.assertEqual((job.tag, job.digest), ("v1.2.4", DIGEST_V2))

    def test_an_app_without_poll_is_not_polled(self):
        poller = self.poller(poll=0.0)
        self.assertEqual(poller.apps(), [])


if __name__ == "__main__":
    unittest.main()
