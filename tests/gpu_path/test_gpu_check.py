"""scripts/gpu_check.sh on a machine without a GPU (CI) or with a python that cannot import torch, and
the check's judging logic (tools/gpu_check.py) on made-up logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import REPO


def _script(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_gpu_check_without_device_exits_0_saying_so(gpu_check):
    proc = _script({"PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU present" in proc.stdout and "PASS" not in proc.stdout
    assert gpu_check.main([]) == 0


def test_gpu_check_with_a_python_without_torch_fails_saying_so(tmp_path):
    """A python whose torch does not import is a broken setup, not 'no GPU': non-zero exit."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")  # no site-packages: no torch
    fake.chmod(0o755)
    assert subprocess.run([str(fake), "-c", "import torch"], capture_output=True).returncode != 0
    proc = _script({"PYTHON": str(fake)})
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "cannot import torch" in proc.stderr and "No module named 'torch'" in proc.stderr
    assert "no CUDA GPU" not in proc.stdout + proc.stderr


def _log(losses, **extra):
    return {
        i + 1: {"iteration": i + 1, "loss": x, "step_time_s": 0.5, "tokens_per_s": 100.0, **extra}
        for i, x in enumerate(losses)
    }


def test_te_train_judge_needs_te_and_a_decreasing_loss(gpu_check, tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _log([5.0 - 0.1 * i for i in range(20)]).values()))
    good = gpu_check.read_log(path)
    assert gpu_check.judge_training(good, 20, "TE, flash-attn").ok
    local = gpu_check.judge_training(good, 20, "local specs, SDPA")  # the run did not use TE: no PASS
    assert local.status == "FAIL" and "not TE" in local.detail
    assert not gpu_check.judge_training(_log([5.0] * 10 + [6.0] * 10), 20, "TE, SDPA").ok  # not decreasing
    assert not gpu_check.judge_training(_log([5.0] * 19 + [float("nan")]), 20, "TE, SDPA").ok
    assert not gpu_check.judge_training(_log([5.0 - 0.1 * i for i in range(19)]), 20, "TE, SDPA").ok
    line = gpu_check.judge_training(good, 20, "TE, flash-attn").line()
    assert line.startswith("PASS te_bf16_train [TE, flash-attn]: loss 5.0000 -> 3.1000")


def test_resume_judge_has_a_tolerance_not_bit_exactness(gpu_check):
    ref = _log([3.0, 2.5, 2.0])
    assert gpu_check.judge_same_losses("resume", ref, _log([3.0, 2.5, 2.0001]), [2, 3], 1e-4).ok
    assert not gpu_check.judge_same_losses("resume", ref, _log([3.0, 2.5, 2.001]), [2, 3], 1e-4).ok
    assert not gpu_check.judge_same_losses("resume", ref, _log([3.0, 2.5, float("nan")]), [2, 3], 1e-4).ok
    assert not gpu_check.judge_same_losses("tp2", ref, _log([3.0]), [2, 3], 1e-3).ok
    a = torch.ones(4)
    assert gpu_check.judge_close("x", a, a + 1e-3, atol=1e-2, rtol=0).ok
    assert not gpu_check.judge_close("x", a, a + 1, atol=1e-2, rtol=0).ok
    assert not gpu_check.judge_close("x", a, torch.ones(5), atol=1e-2, rtol=0).ok


def test_speed_numbers_and_memory_ratio(gpu_check):
    log = _log([1.0] * 8, mfu=0.4, peak_flops_per_rank=800e12, peak_memory_bytes=30 * 2**30)
    s = gpu_check.speed_numbers(log, 989e12, predicted_bytes=20 * 2**30)
    assert s["mfu_measured"] == 0.4 and s["mfu_spec"] == pytest.approx(0.4 * 800 / 989)
    assert s["memory_ratio"] == pytest.approx(1.5)
    text = gpu_check.describe_speed(4096, s)
    assert "4k: 100 tokens/s" in text and "1.50 x planner" in text and "40.0% of measured 800" in text
    with pytest.raises(ValueError):
        gpu_check.speed_numbers(_log([1.0] * 8), 989e12, 1.0)  # no MFU logged


def test_summary_counts_skips_apart_and_fails_on_any_fail(gpu_check):
    p, f, s = (
        gpu_check.verdict("a", True, "x"),
        gpu_check.verdict("b", False, "y"),
        gpu_check.skip("c", "flash-attn not installed", "local specs, SDPA"),
    )
    assert s.line() == "SKIP c (flash-attn not installed) [local specs, SDPA]" and not s.ok
    assert gpu_check.summary([p, s]) == ("gpu_check: 1 passed, 0 failed , 1 skipped ['c']", 0)
    assert gpu_check.summary([p, f, s])[1] == 1
    assert gpu_check.summary([s])[0].startswith("gpu_check: 0 passed")


def test_checks_without_te_flash_or_second_gpu_skip_in_their_own_processes(gpu_check, tmp_path):
    """The runner on the CPU: each check a child process; the TE / flash / 2-GPU checks SKIP with the
    reason and the backends; a check over its time limit FAILs."""
    from internvl_mcore.parallel import attention
    from internvl_mcore.models.specs import have_transformer_engine

    if have_transformer_engine() or attention.flash_attn_varlen_func is not None:
        pytest.skip("transformer-engine or flash-attn installed")
    ctx = gpu_check.Ctx(tmp_path, tmp_path / "data", "cpu")
    got = gpu_check.run_check_child("flash_vs_sdpa", 120, ctx) + gpu_check.run_check_child("parallel", 120, ctx)
    assert [r.line() for r in got] == [
        "SKIP flash_vs_sdpa (flash-attn not installed) [local specs, SDPA]",
        "SKIP tp2 (1 GPU, needs 2)",
        "SKIP cp2 (1 GPU, needs 2)",
    ]
    assert (
        gpu_check.check_te_train(ctx).line() == "SKIP te_bf16_train (transformer-engine not installed) "
        "[local specs, SDPA]"
    )
    late = gpu_check.run_check_child("flash_vs_sdpa", 0.05, ctx)
    assert late[0].line() == "FAIL flash_vs_sdpa [local specs, SDPA]: timed out after its limit of 0.05 s"


def test_gpu_check_device_tiling_on_device_cpu(gpu_check, tmp_path):
    """The device_tiling check's comparison, run with the CPU as the device (small tiles)."""
    r = gpu_check.check_device_tiling(gpu_check.Ctx(tmp_path, tmp_path, "cpu"), image_size=28)
    assert r.ok and "byte-identical to Pillow" in r.detail, r.detail


def test_gpu_check_wheels_and_data_are_git_ignored():
    """What scripts/gpu_wheels.sh writes travels only as carried (ignored) paths, never committed."""
    for path in (".whl/x.whl", ".gpu_data/READY"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert proc.returncode == 0, f"{path} is not git-ignored"
    assert Path(REPO / "scripts" / "gpu_wheels.sh").read_text().count("LIMIT=$((64 * 1024 * 1024))") == 1


def test_speed_runs_parse_and_the_planner_predicts_their_memory(gpu_check):
    """The speed check's flags are valid CLI flags and the planner predicts a plausible peak (no GPU run)."""
    from pretrain_internvl import parse_run_config

    for seq, gbs in gpu_check.SPEED_RUNS:
        flags, predicted = gpu_check.speed_setup(seq, gbs, "cpu", "NVIDIA H100 80GB HBM3")
        run = parse_run_config(flags)
        assert run.model.name == "internvl3-1b" and run.data.mock_data and run.data.mock_tiles_per_sample >= 4
        assert 4 * 2**30 < predicted < 78 * 2**30, predicted / 2**30  # fits one H100, above the weights' size


def test_a_check_that_could_outrun_the_budget_is_skipped_not_started(gpu_check, tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--only", "parallel", "--budget", "5", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "SKIP tp2 (5 s left of the 5 s budget, its limit is 120 s)" in out
    assert "0 passed, 0 failed , 2 skipped" in out
