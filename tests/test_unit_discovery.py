"""Unit tests: label discovery (which containers a push reaches, with which
options), the roll-out over several containers in one job, and its
recovery, against the in-process fake Engine."""

import os
import stat
import tempfile
import unittest

import autodeploy
from autodeploy import CallbackSender, MemoryJournal, Push, Service
from tests.unit_support import Rig, app_config, die_event, make_config, new_job

REF = "reg.example/team/web:latest"


def labelled_rig(test):
    """A Rig whose runner discovers labelled containers."""
    rig = Rig(test)
    rig.discovery = autodeploy.Discovery(rig.engine)
    rig.runner = autodeploy.JobRunner(rig.target, rig.deadline, engine_wait=60, clock=rig.clock,
                                      sleep=rig.clock.sleep, discovery=rig.discovery)
    return rig


def implicit_app(container="web-1"):
    return autodeploy.AppConfig(repository="team/web", image="reg.example/team/web",
                                tags=("latest",), container=container, labelled=True)


class ImageReferenceTest(unittest.TestCase):

    def test_the_repository_path_is_the_reference_without_registry_tag_or_digest(self):
        split = autodeploy.split_image_reference
        self.assertEqual(split("team/app:v1"), ("team/app", "team/app", "v1"))
        self.assertEqual(split("127.0.0.1:5000/team/app:v1"),
                         ("127.0.0.1:5000/team/app", "team/app", "v1"))
        self.assertEqual(split("localhost/app"), ("localhost/app", "app", ""))
        self.assertEqual(split("ghcr.io/me/app:v2@sha256:" + "a" * 64),
                         ("ghcr.io/me/app", "me/app", "v2"))
        self.assertEqual(split("reg:5000/app@sha256:" + "a" * 64), ("reg:5000/app", "app", ""))


class DiscoveryTest(unittest.TestCase):

    def setUp(self):
        self.rig = labelled_rig(self)
        self.engine = self.rig.engine
        self.notes, self.problems = [], []

    def targets(self, base=None, tag="latest", repository="team/web"):
        return self.rig.discovery.targets(repository, tag, base, self.notes, self.problems)

    def test_labelled_containers_of_the_pushed_repository_and_tag_are_targets(self):
        self.engine.add_labelled("web-1", "sha256:v1", REF)
        self.engine.add_labelled("other", "sha256:v1", "reg.example/team/other:latest")
        self.engine.add_labelled("pinned", "sha256:v1", "reg.example/team/web:v1")
        self.engine.add_container("unlabelled", "sha256:v1")
        views = self.targets()
        self.assertEqual([(v.container, v.image, v.tags) for v in views],
                         [("web-1", "reg.example/team/web", ("latest",))])
        self.assertTrue(views[0].labelled)
        self.assertEqual([v.container for v in self.targets(tag="v1")], ["pinned"])

    def test_label_options_are_read_with_the_settings_names_and_rules(self):
        self.engine.add_labelled("web-1", "sha256:v1", REF, {
            "autodeploy.order": "start-first", "autodeploy.health_url": "http://{ip}:8080/up",
            "autodeploy.stop_timeout": "4", "autodeploy.settle": "1",
            "autodeploy.tag": "latest, stable"})
        view, = self.targets(tag="stable")
        self.assertEqual((view.order, view.health_url, view.stop_timeout, view.settle, view.tags),
                         ("start-first", "http://{ip}:8080/up", 4, 1, ("latest", "stable")))

    def test_a_bad_label_skips_its_container_and_says_why(self):
        self.engine.add_labelled("web-1", "sha256:v1", REF, {"autodeploy.order": "sideways"})
        self.engine.add_labelled("web-2", "sha256:v1", REF, {"autodeploy.health_tcp": "x"})
        self.engine.add_labelled("web-3", "sha256:v1", REF, {"autodeploy.settle": "soon"})
        self.engine.add_labelled("web-4", "sha256:v1", REF, {"autodeploy.helth_url": "x"})
        self.assertEqual([v.container for v in self.targets()], ["web-4"])
        self.assertEqual(len(self.problems), 3, self.problems)
        self.assertIn("container web-1", self.problems[0])
        self.assertIn("'sideways'; use auto, stop-first or start-first", self.problems[0])
        self.assertIn("health_tcp: 'x'; expected HOST:PORT", self.problems[1])
        self.assertIn("settle: 'soon' is not a whole number", self.problems[2])
        # A label it does not know is noted (a typo shows), not refused: tools share prefixes.
        self.assertIn("label autodeploy.helth_url: not one of", " ".join(self.notes))
        self.assertTrue(all(p.endswith("skipped") for p in self.problems))

    def test_the_config_wins_on_a_conflict_and_the_notes_say_which_applied(self):
        section = app_config("web", health_url="http://{ip}/cfg", settings=frozenset({"health_url"}))
        self.engine.add_labelled("web", "sha256:v1", REF, {
            "autodeploy.health_url": "http://{ip}/label", "autodeploy.order": "stop-first"})
        view, = self.targets(base=section)
        self.assertEqual((view.health_url, view.order), ("http://{ip}/cfg", "stop-first"))
        self.assertIn("web: label autodeploy.health_url ignored: [team/web] sets health_url "
                      "(the config wins)", self.notes)
        self.assertIn("web: labels applied: order=stop-first", self.notes)

    def test_the_section_container_is_a_target_even_unlabelled_and_others_join_it(self):
        section = app_config("web")
        self.engine.add_container("web", "sha256:v1")
        self.engine.add_labelled("web-worker", "sha256:v1", REF)
        self.assertEqual([v.container for v in self.targets(base=section)], ["web", "web-worker"])

    def test_depends_on_orders_a_container_after_the_one_it_names_else_by_name(self):
        self.engine.add_labelled("a-front", "sha256:v1", REF, {"autodeploy.depends_on": "c-api"})
        self.engine.add_labelled("b-worker", "sha256:v1", REF)
        self.engine.add_labelled("c-api", "sha256:v1", REF, {"autodeploy.depends_on": "elsewhere"})
        self.assertEqual([v.container for v in self.targets()], ["b-worker", "c-api", "a-front"])

    def test_a_container_set_aside_mid_swap_is_not_a_target(self):
        self.engine.add_labelled("web-1-autodeploy-old-j0", "sha256:v1", REF)
        self.assertEqual(self.targets(), [])


class RollOutTest(unittest.TestCase):

    def setUp(self):
        self.rig = labelled_rig(self)
        self.engine, self.clock = self.rig.engine, self.rig.clock
        self.ids = {name: self.engine.add_labelled(name, "sha256:v1", REF,
                                                   {"autodeploy.order": "stop-first"})
                    for name in ("web-1", "web-2", "web-3")}
        self.job = new_job(implicit_app())

    def image_of(self, name):
        return self.engine.named(name)["Image"]

    def test_every_labelled_container_moves_to_the_new_version_in_one_job(self):
        self.rig.runner.run(self.job)
        self.assertEqual(self.job.state, "succeeded", self.job.description)
        self.assertEqual([self.image_of(n) for n in ("web-1", "web-2", "web-3")], ["sha256:v2"] * 3)
        self.assertEqual(self.engine.names(), ["web-1", "web-2", "web-3"])
        for name in ("web-1", "web-2", "web-3"):
            self.assertIn("%s now runs reg.example/team/web:latest" % name, self.job.description)
        # Each container's swap was recorded under its own name.
        self.assertEqual([f["container"] for f in self.rig.steps if "container" in f],
                         ["web-1", "web-2", "web-3"])

    def test_the_first_failure_stops_the_roll_out_and_the_description_says_who_moved(self):
        def second_dies(info):
            if info["Image"] == "sha256:v2" and info["Name"] == "/web-2":
                die_event(self.engine, info["Id"], self.clock() + 1, code=2)
        self.engine.on_start = second_dies
        self.rig.runner.run(self.job)
        self.assertEqual(self.job.state, "rolled_back")
        self.assertEqual([self.image_of(n) for n in ("web-1", "web-2", "web-3")],
                         ["sha256:v2", "sha256:v1", "sha256:v1"])
        self.assertEqual(self.engine.named("web-2")["Id"], self.ids["web-2"])
        self.assertTrue(self.engine.named("web-2")["State"]["Running"])
        self.assertEqual(self.engine.named("web-3")["Id"], self.ids["web-3"])
        self.assertFalse([c for c in self.engine.calls if self.ids["web-3"] in c[1:]
                          and c[0] != "inspect_container"])
        description = self.job.description
        self.assertTrue(description.startswith("web-1 now runs reg.example/team/web:latest"),
                        description)
        self.assertIn("; web-2 rolled back: the new container failed: ", description)
        self.assertIn("exit code 2", description)
        self.assertTrue(description.endswith("; not tried: web-3"), description)

    def test_a_crash_mid_swap_converges_that_container_then_finishes_the_rest(self):
        # The crash came mid-swap on web-2: web-1 is done, web-2's old one is
        # set aside and its new one created, web-3 untouched.
        self.engine.containers.pop(self.ids["web-1"])
        self.engine.add_labelled("web-1", "sha256:v2", REF, {"autodeploy.order": "stop-first"})
        self.engine.rename_container("web-2", "web-2-autodeploy-old-j1")
        self.engine.add_labelled("web-2", "sha256:v2", REF, {"autodeploy.order": "stop-first"},
                                 running=False)
        self.engine.named("web-2")["State"]["Status"] = "created"  # never started
        self.job.resume = {"id": "j1", "container": "web-2", "was_running": 1,
                           "old_container": self.ids["web-2"], "state": "running"}
        self.rig.runner.run(self.job)
        self.assertEqual(self.job.state, "succeeded", self.job.description)
        self.assertEqual(self.engine.names(), ["web-1", "web-2", "web-3"])
        self.assertEqual([self.image_of(n) for n in ("web-1", "web-2", "web-3")], ["sha256:v2"] * 3)
        self.assertIn("web-1 already runs", self.job.description)
        self.assertIn("web-2 now runs reg.example/team/web:latest (v2), ", self.job.description)
        self.assertIn("finished after a restart", self.job.description)
        self.assertEqual(self.job.app, implicit_app())  # the job's own app again


class LabelledServiceTest(unittest.TestCase):

    def setUp(self):
        self.rig = labelled_rig(self)
        self.service = Service(make_config(apps={}, tokens=[]), self.rig.runner, CallbackSender([]),
                               MemoryJournal(), clock=self.rig.clock, hostname="host")

    def test_a_push_with_no_section_but_labelled_containers_becomes_a_job(self):
        self.rig.engine.add_labelled("web-1", "sha256:v1", REF)
        job = self.service.submit(Push("team/web", "latest"))
        self.assertTrue(job.app.labelled)
        self.assertEqual((job.app.repository, job.app.image, job.app.container),
                         ("team/web", "reg.example/team/web", "web-1"))
        self.assertEqual(self.service.journal.get(job.id)["labelled"], 1)

    def test_a_push_no_section_and_no_labelled_container_follows_is_422(self):
        self.rig.engine.add_labelled("web-1", "sha256:v1", "reg.example/team/web:v1")
        with self.assertRaises(autodeploy.PayloadError) as caught:
            self.service.submit(Push("team/web", "latest"))
        self.assertEqual(caught.exception.status, 422)
        self.assertIn("no container labelled autodeploy.enable=true runs team/web:latest",
                      caught.exception.message)

    def test_an_unfinished_job_of_labelled_containers_is_resumed_as_one(self):
        row = {"id": "j1", "app": "team/web", "container": "web-2", "tag": "latest",
               "source": "dockerhub", "callback_url": None, "received": 1.0, "state": "running",
               "log": "", "labelled": 1}
        ended = []
        autodeploy.resume_unfinished([row], self.service.config, self.service.queue, ended.append)
        job = self.service.queue.get(timeout=0)
        self.assertEqual((ended, job.app.labelled, job.resume["container"]), ([], True, "web-2"))


class NoConfigTest(unittest.TestCase):

    def test_serve_with_no_config_makes_a_private_token_once_and_reuses_it(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(lambda: [os.remove(os.path.join(folder, n)) for n in os.listdir(folder)])
        config = autodeploy.default_config({"STATE_DIRECTORY": folder})
        self.assertEqual((config.listen_host, config.listen_port, config.apps, config.state_dir),
                         ("127.0.0.1", 3456, {}, folder))
        with open(os.devnull, "w") as out:
            first = autodeploy.with_state_token(config, out)
            again = autodeploy.with_state_token(config, out)
        self.assertEqual(len(first.tokens), 1)
        self.assertEqual(first.tokens, again.tokens)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(folder, "token")).st_mode), 0o600)

    def test_the_default_file_absent_and_none_named_means_the_defaults(self):
        config = autodeploy.read_config(None, {"STATE_DIRECTORY": "/tmp/x"})
        self.assertTrue(autodeploy.is_default_config(config))
        with self.assertRaises(autodeploy.ConfigError):
            autodeploy.read_config("/nonexistent/autodeploy.conf", {})


if __name__ == "__main__":
    unittest.main()
