#!/usr/bin/env python
"""LoRA vs full fine-tuning on the same model: trainable parameters, optimizer-state bytes, gradient
buffer bytes and step time, each as a LoRA / full ratio, measured in one run.

    python bench/lora.py                          # debug-m (~110M params), seq 256, < 2 min on CPU
    python bench/lora.py --model debug --seq-length 128 --steps 5
    python bench/lora.py --lora-rank 64 --lora-target all

Both runs are `pretrain_internvl.py --stage finetune` on the same mock data in this process (a
1-rank world): "full" trains the LLM and the projector as the stage says (ViT frozen), "LoRA" adds
`--lora-rank R` (base frozen, adapters on the --lora-target towers). Optimizer state is what Adam
actually holds after the first step (exp_avg, exp_avg_sq, and fp32 master copies under --bf16);
gradient buffers are megatron-core DDP's main_grad buffers. Step time is the median of --steps
steps after one warm-up step; the two runs take turns step by step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _torch_optimizers(optimizer):
    """The torch optimizers inside megatron-core's (possibly chained) optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield opt.optimizer


def build(argv: list[str]):
    """Set up one run from pretrain flags and take its warm-up step (which also creates Adam's state)."""
    from pretrain_internvl import parse_run_config
    from internvl_mcore.training.loop import setup, train_step

    trainer = setup(parse_run_config(argv))
    train_step(trainer)
    return trainer


def sizes(trainer) -> dict:
    """Trainable parameters, optimizer-state bytes and gradient-buffer bytes of a set-up run."""
    import torch

    module = trainer.model[0].module
    state_bytes = sum(
        t.numel() * t.element_size()
        for opt in _torch_optimizers(trainer.optimizer)
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    # fp32 master copies (bf16 training) are optimizer state too; in fp32 the params are their own masters
    own = {id(p) for p in module.parameters()}
    masters = sum(
        p.numel() * p.element_size()
        for opt in _torch_optimizers(trainer.optimizer)
        for g in opt.param_groups
        for p in g["params"]
        if id(p) not in own
    )
    grad_bytes = sum(
        p.main_grad.numel() * p.main_grad.element_size()
        for p in module.parameters()
        if getattr(p, "main_grad", None) is not None
    )
    return {
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in module.parameters()),
        "optimizer_bytes": state_bytes + masters,
        "grad_bytes": grad_bytes,
    }


def time_steps(trainers: dict, steps: int) -> dict[str, dict[str, float]]:
    """Median seconds per step of each run; the runs take turns step by step, so a change of
    machine load between them (other jobs on a shared box) hits both alike."""
    from internvl_mcore.training.loop import train_step

    wall: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(steps):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            train_step(trainer)
            wall[name].append(time.perf_counter() - start)
    return {k: {"step_s": statistics.median(wall[k])} for k in trainers}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="debug-m", help="model preset (default debug-m)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--global-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-target", default="llm", choices=("llm", "vit", "all"))
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()

    common = [
        "--model",
        args.model,
        "--mock-data",
        "--stage",
        "finetune",
        "--seq-length",
        str(args.seq_length),
        "--global-batch-size",
        str(args.global_batch_size),
        "--train-iters",
        str(args.steps + 1),
        "--mock-tiles-per-sample",
        "1",
    ] + (["--bf16"] if args.bf16 else [])
    trainers = {
        "full": build(common),
        "lora": build(common + ["--lora-rank", str(args.lora_rank), "--lora-target", args.lora_target]),
    }
    timing = time_steps(trainers, args.steps)
    full, lora = ({**sizes(trainers[k]), **timing[k]} for k in ("full", "lora"))

    print(
        f"\n{args.model}: {full['total'] / 1e6:.1f}M parameters, seq {args.seq_length}, "
        f"global batch {args.global_batch_size}, {'bf16' if args.bf16 else 'fp32'}; "
        f"LoRA rank {args.lora_rank} on {args.lora_target} vs full --stage finetune"
    )
    rows = (
        ("trainable parameters", "trainable", lambda v: f"{v / 1e6:.3f}M"),
        ("optimizer state", "optimizer_bytes", lambda v: f"{v / 2**20:.2f} MiB"),
        ("gradient buffers", "grad_bytes", lambda v: f"{v / 2**20:.2f} MiB"),
        ("step time", "step_s", lambda v: f"{v * 1e3:.0f} ms"),
    )
    print(f"{'':22s} {'full':>14s} {'LoRA':>14s} {'LoRA / full':>12s}")
    for label, key, fmt in rows:
        ratio = lora[key] / full[key] if full[key] else float("nan")
        print(f"{label:22s} {fmt(full[key]):>14s} {fmt(lora[key]):>14s} {ratio:>12.4f}")


if __name__ == "__main__":  # the guard matters: megatron-core's checkpoint writer may re-import __main__
    main()
