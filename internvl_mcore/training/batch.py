"""The microbatch the forward step consumes, whatever the data source: shards and mock data go
through the same collate (data/loader.py: collate, via `Batch.from_packs`). Its images are one type,
`Images` (made by the collate, so it lives in data/source_images.py): the forward step calls
`Images.pixel_values()` whatever the tiling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..data.loader import collate
from ..data.sample import PackedSample
from ..data.source_images import Images

__all__ = ["Batch", "Images"]


@dataclass
class Batch:
    """B packed sequences of exactly S tokens."""

    tokens: torch.Tensor
    """(B, S) int64 input ids."""
    labels: torch.Tensor
    """(B, S) int64 next-token targets (the pad id where loss_weight is 0)."""
    loss_weight: torch.Tensor
    """(B, S) float32 weight of each token's loss, 0 where the token is no target: 1 at the targets
    from the collate; the loop replaces it with --loss-reduction's weights (training/data.py: loss_weights)."""
    position_ids: torch.Tensor
    """(B, S) float32 V2PE positions."""
    cu_seqlens: torch.Tensor
    """(n+1,) int32 sample boundaries over the batch-major flattened B*S tokens."""
    images: Optional[Images]
    """Tiles of every image, in batch order, as the data made them: uint8 tiles cut on the host, decoded
    images the first pipeline stage tiles on its device (--image-tiling device), or mock data's normalized
    floats; `images.pixel_values()` is the vision model's input on their device. None on the pipeline
    stages after the first (training/step.py: batch_for_stage)."""
    pairs: Optional[torch.Tensor] = None
    """(P, 2) int64 [chosen, rejected] segment indices (cu_seqlens segments) of preference data (--stage mpo)."""
    ref_logps: Optional[torch.Tensor] = None
    """(N,) float32 per-segment response log-prob sums of the frozen reference model (last stage, --stage mpo)."""

    @staticmethod
    def from_packs(packs: Sequence[PackedSample], seq_length: int, pad_id: int) -> "Batch":
        """The batch of `packs` (data/loader.py: collate pads and stacks them)."""
        d = collate(packs, seq_length, pad_id)
        return Batch(
            tokens=d["tokens"],
            labels=d["labels"],
            loss_weight=d["loss_weight"],
            position_ids=d["position_ids"],
            cu_seqlens=d["cu_seqlens"],
            images=d["images"],
            pairs=d["pairs"] if d["pairs"].shape[0] else None,
        )

    def targets(self) -> torch.Tensor:
        """(B, S) float32 1 at the tokens that carry loss (whatever their weight), 0 elsewhere."""
        return (self.loss_weight != 0).float()

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device`."""
        return Batch(**{k: None if v is None else v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    def pin_memory(self) -> "Batch":
        """The same batch in page-locked memory (copies to a GPU asynchronously)."""
        return Batch(**{k: None if v is None else v.pin_memory() for k, v in self.__dict__.items()})
