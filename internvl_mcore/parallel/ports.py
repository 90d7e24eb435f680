"""A free TCP port for a new world's rendezvous, without importing torch: the test harness
(tests/launch.py) asks for one in the pytest process, which stays torch-free for the tests that need
no torch (CLI flag errors, the planner)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nothing listens on now (a port derived from the pid can clash with another job); the
    one helper for it: conversions' spawned worlds, tests, benches and the demo start torchrun with it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
