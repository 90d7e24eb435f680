"""The LR / weight-decay schedule (megatron-core's OptimizerParamScheduler) and what a resume does
with it when the flags differ from the checkpoint's.

Megatron-LM's rule, made explicit: without a flag a resume whose schedule differs from the
checkpoint's is refused (one line naming both values); --override-opt_param-scheduler takes the
flags' schedule, --use-checkpoint-opt_param-scheduler keeps the checkpoint's. The step count always
comes from the checkpoint. Which one happened is printed.
"""

from __future__ import annotations

from typing import Any, Optional

from ..config.training import TrainConfig
from ..errors import ScheduleMismatch

# scheduler state key -> (the flag it comes from, how a state value reads as that flag's value)
SCHEDULE_FLAGS = {
    "max_lr": ("--lr", lambda v, g: v),
    "min_lr": ("--min-lr", lambda v, g: v),
    "lr_warmup_steps": ("--lr-warmup-iters", lambda v, g: v // g),
    "lr_decay_steps": ("--train-iters", lambda v, g: v // g),
    "lr_decay_style": ("--lr-decay-style", lambda v, g: v),
    "start_wd": ("--weight-decay", lambda v, g: v),
}


def build_scheduler(optimizer: Any, t: TrainConfig, lr: float, decay_style: str) -> Any:
    """megatron-core's scheduler in samples (steps x --global-batch-size), as Megatron-LM counts."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    g = t.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters * g,
        lr_decay_steps=max(t.train_iters * g, 1),
        lr_decay_style=decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.train_iters * g, 1),
        wd_incr_style="constant",
        # megatron-core's own checks of these two would assert; `restore` decides before it is asked
        use_checkpoint_opt_param_scheduler=t.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=t.override_opt_param_scheduler,
    )


def differences(
    scheduler: Any, saved: dict, global_batch_size: int, saved_global_batch_size: Optional[int] = None
) -> list[str]:
    """'--flag NEW (checkpoint: OLD)' for each schedule value the flags change. The scheduler counts
    samples (steps x --global-batch-size), so each side is read back with its own batch size: a changed
    --global-batch-size is named as such, not as a changed --train-iters / --lr-warmup-iters."""
    old_g = saved_global_batch_size or global_batch_size
    mine = scheduler.state_dict()
    out = [f"--global-batch-size {global_batch_size} (checkpoint: {old_g})"] if old_g != global_batch_size else []
    for key, (flag, as_flag) in SCHEDULE_FLAGS.items():
        if key not in saved:
            continue
        new, old = as_flag(mine[key], global_batch_size), as_flag(saved[key], old_g)
        if new != old:
            out.append(f"{flag} {new} (checkpoint: {old})")
    return out


def restore(
    scheduler: Any, saved: Optional[dict], t: TrainConfig, where: str, saved_global_batch_size: Optional[int] = None
) -> Optional[str]:
    """Load the checkpoint's schedule state under Megatron-LM's rule; returns the line saying what
    happened (None when nothing differed), raises ScheduleMismatch naming both values otherwise.
    `saved_global_batch_size`: the checkpoint's (run.json; None for checkpoints that predate it)."""
    if saved is None:
        return None
    diffs = differences(scheduler, saved, t.global_batch_size, saved_global_batch_size)
    if diffs and not (t.override_opt_param_scheduler or t.use_checkpoint_opt_param_scheduler):
        steps = any(d.startswith(("--train-iters", "--lr-warmup-iters")) for d in diffs)
        hint = (
            (
                " (or --global-batch-size changed: this checkpoint predates its record of it, and the schedule "
                "counts samples)"
            )
            if steps and saved_global_batch_size is None
            else ""
        )
        raise ScheduleMismatch(
            f"--load {where}: {', '.join(diffs)} differ from the checkpoint's schedule{hint}; give "
            "--override-opt_param-scheduler to use the flags' or --use-checkpoint-opt_param-scheduler to keep "
            "the checkpoint's"
        )
    scheduler.load_state_dict(saved)
    if not diffs:
        return None
    if t.override_opt_param_scheduler:
        return f"LR schedule: --override-opt_param-scheduler: using the flags' {', '.join(diffs)}"
    return (
        f"LR schedule: --use-checkpoint-opt_param-scheduler: keeping the checkpoint's schedule, ignoring "
        f"{', '.join(diffs)}"
    )


def sync_param_groups(scheduler: Any) -> None:
    """Give every optimizer param group the schedule's peak and floor, and set this step's LR.

    megatron-core's scheduler takes each group's `max_lr` / `min_lr` before its own; the optimizer
    config puts the flags' --lr there and loading optimizer state puts back the checkpoint's, so
    after a resume the groups must follow what `restore` chose (all our groups share one schedule)."""
    for group in scheduler.optimizer.param_groups:
        group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
    scheduler.step(increment=0)
