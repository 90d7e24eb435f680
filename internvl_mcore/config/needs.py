"""Flags that act only together with another one: given without it, they would change nothing and the
run would start as if they were absent (`--eval-interval` without validation data evaluated nothing,
silently). `ignored_flags` names each such flag and what it needs; pretrain_internvl.py refuses them
(one line, exit 2) before anything starts. Only flags the command line gives count: the defaults
(`--eval-interval 1000`, as Megatron-LM's) stay harmless without their partner.
"""

from __future__ import annotations

import argparse
from typing import Callable

from .cli import flag

_VALIDATION = "validation data (--valid-data-path PREFIX, or --mock-valid-data with --mock-data)"


def _has_validation(ns: argparse.Namespace) -> bool:
    return bool(ns.valid_data_path or ns.mock_valid_data)


# destination -> (whether its partner is there, the partner as the line names it)
NEEDS: dict[str, tuple[Callable[[argparse.Namespace], bool], str]] = {
    "eval_interval": (_has_validation, _VALIDATION),
    # --eval-iters 0 says "no validation": consistent without validation data
    "eval_iters": (lambda ns: _has_validation(ns) or ns.eval_iters == 0, _VALIDATION),
    "keep_checkpoints": (lambda ns: bool(ns.save), "--save DIR"),
    "async_save": (lambda ns: bool(ns.save), "--save DIR"),
    "no_fallback": (lambda ns: bool(ns.load), "--load DIR"),
    "no_load_optim": (lambda ns: bool(ns.load), "--load DIR"),
    "override_opt_param_scheduler": (lambda ns: bool(ns.load), "--load DIR"),
    "use_checkpoint_opt_param_scheduler": (lambda ns: bool(ns.load), "--load DIR"),
    "wandb_exp_name": (lambda ns: bool(ns.wandb_project), "--wandb-project P"),
    "wandb_save_dir": (lambda ns: bool(ns.wandb_project), "--wandb-project P"),
    "mock_tiles_per_sample": (lambda ns: bool(ns.mock_data), "--mock-data"),
    "lora_alpha": (lambda ns: ns.lora_rank > 0, "--lora-rank R > 0"),
    "lora_dropout": (lambda ns: ns.lora_rank > 0, "--lora-rank R > 0"),
    "lora_target": (lambda ns: ns.lora_rank > 0, "--lora-rank R > 0"),
    "lora_modules": (lambda ns: ns.lora_rank > 0, "--lora-rank R > 0"),
    "recompute_num_layers": (lambda ns: ns.recompute_granularity == "full", "--recompute-granularity full"),
}


def ignored_flags(parser: argparse.ArgumentParser, ns: argparse.Namespace, given: set[str]) -> list[str]:
    """'--flag does nothing without PARTNER' for each given flag whose partner is missing."""
    names = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    return [
        f"{names.get(dest, flag(dest))} does nothing without {partner}"
        for dest, (present, partner) in NEEDS.items()
        if dest in given and not present(ns)
    ]
