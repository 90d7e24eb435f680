"""Orchestration of `tools/preprocess_mm_data.py`: records -> samples -> packs -> shards.

    pass 1  records of every dataset, in meta order --(worker pool, ordered map)--> samples
            each sample: template + tokenize + tile (front end), V2PE positions, tile encoding;
            written one per "pack" to a temporary shard set, rejects to OUT.rejects.jsonl
    pass 2  pack_lengths(all sample lengths, seed) -> packs; copy samples from the temporary set
            into the final one in pack order; manifest; summary

Only lengths are held in memory, tiles go to disk in pass 1, so memory does not grow with the
dataset; packing still sees every length at once (best fill). Every step is a pure function of
(record, its ordinal in the input stream, arguments) and the pool returns results in input order,
so the output bytes do not depend on --workers. A bad record becomes a `Reject` on its own and
never affects its neighbours; an unexpected exception while building one sample is caught in the
worker and rejected as `internal_error` with the traceback summary.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import time
import traceback
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from .packing import pack_fill, pack_lengths, v2pe_position_ids, v2pe_random_deltas
from .preference import check_same_prompt, split_preference_record
from .sample import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, Reject, TokenizedSample
from .shards import DEFAULT_TILE_FORMAT, TILE_FORMATS, EncodedSample, ShardReader, ShardWriter, encode_tiles
from .template import INTERNVL2_5, TEMPLATES


@dataclass
class PreprocessConfig:
    """Everything that determines the output (the CLI flags, Megatron-LM names where they exist)."""

    meta: list[str]
    """InternVL meta JSON files (datasets in file order, files in the given order)."""
    tokenizer: str
    output_prefix: str
    seq_length: int = 16384
    seed: int = 0
    v2pe_delta: float = 1.0
    v2pe_random: bool = False
    min_num_frames: int = 8
    max_num_frames: int = 32
    max_reject_ratio: float = 0.01
    truncate: bool = False
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5
    num_image_token: int | None = None
    """Defaults to (image_size / patch_size)^2 * downsample_ratio^2 (256 for InternVL3)."""
    use_thumbnail: bool = True
    system_prompt: str | None = None
    tile_format: str = DEFAULT_TILE_FORMAT
    pack_buffer: int = 4096
    template: str = INTERNVL2_5.name
    """Chat template: the model's (`--model`: its config's `template`; InternVL2.5, 3 and 3.5 dense use internvl2_5)."""
    preference: bool = False
    """MMPR preference records (question, chosen, rejected): each becomes a chosen + rejected pair."""
    # Not part of the output's identity (excluded from the manifest):
    workers: int = 1
    progress: bool = True

    def resolved_num_image_token(self) -> int:
        if self.num_image_token is not None:
            return int(self.num_image_token)
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    def validate(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not 0 < self.v2pe_delta <= 1:
            raise ValueError(f"--v2pe-delta must be in (0, 1], got {self.v2pe_delta}")
        if not 0 <= self.max_reject_ratio <= 1:
            raise ValueError(f"--max-reject-ratio must be in [0, 1], got {self.max_reject_ratio}")
        if self.template not in TEMPLATES:
            raise ValueError(f"chat template {self.template!r} (the model config's 'template') is not implemented; "
                             f"implemented: {', '.join(TEMPLATES)}")
        if self.tile_format not in TILE_FORMATS:
            raise ValueError(f"--tile-format must be one of {TILE_FORMATS}, got {self.tile_format!r}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not 1 <= self.min_num_frames <= self.max_num_frames:
            raise ValueError(f"need 1 <= --min-num-frames ({self.min_num_frames}) <= --max-num-frames ({self.max_num_frames})")
        for m in self.meta:
            if os.path.isdir(m):
                raise ValueError(f"--meta {m} is a directory, not a meta JSON file")
            if not os.path.isfile(m):
                raise FileNotFoundError(f"--meta file not found: {m}")


@dataclass
class PreprocessResult:
    inputs: int = 0
    samples: int = 0
    rejects: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    packs: int = 0
    tokens: int = 0
    fill: float = 0.0
    seconds: float = 0.0
    manifest: dict = field(default_factory=dict)

    @property
    def reject_ratio(self) -> float:
        return self.rejects / self.inputs if self.inputs else 0.0


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------


@dataclass
class _Ok:
    """A processed sample on its way back from a worker."""

    sample: EncodedSample  # dataset_index unset (-1): the parent assigns indices in input order
    dataset: str
    source_file: str
    data_augment: bool


@dataclass
class _WorkerContext:
    tokenizer: Any
    options: Any
    seq_length: int
    seed: int
    v2pe_delta: float
    v2pe_random: bool
    tile_format: str
    num_image_token: int
    image_size: int
    img_ids: tuple[int, int, int]  # <img>, </img>, <IMG_CONTEXT>
    preference: bool = False


_CTX: _WorkerContext | None = None


def _init_worker(ctx: _WorkerContext) -> None:
    global _CTX
    _CTX = ctx


def _reject_for(record: Any, reason: str, detail: str) -> Reject:
    return Reject(
        source_file=str(getattr(record, "source_file", "") or ""),
        line=int(getattr(record, "line", 0) or 0),
        reason=reason,
        detail=detail,
    )


def process_record(ctx: _WorkerContext, ordinal: int, record: Any) -> _Ok | list[_Ok] | Reject:
    """One input record -> an encoded sample or a Reject. Pure in (ctx, ordinal, record)."""
    from .sources import build_sample

    if isinstance(record, Reject):
        return record
    if ctx.preference:
        return _process_pair(ctx, ordinal, record)
    try:
        sample = build_sample(record, ctx.tokenizer, ctx.options)
        if isinstance(sample, Reject):
            return sample
        return _finish_sample(ctx, ordinal, sample)
    except Exception as e:  # a bug or an unforeseen input must cost one sample, not the run
        tb = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        where = f" at {os.path.basename(tb.filename)}:{tb.lineno}" if tb else ""
        return _reject_for(record, "internal_error", f"{type(e).__name__}: {e}{where}")


def _process_pair(ctx: _WorkerContext, ordinal: int, record: Any) -> list[_Ok] | Reject:
    """One MMPR record -> [chosen, rejected] encoded samples (tiles kept with the chosen one only)."""
    from .sources import build_sample

    split = split_preference_record(record)
    if isinstance(split, Reject):
        return split
    done = []
    for half in split:
        try:
            sample = build_sample(half, ctx.tokenizer, ctx.options)
            # the same ordinal for both halves: V2PE random draws, hence prompt positions, agree
            done.append(sample if isinstance(sample, Reject) else _finish_sample(ctx, ordinal, sample))
        except Exception as e:  # as process_record: one bad record costs one record
            return _reject_for(record, "internal_error", f"{type(e).__name__}: {e}")
        if isinstance(done[-1], Reject):
            return done[-1]
    chosen, rejected = done[0].sample, done[1].sample
    problem = check_same_prompt(chosen.tokens, chosen.loss_mask, rejected.tokens, rejected.loss_mask)
    if problem:
        return _reject_for(record, "prompt_mismatch", problem)
    if len(chosen) + len(rejected) > ctx.seq_length:
        return _reject_for(record, "too_long", f"pair of {len(chosen)} + {len(rejected)} tokens > --seq-length "
                                               f"{ctx.seq_length} (a pair never straddles packs)")
    done[1].sample = dataclasses.replace(rejected, num_tiles=rejected.num_tiles[:0], tiles=[])
    return done


def _finish_sample(ctx: _WorkerContext, ordinal: int, s: TokenizedSample) -> _Ok | Reject:
    n = len(s)
    if n == 0:
        return _reject_for(s, "empty_sample", "no tokens after templating")
    if n > ctx.seq_length:
        return _reject_for(s, "too_long", f"{n} tokens > --seq-length {ctx.seq_length}")
    start, end, context = ctx.img_ids
    tokens = np.asarray(s.tokens, dtype=np.int32)
    num_tiles = np.asarray(s.num_tiles, dtype=np.int32)
    try:
        n_images = len(num_tiles)
        deltas = v2pe_random_deltas(n_images, ctx.seed, ordinal) if ctx.v2pe_random else ctx.v2pe_delta
        positions = v2pe_position_ids(tokens, start, end, context, deltas)
    except ValueError as e:
        return _reject_for(s, "bad_image_tokens", str(e))
    # The front end's promise: image k has num_tiles[k] * num_image_token context tokens.
    ctx_counts = _context_runs(tokens, start, end)
    if ctx_counts != [int(t) * ctx.num_image_token for t in num_tiles]:
        return _reject_for(
            s, "bad_image_tokens",
            f"<IMG_CONTEXT> runs {ctx_counts} != num_tiles {num_tiles.tolist()} x {ctx.num_image_token}",
        )
    tiles = np.asarray(s.tiles)
    want = (int(num_tiles.sum()), ctx.image_size, ctx.image_size, 3)
    if tiles.shape != want or tiles.dtype != np.uint8:
        return _reject_for(s, "bad_tiles", f"tiles {tiles.shape} {tiles.dtype}, expected {want} uint8")
    enc = EncodedSample(
        tokens=tokens,
        loss_mask=np.asarray(s.loss_mask, dtype=np.uint8),
        position_ids=positions,
        num_tiles=num_tiles,
        tiles=encode_tiles(tiles, ctx.tile_format),
        dataset_index=-1,
        line=int(s.line),
    )
    return _Ok(enc, s.dataset, s.source_file, bool(s.data_augment))


def _context_runs(tokens: np.ndarray, start_id: int, end_id: int) -> list[int]:
    starts = np.flatnonzero(tokens == start_id)
    ends = np.flatnonzero(tokens == end_id)
    return [int(e - s - 1) for s, e in zip(starts, ends)]


def _run_in_worker(item: tuple[int, Any]) -> _Ok | list[_Ok] | Reject:
    assert _CTX is not None, "worker not initialized"
    return process_record(_CTX, *item)


# ------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------


def _records(cfg: PreprocessConfig) -> tuple[Iterator[tuple[int, Any]], int | None]:
    """((ordinal, record) stream over all datasets in order, expected count for the progress bar)."""
    from .sources import iter_records, read_meta

    specs = [spec for m in cfg.meta for spec in read_meta(m)]
    names = [getattr(s, "name", None) for s in specs]
    dup = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dup:
        raise ValueError(f"dataset names appear twice across --meta files: {dup}")
    expected = None
    lens = [getattr(s, "expected_records", None) for s in specs]
    if all(isinstance(x, int) for x in lens):
        expected = sum(lens)

    def gen() -> Iterator[tuple[int, Any]]:
        ordinal = 0
        for spec in specs:
            for rec in iter_records(spec, cfg.seed):
                yield ordinal, rec
                ordinal += 1

    return gen(), expected


def _front_end_options(cfg: PreprocessConfig, num_image_token: int):
    from .sources import PreprocessOptions

    return PreprocessOptions(
        image_size=cfg.image_size,
        num_image_token=num_image_token,
        use_thumbnail=cfg.use_thumbnail,
        min_num_frames=cfg.min_num_frames,
        max_num_frames=cfg.max_num_frames,
        system_prompt=cfg.system_prompt,
        seed=cfg.seed,
        max_seq_length=cfg.seq_length,
        truncate=cfg.truncate,
        template=cfg.template,
    )


def manifest_arguments(cfg: PreprocessConfig) -> dict:
    """The arguments recorded in the manifest: everything that shapes the output."""
    args = asdict(cfg)
    # --workers does not change a byte; the output location is not part of the content (and would
    # make two otherwise identical runs differ).
    for k in ("workers", "progress", "output_prefix"):
        args.pop(k)
    if not cfg.preference:
        args.pop("preference")  # SFT manifests stay byte-identical to those made before preference data
    args["num_image_token"] = cfg.resolved_num_image_token()
    return args


def run_preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Build the shard set at cfg.output_prefix; returns counts (the CLI turns them into an exit code)."""
    from tqdm import tqdm

    from .tokenizer import load_tokenizer

    cfg.validate()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer)
    img_ids = tuple(tokenizer.token_to_id(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))
    num_image_token = cfg.resolved_num_image_token()
    ctx = _WorkerContext(
        tokenizer=tokenizer,
        options=_front_end_options(cfg, num_image_token),
        seq_length=cfg.seq_length,
        seed=cfg.seed,
        v2pe_delta=cfg.v2pe_delta,
        v2pe_random=cfg.v2pe_random,
        tile_format=cfg.tile_format,
        num_image_token=num_image_token,
        image_size=cfg.image_size,
        img_ids=img_ids,  # type: ignore[arg-type]
        preference=cfg.preference,
    )
    out = cfg.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp_dir = out + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    tmp_prefix = os.path.join(tmp_dir, "samples")
    tile_shape = (cfg.image_size, cfg.image_size, 3)

    result = PreprocessResult()
    reasons: Counter[str] = Counter()
    datasets: dict[tuple[str, str], int] = {}  # (name, file) -> index, in order of first sample
    dataset_info: list[dict] = []
    lengths: list[int] = []
    quiet = None if cfg.progress else True  # None: tqdm shows itself only on a terminal
    try:
        stream, expected = _records(cfg)
        tmp_writer = ShardWriter(tmp_prefix, tile_format=cfg.tile_format, tile_shape=tile_shape)
        with open(out + ".rejects.jsonl", "w") as rejects_file:
            if cfg.workers > 1:
                pool = _pool(cfg.workers, ctx)
                results = _ordered_map(pool, _run_in_worker, stream, window=16 * cfg.workers)
            else:
                pool = None
                results = (process_record(ctx, o, r) for o, r in stream)
            clean = False
            try:
                bar = tqdm(results, total=expected, desc="samples", unit="rec", disable=quiet)
                for res in bar:
                    result.inputs += 1
                    if isinstance(res, Reject):
                        reasons[res.reason] += 1
                        rejects_file.write(json.dumps(_reject_json(res), ensure_ascii=False) + "\n")
                        continue
                    group = res if isinstance(res, list) else [res]  # a preference pair stays one unit
                    key = (group[0].dataset, group[0].source_file)
                    if key not in datasets:
                        datasets[key] = len(dataset_info)
                        dataset_info.append(
                            {"name": key[0], "source_file": key[1], "data_augment": group[0].data_augment}
                        )
                    for item in group:
                        item.sample.dataset_index = datasets[key]
                    tmp_writer.add_pack([item.sample for item in group])
                    lengths.append(sum(len(item.sample) for item in group))
                clean = True
            finally:
                if pool is not None:  # on an error or Ctrl-C, drop the queued records instead of finishing them
                    pool.close() if clean else pool.terminate()
                    pool.join()
        tmp_writer.finalize(checksums=False)

        # Pass 2: pack by length, copy samples into the final shard set in pack order.
        packs = pack_lengths(np.asarray(lengths, dtype=np.int64), cfg.seq_length, cfg.seed, cfg.pack_buffer)
        fill = pack_fill(lengths, packs, cfg.seq_length)
        tmp_reader = ShardReader(tmp_prefix)
        writer = ShardWriter(out, tile_format=cfg.tile_format, tile_shape=tile_shape)
        for members in tqdm(packs, desc="packs", unit="pack", disable=quiet):
            writer.add_pack([x for j in members for x in tmp_reader.encoded_samples(int(j))])
        del tmp_reader

        result.samples = len(lengths)
        result.rejects = sum(reasons.values())
        result.rejects_by_reason = dict(sorted(reasons.items()))
        result.packs = len(packs)
        result.tokens = int(sum(lengths))
        result.fill = fill
        extra = {
            "template": cfg.template,
            **({"preference": True} if cfg.preference else {}),  # absent: SFT shards (unchanged bytes)
            "tokenizer": {
                "path": cfg.tokenizer,
                "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
                "pad_token_id": tokenizer.pad_token_id,
                "img_start_id": img_ids[0],
                "img_end_id": img_ids[1],
                "img_context_id": img_ids[2],
            },
            "arguments": manifest_arguments(cfg),
            "seq_length": cfg.seq_length,
            "num_image_token": num_image_token,
            "v2pe": {"random": cfg.v2pe_random, "delta": None if cfg.v2pe_random else cfg.v2pe_delta},
            "datasets": dataset_info,
            "fill_ratio": round(fill, 6),
            "counts": {
                "inputs": result.inputs,
                "rejects": result.rejects,
                "rejects_by_reason": result.rejects_by_reason,
                **({"pairs": result.samples} if cfg.preference else {}),  # "samples" counts both sequences
            },
            "rejects_file": os.path.basename(out) + ".rejects.jsonl",
        }
        result.manifest = writer.finalize(extra)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _reject_json(r: Reject) -> dict:
    # Exception texts may carry object addresses ("<_io.BytesIO object at 0x7f...>"), which differ
    # between processes; drop them so the rejects file is byte-identical for any --workers.
    detail = _ADDRESS.sub("", r.detail)
    return {"location": f"{r.source_file}:{r.line}", "file": r.source_file, "line": r.line, "reason": r.reason, "detail": detail}


def _ordered_map(pool, fn, items: Iterator, window: int) -> Iterator:
    """`pool.imap(fn, items)` with at most `window` items in flight.

    Pool.imap's feeder thread drains the whole input iterator into the task queue as fast as it
    can read it; with parquet rows carrying image bytes that would pull the dataset into memory
    when the workers are slower than the reader. Results still come back in input order.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _pool(workers: int, ctx: _WorkerContext):
    # fork: workers inherit the imported modules (megatron-core's import alone takes seconds);
    # spawn elsewhere. The context object is passed explicitly either way.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # Ctrl-C reaches the whole process group: the parent handles it (and terminates the pool);
    # workers start with SIGINT ignored (inherited, also across exec) so they print no tracebacks.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(ctx,))
    finally:
        signal.signal(signal.SIGINT, previous)


def format_summary(cfg: PreprocessConfig, r: PreprocessResult) -> str:
    """The human summary the CLI prints."""
    lines = [
        f"inputs {r.inputs}: {r.samples} {'pairs' if cfg.preference else 'samples'}, {r.rejects} rejected ({100 * r.reject_ratio:.2f}%, limit {100 * cfg.max_reject_ratio:.2f}%)",
    ]
    for reason, n in r.rejects_by_reason.items():
        lines.append(f"  reject {reason:<24} {n}")
    lines.append(
        f"packs {r.packs} of <= {cfg.seq_length} tokens, {r.tokens} tokens, fill {100 * r.fill:.2f}%"
    )
    c = r.manifest.get("counts", {})
    lines.append(f"images {c.get('images', 0)}, tiles {c.get('tiles', 0)} ({cfg.tile_format}), {r.seconds:.1f}s with {cfg.workers} worker(s)")
    lines.append(f"wrote {cfg.output_prefix}_*.bin/.idx, {cfg.output_prefix}.manifest.json, {cfg.output_prefix}.rejects.jsonl")
    return "\n".join(lines)


def exit_code(cfg: PreprocessConfig, r: PreprocessResult) -> int:
    """0 if the reject ratio is within --max-reject-ratio, else 1."""
    return 1 if r.reject_ratio > cfg.max_reject_ratio else 0
