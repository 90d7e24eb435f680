"""The interleaved (virtual) pipeline schedule computes the single-process loss and gradients
(megatron-core's own schedule over the model chunks; fp32, gloo): the ViT and projector live in the
first chunk of the first rank, the loss in the last chunk of the last rank, and each chunk holds the
decoder layers of its virtual stage."""

import json

import pytest

from tests.launch import REPO
from tests.worldpool import run_in_world

WORKER = REPO / "tests" / "parallel" / "grid_worker.py"
TOL = 1e-5

LAYOUTS = [  # (model, tp, pp, vpp, world): test_layout_parity.py's widest PP case with 2 chunks per rank (the
    # debug model at PP2 x 2 chunks: tests/parallel/test_vpp_training.py, through pretrain_internvl.py)
    ("debug-6b", 2, 2, 2, 4),  # tied embeddings between rank 0's chunk 0 and rank 1's chunk 1, padded heads
]


@pytest.mark.parametrize(
    "model,tp,pp,vpp,world", LAYOUTS, ids=[f"{m}-tp{t}-pp{p}-vpp{v}-w{w}" for m, t, p, v, w in LAYOUTS]
)
def test_interleaved_matches_single_process(grid_ref, tmp_path, model, tp, pp, vpp, world):
    (tmp_path / "ref.pt").symlink_to(grid_ref(model) / "ref.pt")
    args = ["--model", model, "--tp", str(tp), "--pp", str(pp), "--vpp", str(vpp), "--out", str(tmp_path)]
    run_in_world(WORKER, world, args, timeout=240)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r in reports:
        assert r["params_checked"] > 0 and r["chunks"] == vpp, r
        assert r["max_rel_grad_err"] < TOL, r
        if r["loss"] is not None:
            assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), r
        pp_rank = r["pp_rank"]
        # 4 decoder layers, 1 per chunk: chunk c of rank p holds virtual stage c * PP + p (layer numbers from 1)
        assert r["layers"] == [c * pp + pp_rank + 1 for c in range(vpp)], r
        assert r["vision_chunks"] == ([0] if pp_rank == 0 else []), r
        assert r["loss_chunks"] == ([vpp - 1] if pp_rank == pp - 1 else []), r
        # image tensors reach the ViT's chunk only, once per microbatch; every chunk runs every microbatch
        assert r["forwards"] == 4 * vpp and r["with_pixels"] == r["first_chunk_forwards"], r
        assert r["with_pixels"] == (4 if pp_rank == 0 else 0), r
    assert any(r["loss"] is not None for r in reports)


def test_virtual_stage_flags():
    """Megatron-LM's two spellings give the chunk count; what cannot split into equal chunks is refused
    with a line naming the flag (config/problems.py)."""
    from internvl_mcore.config.model import ParallelConfig, virtual_pipeline_size
    from internvl_mcore.config.problems import virtual_pipeline_problems

    def par(**kw):
        return ParallelConfig(pipeline_model_parallel_size=kw.pop("pp", 2), **kw)

    assert virtual_pipeline_size(par(num_virtual_stages_per_pipeline_rank=3), 24) == 3
    assert virtual_pipeline_size(par(num_layers_per_virtual_pipeline_stage=3), 24) == 4  # 24 / 2 / 3
    assert virtual_pipeline_size(par(num_virtual_stages_per_pipeline_rank=1), 24) is None  # one chunk: 1F1B
    assert virtual_pipeline_size(par(), 24) is None
    assert virtual_pipeline_problems(24, par(num_virtual_stages_per_pipeline_rank=3)) == []
    assert (
        virtual_pipeline_problems(
            24, par(pp=4, num_virtual_stages_per_pipeline_rank=2, decoder_first_pipeline_num_layers=6)
        )
        == []
    )  # 6 on stage 0 (3 per chunk), 18 over 3 stages x 2 chunks
    (line,) = virtual_pipeline_problems(
        24, par(pp=4, num_virtual_stages_per_pipeline_rank=2, decoder_first_pipeline_num_layers=4)
    )
    assert "20 decoder layers do not split evenly into 3 pipeline stages x 2" in line, line
    assert (
        "needs --pipeline-model-parallel-size > 1"
        in virtual_pipeline_problems(24, par(pp=1, num_virtual_stages_per_pipeline_rank=2))[0]
    )
    assert (
        "give one of"
        in virtual_pipeline_problems(
            24, par(num_virtual_stages_per_pipeline_rank=2, num_layers_per_virtual_pipeline_stage=2)
        )[0]
    )
    assert (
        "--decoder-first-pipeline-num-layers 3 is not divisible"
        in virtual_pipeline_problems(
            24, par(pp=3, num_virtual_stages_per_pipeline_rank=2, decoder_first_pipeline_num_layers=3)
        )[0]
    )
    assert "--stage mpo" in virtual_pipeline_problems(24, par(num_virtual_stages_per_pipeline_rank=2), "mpo")[0]
    assert "--stage gspo" in virtual_pipeline_problems(24, par(num_virtual_stages_per_pipeline_rank=2), "gspo")[0]


def test_planner_bubble_divides_by_virtual_stages():
    """The planner's pipeline time and bubble with V model chunks per rank: (m + (p - 1) / V) stage
    times, the bubble from megatron-core's interleaved schedule replayed, V PP sends per stage."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.plan.layouts import HARDWARE, Layout, Workload, plan
    from internvl_mcore.plan.stages import pipeline_bubble

    model, work = get_preset("internvl3-1b"), Workload(seq_length=4096, global_batch_size=8)
    plans = {
        v: plan(model, Layout(1, 4, 1, 1, False, False, False, virtual_stages=v), work, HARDWARE["h100"])
        for v in (1, 2)
    }
    m = plans[1].breakdown["microbatches"]
    # the bubble: megatron-core's schedule replayed on the chunk times (equal chunks: (p - 1) / (V m + p - 1),
    # tests/plan/test_split.py); the ViT's stage 0 is heavier, so both lie above it, V = 2's below V = 1's
    bubbles = {v: plans[v].breakdown["bubble"] for v in (1, 2)}
    assert m == 8 and bubbles[1] > 3 / 11 and bubbles[2] > 3 / 19 and bubbles[2] < bubbles[1]
    assert bubbles[2] == pipeline_bubble(plans[2].breakdown["chunk_times_s"], m)
    slowest = {v: max(plans[v].breakdown["stage_times_s"]) for v in (1, 2)}
    assert plans[1].breakdown["pipeline_s"] == pytest.approx((8 + 3) * slowest[1])
    assert plans[2].breakdown["pipeline_s"] == pytest.approx((8 + 1.5) * slowest[2])
    # the same stages, each chunk sending its activations: one more PP send per stage and microbatch
    assert slowest[2] - slowest[1] == pytest.approx(plans[1].breakdown["costs"].send) and slowest[1] > 0
    assert plans[2].layout.parallel().num_virtual_stages_per_pipeline_rank == 2
    assert "VPP2" in plans[2].layout.describe()
