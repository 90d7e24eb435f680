"""The training loop: megatron-core schedules, DDP, (distributed) optimizer, LR schedule, freezing,
checkpoints, logging. `pretrain_internvl.py` only parses flags into a `RunConfig` and calls `train`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.utils import unwrap_model

from ..config.lora import lora_problems
from ..config.training import RunConfig
from ..parallel.context_parallel_thd import check_thd_layout
from ..parallel.cpu_compat import fuse_cpu_adam
from ..parallel.device import resolve_device
from ..parallel.state import comm_device, init_distributed
from . import checkpoint, mpo
from .batch import Batch
from .data import MockBatches, ShardBatches, build_batches, loss_weights
from .metrics import Reporter
from .moe import moe_problems, reduced_aux_loss
from .stages import Plan, apply_freeze, resolve
from .step import forward_step


class ConfigError(ValueError):
    """A flag combination that cannot work; the message names the flags."""


def mpo_problems(run: RunConfig) -> list[str]:
    """Flags --stage mpo cannot work with (and MPO flags without it)."""
    t = run.train
    if t.stage != "mpo":
        changed = t.mpo_beta != 0.1 or list(t.mpo_loss_weights) != [0.8, 0.2, 1.0]
        return ["--mpo-beta / --mpo-loss-weights apply to --stage mpo only"] if changed else []
    problems = []
    if len(t.mpo_loss_weights) != 3 or min(t.mpo_loss_weights) < 0:
        problems.append(f"--mpo-loss-weights takes three weights P Q G >= 0, got {t.mpo_loss_weights}")
    if not t.mpo_beta > 0:
        problems.append(f"--mpo-beta must be > 0, got {t.mpo_beta}")
    if t.loss_reduction != "token":
        problems.append("--loss-reduction does not apply to --stage mpo (its loss is a mean over pairs)")
    if run.data.mock_data:
        problems.append("--stage mpo needs preference shards (--data-path from tools/preprocess_mm_data.py "
                        "--preference); --mock-data has no pairs")
    return problems


def validate(run: RunConfig) -> Plan:
    """Refuse contradictory flags before any process group is created."""
    t, p, c = run.train, run.parallel, run.checkpoint
    problems = []
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    cp = p.context_parallel_size
    if cp > 1 and t.seq_length % (2 * cp):
        problems.append(f"--seq-length {t.seq_length} must be divisible by 2 x --context-parallel-size = {2 * cp}")
    if cp > 1 and p.cp_comm_type == "a2a+p2p":
        sizes = p.hierarchical_context_parallel_sizes
        if not sizes or len(sizes) != 2 or sizes[0] * sizes[1] != cp:
            problems.append(f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A P with A x P = {cp}")
    if cp > 1 and p.cp_comm_type in ("a2a", "a2a+p2p"):
        a = cp if p.cp_comm_type == "a2a" else (p.hierarchical_context_parallel_sizes or [cp])[0]
        tp = p.tensor_model_parallel_size
        for flag, heads in (("heads", run.model.llm.num_attention_heads), ("kv heads", run.model.llm.num_query_groups)):
            if (heads // tp) % a:
                problems.append(f"--cp-comm-type {p.cp_comm_type}: {flag} per TP rank ({heads // tp}) not divisible "
                                f"by the all-to-all size {a}")
    if cp > 1 and p.cp_split == "thd":
        problems += check_thd_layout(p.pipeline_model_parallel_size, p.sequence_parallel, p.cp_comm_type)
    if p.cross_entropy_chunk_size < 0:
        problems.append(f"--cross-entropy-chunk-size must be >= 0 (0: no chunking), got {p.cross_entropy_chunk_size}")
    if p.hierarchical_context_parallel_sizes and p.cp_comm_type != "a2a+p2p":
        problems.append("--hierarchical-context-parallel-sizes only applies to --cp-comm-type a2a+p2p")
    if t.lr_warmup_iters > t.train_iters:
        problems.append(f"--lr-warmup-iters {t.lr_warmup_iters} exceeds --train-iters {t.train_iters}")
    if c.load and c.pretrained:
        problems.append("--load resumes a run and --pretrained starts one: give one of them")
    if c.save_interval and not c.save:
        problems.append("--save-interval needs --save DIR")
    if run.data.mock_data and run.data.data_path:
        problems.append("--mock-data and --data-path exclude each other")
    problems += mpo_problems(run)
    if t.micro_batch_size < 1 or t.global_batch_size < t.micro_batch_size:
        problems.append(f"--global-batch-size {t.global_batch_size} must be >= --micro-batch-size {t.micro_batch_size} >= 1")
    try:
        plan = resolve(t, run.model.vision.num_layers)
    except ValueError as exc:
        problems.append(str(exc))
        plan = None
    problems += moe_problems(run.model, p)
    problems += lora_problems(run.lora, {"vit": t.freeze_vit, "llm": t.freeze_llm, "projector": t.freeze_projector},
                              t.unfreeze_vit_layers)
    if problems:
        raise ConfigError("refusing to start:\n  " + "\n  ".join(problems))
    return plan


@dataclass
class Trainer:
    """Everything a step needs, built once by `setup`."""

    run: RunConfig
    plan: Plan
    model: list  # megatron-core DDP-wrapped model chunks (one: no virtual pipeline)
    optimizer: Any
    scheduler: Any
    batches: ShardBatches | MockBatches
    num_microbatches: int
    dp_size: int
    iteration: int = 0
    reference: Any = None  # --stage mpo: the frozen reference model (training/mpo.py)
    mpo: Any = None  # --stage mpo: mpo.MPOContext


def setup(run: RunConfig) -> Trainer:
    """Join the job, build this rank's model stage, freeze, load weights, wrap in DDP, build the
    optimizer and LR schedule, and resume from --load."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ..models.internvl import build_model
    from ..models.weights import init_weights

    plan = validate(run)
    model_cfg = run.model.replace(vision=dataclasses.replace(run.model.vision, drop_path_rate=plan.drop_path_rate))
    if run.train.moe_aux_loss_coeff is not None:
        model_cfg = model_cfg.replace(llm=dataclasses.replace(model_cfg.llm, moe_aux_loss_coeff=run.train.moe_aux_loss_coeff))
    run = dataclasses.replace(run, model=model_cfg)
    t = run.train
    pg = init_distributed(run.parallel, t.seed)
    dp = parallel_state.get_data_parallel_world_size()
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                          f"{t.micro_batch_size} x data-parallel size {dp}")
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    model = build_model(model_cfg, run.parallel, pg, dtype=dtype)
    if resolve_device(run.parallel.device) == "cuda":  # DDP buffers and schedules live on the current GPU
        model.cuda(torch.cuda.current_device())
    if not run.checkpoint.pretrained:  # --pretrained overwrites every weight: drawing them first is waste
        init_weights(model, model_cfg, seed=t.seed)
    else:
        kind = checkpoint.load_weights(run.checkpoint.pretrained, model, model_cfg)
        if dist.get_rank() == 0:
            print(f"loaded weights from {kind} {run.checkpoint.pretrained}", flush=True)
    reference = mpo.build_reference(run, model_cfg, model) if t.stage == "mpo" else None
    apply_freeze(model, plan)
    if run.lora.enabled:  # LoRA (models/lora.py): every base weight frozen, only the adapters train
        from ..models.lora import add_lora

        base = os.path.abspath(run.checkpoint.pretrained) if run.checkpoint.pretrained else None
        add_lora(model, run.lora, model_cfg, seed=t.seed, base=base)
        if dist.get_rank() == 0:
            print(f"LoRA rank {run.lora.lora_rank} (alpha {run.lora.alpha:g}) on {run.lora.lora_target}: "
                  f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} trainable parameters on "
                  "this rank, base weights frozen", flush=True)
    if reference is not None:
        mpo.mirror_requires_grad(reference, model)
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=t.use_distributed_optimizer),
        module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=plan.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                        clip_grad=t.clip_grad, bf16=t.bf16, params_dtype=dtype,
                        use_distributed_optimizer=t.use_distributed_optimizer),
        [ddp])
    g = t.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=plan.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters * g,
        lr_decay_steps=max(t.train_iters * g, 1), lr_decay_style=plan.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=max(t.train_iters * g, 1),
        wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    batches = build_batches(run, parallel_state.get_data_parallel_rank(), dp)
    trainer = Trainer(run, plan, [ddp], optimizer, scheduler, batches, g // (t.micro_batch_size * dp), dp)
    if reference is not None:
        trainer.reference, trainer.mpo = reference, mpo.make_context(run)
    if run.checkpoint.load:
        iteration, data_state = checkpoint.load(run.checkpoint.load, ddp, optimizer, scheduler, model_cfg,
                                                run.parallel, load_optim=not run.checkpoint.no_load_optim)
        trainer.iteration = iteration
        if data_state is not None:
            batches.load_state_dict(data_state)
        if dist.get_rank() == 0:
            print(f"resumed from {run.checkpoint.load} at iteration {iteration}", flush=True)
    fuse_cpu_adam(optimizer)  # after any load: torch's load_state_dict restores the saved group flags
    return trainer


def _step_batches(trainer: Trainer) -> tuple[list[Batch], float]:
    """This step's microbatches with their loss weights, and the T / W scale of `step.loss_func`
    (T target tokens and W total weight over the global batch)."""
    from megatron.core import parallel_state

    batches = [next(trainer.batches) for _ in range(trainer.num_microbatches)]
    reduction = trainer.run.train.loss_reduction
    if reduction == "token":
        return batches, 1.0
    targets = weight = 0.0
    for b in batches:
        b.loss_weight = loss_weights(b, reduction)
        targets += float(b.loss_mask.sum())
        weight += float(b.loss_weight.sum())
    # a collective's tensor lives where the backend wants it (the current GPU under NCCL)
    totals = torch.tensor([targets, weight], dtype=torch.float64, device=comm_device())
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    totals = totals.cpu()
    return batches, float(totals[0] / totals[1]) if totals[1] > 0 else 1.0


def reduce_loss_totals(losses: list[dict], last_stage: bool, dp_cp_group: Any, pp_group: Any) -> torch.Tensor:
    """[sum of weighted losses, total weight] of the step, identical on every rank, on `comm_device()`.

    The loss lives on the last pipeline stage: summed over microbatches and data- and
    context-parallel ranks (each CP rank holds part of every sequence's tokens), then handed to
    every pipeline stage so any rank can log. The microbatch losses may sit on another device than
    the collectives need; they are moved, never the other way round."""
    device = comm_device()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if last_stage:
        for item in losses:
            totals += item["lm loss"].detach().to(device=device, dtype=torch.float64)
        dist.all_reduce(totals, group=dp_cp_group)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(totals, group=pp_group)
    return totals


def train_step(trainer: Trainer) -> dict:
    """One optimizer step over `num_microbatches` microbatches; returns loss/grad-norm/lr."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t = trainer.run.train
    ddp = trainer.model[0]
    batches, scale = _step_batches(trainer)
    ddp.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    step_func = functools.partial(forward_step, cp_split=unwrap_model(ddp).cp_split, scale=scale)
    if trainer.mpo is not None:  # reference log-probs first, then the policy consumes them
        mpo.run_reference(trainer.reference, batches, trainer.mpo, t.seq_length, t.micro_batch_size)
        step_func = functools.partial(mpo.mpo_forward_step, ctx=trainer.mpo)
    losses = get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=iter(batches),
        model=trainer.model, num_microbatches=trainer.num_microbatches, seq_length=t.seq_length,
        micro_batch_size=t.micro_batch_size, forward_only=False)
    aux = reduced_aux_loss(trainer.num_microbatches) if trainer.run.model.llm.is_moe else None
    _, grad_norm, _ = trainer.optimizer.step()
    trainer.scheduler.step(increment=t.global_batch_size)
    trainer.iteration += 1
    totals = reduce_loss_totals(losses, parallel_state.is_pipeline_last_stage(),
                                parallel_state.get_data_parallel_group(with_context_parallel=True),
                                parallel_state.get_pipeline_model_parallel_group()).cpu()
    extra = {}
    if trainer.mpo is not None:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        extra = mpo.reduce_metrics(losses, parallel_state.is_pipeline_last_stage(),
                                   parallel_state.get_data_parallel_group(with_context_parallel=True), pp_group)
        mpo.sync_running(trainer.mpo.running, pp_group, parallel_state.get_pipeline_model_parallel_last_rank())
    tokens = sum(int((b.tokens != trainer.run.model.pad_token_id).sum()) for b in batches)
    plan = trainer.plan
    trainable = [part for part, on in (("vision", plan.train_vit or plan.unfreeze_vit_layers > 0),
                                       ("projector", plan.train_projector), ("llm", plan.train_llm)) if on]
    return {"loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "tiles": sum(int(b.pixel_values.shape[0]) for b in batches) * trainer.dp_size,
            "nonpad_tokens": tokens * trainer.dp_size, "trainable": trainable,
            # this rank's packed sample lengths, scaled to the job (every DP rank sees a like mix)
            "attention_lengths": [int(n) for b in batches for n in (b.cu_seqlens[1:] - b.cu_seqlens[:-1])] * trainer.dp_size,
            "moe_aux_loss": aux, **extra}


def save(trainer: Trainer) -> None:
    """Checkpoint the current iteration under --save."""
    run = trainer.run
    checkpoint.save(run.checkpoint.save, trainer.iteration, trainer.model[0], trainer.optimizer,
                    trainer.scheduler, run.model, run.parallel, data_state=trainer.batches.state_dict(),
                    extra={"plan": dataclasses.asdict(trainer.plan),
                           **(mpo.checkpoint_extra(run, trainer.mpo) if trainer.mpo is not None else {})})
    if dist.get_rank() == 0:
        print(f"saved checkpoint at iteration {trainer.iteration} to {run.checkpoint.save}", flush=True)


def train(run: RunConfig) -> list[dict]:
    """Train until --train-iters (or --exit-interval); returns the logged records."""
    trainer = setup(run)
    run = trainer.run
    t, c = run.train, run.checkpoint
    reporter = Reporter(run, trainer)
    try:
        while trainer.iteration < t.train_iters:
            start = time.perf_counter()
            stats = train_step(trainer)
            reporter.report(trainer.iteration, stats, time.perf_counter() - start)
            at_exit = bool(c.exit_interval) and trainer.iteration % c.exit_interval == 0
            if c.save and ((c.save_interval and trainer.iteration % c.save_interval == 0)
                           or at_exit or trainer.iteration == t.train_iters):
                save(trainer)
            if at_exit:
                break
    finally:
        reporter.close()
    return reporter.records
