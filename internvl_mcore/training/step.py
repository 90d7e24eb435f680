"""The forward step megatron-core's schedules call once per microbatch, and its loss."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator

import torch
from megatron.core.utils import unwrap_model

from ..parallel.context_parallel import TokenSplit
from .batch import Batch


def loss_func(
    weights: torch.Tensor, scale: float, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Weighted sum of per-token losses, and the number of target tokens.

    With `calculate_per_token_loss`, megatron-core adds the target-token counts T over microbatches
    and data-parallel ranks and divides the gradients by T once (finalize_model_grads). The step is
    meant to minimize sum(w * loss) / W (W = sum of weights over the global batch), so the sum is
    scaled by T / W (`scale`, 1 for token reduction where w is the mask and W = T)."""
    w = weights.float()
    weighted = (per_token_loss.float() * w).sum()
    count = (w > 0).sum()
    out = weighted * scale if scale != 1.0 else weighted
    return out, count.to(torch.int), {"lm loss": torch.stack([weighted.detach(), w.sum()])}


def batch_for_stage(batch: Batch, model: torch.nn.Module) -> Batch:
    """The microbatch as this pipeline stage runs it: on the model's device (--device), and with the
    image bytes only on the first stage (the only one that reads pixels; later stages would copy
    every tile to the device for nothing)."""
    if batch.images is not None and not getattr(unwrap_model(model), "pre_process", True):
        batch = dataclasses.replace(batch, images=None)
    device = next(model.parameters()).device
    return batch.to(device) if device.type != "cpu" else batch


def run_model(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, TokenSplit]:
    """The stage's output for a microbatch, and the microbatch's context-parallel split: built once
    here, for every stage (training, MPO and its reference, evaluation); the model splices images into
    the whole sequence, then splits the embeddings with it, and it gets this CP rank's positions,
    labels and loss weights (whose nonzero entries pick the tokens the last stage computes losses for)."""
    split = unwrap_model(model).token_split(batch.cu_seqlens, batch.tokens.shape)
    pixel_values = batch.images.pixel_values() if batch.images is not None else None  # normalized, on the device
    output = model(
        batch.tokens,
        split.split(batch.position_ids),
        pixel_values=pixel_values,
        labels=split.split(batch.labels),
        cu_seqlens=batch.cu_seqlens,
        loss_weight=split.split(batch.loss_weight),
        split=split,
    )
    return output, split


def forward_step(
    data_iterator: Iterator[Batch], model: torch.nn.Module, scale: float = 1.0
) -> tuple[torch.Tensor, Callable]:
    """Run one microbatch through this stage; the loss function runs on the last stage only."""
    batch = batch_for_stage(next(data_iterator), model)
    output, split = run_model(model, batch)
    return output, functools.partial(loss_func, split.split(batch.loss_weight), scale)  # this rank's tokens' losses
