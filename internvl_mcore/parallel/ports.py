"""A free TCP port for a new world's rendezvous, without importing torch: the test harness
(tests/launch.py) asks for one in the pytest process, which stays torch-free for the tests that need
no torch (CLI flag errors, the planner).

A port the kernel hands out for `bind(port 0)` comes from the ephemeral range, the same range every
outgoing connection's local port comes from: between `free_port()` and the rendezvous binding it, a
gloo connection of another world (another pytest-xdist worker's) can take it. With PORTS_ENV set to
`LO-HI` (tests/launch.py sets a block per xdist worker, outside the ephemeral range, and the
processes it starts inherit it), ports come from that block instead: disjoint per worker, never an
outgoing connection's."""

from __future__ import annotations

import itertools
import os
import random
import socket

PORTS_ENV = "INTERNVL_MCORE_PORTS"  # "LO-HI": pick rendezvous ports in [LO, HI) (tests: one block per worker)
# successive ports of this process's walk through its block: a port just handed out is not bound yet
_walk: itertools.count | None = None


def free_port() -> int:
    """A TCP port nothing listens on now (a port derived from the pid can clash with another job); the
    one helper for it: conversions' spawned worlds, tests, benches and the demo start torchrun with it."""
    if os.environ.get(PORTS_ENV) and (port := _port_in_block(os.environ[PORTS_ENV])) is not None:
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_in_block(block: str) -> int | None:
    """The next port of `block` ("LO-HI") that binds now, walking from a random start (processes of
    one block rarely meet), each port once per walk of the block; None when all are taken (the
    kernel's pick then, as without a block)."""
    global _walk
    lo, hi = (int(x) for x in block.split("-"))
    if _walk is None:
        _walk = itertools.count(random.randrange(hi - lo))
    for _ in range(hi - lo):
        port = lo + next(_walk) % (hi - lo)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or TIME_WAIT): the next one
            return port
    return None
