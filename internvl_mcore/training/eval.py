"""Validation during training: forward-only passes of megatron-core's schedule over held-out batches.

Every evaluation reads the same first `--eval-iters` global batches of the validation stream
(--valid-data-path shards, or --mock-valid-data: generated batches of another seed), so evaluations
of one run compare with each other. The loss is sum(w * loss) / sum(w) over all of them (w: the
run's --loss-reduction weights), summed over microbatches, data- and context-parallel ranks on the
last pipeline stage and handed to every rank (loop.evaluate): the same number in every layout. The model runs in
eval mode (no drop path) and every random stream is put back afterwards, so training is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from megatron.core.utils import unwrap_model

from ..config.training import RunConfig, has_validation
from ..errors import DataError
from ..parallel.schedules import forward_backward
from .batch import Batch
from .checkpoint import rng_state, set_rng_state
from .data import MockBatches, ShardBatches, loss_weights
from .moe import clear_aux_losses
from .step import forward_step

# mock validation samples are drawn with seed + this: mock_sample keys its generator by
# seed * 7919 + index, so the two streams share no sample for any realistic run length
MOCK_VALID_SEED_OFFSET = 1_000_003


def build_valid_batches(run: RunConfig, dp_rank: int, dp_size: int) -> Optional[ShardBatches | MockBatches]:
    """This data-parallel rank's validation stream, or None without validation data."""
    if not has_validation(run):
        return None
    if run.data.mock_valid_data:
        t = dataclasses.replace(run.train, seed=run.train.seed + MOCK_VALID_SEED_OFFSET)
        return MockBatches(dataclasses.replace(run, train=t), dp_rank, dp_size)
    data = dataclasses.replace(run.data, data_path=list(run.data.valid_data_path))
    try:
        batches = ShardBatches(dataclasses.replace(run, data=data), dp_rank, dp_size)
    except DataError as exc:  # the message names --data-path: say which flag it really was
        raise DataError(str(exc).replace("--data-path", "--valid-data-path", 1)) from None
    batches.loader.augment = False  # validation measures the data as it is
    return batches


class Evaluator:
    """Runs `--eval-iters` forward-only global batches; `forward` is collective (every rank calls it)."""

    def __init__(self, batches: ShardBatches | MockBatches, run: RunConfig, num_microbatches: int) -> None:
        self.batches, self.run, self.num_microbatches = batches, run, num_microbatches
        self.start = batches.state_dict()

    def forward(self, model: list) -> list[list[dict]]:
        """The microbatch losses ({"lm loss": [sum(w * loss), sum(w)]}, last pipeline stage) of each of
        the `--eval-iters` batches, from forward-only passes in eval mode (collective); the caller
        reduces them like the training loss (loop.reduce_loss_totals)."""
        t = self.run.train
        step_func = forward_step
        self.batches.load_state_dict(self.start)
        rng = rng_state()
        for chunk in model:
            chunk.eval()
        out = []
        try:
            with torch.no_grad():
                for _ in range(t.eval_iters):
                    batches = self._weighted(next(self.batches) for _ in range(self.num_microbatches))
                    out.append(
                        forward_backward(
                            unwrap_model(model[0]).pg_collection,
                            forward_step_func=step_func,
                            data_iterator=iter(batches),
                            model=model,
                            num_microbatches=self.num_microbatches,
                            seq_length=t.seq_length,
                            micro_batch_size=t.micro_batch_size,
                            forward_only=True,
                        )
                    )
        finally:
            for chunk in model:
                chunk.train()
            set_rng_state(rng)
            if self.run.model.llm.is_moe:  # the forward passes recorded router losses: not the next step's
                clear_aux_losses()
        return out

    def _weighted(self, batches: Any) -> list[Batch]:
        """The microbatches with the run's --loss-reduction weights (token: the loss mask)."""
        out = list(batches)
        if self.run.train.loss_reduction != "token":
            for b in out:
                b.loss_weight = loss_weights(b, self.run.train.loss_reduction)
        return out
