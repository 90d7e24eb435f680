"""Online RL flags (issue #28: GSPO / GRPO), declared and checked, not yet wired to a stage.

Field names are Megatron-LM's RL flags with '_' for '-' (as its examples/rl scripts spell them:
--grpo-group-size, --grpo-clamp-eps-lower/-upper, --grpo-kl-beta, --grpo-iterations), which stay accepted as aliases; the
flags' first spelling is the one issue #28 names (--rollouts-per-prompt, --clip-eps-low/-high,
--kl-coeff, --ppo-epochs). --reward / --reward-fn are ours (Megatron-LM takes rewards from its
environment configs); --tokenizer-model, --temperature, --top-p and --max-new-tokens are the rollouts'
(Megatron-LM's and tools/generate.py's spellings). `add_rl_flags` adds the group to a parser,
`rl_problems` lists what cannot run and `rl_stage_problems` what --stage gspo / grpo cannot run with;
pretrain_internvl.py takes them (training/rl/stage.py runs the stage; docs/rl.md). Numbers are checked
while parsing (config/domains.py).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

from .cli import add_dataclass_flags

if TYPE_CHECKING:  # config/training.py imports this module: the annotation only
    from .training import RunConfig

RL_STAGES = ("gspo", "grpo")
"""The --stage values of online RL: GSPO's sequence-level ratio, GRPO's token-level one."""

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
    tokenizer_model: Optional[str] = None
    """Tokenizer directory of the model (online RL: prompts are tokenized and responses decoded with it)."""
    temperature: float = 1.0
    """Rollout sampling temperature (softmax(logits / T); > 0: every response of a group is drawn anew)."""
    top_p: float = 1.0
    """Rollout nucleus sampling: keep the smallest set of tokens whose probability reaches P (1: all)."""
    max_new_tokens: int = 64
    """Most tokens sampled per response (prompt + this must fit --seq-length)."""


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


def rl_stage_problems(run: "RunConfig") -> list[str]:
    """What --stage gspo / grpo cannot run with, and RL flags without such a stage (one line each).

    The layout and training flags are always checked; what the stage reads (reward, tokenizer,
    prompts, whole groups per batch) only for a run with a data source, as pretrain's always has:
    tools/plan.py checks run configs without one, and its rollout flags are its own."""
    t, rl = run.train, run.rl
    if t.stage not in RL_STAGES:
        if rl == RLConfig():
            return []
        return ["--rollouts-per-prompt, --reward and the other online-RL flags apply to --stage gspo / grpo only"]
    where = f"--stage {t.stage}"
    found = _rl_input_problems(run, where) if (run.data.data_path or run.data.mock_data) else []
    if t.drop_path_rate:
        found.append(
            f"--drop-path-rate {t.drop_path_rate} with {where}: drop path makes the policy's log-probs random, "
            "and the importance ratios need the same log-probs twice (use 0)"
        )
    if t.loss_reduction != "token":
        found.append(f"--loss-reduction does not apply to {where} (its loss is a mean over responses)")
    if t.skip_spike_factor is not None:
        found.append(f"--skip-spike-factor is not implemented for {where}")
    if run.parallel.context_parallel_size > 1:
        found.append(f"--context-parallel-size > 1 is not implemented for {where} (the rollouts' log-probs)")
    if run.data.valid_data_path or run.data.mock_valid_data:
        found.append(f"validation (--valid-data-path / --mock-valid-data) is not implemented for {where}")
    if run.lora.enabled:
        found.append(f"--lora-rank is not implemented for {where}")
    if run.data.balance_dp_compute:  # the stage deals prompts, not packs: the flag would do nothing
        found.append(
            f"--balance-dp-compute does not apply to {where} (it deals packed shards; prompts are dealt evenly)"
        )
    return found


def _rl_input_problems(run: "RunConfig", where: str) -> list[str]:
    """The reward, the tokenizer, one prompt set, whole groups per global batch."""
    rl, t = run.rl, run.train
    found = rl_problems(rl)
    if not rl.tokenizer_model:
        found.append(f"{where} needs --tokenizer-model DIR (prompts are tokenized, responses decoded)")
    if run.data.mock_data or len(run.data.data_path) != 1:
        found.append(
            f"{where} needs one --data-path: prompt shards (tools/preprocess_mm_data.py --prompts) or a JSONL file"
        )
    if t.global_batch_size % rl.grpo_group_size:
        found.append(
            f"--global-batch-size {t.global_batch_size} (responses per step) is not a multiple of "
            f"--rollouts-per-prompt {rl.grpo_group_size}"
        )
    return found
