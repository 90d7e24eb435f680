"""RoPE without concatenations (models/rope.py) equals megatron-core's unfused RoPE, forward and
backward, and the model puts it in megatron-core's fused-RoPE slot on CPU."""

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from internvl_mcore.models import rope


@pytest.mark.parametrize("rot", [64, 32])  # whole head dimension; half of it (the rest passes through)
def test_matches_megatron_unfused(rot):
    g = torch.Generator().manual_seed(0)
    s, heads, d = 37, 5, 64
    freqs = torch.rand(s, 2, 1, rot // 2, generator=g) * 100  # per-row angles (V2PE): (S, B, 1, R)
    freqs = torch.cat([freqs, freqs + 0.5], dim=-1)  # halves differ: checks which half pairs with which
    qkv = torch.randn(s, 2, 3 * heads * d, generator=g)
    grad_out = torch.randn(s, 2, heads, d, generator=g)

    def run(fn):
        x = qkv.clone().requires_grad_()
        q = x.view(s, 2, 3 * heads, d)[:, :, heads : 2 * heads]  # a strided view, as megatron-core's split q
        out = fn(q, freqs)
        (out * grad_out).sum().backward()
        return out.detach(), x.grad

    ref_out, ref_grad = run(rope_utils._apply_rotary_pos_emb_bshd)
    out, grad = run(rope.apply_rotary)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_installed_in_megatron_slot_without_te():
    if rope_utils.fused_apply_rotary_pos_emb not in (None, rope.apply_rotary):
        pytest.skip("transformer-engine's fused RoPE occupies the slot (GPU machines)")
    assert rope.install()
    assert rope_utils.fused_apply_rotary_pos_emb is rope.apply_rotary
