"""Every parallel layout computes the single-process loss and gradients (fp32, gloo, world <= 4)."""

import json

import pytest

from tests.launch import REPO
from tests.worldpool import run_in_world

WORKER = REPO / "tests" / "parallel" / "grid_worker.py"
TOL = 1e-5

LAYOUTS = [  # (model, tp, pp, extra flags, world)
    ("debug", 2, 1, [], 2),
    ("debug", 1, 2, [], 2),
    ("debug", 2, 2, [], 4),
    ("debug", 2, 1, ["--sp"], 2),
    ("debug", 1, 1, [], 2),  # DP2: gradients all-reduced over data-parallel ranks
    ("debug-6b", 2, 2, [], 4),  # QK-norm over padded heads (3 -> 4), tied embeddings across stages
    # per-head LLM QK-norm (gradient summed over TP once, also under SP) next to the ViT's full-width one
    ("debug-qwen3", 2, 1, ["--sp"], 2),
]


@pytest.mark.parametrize(
    "model,tp,pp,extra,world", LAYOUTS, ids=[f"{m}-tp{t}-pp{p}{''.join(e)}-w{w}" for m, t, p, e, w in LAYOUTS]
)
def test_layout_matches_single_process(grid_ref, tmp_path, model, tp, pp, extra, world):
    out = tmp_path
    (out / "ref.pt").symlink_to(grid_ref(model) / "ref.pt")
    run_in_world(
        WORKER, world, ["--model", model, "--tp", str(tp), "--pp", str(pp), *extra, "--out", str(out)], timeout=240
    )
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["params_checked"] > 0 for r in reports)
    for r in reports:
        assert r["max_rel_grad_err"] < TOL, r
        if r["loss"] is not None:
            assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), r
    assert any(r["loss"] is not None for r in reports)
    for r in reports:  # image tensors go to the first pipeline stage only (no tile bytes copied to the others)
        assert r["forwards"] > 0 and r["with_pixels"] == (r["forwards"] if r["first_stage"] else 0), r
