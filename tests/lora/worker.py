"""Train a few steps with LoRA flags and report what changed (a tests/worldpool.py job or torchrun, or `run` in-process).

    python -m torch.distributed.run ... tests/lora/worker.py OUT B_STD [pretrain flags...]

B_STD > 0 re-draws every adapter's B from N(0, B_STD^2) (seeded by canonical name, so the same on
every layout) right after set-up, before any step: with the usual B = 0 the first loss could not
tell a mis-sharded adapter from a correct one. It is skipped when resuming (--load).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from pretrain_internvl import parse_run_config  # noqa: E402
from internvl_mcore.models.lora import init_lora_weights, is_lora_name, lora_parameters  # noqa: E402
from internvl_mcore.training.loop import save, setup, train_step  # noqa: E402


def run(argv: list[str], b_std: float = 0.0) -> dict:
    """Set up from pretrain flags, train --train-iters steps (saving like the loop does) and report
    per-rank facts; `adapters` holds this rank's adapter tensors (canonical names)."""
    trainer = setup(parse_run_config(argv))
    cfg, c = trainer.run, trainer.run.checkpoint
    module = trainer.model[0].module
    if b_std and not c.load:
        init_lora_weights(module, cfg.model, seed=cfg.train.seed, b_std=b_std)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    losses, grad_norms = [], []
    while trainer.iteration < cfg.train.train_iters:
        stats = train_step(trainer)
        losses.append(stats["loss"])
        grad_norms.append(stats["grad_norm"])
        if c.save and (
            (c.save_interval and trainer.iteration % c.save_interval == 0) or trainer.iteration == cfg.train.train_iters
        ):
            save(trainer)
    params = {
        n: {
            "changed": not torch.equal(before[n], p.detach()),
            "requires_grad": p.requires_grad,
            "lora": is_lora_name(n),
            "has_grad_buffer": getattr(p, "main_grad", None) is not None,
        }
        for n, p in module.named_parameters()
    }
    return {
        "rank": dist.get_rank(),
        "losses": losses,
        "grad_norms": grad_norms,
        "params": params,
        "optimizer_numel": sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]),
        "lora_numel": sum(p.numel() for n, p in module.named_parameters() if is_lora_name(n)),
        "adapters": {name: p.detach().clone() for _, name, p in lora_parameters(module)},
    }


if __name__ == "__main__":
    out, b_std, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    report = run(argv, b_std)
    report.pop("adapters")
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(report, f)
