"""bench/pipeline.py's PP part at a tiny size, and --log-straggler's per-rank split of the step.

One training run (PP2 with 2 virtual stages, 2 microbatches, the debug model, as a job of the
session's 2-rank world: the launch is not the subject) checks both: the bench's PP part prints every
figure it promises, and the training log's split (data, compute, pipeline wait, gradient wait,
other) of every rank adds up to that rank's step with no part negative. No timings are asserted
beyond that (the machine is shared).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

from internvl_mcore.config.model import ParallelConfig
from tests.conftest import pretrain

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import pipeline  # noqa: E402  (bench/pipeline.py)

PARTS = ("data", "compute", "pipeline wait", "gradient wait", "other")


# the planner's per-chunk placement needs pretrain_internvl.py's --pipeline-model-parallel-layout
LAYOUT_FLAG = "pipeline_model_parallel_layout" in {f.name for f in dataclasses.fields(ParallelConfig)}


def _pooled_run(virtual: int, microbatches: int, args, out_dir: str, chunks=None) -> list[dict]:
    log = os.path.join(out_dir, f"v{virtual}_m{microbatches}.jsonl")
    pretrain(2, pipeline.pp_args(virtual, microbatches, args, log, chunks))
    return pipeline.straggler_records(log)


def test_pp_part_runs_and_the_straggler_split_sums_to_the_step(tmp_path: Path, capsys) -> None:
    args = pipeline.parser().parse_args(
        ["--pp-model", "debug", "--pp-seq-length", "128", "--pp-steps", "3", "--pp-microbatches", "2"]
        + ["--pp-split", "planner" if LAYOUT_FLAG else "even"]
    )
    args.pp_virtual = [2]
    run = pipeline.pp_part(args, str(tmp_path), train=_pooled_run)["v2_m2"]
    out = capsys.readouterr().out
    line = re.search(
        r"VPP2 m=2: planner bubble ([\d.]+)% \| measured idle rank 0 ([\d.]+)%, rank 1 ([\d.]+)%, mean ([\d.]+)% "
        r"\(([+-]\d+)% vs planner\) \| simulated: measured stages ([\d.]+)%, FLOPs ([\d.]+)% \| compute per "
        r"microbatch ([\d.]+) / ([\d.]+) s \(CPU ([\d.]+) / ([\d.]+)\) \| step ([\d.]+) s",
        out,
    )
    assert line is not None, out
    # the planner's bubble: megatron-core's schedule replayed on its chunk times, above (PP-1)/(V m + PP-1) for PP2
    # V2 m2 (the ViT and output layer make the end chunks heavier)
    layers = pipeline.pp_chunks(2, args)
    assert float(line.group(1)) == round(100 * pipeline.planner_bubble(layers, 2, args), 1) > 100 * 1 / 5
    split = r"--pipeline-model-parallel-layout E[t|]*L" if LAYOUT_FLAG else "--num-virtual-stages-per-pipeline-rank 2"
    assert re.search(
        rf"VPP2: split {split}; FLOP share of each rank's chunks \(planner's count\): \d+\+\d+ / \d+\+\d+ %", out
    ), out
    assert re.search(r"goals at m=2: VPP2 idle within 20% of the planner's: (True|False); below VPP1's: n/a", out), out
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
    json.dumps(run)  # what --json writes


@pytest.mark.parametrize("virtual", [1, 2])
@pytest.mark.parametrize("microbatches", [2, 4, 8])
def test_schedule_simulation_with_equal_chunks_is_the_planners_bubble(virtual: int, microbatches: int) -> None:
    """megatron-core's (interleaved) 1F1B order with equal chunks idles (PP - 1) / (V m + PP - 1) on
    every rank, the planner's figure; a heavier last chunk (the output layer) makes the ranks idle more on average."""
    equal = [[1.0 / virtual] * virtual for _ in range(2)]
    bubble = 1 / (virtual * microbatches + 1)
    assert pipeline.simulate_schedule(equal, microbatches) == pytest.approx([bubble, bubble], rel=1e-9)
    heavy_last = [row[:] for row in equal]
    heavy_last[1][-1] *= 2
    idle = pipeline.simulate_schedule(heavy_last, microbatches)
    assert sum(idle) / 2 > bubble, idle


def test_planner_split_simulates_below_vpp1_offline(capsys) -> None:
    """--part pp-sim (no runs): debug-m's planner layout at VPP2 idles less than the planner's VPP1
    split at 2, 4 and 8 microbatches, in the planner's bubble and in the schedule simulated on the
    chunks' FLOPs, and the two agree within 20%; the even VPP2 split does not beat VPP1 (the old bench)."""
    args = pipeline.parser().parse_args(["--part", "pp-sim"])
    sim = pipeline.pp_simulated(args)
    even = pipeline.pp_simulated(pipeline.parser().parse_args(["--part", "pp-sim", "--pp-split", "even"]))
    out = capsys.readouterr().out
    assert "VPP2: split --pipeline-model-parallel-layout Et|tttt|ttt|L;" in out, out
    for m in (2, 4, 8):
        one, two = sim[f"v1_m{m}"], sim[f"v2_m{m}"]
        assert two["planner_bubble"] < one["planner_bubble"] and two["simulated_flops"] < one["simulated_flops"], m
        assert abs(two["simulated_flops"] / two["planner_bubble"] - 1) <= 0.2
        assert even[f"v2_m{m}"]["simulated_flops"] >= even[f"v1_m{m}"]["simulated_flops"], m
