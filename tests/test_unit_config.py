"""Unit tests: the configuration file and webhook payloads."""

import json
import logging
import os
import unittest

import autodeploy
from autodeploy import ConfigError, PayloadError, load_config, parse_request
from tests.unit_support import capture_logs, write_config, write_file

TOKEN = "t" * 40


class ConfigTest(unittest.TestCase):

    def load(self, text: str) -> autodeploy.Config:
        return load_config(write_config(self, text))

    def assertConfigError(self, text: str, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load(text)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn(TOKEN, message)

    def test_defaults(self):
        config = self.load("[autodeploy]\ntoken = %s\n\n[myname/myrepo]\n" % TOKEN)
        self.assertEqual((config.listen_host, config.listen_port), ("127.0.0.1", 3456))
        self.assertEqual(config.workers, 3)
        self.assertEqual(config.max_body, 64 * 1024)
        self.assertEqual(config.callback_allow, [("https", "registry.hub.docker.com", 443)])
        app = config.app_for("myname/myrepo")
        self.assertEqual(app.container, "myname-myrepo")
        self.assertEqual(app.image, "myname/myrepo")
        self.assertEqual(app.tags, ("latest",))
        self.assertIsNone(config.app_for("other/repo"))

    def test_full_app_section(self):
        config = self.load("""
# comments are allowed
[autodeploy]
listen = 0.0.0.0:8000
token = %s
workers = 5
callback_allow = https://registry.hub.docker.com, http://127.0.0.1:9000

[team/web]
image = registry.example:5000/team/web
tag = latest stable
container = web
stop_timeout = 4
ports = 127.0.0.1:8080:80, 8443:443/tcp
env =
    MODE=prod
    URL=http://x/?a=1,b=2
volumes = /srv/web:/data:ro, web-cache:/cache
labels =
    tier=front
restart = on-failure:3
network = shop
command = httpd -f -p "80"
""" % TOKEN)
        self.assertEqual(config.listen_port, 8000)
        self.assertIn(("http", "127.0.0.1", 9000), config.callback_allow)
        app = config.apps["team/web"]
        self.assertEqual(app.image, "registry.example:5000/team/web")
        self.assertEqual(app.tags, ("latest", "stable"))
        self.assertEqual(app.ports, [("127.0.0.1", "8080", "80/tcp"), ("", "8443", "443/tcp")])
        self.assertEqual(app.env, ["MODE=prod", "URL=http://x/?a=1,b=2"])
        self.assertEqual(app.volumes, ["/srv/web:/data:ro", "web-cache:/cache"])
        self.assertEqual(app.labels, {"tier": "front"})
        self.assertEqual(app.command, ["httpd", "-f", "-p", "80"])
        self.assertEqual(app.stop_timeout, 4)
        body = autodeploy.first_create_body(app, "registry.example:5000/team/web:latest")
        self.assertEqual(body["HostConfig"]["RestartPolicy"], {"Name": "on-failure", "MaximumRetryCount": 3})
        self.assertEqual(body["HostConfig"]["PortBindings"]["80/tcp"], [{"HostIp": "127.0.0.1", "HostPort": "8080"}])
        self.assertEqual(body["HostConfig"]["NetworkMode"], "shop")
        self.assertEqual(body["ExposedPorts"], {"80/tcp": {}, "443/tcp": {}})

    def test_token_file_relative_to_config(self):
        path = write_config(self, "[autodeploy]\ntoken_file = token\n")
        write_file(os.path.dirname(path), "token", TOKEN + "\n")
        self.assertEqual(load_config(path).tokens, [TOKEN])

    def test_errors_name_file_section_and_problem(self):
        self.assertConfigError("[other]\n", "no [autodeploy] section")
        self.assertConfigError("[autodeploy]\nlisten = nowhere\n", "[autodeploy] listen", "HOST:PORT")
        self.assertConfigError("[autodeploy]\nworkers = many\n", "workers", "not a whole number")
        self.assertConfigError("[autodeploy]\nworkers = 0\n", "workers", "outside")
        self.assertConfigError("[autodeploy]\ntoken = short\n", "token", "at least 32")
        self.assertConfigError("[autodeploy]\ntokn = %s\n" % TOKEN, "unknown setting 'tokn'")
        self.assertConfigError("[autodeploy]\ntoken_file = /nonexistent/token\n", "token_file", "cannot read")
        self.assertConfigError("[autodeploy]\ncallback_allow = ftp://x\n", "callback_allow")
        self.assertConfigError("[autodeploy]\n[a/b]\nports = 80\n", "[a/b] ports", "'80'")
        self.assertConfigError("[autodeploy]\n[a/b]\nrestart = sometimes\n", "[a/b] restart")
        self.assertConfigError("[autodeploy]\n[a/b]\ntag = bad/tag\n", "[a/b] tag")
        self.assertConfigError("[autodeploy]\n[a/b]\nimage = Bad Image\n", "[a/b] image")
        self.assertConfigError("[autodeploy]\n[a/b]\nimage = a/b:latest\n", "[a/b] image")
        self.assertConfigError("[autodeploy]\n[a/b]\nenv = NOVALUE\n", "[a/b] env", "NAME=VALUE")
        self.assertConfigError("[autodeploy]\n[a/b]\nvolumes = relative\n", "[a/b] volumes")
        self.assertConfigError("[autodeploy]\n[a/b]\ncommand = 'unclosed\n", "[a/b] command")
        self.assertConfigError("[autodeploy]\n[a/b]\ncontainer = x\n[c/d]\ncontainer = x\n", "same container")

    def test_an_app_without_policy_keys_follows_its_listed_tags_and_is_not_polled(self):
        app = self.load("[autodeploy]\n[a/b]\ntag = latest stable\n").app_for("a/b")
        self.assertEqual((app.tag_policy, app.tags, app.prerelease, app.poll),
                         ("exact", ("latest", "stable"), False, 0.0))

    def test_a_semver_policy_takes_no_tag_or_one_version_to_start_from(self):
        config = self.load("[autodeploy]\n[a/none]\ntag_policy = minor\n"
                           "[a/hint]\ntag_policy = patch\ntag = v1.2.0\n"
                           "[a/pre]\ntag_policy = major\nprerelease = yes\ntag = 2.0.0-rc.1\n")
        self.assertEqual([(app.tag_policy, app.tags, app.prerelease) for app in config.apps.values()],
                         [("minor", (), False), ("patch", ("v1.2.0",), False),
                          ("major", ("2.0.0-rc.1",), True)])

    def test_a_glob_policy_takes_its_patterns_from_tag(self):
        app = self.load("[autodeploy]\n[a/b]\ntag_policy = glob\ntag = v1.*, release-[0-9]?\n"
                        ).app_for("a/b")
        self.assertEqual((app.tag_policy, app.tags), ("glob", ("v1.*", "release-[0-9]?")))

    def test_poll_is_per_app_inheriting_the_autodeploy_default_and_no_turns_it_off(self):
        config = self.load("[autodeploy]\npoll = 5m\n[a/inherits]\n[a/own]\npoll = 1h30m\n"
                           "[a/off]\npoll = no\n[a/seconds]\npoll = 1s\nimage = reg.example/a/seconds\n")
        self.assertEqual({name: app.poll for name, app in config.apps.items()},
                         {"a/inherits": 300.0, "a/own": 5400.0, "a/off": 0.0, "a/seconds": 1.0})
        self.assertEqual(self.load("[autodeploy]\n[a/b]\n").app_for("a/b").poll, 0.0)

    def test_policy_and_poll_errors_name_the_section_and_key(self):
        app = "[autodeploy]\n[a/b]\n"
        self.assertConfigError(app + "tag_policy = newest\n", "[a/b] tag_policy", "'newest'", "glob")
        self.assertConfigError(app + "tag_policy = minor\nprerelease = maybe\n", "[a/b] prerelease")
        self.assertConfigError(app + "prerelease = yes\n", "[a/b] prerelease", "exact")
        self.assertConfigError(app + "tag_policy = glob\n", "[a/b] tag", "patterns")
        self.assertConfigError(app + "tag_policy = glob\ntag = v1/*\n", "[a/b] tag", "'v1/*'")
        self.assertConfigError(app + "tag_policy = minor\ntag = latest\n", "[a/b] tag", "'latest'",
                               "not a version")
        self.assertConfigError(app + "tag_policy = minor\ntag = v01.2.0\n", "[a/b] tag", "not a version")
        self.assertConfigError(app + "tag_policy = minor\ntag = v1.2.0 v1.3.0\n", "[a/b] tag",
                               "at most one")
        self.assertConfigError(app + "tag_policy = minor\ntag = v1.3.0-rc.1\n", "[a/b] tag",
                               "pre-release", "prerelease = no")
        for value in ("5", "0s", "soon", "5m1h", "1.5m", "-5m", "m"):
            with self.subTest(poll=value):
                self.assertConfigError(app + "poll = %s\n" % value, "[a/b] poll", repr(value))
        self.assertConfigError("[autodeploy]\npoll = 5x\n", "[autodeploy] poll", "'5x'")

    def test_a_poll_under_a_minute_is_warned_about_for_a_docker_hub_image_only(self):
        logs = capture_logs(self.addCleanup)
        self.load("[autodeploy]\npoll = 30s\n[team/hub]\n[team/own]\nimage = reg.example:5000/team/own\n"
                  "[team/slow]\npoll = 1m\n")
        warnings = [record.getMessage() for record in logs.records if record.levelno == logging.WARNING]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("[team/hub] poll = 30s", warnings[0])
        self.assertIn("Docker Hub", warnings[0])

    def test_an_apps_registry_login_reads_its_password_file_relative_to_the_config(self):
        path = write_config(self, "[autodeploy]\n[team/web]\nregistry_user = alice\n"
                                  "registry_password_file = secrets/registry\n")
        os.mkdir(os.path.join(os.path.dirname(path), "secrets"))
        for written, password in (("Zq9 x\n", "Zq9 x"), ("Zq9x\r\n", "Zq9x"), ("Zq9x\n\n", "Zq9x\n"),
                                  ("Zq9x", "Zq9x"), (" Zq9x ", " Zq9x ")):
            with self.subTest(written=written):
                password_file = write_file(os.path.dirname(path), "secrets/registry", written)
                app = load_config(path).app_for("team/web")
                self.assertEqual((app.registry_user, app.registry_password, app.registry_password_file),
                                 ("alice", password, password_file))
                self.assertNotIn(password.strip(), repr(app))

    def test_without_a_registry_login_an_app_has_none(self):
        app = self.load("[autodeploy]\n[team/web]\n").app_for("team/web")
        self.assertEqual((app.registry_user, app.registry_password), ("", ""))

    def test_a_registry_login_needs_both_keys_and_a_readable_non_empty_file(self):
        folder = os.path.dirname(write_config(self, ""))
        empty = write_file(folder, "empty", "\n")
        self.assertConfigError("[autodeploy]\n[a/b]\nregistry_user = alice\n",
                               "[a/b] registry_user and registry_password_file", "both")
        self.assertConfigError("[autodeploy]\n[a/b]\nregistry_password_file = %s\n" % empty,
                               "[a/b] registry_user and registry_password_file", "both")
        self.assertConfigError("[autodeploy]\n[a/b]\nregistry_user = alice\n"
                               "registry_password_file = /nonexistent/pass\n",
                               "[a/b] registry_password_file", "/nonexistent/pass", "cannot read")
        self.assertConfigError("[autodeploy]\n[a/b]\nregistry_user = alice\n"
                               "registry_password_file = %s\n" % empty,
                               "[a/b] registry_password_file", empty, "empty")
        self.assertConfigError("[autodeploy]\nregistry_user = alice\n", "unknown setting 'registry_user'")

    def test_notifications_inherit_and_override(self):
        config = self.load("""
[autodeploy]
token = {t}
notify_url = https://hooks.example.com/autodeploy
slack_url = https://hooks.slack.com/services/T0/B0/secret
[a/inherits]
[a/own]
notify_url = http://127.0.0.1:9000/mine
notify_on = success, rollback
[a/quiet]
notify_url =
slack_url =
""".format(t=TOKEN))
        inherits, own, quiet = (config.app_for(name) for name in ("a/inherits", "a/own", "a/quiet"))
        self.assertEqual(inherits.notify_url, "https://hooks.example.com/autodeploy")
        self.assertEqual(inherits.slack_url, "https://hooks.slack.com/services/T0/B0/secret")
        self.assertEqual(inherits.notify_on, frozenset(["failure", "rollback"]))
        self.assertEqual(own.notify_url, "http://127.0.0.1:9000/mine")
        self.assertEqual(own.slack_url, inherits.slack_url)
        self.assertEqual(own.notify_on, frozenset(["success", "rollback"]))
        self.assertEqual((quiet.notify_url, quiet.slack_url), ("", ""))
        self.assertEqual(config.stop_deadline, 30)

    def test_notification_urls_follow_the_outbound_rules(self):
        for url, problem in (("http://hooks.example.com/x", "use https"),
                             ("https://user:pw@hooks.example.com/x", "no user or password"),
                             ("https://@hooks.example.com/x", "no user or password"),
                             ("ftp://hooks.example.com/x", "http(s)"),
                             ("https://hooks.example.com:99999/x", "not a URL")):
            with self.subTest(url=url):
                self.assertConfigError("[autodeploy]\nslack_url = %s\n" % url, "slack_url", problem)
        self.assertConfigError("[autodeploy]\n[a/b]\nnotify_on = failure, always\n",
                               "[a/b] notify_on", "always")
        # The secret part of the URL stays out of the message.
        with self.assertRaises(ConfigError) as caught:
            self.load("[autodeploy]\nslack_url = http://hooks.slack.com/services/SECRET\n")
        self.assertNotIn("SECRET", str(caught.exception))
        for url in ("http://localhost:8080/x", "http://[::1]:8080/x", "https://10.0.0.1/x"):
            self.assertEqual(self.load("[autodeploy]\nnotify_url = %s\n" % url).app_for("x"), None)

    def test_syntax_errors_carry_the_line(self):
        self.assertConfigError("[autodeploy]\nlisten = 1:2\n[autodeploy]\n", "line 3", "autodeploy")
        self.assertConfigError("[autodeploy]\nthis is not ini\n", "line 2")

    def test_missing_file(self):
        with self.assertRaises(ConfigError) as caught:
            load_config("/nonexistent/autodeploy.conf")
        self.assertIn("/nonexistent/autodeploy.conf", str(caught.exception))


def hub_payload(repo="myname/myrepo", tag="latest", callback="https://registry.hub.docker.com/u/x/hook/1/"):
    return json.dumps({"callback_url": callback, "push_data": {"tag": tag, "pusher": "me"},
                       "repository": {"repo_name": repo, "name": repo.split("/")[-1]}}).encode()


def first_push(body: bytes):
    """The push a Docker Hub payload carries."""
    return parse_request(body, None, "dockerhub").pushes[0]


class PayloadTest(unittest.TestCase):

    def assertRefused(self, body: bytes, fragment: str) -> None:
        with self.assertRaises(PayloadError) as caught:
            first_push(body)
        self.assertEqual(caught.exception.status, 400)
        self.assertIn(fragment, caught.exception.message)

    def test_docker_hub_payload(self):
        push = first_push(hub_payload())
        self.assertEqual((push.repository, push.tag), ("myname/myrepo", "latest"))
        self.assertEqual(push.callback_url, "https://registry.hub.docker.com/u/x/hook/1/")

    def test_callback_is_optional(self):
        body = json.dumps({"push_data": {"tag": "v1"}, "repository": {"repo_name": "a/b"}}).encode()
        self.assertIsNone(first_push(body).callback_url)

    def test_malformed_bodies(self):
        self.assertRefused(b"", "not JSON")
        self.assertRefused(b"{", "not JSON")
        self.assertRefused(b"\xff\xfe", "not UTF-8")
        self.assertRefused(b"[]", "not a JSON object")
        self.assertRefused(b"42", "not a JSON object")
        self.assertRefused(b"{}", "repository.repo_name")
        self.assertRefused(b'{"repository": "a/b", "push_data": {"tag": "x"}}', "repository.repo_name")
        self.assertRefused(b'{"repository": {"repo_name": "a/b"}}', "push_data.tag")
        self.assertRefused(b'{"repository": {"repo_name": "a/b"}, "push_data": {"tag": 5}}', "push_data.tag")
        self.assertRefused(hub_payload(repo="../../etc"), "not a valid repository")
        self.assertRefused(hub_payload(repo="A/B"), "not a valid repository")
        self.assertRefused(hub_payload(tag="a/b"), "not a valid tag")
        self.assertRefused(hub_payload(tag="x" * 129), "not a valid tag")
        self.assertRefused(hub_payload(callback=["x"]), "callback_url")
        self.assertRefused(b"[" * 100000 + b"]" * 100000, "")

class CallbackRulesTest(unittest.TestCase):

    def test_only_allowed_origins(self):
        allow = [("https", "registry.hub.docker.com", 443), ("http", "127.0.0.1", 9000)]
        ok = autodeploy.callback_allowed
        self.assertTrue(ok("https://registry.hub.docker.com/u/a/b/hook/123/", allow))
        self.assertTrue(ok("https://registry.hub.docker.com:443/x", allow))
        self.assertTrue(ok("http://127.0.0.1:9000/cb", allow))
        self.assertFalse(ok("http://registry.hub.docker.com/x", allow))
        self.assertFalse(ok("https://registry.hub.docker.com.evil.example/x", allow))
        self.assertFalse(ok("https://user:pw@registry.hub.docker.com/x", allow))
        self.assertFalse(ok("http://127.0.0.1:9001/cb", allow))
        self.assertFalse(ok("http://169.254.169.254/latest/meta-data", allow))
        self.assertFalse(ok("file:///etc/passwd", allow))
        self.assertFalse(ok("http://[::1", allow))

    def test_callback_body(self):
        job = autodeploy.Job(id="j1", app=autodeploy.AppConfig("a/b", "a/b", ("latest",), "a-b"),
                             tag="latest")
        job.state, job.description = "failed", "pull failed"
        self.assertEqual(autodeploy.callback_body(job),
                         {"state": "failure", "description": "pull failed", "context": "autodeploy"})
        job.state = "up_to_date"
        self.assertEqual(autodeploy.callback_body(job)["state"], "success")

    def test_notification_bodies(self):
        app = autodeploy.AppConfig("a/b", "reg.example/a/b", ("latest",), "a-b")
        job = autodeploy.Job(id="j1", app=app, tag="latest", received=100.0)
        job.started, job.finished = 101.0, 103.5
        job.state, job.description = "rolled_back", "it exited <code 3> & more"
        body = autodeploy.notification_body(job, "rollback", "host1")
        self.assertEqual({k: body[k] for k in ("event", "state", "app", "container", "image", "job",
                                               "host", "took")},
                         {"event": "rollback", "state": "rolled_back", "app": "a/b", "container": "a-b",
                          "image": "reg.example/a/b:latest", "job": "j1", "host": "host1", "took": 2.5})
        text = autodeploy.slack_body(job, "rollback", "host1")["text"]
        self.assertIn("reg.example/a/b:latest ROLLED BACK (job j1)", text)
        self.assertIn("it exited &lt;code 3&gt; &amp; more", text)


if __name__ == "__main__":
    unittest.main()
