"""How `pytest -n 2 --dist loadgroup` (pytest-xdist) splits the suite over two worker processes.

Inert unless pytest runs with `-n N --dist loadgroup`: `pytest` without `-n` collects and runs exactly
as without this plugin.

Two workers are two pytest sessions: every session-scoped cache exists once per worker, so each test
file is one unit of work (its module fixtures set up once) and the files that use the same
session-scoped fixture of tests/ (today: the digits shard sets, and with them the single-process
reference run that `pretrain_log` caches; the grid_worker references; tests/lora's base checkpoint
and runs; a new shared fixture joins by itself) are one unit, so that fixture is built on one worker
only. The workers compute the units (the fixtures are theirs) and write them to a file the controller
named; the controller's scheduler (`pytest_xdist_make_scheduler`) reads it. NOT_SHARED names the session fixtures that
are only a cache object (what they cache is keyed by the run, the runs' sharers share another
fixture too). What stays per worker: the collection, the reused worlds of tests/worldpool.py
(started on first use) and pytest's own session fixtures.

The units are handed out in the order they are collected (xdist's LoadScopeScheduling: one unit per
idle worker, the next when a worker has two tests left), so the workers collect them longest first:
the cost of a unit is the sum of its files' seconds in tests/xdist_costs.json (max of CPU and wall per
test, from an idle whole-suite profile: `scripts/suite_profile.py FILE --costs tests/xdist_costs.json`),
a file it does not know DEFAULT_COST per test. A long unit started last would leave one core idle at
the end; short ones last fill the tail. Within a unit the tests keep their collection order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

NOT_SHARED = ("pretrain_log",)  # a cache object: joining its users would only make one unit larger
COSTS = Path(__file__).with_name("xdist_costs.json")
DEFAULT_COST = 0.5  # seconds per test of a file missing from COSTS (new files: most tests are short)
UNITS_ENV = "INTERNVL_MCORE_XDIST_UNITS"  # the file the workers write {test id: unit} to


def _active(config: pytest.Config) -> bool:
    """A worker of a `--dist loadgroup` run (there xdist resets `--dist` to "no" and keeps the mode as
    `config.option.loadgroup`)."""
    return hasattr(config, "workerinput") and bool(getattr(config.option, "loadgroup", False))


def shared_fixtures(item: pytest.Item) -> list[str]:
    """The session-scoped fixtures of tests/ (conftest.py files) that `item` uses, directly or not."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return [
        name
        for name in item.fixturenames
        if name in defs
        and name not in NOT_SHARED
        and defs[name][-1].scope == "session"
        and defs[name][-1].baseid.split("/")[0] == "tests"
    ]


def units(items: list[pytest.Item]) -> dict[str, str]:
    """Each test file -> the name of its unit (the unit's first file in collection order): files that
    use the same shared session fixture are one unit (union-find over files and fixtures)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for item in items:
        path = item.nodeid.split("::")[0]
        for name in shared_fixtures(item):
            a, b = root(path), root("fixture:" + name)
            if a != b:
                parent[a] = b
    first: dict[str, str] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        first.setdefault(root(path), path)
    return {item.nodeid.split("::")[0]: first[root(item.nodeid.split("::")[0])] for item in items}


def costs(items: list[pytest.Item], unit_of: dict[str, str]) -> dict[str, float]:
    """The estimated seconds of each unit."""
    known = json.loads(COSTS.read_text()) if COSTS.exists() else {}
    per_test: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        per_test[path] = per_test.get(path, 0) + 1
    total: dict[str, float] = {}
    for path, n in per_test.items():
        total[unit_of[path]] = total.get(unit_of[path], 0.0) + known.get(path, DEFAULT_COST * n)
    return total


def _write_units(items: list[pytest.Item], unit_of: dict[str, str]) -> None:
    """Hand the controller each test's unit (its scheduler sees only node ids): every worker writes the
    same map to the file the controller named, atomically."""
    path = Path(os.environ[UNITS_ENV])
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({item.nodeid: unit_of[item.nodeid.split("::")[0]] for item in items}))
    os.replace(tmp, path)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a worker: put the units in longest-first order (the same on every worker: xdist checks that
    all workers collected the same list) and write which unit each test is in."""
    if not _active(config) or not items:
        return
    unit_of = units(items)
    cost = costs(items, unit_of)
    first_index: dict[str, int] = {}
    for i, item in enumerate(items):
        first_index.setdefault(unit_of[item.nodeid.split("::")[0]], i)

    def key(item: pytest.Item) -> tuple[float, int]:
        unit = unit_of[item.nodeid.split("::")[0]]
        return -cost[unit], first_index[unit]

    items.sort(key=key)  # stable: a unit's tests keep their order
    _write_units(items, unit_of)


def pytest_configure(config: pytest.Config) -> None:
    """On the controller of a `-n N --dist loadgroup` run: name the file the workers write the units
    to (they inherit the environment when they start, after this)."""
    if not hasattr(config, "workerinput") and _controller(config):
        os.environ[UNITS_ENV] = os.path.join(tempfile.mkdtemp(prefix="xdist_plan."), "units.json")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and _controller(config) and UNITS_ENV in os.environ:
        shutil.rmtree(Path(os.environ.pop(UNITS_ENV)).parent, ignore_errors=True)


def _controller(config: pytest.Config) -> bool:
    return bool(config.getoption("numprocesses", None)) and config.getoption("dist", "no") == "loadgroup"


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown (and never called) without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` with the workers' units: xdist's own loadgroup reads `xdist_group` marks into
    the node ids through `item._nodeid`, which pytest 9 no longer uses (every test became its own
    unit, spread over both workers, when measured)."""
    if config.getoption("dist", "no") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        """xdist's LoadScopeScheduling (units in collection order, the next when a worker has two
        tests left) with the units the workers wrote; a test missing from the map is its file's."""

        units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.units is None:
                path = Path(os.environ.get(UNITS_ENV, "/nonexistent"))
                self.units = json.loads(path.read_text()) if path.exists() else {}
            return self.units.get(nodeid, nodeid.split("::")[0])

    # xdist's default sorts the units by their number of tests (--loadscope-reorder): keep ours
    config.option.loadscopereorder = False
    return UnitScheduling(config, log)
