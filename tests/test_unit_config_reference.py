"""Unit tests: one source for the configuration reference (README.md's
tables, `config example`, the settings a section may use), and the errors a
newcomer meets while writing a config."""

import os
import re
import unittest

import autodeploy
from autodeploy import ConfigError, load_config
from tests.unit_support import write_config, write_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "t" * 40
ADMIN = "a" * 40


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        return fh.read()


def uncommented(example: str, key_filter=lambda key: True) -> str:
    """The example with the app section and every `#key = value` line that
    has a value switched on (those `key_filter` lets through)."""
    lines = []
    for line in example.splitlines():
        setting = re.match(r"#([a-z_]+) = (\S.*)$", line)
        if line == "#[myname/myrepo]":
            line = line[1:]
        elif setting and key_filter(setting.group(1)):
            line = line[1:]
        lines.append(line)
    return "\n".join(lines) + "\n"


class ReferenceTest(unittest.TestCase):

    def test_readme_tables_are_the_ones_the_settings_render(self):
        text = readme()
        for table in (autodeploy.settings_table(autodeploy.MAIN_SETTINGS),
                      autodeploy.settings_table(autodeploy.APP_SETTINGS),
                      autodeploy.settings_table(autodeploy.FIRST_DEPLOY_SETTINGS, "example")):
            self.assertIn(table, text, "README.md's table differs from the Setting rows: paste "
                                       "`python3 autodeploy.py config reference` into it")

    def test_every_known_setting_is_in_the_example_and_nothing_else(self):
        example = autodeploy.config_example()
        shown = re.findall(r"^#([a-z_]+) =", example, re.M)
        self.assertEqual(set(shown), autodeploy.MAIN_KEYS | autodeploy.APP_KEYS)
        main, app = example.split("#[myname/myrepo]")
        self.assertEqual(set(re.findall(r"^#([a-z_]+) =", main, re.M)), autodeploy.MAIN_KEYS)
        self.assertEqual(set(re.findall(r"^#([a-z_]+) =", app, re.M)), autodeploy.APP_KEYS)

    def test_the_example_as_written_is_valid_and_follows_labelled_containers(self):
        config = load_config(write_config(self, autodeploy.config_example()), {})
        self.assertEqual(config.apps, {})
        self.assertEqual((config.listen_host, config.listen_port), ("127.0.0.1", 3456))
        self.assertEqual(config.tokens, [])

    def test_every_example_value_is_valid_when_switched_on(self):
        # service and container exclude each other: the example shows both.
        text = uncommented(autodeploy.config_example(), lambda key: key != "service")
        path = write_config(self, text)
        folder = os.path.dirname(path)
        for name, content in (("token", TOKEN), ("signing-secret", "s" * 20),
                              ("admin-token", ADMIN), ("registry-password", "pw")):
            write_file(folder, name, content + "\n")
        config = load_config(path, {})
        self.assertEqual(config.tokens, [TOKEN])
        self.assertEqual(config.admin_tokens, (ADMIN,))
        app = config.app_for("myname/myrepo")
        self.assertEqual((app.container, app.health_url, app.registry_user),
                         ("myname-myrepo", "http://{ip}:8080/health", "deploy-bot"))
        self.assertEqual(app.env, ["TZ=UTC"])

    def test_no_line_of_the_example_is_wider_than_79_columns(self):
        for line in autodeploy.config_example().splitlines():
            self.assertLessEqual(len(line), 79, line)

    def test_example_comments_carry_no_markdown(self):
        example = autodeploy.config_example()
        self.assertNotIn("`", example)
        self.assertNotIn("](#", example)


class ReadmeExampleTest(unittest.TestCase):

    def test_the_example_webhook_is_a_docker_hub_push_autodeploy_accepts(self):
        text = readme()
        body = re.search(r"/deploy/\$TOKEN -d '(\{.*?\})'\n```", text, re.S)
        self.assertIsNotNone(body, "README.md's example webhook is gone")
        parsed = autodeploy.parse_request(body.group(1).encode(), {}, None)
        self.assertEqual(parsed.sender, "dockerhub")
        self.assertEqual([(p.repository, p.tag) for p in parsed.pushes], [("myname/myrepo", "latest")])
        self.assertTrue(parsed.pushes[0].callback_url.startswith(autodeploy.DEFAULT_CALLBACK_ALLOW))

    def test_the_quick_starts_curl_is_a_native_push(self):
        line = next(line for line in readme().splitlines() if line.startswith("curl -X POST -d '"))
        body = re.search(r"-d '([^']*)'", line).group(1)
        parsed = autodeploy.parse_request(body.encode(), {}, None)
        self.assertEqual((parsed.sender, parsed.pushes[0].repository), ("native", "myname/myrepo"))


class NewcomerErrorsTest(unittest.TestCase):

    def error(self, text: str, environ=None) -> str:
        with self.assertRaises(ConfigError) as caught:
            load_config(write_config(self, text), environ or {})
        return str(caught.exception)

    def test_an_unknown_setting_names_its_line_and_the_setting_it_resembles(self):
        message = self.error("[autodeploy]\ntoken = %s\n\n[team/app]\n# a comment\nrestrat = always\n"
                             % TOKEN)
        self.assertIn("[team/app] line 6: unknown setting 'restrat' (did you mean 'restart'?)",
                      message)
        message = self.error("[autodeploy]\nlisen = 127.0.0.1:1\n")
        self.assertIn("line 2: unknown setting 'lisen' (did you mean 'listen'?)", message)

    def test_an_unknown_setting_like_none_lists_the_known_ones(self):
        message = self.error("[autodeploy]\nzzzzzz = 1\n")
        self.assertIn("unknown setting 'zzzzzz' (known: ", message)
        self.assertIn("admin_token_file", message)

    def test_the_admin_token_can_come_from_a_file_or_a_credential(self):
        path = write_config(self, "[autodeploy]\nadmin_token_file = admin\n")
        write_file(os.path.dirname(path), "admin", ADMIN + "\n")
        self.assertEqual(load_config(path, {}).admin_tokens, (ADMIN,))
        credentials = os.path.dirname(write_file(os.path.dirname(path), "admin_token", "b" * 40))
        config = load_config(path, {"CREDENTIALS_DIRECTORY": credentials})
        self.assertEqual(config.admin_tokens, (ADMIN, "b" * 40))
        write_file(os.path.dirname(path), "admin", "short\n")
        self.assertRaises(ConfigError, load_config, path, {})

    def test_a_credential_that_is_a_folder_is_an_error_that_says_so(self):
        # As a permission error would be (that needs a non-root user to
        # show): an OSError other than "not found" is said, not taken as "no token".
        path = write_config(self, "[autodeploy]\n")
        folder = os.path.join(os.path.dirname(path), "credentials")
        os.makedirs(os.path.join(folder, "token"))
        message = self.error("[autodeploy]\n", {"CREDENTIALS_DIRECTORY": folder})
        self.assertIn("cannot read the systemd credential 'token'", message)
        self.assertIn("Is a directory", message)

    def test_an_empty_autodeploy_config_variable_counts_as_unset(self):
        missing = os.path.join(os.path.dirname(write_config(self, "")), "none.conf")
        default = autodeploy.DEFAULT_CONFIG
        autodeploy.DEFAULT_CONFIG = missing  # no default file: serve on the defaults
        self.addCleanup(setattr, autodeploy, "DEFAULT_CONFIG", default)
        config = autodeploy.read_config(None, {"AUTODEPLOY_CONFIG": ""})
        self.assertTrue(autodeploy.is_default_config(config))

    def test_no_credential_given_is_no_token_not_an_error(self):
        path = write_config(self, "[autodeploy]\n")
        config = load_config(path, {"CREDENTIALS_DIRECTORY": os.path.dirname(path)})
        self.assertEqual(config.tokens, [])


if __name__ == "__main__":
    unittest.main()
