"""Reading packed shards for training: blending, data-parallel split, exact resume, augmentation.

The stream a training run sees is a pure function of (shard sets, weights, seed):

    global index g = 0, 1, 2, ...             (one pack per index, endless: datasets cycle by epoch)
    dataset d(g)   = Megatron's greedy blend: the dataset whose drawn count lags its weight most
    k              = how many packs dataset d had given before g
    pack           = permutation(seed, d, epoch = k // n_d)[k % n_d]
    rank r of dp_size reads g = r, r + dp_size, r + 2*dp_size, ...

so ranks are disjoint and together cover the stream, and resuming needs only (how many packs this
rank returned, the blend counters) -- a few integers in `state_dict()`, nothing is re-read.
With `balance` (--balance-dp-compute) the global batch g in [b*G, (b+1)*G) (G packs) is the same set
of packs, dealt to the ranks and microbatches by estimated compute (packing.py: balanced_layout)
instead of g mod dp_size; every rank computes the same deal from the shard index, and at a global
batch's end the position is the one the plain stream has there, so checkpoints move between the two.
Augmentation (`data_augment: true` datasets: JPEG re-compression of each tile, as InternVL's
training transform) draws from a generator keyed by (seed, g), so a resumed run sees the same.

Packs are decoded in `num_workers` processes (Megatron's --num-workers) a few packs ahead; the
draws are made in the calling process, so the stream and `state_dict()` do not depend on the
number of workers. The workers are never forked from this process (workers.py says why), and every wait for
one has a deadline (`worker_timeout`, --data-worker-timeout). Tiles stay uint8: the model
normalizes them on its device.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import DataError
from .blend import parse_data_path
from .image import decode_rgb, random_jpeg_recompress
from .packing import PackShape, balanced_layout
from .preference import expand_pair_tiles, pair_segments
from .sample import DecodedImages, PackedSample
from .shards import SOURCE_HEADER, RawPack, ShardReader, decode_tiles, source_tiling
from .source_images import Images
from .workers import WorkerError, WorkerPool

IMAGE_TILINGS = ("loader", "device")
DEFAULT_WORKER_TIMEOUT_S = 300.0  # --data-worker-timeout: well inside the 10 min default collective timeout
# imported once by the workers' fork server: what a worker's first pack would otherwise import (10 s under load)
WORKER_PRELOAD = ("internvl_mcore.data.loader", "megatron.core.datasets.indexed_dataset", "PIL.Image")
LOADER_FAULT_ENV = "INTERNVL_MCORE_LOADER_FAULT"  # tests: GLOBAL_INDEX:kill|hang (see _load_in_worker)

STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Loader
# ------------------------------------------------------------------------------------------------


@dataclass
class _Cursor:
    """Where the stream stands: enough to resume exactly (see module docstring)."""

    consumed: int  # packs this rank has returned
    blend_index: int  # global indices [0, blend_index) have been assigned to datasets
    blend_counts: list[int]  # packs drawn from each dataset among those indices
    # balance: the rest of this global batch's draws for this rank, and the position after it
    pending: tuple["_Draw", ...] = ()
    end: Optional["_Cursor"] = None

    def copy(self) -> "_Cursor":
        return _Cursor(self.consumed, self.blend_index, list(self.blend_counts), self.pending, self.end)


@dataclass(frozen=True)
class _Draw:
    global_index: int
    dataset: int
    pack: int


@dataclass(frozen=True)
class Balance:
    """--balance-dp-compute: how a global batch is dealt (see the module docstring)."""

    cost: Callable[[PackShape], float]  # estimated compute of a pack (training/balance.py)
    packs_per_rank: int  # of one global batch: global batch size / dp_size
    micro_batch_size: int


class PackedDataLoader:
    """Endless iterator of `PackedSample`s for one data-parallel rank.

    Args:
        data_path: Megatron-style list (see `parse_data_path`) or already-parsed (weight, prefix).
        dp_rank, dp_size: this rank's place in the data-parallel group (passed explicitly, no
            torch.distributed lookup, so the loader works and tests the same without a group).
        seed: drives pack order per epoch and the augmentation.
        shuffle: permute each dataset's packs per epoch (the preprocessor already shuffled once;
            this avoids repeating the same order every epoch).
        augment: apply JPEG re-compression to tiles of `data_augment` datasets.
        num_workers: >0 decodes packs in that many worker processes (from a fork server; each reopens the
            mmapped shards), 2 packs per worker ahead. The stream and `state_dict()` are the same
            for any number of workers.
        worker_timeout: seconds a worker may take to start and then to return each pack; past it,
            or when a worker dies, `next` raises a one-line `WorkerError` naming worker and pack.
        balance: deal each global batch by estimated compute (--balance-dp-compute; module docstring).
        image_tiling: "loader" returns tiles; "device" returns the decoded images with their grids
            (`PackedSample.images`) for the model to tile on its device, byte-identical (see
            `decoded_images`). The stream and `state_dict()` do not depend on it.
    """

    def __init__(
        self,
        data_path: Sequence[str] | Sequence[tuple[float, str]],
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        augment: bool = True,
        num_workers: int = 0,
        image_tiling: str = "loader",
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT_S,
        balance: Balance | None = None,
    ):
        if data_path and isinstance(data_path[0], (tuple, list)):
            blend = [(float(w), str(p)) for w, p in data_path]
        else:
            blend = parse_data_path(list(data_path))  # type: ignore[arg-type]
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        total = sum(w for w, _ in blend)
        self.weights = np.array([w / total for w, _ in blend], dtype=np.float64)
        self.prefixes = [p for _, p in blend]
        self.readers = [ShardReader(p) for p in self.prefixes]
        for w, r in zip(self.weights, self.readers):
            if w > 0 and len(r) == 0:
                raise DataError(f"shard set {r.prefix} has weight {w:.3f} but no packs")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.augment = seed, shuffle, augment
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._state = _Cursor(0, 0, [0] * len(self.readers))
        self._plan_state = self._state.copy()
        self._ahead: deque[tuple[_Cursor, _Draw, int]] = deque()  # (cursor after it, draw, its worker)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        if image_tiling not in IMAGE_TILINGS:
            raise ValueError(f"image_tiling must be one of {IMAGE_TILINGS}, got {image_tiling!r}")
        self.image_tiling = image_tiling
        if not worker_timeout > 0:
            raise ValueError(f"worker_timeout must be > 0 seconds, got {worker_timeout}")
        self.worker_timeout = float(worker_timeout)
        self._pool: WorkerPool | None = None
        self._lookahead = 2 * num_workers
        if balance is not None and (balance.packs_per_rank < 1 or balance.packs_per_rank % balance.micro_batch_size):
            raise ValueError(
                f"{balance.packs_per_rank} packs per rank are not whole microbatches of {balance.micro_batch_size}"
            )
        self.balance = balance
        self._submitted = 0

    # -- the stream ------------------------------------------------------------------------------

    def _pack_order(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perm_cache:
            n = len(self.readers[d])
            order = np.random.default_rng([self.seed, d, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if len(self._perm_cache) > 4 * len(self.readers):
                self._perm_cache.clear()
            self._perm_cache[key] = order
        return self._perm_cache[key]

    def _advance(self, cur: _Cursor) -> _Draw:
        """This rank's next draw; mutates `cur`."""
        if self.balance is not None:
            return self._advance_balanced(cur)
        draw = self._draw_at(cur, self.dp_rank + self.dp_size * cur.consumed)
        cur.consumed += 1
        return draw

    def _draw_at(self, cur: _Cursor, g: int) -> _Draw:
        """The draw of global index g (>= cur.blend_index): assigns the indices up to it to datasets."""
        while True:
            index = cur.blend_index
            # Megatron's greedy blend: pick the dataset furthest behind its share of index+1 draws.
            # (Ties go to the lower index.) Integer-exact counts, float weights.
            lag = self.weights * (index + 1) - np.asarray(cur.blend_counts, dtype=np.float64)
            d = int(np.argmax(lag))
            k = cur.blend_counts[d]
            cur.blend_counts[d] += 1
            cur.blend_index += 1
            if index == g:
                n = len(self.readers[d])
                return _Draw(g, d, int(self._pack_order(d, k // n)[k % n]))

    def _advance_balanced(self, cur: _Cursor) -> _Draw:
        """The next draw of this rank's balanced share of the global batch (dealt at its first pack);
        after the last one `cur` stands where the plain stream stands at the global batch's end."""
        if not cur.pending:
            cur.pending, cur.end = self._deal(cur)
        draw, cur.pending = cur.pending[0], cur.pending[1:]
        cur.consumed += 1
        if not cur.pending:
            assert cur.end is not None
            cur.blend_index, cur.blend_counts, cur.end = cur.end.blend_index, list(cur.end.blend_counts), None
        return draw

    def _deal(self, cur: _Cursor) -> tuple[tuple[_Draw, ...], _Cursor]:
        """This rank's draws of the global batch that starts at `cur`, in the order it reads them, and
        the plain stream's position after the global batch. Every rank deals the same."""
        assert self.balance is not None
        per_rank = self.balance.packs_per_rank
        walk = _Cursor(cur.consumed, cur.blend_index, list(cur.blend_counts))
        first = cur.consumed * self.dp_size
        draws = [self._draw_at(walk, g) for g in range(first, first + per_rank * self.dp_size)]
        costs = [self.balance.cost(self.pack_shape(d.dataset, d.pack)) for d in draws]
        mine = balanced_layout(costs, self.dp_size, self.balance.micro_batch_size)[self.dp_rank]
        end = _Cursor(cur.consumed, cur.blend_index, list(cur.blend_counts))
        for _ in range(per_rank):  # the plain stream's position: what a checkpoint records
            self._draw_at(end, self.dp_rank + self.dp_size * end.consumed)
            end.consumed += 1
        return tuple(draws[i] for i in mine), end

    def pack_shape(self, dataset: int, pack: int) -> PackShape:
        """A pack's segment lengths, tiles and loss tokens, from the shard index (no image bytes)."""
        reader = self.readers[dataset]
        raw = reader.read(pack, with_tiles=False)
        num_tiles = raw.num_tiles
        if reader.manifest.get("preference"):  # the rejected sequence encodes the pair's images again
            num_tiles = expand_pair_tiles(
                np.zeros((int(num_tiles.sum()), 0), np.uint8), num_tiles, raw.images_per_sample
            )[1]
        cu = raw.cu_seqlens.astype(np.int64)
        target = np.zeros(int(cu[-1]), dtype=bool)
        target[:-1] = np.asarray(raw.loss_mask[1:]) > 0
        target[cu[1:] - 1] = False  # as `_targets`: a segment's last token predicts nothing
        return PackShape(
            segment_lengths=tuple(int(n) for n in raw.seq_lengths),
            tiles=int(np.asarray(num_tiles).sum()),
            loss_tokens=int(target.sum()),
        )

    def peek_draws(self, n: int) -> list[tuple[int, int, int]]:
        """The next n (global index, dataset, pack) this rank will return, without reading data."""
        cur = self._state.copy()
        return [(x.global_index, x.dataset, x.pack) for x in (self._advance(cur) for _ in range(n))]

    # -- loading ---------------------------------------------------------------------------------

    def load(self, dataset: int, pack: int, global_index: int) -> PackedSample:
        """Read and prepare one pack (pure given its arguments and the seed)."""
        reader = self.readers[dataset]
        raw = reader.read(pack)
        names = [reader.datasets[int(i)] if int(i) < len(reader.datasets) else {} for i in raw.source[:, 0]]
        rng = None
        if self.augment and raw.tile_lengths.shape[0] and any(x.get("data_augment") for x in names):
            rng = np.random.default_rng([self.seed, global_index, 0xA06])
        images = None
        if self.image_tiling == "device":
            images, num_tiles = decoded_images(reader, raw, names, rng)
            tiles = np.zeros((0, *reader.tile_shape), dtype=np.uint8)
        else:
            tiles, num_tiles = _tiles(reader, raw, names, rng)
        pairs = int(raw.seq_lengths.shape[0]) // 2 if reader.manifest.get("preference") else 0
        return PackedSample(
            tokens=raw.tokens.astype(np.int64),
            loss_mask=raw.loss_mask.astype(np.float32),
            position_ids=np.array(raw.position_ids),  # a copy: views of the mmap do not cross processes
            cu_seqlens=raw.cu_seqlens,
            tiles=np.ascontiguousarray(tiles),  # (T, H, W, 3) uint8
            num_tiles=num_tiles.astype(np.int32),
            pairs=pairs,
            source=[
                {"dataset": info.get("name", str(int(s))), "line": int(line)}
                for info, (s, line) in zip(names, raw.source)
            ],
            images=images,
        )

    def __iter__(self) -> Iterator[PackedSample]:
        return self

    def __next__(self) -> PackedSample:
        if self.num_workers == 0:
            draw = self._advance(self._state)
            return self.load(draw.dataset, draw.pack, draw.global_index)
        pool = self.start_workers()
        while len(self._ahead) < self._lookahead:
            draw = self._advance(self._plan_state)
            w = self._submitted % self.num_workers  # round robin: worker w answers its inputs in order
            pool.submit(w, (draw.dataset, draw.pack, draw.global_index), self._describe(draw))
            self._submitted += 1
            self._ahead.append((self._plan_state.copy(), draw, w))
        after, _, w = self._ahead.popleft()
        try:
            sample = pool.result(w)
        except WorkerError:
            self._pool = None  # it stopped its workers
            self._ahead.clear()
            raise
        sample.tiles = sample.tiles.numpy()  # a view of the shared memory the worker filled
        if sample.images is not None:
            sample.images.pixels = sample.images.pixels.numpy()
        self._state = after
        return sample

    def start_workers(self) -> WorkerPool:
        """The worker processes, started at the first call (the first `next`)."""
        if self._pool is None:
            self._pool = WorkerPool(
                self.num_workers,
                _set_worker_loader,
                self._worker_spec(),
                _load_in_worker,
                self.worker_timeout,
                preload=WORKER_PRELOAD,
            )
            self._submitted = 0
        return self._pool

    def _worker_spec(self) -> dict:
        """What a worker needs to rebuild this loader's `load` (picklable, a few strings and numbers)."""
        return {
            "blend": [(float(w), p) for w, p in zip(self.weights, self.prefixes)],
            "seed": self.seed,
            "shuffle": self.shuffle,
            "augment": self.augment,
            "image_tiling": self.image_tiling,
        }

    def _describe(self, draw: _Draw) -> str:
        return f"pack {draw.pack} of shard set {self.prefixes[draw.dataset]} (global index {draw.global_index})"

    # -- resume ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Position after the last returned pack (JSON-serializable)."""
        return {
            "version": STATE_VERSION,
            "consumed": self._state.consumed,
            "blend_index": self._state.blend_index,
            "blend_counts": list(self._state.blend_counts),
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "prefixes": list(self.prefixes),
            "weights": [float(w) for w in self.weights],
            **({"balance_served": self._served_in_batch()} if self._state.pending else {}),
        }

    def _served_in_batch(self) -> int:
        """--balance-dp-compute, inside a global batch: the packs of it this rank has returned (the
        blend counters then stand at the global batch's start)."""
        assert self.balance is not None
        return self.balance.packs_per_rank - len(self._state.pending)

    def _check_state(self, state: dict, dp_rank: int, dp_size: int) -> None:
        """`state` is a position in this loader's stream, saved by rank `dp_rank` of `dp_size`."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')}, expected {STATE_VERSION}")
        mine = {**self.state_dict(), "dp_rank": dp_rank, "dp_size": dp_size}
        for key in ("dp_rank", "dp_size", "seed", "shuffle"):
            if state[key] != mine[key]:
                raise DataError(f"loader state was saved with {key}={state[key]}, this loader has {mine[key]}")
        if [os.path.basename(p) for p in state["prefixes"]] != [os.path.basename(p) for p in self.prefixes]:
            raise DataError(f"loader state is for data {state['prefixes']}, this loader reads {self.prefixes}")
        if not np.allclose(state["weights"], self.weights, rtol=0, atol=1e-12):
            raise DataError(f"loader state has blend weights {state['weights']}, this loader {list(self.weights)}")

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the pack the saved loader returned last."""
        self._check_state(state, self.dp_rank, self.dp_size)
        served = int(state.get("balance_served", 0))
        if served and self.balance is None:
            raise DataError(
                "loader state was saved inside a global batch dealt by --balance-dp-compute; resume with it"
            )
        cursor = _Cursor(
            int(state["consumed"]) - served, int(state["blend_index"]), [int(c) for c in state["blend_counts"]]
        )
        for _ in range(served):  # deal that global batch again and skip what was returned
            self._advance(cursor)
        self._set_cursor(cursor)

    def load_resharded_state(self, states: list[dict]) -> None:
        """Continue the stream that `states` (every rank's `state_dict()` of a loader group of another
        data-parallel size, in rank order, saved after the same number of packs each) left off: this
        rank's next pack is the first global index none of them returned that belongs to it.

        The saved ranks together returned global indices [0, total); the last rank's blend counters
        stand exactly at `total`, so this rank continues from them with total / dp_size packs taken."""
        for r, state in enumerate(states):
            self._check_state(state, r, len(states))
        consumed = {int(s["consumed"]) for s in states}
        if len(consumed) != 1:
            raise DataError(
                f"the saved data-parallel ranks stopped after different numbers of packs {sorted(consumed)}"
            )
        total = len(states) * consumed.pop()
        last = states[-1]
        if total % self.dp_size or int(last["blend_index"]) != total:
            raise DataError(
                f"the saved position ({total} packs over {len(states)} data-parallel ranks) does not "
                f"split over {self.dp_size} data-parallel ranks"
            )
        self._set_cursor(_Cursor(total // self.dp_size, total, [int(c) for c in last["blend_counts"]]))

    def _set_cursor(self, cursor: _Cursor) -> None:
        self._state = cursor
        self._plan_state = self._state.copy()
        if self._ahead:  # packs decoded for the old position: drop them (a worker answers in order)
            for _, _, w in self._ahead:
                self._pool.result(w)  # type: ignore[union-attr]
            self._ahead.clear()

    def close(self) -> None:
        """Stop the worker processes (a later `next` starts new ones)."""
        if self._pool is not None:
            self._pool.close(terminate=bool(self._ahead))  # packs in flight are not waited for
            self._pool = None
        self._ahead.clear()
        self._plan_state = self._state.copy()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close(terminate=True)


def _sub_samples(raw: RawPack):
    """(sub-sample k, its images' slice, its tiles' slice) of a pack, in order."""
    tile_off = img_off = 0
    for k in range(raw.images_per_sample.shape[0]):
        m = int(raw.images_per_sample[k])
        t = int(raw.num_tiles[img_off : img_off + m].sum())
        yield k, slice(img_off, img_off + m), slice(tile_off, tile_off + t)
        tile_off, img_off = tile_off + t, img_off + m


def _tiles(
    reader: ShardReader, raw: RawPack, names: list[dict], rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """`--image-tiling loader`: the pack's (T, H, W, 3) uint8 tiles in token order and its tiles per image.
    `rng` (None: no augmentation) re-compresses the tiles of `data_augment` datasets."""
    tiles = reader.tiles(raw)  # (T, H, W, 3) uint8
    if rng is not None:
        tiles = np.array(tiles)  # writable copy; the mmap view is read-only
        for k, _, tile_slice in _sub_samples(raw):
            if names[k].get("data_augment") and tile_slice.stop > tile_slice.start:
                tiles[tile_slice], _ = random_jpeg_recompress(tiles[tile_slice], rng)
    if reader.manifest.get("preference"):  # tiles stored once per pair: repeat them for the rejected one
        return expand_pair_tiles(tiles, raw.num_tiles, raw.images_per_sample)
    return tiles, raw.num_tiles


def _decoded_source(payload: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """A "source" payload decoded: (H, W, 3) uint8 pixels, grid cols, rows, thumbnail."""
    tiling = source_tiling(payload)
    pixels = np.asarray(decode_rgb(memoryview(payload)[SOURCE_HEADER.size :]), dtype=np.uint8)
    return pixels, tiling.cols, tiling.rows, int(tiling.thumbnail)


def decoded_images(
    reader: ShardReader, raw: RawPack, names: list[dict], rng: np.random.Generator | None
) -> tuple[DecodedImages, np.ndarray]:
    """`--image-tiling device`: a pack's images decoded, not tiled, and its tiles per image.

    "source" images are decoded once and keep their grid. Tiles that must be made on the CPU anyway
    become 1 x 1 images: stored-tile formats (webp, png, raw, jpeg, video frames) and the images of
    `data_augment` datasets (their JPEG re-compression works on tiles, drawn from `rng` in the same order
    as `_tiles`). A preference pair's rejected sequence gets table rows pointing at the chosen one's
    pixels (no second copy)."""
    stored = reader.tiles(raw) if reader.tile_format != "source" else None
    payloads = raw.tile_payloads if stored is None else []
    groups: list[list[tuple[np.ndarray, int, int, int]]] = []
    for k, image_slice, tile_slice in _sub_samples(raw):
        augment = rng is not None and names[k].get("data_augment") and tile_slice.stop > tile_slice.start
        if stored is None and not augment:
            groups.append([_decoded_source(p) for p in payloads[image_slice]])
            continue
        tiles = (
            stored[tile_slice]
            if stored is not None
            else decode_tiles(payloads[image_slice], "source", reader.tile_shape)
        )
        if augment:
            tiles, _ = random_jpeg_recompress(tiles, rng)
        groups.append([(tile, 1, 1, 0) for tile in tiles])
    num_tiles = raw.num_tiles
    if reader.manifest.get("preference"):
        num_tiles = expand_pair_tiles(np.zeros((int(num_tiles.sum()), 0), np.uint8), num_tiles, raw.images_per_sample)[
            1
        ]
        groups = [groups[k - k % 2] for k in range(len(groups))]  # rejected k+1 shows chosen k's images
    return _flatten(groups), num_tiles


def _flatten(groups: list[list[tuple[np.ndarray, int, int, int]]]) -> DecodedImages:
    """Entries (pixels, cols, rows, thumbnail) -> DecodedImages; an array met twice is stored once."""
    entries = [e for g in groups for e in g]
    offsets: dict[int, int] = {}
    arrays, total = [], 0
    for pixels, *_ in entries:
        if id(pixels) not in offsets:
            offsets[id(pixels)] = total
            arrays.append(pixels)
            total += pixels.size
    flat = np.empty(total, dtype=np.uint8)
    for pixels in arrays:
        flat[offsets[id(pixels)] : offsets[id(pixels)] + pixels.size] = pixels.reshape(-1)
    table = np.array(
        [[p.shape[0], p.shape[1], c, r, th, offsets[id(p)]] for p, c, r, th in entries], dtype=np.int64
    ).reshape(-1, 6)
    return DecodedImages(flat, table)


_WORKER_LOADER: PackedDataLoader | None = None


def _set_worker_loader(spec: dict) -> None:
    """In a worker: the loader rebuilt from `PackedDataLoader._worker_spec` (no workers of its own)."""
    global _WORKER_LOADER
    _WORKER_LOADER = PackedDataLoader(
        spec["blend"],
        seed=spec["seed"],
        shuffle=spec["shuffle"],
        augment=spec["augment"],
        image_tiling=spec["image_tiling"],
    )


def _fault(global_index: int) -> None:
    """Test hook, LOADER_FAULT_ENV=G:ACTION: the worker loading global index G kills itself with SIGKILL
    (ACTION kill, as the out-of-memory killer would) or stops answering (hang), deterministically."""
    spec = os.environ.get(LOADER_FAULT_ENV, "")
    if not spec or int(spec.split(":")[0]) != global_index:
        return
    if spec.split(":")[1] == "hang":
        while True:
            signal.pause()  # nothing sends the worker a signal it handles: it waits until it is killed
    os.kill(os.getpid(), signal.SIGKILL)


def _load_in_worker(item: tuple[int, int, int]) -> PackedSample:
    """Load one pack in a worker; its tiles (or decoded pixels) travel back in shared memory (a file descriptor is sent,
    not the pixels: torch's reductions for multiprocessing, as torch's DataLoader does)."""
    import torch

    assert _WORKER_LOADER is not None, "loader worker not initialized"
    dataset, pack, global_index = item
    _fault(global_index)
    sample = _WORKER_LOADER.load(dataset, pack, global_index)
    sample.tiles = torch.from_numpy(sample.tiles).share_memory_()
    if sample.images is not None:  # --image-tiling device: the decoded pixels travel the same way
        sample.images.pixels = torch.from_numpy(sample.images.pixels).share_memory_()
    return sample


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------


def _targets(s: PackedSample, cu: np.ndarray) -> np.ndarray:
    """(n,) bool: position i predicts token i+1, which carries loss, never across sub-samples."""
    n = int(s.tokens.shape[0])
    target = np.zeros(n, dtype=bool)
    target[:-1] = np.asarray(s.loss_mask[1:]) > 0
    target[cu[1:] - 1] = False  # last token of each sub-sample predicts nothing
    return target


def _fill_row(
    b: int, s: PackedSample, tokens: np.ndarray, labels: np.ndarray, weight: np.ndarray, position_ids: np.ndarray
) -> np.ndarray:
    """Write pack `s` into row b of the (B, S) arrays (padding positions count 0, 1, ...); its cu_seqlens."""
    n, S = int(s.tokens.shape[0]), tokens.shape[1]
    if n > S:
        raise ValueError(f"pack {b} has {n} tokens, more than seq_length={S}")
    cu = np.asarray(s.cu_seqlens, dtype=np.int64)
    if cu[0] != 0 or cu[-1] != n:
        raise ValueError(f"pack {b}: cu_seqlens {cu.tolist()} do not cover its {n} tokens")
    tokens[b, :n] = s.tokens
    position_ids[b, :n] = s.position_ids
    position_ids[b, n:] = np.arange(S - n, dtype=np.float32)
    target = _targets(s, cu)
    next_token = np.zeros(n, dtype=np.int64)
    next_token[:-1] = s.tokens[1:]
    labels[b, :n] = np.where(target, next_token, labels[b, :n])
    weight[b, :n] = target
    return cu


def collate(samples: Sequence[PackedSample], seq_length: int, pad_id: int) -> dict:
    """Pad packs to seq_length and stack them into torch tensors for a training step: the fields of
    training/batch.py: Batch (`Batch.from_packs`), the one way training and mock packs become a batch.

    Returns (B = len(samples), S = seq_length, T = all tiles of the batch, N = segments):
        tokens        (B, S) int64    input ids; pad_id after each pack's end
        labels        (B, S) int64    labels[b, i] = tokens[b, i+1] where position i is a target (it
                                      carries loss and the next token is in the same sub-sample),
                                      else pad_id (any valid id: its loss weight is 0)
        loss_weight   (B, S) float32  1.0 at the targets, 0.0 elsewhere
        position_ids  (B, S) float32  V2PE positions; the padding tail counts 0, 1, 2, ...
        cu_seqlens    (N+1,) int32    segment boundaries over the B*S tokens flattened row-major
                                      (row b starts at b*S); each row's padding tail is its own
                                      segment, so every token belongs to exactly one segment
        images        Images          the tiles of all packs, in token order, in the form the packs
                                      carry them (data/source_images.py: Images; its pixel_values()
                                      makes the vision model's input on the device)
        num_tiles     (n_images,) int32     tiles per image, in token order
        pairs         (P, 2) int64    preference packs: [chosen, rejected] segment indices (empty otherwise)
    """
    import torch

    if not samples:
        raise ValueError("collate needs at least one sample")
    B, S = len(samples), int(seq_length)
    tokens = np.full((B, S), pad_id, dtype=np.int64)
    labels = np.full((B, S), pad_id, dtype=np.int64)
    weight = np.zeros((B, S), dtype=np.float32)
    position_ids = np.zeros((B, S), dtype=np.float32)
    bounds: list[int] = [0]
    seg_per_row = []
    for b, s in enumerate(samples):
        cu = _fill_row(b, s, tokens, labels, weight, position_ids)
        n = int(cu[-1])
        bounds.extend((b * S + cu[1:]).tolist())
        if n < S:  # the padding tail is a segment of its own
            bounds.append((b + 1) * S)
        seg_per_row.append(len(cu) - 1 + int(n < S))
    num_tiles = np.concatenate([np.asarray(s.num_tiles, dtype=np.int32) for s in samples])
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_weight": torch.from_numpy(weight),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.from_numpy(np.asarray(bounds, dtype=np.int32)),
        "images": Images.of_packs(samples),
        "num_tiles": torch.from_numpy(num_tiles),
        "pairs": torch.from_numpy(pair_segments(seg_per_row, [s.pairs for s in samples])),
    }
