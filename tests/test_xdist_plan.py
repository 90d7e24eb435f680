"""tests/xdist_plan.py: how `pytest -n 2 --dist loadgroup` groups and orders the suite (no workers started:
the units and their costs from stand-in test items), and that plain pytest leaves it inert."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests import xdist_plan


def _item(nodeid: str, fixtures: dict[str, tuple[str, str]]) -> SimpleNamespace:
    """A stand-in test item: `fixtures` maps a fixture name to (scope, baseid of its definition)."""
    defs = {name: [SimpleNamespace(scope=scope, baseid=base)] for name, (scope, base) in fixtures.items()}
    return SimpleNamespace(
        nodeid=nodeid, fixturenames=list(fixtures), _fixtureinfo=SimpleNamespace(name2fixturedefs=defs)
    )


SHARDS = ("session", "tests")  # a session fixture of tests/conftest.py


def test_files_sharing_a_session_fixture_are_one_unit_and_others_their_own(tmp_path, monkeypatch):
    items = [
        _item("tests/a/test_x.py::t1", {"digits_shards": SHARDS, "tmp_path_factory": ("session", "")}),
        _item("tests/a/test_x.py::t2", {}),  # the file's other tests go with it
        _item("tests/b/test_y.py::t1", {"pretrain_log": SHARDS, "tmp_path_factory": ("session", "")}),
        _item("tests/c/test_z.py::t1", {"digits_shards": SHARDS, "world": ("module", "tests")}),
        _item("tests/d/test_w.py::t1", {"pretrain_log": SHARDS}),
    ]
    unit_of = xdist_plan.units(items)
    # pytest's own session fixtures and the cache object pretrain_log join nothing
    assert unit_of == {
        "tests/a/test_x.py": "tests/a/test_x.py",
        "tests/c/test_z.py": "tests/a/test_x.py",
        "tests/b/test_y.py": "tests/b/test_y.py",
        "tests/d/test_w.py": "tests/d/test_w.py",
    }
    table = tmp_path / "costs.json"
    table.write_text(json.dumps({"tests/a/test_x.py": 10.0, "tests/c/test_z.py": 5.0, "tests/b/test_y.py": 20.0}))
    monkeypatch.setattr(xdist_plan, "COSTS", table)
    cost = xdist_plan.costs(items, unit_of)
    assert cost == {"tests/a/test_x.py": 15.0, "tests/b/test_y.py": 20.0, "tests/d/test_w.py": xdist_plan.DEFAULT_COST}


def test_workers_order_units_longest_first_and_write_them(tmp_path, monkeypatch):
    items = [
        _item("tests/a/test_x.py::t1", {"digits_shards": SHARDS}),
        _item("tests/b/test_y.py::t1", {}),
        _item("tests/a/test_x.py::t2", {}),
        _item("tests/c/test_z.py::t1", {"digits_shards": SHARDS}),
    ]
    table = tmp_path / "costs.json"
    table.write_text(json.dumps({"tests/a/test_x.py": 1.0, "tests/b/test_y.py": 30.0, "tests/c/test_z.py": 2.0}))
    monkeypatch.setattr(xdist_plan, "COSTS", table)
    monkeypatch.setenv(xdist_plan.UNITS_ENV, str(tmp_path / "units.json"))
    worker = SimpleNamespace(workerinput={}, option=SimpleNamespace(loadgroup=True))
    xdist_plan.pytest_collection_modifyitems(worker, items)
    assert [i.nodeid for i in items] == [
        "tests/b/test_y.py::t1",
        "tests/a/test_x.py::t1",  # a unit keeps its tests' order
        "tests/a/test_x.py::t2",
        "tests/c/test_z.py::t1",
    ]
    units = json.loads((tmp_path / "units.json").read_text())
    assert units["tests/c/test_z.py::t1"] == units["tests/a/test_x.py::t2"] == "tests/a/test_x.py"


def test_plain_pytest_leaves_the_order_alone():
    items = [_item("tests/b/test_y.py::t1", {}), _item("tests/a/test_x.py::t1", {"digits_shards": SHARDS})]
    order = list(items)
    plain = SimpleNamespace(option=SimpleNamespace())  # no workerinput: not an xdist worker
    xdist_plan.pytest_collection_modifyitems(plain, items)
    assert items == order
    assert not xdist_plan._active(SimpleNamespace(option=SimpleNamespace(loadgroup=True)))  # not a worker
    assert not xdist_plan._active(SimpleNamespace(workerinput={}, option=SimpleNamespace(loadgroup=False)))


@pytest.mark.parametrize("dist", ["load", "loadfile", "no"])
def test_other_dist_modes_get_xdists_own_scheduler(dist):
    config = SimpleNamespace(getoption=lambda name, default=None: dist if name == "dist" else default)
    assert xdist_plan.pytest_xdist_make_scheduler(config, None) is None
