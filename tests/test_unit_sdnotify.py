"""Unit tests: READY=1 / WATCHDOG=1 / STOPPING=1 over $NOTIFY_SOCKET, from
serve() run in a thread, on a path and on an abstract socket."""

import os
import signal
import socket
import sys
import time
import unittest
from typing import List, Tuple

import autodeploy
from tests.unit_support import BoundedTestCase, make_config, run_serve, temp_folder


class SdNotifyTest(BoundedTestCase):

    def listen(self, abstract: bool) -> Tuple[socket.socket, str]:
        """A datagram socket for $NOTIFY_SOCKET: a path, or an abstract '@name'."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = "autodeploy-test-%d-%s" % (os.getpid(), os.urandom(4).hex())
            sock.bind("\0" + name)
            address = "@" + name
        else:
            address = os.path.join(temp_folder(self, "adn-"), "notify")
            sock.bind(address)
        sock.settimeout(0.1)
        return sock, address

    def receive_until(self, sock: socket.socket, messages: List[str], wanted: str, timeout: float) -> bool:
        """Collect datagrams into `messages` until one starts with `wanted`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode("utf-8"))
            except socket.timeout:
                continue
            if messages[-1].startswith(wanted):
                return True
        return False

    def check_serve_notifies(self, abstract: bool) -> None:
        sock, address = self.listen(abstract)
        handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        environ = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000"}
        stop, thread, result = run_serve(self, make_config(listen_port=0), environ)
        messages: List[str] = []
        self.assertTrue(self.receive_until(sock, messages, "READY=1", 5), (messages, self.logs.lines()))
        self.assertRegex(messages[-1], r"^READY=1\nSTATUS=listening on port [1-9]\d*$")
        ready_at = time.monotonic()
        self.assertTrue(self.receive_until(sock, messages, "WATCHDOG=1", 2), messages)
        self.assertLess(time.monotonic() - ready_at, 1.0)  # every 5 ms: half of WATCHDOG_USEC
        self.assertTrue(self.receive_until(sock, messages, "WATCHDOG=1", 2), messages)
        stop.set()
        self.assertTrue(self.receive_until(sock, messages, "STOPPING=1", 5), messages)
        thread.join(10)
        self.assertFalse(thread.is_alive())
        self.assertEqual(result, {"status": 0})
        self.assertTrue(messages[0].startswith("READY=1"))
        self.assertEqual(set(messages[1:-1]), {"WATCHDOG=1"})
        self.assertEqual(messages[-1], "STOPPING=1")
        # serve() in a thread left the process's signal handlers alone
        self.assertEqual((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)), handlers)
        self.assertFalse(self.logs.matching("cannot notify systemd"))

    def test_ready_watchdog_stopping_on_a_path_socket(self):
        self.check_serve_notifies(abstract=False)

    @unittest.skipUnless(sys.platform.startswith("linux"), "abstract sockets are Linux only")
    def test_ready_watchdog_stopping_on_an_abstract_socket(self):
        self.check_serve_notifies(abstract=True)

    def test_sd_notify_without_or_with_a_dead_socket(self):
        self.assertFalse(autodeploy.sd_notify("READY=1", {}))
        self.assertFalse(autodeploy.sd_notify("READY=1", {"NOTIFY_SOCKET": ""}))
        gone = os.path.join(temp_folder(self, "adn-"), "gone")
        self.assertFalse(autodeploy.sd_notify("READY=1", {"NOTIFY_SOCKET": gone}))
        self.assertTrue(self.logs.matching("cannot notify systemd"))

    def test_watchdog_interval(self):
        cases = [({"WATCHDOG_USEC": "200000"}, 0.1), ({"WATCHDOG_USEC": "30000000"}, 15.0),
                 ({}, None), ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "-5"}, None),
                 ({"WATCHDOG_USEC": "soon"}, None),
                 ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
                 ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None)]
        for environ, expected in cases:
            with self.subTest(environ=environ):
                self.assertEqual(autodeploy.watchdog_interval(environ), expected)

if __name__ == "__main__":
    unittest.main()
