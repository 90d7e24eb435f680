"""The online-RL flags (internvl_mcore/config/rl.py): parsed with their aliases, numbers checked while
parsing (one line, exit 2), combinations by rl_problems."""

from __future__ import annotations

import typing

import pytest

from internvl_mcore.config.cli import build_dataclass
from internvl_mcore.config.domains import OneLineParser, declare_domains
from internvl_mcore.config.rl import GRPO_CLIP, GSPO_CLIP, RLConfig, add_rl_flags, clip_range, rl_problems
from internvl_mcore.training.rl.verifiers import BUILTIN


def _parse(argv: list[str]) -> RLConfig:
    parser = OneLineParser(prog="pretrain_internvl.py")
    add_rl_flags(parser)
    return build_dataclass(RLConfig, declare_domains(parser).parse_args(argv))


def test_flags_and_defaults():
    rl = _parse([])
    assert (rl.grpo_group_size, rl.grpo_kl_beta, rl.grpo_iterations) == (8, 0.0, 1)
    assert clip_range(rl, "sequence") == GSPO_CLIP == (3e-4, 4e-4) and clip_range(rl, "token") == GRPO_CLIP
    rl = _parse(
        "--rollouts-per-prompt 4 --clip-eps-low 0.1 --clip-eps-high 0.28 --kl-coeff 0.01 --ppo-epochs 2 "
        "--reward number".split()
    )
    assert (rl.grpo_group_size, rl.grpo_kl_beta, rl.grpo_iterations, rl.reward) == (4, 0.01, 2, "number")
    assert clip_range(rl, "sequence") == (0.1, 0.28) == clip_range(rl, "token")
    alias = _parse("--grpo-group-size 3 --grpo-clamp-eps-lower 0.2 --grpo-kl-beta 0.1 --grpo-iterations 4".split())
    assert (alias.grpo_group_size, alias.grpo_clamp_eps_lower, alias.grpo_kl_beta, alias.grpo_iterations) == (
        3,
        0.2,
        0.1,
        4,
    )
    assert set(typing.get_args(typing.get_type_hints(RLConfig)["reward"].__args__[0])) == set(BUILTIN)


BAD = {
    "--rollouts-per-prompt 1": "--rollouts-per-prompt 1: must be an integer >= 2",
    "--clip-eps-low 1": "--clip-eps-low 1: must be a number in (0, 1)",
    "--clip-eps-low 0": "--clip-eps-low 0: must be a number in (0, 1)",
    "--clip-eps-high nan": "--clip-eps-high nan: must be a finite number > 0",
    "--kl-coeff -0.1": "--kl-coeff -0.1: must be a finite number >= 0",
    "--ppo-epochs 0": "--ppo-epochs 0: must be an integer >= 1",
    "--reward fuzzy": "argument --reward: invalid choice: 'fuzzy'",
}


def test_bad_values_are_one_line(capsys):
    for args, message in BAD.items():
        with pytest.raises(SystemExit) as e:
            _parse(args.split())
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, (args, err)


def test_problems():
    assert rl_problems(RLConfig(reward="exact")) == [] == rl_problems(RLConfig(reward_fn="my.rewards:score"))
    assert rl_problems(RLConfig()) == [
        "online RL needs a reward: --reward exact|number|choice|regex or --reward-fn module:function"
    ]
    assert rl_problems(RLConfig(reward="exact", reward_fn="m:f")) == [
        "--reward exact and --reward-fn m:f: give one of them"
    ]
    assert rl_problems(RLConfig(reward_fn="rewards.py")) == [
        "--reward-fn rewards.py: expected module:function (e.g. my_rewards:score)"
    ]
