"""--stage gspo / grpo: one iteration = one rollout batch and its --ppo-epochs optimizer steps.

Per iteration, on every data-parallel rank:
1. rollouts: the rank's P / DP prompts (prompts.py: PromptOrder), G = --rollouts-per-prompt responses
   each, sampled by the current policy in the training processes and layout (the `sampler` from
   inference/rollout.py: decode.py's KV-cache decoding over this rank's TP / PP stage; one CPU
   generator seeded from --seed, the iteration and the DP rank, so the draws are the same at every
   TP / PP layout and after a resume);
2. rewards from the verifier (verifiers.py) on the decoded responses, group advantages (advantages.py);
3. each response packed as its own sequence (prompt + response, the response tokens the targets);
   the old log-probs from a forward-only pass of the policy, the reference's (--kl-coeff > 0) from one
   of the frozen reference (built as MPO's: training/mpo.py), both through megatron-core's schedule;
4. --ppo-epochs optimizer steps over the same microbatches, each a forward/backward through
   megatron-core's schedule with step.py's `rl_forward_step` (the first one on-policy: ratio exactly
   1, nothing clipped); the LR schedule advances once per iteration.

The data position (prompts consumed) is the loader state of a checkpoint; the rollout seed is a
function of --seed and the iteration, so a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ...config.rl import clip_range
from ...data.sample import PackedSample
from ...errors import DataError
from ...parallel.schedules import forward_backward
from ...parallel.state import comm_device
from .. import mpo
from ..batch import Batch
from ..guards import check_finite
from ..step import batch_for_stage, run_model
from .advantages import group_advantages
from .losses import PolicyLossConfig
from .prompts import PromptOrder, open_prompts, rollout_seed
from .step import RLContext, Rollouts, reduce_metrics, rl_forward_step
from .verifiers import make_verifier


@dataclass
class RLRun:
    """What the stage needs besides the trainer: prompts, the sampler, the verifier, the loss."""

    records: Sequence[Any]
    order: PromptOrder
    sampler: Any  # inference/rollout.py: RolloutSampler
    verifier: Callable[[str, str, dict], float]
    ctx: RLContext
    where: str


def make_rl(run, pg, sampler: Any) -> RLRun:
    """The stage's state on this rank (after the process groups exist)."""
    if sampler is None:
        raise RuntimeError("--stage gspo / grpo: train() needs the rollout sampler (pretrain_internvl.py gives it)")
    rl, t = run.rl, run.train
    level = "sequence" if t.stage == "gspo" else "token"
    low, high = clip_range(rl, level)
    path = run.data.data_path[0]
    records = open_prompts(path)
    order = PromptOrder(records, t.seed, t.global_batch_size // rl.grpo_group_size, pg.dp.rank(), pg.dp.size())
    ctx = RLContext(
        PolicyLossConfig(level, low, high, rl.grpo_kl_beta), cp_group=pg.cp, first_cp_rank=pg.cp.rank() == 0
    )
    return RLRun(records, order, sampler, make_verifier(rl.reward, rl.reward_fn), ctx, f"--data-path {path}")


def checkpoint_extra(run) -> dict:
    """run.json's part for a resume: the stage, its rollout seed and where the reference came from."""
    start = run.checkpoint.pretrained
    if run.checkpoint.load:
        start = mpo.saved_state(run.checkpoint.load).get("mpo_reference")
    return {
        "rl": {"stage": run.train.stage, "rollout_seed": run.train.seed},
        "mpo_reference": os.path.abspath(start) if start else None,
    }


def _pack(prompt: Any, response: list[int], pad_id: int) -> PackedSample:
    """One response as its own sequence: the prompt then the response, whose tokens are the targets."""
    tokens = np.asarray(list(prompt.tokens) + list(response), dtype=np.int64)
    mask = np.zeros(len(tokens), dtype=np.float32)
    mask[len(prompt.tokens) :] = 1.0  # the collate shifts: position i predicts token i + 1
    tiles = np.asarray(prompt.tiles, dtype=np.float32)
    return PackedSample(
        tokens=tokens,
        loss_mask=mask,
        position_ids=np.arange(len(tokens), dtype=np.float32),
        cu_seqlens=np.array([0, len(tokens)], dtype=np.int32),
        tiles=tiles,
        num_tiles=np.array([tiles.shape[0]] if tiles.shape[0] else [], dtype=np.int32),
    )


def _segment_advantages(batch: Batch, adv: torch.Tensor) -> torch.Tensor:
    """(N,) advantage per cu_seqlens segment: each row's response, then 0 for its padding tail."""
    out = []
    rows, seq = batch.tokens.shape
    bounds = batch.cu_seqlens.tolist()
    for b in range(rows):
        starts = [s for s in bounds[:-1] if b * seq <= s < (b + 1) * seq]
        out += [float(adv[b])] + [0.0] * (len(starts) - 1)
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class RolloutBatch:
    """One step's rollouts on this rank, as microbatches."""

    batches: list[Batch]
    advantages: list[torch.Tensor]
    rewards: torch.Tensor
    response_tokens: int
    seconds: float


def rollout(trainer: Any) -> RolloutBatch:
    """Sample this rank's responses, score them and pack them into the step's microbatches."""
    rl, run, state = trainer.run.rl, trainer.run, trainer.rl
    t, start = run.train, time.perf_counter()
    records = [state.records[i] for i in state.order.next_step()]
    prompts = [state.sampler.prompt(r, f"{state.where}: prompt {r.id}") for r in records]
    for r, p in zip(records, prompts):
        if len(p.tokens) + rl.max_new_tokens > t.seq_length:
            raise DataError(
                f"{state.where}: prompt {r.id} has {len(p.tokens)} tokens: with --max-new-tokens "
                f"{rl.max_new_tokens} it does not fit --seq-length {t.seq_length}"
            )
    module = trainer.model[0].module
    seed = rollout_seed(t.seed, trainer.iteration + 1, trainer.pg.dp.rank())
    responses = state.sampler.sample(
        module, trainer.pg, prompts, rl.grpo_group_size, rl.max_new_tokens, rl.temperature, rl.top_p, seed
    )
    seconds = time.perf_counter() - start
    group = rl.grpo_group_size
    rewards = torch.tensor(
        [
            state.verifier(state.sampler.decode(resp), records[i // group].answer, dict(records[i // group].meta))
            for i, resp in enumerate(responses)
        ],
        dtype=torch.float64,
    )
    adv = group_advantages(rewards, group).values
    packs = [_pack(prompts[i // group], resp, run.model.pad_token_id) for i, resp in enumerate(responses)]
    mbs = t.micro_batch_size
    batches, advs = [], []
    for m in range(0, len(packs), mbs):
        batch = Batch.from_packs(packs[m : m + mbs], t.seq_length, run.model.pad_token_id)
        batches.append(batch)
        advs.append(_segment_advantages(batch, adv[m : m + mbs]))
    return RolloutBatch(batches, advs, rewards, sum(len(r) for r in responses), seconds)


def _logp_loss(out: list, per_token_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Record the microbatch's per-token log-probs (the dtype rl_loss_func computes them in); no loss."""
    out.append(-per_token_loss.detach().to(torch.promote_types(per_token_loss.dtype, torch.float32)))
    zero = torch.zeros((), device=per_token_loss.device)
    return zero, torch.tensor(0, dtype=torch.int, device=per_token_loss.device), {}


def _logp_forward_step(data_iterator, model: torch.nn.Module, out: list):
    batch = batch_for_stage(next(data_iterator), model)
    output, _ = run_model(model, batch)
    return output, functools.partial(_logp_loss, out)


def target_logps(model: list, pg, batches: list[Batch], seq_length: int, micro_batch_size: int) -> list:
    """(B, S) log-probs of each microbatch's targets under `model` (forward-only through megatron-core's
    schedule); on the last pipeline stage, a list of None elsewhere."""
    out: list = []
    with torch.no_grad():
        forward_backward(
            pg,
            forward_step_func=functools.partial(_logp_forward_step, out=out),
            data_iterator=iter(batches),
            model=model,
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    return out if out else [None] * len(batches)


def _optimizer_step(trainer: Any, iteration: int, loss: float, losses: list) -> Optional[float]:
    """One optimizer step (the loss and gradient norm checked finite); returns the gradient norm."""
    check_finite(iteration, loss, None, losses, trainer.model)
    if trainer.writer is not None:  # --async-save: a save in flight copies its snapshot first
        trainer.writer.join_snapshot()
    _, grad_norm, _ = trainer.optimizer.step()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    check_finite(iteration, loss, grad_norm, losses, trainer.model)
    return grad_norm


def policy_epochs(trainer: Any, batches: list[Batch], rollouts: list[Rollouts]) -> tuple[list[dict], list]:
    """--ppo-epochs optimizer steps over the same microbatches; each epoch's metrics and grad norm."""
    t, pg = trainer.run.train, trainer.pg
    last = pg.pp.rank() == pg.pp.size() - 1
    epochs, norms = [], []
    for _ in range(trainer.run.rl.grpo_iterations):
        trainer.model[0].zero_grad_buffer()
        trainer.optimizer.zero_grad()
        losses = forward_backward(
            pg,
            forward_step_func=functools.partial(rl_forward_step, ctx=trainer.rl.ctx),
            data_iterator=iter(list(zip(batches, rollouts))),
            model=trainer.model,
            num_microbatches=len(batches),
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        metrics = reduce_metrics(losses, last, pg.dp_cp, pg.pp)
        norms.append(_optimizer_step(trainer, trainer.iteration + 1, metrics["loss"], losses))
        epochs.append(metrics)
    trainer.scheduler.step(increment=t.global_batch_size)
    return epochs, norms


def _reward_stats(rewards: torch.Tensor, response_tokens: int, seconds: float, dp_group) -> dict:
    """Reward mean / std and accuracy over the global batch, response tokens and the slowest rollout."""
    r = rewards.to(torch.float64)
    sums = torch.tensor(
        [float(r.sum()), float((r * r).sum()), float(r.numel()), float((r >= 1.0).sum()), float(response_tokens)],
        dtype=torch.float64,
        device=comm_device(),
    )
    slowest = torch.tensor([seconds], dtype=torch.float64, device=comm_device())
    if dp_group is not None and dp_group.size() > 1:
        dist.all_reduce(sums, group=dp_group)
        dist.all_reduce(slowest, group=dp_group, op=dist.ReduceOp.MAX)
    total, squares, n, right, tokens = (float(v) for v in sums.cpu())
    mean = total / n
    var = (squares - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return {
        "reward_mean": mean,
        "reward_std": max(var, 0.0) ** 0.5,
        "reward_accuracy": right / n,
        "rl_response_length": tokens / n,
        "rl_rollout_s": float(slowest[0]),
        "rl_rollout_tokens_per_s": tokens / max(float(slowest[0]), 1e-9),
    }


def _trainable(plan: Any) -> list[str]:
    """The parts this run trains (the FLOP count's backward share), as training/loop.py logs them."""
    parts = (
        ("vision", plan.train_vit or plan.unfreeze_vit_layers > 0),
        ("projector", plan.train_projector),
        ("llm", plan.train_llm),
    )
    return [part for part, on in parts if on]


def train_step(trainer: Any) -> dict:
    """One iteration of --stage gspo / grpo (module docstring); the record the loop logs."""
    t, pg = trainer.run.train, trainer.pg
    batch = rollout(trainer)
    start = time.perf_counter()
    old = target_logps(trainer.model, pg, batch.batches, t.seq_length, t.micro_batch_size)
    ref = [None] * len(old)
    if trainer.reference is not None:
        ref = target_logps(
            [trainer.reference], trainer.reference.pg_collection, batch.batches, t.seq_length, t.micro_batch_size
        )
    rollouts = [Rollouts(o, a, r) for o, a, r in zip(old, batch.advantages, ref)]
    epochs, norms = policy_epochs(trainer, batch.batches, rollouts)
    trainer.iteration += 1
    first, final = epochs[0], epochs[-1]
    stats = _reward_stats(batch.rewards, batch.response_tokens, batch.seconds, pg.dp)
    stats.update(
        rl_train_s=time.perf_counter() - start,
        rl_ratio=first["ratio_mean"],
        rl_clip_fraction=first["clip_fraction"],
        rl_kl=first["kl"],
        rl_ratio_last=final["ratio_mean"],
        rl_clip_fraction_last=final["clip_fraction"],
        rl_kl_last=final["kl"],
    )
    batches, dp = batch.batches, trainer.dp_size
    return {
        "loss": first["loss"],
        "grad_norm": norms[0] if norms[0] is not None else float("nan"),
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "tiles": sum(b.images.num_tiles for b in batches) * dp,
        "nonpad_tokens": sum(int((b.tokens != trainer.run.model.pad_token_id).sum()) for b in batches) * dp,
        "trainable": _trainable(trainer.plan),
        "data_s": batch.seconds,
        "attention_lengths": [int(n) for b in batches for n in (b.cu_seqlens[1:] - b.cu_seqlens[:-1])] * dp,
        "logit_tokens": None,
        "moe_aux_loss": None,
        **stats,
    }
