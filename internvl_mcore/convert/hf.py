"""Streaming conversion between HF tensors and canonical tensors through the key maps
(convert/keymaps.py), for both HF layouts, and `convert_hf_to_checkpoint` (an HF directory -> a
canonical checkpoint, tensor by tensor).

The HF directory's pieces live elsewhere: safetensors I/O and the directory files in
checkpoint/safetensors_io.py, config.json <-> ModelConfig in convert/hf_config.py, the canonical
directory in checkpoint/canonical.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import torch
from tqdm import tqdm

from ..checkpoint.canonical import save_canonical
from ..checkpoint.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    PlanItem,
    Renamed,
    SafetensorsDir,
    StoredBytes,
    dtype_name,
    read_index,
    source_dtype,
    tensor_dtype,
    tensor_shape,
)
from ..errors import ConversionError
from ..config.model import ModelConfig, ParallelConfig
from .hf_config import model_config_from_hf, read_hf_config
from .keymaps import READ_ALIASES, Entry, canonical_shapes, copy_to_canonical, expand, keymap

_ROW_STRIDE = 1 << 40
"""Row numbers of HF tensor k are encoded as k * _ROW_STRIDE + row (no tensor has 2**40 rows)."""

# =============================================================================================
# streaming tensor conversion
# =============================================================================================


def _expected_hf_shapes(e: Entry, cfg: ModelConfig, canonical_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """HF shapes a canonical shape maps to. Every transform splits/stacks along dim 0 only, so a
    probe with the real dim 0 and size-1 trailing dims finds them without allocating the tensor
    (meta tensors would work too, but their first use imports torch's whole compiler stack: ~10 s)."""
    head, rest = canonical_shape[0], tuple(canonical_shape[1:])
    probe = torch.empty((head,) + (1,) * len(rest))
    return [(t.shape[0],) + rest for t in e.transform.to_hf(probe, cfg)]


def _normalize(src: Mapping[str, torch.Tensor], fmt: str) -> Mapping[str, torch.Tensor]:
    aliases = READ_ALIASES[fmt]
    return Renamed(src, aliases) if aliases else src


def _where(src: Mapping[str, torch.Tensor], name: str) -> str:
    base = src.base if isinstance(src, Renamed) else src
    orig = src.original(name) if isinstance(src, Renamed) else name
    where = getattr(base, "where", None)
    return f"{orig!r} in {where(orig)}" if callable(where) else repr(orig)


def check_hf_tensors(src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str) -> list[Entry]:
    """Refuse a checkpoint whose tensors do not match the key map and config (names the key)."""
    entries = expand(keymap(fmt, cfg.llm.family), cfg)
    shapes = canonical_shapes(cfg)
    wanted: set[str] = set()
    for e in entries:
        if not e.present:
            continue
        for h, want in zip(e.hf, _expected_hf_shapes(e, cfg, shapes[e.canonical])):
            wanted.add(h)
            if h not in src:
                raise ConversionError(f"missing tensor {h!r} (for {e.canonical}) in the {fmt} checkpoint")
            got = tensor_shape(src, h)
            if got != want:
                raise ConversionError(f"tensor {_where(src, h)} has shape {got}, but config.json implies {want}")
    extra = sorted(set(src) - wanted)
    if extra and cfg.llm.tie_word_embeddings:
        # an in-memory state dict of a tied model also lists lm_head; harmless if it is the embedding
        tied = {e.hf[0] for e in entries if e.canonical == "language_model.output_layer.weight"}
        emb = next(e.hf[0] for e in entries if e.canonical == "language_model.embedding.word_embeddings.weight")
        for h in [x for x in extra if x in tied]:
            if not torch.equal(src[h], src[emb]):
                raise ConversionError(f"tensor {_where(src, h)} differs from {emb!r} but config.json ties them")
            extra.remove(h)
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ConversionError(
            f"unexpected tensor(s) {', '.join(_where(src, x) for x in extra[:5])}{more}: "
            f"not part of the {fmt} layout of this config"
        )
    return entries


def hf_to_canonical(
    src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (canonical name, tensor) pairs from HF tensors; validates everything before the first
    tensor is read. Tensors keep their dtype."""
    src = _normalize(src, fmt)
    entries = [e for e in check_hf_tensors(src, cfg, fmt) if e.present]
    for e in tqdm(
        entries, desc="HF -> canonical", unit="tensor", disable=None if progress else True
    ):  # a bar on a terminal only
        yield e.canonical, e.transform.to_canonical([src[h] for h in e.hf], cfg).contiguous()


def canonical_plan(
    src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(canonical name, dtype, shape) of every tensor `hf_to_canonical` will yield, in its order, from
    the headers alone (validates like it): what the ShardedWriter lays its shards out from."""
    src = _normalize(src, fmt)
    shapes = canonical_shapes(cfg)
    return [
        (e.canonical, tensor_dtype(src, e.hf[0]), shapes[e.canonical])
        for e in check_hf_tensors(src, cfg, fmt)
        if e.present
    ]


def _row_sources(src: Mapping[str, torch.Tensor], e: Entry, cfg: ModelConfig) -> torch.Tensor:
    """For every canonical row of entry `e`: k * _ROW_STRIDE + the row of HF tensor e.hf[k] it is
    (the transform run on row numbers instead of tensors)."""
    probes = [torch.arange(tensor_shape(src, h)[0], dtype=torch.int64) + k * _ROW_STRIDE for k, h in enumerate(e.hf)]
    return e.transform.to_canonical(probes, cfg)


def _stored_canonical(src: Mapping[str, torch.Tensor], e: Entry, cfg: ModelConfig) -> StoredBytes | None:
    """Entry `e`'s canonical tensor as byte ranges of the HF files: every transform moves whole rows
    (dim 0), so each run of consecutive rows of one HF tensor is one range. None where the source
    cannot say where its bytes lie, or the HF pieces differ in dtype (the tensor path refuses it)."""
    base = src.base if isinstance(src, Renamed) else src
    if not callable(getattr(base, "stored", None)) or len({tensor_dtype(src, h) for h in e.hf}) > 1:
        return None
    if e.transform.to_canonical is copy_to_canonical or not tensor_shape(src, e.hf[0]):
        return StoredBytes.of(src.stored(h) for h in e.hf) if len(e.hf) == 1 else None
    rows = _row_sources(src, e, cfg)
    if not len(rows):
        return StoredBytes(())
    starts = (torch.diff(rows) != 1).nonzero().flatten() + 1
    bounds = [0, *starts.tolist(), len(rows)]
    firsts = rows[bounds[:-1]].tolist()
    return StoredBytes.of(
        src.stored(e.hf[code // _ROW_STRIDE], code % _ROW_STRIDE, end - begin)
        for code, begin, end in zip(firsts, bounds[:-1], bounds[1:])
    )


def _stored_to_canonical(
    src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor | StoredBytes]]:
    """`hf_to_canonical`, but yielding where the canonical tensor's bytes lie in the HF files
    (`StoredBytes`: the writer copies them file to file in the kernel, the way `cp` does; nothing
    is read into memory, no tensor is built) wherever the source can say so; tensors elsewhere."""
    src = _normalize(src, fmt)
    entries = [e for e in check_hf_tensors(src, cfg, fmt) if e.present]
    for e in tqdm(
        entries, desc="HF -> canonical", unit="tensor", disable=None if progress else True
    ):  # a bar on a terminal only
        stored = _stored_canonical(src, e, cfg)
        yield (
            e.canonical,
            stored if stored is not None else e.transform.to_canonical([src[h] for h in e.hf], cfg).contiguous(),
        )


class HFAsCanonical(Mapping[str, torch.Tensor]):
    """The canonical tensors of an HF checkpoint, each converted when it is read. Names, shapes and
    the layout are validated first (from the safetensors headers: no tensor data is read).

    `read_index` gives a rank its shard of a canonical tensor while reading only the HF slices that
    shard is made of (`models/weights.py: load_canonical` calls it). Every key-map transform
    (convert/keymaps.py) rearranges rows (dim 0) only, so:

    - a shard along dim 0 (column-parallel weights, biases, vocabulary rows, the group-interleaved
      q/k/v of `linear_qkv`, the [gate; up] halves of `linear_fc1`): the transform is run once on
      *row numbers* instead of tensors, which says for every canonical row the HF tensor and row it
      comes from; the shard's rows are then read from those HF tensors, consecutive rows in one read;
    - a shard along another dim (row-parallel `linear_proj` / `linear_fc2`): the same columns of
      every HF tensor are read and the transform applied to them.

    Padding (zero vision heads, zero vocabulary rows) is never read. Nothing here reads a whole
    tensor to cut a shard from it; `check_hf_tensors` does read two whole tensors in one case: an
    untied-looking `lm_head` beside the embedding of a config that ties them (compared once)."""

    def __init__(self, src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str) -> None:
        self.src = _normalize(src, fmt)
        self.cfg = cfg
        self._entries = {e.canonical: e for e in check_hf_tensors(self.src, cfg, fmt) if e.present}
        self._shapes = canonical_shapes(cfg)

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        return e.transform.to_canonical([self.src[h] for h in e.hf], self.cfg).contiguous()

    def shape(self, name: str) -> tuple[int, ...]:
        """Canonical shape (the HF shapes were checked against it)."""
        self._entries[name]  # KeyError for an unknown name
        return self._shapes[name]

    def read_index(self, name: str, dim: int, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`self[name].index_select(dim, index)`, zeros where `index` is -1, reading only those slices
        (for a tensor stored as is, e.g. embeddings, output layer, proj, fc2: into `out` where it fits)."""
        e = self._entries[name]
        if e.transform.to_canonical is copy_to_canonical:
            return read_index(self.src, e.hf[0], dim, index, out)
        if dim != 0:  # the transform moves rows only: pick the columns first
            parts = [read_index(self.src, h, dim, index) for h in e.hf]
            return e.transform.to_canonical(parts, self.cfg).contiguous()
        source = self._row_sources(e)[index.clamp(min=0)]
        source[index < 0] = -1
        shape = list(self._shapes[name])
        shape[0] = len(index)
        out = torch.zeros(shape, dtype=self._dtype(e.hf[0]))
        for k, h in enumerate(e.hf):
            rows = ((source >= 0) & (source // _ROW_STRIDE == k)).nonzero().flatten()
            if len(rows):
                out.index_copy_(0, rows, read_index(self.src, h, 0, source[rows] % _ROW_STRIDE))
        return out

    def _row_sources(self, e: Entry) -> torch.Tensor:
        return _row_sources(self.src, e, self.cfg)

    def _dtype(self, hf_name: str) -> torch.dtype:
        return tensor_dtype(self.src, hf_name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _check_canonical(src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str) -> list[Entry]:
    """The present entries of format `fmt`; refuses missing, unexpected or mis-shaped canonical tensors."""
    entries = [e for e in expand(keymap(fmt, cfg.llm.family), cfg) if e.present]
    shapes = canonical_shapes(cfg)
    known = {e.canonical for e in entries}
    for e in entries:
        if e.canonical not in src:
            raise ConversionError(f"canonical checkpoint has no tensor {e.canonical!r}")
    extra = sorted(set(src) - known)
    if extra:
        raise ConversionError(
            f"canonical checkpoint has tensor(s) {', '.join(map(repr, extra[:5]))} that the "
            f"{fmt} layout of this config has no place for"
        )
    for name in known & set(src):
        got = tensor_shape(src, name)
        if got != shapes[name]:
            raise ConversionError(f"canonical tensor {name!r} has shape {got}, the config implies {shapes[name]}")
    return entries


def canonical_to_hf(
    src: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    fmt: str,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor | StoredBytes]]:
    """Stream (HF name, tensor) pairs in format `fmt` from canonical tensors (cast to `dtype` if
    given). Refuses missing, unexpected or mis-shaped canonical tensors before writing anything.
    Where the source can say where a tensor's rows lie in its files (`stored_rows`: a training
    checkpoint's layer / TP pieces along dim 0) and no cast is asked for, the HF tensor is yielded as
    those byte ranges (`StoredBytes`: the writer copies them file to file in the kernel, as `cp`
    does, nothing read into this process); every key map moves whole rows only."""
    entries = _check_canonical(src, cfg, fmt)
    for e in tqdm(
        entries, desc=f"canonical -> {fmt}", unit="tensor", disable=None if progress else True
    ):  # a bar on a terminal only
        stored = _stored_hf(src, e, cfg, dtype)
        if stored is not None:
            yield from zip(e.hf, stored)
            continue
        # in a function of its own, so that nothing of this tensor is alive while the next one is read
        yield from _hf_tensors(e, src[e.canonical], cfg, dtype)


def _stored_hf(
    src: Mapping[str, torch.Tensor], e: Entry, cfg: ModelConfig, dtype: torch.dtype | None
) -> list[StoredBytes] | None:
    """Entry `e`'s HF tensors as byte ranges of the source's files: the transform run on canonical
    row numbers says which rows each HF tensor is made of. None where the source cannot say where
    the rows lie or a cast is asked for."""
    rows_of = getattr(src, "stored_rows", None)
    if not callable(rows_of) or (dtype is not None and dtype != tensor_dtype(src, e.canonical)):
        return None
    where = rows_of(e.canonical)
    if where is None:
        return None
    shapes = _expected_hf_shapes(e, cfg, tensor_shape(src, e.canonical))
    probes = e.transform.to_hf(torch.arange(len(where.offsets)), cfg)
    if len(probes) != len(e.hf) or any(p.dim() != 1 or (s and len(p) != s[0]) for p, s in zip(probes, shapes)):
        return None
    return [StoredBytes.of(where.take(p).ranges()) for p in probes]


def hf_plan(
    src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str, dtype: torch.dtype | None = None
) -> list[PlanItem]:
    """(HF name, dtype, shape) of every tensor `canonical_to_hf` will yield, in its order, from the
    canonical shapes and dtypes alone (a checkpoint's index: nothing is read; validates like it):
    what the ShardedWriter lays the HF shards out from."""
    plan = []
    for e in _check_canonical(src, cfg, fmt):
        out_dtype = dtype or tensor_dtype(src, e.canonical)
        plan += [
            (h, out_dtype, shape) for h, shape in zip(e.hf, _expected_hf_shapes(e, cfg, tensor_shape(src, e.canonical)))
        ]
    return plan


def _hf_tensors(
    e: Entry, t: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for h, out in zip(e.hf, e.transform.to_hf(t, cfg)):
        yield h, (out if dtype is None else out.to(dtype)).contiguous()


# =============================================================================================
# end-to-end conversion
# =============================================================================================


def convert_hf_to_checkpoint(
    hf_dir: str | os.PathLike,
    save: str | os.PathLike,
    layout: ParallelConfig | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> ModelConfig:
    """Read an HF checkpoint (either layout; the format and model come from config.json) and write a
    canonical checkpoint. Everything is validated before the first tensor is converted.

    Streams tensor by tensor: each canonical tensor is written to its place in the output shard,
    copied in the kernel from the byte ranges of the HF files it is made of (the key maps only move
    whole rows), so no tensor passes through this process's memory: the import costs about a `cp`
    of the checkpoint plus Python's start-up."""
    hf_config = read_hf_config(hf_dir)
    cfg, fmt = model_config_from_hf(hf_config, hf_dir)
    src = SafetensorsDir(hf_dir)
    dtype = source_dtype(src)
    source = {"format": fmt, "dtype": dtype_name(dtype), "hf_config": hf_config, "hf_dir": str(Path(hf_dir).resolve())}
    save_canonical(
        save,
        cfg,
        _stored_to_canonical(src, cfg, fmt, progress=progress),
        source,
        layout,
        max_shard_bytes,
        plan=canonical_plan(src, cfg, fmt),
    )
    return cfg
