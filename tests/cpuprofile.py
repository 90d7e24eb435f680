"""`pytest --cpu-profile FILE`: CPU seconds and wall seconds of every test, per phase, as JSON lines.

CPU is this pytest process's own plus that of every process it started, the living ones included:
getrusage(SELF + CHILDREN) covers the children it reaped, a scan of /proc adds each living
descendant's user + sys time together with that of the children it reaped itself (the session's
reused worlds, torchrun's agent and ranks, loader fork servers). A phase's figure is the difference
before and after it, so CPU a long-lived world spends idling between tests shows up in the next
test. Not seen: processes that left the tree (daemonized, or orphaned and adopted by init) before
they ended.

One line per test: `{"id", "cpu", "wall", "phases": {"setup": [cpu, wall], "call": ..., "teardown": ...},
"threads", "worker"}` (threads: of the descendants still alive after the test, e.g. a reused world's
ranks: a number that grows from test to test is a leak; worker: pytest-xdist's worker id, or "main"); then one line `{"id": "<collection>", ...}`
and at the end `{"id": "<session>", "cpu", "wall"}` for the whole process, its start-up and imports
included (under pytest-xdist also one from the controller, worker "controller", holding all workers). The file
is appended to, so several workers can share it. `scripts/suite_profile.py FILE` sums it by file and
directory and lists the tests that wait (docs/testing.md, "Per-test CPU profile").

Off unless the option is given; a /proc scan costs ~2 ms, two per phase.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest

_TICK = os.sysconf("SC_CLK_TCK")
PHASES = ("setup", "call", "teardown")


def _living_descendants(root: int) -> tuple[float, int]:
    """(user + sys seconds, threads) of every living descendant of `root`, with the children each reaped."""
    children: dict[int, list[tuple[int, float, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # [1] ppid, [11:15] utime stime cutime cstime, [17] threads
        cpu = sum(int(x) for x in fields[11:15]) / _TICK
        children.setdefault(int(fields[1]), []).append((int(entry), cpu, int(fields[17])))
    total, threads, todo = 0.0, 0, [root]
    while todo:
        for pid, cpu, n in children.get(todo.pop(), []):
            total += cpu
            threads += n
            todo.append(pid)
    return total, threads


def tree_cpu() -> float:
    """CPU seconds so far of this process and all it started (reaped or living)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + _living_descendants(os.getpid())[0]


def _age() -> float:
    """Seconds since this process started (its interpreter start-up and imports included)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / _TICK


def _plain_id(nodeid: str) -> str:
    """The test id without the `@unit` that pytest-xdist's --dist loadgroup appends (tests/xdist_plan.py)."""
    return nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


class CpuProfile:
    """The registered plugin object while --cpu-profile is on."""

    def __init__(self, path: str, config: pytest.Config) -> None:
        self.out = open(path, "a", buffering=1)  # line-buffered: a crash keeps every finished test
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        if self.worker == "main" and config.getoption("numprocesses", None):
            self.worker = "controller"  # pytest-xdist's: runs no test; its session line holds all workers
        self.phases: dict[str, list[float]] = {}

    def _write(self, record: dict) -> None:
        self.out.write(json.dumps({**record, "worker": self.worker}) + "\n")

    def _measure(self, when: str):
        cpu0, wall0 = tree_cpu(), time.monotonic()
        yield
        self.phases[when] = [round(tree_cpu() - cpu0, 3), round(time.monotonic() - wall0, 3)]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection(self, session):
        cpu0, wall0 = tree_cpu(), time.monotonic()
        yield
        self._write(
            {"id": "<collection>", "cpu": round(tree_cpu() - cpu0, 3), "wall": round(time.monotonic() - wall0, 3)}
        )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):
        yield from self._measure("setup")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        yield from self._measure("call")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        yield from self._measure("teardown")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.phases = {}
        yield
        cpu = round(sum(p[0] for p in self.phases.values()), 3)
        wall = round(sum(p[1] for p in self.phases.values()), 3)
        threads = _living_descendants(os.getpid())[1]  # left running after the test (worlds, servers)
        self._write({"id": _plain_id(item.nodeid), "cpu": cpu, "wall": wall, "phases": self.phases, "threads": threads})

    def pytest_unconfigure(self, config):
        self._write({"id": "<session>", "cpu": round(tree_cpu(), 3), "wall": round(_age(), 3)})
        self.out.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-profile",
        metavar="FILE",
        default=None,
        help="append one JSON line per test to FILE: CPU seconds of pytest and every process it started, "
        "wall seconds, per phase (tests/cpuprofile.py; summarise with scripts/suite_profile.py)",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--cpu-profile")
    if path:
        config.pluginmanager.register(CpuProfile(path, config), "cpu-profile")
