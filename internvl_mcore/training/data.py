"""Where a rank's microbatches come from: preprocessed shards or mock data, as `Batch`es."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config.device import resolve_device
from ..config.training import RunConfig
from ..data.loader import PackedDataLoader
from ..data.workers import WorkerError
from ..data.resample import PillowMismatch, pass_order
from ..errors import DataError
from .balance import balance_for
from .batch import Batch
from .mock import mock_batches
from .shard_checks import check_manifest


def resolve_image_tiling(requested: str, device: str) -> str:
    """'loader' or 'device' for --image-tiling on a run whose device is `device` ('cuda' / 'cpu').

    'auto' tiles on the device on CUDA (on a CPU device the CPU does the work either way and Pillow is
    faster there), and in the loader if the installed Pillow resizes differently from resample.py's
    exact re-implementation (a newer Pillow that changed its arithmetic); 'device' then refuses to start."""
    if requested not in ("auto", "loader", "device"):
        raise DataError(f"--image-tiling {requested!r}: choose auto, loader or device")
    if requested == "loader" or (requested == "auto" and device != "cuda"):
        return "loader"
    try:
        pass_order()
    except PillowMismatch as exc:
        if requested == "device":
            raise DataError(f"--image-tiling device: {exc}") from None
        print(f"warning: --image-tiling auto: {exc}; tiling in the loader", flush=True)
        return "loader"
    return "device"


class ShardBatches:
    """Microbatches from `PackedDataLoader` for one data-parallel rank, resumable by `state_dict`."""

    def __init__(
        self,
        run: RunConfig,
        dp_rank: int,
        dp_size: int,
        decode_tiles: bool = True,
        trainable: Optional[Sequence[str]] = None,
    ) -> None:
        self.image_tiling = resolve_image_tiling(run.data.image_tiling, resolve_device(run.compute.device))
        try:
            self.loader = PackedDataLoader(
                run.data.data_path,
                dp_rank=dp_rank,
                dp_size=dp_size,
                seed=run.train.seed,
                num_workers=run.data.num_workers,
                image_tiling=self.image_tiling,
                worker_timeout=run.data.data_worker_timeout,
                balance=balance_for(run, dp_size, trainable),
            )
        except DataError as exc:
            raise DataError(f"--data-path {' '.join(run.data.data_path)}: {exc}") from exc
        self.cfg = run.model
        for prefix in self.loader.prefixes:
            try:
                check_manifest(prefix, run)
            except DataError as exc:
                raise DataError(str(exc)) from None
        self.seq_length = run.train.seq_length
        self.micro_batch_size = run.train.micro_batch_size
        self.pin_memory = torch.cuda.is_available()  # page-locked tiles (or pixels) copy to the GPU asynchronously

    def __iter__(self) -> "ShardBatches":
        return self

    def __next__(self) -> Batch:
        try:
            packs = [next(self.loader) for _ in range(self.micro_batch_size)]
        except WorkerError as exc:  # a worker died or stalled: one line naming it and its pack, exit 2
            raise DataError(str(exc)) from None
        batch = Batch.from_packs(packs, self.seq_length, self.cfg.pad_token_id)
        tokens = batch.tokens
        # shards changed after the start-up check (--no-verify-shards trusts them): one line, not an
        # IndexError in the embedding
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.cfg.llm.vocab_size:
            raise DataError(
                f"shard set {' '.join(self.loader.prefixes)}: a pack holds token id "
                f"{int(tokens.max())} (min {int(tokens.min())}) outside the model's vocabulary of "
                f"{self.cfg.llm.vocab_size} rows; re-run tools/preprocess_mm_data.py"
            )
        return batch.pin_memory() if self.pin_memory else batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def load_resharded_state(self, states: list[dict]) -> None:
        """The position of a run with another data-parallel size (every saved rank's state, in order)."""
        self.loader.load_resharded_state(states)


class MockBatches:
    """`mock_batches` with a resumable position (the iteration it starts at)."""

    def __init__(self, run: RunConfig, dp_rank: int, dp_size: int) -> None:
        self.run, self.dp_rank, self.dp_size = run, dp_rank, dp_size
        self.start(0)

    def start(self, iteration: int) -> None:
        t = self.run.train
        self.first_iteration, self.served = iteration, 0
        self.per_step = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self._it = mock_batches(
            self.run.model,
            t.seed,
            t.seq_length,
            self.run.data.mock_tiles_per_sample,
            t.micro_batch_size,
            t.global_batch_size,
            self.dp_rank,
            self.dp_size,
            iteration,
        )

    def __iter__(self) -> "MockBatches":
        return self

    def __next__(self) -> Batch:
        self.served += 1
        return next(self._it)

    def state_dict(self) -> dict:
        return {"mock_iteration": self.first_iteration + self.served // self.per_step}

    def load_state_dict(self, state: dict) -> None:
        self.start(state["mock_iteration"])

    def load_resharded_state(self, states: list[dict]) -> None:
        """Mock samples are numbered per iteration, whatever the data-parallel size: any rank's state."""
        if len({s["mock_iteration"] for s in states}) != 1:
            raise DataError(f"the saved ranks stopped at different iterations {[s['mock_iteration'] for s in states]}")
        self.load_state_dict(states[0])


def build_batches(
    run: RunConfig, dp_rank: int, dp_size: int, trainable: Optional[Sequence[str]] = None
) -> ShardBatches | MockBatches:
    """The microbatch stream of this data-parallel rank (`trainable`: the parts --balance-dp-compute
    counts the backward passes of; None: all)."""
    if run.data.mock_data:
        return MockBatches(run, dp_rank, dp_size)
    return ShardBatches(run, dp_rank, dp_size, trainable=trainable)


def loss_weights(batch: Batch, reduction: str) -> torch.Tensor:
    """(B, S) per-token weights: InternVL's len2weight of each sample's number of target tokens n:
    1 (token), 1/n (sample), 1/sqrt(n) (square); 0 where no loss."""
    mask = batch.targets()
    if reduction == "token":
        return mask
    flat = mask.reshape(-1)
    cu = batch.cu_seqlens.long()
    seg = torch.bucketize(torch.arange(flat.numel()), cu[1:], right=True)  # segment of every token
    n = torch.zeros(len(cu) - 1).scatter_add_(0, seg, flat)
    per_seg = {"sample": 1.0 / n.clamp_min(1.0), "square": n.clamp_min(1.0).rsqrt()}[reduction]
    return (per_seg[seg] * flat).reshape(mask.shape)
