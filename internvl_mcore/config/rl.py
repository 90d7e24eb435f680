"""Online RL flags (issue #28: GSPO / GRPO), declared and checked, not yet wired to a stage.

Field names are Megatron-LM's RL flags with '_' for '-' (as its examples/rl scripts spell them:
--grpo-group-size, --grpo-clamp-eps-lower/-upper, --grpo-kl-beta, --grpo-iterations), which stay accepted as aliases; the
flags' first spelling is the one issue #28 names (--rollouts-per-prompt, --clip-eps-low/-high,
--kl-coeff, --ppo-epochs). --reward / --reward-fn are ours (Megatron-LM takes rewards from its
environment configs). `add_rl_flags` adds the group to a parser and `rl_problems` lists what cannot run;
pretrain_internvl.py does not take them yet: there is no --stage gspo / grpo and no rollout loop
(docs/rl.md). Numbers are checked while parsing (config/domains.py).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from .cli import add_dataclass_flags

GSPO_CLIP = (3e-4, 4e-4)
"""GSPO paper (Zheng et al. 2025), experiments: "the left and right clipping ranges in Equation (5) to 3e-4 and
4e-4, respectively"."""
GRPO_CLIP = (0.2, 0.2)
"""PPO's and DeepSeekMath's GRPO clipping range on both sides."""

_REWARD_FN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class RLConfig:
    """Online RL (GSPO / GRPO): rollouts, the clipped policy loss, the reward."""

    grpo_group_size: int = field(default=8, metadata={"flag": "--rollouts-per-prompt"})
    """Responses sampled per prompt (the group G whose rewards normalize the advantages; at least 2)."""
    grpo_clamp_eps_lower: Optional[float] = field(default=None, metadata={"flag": "--clip-eps-low"})
    """Importance ratios below 1 - eps are clipped (default: GSPO 3e-4, GRPO 0.2: the GSPO paper's and
    GRPO's values; GSPO's sequence-level ratio needs a far smaller range than a per-token one)."""
    grpo_clamp_eps_upper: Optional[float] = field(default=None, metadata={"flag": "--clip-eps-high"})
    """Importance ratios above 1 + eps are clipped (default: GSPO 4e-4, GRPO 0.2)."""
    grpo_kl_beta: float = field(default=0.0, metadata={"flag": "--kl-coeff"})
    """Weight of the k3 KL estimate to the frozen reference model, token-averaged per response (0: no
    KL term and no reference model)."""
    grpo_iterations: int = field(default=1, metadata={"flag": "--ppo-epochs"})
    """Optimizer passes over each rollout batch (1: on-policy, the ratio is 1 at every update)."""
    reward: Optional[Literal["exact", "number", "choice", "regex"]] = None
    """Built-in verifier comparing each response with the prompt's answer field
    (internvl_mcore/training/rl/verifiers.py)."""
    reward_fn: Optional[str] = None
    """module:function called as fn(response: str, answer: str, prompt: dict) -> float instead of a
    built-in verifier (the module imported by its import path: on PYTHONPATH or installed)."""


def add_rl_flags(parser: argparse.ArgumentParser) -> None:
    """The online-RL flag group (declare the parser's domains after it: config/domains.py)."""
    add_dataclass_flags(parser, RLConfig, "online RL")


def clip_range(rl: RLConfig, level: Literal["sequence", "token"]) -> tuple[float, float]:
    """(eps_low, eps_high): the flags, else the defaults of GSPO ('sequence') or GRPO ('token')."""
    default = GSPO_CLIP if level == "sequence" else GRPO_CLIP
    low = rl.grpo_clamp_eps_lower if rl.grpo_clamp_eps_lower is not None else default[0]
    high = rl.grpo_clamp_eps_upper if rl.grpo_clamp_eps_upper is not None else default[1]
    return low, high


def rl_problems(rl: RLConfig) -> list[str]:
    """What cannot run, one line each naming the flags (the numbers' ranges: config/domains.py)."""
    found = []
    if rl.reward is not None and rl.reward_fn is not None:
        found.append(f"--reward {rl.reward} and --reward-fn {rl.reward_fn}: give one of them")
    elif rl.reward is None and rl.reward_fn is None:
        found.append("online RL needs a reward: --reward exact|number|choice|regex or --reward-fn module:function")
    if rl.reward_fn is not None and not _REWARD_FN.match(rl.reward_fn):
        found.append(f"--reward-fn {rl.reward_fn}: expected module:function (e.g. my_rewards:score)")
    return found
