"""tools/gpu_reference.json: the CPU numbers the GPU check compares against. Here the reference checks
of tools/gpu_check.py run with the CPU as their device: they must PASS against the committed numbers
(numbers that drift from what this code computes fail here), and every compared number, perturbed
beyond its tolerance, must make the comparison FAIL. Remake the file with
`python tools/gpu_check.py --write-reference` when a change of the numbers is intended."""

from __future__ import annotations

import copy
import sys

import pytest

from tests.launch import REPO
from tests.worldpool import run_in_world

CHECKS = {"fp32_vs_cpu": "dense", "moe_vs_cpu": "moe", "mpo_vs_cpu": "mpo"}


def _in_world(cmd: list[str], timeout: float, env: dict | None = None) -> None:
    """gpu_check.run for the commands these checks start (`python SCRIPT ...` and `python -m
    torch.distributed.run ... SCRIPT ...`: preprocessing, the seeded checkpoints, the reference runs)
    as jobs of the session's reused worlds: seven interpreters importing torch + megatron-core less.
    The environment (CUDA hidden, TF32 off) only matters on a GPU; the CPU computes the same numbers."""
    assert cmd[0] == sys.executable, cmd
    args, nproc = [str(a) for a in cmd[1:]], 1
    if args[:2] == ["-m", "torch.distributed.run"]:
        nproc = int(args[args.index("--nproc_per_node") + 1])
        args = args[args.index("--master_port") + 2 :]
    run_in_world(REPO / args[0], nproc, args[1:], timeout=timeout)


@pytest.fixture(scope="module")
def cpu_runs(gpu_check, tmp_path_factory):
    """The data made as on a machine without carried data, and the three reference checks on the CPU."""
    work = tmp_path_factory.mktemp("gpu_reference")
    ctx = gpu_check.Ctx(work, work / "data", "cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_check, "run", _in_world)
        return ctx, {name: gpu_check.run_check_here(name, ctx) for name in CHECKS}


def test_committed_reference_numbers_are_what_the_cpu_computes(cpu_runs):
    _, results = cpu_runs
    for name, got in results.items():
        assert len(got) == 1 and got[0].status == "PASS", got[0].line()
        assert got[0].backends == "local specs, SDPA"
    assert "data made here" in results["fp32_vs_cpu"][0].detail  # the first check made it, the others reuse it
    assert "prepared data" in results["mpo_vs_cpu"][0].detail


def test_every_compared_number_can_fail(gpu_check, cpu_runs):
    ctx, _ = cpu_runs
    reference = gpu_check.load_reference()
    for name, kind in CHECKS.items():
        records = gpu_check.read_log(ctx.work / f"{name}.jsonl")
        want = reference[kind]
        assert len(want["loss"]) == len(want["grad_norm"]) == gpu_check.RUNS[kind]["iters"]
        assert gpu_check.judge_reference(name, records, want, gpu_check.FP32_RTOL).ok
        for key in ("loss", "grad_norm"):
            for i in range(len(want[key])):
                for rtol, factor in ((gpu_check.FP32_RTOL, 3.0), (gpu_check.BF16_RTOL, 3.0)):
                    bad = copy.deepcopy(want)
                    bad[key][i] *= 1 + factor * rtol
                    r = gpu_check.judge_reference(name, records, bad, rtol)
                    assert r.status == "FAIL" and f"{key} {i + 1}" in r.detail, (name, key, i, r.line())
        shorter = {k: v for k, v in records.items() if k < len(want["loss"])}
        assert not gpu_check.judge_reference(name, shorter, want, gpu_check.FP32_RTOL).ok  # a step missing


def test_shards_other_than_the_references_fail(gpu_check, cpu_runs, monkeypatch):
    ctx, _ = cpu_runs
    reference = copy.deepcopy(gpu_check.load_reference())
    first = sorted(reference["moe"]["shards"])[0]
    reference["moe"]["shards"][first] = "0" * 64
    monkeypatch.setattr(gpu_check, "load_reference", lambda: reference)
    r = gpu_check.check_vs_cpu(ctx, "moe_vs_cpu", "moe", False)
    assert r.status == "FAIL" and "shards differ" in r.detail
