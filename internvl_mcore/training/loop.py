"""The training loop: megatron-core schedules, DDP, (distributed) optimizer, LR schedule, freezing,
checkpoints, logging. `pretrain_internvl.py` only parses flags into a `RunConfig` and calls `train`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from ..checkpoint import selection
from ..checkpoint.format import checkpoint_dir, read_run_json
from ..config.device import resolve_device
from ..config.rl import RL_STAGES
from ..config.problems import problems, refusal
from ..errors import CheckpointError, ConfigError, DataError, SaveDirRefused
from ..config.model import virtual_pipeline_size
from ..config.training import RunConfig
from ..models.internvl import build_model_chunks
from ..models.lora import add_lora
from ..models.weights import init_weights
from ..parallel.cpu_compat import fuse_cpu_adam
from ..parallel.schedules import forward_backward
from ..parallel.state import comm_device, init_distributed
from . import checkpoint, mpo, save_dir
from .async_save import AsyncWriter
from .batch import Batch
from .balance import trainable_parts
from .data import MockBatches, ShardBatches, build_batches, loss_weights
from .eval import Evaluator, build_valid_batches
from .guards import (
    SpikeGuard,
    TrainingDiverged,
    agreed_stop,
    check_finite,
    fault_point,
    is_collective_failure,
    peer_lost,
)
from .metrics import Reporter
from .preflight import environment_problems
from .moe import reduced_aux_loss
from .rl import stage as rl_stage
from .schedule import build_scheduler, sync_param_groups
from .schedule import restore as restore_schedule
from .stages import Plan, apply_freeze, resolve_stage
from .step import forward_step


def validate(run: RunConfig) -> Plan:
    """Refuse the run before any process group is created: every problem of its flags
    (config/problems.py) and of what they name in this environment; the stage plan it trains."""
    found = problems(run) + environment_problems(run)
    if found:
        raise ConfigError(refusal(found))
    return resolve_stage(run.train)


@dataclass
class Trainer:
    """Everything a step needs, built once by `setup`."""

    run: RunConfig
    plan: Plan
    model: list  # megatron-core DDP-wrapped model chunks (one per virtual stage; one: no interleaving)
    optimizer: Any
    scheduler: Any
    batches: ShardBatches | MockBatches
    num_microbatches: int
    dp_size: int
    pg: ProcessGroupCollection  # the groups init_distributed returned (the model was built on them)
    iteration: int = 0
    reference: Any = None  # --stage mpo, or gspo / grpo with --kl-coeff: the frozen reference (training/mpo.py)
    mpo: Any = None  # --stage mpo: mpo.MPOContext
    evaluator: Optional[Evaluator] = None  # validation data given (training/eval.py)
    spike: Optional[SpikeGuard] = None  # --skip-spike-factor (training/guards.py)
    signalled: bool = False  # stopping on SIGTERM (--exit-signal-handler): no final evaluation
    writer: Optional[AsyncWriter] = None  # --async-save: this rank's checkpoint writer process
    rl: Any = None  # --stage gspo / grpo: training/rl/stage.py's RLRun (`batches` is its prompt order)


def _effective_run(run: RunConfig, plan: Plan) -> RunConfig:
    """The run with the stage's drop path and the --moe-aux-loss-coeff override in the model config."""
    model_cfg = run.model.replace(vision=dataclasses.replace(run.model.vision, drop_path_rate=plan.drop_path_rate))
    if run.train.moe_aux_loss_coeff is not None:
        model_cfg = model_cfg.replace(
            llm=dataclasses.replace(model_cfg.llm, moe_aux_loss_coeff=run.train.moe_aux_loss_coeff)
        )
    return dataclasses.replace(run, model=model_cfg)


def _build_chunks(run: RunConfig, plan: Plan, pg: Any) -> list[torch.nn.Module]:
    """This rank's model chunks (one, or one per virtual stage of the interleaved schedule: Megatron-LM's
    get_model with `vp_stage`) with their weights (seeded init or --pretrained) and frozen parts."""
    t, model_cfg = run.train, run.model
    chunks = build_model_chunks(
        model_cfg, run.parallel, pg, dtype=torch.bfloat16 if t.bf16 else torch.float32, compute=run.compute
    )
    for model in chunks:
        if resolve_device(run.compute.device) == "cuda":  # DDP buffers and schedules live on the current GPU
            model.cuda(torch.cuda.current_device())
        if not run.checkpoint.pretrained:  # --pretrained overwrites every weight: drawing them first is waste
            init_weights(model, model_cfg, seed=t.seed)  # canonical names: each chunk its own layers
        else:
            kind = checkpoint.load_weights(run.checkpoint.pretrained, model, model_cfg)
    if run.checkpoint.pretrained and dist.get_rank() == 0:
        print(f"loaded weights from {kind} {run.checkpoint.pretrained}", flush=True)
    if chunks[0].cp_path and dist.get_rank() == 0:  # which CP attention runs (a fallback is not silent)
        print(chunks[0].cp_path, flush=True)
    return chunks


def _build_model(run: RunConfig, plan: Plan, pg: Any) -> tuple[list[torch.nn.Module], Any]:
    """This rank's model chunks (on the process groups `pg` init_distributed returned) with their weights,
    frozen parts and LoRA, and the frozen reference of --stage mpo / gspo / grpo (MPO, RL and LoRA: one chunk,
    config/problems.py refuses them with the interleaved schedule)."""
    t, model_cfg = run.train, run.model
    chunks = _build_chunks(run, plan, pg)
    model = chunks[0]
    wants_reference = t.stage == "mpo" or (t.stage in RL_STAGES and run.rl.grpo_kl_beta > 0)
    reference = mpo.build_reference(run, model_cfg, model) if wants_reference else None
    for chunk in chunks:
        apply_freeze(chunk, plan)
    if run.lora.enabled:  # LoRA (models/lora.py): every base weight frozen, only the adapters train
        base = os.path.abspath(run.checkpoint.pretrained) if run.checkpoint.pretrained else None
        add_lora(model, run.lora, model_cfg, seed=t.seed, base=base)
        if dist.get_rank() == 0:
            print(
                f"LoRA rank {run.lora.lora_rank} (alpha {run.lora.alpha:g}) on {run.lora.lora_target}: "
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} trainable parameters on "
                "this rank, base weights frozen"
                + ("; the routed experts' linears are not adapted" if model_cfg.llm.is_moe else ""),
                flush=True,
            )
    if reference is not None:
        mpo.mirror_requires_grad(reference, model)
    return chunks, reference


def _wrap(chunks: list, run: RunConfig, plan: Plan, pg: ProcessGroupCollection) -> tuple[list, Any]:
    """megatron-core DDP around each model chunk and their (distributed) optimizer, in the groups `pg`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = run.train
    ddps = [
        DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=t.use_distributed_optimizer
            ),
            module=model,
            disable_bucketing=i > 0,  # as Megatron-LM's get_model: the first chunk's buckets only
            pg_collection=pg,
        )
        for i, model in enumerate(chunks)
    ]
    model = chunks[0]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=plan.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=t.bf16,
            params_dtype=next(model.parameters()).dtype,
            use_distributed_optimizer=t.use_distributed_optimizer,
        ),
        ddps,
        use_gloo_process_groups=False,
        pg_collection=pg,
    )  # gloo groups: only legacy formats use them
    for chunk in chunks:  # the schedules read the first chunk's config; each chunk has its own
        chunk.config.finalize_model_grads_func = finalize_model_grads
        # the interleaved schedule takes one no_sync per chunk (Megatron-LM's list), 1F1B a single one
        chunk.config.no_sync_func = [d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync
    return ddps, optimizer


def setup(run: RunConfig, sampler: Any = None) -> Trainer:
    """Join the job, build this rank's model stage, freeze, load weights, wrap in DDP, build the
    optimizer and LR schedule, and resume from --load. `sampler`: --stage gspo / grpo's rollout
    sampler (inference/rollout.py, which this package may not import)."""
    plan = validate(run)
    run = _effective_run(run, plan)
    t = run.train
    pg = init_distributed(
        run.parallel,
        t.seed,
        timeout_s=t.distributed_timeout_minutes * 60,
        device=run.compute.device,
        virtual_stages=virtual_pipeline_size(run.parallel, run.model.llm.num_layers),
    )
    dp = pg.dp.size()
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}"
        )
    _claim_save_dir(run)
    run = _first_start(run)
    if run.checkpoint.load:  # a failing latest checkpoint falls back before anything reads it
        chosen = selection.select(run.checkpoint.load, no_fallback=run.checkpoint.no_fallback)
        run = dataclasses.replace(run, checkpoint=dataclasses.replace(run.checkpoint, load=str(chosen)))
    # --async-save: the writer process starts before the model is built, so its imports overlap that
    writer = AsyncWriter(timeout_s=t.distributed_timeout_minutes * 60) if run.checkpoint.async_save else None
    if writer is not None:
        writer.start()
    dp_rank, micro = pg.dp.rank(), t.global_batch_size // (t.micro_batch_size * dp)
    _check_interleaved_microbatches(run, micro, dp)
    chunks, reference = _build_model(run, plan, pg)
    ddps, optimizer = _wrap(chunks, run, plan, pg)
    scheduler = build_scheduler(optimizer, t, plan.lr, plan.lr_decay_style)
    rl = rl_stage.make_rl(run, pg, sampler) if t.stage in RL_STAGES else None
    batches = rl.order if rl is not None else build_batches(run, dp_rank, dp, trainable_parts(plan))
    trainer = Trainer(run, plan, ddps, optimizer, scheduler, batches, micro, dp, pg, rl=rl)
    valid = build_valid_batches(run, dp_rank, dp)
    trainer.evaluator = Evaluator(valid, run, micro) if valid is not None else None
    trainer.spike = SpikeGuard(t.skip_spike_factor) if t.skip_spike_factor else None
    trainer.reference = reference
    if t.stage == "mpo":
        trainer.mpo = mpo.make_context(run, pg)
    if run.checkpoint.load:
        _resume(trainer)
    if writer is not None:  # ready before the first step: its start-up is not a save's stall
        trainer.writer = writer
        writer.wait_ready()
    fuse_cpu_adam(optimizer)  # after any load: torch's load_state_dict restores the saved group flags
    return trainer


def _check_interleaved_microbatches(run: RunConfig, micro: int, dp: int) -> None:
    """The interleaved schedule runs the microbatches of a step in groups of PP per model chunk: their
    count must be a multiple of PP (megatron-core's schedule raises otherwise, mid-step)."""
    pp = run.parallel.pipeline_model_parallel_size
    if virtual_pipeline_size(run.parallel, run.model.llm.num_layers) is None or micro % pp == 0:
        return
    t = run.train
    raise ConfigError(
        f"the interleaved pipeline schedule needs microbatches per step (--global-batch-size {t.global_batch_size} / "
        f"(--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}) = {micro}) to be a multiple of "
        f"--pipeline-model-parallel-size {pp}"
    )


def _claim_save_dir(run: RunConfig) -> None:
    """Rank 0 locks --save for the run's lifetime and refuses another run's checkpoints there
    (training/save_dir.py); every rank learns the verdict, so all stop alike (collective)."""
    c = run.checkpoint
    if not c.save:
        return
    verdict: list = [None]
    if dist.get_rank() == 0:
        try:
            for note in save_dir.claim(c.save, c.load, c.overwrite_checkpoints):
                print(note, flush=True)
        except SaveDirRefused as exc:
            verdict[0] = str(exc)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise SaveDirRefused(verdict[0])


def _first_start(run: RunConfig) -> RunConfig:
    """`--load DIR --save DIR` with no checkpoint in DIR yet is the first start of a job that a
    scheduler requeues with the same command: start from scratch, as Megatron-LM does, and say so.
    Only for --load equal to --save: a --load elsewhere that holds nothing is a mistake (an error)."""
    c = run.checkpoint
    if not (c.load and c.save) or Path(c.load).resolve() != Path(c.save).resolve():
        return run
    if selection.holds_checkpoint(c.load):
        return run
    if dist.get_rank() == 0:
        print(f"--load {c.load}: no checkpoint there yet (it is also --save): starting from scratch", flush=True)
    return dataclasses.replace(run, checkpoint=dataclasses.replace(c, load=None))


def _resume(trainer: Trainer) -> None:
    """Load --load (already chosen by `checkpoint/selection.py: select`) into the trainer; the LR schedule follows
    training/schedule.py's rule."""
    run = trainer.run
    path = checkpoint_dir(run.checkpoint.load)
    info = read_run_json(path)
    note = restore_schedule(
        trainer.scheduler,
        info.get("scheduler"),
        run.train,
        str(path),  # ScheduleMismatch: a ConfigError
        info.get("global_batch_size"),
    )
    iteration, data_state, info = checkpoint.load(
        path,
        trainer.model,
        trainer.optimizer,
        None,
        run.model,
        run.parallel,
        trainer.pg,
        load_optim=not run.checkpoint.no_load_optim,
    )
    sync_param_groups(trainer.scheduler)  # after the optimizer state, which brings the checkpoint's max_lr
    trainer.iteration = iteration
    try:
        if data_state is not None:
            trainer.batches.load_state_dict(data_state)
        else:  # another data-parallel size: the same global batches continue, split over this run's ranks
            trainer.batches.load_resharded_state(checkpoint.data_states(path))
    except (DataError, KeyError) as exc:  # the loader names what differs (KeyError: a state of another layout)
        raise ConfigError(
            f"--load {path}: its data position does not fit this run ({exc}): resume with the "
            "checkpoint's --data-path (prefixes and weights) and --seed"
        ) from None
    if trainer.spike is not None and info.get("spike_guard"):
        trainer.spike.load_state_dict(info["spike_guard"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} at iteration {iteration}", flush=True)
        if note:
            print(note, flush=True)


def _step_batches(trainer: Trainer) -> tuple[list[Batch], float]:
    """This step's microbatches with their loss weights, and the T / W scale of `step.loss_func`
    (T target tokens and W total weight over the global batch)."""
    batches = [next(trainer.batches) for _ in range(trainer.num_microbatches)]
    reduction = trainer.run.train.loss_reduction
    if reduction == "token":
        return batches, 1.0
    targets = weight = 0.0
    for b in batches:
        b.loss_weight = loss_weights(b, reduction)
        targets += float(b.targets().sum())
        weight += float(b.loss_weight.sum())
    # a collective's tensor lives where the backend wants it (the current GPU under NCCL)
    totals = torch.tensor([targets, weight], dtype=torch.float64, device=comm_device())
    dist.all_reduce(totals, group=trainer.pg.dp)
    totals = totals.cpu()
    return batches, float(totals[0] / totals[1]) if totals[1] > 0 else 1.0


def _forward_backward(trainer: Trainer, batches: list[Batch], scale: float) -> list[dict]:
    """megatron-core's schedule over the step's microbatches (gradients into the DDP buffers)."""
    t = trainer.run.train
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    step_func = functools.partial(forward_step, scale=scale)
    if trainer.mpo is not None:  # reference log-probs first, then the policy consumes them
        mpo.run_reference(trainer.reference, batches, trainer.mpo, t.seq_length, t.micro_batch_size)
        step_func = functools.partial(mpo.mpo_forward_step, ctx=trainer.mpo)
    return forward_backward(
        trainer.pg,
        forward_step_func=step_func,
        data_iterator=iter(batches),
        model=trainer.model,
        num_microbatches=trainer.num_microbatches,
        seq_length=t.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=False,
    )


def _update(trainer: Trainer, loss: float, losses: list[dict]) -> tuple[Optional[float], bool]:
    """The optimizer and LR-schedule step, unless the loss is non-finite (stop: nothing is applied)
    or a spike (--skip-spike-factor: skipped). Returns (grad norm, skipped)."""
    iteration = trainer.iteration + 1
    check_finite(iteration, loss, None, losses, trainer.model)
    if trainer.spike is not None and trainer.spike.should_skip(loss):
        if dist.get_rank() == 0:
            print(
                f"iteration {iteration}: loss {loss:.6e} > {trainer.spike.factor:g} x running mean "
                f"{trainer.spike.mean():.6e}: update skipped (--skip-spike-factor)",
                flush=True,
            )
        return None, True
    if trainer.writer is not None:  # --async-save: the snapshot of a save in flight is copied before the step
        trainer.writer.join_snapshot()
    _, grad_norm, _ = trainer.optimizer.step()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    check_finite(iteration, loss, grad_norm, losses, trainer.model)
    trainer.scheduler.step(increment=trainer.run.train.global_batch_size)
    return grad_norm, False


def is_last_stage(pg: ProcessGroupCollection) -> bool:
    """Whether this rank holds the last pipeline stage (the one that computes the loss)."""
    return pg.pp.rank() == pg.pp.size() - 1


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
    fault_point("step", trainer.iteration + 1)
    if trainer.rl is not None:  # --stage gspo / grpo: rollouts, then --ppo-epochs optimizer steps
        return rl_stage.train_step(trainer)
    start = time.perf_counter()
    batches, scale = _step_batches(trainer)
    data_s = time.perf_counter() - start
    losses = _forward_backward(trainer, batches, scale)
    aux = reduced_aux_loss(trainer.num_microbatches, trainer.pg) if trainer.run.model.llm.is_moe else None
    pg = trainer.pg
    last = is_last_stage(pg)
    totals = reduce_loss_totals(losses, last, pg.dp_cp, pg.pp).cpu()
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    grad_norm, skipped = _update(trainer, loss, losses)
    trainer.iteration += 1
    extra = {}
    if trainer.mpo is not None:
        extra = mpo.reduce_metrics(losses, last, pg.dp_cp, pg.pp)
        mpo.sync_running(trainer.mpo.running, pg.pp, dist.get_global_rank(pg.pp, pg.pp.size() - 1))
    if trainer.spike is not None:
        extra["skipped"] = skipped
    tokens = sum(int((b.tokens != trainer.run.model.pad_token_id).sum()) for b in batches)
    trainable = trainable_parts(trainer.plan)
    return {
        "loss": loss,
        "grad_norm": grad_norm if grad_norm is not None else float("nan"),
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "tiles": sum(b.images.num_tiles for b in batches) * trainer.dp_size,
        "nonpad_tokens": tokens * trainer.dp_size,
        "trainable": trainable,
        "data_s": data_s,
        # this rank's packed sample lengths, scaled to the job (every DP rank sees a like mix)
        "attention_lengths": [int(n) for b in batches for n in (b.cu_seqlens[1:] - b.cu_seqlens[:-1])]
        * trainer.dp_size,
        "logit_tokens": None if trainer.run.compute.all_token_logits else _loss_tokens(batches) * trainer.dp_size,
        "moe_aux_loss": aux,
        **extra,
    }


def _loss_tokens(batches: list) -> int:
    """Tokens of this rank's microbatches that carry loss: the ones the output layer computes logits for."""
    return sum(int((b.loss_weight != 0).sum()) for b in batches)


def save(trainer: Trainer, final: bool = False) -> None:
    """Checkpoint the current iteration under --save. With --async-save the previous checkpoint is
    published first (waiting for its writers), this one is handed to the writer, and a `final` one
    (the run stops after it) is waited for."""
    run = trainer.run
    extra = {
        "plan": dataclasses.asdict(trainer.plan),
        "global_batch_size": run.train.global_batch_size,
        **(mpo.checkpoint_extra(run, trainer.mpo) if trainer.mpo is not None else {}),
        **(rl_stage.checkpoint_extra(run) if trainer.rl is not None else {}),
    }
    if trainer.spike is not None:
        extra["spike_guard"] = trainer.spike.state_dict()
    finish_saves(trainer, blocking=True)
    checkpoint.save(
        run.checkpoint.save,
        trainer.iteration,
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        run.model,
        run.parallel,
        trainer.pg,
        data_state=trainer.batches.state_dict(),
        extra=extra,
        keep=run.checkpoint.keep_checkpoints,
        writer=trainer.writer,
    )
    if trainer.writer is not None and final:
        finish_saves(trainer, blocking=True)
    elif dist.get_rank() == 0 and trainer.writer is not None:
        print(
            f"checkpoint at iteration {trainer.iteration}: writing to {run.checkpoint.save} in the background "
            "(--async-save)",
            flush=True,
        )
    elif dist.get_rank() == 0:
        print(f"saved checkpoint at iteration {trainer.iteration} to {run.checkpoint.save}", flush=True)


def finish_saves(trainer: Trainer, blocking: bool) -> None:
    """--async-save: publish the checkpoint in flight once every rank has written it (collective)."""
    done = checkpoint.finish_pending(trainer.writer, blocking)
    if done is not None and dist.get_rank() == 0:
        print(f"saved checkpoint at iteration {done} to {trainer.run.checkpoint.save}", flush=True)


def evaluate(trainer: Trainer, reporter: Reporter, final: bool = False) -> None:
    """Validation loss of the current weights, reported (collective)."""
    start, pg = time.perf_counter(), trainer.pg
    totals = torch.zeros(2, dtype=torch.float64)
    for losses in trainer.evaluator.forward(trainer.model):  # one list of microbatch losses per batch
        totals += reduce_loss_totals(losses, is_last_stage(pg), pg.dp_cp, pg.pp).cpu()
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    reporter.report_eval(trainer.iteration, loss, time.perf_counter() - start, final)


def _after_step(trainer: Trainer, reporter: Reporter) -> bool:
    """Evaluation and checkpoint due after this iteration; True when --exit-interval or a SIGTERM
    under --exit-signal-handler (preemption.py: all ranks agree after the same step) stops the run."""
    t, c, it = trainer.run.train, trainer.run.checkpoint, trainer.iteration
    finish_saves(trainer, blocking=False)  # --async-save: publish a finished checkpoint without waiting
    if trainer.evaluator is not None and t.eval_interval and it % t.eval_interval == 0 and it < t.train_iters:
        evaluate(trainer, reporter)
    at_exit = bool(c.exit_interval) and it % c.exit_interval == 0
    signalled = trainer.signalled = c.exit_signal_handler and agreed_stop()
    last = at_exit or signalled or it == t.train_iters
    if c.save and ((c.save_interval and it % c.save_interval == 0) or last):
        save(trainer, final=last)
    if signalled and dist.get_rank() == 0:
        where = f"saved checkpoint at iteration {it} to {c.save}" if c.save else "nothing saved (no --save)"
        print(f"exiting on SIGTERM after iteration {it} (--exit-signal-handler): {where}", flush=True)
    return at_exit or signalled


def train(run: RunConfig, sampler: Any = None) -> list[dict]:
    """Train until --train-iters (or --exit-interval), evaluating on the validation data every
    --eval-interval and once at the end (held out); returns the logged records. `sampler`: see `setup`."""
    try:
        trainer = setup(run, sampler)
    except BaseException:
        save_dir.release_all()
        raise
    run = trainer.run
    reporter = Reporter(run, trainer)
    try:
        while trainer.iteration < run.train.train_iters:
            start = time.perf_counter()
            stats = train_step(trainer)
            reporter.report(trainer.iteration, stats, time.perf_counter() - start)
            if _after_step(trainer, reporter):
                break
        finish_saves(trainer, blocking=True)
        if trainer.evaluator is not None and not trainer.signalled:
            evaluate(trainer, reporter, final=True)
    except BaseException as exc:
        if trainer.writer is not None:  # an error or a signal: a save in flight is abandoned, never published
            trainer.writer.abandon()
        if not isinstance(exc, Exception):
            raise
        if not isinstance(exc, (TrainingDiverged, CheckpointError)) and is_collective_failure(exc):
            raise peer_lost(exc, trainer.iteration, run.train.distributed_timeout_minutes) from exc
        raise
    finally:
        if trainer.writer is not None:
            trainer.writer.stop()
        reporter.close()
        save_dir.release_all()
    return reporter.records
