#!/usr/bin/env python
"""A tiny MoE training step at EP1 vs EP2: tokens/s, CPU-MFU (active-parameter FLOPs) and the share of
the step spent in token dispatch/combine, measured in one run.

    python bench/moe.py                     # 2 CPU processes (gloo), ~1-2 min
    python bench/moe.py --steps 8 --seq-length 1024 --experts 8 --topk 2

One torchrun world of 2 ranks runs both phases one after the other on the same mock data: EP1
(data parallel 2, every rank holds all experts) and EP2 (data parallel 2, each rank holds half of
the experts and tokens travel by all-to-all), through `pretrain_internvl.py`'s own training loop.
The model is `debug-moe` widened by the flags (Qwen3-MoE traits: QK-norm, top-k softmax router
with renormalized probabilities, SequentialMLP experts, megatron-core's all-to-all dispatcher).

Reported per phase (median over --steps steps after one warm-up step):
- tokens/s of the whole job and CPU-MFU = model FLOPs (plan/flops.py: attention + the top-k
  experts each token uses + router, i.e. active parameters) / step time / ranks / the matmul peak
  measured at start-up (training/metrics.py: measure_peak_flops);
- dispatch/combine share: time inside megatron-core's MoEAlltoAllTokenDispatcher forward methods
  (permutation, split-size exchange, all-to-all, sorting by expert, and the reverse) over the step
  time, and separately the all-to-all communication itself (torch.distributed.all_to_all_single,
  forward and backward), both summed over the step on rank 0.
GPU speed is not measured here; on 2 shared CPU cores absolute numbers are small and noisy, the
EP2 / EP1 ratios are the point.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DISPATCHER_METHODS = (
    "dispatch_preprocess",
    "token_dispatch",
    "dispatch_postprocess",
    "combine_preprocess",
    "token_combine",
    "combine_postprocess",
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase after one warm-up step")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=512, help="SwiGLU width of one expert")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Timers:
    """Seconds spent inside wrapped callables since the last reset."""

    def __init__(self) -> None:
        self.seconds = {"dispatcher": 0.0, "all_to_all": 0.0}

    def wrap(self, fn, key: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        return timed

    def reset(self) -> None:
        self.seconds = {k: 0.0 for k in self.seconds}


def install_timers() -> Timers:
    """Time the dispatcher's forward methods and every all_to_all_single (forward and backward)."""
    import torch.distributed as dist
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    timers = Timers()
    for name in DISPATCHER_METHODS:
        setattr(MoEAlltoAllTokenDispatcher, name, timers.wrap(getattr(MoEAlltoAllTokenDispatcher, name), "dispatcher"))
    dist.all_to_all_single = timers.wrap(dist.all_to_all_single, "all_to_all")
    return timers


def model_config(a: argparse.Namespace):
    from internvl_mcore.config import get_preset

    base = get_preset("debug-moe")
    llm = dataclasses.replace(
        base.llm,
        num_layers=a.layers,
        hidden_size=a.hidden_size,
        num_attention_heads=4,
        num_query_groups=2,
        num_experts=a.experts,
        moe_router_topk=a.topk,
        moe_ffn_hidden_size=a.expert_ffn,
    )
    return base.replace(name="bench-moe", llm=llm)


def phase(a: argparse.Namespace, ep: int, timers: Timers, peak: float) -> dict:
    """Set up a 2-rank run at expert parallelism `ep`, take a warm-up step and `steps` timed ones."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain_internvl import parse_run_config
    from internvl_mcore.training.loop import setup, train_step
    from internvl_mcore.training.metrics import step_flops

    argv = [
        "--mock-data",
        "--mock-tiles-per-sample",
        "1",
        "--global-batch-size",
        "4",
        "--seq-length",
        str(a.seq_length),
        "--train-iters",
        str(a.steps + 1),
        "--expert-model-parallel-size",
        str(ep),
        "--lr",
        "1e-4",
    ]
    run = dataclasses.replace(parse_run_config(argv), model=model_config(a))
    trainer = setup(run)
    train_step(trainer)  # warm-up
    rows = []
    for _ in range(a.steps):
        dist.barrier()
        timers.reset()
        start = time.perf_counter()
        stats = train_step(trainer)
        elapsed = time.perf_counter() - start
        rows.append((elapsed, dict(timers.seconds), step_flops(trainer.run, stats)))
    parallel_state.destroy_model_parallel()
    t = statistics.median(r[0] for r in rows)
    world = dist.get_world_size()
    flops = statistics.median(r[2] for r in rows)
    return {
        "ep": ep,
        "step_s": t,
        "tokens_per_s": 4 * a.seq_length / t,
        "mfu": flops / t / world / peak,
        "dispatch_share": statistics.median(r[1]["dispatcher"] / r[0] for r in rows),
        "all_to_all_share": statistics.median(r[1]["all_to_all"] / r[0] for r in rows),
    }


def worker(a: argparse.Namespace) -> None:
    import torch.distributed as dist

    from internvl_mcore.config import ParallelConfig
    from internvl_mcore.parallel.state import init_distributed
    from internvl_mcore.training.metrics import measure_peak_flops

    init_distributed(ParallelConfig(), seed=1)
    timers = install_timers()
    peak = measure_peak_flops()
    results = [phase(a, ep, timers, peak) for ep in (1, 2)]
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps({"peak_flops": peak, "phases": results}))


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.worker:
        worker(a)
        return
    import tempfile

    from tests.launch import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "moe.json"
        args = [a_ for a_ in (argv if argv is not None else sys.argv[1:])]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(Path(__file__).resolve()),
            "--worker",
            "--out",
            str(out),
            *args,
        ]
        subprocess.run(
            cmd,
            cwd=REPO,
            check=True,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        )
        res = json.loads(out.read_text())
    cfg = model_config(a)
    from internvl_mcore.plan.params import active_params, count_params

    print(
        f"model: {cfg.llm.num_layers} MoE layers, hidden {cfg.llm.hidden_size}, {cfg.llm.num_experts} experts "
        f"x {cfg.llm.moe_ffn_hidden_size}, top-{cfg.llm.moe_router_topk}; {count_params(cfg).total / 1e6:.1f}M "
        f"parameters, {active_params(cfg).total / 1e6:.1f}M active; 2 ranks (gloo), global batch 4 x "
        f"{a.seq_length} tokens; matmul peak {res['peak_flops'] / 1e9:.1f} GFLOP/s per rank"
    )
    print(f"{'layout':<14}{'step s':>8}{'tokens/s':>10}{'CPU-MFU':>9}{'dispatch/combine':>18}{'all-to-all':>12}")
    for r in res["phases"]:
        name = f"DP2 EP{r['ep']}"
        print(
            f"{name:<14}{r['step_s']:8.3f}{r['tokens_per_s']:10.0f}{r['mfu'] * 100:8.1f}%"
            f"{r['dispatch_share'] * 100:17.1f}%{r['all_to_all_share'] * 100:11.1f}%"
        )
    ep1, ep2 = res["phases"]
    print(
        f"EP2 / EP1: tokens/s x{ep2['tokens_per_s'] / ep1['tokens_per_s']:.2f}, "
        f"dispatch/combine share {ep1['dispatch_share'] * 100:.1f}% -> {ep2['dispatch_share'] * 100:.1f}%"
    )


if __name__ == "__main__":
    main()
