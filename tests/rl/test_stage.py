"""--stage gspo / grpo through pretrain_internvl.py (training/rl/stage.py, inference/rollout.py):
the debug model on 8 digits prompts (a JSONL prompt file, images beside it), 2 prompts x 4 responses
per step, fp32, seed 3, a graded reward (tests/rl/rewards.py) so the groups' advantages are nonzero.
The prompts carry an empty system turn: 39 tokens instead of the template's 145-token default system
prompt's 182, so rows of 64 tokens instead of 256 (the forward and backward passes cost ~4x less).
Runs are jobs of the session's reused worlds (conftest `pretrain` / `pretrain_log`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from internvl_mcore.config import PRESETS, ParallelConfig
from internvl_mcore.config.problems import problems
from internvl_mcore.config.rl import RLConfig, rl_stage_problems
from internvl_mcore.config.training import DataConfig, LogConfig, RunConfig, TrainConfig
from tests.conftest import pretrain

TIMED = ("_s", "per_s", "mfu", "flops", "memory")
"""Record keys that are wall-clock or machine measurements, not results."""


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict:
    """8 held-out digits questions as a prompt JSONL (images relative to it) and the tokenizer."""
    from internvl_mcore.data.digits import build_digits_dataset

    root = tmp_path_factory.mktemp("rl_prompts")
    d = build_digits_dataset(str(root), multi_image=0, text_only=0, max_single=8)
    records = [json.loads(line) for line in Path(d.heldout).read_text().splitlines()][:8]
    path = root / "prompts.jsonl"
    lines = [
        {
            "id": f"d{i}",
            "image": os.path.relpath(r["image"], root),
            "conversations": [{"from": "system", "value": ""}, {"from": "human", "value": r["question"]}],
            "answer": r["answer"],
        }
        for i, r in enumerate(records)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"path": str(path), "tokenizer": d.tokenizer}


def _args(prompts: dict, stage: str, iters: int, *extra: str) -> list[str]:
    return [
        *("--model", "debug", "--stage", stage, "--data-path", prompts["path"]),
        *("--tokenizer-model", prompts["tokenizer"], "--reward-fn", "tests.rl.rewards:digit_share"),
        *("--rollouts-per-prompt", "4", "--global-batch-size", "8", "--micro-batch-size", "2"),
        *("--seq-length", "64", "--max-new-tokens", "8", "--train-iters", str(iters), "--ppo-epochs", "2"),
        *("--kl-coeff", "0.05", "--seed", "3", "--lr", "1e-3", "--device", "cpu"),
        *extra,
    ]


def _results(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k for t in TIMED)}


GSPO_CLIP = ("--clip-eps-low", "0.02", "--clip-eps-high", "0.02")
"""Wide enough that the second --ppo-epochs pass clips some responses (the default 3e-4 / 4e-4 clips
nearly all)."""


@pytest.fixture(scope="module")
def gspo_one(prompts, tmp_path_factory) -> tuple[list[dict], Path]:
    """GSPO on one process, 3 iterations saving at 2: its log records and checkpoint directory."""
    tmp = tmp_path_factory.mktemp("gspo_one")
    log, save = tmp / "a.jsonl", tmp / "ckpt"
    args = _args(prompts, "gspo", 3, *GSPO_CLIP)
    pretrain(1, [*args, "--save", str(save), "--save-interval", "2", "--log-jsonl", str(log)])
    return [json.loads(x) for x in log.read_text().splitlines()], save


def test_gspo_first_step_on_policy_logs_and_exact_resume(prompts, gspo_one, tmp_path) -> None:
    """Run A: 3 iterations saving at 2; run B resumes from iteration 2. Every iteration's first
    --ppo-epochs pass is on-policy (ratio exactly 1, nothing clipped); the reference equals the policy
    at iteration 1 (KL exactly 0); the second pass is off-policy (ratios move, some clipped); B's
    iteration 3 is A's bit for bit (policy, optimizer, prompt position, rollout draws)."""
    a, save = gspo_one
    b_log = tmp_path / "b.jsonl"
    args = _args(prompts, "gspo", 3, *GSPO_CLIP)
    assert [r["iteration"] for r in a] == [1, 2, 3]
    assert a[0]["rl_kl"] == 0.0, a[0]
    for r in a:
        assert r["rl_ratio"] == 1.0 and r["rl_clip_fraction"] == 0.0, r
        assert r["rl_ratio_last"] != 1.0 and r["grad_norm"] > 0 and r["reward_std"] > 0, r
        assert r["rl_response_length"] == 8.0 and r["rl_rollout_tokens_per_s"] > 0 and r["rl_train_s"] > 0, r
        assert 0.0 <= r["reward_accuracy"] <= 1.0 and r["rl_rollout_s"] > 0, r
    assert a[1]["rl_kl"] > 0 and max(r["rl_clip_fraction_last"] for r in a) > 0
    saved = json.loads((save / "iter_0000002" / "run.json").read_text())
    assert saved["rl"] == {"stage": "gspo", "rollout_seed": 3}
    assert json.loads((save / "iter_0000002" / "data_dp00000.json").read_text())["prompts_consumed"] == 4
    out = pretrain(1, [*args, "--load", str(save / "iter_0000002"), "--log-jsonl", str(b_log)])
    assert "resumed from" in out and "at iteration 2" in out
    b = [json.loads(x) for x in b_log.read_text().splitlines()]
    assert [r["iteration"] for r in b] == [3]
    assert _results(b[0]) == _results(a[2])


def test_gspo_tp2_pp2_equals_one_process(prompts, gspo_one, tmp_path) -> None:
    """GSPO (sequence-level ratio, clipping, KL) on TP2 x PP2 (4 ranks: tensor- and pipeline-parallel
    at once, one run for both) samples the one-process run's rollouts (rewards and lengths exactly)
    and its losses, ratios, clip fractions, KL and gradient norms equal the single process' within
    1e-5 over 3 iterations, the clipped second passes included."""
    one, _ = gspo_one
    log = tmp_path / "tp2pp2.jsonl"
    layout = ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    pretrain(4, [*_args(prompts, "gspo", 3, *GSPO_CLIP), *layout, "--log-jsonl", str(log)])
    four = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(four) == len(one) == 3
    for r1, r4 in zip(one, four):
        for k in ("reward_mean", "reward_std", "reward_accuracy", "rl_response_length", "rl_ratio", "rl_clip_fraction"):
            assert r1[k] == r4[k], (k, r1[k], r4[k])
        for k in ("loss", "grad_norm", "rl_ratio_last", "rl_kl", "rl_kl_last", "rl_clip_fraction_last"):
            assert r4[k] == pytest.approx(r1[k], abs=1e-5), (k, r1[k], r4[k])
    assert max(r["rl_clip_fraction_last"] for r in four) > 0 and four[1]["rl_kl"] > 0


@pytest.mark.parametrize(
    "layout",
    [
        ("--tensor-model-parallel-size", "2"),
        ("--tensor-model-parallel-size", "2", "--sequence-parallel"),  # decoding switches SP off and back
        ("--pipeline-model-parallel-size", "2"),
    ],
    ids=["tp2", "tp2-sp", "pp2"],
)
def test_grpo_tp2_and_pp2_equal_one_process(prompts, pretrain_log, layout) -> None:
    """GRPO with KL, 2 iterations: TP2 (with and without sequence parallelism) and PP2 sample the same rollouts as one process (the same
    rewards and lengths, exactly) and their losses, ratios, clip fractions, KL and gradient norms
    equal the single process' within 1e-5."""
    one = pretrain_log(1, _args(prompts, "grpo", 2))
    two = pretrain_log(2, _args(prompts, "grpo", 2, *layout))
    assert len(one) == len(two) == 2
    for r1, r2 in zip(one, two):
        for k in ("reward_mean", "reward_std", "reward_accuracy", "rl_response_length"):
            assert r1[k] == r2[k], (k, r1[k], r2[k])
        for k in ("loss", "grad_norm", "rl_ratio", "rl_ratio_last", "rl_kl", "rl_kl_last", "rl_clip_fraction_last"):
            assert r2[k] == pytest.approx(r1[k], abs=1e-5), (k, r1[k], r2[k])
        assert r1["rl_ratio"] == 1.0 and r1["rl_clip_fraction"] == 0.0
    assert one[1]["rl_kl"] > 0 and one[0]["rl_clip_fraction_last"] > 0


def test_grpo_dp2_runs_on_policy_first(prompts, pretrain_log) -> None:
    """DP2: each rank samples its prompt's group (another draw than one process: the seed includes the
    DP rank, docs/rl.md); the metrics are reduced over both ranks, the first pass is on-policy, the
    gradient and the KL after the first step are nonzero."""
    args = [
        a if a != "tests.rl.rewards:digit_share" else "tests.rl.rewards:letter_share" for a in _args(prompts, "grpo", 2)
    ]
    log = pretrain_log(2, args)
    assert len(log) == 2
    for r in log:
        assert r["rl_ratio"] == 1.0 and r["rl_clip_fraction"] == 0.0, r
        assert r["grad_norm"] > 0 and r["reward_std"] > 0 and r["rl_response_length"] > 0, r
    assert log[0]["rl_kl"] == 0.0 and log[1]["rl_kl"] > 0


def _run(stage: str = "gspo", **changes: dict) -> RunConfig:
    parts = {
        "rl": RLConfig(reward="number", tokenizer_model="tok"),
        "data": DataConfig(data_path=["p.jsonl"]),
        "train": TrainConfig(stage=stage, global_batch_size=16),
        "parallel": ParallelConfig(),
    }
    parts = {k: dataclasses.replace(v, **changes.get(k, {})) for k, v in parts.items()}
    return RunConfig(PRESETS["debug"], log=LogConfig(), **parts)


def test_stage_problems_name_the_flags() -> None:
    """What --stage gspo / grpo cannot run with is refused before anything starts, one line each."""
    assert rl_stage_problems(_run()) == [] and not [p for p in problems(_run("grpo")) if "stage" in p]
    found = rl_stage_problems(_run(rl={"tokenizer_model": None, "grpo_group_size": 3}, data={"mock_data": True}))
    assert any("--tokenizer-model" in p for p in found)
    assert any("one --data-path" in p for p in found)
    assert any("--global-batch-size 16" in p and "--rollouts-per-prompt 3" in p for p in found)
    found = rl_stage_problems(
        _run(
            parallel={"context_parallel_size": 2},
            train={"skip_spike_factor": 3.0, "drop_path_rate": 0.1},
        )
    )
    assert any("--context-parallel-size" in p for p in found) and any("--skip-spike-factor" in p for p in found)
    assert any("--drop-path-rate 0.1" in p for p in found)
    assert any("--balance-dp-compute" in p for p in rl_stage_problems(_run(data={"balance_dp_compute": True})))
    # tools/plan.py's run configs have no data source: only the layout is checked (not the reward, ...)
    assert rl_stage_problems(_run(rl={"reward": None, "tokenizer_model": None}, data={"data_path": []})) == []
    assert rl_stage_problems(_run(parallel={"context_parallel_size": 2}, data={"data_path": []})) != []
    assert rl_stage_problems(_run("2")) == [
        "--rollouts-per-prompt, --reward and the other online-RL flags apply to --stage gspo / grpo only"
    ]


def test_prompt_file_errors_are_one_line(prompts) -> None:
    """A prompt line without an answer stops the CLI before any process group: one line naming the
    file and line, exit 2 (docs/errors.md)."""
    from tests.reliability.cli_helpers import assert_user_error, run

    good = Path(prompts["path"])
    bad = good.parent / "no_answer.jsonl"  # beside the images its records name
    first = good.read_text().splitlines()[0]
    record = json.loads(first)
    del record["answer"]
    bad.write_text(first + "\n" + json.dumps(record) + "\n")
    proc = run("pretrain", *_args({**prompts, "path": str(bad)}, "gspo", 1))
    assert_user_error(proc, f"{bad}:2", "no 'answer' field")


def test_prompt_order_is_global_and_resumable() -> None:
    """Each step's prompts are the same set at every data-parallel size (DP ranks take consecutive
    slices), every epoch visits every prompt once, and the position resumes on another DP size;
    a checkpoint of another prompt set or seed is refused."""
    from internvl_mcore.errors import DataError
    from internvl_mcore.training.rl.prompts import PromptOrder

    records = list(range(10))  # the order only counts and indexes them
    one = PromptOrder(records, 7, 4, 0, 1)
    two = [PromptOrder(records, 7, 4, r, 2) for r in range(2)]
    steps = [one.next_step() for _ in range(5)]
    assert steps == [two[0].next_step() + two[1].next_step() for _ in range(5)]
    assert sorted(sum(steps, [])[:10]) == records and sorted(sum(steps, [])[10:20]) == records
    resumed = PromptOrder(records, 7, 4, 1, 2)
    resumed.load_resharded_state([PromptOrder(records, 7, 4, 0, 1).state_dict() | {"prompts_consumed": 8}])
    assert resumed.next_step() == steps[2][2:]
    with pytest.raises(DataError, match="--seed 8"):
        PromptOrder(records, 8, 4, 0, 1).load_state_dict(one.state_dict())


def test_rollouts_never_sample_image_placeholders(prompts) -> None:
    """A sampled <IMG_CONTEXT> would ask the training forward for an image feature the sequence lacks
    (it once stopped a run): the sampler suppresses the placeholders, greedy or sampled."""
    import torch

    from internvl_mcore.inference.decode import Sampling, choose_tokens
    from internvl_mcore.inference.rollout import RolloutSampler

    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0]]).expand(500, -1)  # token 3 the most likely
    sampled = choose_tokens(logits, Sampling(1.0, 1.0, 3, suppress_ids=(3, 1)), torch.Generator().manual_seed(3))
    assert set(sampled.tolist()) == {0, 2}
    assert choose_tokens(logits[:1], Sampling(suppress_ids=(3,)), None).tolist() == [0]
    cfg = PRESETS["debug"]
    sampler = RolloutSampler(prompts["tokenizer"], cfg)
    assert set(sampler.suppress_ids) == {cfg.img_context_token_id, cfg.img_start_token_id, cfg.img_end_token_id}


def test_prompt_shards_give_the_jsonl_prompts(prompts, tmp_path) -> None:
    """The stage reads a prompt-shard prefix (internvl_mcore.data.prompts) as it reads the JSONL file:
    the same records become the same prompt tokens and tiles."""
    import numpy as np

    from internvl_mcore.data import prompts as shards
    from internvl_mcore.inference.rollout import RolloutSampler
    from internvl_mcore.training.rl.prompts import open_prompts, read_prompt_jsonl

    records = read_prompt_jsonl(prompts["path"])
    shards.write_prompt_shards(records, tmp_path / "p")
    read = open_prompts(str(tmp_path / "p"))
    sampler = RolloutSampler(prompts["tokenizer"], PRESETS["debug"])
    assert len(read) == len(records) == 8
    for a, b in zip(records, read):
        assert (a.id, a.answer) == (b.id, b.answer)
        pa, pb = sampler.prompt(a, "jsonl"), sampler.prompt(b, "shards")
        assert pa.tokens == pb.tokens and np.array_equal(pa.tiles, pb.tiles) and pa.tiles.shape[0] >= 1
