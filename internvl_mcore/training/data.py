"""Where a rank's microbatches come from: preprocessed shards or mock data, as `Batch`es.

torch, the batches and the image resampler are imported where they are used: pretrain_internvl.py runs
`check_shard_sets` before training, and a data error found there costs an interpreter start and the
shard files' reading, not torch's import (tests/reliability/test_cli_pretrain.py checks it).
"""

from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING, Optional, Sequence

from tqdm import tqdm

from ..config.model import ModelConfig
from ..config.training import RunConfig
from ..data.loader import PackedDataLoader, parse_data_path
from ..data.workers import WorkerError
from ..data.shards import ShardReader, manifest_path, max_token_id, sha256_file, shard_files
from ..cli_errors import read_json, user_path
from ..errors import DataError
from .balance import balance_for

if TYPE_CHECKING:
    import torch

    from .batch import Batch


def _prefix_problem(prefix: str, flag: str) -> str | None:
    """Why `prefix` is not a shard set (a folder, nothing there), or None."""
    if os.path.isdir(prefix):
        found = sorted(glob.glob(os.path.join(glob.escape(prefix), "*.manifest.json")))[:3]
        hint = (": it holds " + ", ".join(f[: -len(".manifest.json")] for f in found)) if found else ""
        return f"{flag} {prefix} is a directory; give a shard prefix DIR/NAME (of DIR/NAME.manifest.json){hint}"
    if not os.path.isfile(manifest_path(prefix)):
        return f"{flag} {prefix}: no shard set there ({manifest_path(prefix)} not found)"
    return None


def check_shard_sets(
    entries: list[str], run: RunConfig, flag: str = "--data-path", rank: int = 0, world: int = 1
) -> None:
    """Everything about the shard sets that can be known before training: the prefixes exist, the
    blend parses, each manifest fits the model and --seq-length and has packs, each set opens (file
    sizes match the indexes) and, unless --no-verify-shards, every file's sha256 matches its manifest.
    The hashing is split over the job: rank r hashes files r, r + world, ... Raises DataError."""
    prefixes = [e for e in entries if not _is_number(e)]
    for prefix in prefixes:
        if (problem := _prefix_problem(prefix, flag)) is not None:
            raise DataError(problem)
    try:
        blend = parse_data_path(entries)
    except DataError as exc:
        raise DataError(str(exc) if str(exc).startswith(flag) else f"{flag}: {exc}") from None
    for weight, prefix in blend:  # the manifests alone first: cheap, and megatron-core is not imported yet
        try:
            packs = check_manifest(prefix, run)
            check_token_range(prefix, run.model)
        except DataError as exc:
            raise DataError(f"{flag} {prefix}: {exc}") from None
        if weight > 0 and packs == 0:
            raise DataError(f"{flag} {prefix}: the shard set is empty (0 packs; see {prefix}.rejects.jsonl)")
    readers = []
    for prefix in prefixes:
        try:
            with user_path(DataError):  # a shard file that cannot be opened (permissions)
                readers.append(ShardReader(prefix))
        except DataError as exc:
            raise DataError(f"{flag} {prefix}: {exc}") from None
    if not run.data.no_verify_shards:
        verify_checksums(readers, rank, world, flag)


def check_token_range(prefix: str, cfg: ModelConfig) -> None:
    """Every token id of the shard set indexes the model's embedding (the manifest's recorded largest
    id; older manifests: a pass over the tokens file)."""
    path = manifest_path(prefix)
    with user_path(DataError):  # the pass over the tokens file of an older manifest
        top = max_token_id(prefix, read_json(path, DataError))
    if top >= cfg.llm.vocab_size:
        raise DataError(
            f"{path}: token id {top} is outside the model's vocabulary of {cfg.llm.vocab_size} rows "
            f"(--model {cfg.name}); the shards were made with another tokenizer"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def verify_checksums(readers: list, rank: int, world: int, flag: str) -> None:
    """sha256 of this rank's share of the shard files against the manifests (progress bar on rank 0)."""
    files = [(r, path) for r in readers for path in shard_files(r.prefix)][rank::world]
    total = sum(os.path.getsize(path) for _, path in files)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="verifying shards",
        disable=None if rank == 0 else True,
        leave=False,
    ) as bar:
        for reader, path in files:
            want = reader.expected_sha256(os.path.basename(path)[len(os.path.basename(reader.prefix)) + 1 :])
            if want is None:
                raise DataError(
                    f"{flag}: {manifest_path(reader.prefix)} has no sha256 for {path} "
                    "(--no-verify-shards to train on it unchecked)"
                )
            if sha256_file(path) != want:
                raise DataError(
                    f"{flag}: {path} does not match the sha256 in {manifest_path(reader.prefix)} "
                    "(changed or corrupted since preprocessing; re-run tools/preprocess_mm_data.py, "
                    "or --no-verify-shards to train on it anyway)"
                )
            bar.update(os.path.getsize(path))


def resolve_image_tiling(requested: str, device: str) -> str:
    """'loader' or 'device' for --image-tiling on a run whose device is `device` ('cuda' / 'cpu').

    'auto' tiles on the device on CUDA (on a CPU device the CPU does the work either way and Pillow is
    faster there), and in the loader if the installed Pillow resizes differently from resample.py's
    exact re-implementation (a newer Pillow that changed its arithmetic); 'device' then refuses to start."""
    if requested not in ("auto", "loader", "device"):
        raise DataError(f"--image-tiling {requested!r}: choose auto, loader or device")
    if requested == "loader" or (requested == "auto" and device != "cuda"):
        return "loader"
    from ..data.resample import PillowMismatch, pass_order

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
        import torch

        from ..config.device import resolve_device

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
        from .batch import Batch

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


def check_manifest(prefix: str, run: RunConfig) -> int:
    """Refuse shards made for another model: special-token ids, image tokens per tile, vocab, length.
    Returns the number of packs the manifest records."""
    path = manifest_path(prefix)
    try:
        manifest = json.loads(open(path, encoding="utf-8").read())
    except FileNotFoundError:
        raise DataError(
            f"--data-path {prefix}: no manifest {path} (not made by tools/preprocess_mm_data.py?)"
        ) from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:  # OSError: a directory, no permission
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a shard manifest (a JSON {type(manifest).__name__})")
    cfg, tok = run.model, manifest.get("tokenizer", {})
    expected = {
        "img_start_id": cfg.img_start_token_id,
        "img_end_id": cfg.img_end_token_id,
        "img_context_id": cfg.img_context_token_id,
    }
    problems = [
        f"{key} {tok.get(key)} (model --model {cfg.name}: {value})"
        for key, value in expected.items()
        if tok.get(key) != value
    ]
    if manifest.get("template", cfg.template) != cfg.template:
        problems.append(f"chat template {manifest.get('template')!r} (model: {cfg.template!r})")
    if manifest.get("num_image_token") != cfg.num_image_token:
        problems.append(f"num_image_token {manifest.get('num_image_token')} (model: {cfg.num_image_token})")
    if tok.get("vocab_size", 0) > cfg.llm.vocab_size:
        problems.append(f"tokenizer vocab {tok.get('vocab_size')} > model vocab {cfg.llm.vocab_size}")
    if bool(manifest.get("preference")) != (run.train.stage == "mpo"):
        problems.append(
            "preference (MMPR) shards need --stage mpo"
            if manifest.get("preference")
            else "--stage mpo needs preference shards (tools/preprocess_mm_data.py --preference)"
        )
    if manifest.get("seq_length", 0) > run.train.seq_length:
        problems.append(f"packs of up to {manifest.get('seq_length')} tokens > --seq-length {run.train.seq_length}")
    if problems:
        raise DataError(f"{path} does not fit the model: " + "; ".join(problems))
    return int(manifest.get("counts", {}).get("packs", 0))


class MockBatches:
    """`mock_batches` with a resumable position (the iteration it starts at)."""

    def __init__(self, run: RunConfig, dp_rank: int, dp_size: int) -> None:
        self.run, self.dp_rank, self.dp_size = run, dp_rank, dp_size
        self.start(0)

    def start(self, iteration: int) -> None:
        from .mock import mock_batches

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
    import torch

    mask = batch.targets()
    if reduction == "token":
        return mask
    flat = mask.reshape(-1)
    cu = batch.cu_seqlens.long()
    seg = torch.bucketize(torch.arange(flat.numel()), cu[1:], right=True)  # segment of every token
    n = torch.zeros(len(cu) - 1).scatter_add_(0, seg, flat)
    per_seg = {"sample": 1.0 / n.clamp_min(1.0), "square": n.clamp_min(1.0).rsqrt()}[reduction]
    return (per_seg[seg] * flat).reshape(mask.shape)
