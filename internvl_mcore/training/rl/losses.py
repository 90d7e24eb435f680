"""GSPO's and GRPO's clipped policy losses (with an optional k3 KL to a frozen reference), per response.

Notation: response y_i of prompt x (a cu_seqlens segment of a packed microbatch), its |y_i| target
tokens t, log-probs logp (policy being trained), old (the policy that sampled, fixed during the
--ppo-epochs updates), ref (the frozen reference), advantage A_i (advantages.py).

GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071; objective eq. 5): the length-normalized
sequence-level importance ratio

    s_i = (pi(y_i|x) / pi_old(y_i|x)) ** (1/|y_i|) = exp(mean_t (logp_t - old_t))
    loss_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

GRPO (Shao et al. 2024, DeepSeekMath, eq. 3; the GSPO paper restates it the same way): per-token ratios

    w_it = exp(logp_t - old_t)
    loss_i = (1/|y_i|) sum_t -min(w_it A_i, clip(w_it, 1 - eps_low, 1 + eps_high) A_i)

i.e. the token mean within each response, then the mean over responses ("sequence mean of token
means", as both papers write the objective: 1/G sum_i 1/|y_i| sum_t), not DAPO's token mean over the
whole batch. The step minimizes the mean of loss_i over the responses of the global batch.

KL (--kl-coeff beta > 0): GRPO's unbiased k3 estimator of KL(pi || ref) per token (DeepSeekMath eq. 4)

    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (>= 0, exactly 0 where pi == ref)

token-averaged per response and added as beta * mean_t k3_t to loss_i, for GRPO (inside the paper's
token mean, the same thing) and for GSPO alike (the GSPO paper has no KL term; this gives --kl-coeff
one meaning for both).

Clip fraction: the share of response tokens whose gradient the clip removes, i.e. where the clipped
term is the smaller one and differs (ratio < 1 - eps_low with A < 0, or > 1 + eps_high with A > 0);
for GSPO every token of a clipped response counts (the paper's "fraction of clipped tokens"). A ratio
outside the range with the other sign of A is not clipped (min takes the unclipped term).

Context parallelism: each rank holds part of every response's tokens. Per-response sums are completed
by an all-reduce over the CP group whose gradient flows only through the local part (as MPO's
`segment_logps`), so every CP rank computes the same loss_i and the CP ranks' gradients add up to
the full one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from ...config.rl import GRPO_CLIP, GSPO_CLIP

__all__ = ["GRPO_CLIP", "GSPO_CLIP", "PolicyLossConfig", "ResponseTerms", "policy_loss", "segment_sums"]


@dataclass(frozen=True)
class PolicyLossConfig:
    """Which ratio and which clip range; the KL weight."""

    level: Literal["sequence", "token"]
    """'sequence': GSPO's length-normalized sequence ratio; 'token': GRPO's per-token ratio."""
    clip_eps_low: float
    """Ratios below 1 - clip_eps_low are clipped (--clip-eps-low)."""
    clip_eps_high: float
    """Ratios above 1 + clip_eps_high are clipped (--clip-eps-high)."""
    kl_coeff: float = 0.0
    """Weight beta of the per-response mean k3 KL to the reference (--kl-coeff; 0: no reference needed)."""


@dataclass
class ResponseTerms:
    """(N,) per-response values, one per segment; segments without response tokens have n_tokens 0
    and must be left out of sums (`valid`)."""

    loss: torch.Tensor
    """loss_i (with the KL term), differentiable."""
    ratio: torch.Tensor
    """s_i (GSPO) or the token mean of w_it (GRPO), detached."""
    kl: torch.Tensor
    """mean_t k3_t (0 without a reference), detached."""
    clipped_tokens: torch.Tensor
    """Response tokens whose gradient the clip removed."""
    n_tokens: torch.Tensor
    """|y_i| over all CP ranks."""

    @property
    def valid(self) -> torch.Tensor:
        return self.n_tokens > 0


def segment_sums(values: torch.Tensor, seg: torch.Tensor, num_segments: int, cp_group=None) -> torch.Tensor:
    """(N,) sum of `values` per segment id `seg` (same shape), completed over the CP group; the gradient
    flows only through this rank's part."""
    local = torch.zeros(num_segments, dtype=values.dtype, device=values.device).scatter_add(
        0, seg.reshape(-1).long(), values.reshape(-1)
    )
    if cp_group is None or cp_group.size() == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total, group=cp_group)
    return local + (total - local.detach())


def _clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """min(ratio * A, clip(ratio) * A) and where the clipped term won (and differs)."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high) * adv
    return torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    seg: torch.Tensor,
    num_segments: int,
    advantages: torch.Tensor,
    cfg: PolicyLossConfig,
    ref_logp: Optional[torch.Tensor] = None,
    cp_group=None,
) -> ResponseTerms:
    """Per-response GSPO / GRPO terms from per-token log-probs of this rank's tokens (any shape, the
    same for logp, old_logp, ref_logp, mask and seg; mask nonzero at response tokens) and (N,)
    advantages per segment. Computed in logp's dtype (pass float32 or float64)."""
    on = mask.reshape(-1) != 0
    seg = seg.reshape(-1).long()
    logp = logp.reshape(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # where(), not a product with the mask: a non-response position may hold anything (even inf)
    diff = torch.where(on, logp - old_logp.reshape(-1).to(logp.dtype), zero)
    n_tokens = segment_sums(on.to(logp.dtype), seg, num_segments, cp_group).detach()
    n = n_tokens.clamp_min(1)
    adv = advantages.to(device=logp.device, dtype=logp.dtype)
    if cfg.level == "sequence":
        ratio = torch.exp(segment_sums(diff, seg, num_segments, cp_group) / n)
        surrogate, clipped = _clipped_surrogate(ratio, adv, cfg)
        loss, ratio_mean, clipped_tokens = -surrogate, ratio.detach(), clipped.to(logp.dtype) * n_tokens
    elif cfg.level == "token":
        ratio = torch.exp(diff)
        surrogate, clipped = _clipped_surrogate(ratio, adv[seg], cfg)
        loss = segment_sums(torch.where(on, -surrogate, zero), seg, num_segments, cp_group) / n
        ratio_mean = segment_sums(torch.where(on, ratio, zero).detach(), seg, num_segments, cp_group) / n
        clipped_tokens = segment_sums((clipped & on).to(logp.dtype), seg, num_segments, cp_group)
    else:
        raise RuntimeError(f"policy loss level {cfg.level!r}")
    kl = torch.zeros_like(n_tokens)
    if cfg.kl_coeff > 0:
        if ref_logp is None:
            raise RuntimeError("--kl-coeff > 0 without reference log-probs")
        d = torch.where(on, ref_logp.reshape(-1).to(logp.dtype) - logp, zero)
        kl_t = segment_sums(torch.exp(d) - d - 1.0, seg, num_segments, cp_group) / n
        loss, kl = loss + cfg.kl_coeff * kl_t, kl_t.detach()
    return ResponseTerms(loss=loss, ratio=ratio_mean, kl=kl, clipped_tokens=clipped_tokens, n_tokens=n_tokens)
