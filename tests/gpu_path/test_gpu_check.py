"""scripts/gpu_check.sh on a machine without a GPU (CI), and the check's judging logic."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.launch import REPO


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_gpu_check_without_device_exits_0_saying_so(gpu_check):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU present" in proc.stdout and "PASS" not in proc.stdout
    assert gpu_check.main([]) == 0


def _log(losses, **extra):
    return {i + 1: {"iteration": i + 1, "loss": x, "step_time_s": 0.5, "tokens_per_s": 100.0, **extra}
            for i, x in enumerate(losses)}


def test_gpu_check_judges_training(gpu_check, tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _log([5.0 - 0.1 * i for i in range(20)]).values()))
    assert gpu_check.judge_training(gpu_check.read_log(path)).ok
    assert not gpu_check.judge_training(_log([5.0] * 10 + [6.0] * 10)).ok  # not decreasing
    assert not gpu_check.judge_training(_log([5.0] * 19 + [float("nan")])).ok
    assert not gpu_check.judge_training(_log([5.0 - 0.1 * i for i in range(19)])).ok  # a step missing
    line = gpu_check.judge_training(_log([5.0 - 0.1 * i for i in range(20)])).line()
    assert line.startswith("PASS te_bf16_train: loss 5.0000 -> 3.1000")


def test_gpu_check_judges_resume_speed_and_tensors(gpu_check):
    ref = _log([3.0, 2.5, 2.0])
    assert gpu_check.judge_same_losses("resume", ref, _log([3.0, 2.5, 2.0]), [2, 3], 0.0).detail.endswith("bit-identical")
    assert not gpu_check.judge_same_losses("resume", ref, _log([3.0, 2.5, 2.0001]), [2, 3], 0.0).ok
    assert gpu_check.judge_same_losses("tp2", ref, _log([3.0, 2.5, 2.0001]), [2, 3], 1e-3).ok
    assert not gpu_check.judge_same_losses("tp2", ref, _log([3.0]), [2, 3], 1e-3).ok
    fast = gpu_check.judge_speed(_log([1.0] * 8, mfu=0.4, peak_flops_per_rank=900e12))
    assert fast.ok and "MFU 40.0%" in fast.detail
    assert not gpu_check.judge_speed(_log([1.0] * 8)).ok  # no MFU logged
    a = torch.ones(4)
    assert gpu_check.judge_close("x", a, a + 1e-3, atol=1e-2, rtol=0).ok
    assert not gpu_check.judge_close("x", a, a + 1, atol=1e-2, rtol=0).ok


def test_gpu_check_flash_check_without_flash_attn_on_device_cpu(gpu_check):
    from internvl_mcore.models import attention

    if attention.flash_attn_varlen_func is not None:
        pytest.skip("flash-attn installed")
    r = gpu_check.check_flash_vs_sdpa(device="cpu")
    assert not r.ok and "flash-attn is not importable" in r.detail


def test_gpu_check_device_tiling_on_device_cpu(gpu_check):
    """The device_tiling check's comparison, run with the CPU as the device (small tiles)."""
    r = gpu_check.check_device_tiling(device="cpu", image_size=28)
    assert r.ok and "byte-identical to Pillow" in r.detail, r.detail


def test_gpu_check_cpu_reference_round_trip_on_device_cpu(gpu_check, tmp_path):
    """The CPU half of the cpu_ckpt_into_te check, and the load/compare half run on the CPU."""
    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.parallel.state import init_distributed
    from internvl_mcore.training.checkpoint import load_weights

    # gpu_check.run: the child gets its own torch.distributed port, not this pytest world's
    gpu_check.run([sys.executable, "tools/gpu_check.py", "--write-cpu-reference", str(tmp_path)], timeout=300,
                  env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    init_distributed(ParallelConfig(), seed=0)
    cfg = get_preset("debug")
    model = build_model(cfg, ParallelConfig(), process_groups()).eval()
    load_weights(tmp_path / "ckpt", model, cfg)
    ids, pos, pixels, cu = gpu_check._probe(cfg)
    with torch.no_grad():
        got = model(ids, pos, pixels, cu_seqlens=cu)
    assert gpu_check.judge_close("cpu_ckpt", got, torch.load(tmp_path / "logits.pt"), atol=0, rtol=0).ok
