"""Train a few steps with the given pretrain flags and report which parameters changed (torchrun)."""

import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from pretrain_internvl import parse_run_config  # noqa: E402
from internvl_mcore.training.loop import setup, train_step  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
trainer = setup(parse_run_config(argv))
module = trainer.model[0].module
before = {n: p.detach().clone() for n, p in module.named_parameters()}
for _ in range(trainer.run.train.train_iters):
    train_step(trainer)
report = {}
for n, p in module.named_parameters():
    report[n] = {
        "changed": not torch.equal(before[n], p.detach()),
        "requires_grad": p.requires_grad,
        "has_grad_buffer": getattr(p, "main_grad", None) is not None,
    }
report["__optimizer_numel__"] = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
report["__trainable_numel__"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
    json.dump(report, f)
