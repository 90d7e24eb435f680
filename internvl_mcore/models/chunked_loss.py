"""Output layer + vocab-parallel cross entropy in chunks of tokens, never holding the full logits.

megatron-core's path (`ColumnParallelLinear` -> `vocab_parallel_cross_entropy`) materializes the
fp32 logits of every token, (N, V/tp), and keeps them (turned into the softmax) until the backward:
16k tokens x 32000 vocabulary = 2 GiB per microbatch. Here each chunk of `chunk` tokens computes its
logits, reduces max / sum-exp / target logit over the tensor-parallel group exactly as
`VocabParallelCrossEntropy` does, and keeps only the per-token log-sum-exp; the backward
recomputes each chunk's logits (one more output-layer GEMM) and forms the softmax gradient
chunk by chunk. The result is the same per-token loss (B, S) -- what the loss function and MPO's
per-sequence log-probs consume -- up to fp32 reordering (tests/models/test_chunked_loss.py).

Tensor parallelism: the weight is this rank's vocabulary shard; the input goes through the same
megatron-core mappings `ColumnParallelLinear` uses (copy with all-reduced gradient, or the
sequence-parallel all-gather with reduce-scattered gradient), so the hidden-state gradient leaves
here as this rank's partial sum, as the linear's would.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """(n, H) x (V/tp, H) -> (n, V/tp) fp32 logits, padded vocabulary entries at -inf."""
    logits = torch.matmul(hidden, weight.t()).float()
    valid = vocab_size - vocab_start  # columns of this shard that are real tokens
    if valid < logits.shape[1]:
        logits[:, max(valid, 0) :] = float("-inf")
    return logits


class _ChunkedVocabParallelCE(torch.autograd.Function):
    """hidden (N, H) (full sequence on this rank), weight (V/tp, H), labels (N,) global ids -> (N,) loss."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        vocab_start: int,
        vocab_size: int,
        group: Any,
    ) -> torch.Tensor:
        n, shard = hidden.shape[0], weight.shape[0]
        local = labels - vocab_start
        in_shard = (local >= 0) & (local < shard)
        local = local.masked_fill(~in_shard, 0)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(loss)  # log-sum-exp per token, all the backward needs besides the inputs
        tp = group is not None and dist.get_world_size(group) > 1
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = _chunk_logits(hidden[s:e], weight, vocab_start, vocab_size)  # (n_c, V/tp)
            peak = logits.max(dim=1).values  # (n_c,)
            if tp:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(peak[:, None])
            target = logits.gather(1, local[s:e, None]).squeeze(1).masked_fill(~in_shard[s:e], 0.0)
            sums = torch.stack([logits.exp_().sum(dim=1), target])  # (2, n_c)
            if tp:
                dist.all_reduce(sums, group=group)
            log_sum = sums[0].log()
            loss[s:e] = log_sum - sums[1]
            lse[s:e] = log_sum + peak
        ctx.save_for_backward(hidden, weight, local, in_shard, lse)
        ctx.chunk, ctx.vocab_start, ctx.vocab_size = chunk, vocab_start, vocab_size
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple:
        hidden, weight, local, in_shard, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, hidden.shape[0])
            # d loss / d logits = softmax - one_hot(target), scaled by the incoming per-token gradient
            grad = _chunk_logits(hidden[s:e], weight, ctx.vocab_start, ctx.vocab_size)  # (n_c, V/tp)
            grad.sub_(lse[s:e, None]).exp_()
            rows = torch.arange(e - s, device=grad.device)
            grad[rows, local[s:e]] -= in_shard[s:e].to(grad.dtype)
            grad.mul_(grad_loss[s:e, None])
            grad = grad.to(hidden.dtype)
            grad_hidden[s:e] = grad @ weight
            grad_weight.addmm_(grad.t(), hidden[s:e])
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def output_layer_input(hidden: torch.Tensor, tp_group: Any, sequence_parallel: bool) -> torch.Tensor:
    """hidden (S, B, H) (S/tp with sequence parallelism) through the mapping ColumnParallelLinear
    applies to its input: the sequence-parallel all-gather with reduce-scattered gradient, or a copy
    with all-reduced gradient. Every TP rank then holds the whole (S, B, H)."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=tp_group)
    return copy_to_tensor_model_parallel_region(hidden, group=tp_group)


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, vocab_size: int, tp_group: Any
) -> torch.Tensor:
    """Per-token cross entropy (B, S) of hidden (S, B, H), already through `output_layer_input`,
    against labels (B, S), through the vocab-parallel output weight (V/tp, H) in chunks of `chunk`
    tokens. `vocab_size`: the real vocabulary (entries beyond it, TP padding, never win)."""
    s, b, h = hidden.shape
    vocab_start = tp_group.rank() * weight.shape[0] if tp_group is not None else 0
    flat_labels = labels.transpose(0, 1).reshape(-1)  # (S*B,) in the hidden states' order
    loss = _ChunkedVocabParallelCE.apply(
        hidden.reshape(s * b, h), weight, flat_labels, chunk, vocab_start, vocab_size, tp_group
    )
    return loss.view(s, b).transpose(0, 1).contiguous()  # (B, S)


def chunked_output_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int,
    vocab_size: int,
    tp_group: Any,
    sequence_parallel: bool,
) -> torch.Tensor:
    """`chunked_cross_entropy` of hidden (S, B, H) (S/tp with sequence parallelism) as the output
    layer receives it."""
    return chunked_cross_entropy(
        output_layer_input(hidden, tp_group, sequence_parallel), weight, labels, chunk, vocab_size, tp_group
    )
