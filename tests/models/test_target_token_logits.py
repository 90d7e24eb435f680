"""The output layer and loss computed only at the tokens that carry loss (the default) train exactly
like megatron-core's all-token logits (--all-token-logits), up to fp32 reordering: TP2 + sequence
parallelism (also with --cross-entropy-chunk-size), PP2, CP2, and MPO at TP2."""

import json

import pytest

from tests.launch import REPO
from tests.worldpool import run_in_world

WORKER = REPO / "tests" / "models" / "target_logits_worker.py"
SEQ, MICROBATCHES = 128, 2  # the mock layouts: 2 sequences of 128 tokens per iteration


@pytest.fixture(scope="module")
def result(preference_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("target_logits") / "out.json"
    run_in_world(WORKER, 2, [str(out), preference_shards], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["tp2_sp", "tp2_sp_chunked", "pp2", "cp2", "mpo_tp2"])
def test_same_training_as_all_token_logits(result, layout):
    full, targeted = result[layout]
    assert len(full["records"]) == len(targeted["records"]) == 2
    keys = ("loss", "grad_norm") + (("reward_margin", "loss_generation") if layout == "mpo_tp2" else ())
    for a, b in zip(full["records"], targeted["records"]):
        for key in keys:
            assert abs(a[key] - b[key]) <= 1e-5 * max(abs(a[key]), 1e-3), (layout, key, a[key], b[key])


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2", "cp2", "mpo_tp2"])
def test_logits_only_for_loss_tokens(result, layout):
    full, targeted = result[layout]
    assert full["logit_rows"] and len(full["logit_rows"]) == len(targeted["logit_rows"])
    # every forward computed fewer logit rows (image tokens and prompts carry no loss), none empty
    assert all(0 < t < f for f, t in zip(full["logit_rows"], targeted["logit_rows"])), (
        layout,
        full["logit_rows"],
        targeted["logit_rows"],
    )
    if layout in ("tp2_sp", "pp2"):  # whole sequences on the last stage: all 128 tokens of each
        assert set(full["logit_rows"]) == {SEQ}


def test_flop_count_follows_the_logits(result):
    full, targeted = result["tp2_sp"]
    # the training log's MFU counts the output layer only over the tokens it computed logits for
    # (mfu x step time = the step's FLOPs per rank / peak, with the same --peak-flops)
    flops = [[r["mfu"] * r["step_time_s"] for r in run["records"]] for run in (full, targeted)]
    assert all(t < f for f, t in zip(*flops)), flops
