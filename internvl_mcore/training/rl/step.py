"""The GSPO / GRPO loss as megatron-core's schedules call it: a forward step and its loss function,
wired like MPO's (training/mpo.py), so the same code runs on every layout; stage.py feeds it.

The loss function receives this rank's per-token cross entropy of the sampled response tokens (last
pipeline stage; TP: megatron-core's vocab-parallel cross entropy; CP: this rank's tokens, picked by the
microbatch's `TokenSplit`), so the policy's log-probs are `-per_token_loss`. It returns the summed
per-response losses of the microbatch and the response count (on CP rank 0 only: every CP rank holds
the same per-response values, losses.py); megatron-core (`calculate_per_token_loss`) adds the counts
over microbatches and data-parallel ranks and divides the gradients by that total once, so the step
minimizes the mean loss over the responses of the global batch.

The rollout loop that samples responses and fills `Rollouts` is stage.py (docs/rl.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ...parallel.context_parallel import TokenSplit
from ...parallel.state import comm_device
from ..batch import Batch
from ..mpo import segment_ids
from ..step import batch_for_stage, run_model
from .losses import PolicyLossConfig, policy_loss

METRICS = ("ratio_mean", "kl", "clipped_tokens", "response_tokens")
"""Summed per microbatch (the first two over responses, the last two over tokens), besides the loss."""


@dataclass
class Rollouts:
    """What the policy step of one microbatch needs besides the `Batch` (a response per cu_seqlens
    segment, its sampled tokens the targets, i.e. `loss_weight` nonzero)."""

    old_logps: torch.Tensor
    """(B, S) log-probs of the target tokens under the policy that sampled them (any value elsewhere)."""
    advantages: torch.Tensor
    """(N,) advantage of each cu_seqlens segment (ignored for segments without target tokens)."""
    ref_logps: Optional[torch.Tensor] = None
    """(B, S) the frozen reference's log-probs of the target tokens (needed when --kl-coeff > 0)."""


@dataclass
class RLContext:
    """The loss's hyper-parameters and this rank's context-parallel group."""

    loss: PolicyLossConfig
    cp_group: Optional[dist.ProcessGroup] = None
    first_cp_rank: bool = True


def rl_loss_func(
    batch: Batch, split: TokenSplit, rollouts: Rollouts, ctx: RLContext, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Summed GSPO / GRPO loss of this microbatch's responses, their count and the logged sums."""
    device = per_token_loss.device
    mask = batch.targets()
    seg = segment_ids(batch.cu_seqlens.to(device), mask.shape)
    num = batch.cu_seqlens.numel() - 1
    ref = split.split(rollouts.ref_logps.to(device)) if rollouts.ref_logps is not None else None
    # float32 at least (bf16 log-probs would round the ratios); float64 stays float64 (the tests)
    logp = -per_token_loss.to(torch.promote_types(per_token_loss.dtype, torch.float32))
    terms = policy_loss(
        logp,
        split.split(rollouts.old_logps.to(device)),
        split.split(mask.to(device)),
        split.split(seg),
        num,
        rollouts.advantages,
        ctx.loss,
        ref_logp=ref,
        cp_group=ctx.cp_group,
    )
    valid = terms.valid
    loss = terms.loss[valid].sum()
    keep = 1.0 if ctx.first_cp_rank else 0.0  # every CP rank holds the same per-response values: log once
    n = valid.sum()
    logged = (
        torch.stack(
            [
                loss.detach(),
                terms.ratio[valid].sum(),
                terms.kl[valid].sum(),
                terms.clipped_tokens[valid].sum(),
                terms.n_tokens[valid].sum(),
                n.to(loss.dtype),
            ]
        )
        * keep
    )
    count = (n * int(keep)).to(torch.int)
    return loss, count, {"lm loss": torch.stack([logged[0], logged[-1]]), "rl": logged[1:-1]}


def rl_forward_step(
    data_iterator: Iterator[tuple[Batch, Rollouts]], model: torch.nn.Module, ctx: RLContext
) -> tuple[torch.Tensor, Callable]:
    """The policy's forward step: the iterator yields each microbatch with its rollout tensors."""
    source, rollouts = next(data_iterator)
    batch = batch_for_stage(source, model)
    output, split = run_model(model, batch)
    return output, functools.partial(rl_loss_func, batch, split, rollouts, ctx)


def reduce_metrics(losses: list[dict], is_last_stage: bool, dp_cp_group, pp_group) -> dict:
    """Step metrics on every rank: mean loss, ratio and KL over the global batch's responses, the
    clip fraction (clipped / response tokens) and the mean response length."""
    # NCCL reduces only GPU tensors (docs/gpu.md): the totals live on the communication device
    totals = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=comm_device())
    if is_last_stage:
        for item in losses:
            totals += torch.cat([item["lm loss"][:1], item["rl"], item["lm loss"][1:]]).to(totals.device, torch.float64)
        if dp_cp_group is not None:
            dist.all_reduce(totals, group=dp_cp_group)
    if pp_group is not None and pp_group.size() > 1:
        dist.all_reduce(totals, group=pp_group)
    loss, ratio, kl, clipped, tokens, n = (float(v) for v in totals.cpu())

    def per(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    return {
        "loss": per(loss, n),
        "ratio_mean": per(ratio, n),
        "kl": per(kl, n),
        "clip_fraction": per(clipped, tokens),
        "response_length": per(tokens, n),
    }
