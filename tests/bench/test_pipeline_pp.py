"""bench/pipeline.py's PP part at a tiny size, and --log-straggler's per-rank split of the step.

One run (PP2 with 2 virtual stages, 2 microbatches, the debug model) checks both: the bench prints
every figure it promises and the training log's split (data, compute, pipeline wait, gradient wait,
other) of every rank adds up to that rank's step with no part negative. No timings are asserted
beyond that (the machine is shared).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ("data", "compute", "pipeline wait", "gradient wait", "other")


def test_pp_part_runs_and_the_straggler_split_sums_to_the_step(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    cmd = [sys.executable, "bench/pipeline.py", "--part", "pp", "--json", str(out), "--pp-model", "debug"]
    cmd += ["--pp-seq-length", "128", "--pp-steps", "3", "--pp-microbatches", "2", "--pp-virtual", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = re.search(
        r"VPP2 m=2: planner bubble ([\d.]+)% \| measured idle rank 0 ([\d.]+)%, rank 1 ([\d.]+)%, mean ([\d.]+)% "
        r"\(([+-]\d+)% vs planner\) \| planner's model with the measured stage compute (-?[\d.]+)%",
        proc.stdout,
    )
    assert line is not None, proc.stdout
    assert float(line.group(1)) == round(100 * 1 / 5, 1)  # the planner's (PP-1)/(V m + PP-1) for PP2 V2 m2
    assert re.search(
        r"goals at m=2: VPP2 idle within 20% of the planner's: (True|False); below VPP1's: n/a", proc.stdout
    )
    run = json.loads(out.read_text())["pp"]["v2_m2"]
    assert len(run["records"]) == 3
    for record in run["records"]:
        times = record["straggler"]
        assert len(times["step"]) == 2
        for rank in range(2):
            parts = {name: times[name][rank] for name in PARTS}
            assert all(v >= 0 for v in parts.values()), (rank, parts)  # no timed region counted twice
            assert math.isclose(sum(parts.values()), times["step"][rank], rel_tol=1e-9), (rank, parts, times["step"])
            assert times["compute"][rank] > 0 and times["pipeline wait"][rank] > 0  # a pipeline waits somewhere
    assert all(0 < x < 1 for x in run["idle"])
