"""The values every numeric flag may take, declared once and checked while the flags are parsed.

`DOMAINS` maps a flag's destination (`seq_length` for `--seq-length`) to its `Domain`: integer or
finite number, with a lower and an optional upper bound, each open or closed. `declare_domains(parser)`
makes every int / float flag of a parser read its value through its domain, so `--lr nan`,
`--seq-length 0` or `--gpu-memory inf` stop at parse time with one line naming the flag and what it
takes, before any process group or model exists. pretrain_internvl.py and tools/plan.py share the
table: a flag both have (`--seq-length`, `--global-batch-size`, ...) means the same in both.
A numeric flag missing from the table is a bug that tests/reliability/test_flag_domains.py reports.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Domain:
    """Integers or finite floats between `low` and `high` (None: unbounded); `*_open` excludes the bound."""

    kind: type
    low: Optional[float] = None
    low_open: bool = False
    high: Optional[float] = None
    high_open: bool = False

    def describe(self) -> str:
        """'an integer >= 1', 'a finite number > 0', 'a number in (0, 1]'."""
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return (
                f"{'an integer' if self.kind is int else 'a number'} in "
                f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            )
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self.high:g}"
        return what

    def contains(self, value: float) -> bool:
        """Whether `value` (already an int / float) lies in the domain."""
        if self.kind is float and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __call__(self, text: str) -> int | float:
        """argparse's `type`: the value, or ArgumentTypeError (argparse names the flag before it)."""
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self.contains(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}")
        return value


POSITIVE_INT = Domain(int, 1)
"""Sizes and counts that cannot be zero."""
COUNT = Domain(int, 0)
"""Counts and intervals where 0 means none / off."""
POSITIVE = Domain(float, 0, low_open=True)
"""Finite and > 0: rates, scales, bandwidths, memory."""
NON_NEGATIVE = Domain(float, 0)
"""Finite and >= 0 (0: off / none)."""
FRACTION = Domain(float, 0, low_open=True, high=1)
"""In (0, 1]."""
PROBABILITY = Domain(float, 0, high=1, high_open=True)
"""In [0, 1): dropout-like rates and Adam's betas."""

DOMAINS: dict[str, Domain] = {
    # parallel layout (ParallelConfig; tools/plan.py)
    "tensor_model_parallel_size": POSITIVE_INT,
    "pipeline_model_parallel_size": POSITIVE_INT,
    "context_parallel_size": POSITIVE_INT,
    "hierarchical_context_parallel_sizes": POSITIVE_INT,
    "decoder_first_pipeline_num_layers": POSITIVE_INT,
    "decoder_last_pipeline_num_layers": POSITIVE_INT,
    "num_layers_per_virtual_pipeline_stage": POSITIVE_INT,
    "num_virtual_stages_per_pipeline_rank": POSITIVE_INT,
    "recompute_num_layers": POSITIVE_INT,
    "expert_model_parallel_size": POSITIVE_INT,
    "expert_tensor_parallel_size": POSITIVE_INT,
    # optimization and batch geometry (TrainConfig)
    "micro_batch_size": POSITIVE_INT,
    "global_batch_size": POSITIVE_INT,
    "seq_length": POSITIVE_INT,
    "train_iters": POSITIVE_INT,
    "lr": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "lr_warmup_iters": COUNT,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": PROBABILITY,
    "adam_beta2": PROBABILITY,
    "adam_eps": POSITIVE,
    "clip_grad": NON_NEGATIVE,
    "seed": COUNT,
    "moe_aux_loss_coeff": NON_NEGATIVE,
    "unfreeze_vit_layers": COUNT,
    "drop_path_rate": PROBABILITY,
    "mpo_beta": POSITIVE,
    "mpo_loss_weights": NON_NEGATIVE,
    "peak_flops": POSITIVE,
    "eval_interval": COUNT,
    "eval_iters": COUNT,
    "skip_spike_factor": POSITIVE,
    "distributed_timeout_minutes": POSITIVE,
    "data_worker_timeout": POSITIVE,
    # online RL (config/rl.py)
    "grpo_group_size": Domain(int, 2),
    "grpo_clamp_eps_lower": Domain(float, 0, low_open=True, high=1, high_open=True),
    "grpo_clamp_eps_upper": POSITIVE,
    "grpo_kl_beta": NON_NEGATIVE,
    "grpo_iterations": POSITIVE_INT,
    "temperature": POSITIVE,
    "top_p": FRACTION,
    "max_new_tokens": POSITIVE_INT,
    # device and kernels (ComputeConfig)
    "cross_entropy_chunk_size": COUNT,
    # checkpoints, data, logging, LoRA
    "save_interval": COUNT,
    "exit_interval": COUNT,
    "keep_checkpoints": COUNT,
    "mock_tiles_per_sample": POSITIVE_INT,
    "num_workers": COUNT,
    "log_interval": POSITIVE_INT,
    "lora_rank": COUNT,
    "lora_alpha": POSITIVE,
    "lora_dropout": PROBABILITY,
    # tools/plan.py only
    "gpus": POSITIVE_INT,
    "gpu_memory": POSITIVE,
    "reserve_gb": NON_NEGATIVE,
    "peak_tflops": POSITIVE,
    "compute_efficiency": FRACTION,
    "nvlink_gbps": POSITIVE,
    "network_gbps": POSITIVE,
    "tiles_per_sequence": NON_NEGATIVE,
    "sample_length": POSITIVE_INT,
    "top": POSITIVE_INT,
    "rollout_prompts_per_step": POSITIVE_INT,
    "rollout_group_size": POSITIVE_INT,  # >= 2 checked by plan.py (the probe's plain value is 1)
    "rollout_prompt_length": POSITIVE_INT,
    "rollout_max_new_tokens": POSITIVE_INT,
    "inference_max_requests": POSITIVE_INT,
}


def numeric_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's flags that take numbers (int / float, or a Domain already declared)."""
    return [a for a in parser._actions if a.option_strings and (a.type in (int, float) or isinstance(a.type, Domain))]


def declare_domains(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make every numeric flag of `parser` parse through its domain in `DOMAINS` (an int flag whose
    domain says float, or the reverse, is a bug: the table and the flag disagree)."""
    for action in numeric_actions(parser):
        domain = DOMAINS.get(action.dest)
        if domain is None or isinstance(action.type, Domain):
            continue
        if domain.kind is not action.type:
            raise TypeError(f"{action.option_strings[0]} is {action.type.__name__}, its domain {domain.kind.__name__}")
        action.type = domain
    return parser


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...`, exit 2), as docs/errors.md
    promises for every user error; `--help` still prints the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def _get_value(self, action: argparse.Action, arg_string: str) -> object:
        """'--seq-length 0: must be an integer >= 1' rather than argparse's 'argument --seq-length: ...'."""
        if isinstance(action.type, Domain):
            try:
                return action.type(arg_string)
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentError(
                    None, f"{action.option_strings[0]} {arg_string}: must be {action.type.describe()}"
                ) from None
        return super()._get_value(action, arg_string)
