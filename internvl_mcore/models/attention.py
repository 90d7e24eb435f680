"""Core attention for the local (CPU) layer specs: packed-sequence aware, no S x S mask.

megatron-core's local `DotProductAttention` refuses packed sequences and materializes a full score
matrix. Packing is instead expressed here as segments: `packed_seq_params.cu_seqlens_q` holds the
boundaries of the samples over the batch-major flattened tokens (B*S), and each segment attends
causally only to itself. Each segment runs through `scaled_dot_product_attention`, which on CPU
uses a flash-style kernel for `is_causal=True`; memory stays linear in S. With CUDA and flash-attn
importable, the whole pack goes through `flash_attn_varlen_func` instead (same semantics).

The module has `DotProductAttention`'s constructor and forward signature, so any layer spec can
swap it in as `core_attention` (context-parallel variants plug in the same way).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

try:  # GPU-only extra
    from flash_attn import flash_attn_varlen_func  # type: ignore
except ImportError:  # pragma: no cover - never installed on CPU machines
    flash_attn_varlen_func = None


class PackedSDPAttention(MegatronModule):
    """softmax(q k^T * scale [causal, per packed sample]) v for (S, B, heads, head_dim) inputs."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        assert attention_bias is None, "attention bias is not supported"
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        s, b, nq, d = query.shape
        nkv = key.shape[2]
        dropout = self.dropout_p if self.training else 0.0
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None

        if cu is not None and flash_attn_varlen_func is not None and query.is_cuda:
            # (S, B, h, d) -> (B*S, h, d): batch-major, matching cu_seqlens
            q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], d) for t in (query, key, value))
            max_len = int((cu[1:] - cu[:-1]).max())
            out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout,
                                         softmax_scale=self.softmax_scale, causal=causal)
            return out.reshape(b, s, nq * d).transpose(0, 1).contiguous()

        # (S, B, h, d) -> (h, B*S, d): one "batch" of heads over batch-major flattened tokens
        q, k, v = (t.permute(2, 1, 0, 3).reshape(t.shape[2], b * s, d) for t in (query, key, value))
        gqa = nkv != nq
        if cu is None:
            bounds = [(i * s, (i + 1) * s) for i in range(b)]
        else:
            cu_list = cu.tolist()
            bounds = list(zip(cu_list[:-1], cu_list[1:]))
        outs = []
        for start, end in bounds:
            if end <= start:
                continue
            outs.append(F.scaled_dot_product_attention(
                q[:, start:end], k[:, start:end], v[:, start:end], dropout_p=dropout,
                is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (h, B*S, d)
        if out.shape[1] != b * s:
            raise ValueError(f"cu_seqlens cover {out.shape[1]} tokens but the batch has {b * s}")
        return out.reshape(nq, b, s, d).permute(2, 1, 0, 3).reshape(s, b, nq * d)


def packed_seq_params_from_cu_seqlens(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """Describe a batch of packs by its flattened sample boundaries (int32, batch-major, 0..B*S).

    qkv_format stays 'sbhd': megatron-core then leaves q/k/v and RoPE alone (our RoPE already
    carries per-token V2PE positions) and only hands the boundaries to the core attention."""
    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)
