"""The forward step megatron-core's schedules call once per microbatch, and its loss."""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch

from .batch import Batch


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sum of masked per-token losses and the number of target tokens.

    With `calculate_per_token_loss`, megatron-core adds the counts over microbatches and
    data-parallel ranks and divides the gradients by the total once (finalize_model_grads), so the
    step optimizes the mean over every target token of the global batch, whatever the layout."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """Run one microbatch through this stage; the loss function runs on the last stage only."""
    batch = next(data_iterator)
    output = model(batch.tokens, batch.position_ids, pixel_values=batch.pixel_values,
                   labels=batch.labels, cu_seqlens=batch.cu_seqlens)
    return output, functools.partial(loss_func, batch.loss_mask)
