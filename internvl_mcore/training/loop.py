"""The training loop: megatron-core schedules, DDP, (distributed) optimizer, LR schedule, logging.

`pretrain_internvl.py` only parses flags into a `RunConfig` and calls `train`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..config.training import RunConfig
from ..parallel.state import init_distributed
from .batch import Batch
from .mock import mock_batches
from .step import forward_step


@dataclass
class Trainer:
    """Everything a step needs, built once by `setup`."""

    run: RunConfig
    model: list  # megatron-core DDP-wrapped model chunks (one: no virtual pipeline)
    optimizer: object
    scheduler: object
    num_microbatches: int
    dp_size: int


def setup(run: RunConfig) -> Trainer:
    """Join the job, build this rank's model stage, wrap it in DDP, build optimizer and schedule."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ..models.internvl import build_model
    from ..models.weights import init_weights

    t = run.train
    init_distributed(run.parallel, t.seed)
    dp = parallel_state.get_data_parallel_world_size()
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                         f"{t.micro_batch_size} x data-parallel size {dp}")
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    model = build_model(run.model, run.parallel, dtype=dtype)
    init_weights(model, run.model, seed=t.seed)
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=t.use_distributed_optimizer),
        module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                        clip_grad=t.clip_grad, bf16=t.bf16, params_dtype=dtype,
                        use_distributed_optimizer=t.use_distributed_optimizer),
        [ddp])
    g = t.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters * g,
        lr_decay_steps=max(t.train_iters * g, 1), lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=max(t.train_iters * g, 1),
        wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return Trainer(run, [ddp], optimizer, scheduler, g // (t.micro_batch_size * dp), dp)


def data_iterator(trainer: Trainer, start_iteration: int = 0) -> Iterator[Batch]:
    """This rank's microbatches."""
    from megatron.core import parallel_state

    run = trainer.run
    if not run.data.mock_data:
        raise NotImplementedError("training on --data-path shards is not wired yet; use --mock-data")
    return mock_batches(run.model, run.train.seed, run.train.seq_length, run.data.mock_tiles_per_sample,
                        run.train.micro_batch_size, run.train.global_batch_size,
                        parallel_state.get_data_parallel_rank(), trainer.dp_size, start_iteration)


def train_step(trainer: Trainer, batches: Iterator[Batch]) -> dict:
    """One optimizer step over `num_microbatches` microbatches; returns loss/grad-norm/lr."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t = trainer.run.train
    ddp = trainer.model[0]
    ddp.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=trainer.model,
        num_microbatches=trainer.num_microbatches, seq_length=t.seq_length,
        micro_batch_size=t.micro_batch_size, forward_only=False)
    _, grad_norm, _ = trainer.optimizer.step()
    trainer.scheduler.step(increment=t.global_batch_size)
    # the loss lives on the last pipeline stage; sum it over microbatches and data-parallel ranks
    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        for item in losses:
            totals += item["lm loss"].to(torch.float64)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return {"loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
            "target_tokens": int(totals[1]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": trainer.optimizer.param_groups[0]["lr"]}


def train(run: RunConfig) -> list[dict]:
    """Run `train_iters` steps; the last rank (on the last pipeline stage) logs and returns records."""
    trainer = setup(run)
    batches = data_iterator(trainer)
    t, log = run.train, run.log
    is_logger = dist.get_rank() == dist.get_world_size() - 1
    jsonl = open(log.log_jsonl, "a") if (log.log_jsonl and is_logger) else None
    records = []
    try:
        for iteration in range(1, t.train_iters + 1):
            start = time.perf_counter()
            stats = train_step(trainer, batches)
            elapsed = time.perf_counter() - start
            tokens = t.global_batch_size * t.seq_length
            record = {"iteration": iteration, **stats, "tokens_per_s": tokens / elapsed,
                      "samples_per_s": t.global_batch_size / elapsed, "step_time_s": elapsed}
            records.append(record)
            if is_logger:
                if jsonl:
                    jsonl.write(json.dumps(record) + "\n")
                    jsonl.flush()
                if iteration % log.log_interval == 0:
                    print(f"iteration {iteration:6d}/{t.train_iters} | loss {record['loss']:.6e} | "
                          f"lr {record['lr']:.3e} | grad_norm {record['grad_norm']:.4f} | "
                          f"tokens/s {record['tokens_per_s']:.1f}", flush=True)
    finally:
        if jsonl:
            jsonl.close()
    return records
