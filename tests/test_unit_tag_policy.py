"""Unit tests: tag policies. SemVer 2.0.0 parsing and precedence, from the
specification's own examples; which pushed tag each policy deploys and
why not; the tag a poll chooses; the tag a container runs; poll
durations; and a refused push through the service, the HTTP server and
the `deploy` command: acknowledged, nothing queued."""

import contextlib
import io
import random
import unittest

import autodeploy
from autodeploy import (CallbackSender, Ignored, MemoryJournal, Push, SemVer, Service, choose_tag,
                        running_tag_of, tag_refusal)
from tests.test_unit_accept import DISTRIBUTION, notification, registry_event
from tests.unit_support import (GLOBAL_TOKEN, BoundedTestCase, Rig, ServerTestCase, app_config,
                                hub_body, make_apps, make_config, serve_in_thread, temp_folder,
                                web_config)


def policy(name: str, *tags: str, prerelease: bool = False) -> autodeploy.AppConfig:
    return app_config(tag_policy=name, prerelease=prerelease)._replace(tags=tags)


class SemVerParsingTest(unittest.TestCase):

    def test_the_specifications_valid_examples_parse_into_their_parts(self):
        for text, parts in (
                ("1.9.0", (1, 9, 0, (), ())),
                ("1.10.0", (1, 10, 0, (), ())),
                ("1.0.0-alpha", (1, 0, 0, ("alpha",), ())),
                ("1.0.0-alpha.1", (1, 0, 0, ("alpha", "1"), ())),
                ("1.0.0-0.3.7", (1, 0, 0, ("0", "3", "7"), ())),
                ("1.0.0-x.7.z.92", (1, 0, 0, ("x", "7", "z", "92"), ())),
                ("1.0.0-x-y-z.--", (1, 0, 0, ("x-y-z", "--"), ())),
                ("1.0.0-alpha+001", (1, 0, 0, ("alpha",), ("001",))),
                ("1.0.0+20130313144700", (1, 0, 0, (), ("20130313144700",))),
                ("1.0.0-beta+exp.sha.5114f85", (1, 0, 0, ("beta",), ("exp", "sha", "5114f85"))),
                ("1.0.0+21AF26D3----117B344092BD", (1, 0, 0, (), ("21AF26D3----117B344092BD",))),
                ("0.0.0", (0, 0, 0, (), ())),
                ("1.0.0-0a", (1, 0, 0, ("0a",), ())),  # alphanumeric: a leading zero is fine
                ("10.20.30", (10, 20, 30, (), ()))):
            with self.subTest(text=text):
                version = SemVer.parse(text)
                self.assertIsNotNone(version)
                self.assertEqual((version.major, version.minor, version.patch, version.prerelease,
                                  version.build), parts)
                self.assertEqual(str(version), text)

    def test_a_leading_v_is_tolerated_and_kept_in_the_text(self):
        for text in ("v1.2.3", "V1.2.3"):
            version = SemVer.parse(text)
            self.assertEqual((version.major, version.minor, version.patch, version.text),
                             (1, 2, 3, text))
        self.assertEqual(SemVer.parse("v1.2.3-rc.1").prerelease, ("rc", "1"))

    def test_anything_else_is_not_a_version(self):
        for text in ("01.2.3", "1.02.3", "1.2.03", "1.0.0-01", "1.0.0-alpha.01",  # leading zeros
                     "1.2", "1", "1.2.3.4", "1.2.3-", "1.2.3+", "1.2.3-alpha..1", "1.2.3-+b",
                     "1.2.3+b..c", "1.2.3-alpha_1", "1.2.3+b_c", "vv1.2.3", "v 1.2.3", "-1.2.3",
                     "1.2.3\n", " 1.2.3", "1.2.3 ", "\u0661.\u0662.\u0663", "1.2.3-\u00e9",
                     "", "latest", "v1", "1.2.x", "a.b.c"):
            with self.subTest(text=text):
                self.assertIsNone(SemVer.parse(text))

    def test_numbers_of_any_size_are_kept_exactly(self):
        version = SemVer.parse("99999999999999999999.0.0-rc.123456789012345678901234567890")
        self.assertEqual(version.major, 99999999999999999999)
        self.assertLess(SemVer.parse("99999999999999999999.0.0"), SemVer.parse("100000000000000000000.0.0"))
        self.assertLess(version, SemVer.parse("99999999999999999999.0.0-rc.123456789012345678901234567891"))


class SemVerPrecedenceTest(unittest.TestCase):

    def assertAscending(self, *texts: str) -> None:
        versions = [SemVer.parse(text) for text in texts]
        for lower, higher in zip(versions, versions[1:]):
            self.assertLess(lower, higher)
            self.assertGreater(higher, lower)
            self.assertNotEqual(lower, higher)
        shuffled = list(versions)
        random.Random(7).shuffle(shuffled)
        self.assertEqual([v.text for v in sorted(shuffled)], list(texts))

    def test_major_minor_and_patch_compare_numerically(self):
        self.assertAscending("1.0.0", "2.0.0", "2.1.0", "2.1.1")
        self.assertAscending("1.9.0", "1.10.0", "1.11.0")

    def test_a_pre_release_is_lower_than_its_release(self):
        self.assertAscending("1.0.0-alpha", "1.0.0")
        self.assertAscending("1.0.0", "1.0.1-alpha", "1.0.1")

    def test_pre_release_identifiers_compare_one_by_one_as_the_specification_orders_them(self):
        self.assertAscending("1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
                             "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0")

    def test_numeric_identifiers_are_lower_than_alphanumeric_ones_which_compare_in_ascii_order(self):
        self.assertAscending("1.0.0-1", "1.0.0-9", "1.0.0-10", "1.0.0-0a", "1.0.0-A", "1.0.0-Z",
                             "1.0.0-a")
        self.assertAscending("1.0.0-rc.9", "1.0.0-rc.10", "1.0.0-rc.-", "1.0.0-rc.a")

    def test_a_longer_set_of_identifiers_is_higher_when_all_before_are_equal(self):
        self.assertAscending("1.0.0-alpha", "1.0.0-alpha.0", "1.0.0-alpha.0.0")

    def test_build_metadata_and_a_leading_v_play_no_part_in_precedence(self):
        for left, right in (("1.0.0+20130313144700", "1.0.0"),
                            ("1.0.0-beta+exp.sha.5114f85", "1.0.0-beta"),
                            ("1.0.0+a", "1.0.0+b"), ("v1.0.0", "1.0.0")):
            with self.subTest(left=left, right=right):
                a, b = SemVer.parse(left), SemVer.parse(right)
                self.assertEqual(a, b)
                self.assertEqual(hash(a), hash(b))
                self.assertFalse(a < b or b < a)
                self.assertTrue(a <= b and a >= b)
        self.assertLess(SemVer.parse("1.0.0-alpha+999"), SemVer.parse("1.0.0-alpha.1+1"))


class TagRefusalTest(unittest.TestCase):

    def test_exact_follows_the_listed_tags_only(self):
        app = policy("exact", "latest", "stable")
        self.assertIsNone(tag_refusal(app, "stable", "latest"))
        self.assertEqual(tag_refusal(app, "beta", None), "tag beta is not one of latest, stable")
        # Versions mean nothing to it: no order, no pre-release rule.
        self.assertIsNone(tag_refusal(policy("exact", "v1.0.0-rc.1"), "v1.0.0-rc.1", "v2.0.0"))

    def test_glob_follows_tags_matching_a_pattern(self):
        app = policy("glob", "v1.*", "stable-?")
        self.assertIsNone(tag_refusal(app, "v1.4.0", None))
        self.assertIsNone(tag_refusal(app, "stable-a", None))
        self.assertEqual(tag_refusal(app, "x", None), "tag x matches no pattern of v1.*, stable-?")
        self.assertIsNotNone(tag_refusal(app, "V1.4.0", None))  # case-sensitive, as tags are
        self.assertIsNotNone(tag_refusal(app, "stable-ab", None))

    def test_glob_refuses_a_version_older_than_the_running_one_it_matches(self):
        app = policy("glob", "v1.*")
        self.assertEqual(tag_refusal(app, "v1.2.2", "v1.2.3"), "v1.2.2 is older than the running v1.2.3")
        self.assertIsNone(tag_refusal(app, "v1.9.0", "v1.2.3"))
        # A running tag the patterns no longer match does not hold the new line back.
        self.assertIsNone(tag_refusal(app, "v1.0.0", "v2.0.0"))
        # Tags that are no versions have no order.
        self.assertIsNone(tag_refusal(policy("glob", "build-*"), "build-1", "build-2"))

    def test_glob_follows_pre_releases_only_with_prerelease_yes(self):
        self.assertEqual(tag_refusal(policy("glob", "v1.*"), "v1.3.0-rc.1", None),
                         "pre-release v1.3.0-rc.1 not followed (prerelease = no)")
        self.assertIsNone(tag_refusal(policy("glob", "*-alpine", prerelease=True), "1.25.3-alpine", None))

    def test_patch_stays_on_the_running_major_and_minor(self):
        app = policy("patch")
        self.assertIsNone(tag_refusal(app, "v1.2.9", "v1.2.3"))
        self.assertEqual(tag_refusal(app, "v1.3.0", "v1.2.3"), "v1.3.0 is outside the patch policy from v1.2.3")
        self.assertEqual(tag_refusal(app, "v2.2.4", "v1.2.3"), "v2.2.4 is outside the patch policy from v1.2.3")

    def test_minor_stays_on_the_running_major(self):
        app = policy("minor")
        self.assertIsNone(tag_refusal(app, "v1.2.4", "v1.2.3"))
        self.assertIsNone(tag_refusal(app, "1.9.0", "v1.2.3"))  # with or without the v
        self.assertEqual(tag_refusal(app, "v2.0.0", "v1.2.3"), "v2.0.0 is outside the minor policy from v1.2.3")

    def test_major_takes_any_newer_version(self):
        self.assertIsNone(tag_refusal(policy("major"), "v7.0.0", "v1.2.3"))

    def test_every_semver_policy_refuses_an_older_version_but_not_the_running_one_again(self):
        for name in ("patch", "minor", "major"):
            with self.subTest(policy=name):
                app = policy(name)
                self.assertEqual(tag_refusal(app, "v1.2.2", "v1.2.3"), "v1.2.2 is older than the running v1.2.3")
                self.assertEqual(tag_refusal(app, "v0.9.0", "v1.2.3"), "v0.9.0 is older than the running v1.2.3")
                self.assertIsNone(tag_refusal(app, "v1.2.3", "v1.2.3"))  # re-pushed: a new build
                self.assertIsNone(tag_refusal(app, "1.2.3", "v1.2.3"))

    def test_semver_policies_refuse_tags_that_are_no_versions(self):
        self.assertEqual(tag_refusal(policy("minor"), "latest", "v1.2.3"),
                         "tag latest is not a version such as v1.2.3 (tag_policy = minor)")
        self.assertIsNotNone(tag_refusal(policy("major"), "v1.02.0", None))

    def test_semver_policies_follow_pre_releases_only_with_prerelease_yes(self):
        self.assertEqual(tag_refusal(policy("minor"), "v1.3.0-rc.1", "v1.2.3"),
                         "pre-release v1.3.0-rc.1 not followed (prerelease = no)")
        app = policy("minor", prerelease=True)
        self.assertIsNone(tag_refusal(app, "v1.3.0-rc.1", "v1.2.3"))
        self.assertEqual(tag_refusal(app, "v1.2.3-rc.1", "v1.2.3"),
                         "v1.2.3-rc.1 is older than the running v1.2.3")
        # Running a pre-release, its release is newer.
        self.assertIsNone(tag_refusal(app, "v1.3.0", "v1.3.0-rc.2"))

    def test_with_no_running_version_any_version_satisfies_the_bound(self):
        for running in (None, "latest"):
            with self.subTest(running=running):
                self.assertIsNone(tag_refusal(policy("patch"), "v0.1.0", running))
                self.assertIsNone(tag_refusal(policy("patch"), "v9.0.0", running))

    def test_with_no_running_version_the_bound_counts_from_the_version_tag_names(self):
        app = policy("minor", "v1.2.0")
        self.assertIsNone(tag_refusal(app, "v1.2.0", None))
        self.assertIsNone(tag_refusal(app, "v1.5.0", "latest"))
        self.assertEqual(tag_refusal(app, "v2.0.0", None), "v2.0.0 is outside the minor policy from v1.2.0")
        self.assertEqual(tag_refusal(app, "v1.1.0", None),
                         "v1.1.0 is older than v1.2.0, the version tag = starts from")
        # A running version wins over it.
        self.assertIsNone(tag_refusal(app, "v2.1.0", "v2.0.0"))


class ChooseTagTest(unittest.TestCase):

    LISTED = ["latest", "v1.2.2", "v1.2.3", "v1.2.4", "v1.3.0-rc.1", "v1.3.0", "v2.0.0", "nightly"]

    def test_each_semver_policy_chooses_the_newest_version_within_its_bound(self):
        for name, chosen in (("patch", "v1.2.4"), ("minor", "v1.3.0"), ("major", "v2.0.0")):
            with self.subTest(policy=name):
                self.assertEqual(choose_tag(policy(name), self.LISTED, "v1.2.3"), chosen)

    def test_nothing_newer_than_the_running_version_chooses_nothing(self):
        self.assertIsNone(choose_tag(policy("major"), self.LISTED, "v2.0.0"))
        self.assertIsNone(choose_tag(policy("major"), ["v1.0.0", "1.0.0", "v0.9.0"], "v1.0.0"))
        self.assertIsNone(choose_tag(policy("major"), [], "v1.0.0"))

    def test_pre_releases_are_chosen_only_with_prerelease_yes(self):
        tags = ["v1.2.3", "v1.3.0-rc.1", "v1.3.0-rc.2"]
        self.assertIsNone(choose_tag(policy("minor"), tags, "v1.2.3"))
        self.assertEqual(choose_tag(policy("minor", prerelease=True), tags, "v1.2.3"), "v1.3.0-rc.2")

    def test_with_no_running_version_the_newest_allowed_is_chosen(self):
        self.assertEqual(choose_tag(policy("patch"), self.LISTED, None), "v2.0.0")
        self.assertEqual(choose_tag(policy("patch"), self.LISTED, "latest"), "v2.0.0")

    def test_the_version_tag_names_bounds_the_first_choice_and_may_itself_be_chosen(self):
        self.assertEqual(choose_tag(policy("patch", "v1.2.3"), self.LISTED, None), "v1.2.4")
        self.assertEqual(choose_tag(policy("patch", "v1.2.3"), ["v1.2.3", "v1.3.0"], None), "v1.2.3")
        self.assertIsNone(choose_tag(policy("patch", "v1.2.3"), ["v1.2.2", "v1.3.0"], None))

    def test_versions_of_equal_precedence_are_chosen_whatever_the_registrys_order(self):
        for tags in (["1.3.0", "v1.3.0"], ["v1.3.0", "1.3.0"]):
            self.assertEqual(choose_tag(policy("minor"), tags, "v1.2.3"), "v1.3.0")

    def test_glob_chooses_the_newest_matching_version(self):
        app = policy("glob", "v1.*")
        self.assertEqual(choose_tag(app, self.LISTED, "v1.2.3"), "v1.3.0")
        self.assertEqual(choose_tag(app, self.LISTED, None), "v1.3.0")
        self.assertIsNone(choose_tag(app, self.LISTED, "v1.3.0"))

    def test_glob_never_chooses_a_tag_that_is_no_version(self):
        app = policy("glob", "build-*", "v*")
        self.assertIsNone(choose_tag(app, ["build-1", "build-2"], "build-1"))
        self.assertIsNone(choose_tag(app, ["build-1", "build-2"], None))
        # A stray tag that is no version does not stop it following the versions.
        self.assertEqual(choose_tag(app, ["build-9", "v1.0.0", "v1.1.0"], "build-1"), "v1.1.0")

    def test_tags_no_docker_tag_could_be_are_skipped(self):
        self.assertEqual(choose_tag(policy("major"), ["v9.0.0/../x", "v1.1.0", "v" + "9" * 200 + ".0.0"],
                                    "v1.0.0"), "v1.1.0")

    def test_exact_names_the_followed_tag_whose_digest_to_compare(self):
        app = policy("exact", "latest", "stable")
        self.assertEqual(choose_tag(app, [], "stable"), "stable")
        self.assertEqual(choose_tag(app, [], None), "latest")
        self.assertEqual(choose_tag(app, [], "other"), "latest")


class RunningTagTest(unittest.TestCase):

    def test_the_tag_of_the_containers_image_reference(self):
        for image, tag in (("team/web:v1.2.3", "v1.2.3"),
                           ("team/web:v1.2.3@sha256:" + "ab" * 32, "v1.2.3"),
                           ("registry.example:5000/team/web:1.0.0", "1.0.0"),
                           ("localhost:5000/web:latest", "latest"),
                           ("web:stable", "stable"),
                           ("team/web", None),
                           ("registry.example:5000/team/web", None),
                           ("team/web@sha256:" + "ab" * 32, None),
                           ("sha256:" + "ab" * 32, None),
                           ("", None)):
            with self.subTest(image=image):
                self.assertEqual(running_tag_of({"Config": {"Image": image}}), tag)

    def test_an_inspect_without_an_image_names_no_tag(self):
        for inspect in ({}, {"Config": None}, {"Config": {}}, {"Config": {"Image": 5}}):
            self.assertIsNone(running_tag_of(inspect))


class DurationTest(unittest.TestCase):

    def test_durations_in_hours_minutes_and_seconds(self):
        for text, seconds in (("1s", 1), ("90s", 90), ("5m", 300), ("2h", 7200), ("1h30m", 5400),
                              ("1h0m5s", 3605), ("1m30s", 90), (" 5M ", 300)):
            with self.subTest(text=text):
                self.assertEqual(autodeploy.parse_duration(text), seconds)

    def test_anything_else_is_no_duration(self):
        for text in ("", "5", "m", "5x", "5m1h", "1.5m", "-5m", "5 m", "1h1h", "5ms"):
            with self.subTest(text=text):
                self.assertIsNone(autodeploy.parse_duration(text))

    def test_durations_are_shown_as_written(self):
        self.assertEqual([autodeploy.format_duration(s) for s in (1, 90, 300, 5400, 3605)],
                         ["1s", "1m30s", "5m", "1h30m", "1h5s"])


def minor_app(**settings) -> autodeploy.AppConfig:
    return app_config(tag_policy="minor", cooldown=0, **settings)._replace(tags=())


class RunningV123TestCase(BoundedTestCase):
    """The fake Engine's container `web` runs reg.example/team/web:v1.2.3."""

    def setUp(self):
        self.rig = Rig(self)  # before the log capture, which keeps the lines off stderr
        super().setUp()
        container = self.rig.engine.add_container("web", "sha256:v1")
        self.rig.engine.containers[container]["Config"]["Image"] = "reg.example/team/web:v1.2.3"


class SubmitUnderAPolicyTest(RunningV123TestCase):
    """Service.submit with a semver policy, the container running v1.2.3 in the fake Engine."""

    def setUp(self):
        super().setUp()
        self.journal = MemoryJournal()
        self.service = Service(web_config(apps={"team/web": minor_app()}), self.rig.runner,
                               CallbackSender([]), self.journal, clock=self.rig.clock, hostname="host")

    def test_a_push_outside_the_policy_is_ignored_with_the_reason_and_queues_nothing(self):
        with self.assertRaises(Ignored) as caught:
            self.service.submit(Push("team/web", "v2.0.0"))
        self.assertEqual(caught.exception.reason, "v2.0.0 is outside the minor policy from v1.2.3")
        with self.assertRaisesRegex(Ignored, "older than the running v1.2.3"):
            self.service.submit(Push("team/web", "v1.2.2"))
        self.assertEqual(self.service.queue.depth(), 0)
        self.assertEqual(self.journal.recent(), [])

    def test_a_push_within_the_policy_is_queued(self):
        job = self.service.submit(Push("team/web", "v1.3.0"))
        self.assertEqual((job.tag, self.service.queue.depth()), ("v1.3.0", 1))

    def test_an_engine_that_cannot_say_what_runs_leaves_the_push_judged_without_it(self):
        self.rig.engine.down = True
        job = self.service.submit(Push("team/web", "v0.1.0"))
        self.assertEqual(job.tag, "v0.1.0")
        self.assertTrue(self.logs.matching("cannot inspect container web"))

    def test_the_running_tag_is_read_from_the_apps_container_and_none_when_there_is_none(self):
        self.assertEqual(self.rig.target.running_tag(minor_app()), "v1.2.3")
        self.assertIsNone(self.rig.target.running_tag(app_config("absent")))

    def test_an_exact_app_still_answers_422_for_a_tag_it_does_not_follow(self):
        service = Service(web_config(), self.rig.runner, CallbackSender([]), MemoryJournal(),
                          clock=self.rig.clock, hostname="host")
        with self.assertRaises(autodeploy.PayloadError) as caught:
            service.submit(Push("team/web", "v2.0.0"))
        self.assertEqual(caught.exception.status, 422)
        self.assertNotIn("inspect_container", [call[0] for call in self.rig.engine.calls])

    def test_a_resumed_job_whose_tag_the_policy_no_longer_allows_ends_as_an_error(self):
        rows = [{"id": j, "app": "team/web", "container": "web", "tag": tag, "source": "dockerhub",
                 "callback_url": None, "received": 1.0, "state": "queued", "log": ""}
                for j, tag in (("j1", "latest"), ("j2", "v3.0.0"))]
        ended = []
        autodeploy.resume_unfinished(rows, self.service.config, self.service.queue, ended.append)
        self.assertEqual([(job.id, job.state) for job in ended], [("j1", "error")])
        self.assertEqual(ended[0].description, "team/web:latest is no longer configured: tag latest is "
                         "not a version such as v1.2.3 (tag_policy = minor); not resumed")
        self.assertEqual(self.service.queue.get(timeout=0).id, "j2")


class AcceptUnderAPolicyTest(ServerTestCase):
    """Through the HTTP server, whose Engine does not answer: judged without a running version."""

    def setUp(self):
        super().setUp()
        apps = make_apps()
        apps["team/api"] = apps["team/api"]._replace(tag_policy="minor", tags=("v1.2.0",))
        self.start_server(make_config(apps=apps))

    def test_a_refused_tag_is_acknowledged_with_the_reason_and_no_job(self):
        for tag, reason in (("v2.0.0", "v2.0.0 is outside the minor policy from v1.2.0"),
                            ("v1.3.0-rc.1", "pre-release v1.3.0-rc.1 not followed (prerelease = no)"),
                            ("latest", "tag latest is not a version")):
            with self.subTest(tag=tag):
                status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, hub_body("team/api", tag))
                self.assertEqual(status, 200, doc)
                self.assertEqual(doc["status"], "nothing to deploy")
                self.assertIn("team/api: " + reason, doc["ignored"][0])
                self.assertTrue(self.logs.matching(reason))
        self.assertEqual(self.service.queue.depth(), 0)
        self.assertEqual(self.service.job_list(), [])

    def test_a_tag_the_policy_allows_is_queued(self):
        status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, hub_body("team/api", "v1.4.0"))
        self.assertEqual((status, doc["tag"]), (202, "v1.4.0"))

    def test_a_refused_delivery_is_not_remembered_as_accepted(self):
        # A redelivery is judged again, not answered as a duplicate of an accepted push.
        body = notification(registry_event("e1", "team/api", tag="v2.0.0"))
        for _ in range(2):
            status, doc, _ = self.post("/deploy/" + GLOBAL_TOKEN, body, {"Content-Type": DISTRIBUTION})
            self.assertEqual(status, 200, doc)
            self.assertEqual(doc["ignored"], ["team/api: v2.0.0 is outside the minor policy from v1.2.0"])


class DeployCommandUnderAPolicyTest(RunningV123TestCase):
    """The `deploy` command: a push the policy refuses prints why and exits 0."""

    def setUp(self):
        super().setUp()
        self.config = web_config(apps={"team/web": minor_app()}, state_dir=temp_folder(self))
        self.service = Service(self.config, self.rig.runner, CallbackSender([]), MemoryJournal(),
                               clock=self.rig.clock, hostname="host")

    def run_quietly(self, call):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = call()
        return status, out.getvalue(), err.getvalue()

    def test_through_the_running_service_a_refused_push_prints_the_reason_and_exits_0(self):
        server = autodeploy.ControlServer(self.config.state_file("control.sock"), self.service)
        serve_in_thread(self.addCleanup, server)
        status, out, _ = self.run_quietly(lambda: autodeploy.deploy_through_service(
            self.config, Push("team/web", "v2.0.0", sender="cli")))
        self.assertEqual(status, 0)
        self.assertIn("team/web: nothing to deploy: v2.0.0 is outside the minor policy from v1.2.3", out)
        self.assertEqual(self.service.queue.depth(), 0)

    def test_without_a_tag_the_command_asks_for_one(self):
        status, _, err = self.run_quietly(lambda: autodeploy.deploy_command(self.config, "team/web"))
        self.assertEqual(status, 2)
        self.assertIn("team/web:TAG", err)


if __name__ == "__main__":
    unittest.main()
