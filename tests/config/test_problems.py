"""config/problems.py: one pass over the parsed run config lists every problem, each naming its flag."""

import dataclasses

import pytest

import pretrain_internvl
from internvl_mcore.config.problems import check, problems
from internvl_mcore.errors import ConfigError, UserError


def test_one_bad_config_lists_all_its_problems():
    """Problems from the layout, the schedule, the stage, MoE, LoRA, validation and the model's ids
    of one config come back together (not the first one only), each line naming its flag."""
    run = pretrain_internvl.parse_run_config(
        [
            "--mock-data",
            "--model",
            "debug",
            "--sequence-parallel",
            "--context-parallel-size",
            "2",
            "--seq-length",
            "90",
            "--train-iters",
            "2",
            "--lr-warmup-iters",
            "5",
            "--freeze-vit",
            "--freeze-llm",
            "--freeze-projector",
            "--expert-model-parallel-size",
            "2",
            "--mock-valid-data",
            "--valid-data-path",
            "P",
            "--eval-interval",
            "1",
            "--lora-rank",
            "4",
            "--lora-modules",
            "q_proj",
        ]
    )
    run = dataclasses.replace(run, model=run.model.replace(pad_token_id=10**9))
    found = problems(run)
    for flag in (
        "--sequence-parallel",
        "--seq-length 90",
        "--lr-warmup-iters 5",
        "nothing to train",
        "--expert-model-parallel-size",
        "--mock-valid-data and --valid-data-path",
        "--lora-modules q_proj",
        "--model: special-token id pad_token_id",
    ):
        assert sum(flag in line for line in found) == 1, (flag, found)
    assert len(found) == 8 and all("\n" not in line for line in found), found
    with pytest.raises(ConfigError) as err:
        check(run)
    assert isinstance(err.value, UserError)
    assert str(err.value) == "refusing to start:\n  " + "\n  ".join(found)


def test_a_good_config_has_none():
    assert problems(pretrain_internvl.parse_run_config(["--mock-data", "--stage", "finetune"])) == []


def test_an_expert_split_has_one_line_for_pretrain_and_the_planner():
    """config/problems.py: expert_split_problem is the one home of the EP refusal; the planner's
    check_divisibility raises the same line."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.config.model import ParallelConfig
    from internvl_mcore.config.problems import expert_split_problem, moe_problems
    from internvl_mcore.plan.params import check_divisibility

    model, par = get_preset("internvl3.5-30b-a3b"), ParallelConfig(expert_model_parallel_size=3)
    line = expert_split_problem(model, 3)
    assert line == f"--expert-model-parallel-size 3 does not divide the 128 experts of {model.name}"
    assert moe_problems(model, par) == [line] and expert_split_problem(model, 4) is None
    with pytest.raises(ConfigError) as err:
        check_divisibility(model, par)
    assert str(err.value) == line
