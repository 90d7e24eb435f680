"""tests/parallel: fixtures the layout grids share."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.launch import REPO
from tests.worldpool import run_in_world

GRID_WORKER = REPO / "tests" / "parallel" / "grid_worker.py"


@pytest.fixture(scope="session")
def grid_ref(tmp_path_factory) -> Callable[[str], Path]:
    """`grid_ref(model)`: the directory of grid_worker.py's single-process reference (`ref.pt`) for a
    model, run once per session whichever grid asks first (test_layout_parity, test_vpp)."""
    dirs: dict[str, Path] = {}

    def ref(model: str) -> Path:
        if model not in dirs:
            d = tmp_path_factory.mktemp(model)
            run_in_world(GRID_WORKER, 1, ["--model", model, "--ref", "--out", str(d)], timeout=240)
            dirs[model] = d
        return dirs[model]

    return ref
