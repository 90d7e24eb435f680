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
        # megatron-core's sharded_state_dict reads it (else: its global group), though nothing here is sharded
        self.tp_group = getattr(pg_collection, "tp", None)

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
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        dropout = self.dropout_p if self.training else 0.0
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if (
            cu is not None
            and flash_attn_varlen_func is not None
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
        ):  # flash-attn has no fp32 kernels
            return self._flash_varlen(query, key, value, packed_seq_params, causal, dropout)
        if cu is None:
            return self._per_row(query, key, value, causal, dropout)
        return self._per_sample(query, key, value, cu, causal, dropout)

    def _flash_varlen(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        packed_seq_params: PackedSeqParams,
        causal: bool,
        dropout: float,
    ) -> torch.Tensor:
        """flash-attn's variable-length kernel over the samples of the packs (CUDA, half precision)."""
        s, b, nq, d = query.shape
        cu = packed_seq_params.cu_seqlens_q
        # (S, B, h, d) -> (B*S, h, d): batch-major, matching cu_seqlens
        q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], d) for t in (query, key, value))
        max_len = packed_seq_params.max_seqlen_q  # computed once per microbatch: no host sync per layer
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        out = flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=self.softmax_scale, causal=causal
        )
        return out.reshape(b, s, nq * d).transpose(0, 1).contiguous()

    # torch's CPU flash kernel only takes 4-D (N, h, L, d) inputs; 3-D (h, L, d) falls back to
    # the math path (bmm + a materialized L x L score matrix), several times slower.
    def _per_row(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, dropout: float
    ) -> torch.Tensor:
        """One sample per row (the ViT's tiles): a single batched call on (B, h, S, d) views."""
        s, b, nq, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale, enable_gqa=key.shape[2] != nq
        )  # (B, h, S, d)
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * d)

    def _per_sample(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu: torch.Tensor,
        causal: bool,
        dropout: float,
    ) -> torch.Tensor:
        """Packed rows: one 4-D call per sample, the samples cut at the flattened boundaries `cu`."""
        s, b, nq, d = query.shape
        gqa = key.shape[2] != nq
        # (S, B, h, d) -> (1, B*S, h, d) over batch-major flattened tokens (a view when B == 1)
        q, k, v = (t.transpose(0, 1).reshape(1, b * s, t.shape[2], d) for t in (query, key, value))
        cu_list = cu.tolist()
        if cu_list[0] != 0 or cu_list[-1] != b * s or any(e < a for a, e in zip(cu_list[:-1], cu_list[1:])):
            raise ValueError(f"cu_seqlens cover {cu_list[0]}..{cu_list[-1]} but the batch has {b * s} tokens")
        lengths = [e - a for a, e in zip(cu_list[:-1], cu_list[1:])]
        # Split along the tokens, not slicing and not after moving heads first: the backward then
        # concatenates contiguous (1, L, h, d) segment gradients (a plain memory copy) instead of
        # zero-filling a full-size gradient per segment, or gathering through transposed strides.
        outs = [
            F.scaled_dot_product_attention(
                qs.transpose(1, 2),
                ks.transpose(1, 2),
                vs.transpose(1, 2),
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=gqa,
            ).transpose(1, 2)
            for qs, ks, vs, n in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), lengths)
            if n
        ]  # each (1, L, h, d)
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (1, B*S, h, d)
        return out.reshape(b, s, nq * d).transpose(0, 1).contiguous()  # (S, B, h*d); a view when B == 1


def packed_seq_params_from_cu_seqlens(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """Describe a batch of packs by its flattened sample boundaries (int32, batch-major, 0..B*S).

    qkv_format stays 'sbhd': megatron-core then leaves q/k/v and RoPE alone (our RoPE already
    carries per-token V2PE positions) and only hands the boundaries to the core attention."""
    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )
