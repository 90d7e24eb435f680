"""The train step's faster kernels against the plain ones.

    python -m torch.distributed.run --nproc_per_node N tests/training/step_kernels_worker.py OUT

World 2 (DP2): fused CPU AdamW (cpu_compat.fuse_cpu_adam) against torch's per-tensor AdamW, plain and
   distributed optimizer: each trainer trains 3 steps with the fused kernel, then is reset to its initial
   weights and empty optimizer state and trains the same 3 batches with the per-tensor loop.
World 1: --torch-compile (megatron-core's inductor-compiled SwiGLU / bias-dropout-add) against the
   unfused modules: losses and gradient norms of 2 steps from the same seed. One process because every
   rank compiles the same graphs itself (inductor's Python lowering and a g++ run per kernel, ~30 CPU-s):
   a second rank would double the cost and check nothing more about the fusions.
Rank 0 writes OUT (JSON).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from pretrain_internvl import parse_run_config  # noqa: E402
from internvl_mcore.training.loop import setup, train_step  # noqa: E402

STEPS = 3
FLAGS = [
    "--model",
    "debug",
    "--mock-data",
    "--seq-length",
    "128",
    "--micro-batch-size",
    "1",
    "--global-batch-size",
    "2",
    "--train-iters",
    "100",
    "--lr",
    "1e-3",
    "--lr-decay-style",
    "constant",
    "--clip-grad",
    "1.0",
    "--seed",
    "0",
]


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return [part.optimizer for part in getattr(optimizer, "chained_optimizers", [optimizer])]


def train(trainer, batches: list) -> tuple[list[float], list[torch.Tensor]]:
    trainer.batches = iter(batches)
    losses = [train_step(trainer)["loss"] for _ in range(STEPS)]
    return losses, [p.detach().clone() for p in trainer.model[0].module.parameters()]


def compare(extra: list[str]) -> dict:
    trainer = setup(parse_run_config(FLAGS + extra))
    groups = [g for opt in inner_optimizers(trainer.optimizer) for g in opt.param_groups]
    fused = all(g["fused"] and not g["foreach"] for g in groups)
    params = list(trainer.model[0].module.parameters())
    start = [p.detach().clone() for p in params]
    batches = [next(trainer.batches) for _ in range(STEPS * trainer.num_microbatches)]
    fused_losses, fused_params = train(trainer, batches)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    for opt in inner_optimizers(trainer.optimizer):
        opt.state.clear()
        for g in opt.param_groups:
            g["fused"], g["foreach"] = False, False
    loop_losses, loop_params = train(trainer, batches)
    return {
        "fused_flags": fused,
        "fused_losses": fused_losses,
        "loop_losses": loop_losses,
        "max_diff": max(float((a - b).abs().max()) for a, b in zip(fused_params, loop_params)),
        "max_update": max(float((a - s).abs().max()) for a, s in zip(loop_params, start)),
    }


def compiled_vs_eager() -> dict:
    from megatron.core import parallel_state

    flags = FLAGS + ["--train-iters", "2"]
    out = {}
    for name, extra in (("eager", []), ("compiled", ["--torch-compile"])):
        trainer = setup(parse_run_config(flags + extra))
        mlp = trainer.model[0].module.language_model.decoder.layers[0].mlp
        out[name] = {"fused": bool(mlp.config.bias_activation_fusion), "steps": [train_step(trainer) for _ in range(2)]}
        parallel_state.destroy_model_parallel()
    return out


def main() -> None:
    if dist.get_world_size() == 1:
        out = {"compile": compiled_vs_eager()}
    else:
        out = {"plain": compare([]), "distributed": compare(["--use-distributed-optimizer"])}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
