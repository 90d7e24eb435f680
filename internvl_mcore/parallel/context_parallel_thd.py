"""Context parallelism in transformer-engine's 'thd' layout: the per-sample load-balanced split.

`parallel/context_parallel.py` splits whole packed rows (2C chunks per row). TE's context-parallel attention
takes packed batches only as 'thd' (tokens of the whole microbatch in one stream, sample boundaries
in cu_seqlens) and splits *every sample*: each sample is padded to a multiple of 2C
(`cu_seqlens_padded`), cut into 2C chunks, and CP rank r keeps chunks r and 2C-1-r of every sample,
sample after sample (megatron-core's `get_thd_batch_on_this_cp_rank`, TE's
`thd_get_partitioned_indices`). Here that split is independent of the attention kernel:

- `ThdSplit` computes it from the global cu_seqlens and applies it to every per-token tensor
  (embeddings, V2PE positions, labels, loss weights; padding tokens get zeros, i.e. loss weight 0);
- `ThdContextParallelAttention` is the core attention for such batches: TE's `TEDotProductAttention`
  on GPU (the `te` variant from `cp_core_attention`), or, on CPU, an exact reference that all-gathers
  q/k/v over the CP group, runs the packed attention on the padded samples and keeps this rank's
  queries (C times the work; it exists so the split is tested against the single-process run).

V2PE stays exact: megatron-core applies RoPE to 'thd' queries/keys from positions 0..len-1 of each
sample (`_apply_rotary_pos_emb_thd`), which would drop V2PE's fractional positions. On this path the
language model passes no rotary embedding to the layers; it hands this rank's per-token angles to the
core attention in `ThdPackedSeqParams.rotary_freqs`, which applies them (unfused) before the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .attention import PackedSDPAttention, packed_seq_params_from_cu_seqlens


def required_cp_group(pg_collection: Any) -> dist.ProcessGroup:
    """The context-parallel group of the collection the model was built with (no global fallback:
    a core attention built without it would silently use whatever world is current)."""
    cp = getattr(pg_collection, "cp", None)
    if cp is None:
        raise ValueError(
            "context-parallel attention needs pg_collection with a 'cp' group "
            "(build the model with the groups init_distributed returns)"
        )
    return cp


@dataclass
class ThdPackedSeqParams(PackedSeqParams):
    """megatron-core's PackedSeqParams for a 'thd' CP batch, plus V2PE's rotary angles."""

    rotary_freqs: Optional[torch.Tensor] = None
    """(T, 1, D) fp32 RoPE angles of this rank's T tokens, applied by the core attention."""


def thd_padded_index(cu_padded: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Positions in the padded global token stream of CP rank `cp_rank`'s tokens, in local order:
    chunks r and 2C-1-r of every padded sample, sample after sample."""
    m = 2 * cp_size
    parts = []
    for start, end in zip(cu_padded[:-1].tolist(), cu_padded[1:].tolist()):
        c = (end - start) // m
        for k in (cp_rank, m - 1 - cp_rank):
            parts.append(torch.arange(start + k * c, start + (k + 1) * c))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True)
class ThdSplit:
    """This CP rank's share of a microbatch of B packed rows of S tokens, in TE's 'thd' layout."""

    cu_seqlens: torch.Tensor
    """(n+1,) int32 real sample boundaries over the B*S flattened tokens (global)."""
    cu_seqlens_padded: torch.Tensor
    """(n+1,) int32 boundaries after padding every sample to a multiple of 2C (global)."""
    source: torch.Tensor
    """(T,) int64 flattened-batch index of each local token; -1 for padding."""
    max_seqlen: int
    """Longest padded sample."""
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)
    """`source` per device, copied there once (every per-token tensor of the microbatch indexes with it)."""

    @staticmethod
    def build(cu_seqlens: Optional[torch.Tensor], batch: int, seq_len: int, cp_rank: int, cp_size: int) -> "ThdSplit":
        """From the global batch-major boundaries (None: one sample per row)."""
        total = batch * seq_len
        cu = torch.arange(0, total + 1, seq_len) if cu_seqlens is None else cu_seqlens.detach().to("cpu", torch.int64)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"parallel/context_parallel_thd.py: cu_seqlens must rise from 0 to B*S = {total}, "
                f"got {cu.tolist()[:8]}..."
            )
        m = 2 * cp_size
        lengths = cu[1:] - cu[:-1]
        padded = (lengths + m - 1) // m * m
        cu_pad = torch.cat([torch.zeros(1, dtype=torch.int64), padded.cumsum(0)])
        where = thd_padded_index(cu_pad, cp_rank, cp_size)  # (T,) padded positions
        sample = torch.searchsorted(cu_pad[1:], where, right=True)  # (T,) sample of each token
        offset = where - cu_pad[sample]
        source = torch.where(offset < lengths[sample], cu[sample] + offset, torch.full_like(offset, -1))
        return ThdSplit(cu.to(torch.int32), cu_pad.to(torch.int32), source, int(padded.max()) if padded.numel() else 0)

    def split(self, t: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """This rank's tokens of a per-token tensor: (B, S, ...) with seq_dim 1 -> (1, T, ...);
        (S, B, ...) with seq_dim 0 -> (T, 1, ...). Padding tokens are zeros."""
        flat = t.transpose(0, 1) if seq_dim == 0 else t  # (B, S, ...)
        flat = flat.reshape(flat.shape[0] * flat.shape[1], *flat.shape[2:])  # batch-major tokens
        src = self._on_device.get(t.device)
        if src is None:
            src = self._on_device[t.device] = self.source.to(t.device)
        valid = src >= 0
        out = flat.index_select(0, src.clamp_min(0))  # (T, ...)
        out = out.masked_fill(~valid.view(-1, *[1] * (out.dim() - 1)), 0)
        return out.unsqueeze(1) if seq_dim == 0 else out.unsqueeze(0)

    def packed_seq_params(self, device: torch.device) -> ThdPackedSeqParams:
        """What TE's attention needs: global real and padded boundaries, the longest padded sample."""
        cu, cu_pad = self.cu_seqlens.to(device), self.cu_seqlens_padded.to(device)
        return ThdPackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu_pad,
            cu_seqlens_kv_padded=cu_pad,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


def apply_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Unfused rotate-half RoPE (megatron-core's / HF Qwen2's): t (T, h, d), freqs (T, 1, d) angles."""
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-x2, x1], dim=-1) * sin


class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 0 over a group; the backward sums the gradient over the group and keeps
    this rank's part (every rank's loss may depend on every rank's tokens)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group, ctx.n = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[r * ctx.n : (r + 1) * ctx.n], None


class ThdContextParallelAttention(MegatronModule):
    """Core attention for 'thd' CP batches (`ThdSplit`): q (T, hq, d), k/v (T, hkv, d) of this rank's
    tokens (megatron-core squeezes the batch dimension for 'thd') -> (T, hq*d).

    Applies V2PE's rotary angles from `ThdPackedSeqParams.rotary_freqs` first. `use_te` (set by
    `cp_core_attention`) picks TE's kernel, which takes cp_comm_type and the CP group from
    megatron-core; otherwise the all-gather reference runs (CPU)."""

    use_te: bool = False

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
        self.cp_group = required_cp_group(pg_collection)
        self.tp_group = getattr(pg_collection, "tp", None)  # megatron-core's sharded_state_dict reads it
        self.kernel = None
        if self.use_te:
            # transformer-engine is an optional GPU extra: imported only when its kernel is asked for
            from megatron.core.extensions.transformer_engine import TEDotProductAttention

            self.kernel = TEDotProductAttention(
                config,
                layer_number,
                attn_mask_type,
                attention_type,
                attention_dropout,
                softmax_scale,
                cp_comm_type=cp_comm_type,
                pg_collection=pg_collection,
            )
        self.local = PackedSDPAttention(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout,
            softmax_scale,
            pg_collection=pg_collection,
        )

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
        freqs = getattr(packed_seq_params, "rotary_freqs", None)
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd" or freqs is None:
            raise ValueError(
                "parallel/context_parallel_thd.py: this core attention takes 'thd' batches from "
                "ThdSplit (ThdPackedSeqParams with rotary_freqs)"
            )
        query, key = apply_rope(query, freqs), apply_rope(key, freqs)
        if self.kernel is not None:
            return self.kernel(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
            )
        return self._reference(query, key, value, attn_mask_type, packed_seq_params)

    def _reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask_type: Optional[AttnMaskType],
        packed: PackedSeqParams,
    ) -> torch.Tensor:
        """Exact CPU reference: gather everyone's tokens, attend within padded samples, keep mine."""
        n, hq, d = q.shape
        hkv = k.shape[1]
        c, me = self.cp_group.size(), self.cp_group.rank()
        cu_pad = packed.cu_seqlens_q_padded.detach().to("cpu", torch.int64)
        gathered = _GatherTokens.apply(torch.cat([q, k, v], dim=1), self.cp_group)  # (C*T, hq+2hkv, d)
        order = torch.cat([thd_padded_index(cu_pad, r, c) for r in range(c)]).to(q.device)
        full = gathered.index_select(0, torch.argsort(order))[:, None]  # (T_pad, 1, h, d) padded order
        fq, fk, fv = full.split([hq, hkv, hkv], dim=2)
        out = self.local(
            fq,
            fk,
            fv,
            None,
            attn_mask_type,
            packed_seq_params=packed_seq_params_from_cu_seqlens(packed.cu_seqlens_q_padded),
        )
        mine = thd_padded_index(cu_pad, me, c).to(q.device)
        return out.index_select(0, mine).reshape(n, hq * d)  # (T, hq*d)
