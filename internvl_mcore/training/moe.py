"""Mixture-of-experts bookkeeping for the training loop: the load-balancing loss megatron-core's
routers record each step, reduced over ranks for logging (the MoE flag checks: config/problems.py)."""

from __future__ import annotations

from megatron.core.process_groups_config import ProcessGroupCollection

AUX_LOSS_NAME = "load_balancing_loss"  # the tracker key megatron-core's Router uses for aux_loss


def reduced_aux_loss(num_microbatches: int, pg: ProcessGroupCollection) -> float:
    """The step's load-balancing loss (without its coefficient), per MoE layer and microbatch,
    reduced over pipeline, tensor/context and data-parallel ranks of `pg` (collective: every rank calls it),
    as megatron-core's `track_moe_metrics` reports it; the tracker is cleared for the next step."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    if AUX_LOSS_NAME not in tracker:
        return float("nan")  # coefficient 0: megatron-core computes no aux loss
    reduce_aux_losses_tracker_across_ranks([AUX_LOSS_NAME], pg_collection=pg)
    values = tracker[AUX_LOSS_NAME]["values"]  # (num_layers,) summed over microbatches
    loss = float(values.sum()) / values.numel() / num_microbatches
    clear_aux_losses_tracker()
    return loss


def clear_aux_losses() -> None:
    """Forget the router losses recorded since the last step (forward-only passes record them too)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
