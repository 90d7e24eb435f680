"""--stage mpo (training/mpo.py): InternVL's formulas, ln 2 at step 1, layouts = single process, resume, LoRA."""

import json
import math

import pytest
import torch

from tests.launch import REPO
from tests.worldpool import run_in_world

WORKER = REPO / "tests" / "training" / "mpo_worker.py"
KEYS = ("loss", "loss_preference", "loss_quality", "loss_generation", "reward_margin", "reward_accuracy")
ITERS = 3  # mpo_worker.py ITERS
LN2_F32 = float(torch.tensor(math.log(2.0), dtype=torch.float32))


@pytest.fixture(scope="module")
def single(preference_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("mpo1") / "single.json"
    run_in_world(WORKER, 1, [str(out), preference_shards, str(out.parent / "ckpt")], timeout=300)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def layouts(preference_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("mpo4") / "layouts.json"
    run_in_world(WORKER, 4, [str(out), preference_shards, str(out.parent / "ckpt")], timeout=480)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def thd(preference_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("mpo2") / "thd.json"
    run_in_world(WORKER, 2, [str(out), preference_shards, str(out.parent / "ckpt")], timeout=300)
    return json.loads(out.read_text())


def _close(a: dict, b: dict, where: str, rel: float = 1e-5) -> None:
    """Losses to 1e-5 relative; rewards (beta x log-ratios, 0 at step 1) to 1e-5 absolute."""
    for k in KEYS[:4]:
        assert abs(a[k] - b[k]) <= rel * abs(b[k]), f"{where} {k}: {a[k]} vs single-process {b[k]}"
    for k in ("rewards_chosen", "rewards_rejected", "reward_margin"):
        assert abs(a[k] - b[k]) <= 1e-5, f"{where} {k}: {a[k]} vs single-process {b[k]}"


def test_policy_equals_reference_at_step_1(single):
    first = single["single"][0]
    assert first["loss_preference"] == LN2_F32  # -log sigmoid(0), bit-exact: the same model twice
    assert first["reward_margin"] == 0.0 and first["rewards_chosen"] == 0.0
    assert first["loss_quality"] == pytest.approx(2 * math.log(2), abs=1e-6)  # delta = 0 as well
    later = single["single"][-1]
    assert later["loss_preference"] != first["loss_preference"]  # the policy moved away from the reference
    assert later["loss"] < first["loss"]


def test_components_match_internvl_formulas(single):
    f = single["formula"]
    assert f["pairs"] >= 2 and f["count"] == f["pairs"] == f["logged_n"]
    assert f["delta_ours"] == pytest.approx(f["delta_plain"], abs=1e-6)
    for k, plain in f["plain"].items():
        ours = f["ours"][k]
        assert len(ours) == len(plain) == f["pairs"]
        for i, (a, b) in enumerate(zip(ours, plain)):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), f"pair {i} {k}: ours {a}, InternVL formula {b}"
    assert max(abs(x) for x in f["plain"]["loss_preference"]) != LN2_F32  # policy != reference here
    assert f["sum_ours"] == pytest.approx(sum(f["plain"]["loss"]), rel=1e-6)


@pytest.mark.parametrize("name", ["tp2-sp-distopt", "pp2", "cp2"])
def test_layouts_match_single_process(single, layouts, name):
    runs = layouts[name]
    # the reference runs the policy's kernels (megatron-core's frozen-weight linear would round differently)
    assert runs[0]["loss_preference"] == LN2_F32 and runs[0]["reward_margin"] == 0.0
    assert len(runs) == len(single["single"]) == ITERS
    for i, (a, b) in enumerate(zip(runs, single["single"])):
        _close(a, b, f"{name} (x DP2) iteration {i + 1}")


def test_cp2_per_sample_thd_split_matches_single_process(single, thd):
    """MPO's per-segment sums under TE's per-sample split: every sample padded to a multiple of 2C and
    cut per sample (cu_seqlens), not per row; the split is built once per microbatch in the forward step."""
    runs = thd["cp2-thd"]
    assert thd["thd_builds"] == 2 * 2 * len(runs)  # 2 microbatches (GBS 4 / MBS 2) x (reference, policy) per step
    assert runs[0]["loss_preference"] == LN2_F32 and runs[0]["reward_margin"] == 0.0
    assert len(runs) == len(single["single"]) == ITERS
    for i, (a, b) in enumerate(zip(runs, single["single"])):
        _close(a, b, f"cp2 --cp-split thd iteration {i + 1}")


def test_resume_is_exact(layouts):
    first, rest, full = layouts["resume-first"], layouts["resume-rest"], layouts["pretrained"]
    assert [r["iteration"] for r in first + rest] == [1, 2, 3, 4]
    # --pretrained: the reference is those weights too (ln 2 again), not the seeded init
    assert full[0]["loss_preference"] == LN2_F32 and full[0]["loss"] < layouts["pp2"][0]["loss"]
    for a, b in zip(first + rest, full):  # reference weights and BCO running mean come back on --load
        for k in KEYS + ("rewards_chosen", "rewards_rejected"):
            assert a[k] == b[k], f"iteration {a['iteration']} {k}: resumed {a[k]} vs uninterrupted {b[k]}"


def test_lora_reference_is_the_base_model(layouts):
    runs = layouts["lora-tp2"]
    assert runs[0]["loss_preference"] == LN2_F32 and runs[0]["reward_margin"] == 0.0  # adapters start at B = 0
    assert runs[-1]["loss_preference"] != LN2_F32 and runs[-1]["loss"] < runs[0]["loss"]
