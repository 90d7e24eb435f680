"""--balance-dp-compute: each pack's estimated compute, by which the loader deals a global batch's
packs to data-parallel ranks and microbatches (data/packing.py: balanced_layout).

Packs hold about the same number of tokens but not the same work: the ViT's cost grows with the
pack's tiles and attention with each segment's length squared. The estimate is the planner's FLOP
model (plan/flops.py) of the pack as the training step runs it: padded to --seq-length (the
padding tail is one more causally attending segment, as the collate makes it), its tiles through
the ViT and projector, logits only at the loss tokens unless --all-token-logits, and frozen parts
at the passes they run (`FlopBreakdown.step`)."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

from ..config.model import ModelConfig
from ..config.training import RunConfig
from ..data.loader import Balance
from ..data.packing import PackShape
from ..errors import DataError
from ..plan.flops import forward_flops
from ..config.training import Plan


def pack_cost(
    model: ModelConfig,
    shape: PackShape,
    seq_length: int,
    trainable: Optional[Sequence[str]] = None,
    all_token_logits: bool = False,
) -> float:
    """Model FLOPs (forward + backward) of one pack in a microbatch row of `seq_length` tokens."""
    segments = list(shape.segment_lengths)
    if shape.tokens > seq_length:
        raise DataError(f"a pack of {shape.tokens} tokens does not fit --seq-length {seq_length}")
    if shape.tokens < seq_length:
        segments.append(seq_length - shape.tokens)
    flops = forward_flops(
        model,
        seq_length,
        shape.tiles,
        attention_lengths=segments,
        lm_head_tokens=None if all_token_logits else shape.loss_tokens,
    )
    return flops.step(trainable)


def trainable_parts(plan: Plan) -> list[str]:
    """The parts whose weights the stage trains, as plan/flops.py names them."""
    return [
        part
        for part, on in (
            ("vision", plan.train_vit or plan.unfreeze_vit_layers > 0),
            ("projector", plan.train_projector),
            ("llm", plan.train_llm),
        )
        if on
    ]


def balance_for(run: RunConfig, dp_size: int, trainable: Optional[Sequence[str]]) -> Optional[Balance]:
    """The loader's deal of each global batch under --balance-dp-compute (None without it)."""
    if not run.data.balance_dp_compute:
        return None
    t = run.train
    cost: Callable[[PackShape], float] = functools.partial(
        pack_cost,
        run.model,
        seq_length=t.seq_length,
        trainable=list(trainable) if trainable is not None else None,
        all_token_logits=run.compute.all_token_logits,
    )
    return Balance(cost=cost, packs_per_rank=t.global_batch_size // dp_size, micro_batch_size=t.micro_batch_size)
