"""Unit tests: source addresses: `allow_from`, `trusted_proxies`,
X-Forwarded-For and RFC 7239 Forwarded.

The in-process server listens on 127.0.0.1, so the peer is always 127.0.0.1.
Comments starting with BUG name a bug these tests found; each is fixed, and
the test keeps it fixed.
"""

import http.client
import io
import ipaddress
import unittest
from typing import Any, Tuple

from autodeploy import client_address, forwarded_for, in_networks
from tests.unit_support import BoundedTestCase, GLOBAL_TOKEN, ServerTestCase, hub_body


def parse_headers(text: str) -> http.client.HTTPMessage:
    """Request headers as the handler sees them."""
    return http.client.parse_headers(io.BytesIO(text.encode("latin-1") + b"\r\n\r\n"))


def networks(*cidrs: str) -> Tuple[Any, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


class SourceAllowTest(ServerTestCase):
    """The server listens on 127.0.0.1, so the peer is always 127.0.0.1."""

    def test_allowed_source(self):
        for allow in (networks("127.0.0.0/8"), networks("10.0.0.0/8", "127.0.0.1/32"),
                      networks("2001:db8::/32", "127.0.0.0/8")):
            with self.subTest(allow=allow):
                self.start_server(allow_from=allow)
                self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body())[0], 202)

    def test_refused_source_is_403_at_accept_before_a_byte_is_read(self):
        for allow in (networks("10.0.0.0/8"), networks("2001:db8::/32"), networks("::1/128"),
                      networks("::ffff:0:0/96")):
            with self.subTest(allow=allow):
                self.start_server(allow_from=allow)
                self.assertEqual(self.refused_at_accept(), (403, {"error": "forbidden"}))
                for method, path in (("POST", "/deploy/" + GLOBAL_TOKEN), ("POST", "/deploy/wrong"),
                                     ("GET", "/healthz"), ("GET", "/metrics")):
                    self.assertIn(self.post_or_reset(path, hub_body(), method=method), (403, 0))
                self.assertEqual(self.service.queue.depth(), 0)
        self.assertTrue(self.logs.matching("not in allow_from"))

    def test_an_allowed_source_is_not_answered_before_it_asks(self):
        self.start_server(allow_from=networks("127.0.0.0/8"))
        self.assertEqual(self.refused_at_accept(wait=0.2), (0, None))

    def test_forwarding_headers_from_an_untrusted_peer_are_ignored(self):
        spoofs = ({"X-Forwarded-For": "10.1.2.3"}, {"Forwarded": "for=10.1.2.3"},
                  {"Forwarded": 'for="[2001:db8::1]:443"'}, {"X-Forwarded-For": "127.0.0.1, 10.1.2.3"})
        for trusted in ((), networks("192.0.2.0/24", "2001:db8::/32")):
            with self.subTest(trusted=trusted):
                self.start_server(allow_from=networks("10.0.0.0/8", "2001:db8::/32"),
                                  trusted_proxies=trusted)
                for headers in spoofs:
                    self.assertIn(self.post_or_reset("/deploy/" + GLOBAL_TOKEN, hub_body(), headers),
                                  (403, 0))
                self.assertEqual(self.service.queue.depth(), 0)
                # and a spoof cannot get an allowed peer refused either
                self.start_server(allow_from=networks("127.0.0.0/8"), trusted_proxies=trusted)
                for headers in spoofs:
                    self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body(), headers)[0], 202)

    def test_forwarding_headers_from_a_trusted_proxy_are_honoured(self):
        self.start_server(allow_from=networks("10.0.0.0/8", "2001:db8::/32"),
                          trusted_proxies=networks("127.0.0.1/32"))
        cases = [({"X-Forwarded-For": "10.1.2.3"}, 202),
                 ({"X-Forwarded-For": "198.51.100.7"}, 403),
                 ({"X-Forwarded-For": "10.1.2.3, 198.51.100.7"}, 403),  # forged first hop
                 ({"X-Forwarded-For": "198.51.100.7, 10.1.2.3"}, 202),
                 ({"Forwarded": 'for="10.1.2.3:4711";proto=https'}, 202),
                 ({"Forwarded": 'for="[2001:db8::5]:443"'}, 202),
                 ({"Forwarded": 'for="[2001:db9::5]"'}, 403),
                 ({"Forwarded": "for=unknown"}, 403),
                 ({"Forwarded": "for=_hidden"}, 403),
                 ({"X-Forwarded-For": "not-an-address"}, 403),
                 ({}, 403)]  # the proxy itself is not in allow_from
        for headers, expected in cases:
            with self.subTest(headers=headers):
                self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body(), headers)[0], expected)

    def test_an_allowed_proxy_does_not_let_everyone_through(self):
        self.start_server(allow_from=networks("127.0.0.0/8"), trusted_proxies=networks("127.0.0.1/32"))
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body(),
                                   {"X-Forwarded-For": "198.51.100.7"})[0], 403)
        self.assertEqual(self.post("/deploy/" + GLOBAL_TOKEN, hub_body(),
                                   {"X-Forwarded-For": "127.0.0.5"})[0], 202)


class ForwardedParsingTest(BoundedTestCase):

    def test_forwarded_for_addresses_ports_and_brackets(self):
        cases = [('for="[2001:db8:cafe::17]:4711"', ["2001:db8:cafe::17"]),
                 ('for="[2001:db8::1]"', ["2001:db8::1"]),
                 ('for="2001:db8::1"', ["2001:db8::1"]),
                 ("for=192.0.2.60:8080", ["192.0.2.60"]),
                 ('for="192.0.2.60:8080"', ["192.0.2.60"]),
                 ("for=192.0.2.60;proto=http;by=203.0.113.43", ["192.0.2.60"]),
                 ("proto=https; For=192.0.2.61", ["192.0.2.61"]),
                 ("for=192.0.2.1, for=198.51.100.17", ["192.0.2.1", "198.51.100.17"]),
                 ("for=unknown", ["unknown"]),
                 ("by=203.0.113.43", [])]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(forwarded_for(parse_headers("Forwarded: " + value)), expected)

    def test_forwarded_for_chains_over_several_header_lines(self):
        headers = parse_headers("Forwarded: for=192.0.2.1\r\nForwarded: for=\"[2001:db8::2]:1\", "
                                "for=10.0.0.3\r\nX-Forwarded-For: 6.6.6.6")
        self.assertEqual(forwarded_for(headers), ["192.0.2.1", "2001:db8::2", "10.0.0.3"])
        headers = parse_headers("X-Forwarded-For: 192.0.2.1 , 10.0.0.2\r\nX-Forwarded-For: 10.0.0.3,,")
        self.assertEqual(forwarded_for(headers), ["192.0.2.1", "10.0.0.2", "10.0.0.3"])
        self.assertEqual(forwarded_for(parse_headers("Host: x")), [])
        self.assertEqual(forwarded_for({}), [])  # no get_all: no chain

    def test_client_address_from_an_untrusted_peer_is_the_peer(self):
        headers = parse_headers("X-Forwarded-For: 10.1.2.3\r\nForwarded: for=10.1.2.4")
        self.assertEqual(client_address("198.51.100.7", headers, ()), "198.51.100.7")
        self.assertEqual(client_address("198.51.100.7", headers, networks("10.0.0.0/8")), "198.51.100.7")

    def test_client_address_through_several_trusted_proxies(self):
        trusted = networks("10.0.0.0/8", "fd00::/8")
        cases = [("10.0.0.4", "X-Forwarded-For: 203.0.113.9, 10.0.0.2, 10.0.0.3", "203.0.113.9"),
                 ("10.0.0.4", "X-Forwarded-For: 6.6.6.6, 203.0.113.9, 10.0.0.2", "203.0.113.9"),
                 ("fd00::4", 'Forwarded: for="[2001:db8::1]:1234", for="[fd00::2]", for=10.0.0.5',
                  "2001:db8::1"),
                 ("::ffff:10.0.0.4", "X-Forwarded-For: 203.0.113.9, ::ffff:10.0.0.3", "203.0.113.9"),
                 ("10.0.0.4", "X-Forwarded-For: 10.0.0.2, 10.0.0.3", "10.0.0.2"),  # all trusted
                 ("10.0.0.4", "Host: x", "10.0.0.4"),
                 ("10.0.0.4", "Forwarded: for=203.0.113.9\r\nX-Forwarded-For: 10.0.0.1", "203.0.113.9")]
        for peer, text, expected in cases:
            with self.subTest(peer=peer, headers=text):
                self.assertEqual(client_address(peer, parse_headers(text), trusted), expected)

    def test_in_networks(self):
        nets = networks("127.0.0.0/8", "2001:db8::/32")
        for address, expected in (("127.0.0.1", True), ("::ffff:127.0.0.1", True), ("128.0.0.1", False),
                                  ("2001:db8::1", True), ("2001:db9::1", False), ("::1", False),
                                  ("fe80::1%eth0", False), ("unknown", False), ("", False),
                                  ("[2001:db8::1]", False), ("127.0.0.1:80", False)):
            with self.subTest(address=address):
                self.assertIs(in_networks(address, nets), expected)
        self.assertFalse(in_networks("127.0.0.1", ()))

    def test_a_forwarded_header_forged_behind_an_x_forwarded_for_proxy_is_not_believed(self):
        # BUG (Forwarded preferred over X-Forwarded-For): a trusted proxy that
        # appends to X-Forwarded-For only (nginx $proxy_add_x_forwarded_for,
        # HAProxy option forwardfor, most load balancers) passes a client's own
        # "Forwarded:" header through untouched, and client_address() then
        # believes it and never looks at X-Forwarded-For: allow_from is
        # bypassed by sending "Forwarded: for=<an allowed address>".
        headers = parse_headers("Forwarded: for=10.1.2.3\r\nX-Forwarded-For: 198.51.100.7")
        self.assertNotEqual(client_address("127.0.0.1", headers, networks("127.0.0.1/32")), "10.1.2.3")


if __name__ == "__main__":
    unittest.main()
