"""Sharding rules: how a canonical (TP 1) tensor is cut into tensor-parallel pieces and put back.

One rule object per kind of split, each owning its operations, so that the model loader
(models/weights.py: `shard`, `canonical_shape`), the converter (convert/distributed.py: `unshard`)
and the planner (plan/params.py: `local_shape`, with the padding) cannot disagree; `split_dim` says
along which dim (models/weights.py tags the parameters with it):

    even      plain column/row/expert split along the partition dim (megatron-core's own rule)
    heads     InternViT attention: split by heads, zero heads padded up to a multiple of TP
    gated     SwiGLU fc1 [gate; up]: each half split separately, a rank holds [gate_r; up_r]
    vocab     embedding / output rows: zero rows padded to `padded_vocab_size` (lcm(128, TP))

Which parameter follows which rule is data (`SHARD_RULES`, regexes on the canonical name); a
parameter matching none is split evenly. Replicated parameters (no `tensor_model_parallel` tag)
are not split at all; the callers check the tag. No megatron-core import, and torch only where
tensors are cut: the planner (plan/, pure arithmetic, no torch import) uses the shape methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..config.model import ModelConfig, padded_vision_heads, padded_vocab_size

if TYPE_CHECKING:
    import torch


def _cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, with torch imported on first use so that importing the rules needs no torch."""
    import torch

    return torch.cat(list(parts), dim=dim)


@dataclass(frozen=True)
class EvenSplit:
    """Equal consecutive chunks along the partition dim (column, row and expert linears)."""

    def shard(self, full: torch.Tensor, dim: int, rank: int, size: int, cfg: ModelConfig) -> torch.Tensor:
        return self.pad(full, dim, size, cfg).chunk(size, dim=dim)[rank]

    def unshard(self, parts: list[torch.Tensor], dim: int, cfg: ModelConfig) -> torch.Tensor:
        return self.unpad(_cat(parts, dim), dim, cfg)

    def canonical_shape(self, local: tuple[int, ...], dim: int, size: int, cfg: ModelConfig) -> tuple[int, ...]:
        shape = list(local)
        shape[dim] = self.unpadded(local[dim] * size, size, cfg)
        return tuple(shape)

    def local_shape(self, canonical: tuple[int, ...], dim: int, size: int, cfg: ModelConfig) -> tuple[int, ...]:
        """The shape one of `size` ranks holds (the inverse of `canonical_shape`)."""
        shape = list(canonical)
        shape[dim] = self.padded(canonical[dim], size, cfg) // size
        return tuple(shape)

    # padding hooks: none for an even split
    def pad(self, full: torch.Tensor, dim: int, size: int, cfg: ModelConfig) -> torch.Tensor:
        return full

    def unpad(self, full: torch.Tensor, dim: int, cfg: ModelConfig) -> torch.Tensor:
        return full

    def unpadded(self, padded_len: int, size: int, cfg: ModelConfig) -> int:
        return padded_len

    def padded(self, canonical_len: int, size: int, cfg: ModelConfig) -> int:
        return canonical_len


@dataclass(frozen=True)
class HeadSplit(EvenSplit):
    """Split by InternViT heads; zero heads are appended until the head count divides by TP."""

    heads_per_block: int = 1
    """Head-sized blocks per head along the split dim: 3 for fused q,k,v, else 1."""

    def _block(self, cfg: ModelConfig) -> int:
        return cfg.vision.head_dim * self.heads_per_block

    def pad(self, full: torch.Tensor, dim: int, size: int, cfg: ModelConfig) -> torch.Tensor:
        real = cfg.vision.num_attention_heads
        pad_shape = list(full.shape)
        pad_shape[dim] = (padded_vision_heads(real, size) - real) * self._block(cfg)
        return _cat([full, full.new_zeros(pad_shape)], dim)

    def unpad(self, full: torch.Tensor, dim: int, cfg: ModelConfig) -> torch.Tensor:
        return full.narrow(dim, 0, cfg.vision.num_attention_heads * self._block(cfg))

    def unpadded(self, padded_len: int, size: int, cfg: ModelConfig) -> int:
        return cfg.vision.num_attention_heads * self._block(cfg)

    def padded(self, canonical_len: int, size: int, cfg: ModelConfig) -> int:
        return padded_vision_heads(cfg.vision.num_attention_heads, size) * self._block(cfg)


@dataclass(frozen=True)
class VocabSplit(EvenSplit):
    """Embedding / output rows, zero rows appended up to `padded_vocab_size` (dim 0)."""

    def pad(self, full: torch.Tensor, dim: int, size: int, cfg: ModelConfig) -> torch.Tensor:
        rows = padded_vocab_size(full.shape[0], size)
        return _cat([full, full.new_zeros((rows - full.shape[0],) + tuple(full.shape[1:]))], 0)

    def unpad(self, full: torch.Tensor, dim: int, cfg: ModelConfig) -> torch.Tensor:
        return full.narrow(0, 0, cfg.llm.vocab_size)

    def unpadded(self, padded_len: int, size: int, cfg: ModelConfig) -> int:
        return cfg.llm.vocab_size

    def padded(self, canonical_len: int, size: int, cfg: ModelConfig) -> int:
        return padded_vocab_size(canonical_len, size)


@dataclass(frozen=True)
class GatedSplit(EvenSplit):
    """SwiGLU fc1 = [gate; up]: rank r holds [gate_r; up_r] (megatron-core's swiglu sharding)."""

    def shard(self, full: torch.Tensor, dim: int, rank: int, size: int, cfg: ModelConfig) -> torch.Tensor:
        gate, up = full.chunk(2, dim=dim)
        return _cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim)

    def unshard(self, parts: list[torch.Tensor], dim: int, cfg: ModelConfig) -> torch.Tensor:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return _cat([_cat([h[0] for h in halves], dim), _cat([h[1] for h in halves], dim)], dim)


EVEN = EvenSplit()

_VIT_ATTN = r"vision_model\.encoder\.layers\.\d+\.self_attention\."
SHARD_RULES: tuple[tuple[str, EvenSplit], ...] = (
    (_VIT_ATTN + r"linear_qkv\.(weight|bias)$", HeadSplit(heads_per_block=3)),
    (_VIT_ATTN + r"linear_proj\.weight$", HeadSplit()),
    (_VIT_ATTN + r"[qk]_layernorm\.weight$", HeadSplit()),
    (r"language_model\.decoder\.layers\.\d+\.mlp\.(experts\.local_experts\.\d+\.)?linear_fc1\.weight$", GatedSplit()),
    (r"language_model\.(embedding\.word_embeddings|output_layer)\.weight$", VocabSplit()),
)
"""(regex on the canonical name, rule); first match wins, no match: EVEN."""

ROW_PARALLEL = r"(^|\.)(linear_proj|linear_fc2)\.weight\d*$"
"""Weights of row-parallel linears (attention output, MLP fc2; `weight{i}` of a grouped linear):
split along their input, dim 1. Every other tensor-parallel weight splits along dim 0."""

_ROW = re.compile(ROW_PARALLEL)

_COMPILED = tuple((re.compile(pattern), rule) for pattern, rule in SHARD_RULES)


def split_dim(name: str) -> int:
    """The dim the tensor-parallel weight `name` (canonical or local name) is split along."""
    return 1 if _ROW.search(name) else 0


def rule_for(name: str) -> EvenSplit:
    """The sharding rule of the canonical parameter `name`."""
    return next((rule for pattern, rule in _COMPILED if pattern.search(name)), EVEN)
