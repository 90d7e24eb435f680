"""The microbatch the forward step consumes, whatever the data source."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..data.source_images import SourceImages


@dataclass
class Batch:
    """B packed sequences of exactly S tokens."""

    tokens: torch.Tensor
    """(B, S) int64 input ids."""
    labels: torch.Tensor
    """(B, S) int64 next-token targets (any valid id where loss_mask is 0)."""
    loss_mask: torch.Tensor
    """(B, S) float32, 1 where the target counts."""
    position_ids: torch.Tensor
    """(B, S) float32 V2PE positions."""
    cu_seqlens: torch.Tensor
    """(n+1,) int32 sample boundaries over the batch-major flattened B*S tokens."""
    pixel_values: torch.Tensor | SourceImages
    """Tiles of every image, in batch order: (T, H, W, 3) uint8 RGB from shards (the vision model
    normalizes them on its device), (T, 3, H, W) float32 already normalized (mock data), or the decoded
    images the first pipeline stage tiles on its device (--image-tiling device; `.shape` is the tiles')."""
    loss_weight: Optional[torch.Tensor] = None
    """(B, S) float32 per-token loss weights (set by the loop from --loss-reduction; None = loss_mask)."""
    pairs: Optional[torch.Tensor] = None
    """(P, 2) int64 [chosen, rejected] segment indices (cu_seqlens segments) of preference data (--stage mpo)."""
    ref_logps: Optional[torch.Tensor] = None
    """(N,) float32 per-segment response log-prob sums of the frozen reference model (last stage, --stage mpo)."""

    @staticmethod
    def collate(samples: list[dict], seq_length: int) -> "Batch":
        """Stack per-sequence dicts (tokens, labels, loss_mask, position_ids, cu_seqlens, pixel_values);
        each sequence's boundaries are offset by its row's start in the flattened batch."""
        cu = [torch.zeros(1, dtype=torch.int32)]
        for row, s in enumerate(samples):
            if s["tokens"].shape[0] != seq_length:
                raise ValueError(f"sequence {row} has {s['tokens'].shape[0]} tokens, expected {seq_length}")
            cu.append(s["cu_seqlens"][1:].to(torch.int32) + row * seq_length)
        return Batch(
            tokens=torch.stack([s["tokens"] for s in samples]).long(),
            labels=torch.stack([s["labels"] for s in samples]).long(),
            loss_mask=torch.stack([s["loss_mask"] for s in samples]).float(),
            position_ids=torch.stack([s["position_ids"] for s in samples]).float(),
            cu_seqlens=torch.cat(cu),
            pixel_values=torch.cat([s["pixel_values"] for s in samples]).float(),
        )

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device`."""
        return Batch(**{k: None if v is None else v.to(device, non_blocking=True) for k, v in self.__dict__.items()})
