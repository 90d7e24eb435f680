#!/usr/bin/env python
"""A training checkpoint without a training step, for bench/checkpoint.py's 2b shape: takes
pretrain_internvl.py's flags, builds the run as it does (`training.loop.setup`: model, optimizer,
scheduler, data; every rank its TP x PP shard) and saves iteration 0 with the trainer's own
`loop.save`, timed; then exits. Run with torchrun like pretrain_internvl.py.

Why: a 2b training step (bf16, one 448-px tile, TP2 x PP2) needs more than 95 CPU-seconds per rank,
which on this shared 2-core machine (load average 50-150) is more than 20 minutes, so a training
run never reached its first save. The checkpoint written here is the same torch_dist directory,
written by the same code, as a save after step k of `--stage 1`, except that Adam's moments of
the projector do not exist yet (created by the first step; ~70 MB, <2% of the bytes): what the export,
--load and --pretrained read is the same.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pretrain():
    spec = importlib.util.spec_from_file_location("_pretrain_internvl", REPO / "pretrain_internvl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_run_config(argv: list[str]):
    """pretrain_internvl.py's own parsing (bench/checkpoint.py --dry-run checks the flags with it)."""
    return _pretrain().parse_run_config(argv)


def main() -> int:
    import torch.distributed as dist

    from internvl_mcore.config.problems import check as check_config
    from internvl_mcore.training import loop

    run = parse_run_config(sys.argv[1:])
    check_config(run)
    trainer = loop.setup(run)
    dist.barrier()
    start = time.perf_counter()
    loop.save(trainer, final=True)
    took = time.perf_counter() - start
    if dist.get_rank() == 0:
        print(f"save-only: iteration {trainer.iteration} saved in {took:.2f} s", flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
