"""Group-normalized advantages (GRPO, DeepSeekMath eq. 3's outcome supervision; GSPO eq. 6).

For a prompt x with G sampled responses and rewards r_1..r_G:

    A_i = (r_i - mean(r)) / (std(r) + eps)

with std the *unbiased* (Bessel, divide by G-1) standard deviation over the group and eps = 1e-6
added to it, as verl's GRPO outcome advantage does (torch.std + epsilon); the papers write std(r)
without saying which. A group whose rewards are all equal (all right, all wrong) has advantage
exactly 0 for every response, set explicitly rather than left to (r - mean) rounding, so such a group
contributes no policy gradient (only the KL term, when --kl-coeff > 0); `zero_groups` counts them.
A group needs G >= 2: one response has no baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError

EPS = 1e-6
"""Added to the group's standard deviation (verl's GRPO default)."""


@dataclass
class Advantages:
    """Per-response advantages and what the step logs about them."""

    values: torch.Tensor
    """(P*G,) float64 advantages, in the rewards' order (group after group)."""
    zero_groups: int
    """Groups whose rewards were all equal (advantage 0)."""
    reward_mean: float
    """Mean reward over all responses."""
    reward_std: float
    """Unbiased standard deviation of all rewards (0 for a single response)."""


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = EPS) -> Advantages:
    """Advantages of rewards laid out group after group: rewards[p*G:(p+1)*G] are prompt p's G
    responses (--rollouts-per-prompt G)."""
    if group_size < 2:
        raise ConfigError(f"--rollouts-per-prompt {group_size}: group-normalized advantages need at least 2")
    r = rewards.detach().to(torch.float64).reshape(-1)
    if r.numel() % group_size:
        raise RuntimeError(f"{r.numel()} rewards are not whole groups of {group_size}")
    groups = r.reshape(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=True, keepdim=True)
    same = groups.amax(dim=1) == groups.amin(dim=1)
    adv = torch.where(same[:, None], torch.zeros_like(groups), (groups - mean) / (std + eps))
    return Advantages(
        values=adv.reshape(-1),
        zero_groups=int(same.sum()),
        reward_mean=float(r.mean()),
        reward_std=float(r.std(unbiased=True)) if r.numel() > 1 else 0.0,
    )
