"""Where a microbatch goes: onto the model's device (--device) in the plain and
the MPO forward steps -- not onto CUDA because CUDA exists -- and with image bytes only on the first
pipeline stage. A stand-in stage with its weight on the meta device shows the placement: whatever
reaches it was moved to the model's device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from internvl_mcore.parallel.context_parallel import TokenSplit
from internvl_mcore.training import mpo
from internvl_mcore.training.batch import Batch, Images
from internvl_mcore.training.step import forward_step


class _Stage(torch.nn.Module):
    """A pipeline stage that records what it is called with."""

    def __init__(self, device: str, first: bool) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))
        self.pre_process, self.seen = first, {}

    def forward(
        self, tokens, position_ids, pixel_values=None, labels=None, cu_seqlens=None, loss_weight=None, split=None
    ):
        self.seen = {"tokens": tokens, "pixel_values": pixel_values, "cu_seqlens": cu_seqlens}
        return tokens.float()

    def token_split(self, cu_seqlens, shape):
        return TokenSplit("none", 0, 1)


def _batch() -> Batch:
    s = 8
    return Batch(
        tokens=torch.zeros(1, s, dtype=torch.long),
        labels=torch.zeros(1, s, dtype=torch.long),
        loss_weight=torch.ones(1, s),
        position_ids=torch.arange(s, dtype=torch.float32)[None],
        cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32),
        images=Images(normalized=torch.zeros(2, 3, 4, 4)),
        pairs=torch.tensor([[0, 1]]),
        ref_logps=torch.zeros(2),
    )


@pytest.mark.parametrize("step", ["plain", "mpo", "reference"])
@pytest.mark.parametrize("first", [True, False])
def test_batch_follows_the_model_device_and_pixels_stay_off_later_stages(step: str, first: bool) -> None:
    model = _Stage("meta", first)
    if step == "plain":
        forward_step(iter([_batch()]), model)
    elif step == "mpo":
        mpo.mpo_forward_step(iter([_batch()]), model, ctx=None)
    else:
        mpo.reference_forward_step(iter([_batch()]), model)
    assert model.seen["tokens"].device.type == "meta"  # moved to the model's device
    if first:
        assert model.seen["pixel_values"].device.type == "meta"
    else:
        assert model.seen["pixel_values"] is None  # no tile bytes copied to a later stage's device


@pytest.mark.parametrize("step", ["mpo", "reference"])
def test_mpo_on_device_cpu_ignores_a_present_gpu(step: str, monkeypatch) -> None:
    """--device cpu on a CUDA host: the MPO steps keep the batch on the CPU (they used to move it to
    torch.cuda.current_device() whenever CUDA was available)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked for a CUDA device"))
    model = _Stage("cpu", True)
    fn = mpo.mpo_forward_step if step == "mpo" else mpo.reference_forward_step
    fn(iter([_batch()]), model, **({"ctx": None} if step == "mpo" else {}))
    assert model.seen["tokens"].device.type == "cpu"


def test_mpo_reference_is_built_beside_the_policy(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mpo, "build_model", lambda *a, **k: torch.nn.Linear(2, 2))
    policy = torch.nn.Linear(2, 2, device="meta")
    policy.pg_collection = None
    run = SimpleNamespace(parallel=None, compute=None, checkpoint=SimpleNamespace(load=None))
    ref = mpo.build_reference(run, None, policy)
    assert next(ref.parameters()).device.type == "meta"


def test_forward_step_splits_the_batch_once_and_hands_the_model_this_cp_ranks_tokens() -> None:
    """One TokenSplit per microbatch (issue 26 item 3): the model gets the whole token ids (for the image
    splice) but this CP rank's positions, labels and loss weights, and the loss the same rank's weights."""
    from internvl_mcore.parallel.context_parallel import split_for_cp

    class _CPStage(_Stage):
        def __init__(self) -> None:
            super().__init__("cpu", True)
            self.splits = 0

        def forward(
            self, tokens, position_ids, pixel_values=None, labels=None, cu_seqlens=None, loss_weight=None, split=None
        ):
            self.seen = {"tokens": tokens, "position_ids": position_ids, "loss_weight": loss_weight, "split": split}
            return torch.ones_like(position_ids)

        def token_split(self, cu_seqlens, shape):
            self.splits += 1
            return TokenSplit.build("row", cu_seqlens, shape, SimpleNamespace(size=lambda: 2, rank=lambda: 1))

    model, batch = _CPStage(), _batch()
    batch.loss_weight = torch.arange(8, dtype=torch.float32)[None]
    out, loss = forward_step(iter([batch]), model)
    assert model.splits == 1 and model.seen["split"].layout == "row"
    assert torch.equal(model.seen["tokens"], batch.tokens)  # whole rows: images are spliced before the split
    assert torch.equal(model.seen["position_ids"], split_for_cp(batch.position_ids, 1, 1, 2))
    assert model.seen["position_ids"].tolist() == [[2.0, 3.0, 4.0, 5.0]]  # chunks 1 and 2 of 4
    total, count, logged = loss(out)
    assert float(total) == 2 + 3 + 4 + 5 and int(count) == 4  # this rank's weights, not the whole row's
