"""Per-head QK-norm of the LLM (Qwen3's q_norm / k_norm) for megatron-core's q_layernorm / k_layernorm slot.

megatron-core's `SelfAttention` builds `q_layernorm` / `k_layernorm` with `hidden_size=head_dim` and
applies them to (S, B, heads_local, head_dim) right after splitting linear_qkv's output, before RoPE;
transformers' Qwen3 attention does the same (norm per head, then RoPE). The norm weight (head_dim,) is
shared by every head, so it is replicated over TP while each TP rank only sees its own heads: its
gradient on one rank is partial and must be summed over the TP group.

megatron-core sums such gradients in `finalize_model_grads` when `TransformerConfig.qk_layernorm` is
set, by parameter *name* ("q_layernorm" / "k_layernorm" anywhere in the model chunk). Here that would
also sum InternViT-6B's full-width QK-norm (models/vision.py), which sits in the same slot of the
vision blocks but is split over TP by heads, so its shards must not be added up. This module instead
routes its weight through megatron-core's `copy_to_tensor_model_parallel_region` (forward: identity,
backward: all-reduce over TP), the same primitive column-parallel linears use for their input, so the
gradient is complete on every rank before finalize_model_grads runs, and `qk_layernorm` stays unset.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn


class PerHeadRMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2 over head_dim) + eps), per head, in fp32 like transformers' Qwen3RMSNorm."""

    def __init__(
        self,
        hidden_size: int,
        config: Any,
        eps: float = 1e-6,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (S, B, heads_local, head_dim)
        weight = self.weight
        if self.tp_group is not None and self.tp_group.size() > 1:
            weight = copy_to_tensor_model_parallel_region(weight, group=self.tp_group)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return weight * normed.to(x.dtype)
