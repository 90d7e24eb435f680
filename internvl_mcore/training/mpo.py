"""Mixed Preference Optimization (InternVL 2.5/3/3.5's last stage), on any parallel layout.

Per pair (chosen c, rejected r; log-probs are sums over the response tokens, policy pi, frozen reference ref):

    x_c = logp_pi(c) - logp_ref(c)        x_r = logp_pi(r) - logp_ref(r)
    preference  = -log sigmoid(beta * (x_c - x_r))                          (TRL 'sigmoid', label_smoothing 0)
    quality     = -log sigmoid(beta * x_c - delta) - log sigmoid(-(beta * x_r - delta))       (TRL 'bco_pair')
    generation  = -logp_pi(c) / n_c     (InternVL's nll_loss: token mean of the chosen response's cross entropy)
    loss        = P * preference + Q * quality + G * generation             (--mpo-loss-weights P Q G)

and the step minimizes the mean over the pairs of the global batch. InternVL (trl 0.10.1) takes the
cross-entropy mean over the chosen tokens of a per-device batch; its MPO scripts use one pair per device,
which is the per-pair mean here (independent of how pairs are packed).

delta is TRL's RunningMoments mean of the rewards beta * x: after each microbatch it absorbs the mean of
(beta*x_c + beta*x_r)/2 over that microbatch's pairs on all data-parallel ranks (count = pairs), and the
updated mean is used for that microbatch, as TRL updates it before computing the loss (one pair per device
makes the two identical). It lives in `RunningMean` and is saved in checkpoints.

Layouts: each rank's per-token losses come from megatron-core's vocab-parallel cross entropy (TP); the
per-sequence sums are formed on the last pipeline stage (PP), over this context-parallel rank's tokens and
completed by an all-reduce over the CP group whose gradient flows through the local part only (CP).
The reference model is a frozen copy of the policy with the same sharding, run forward-only through
megatron-core's pipeline schedule before the policy's forward/backward in the same step.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection

from ..checkpoint.format import checkpoint_dir
from ..errors import CheckpointError
from ..models.internvl import build_model
from ..parallel.context_parallel import TokenSplit
from ..parallel.schedules import forward_backward
from ..parallel.state import comm_device
from . import checkpoint
from .batch import Batch
from .step import batch_for_stage, run_model

METRICS = (
    "loss_preference",
    "loss_quality",
    "loss_generation",
    "rewards_chosen",
    "rewards_rejected",
    "reward_margin",
    "reward_accuracy",
)


@dataclass
class RunningMean:
    """TRL's RunningMoments, the part BCO uses: a count-weighted running mean (count starts at 1e-24)."""

    mean: float = 0.0
    count: float = 1e-24

    def update(self, total: float, n: float) -> None:
        """Absorb n values summing to `total`."""
        if n <= 0:
            return
        delta = total / n - self.mean
        tot = self.count + n
        self.mean += delta * n / tot
        self.count = tot

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


def segment_ids(cu_seqlens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B, S) index of the cu_seqlens segment every token belongs to."""
    n = int(shape[0] * shape[1])
    return torch.bucketize(torch.arange(n, device=cu_seqlens.device), cu_seqlens[1:].long(), right=True).reshape(shape)


def segment_logps(
    per_token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    seg: torch.Tensor,
    num_segments: int,
    cp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """(N,) sum of target-token log-probs per segment, from this CP rank's (B, S/C) per-token cross
    entropy, mask and segment ids. The CP all-reduce completes the sums; the gradient flows only
    through this rank's part, so the CP ranks' gradients add up to the full one."""
    logp = -(per_token_loss.float() * loss_mask.float())
    local = torch.zeros(num_segments, dtype=torch.float32, device=logp.device).scatter_add(
        0, seg.reshape(-1), logp.reshape(-1)
    )
    if cp_group is None or cp_group.size() == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total, group=cp_group)
    return local + (total - local.detach())


def pair_losses(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    n_chosen: torch.Tensor,
    beta: float,
    weights: tuple[float, float, float],
    delta: float,
) -> dict[str, torch.Tensor]:
    """Per-pair (P,) loss components and rewards from policy (pc, pr) and reference (rc, rr) response
    log-prob sums and the chosen responses' token counts."""
    w_p, w_q, w_g = weights
    x_c, x_r = pc - rc, pr - rr
    preference = -F.logsigmoid(beta * (x_c - x_r))
    quality = -F.logsigmoid(beta * x_c - delta) - F.logsigmoid(-(beta * x_r - delta))
    generation = -pc / n_chosen.clamp_min(1)
    # InternVL logs the loss-weighted sum of each loss type's rewards (both are beta * x here)
    chosen_rewards, rejected_rewards = (w_p + w_q) * beta * x_c.detach(), (w_p + w_q) * beta * x_r.detach()
    return {
        "loss": w_p * preference + w_q * quality + w_g * generation,
        "loss_preference": preference,
        "loss_quality": quality,
        "loss_generation": generation,
        "rewards_chosen": chosen_rewards,
        "rewards_rejected": rejected_rewards,
        "reward_margin": chosen_rewards - rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
    }


@dataclass
class MPOContext:
    """What the MPO loss needs besides the batch: hyper-parameters, groups, the BCO running mean."""

    beta: float
    weights: tuple[float, float, float]
    running: RunningMean
    cp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    """Data-parallel group without CP: the ranks whose microbatches hold different pairs."""
    first_cp_rank: bool = True


def _pair_inputs(
    batch: Batch, split: TokenSplit, per_token_loss: torch.Tensor, cp_group
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) per-segment log-prob sums of this output (this CP rank's tokens, cut by `split`), and (N,)
    target tokens per segment."""
    cu = batch.cu_seqlens.to(per_token_loss.device)
    mask = batch.targets()
    seg = segment_ids(cu, mask.shape)
    n_tokens = torch.zeros(len(cu) - 1, device=per_token_loss.device).scatter_add(
        0, seg.reshape(-1), mask.reshape(-1).to(per_token_loss.device)
    )
    logps = segment_logps(per_token_loss, split.split(mask), split.split(seg), len(cu) - 1, cp_group)
    return logps, n_tokens


def reference_loss_func(
    source: Batch, batch: Batch, split: TokenSplit, cp_group, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Record the reference log-prob sums on the batch the policy step will read; no loss."""
    logps, _ = _pair_inputs(batch, split, per_token_loss, cp_group)
    source.ref_logps = logps.detach()
    return (
        torch.zeros((), device=per_token_loss.device),
        torch.tensor(0, dtype=torch.int, device=per_token_loss.device),
        {},
    )


def mpo_loss_func(
    batch: Batch, split: TokenSplit, ctx: MPOContext, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The summed MPO loss of this microbatch's pairs and their count (megatron-core divides the
    gradients by the pair count of the global batch); the count and logged sums are on CP rank 0."""
    if batch.pairs is None or batch.ref_logps is None:
        raise RuntimeError("--stage mpo: microbatch without preference pairs or reference log-probs")
    logps, n_tokens = _pair_inputs(batch, split, per_token_loss, ctx.cp_group)
    ref = batch.ref_logps.to(logps.device)
    c, r = batch.pairs[:, 0].to(logps.device), batch.pairs[:, 1].to(logps.device)
    x_sum = ctx.beta * ((logps[c] - ref[c]) + (logps[r] - ref[r])).detach().double() / 2
    stats = torch.stack([x_sum.sum(), torch.tensor(float(c.numel()), dtype=torch.float64, device=x_sum.device)])
    if ctx.dp_group is not None and ctx.dp_group.size() > 1:
        dist.all_reduce(stats, group=ctx.dp_group)
    ctx.running.update(float(stats[0]), float(stats[1]))
    parts = pair_losses(logps[c], logps[r], ref[c], ref[r], n_tokens[c], ctx.beta, ctx.weights, ctx.running.mean)
    keep = 1.0 if ctx.first_cp_rank else 0.0  # every CP rank holds the same pair values: log them once
    n_pairs = torch.tensor(float(c.numel()), device=logps.device)
    logged = torch.stack([parts[k].detach().sum() for k in ("loss",) + METRICS] + [n_pairs]) * keep
    count = torch.tensor(int(c.numel() * keep), dtype=torch.int, device=logps.device)
    return parts["loss"].sum(), count, {"lm loss": torch.stack([logged[0], logged[-1]]), "mpo": logged[1:-1]}


def reference_forward_step(
    data_iterator: Iterator[Batch], model: torch.nn.Module, cp_group=None
) -> tuple[torch.Tensor, Callable]:
    """The reference model's forward step (forward-only schedule)."""
    source = next(data_iterator)
    batch = batch_for_stage(source, model)  # ref_logps are recorded on `source`, which the policy reads
    output, split = run_model(model, batch)
    return output, functools.partial(reference_loss_func, source, batch, split, cp_group)


def mpo_forward_step(
    data_iterator: Iterator[Batch], model: torch.nn.Module, ctx: MPOContext
) -> tuple[torch.Tensor, Callable]:
    """The policy's forward step under --stage mpo."""
    batch = batch_for_stage(next(data_iterator), model)
    output, split = run_model(model, batch)
    return output, functools.partial(mpo_loss_func, batch, split, ctx)


def reduce_metrics(losses: list[dict], is_last_stage: bool, dp_cp_group, pp_group) -> dict:
    """Mean over the global batch's pairs of each METRICS entry, on every rank."""
    # NCCL reduces only GPU tensors (docs/gpu.md): the totals live on the communication device
    totals = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=comm_device())
    if is_last_stage:
        for item in losses:
            totals += torch.cat([item["mpo"], item["lm loss"][1:]]).to(totals.device, torch.float64)
        dist.all_reduce(totals, group=dp_cp_group)
    if pp_group is not None and pp_group.size() > 1:
        dist.all_reduce(totals, group=pp_group)
    totals = totals.cpu()
    n = float(totals[-1])
    return {k: float(totals[i] / n) if n > 0 else float("nan") for i, k in enumerate(METRICS)}


def sync_running(running: RunningMean, pp_group, last_rank: int) -> None:
    """Give every pipeline stage the last stage's running mean (rank 0 writes it into checkpoints)."""
    if pp_group is None or pp_group.size() == 1:
        return
    t = torch.tensor([running.mean, running.count], dtype=torch.float64, device=comm_device())
    dist.broadcast(t, src=last_rank, group=pp_group)
    running.mean, running.count = float(t[0]), float(t[1])


# --- set-up and checkpoint glue used by training/loop.py -------------------------------------------


def build_reference(run, model_cfg, policy: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference: this rank's stage built like the policy (same TP/PP/CP sharding) holding
    the policy's starting weights (--pretrained, else the seeded init). Call before LoRA is added and
    before a --load overwrites the policy; a resumed run reloads the weights the run started from."""
    ref = build_model(
        model_cfg, run.parallel, policy.pg_collection, dtype=next(policy.parameters()).dtype, compute=run.compute
    )
    ref.to(next(policy.parameters()).device)  # beside the policy (--device), not wherever CUDA is
    ref.load_state_dict(policy.state_dict(), strict=True)
    start = saved_state(run.checkpoint.load).get("mpo_reference") if run.checkpoint.load else None
    if start:
        checkpoint.load_weights(start, ref, model_cfg)
    return ref.eval()  # no drop path: the reference is deterministic


def mirror_requires_grad(reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Give each reference weight the policy's requires_grad (after freezing and LoRA; names the policy
    lacks are frozen). The reference only runs under no_grad and no optimizer holds it; the flag matters
    because megatron-core's linear layers take another kernel for frozen weights (LinearWithFrozenWeight,
    not bit-identical), and the same kernels make policy == reference exact at step 1."""
    trains = {name: p.requires_grad for name, p in policy.named_parameters()}
    for name, p in reference.named_parameters():
        p.requires_grad_(trains.get(name, False))


def saved_state(load_dir: str) -> dict:
    """The run.json of checkpoint `load_dir` (an iter_ directory, or the latest under a --save root)."""
    path = checkpoint_dir(load_dir) / "run.json"  # a root or the iter_ dir --load resolved to
    return json.loads(path.read_text())


def make_context(run, pg: ProcessGroupCollection) -> MPOContext:
    """MPOContext for this rank, on the process groups `pg` init_distributed returned."""
    w = run.train.mpo_loss_weights
    running = RunningMean()
    if run.checkpoint.load:
        state = saved_state(run.checkpoint.load).get("mpo")
        if state is None:
            raise CheckpointError(
                f"--load {run.checkpoint.load}: the checkpoint has no MPO state (not a --stage mpo run)"
            )
        running.load_state_dict(state)
    return MPOContext(
        beta=run.train.mpo_beta,
        weights=(float(w[0]), float(w[1]), float(w[2])),
        running=running,
        cp_group=pg.cp,
        dp_group=pg.dp,
        first_cp_rank=pg.cp.rank() == 0,
    )


def run_reference(
    reference: torch.nn.Module, batches: list[Batch], ctx: MPOContext, seq_length: int, micro_batch_size: int
) -> None:
    """Forward-only pass of the reference through megatron-core's schedule: sets `ref_logps` on the
    last stage's batches."""
    with torch.no_grad():
        forward_backward(
            reference.pg_collection,
            forward_step_func=functools.partial(reference_forward_step, cp_group=ctx.cp_group),
            data_iterator=iter(batches),
            model=[reference],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )


def checkpoint_extra(run, ctx: MPOContext) -> dict:
    """What a resumed MPO run needs: the BCO running mean and where the reference weights came from."""
    start = run.checkpoint.pretrained
    if run.checkpoint.load:
        start = saved_state(run.checkpoint.load).get("mpo_reference")
    return {"mpo": ctx.running.state_dict(), "mpo_reference": os.path.abspath(start) if start else None}
