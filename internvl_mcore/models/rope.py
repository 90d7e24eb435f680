"""Rotary position embedding applied without `cat`: a drop-in for megatron-core's fused-RoPE slot.

megatron-core's unfused RoPE (`rope_utils._apply_rotary_pos_emb_bshd`) computes
`cat(t * cos + cat(-x2, x1) * sin, t_pass)`: a negation, two concatenations and three temporaries per
call on q and k of every layer, and as many again in the backward. `apply_rotary` writes each half of
the output straight into its place (x1 cos - x2 sin | x2 cos + x1 sin) and its backward does the
same, which is the same arithmetic up to fp32 rounding (tests/models/test_rope.py).

megatron-core calls a fused RoPE through `rope_utils.fused_apply_rotary_pos_emb`, which only
transformer-engine defines. `install()` puts `apply_rotary` there when transformer-engine did not,
and the model then turns `apply_rope_fusion` on (models/internvl.py). With transformer-engine the
slot keeps TE's kernel, which the model does not use (V2PE's per-row angles, config/megatron.py).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings import rope_utils


class _Rotary(torch.autograd.Function):
    """t (S, B, h, D), cos / sin (S, B, 1, R) with R <= D even (the last D - R channels pass through)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, half = cos.shape[-1], cos.shape[-1] // 2
        x1, x2 = t[..., :half], t[..., half:rot]
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # contiguous
        o1, o2 = out[..., :half], out[..., half:rot]
        torch.mul(x1, cos[..., :half], out=o1)
        o1.addcmul_(x2, sin[..., :half], value=-1.0)  # x1 cos - x2 sin
        torch.mul(x2, cos[..., half:], out=o2)
        o2.addcmul_(x1, sin[..., half:])  # x2 cos + x1 sin
        if rot < t.shape[-1]:
            out[..., rot:] = t[..., rot:]
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        cos, sin = ctx.saved_tensors
        rot, half = cos.shape[-1], cos.shape[-1] // 2
        g1, g2 = grad[..., :half], grad[..., half:rot]
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        d1, d2 = out[..., :half], out[..., half:rot]
        torch.mul(g1, cos[..., :half], out=d1)
        d1.addcmul_(g2, sin[..., half:])  # d/dx1: g1 cos + g2 sin
        torch.mul(g2, cos[..., half:], out=d2)
        d2.addcmul_(g1, sin[..., :half], value=-1.0)  # d/dx2: g2 cos - g1 sin
        if rot < grad.shape[-1]:
            out[..., rot:] = grad[..., rot:]
        return out, None, None


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_: Any) -> torch.Tensor:
    """RoPE of t (S, B, h, D) by angles freqs (S, B or 1, 1, R): megatron-core's
    `_apply_rotary_pos_emb_bshd` (rotate-half layout, mscale 1) without its concatenations."""
    if interleaved:
        raise NotImplementedError("interleaved RoPE: megatron-core's unfused path handles it (apply_rope_fusion off)")
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    return _Rotary.apply(t, cos, sin)


def install() -> bool:
    """Fill megatron-core's fused-RoPE slot with `apply_rotary` unless transformer-engine filled it.
    True when `apply_rotary` is the function in the slot (the model may then set apply_rope_fusion)."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rotary
    return rope_utils.fused_apply_rotary_pos_emb is apply_rotary
