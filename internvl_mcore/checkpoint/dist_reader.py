"""The global tensors of a megatron-core torch_dist checkpoint, read without a model, a process group
or the layout it was saved in.

A torch_dist directory (what `dist_checkpointing.save` writes, training/checkpoint.py) holds:

    .metadata       torch.distributed.checkpoint's index: for every global tensor key its shape, dtype
                    and chunks (offsets + sizes in the global tensor), and where each chunk's bytes are
                    (`_StorageInfo`: .distcp file, byte offset, length)
    __R_K.distcp    the chunks, each one a `torch.save` record at its byte range

Megatron-core names each global tensor by its layout-free key and writes each chunk once (replicas
are deduplicated when saving), so the chunks of a key tile its global shape. Decoder layers (and MoE
experts) are stacked: megatron-core prepends a layer axis (an expert axis) to every per-layer tensor,
`language_model.decoder.layers.mlp.linear_fc1.weight` has shape (layers, 2 * ffn, hidden) and each
pipeline stage's layers are their own chunks. TP pieces are chunks along the split dim (SwiGLU's
gate and up halves each: the global fc1 is [gate; up]); vocabulary rows and InternViT heads keep the
padding of the saving layout (checkpoint/dist_canonical.py removes it). Optimizer state is keys too:
plain and distributed optimizers alike (training/checkpoint.py saves megatron-core's model-space
`fully_reshardable` form, MoE's chained optimizers without their `chained_<k>.` prefix) under
`optimizer.state.<param|exp_avg|exp_avg_sq>.<model key>` with the model key's shape and chunks.
Checkpoints written before that format hold the distributed optimizer's state (`dp_reshardable`) as
one flat 1-D tensor per gradient bucket, `optimizer.distributed.dp_group_idx_G.gbuf_idx_B.dtype_(...).
bucket_idx_K.<param|exp_avg|exp_avg_sq>`, chunked per DP rank and parameter, and MoE's under the
`chained_<k>.` prefix (replicas are never written twice: each chunk is stored once, by the replica
megatron-core marks as the main one).
Megatron-core < 0.14's "N-D flattened" entries would appear with the global shape they were saved
with ([X // x, ..., x * y * z]); we never write them. Non-tensor items (the modules' `_extra_state`,
the buckets' sizes) are not listed and never read here.

`DistCheckpointReader.read(key, index)` assembles one box of a global tensor (e.g. `(layer,)` of a
layer-stacked one) from only the chunks that intersect it. Where each chunk's bytes start comes
from its record's zip directory and pickle (checkpoint/torch_record.py, a few small reads; a record
it does not recognise is loaded with `torch.load(weights_only=True)` onto the meta device through a
window onto the file), and the bytes are read from the file straight into the box (a row-parallel
piece, split along the last dim, by one scattered read into its columns; a part of a chunk that is
not one byte range through one buffer): memory is the box plus at most one chunk, whatever the
checkpoint's size. `row_ranges` says where each row of a box
lies in the files without reading it (the export copies those in the kernel). The index is
unpickled only by checkpoint/trust.py's allow-listed reader.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import CheckpointError
from .torch_record import TensorRecord, locate_tensor
from .trust import Metadata, TensorStorageMetadata, read_dist_metadata

Box = tuple[tuple[int, int], ...]
"""[start, stop) per dim of a global tensor."""


@dataclass(frozen=True)
class RowRanges:
    """Where the rows of a tensor lie: row r is `row_bytes` bytes at `offsets[r]` of `files[file_of[r]]`.
    numpy arrays, not torch tensors: a few small array operations per tensor, where torch's per-call
    overhead was most of the export's bookkeeping."""

    files: list[Path]
    file_of: np.ndarray
    offsets: np.ndarray
    row_bytes: int

    def take(self, rows: torch.Tensor | np.ndarray) -> "RowRanges":
        """The ranges of these rows, in this order."""
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        return RowRanges(self.files, self.file_of[rows], self.offsets[rows], self.row_bytes)

    def ranges(self) -> list[tuple[Path, int, int]]:
        """(file, offset, length), consecutive rows of one file merged into one range."""
        if not len(self.offsets):
            return []
        step = (np.diff(self.offsets) != self.row_bytes) | (np.diff(self.file_of) != 0)
        bounds = [0, *(step.nonzero()[0] + 1).tolist(), len(self.offsets)]
        firsts = self.offsets[bounds[:-1]].tolist()
        files = self.file_of[bounds[:-1]].tolist()
        return [
            (self.files[f], o, (end - begin) * self.row_bytes)
            for f, o, begin, end in zip(files, firsts, bounds[:-1], bounds[1:])
        ]


class _FileWindow(io.RawIOBase):
    """A seekable read-only view of bytes [start, start + length) of an open file, so that torch.load
    reads one chunk's record in place (no copy of the record in memory)."""

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n]) or 0
        self._pos += got
        return got


def _box_of(index: tuple, shape: tuple[int, ...], key: str) -> tuple[Box, list[int]]:
    """The box `index` (ints / step-1 slices on leading dims) selects, and the dims ints drop."""
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise IndexError(f"{key}: index {index} has more dims than the tensor's shape {shape}")
    box, squeeze = [], []
    for dim, (ix, size) in enumerate(zip(index, shape)):
        if isinstance(ix, slice):
            start, stop, step = ix.indices(size)
            if step != 1:
                raise IndexError(f"{key}: only step-1 slices are read (dim {dim}: {ix})")
            box.append((start, max(start, stop)))
        else:
            i = int(ix)
            if not -size <= i < size:
                raise IndexError(f"{key}: index {i} out of range for dim {dim} of size {size}")
            i %= size
            box.append((i, i + 1))
            squeeze.append(dim)
    box.extend((0, size) for size in shape[len(index) :])
    return tuple(box), squeeze


def _intersect(offsets: Any, sizes: Any, box: Box) -> Box | None:
    out = []
    for o, s, (lo, hi) in zip(offsets, sizes, box):
        a, b = max(int(o), lo), min(int(o) + int(s), hi)
        if a >= b:
            return None
        out.append((a, b))
    return tuple(out)


class DistCheckpointReader:
    """The global tensors of one torch_dist checkpoint directory (an `iter_NNNNNNN/`), box by box.

    `peak_bytes` records the most tensor bytes one `read` held at once (the box plus the chunk being
    copied into it): tests bound the exporters' memory with it."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None) -> None:
        """`metadata`: the directory's index when the caller has read it already
        (checkpoint/trust.py: check_dist_checkpoint returns it); else it is read here."""
        self.path = Path(path)
        if metadata is None:
            metadata = read_dist_metadata(self.path)
        self._meta: dict[str, TensorStorageMetadata] = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._where: dict[tuple[str, tuple[int, ...]], Any] = {
            (index.fqn, tuple(index.offset)): info
            for index, info in metadata.storage_data.items()
            if index.fqn in self._meta and index.offset is not None
        }
        self.peak_bytes = 0
        self._located: dict[tuple[str, tuple[int, ...]], tuple[Path, int]] = {}

    def keys(self) -> list[str]:
        """The global tensor keys (model and optimizer tensors alike), sorted."""
        return sorted(self._meta)

    def __contains__(self, key: object) -> bool:
        return key in self._meta

    def _md(self, key: str) -> TensorStorageMetadata:
        md = self._meta.get(key)
        if md is None:
            raise KeyError(f"{self.path}: no tensor {key!r} in the checkpoint")
        return md

    def shape(self, key: str) -> tuple[int, ...]:
        """The global shape of `key` (with its stacked layer / expert axes)."""
        return tuple(self._md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._md(key).properties.dtype

    def read(self, key: str, index: tuple = ()) -> torch.Tensor:
        """The global tensor `key`, or the box `index` selects (ints drop their dim, slices keep it),
        assembled from the chunks that intersect it."""
        md = self._md(key)
        box, squeeze = _box_of(index, tuple(md.size), key)
        out = self._assemble(key, md, box)
        for dim in reversed(squeeze):
            out = out.squeeze(dim)
        return out

    def _assemble(self, key: str, md: TensorStorageMetadata, box: Box) -> torch.Tensor:
        dtype = md.properties.dtype
        out = torch.empty(tuple(hi - lo for lo, hi in box), dtype=dtype)
        covered = 0
        for chunk in md.chunks:
            part = _intersect(chunk.offsets, chunk.sizes, box)
            if part is None:
                continue
            offsets, csizes = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
            out_ix = tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(part, box))
            self._read_part(key, offsets, csizes, dtype, part, out[out_ix])
            covered += math.prod(b - a for a, b in part)
        if covered != out.numel():
            raise CheckpointError(
                f"{self.path}: the chunks of {key!r} cover {covered} of the {out.numel()} "
                f"elements of box {box}; the checkpoint is incomplete"
            )
        self.peak_bytes = max(self.peak_bytes, out.nbytes)
        return out

    def row_ranges(self, key: str, index: tuple[int, ...] = ()) -> RowRanges | None:
        """Where each row of `key[index]` (its first dim after the ints of `index`) lies in the
        files, when every row is one contiguous byte range of one chunk (the chunks split that dim
        or the stacked axes only, not the trailing dims); else None. Reads no tensor data: the
        export copies such tensors file to file (`StoredBytes`)."""
        md = self._md(key)
        shape = tuple(md.size)
        n = len(index)
        if n >= len(shape) or not all(isinstance(i, int) for i in index):
            return None
        box, _ = _box_of(index, shape, key)
        itemsize = md.properties.dtype.itemsize
        row_bytes = math.prod(shape[n + 1 :]) * itemsize
        files: list[Path] = []
        fid = np.full(shape[n], -1, dtype=np.int64)
        off = np.zeros(shape[n], dtype=np.int64)
        for chunk in md.chunks:
            part = _intersect(chunk.offsets, chunk.sizes, box)
            if part is None:
                continue
            offsets, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
            if any(offsets[d] != 0 or sizes[d] != shape[d] for d in range(n + 1, len(shape))):
                return None
            file, data = self._chunk_data(key, offsets, sizes, md.properties.dtype)
            lead = sum((box[d][0] - offsets[d]) * math.prod(sizes[d + 1 :]) for d in range(n)) * itemsize
            a, b = part[n]
            if file not in files:
                files.append(file)
            fid[a:b] = files.index(file)
            off[a:b] = np.arange(a, b, dtype=np.int64) * row_bytes + (data + lead - offsets[n] * row_bytes)
        if (fid < 0).any():
            raise CheckpointError(
                f"{self.path}: the chunks of {key!r} do not cover {index}; the checkpoint is incomplete"
            )
        return RowRanges(files, fid, off, row_bytes)

    def _read_part(
        self,
        key: str,
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        dtype: torch.dtype,
        part: Box,
        dst: torch.Tensor,
    ) -> None:
        """Copy box `part` of a chunk into `dst`. Where the part is one contiguous byte range of the
        chunk (a whole chunk, or rows of one: layers, TP pieces) the bytes are read from the file
        straight into `dst`: in one read where `dst` is contiguous, else scattered over its rows (a
        row-parallel piece, split along its last dim, into its columns of the box); otherwise the
        chunk's rows that hold the part are read and copied."""
        file, data = self._chunk_data(key, offsets, sizes, dtype)
        rel = [(a - o, b - o) for (a, b), o in zip(part, offsets)]
        lead = _contiguous_lead(rel, sizes)
        if lead is not None:
            first = sum(lo * math.prod(sizes[d + 1 :]) for d, (lo, _) in enumerate(rel[: lead + 1]))
            views = [_bytes_of(dst)] if dst.is_contiguous() else _row_views(dst)
            if views is not None:
                _preadv_all(file, views, data + first * dtype.itemsize)
                return
        rows = rel[0]
        src = torch.empty((rows[1] - rows[0], *sizes[1:]), dtype=dtype)
        self.peak_bytes = max(self.peak_bytes, dst.untyped_storage().nbytes() + src.nbytes)
        _pread_into(file, src, data + rows[0] * math.prod(sizes[1:]) * dtype.itemsize)
        dst.copy_(src[(slice(None), *(slice(a, b) for a, b in rel[1:]))])

    def _chunk_data(
        self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[Path, int]:
        """(file, byte offset) of a chunk's raw tensor bytes, found once per chunk. The `torch.save`
        record's zip directory and pickle say where the storage's bytes start
        (checkpoint/torch_record.py; a record it does not recognise is loaded weights-only onto the
        meta device instead); the tensor is checked against the index (shape, dtype, contiguous,
        inside its byte range)."""
        done = self._located.get((key, offsets))
        if done is not None:
            return done
        info = self._where.get((key, offsets))
        if info is None:
            raise CheckpointError(f"{self.path / '.metadata'}: no storage entry for chunk {offsets} of {key!r}")
        rel = PurePosixPath(str(info.relative_path))
        if rel.is_absolute() or ".." in rel.parts or info.transform_descriptors:
            raise CheckpointError(
                f"{self.path / '.metadata'}: chunk {offsets} of {key!r} is stored at {rel} "
                f"with transforms {info.transform_descriptors}; refusing the checkpoint"
            )
        file, start, length = self.path / rel, int(info.offset), int(info.length)
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{file}: unreadable ({exc.strerror or exc})") from None
        try:
            found = locate_tensor(fd, start, length)
        finally:
            os.close(fd)
        what = f"{file}: chunk {offsets} of {key!r}"
        t = found or _meta_load(file, start, length, what)
        if t.shape != sizes or t.dtype != dtype:
            raise CheckpointError(f"{what} holds {(t.shape, t.dtype)}, the index says {(sizes, dtype)}")
        if t.stride != _contiguous_strides(t.shape, t.stride):
            raise CheckpointError(f"{what} is not a contiguous tensor record")
        if t.data_offset + math.prod(t.shape) * dtype.itemsize > min(t.storage_end, start + length):
            raise CheckpointError(f"{what} ends past its byte range")
        self._located[(key, offsets)] = (file, t.data_offset)
        return file, t.data_offset

    def _load_chunk(
        self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """One whole chunk, read from its byte range."""
        file, data = self._chunk_data(key, offsets, sizes, dtype)
        out = torch.empty(sizes, dtype=dtype)
        _pread_into(file, out, data)
        return out


def _contiguous_lead(rel: list[tuple[int, int]], sizes: tuple[int, ...]) -> int | None:
    """The dim k where box `rel` of a chunk of `sizes` is one contiguous range of its elements (dims
    before k: one index each; dims after k: whole), else None."""
    k = len(sizes) - 1
    while k > 0 and rel[k] == (0, sizes[k]):
        k -= 1
    if any(b - a != 1 for a, b in rel[:k]):
        return None
    return max(k, 0)


def _contiguous_strides(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """The strides a contiguous tensor of `shape` has, taking `stride`'s where a dim's size is 1
    (any stride is contiguous there, as torch's is_contiguous says)."""
    out, step = [], 1
    for size, given in zip(reversed(shape), reversed(stride)):
        out.append(given if size == 1 else step)
        step *= size
    return tuple(reversed(out))


def _meta_load(file: Path, start: int, length: int, what: str) -> TensorRecord:
    """The tensor of a record torch_record does not recognise: torch.load(weights_only=True) onto
    the meta device through a window onto the file (its pickle and zip directory, no data)."""
    try:
        with open(file, "rb") as f:
            t = torch.load(_FileWindow(f, start, length), map_location="meta", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"{file}: unreadable ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 -- a damaged record or one holding more than a tensor
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{what} is not a tensor record ({first})") from None
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{what} holds {type(t).__name__}, not a tensor")
    base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
    if base is None or not t.is_contiguous():
        raise CheckpointError(f"{what} is not a contiguous tensor record")
    begin = start + base + t.storage_offset() * t.dtype.itemsize
    shape = tuple(t.shape)
    return TensorRecord(t.dtype, shape, _contiguous_strides(shape, tuple(t.stride())), begin, start + length)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The memory of contiguous tensor `t`, as bytes."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _row_views(dst: torch.Tensor) -> list[memoryview] | None:
    """The memory of each row (last dim) of `dst`, in order, where its last dim is contiguous: the
    targets of one scattered read of `dst`'s elements. None where it is not."""
    if dst.dim() < 2 or dst.stride(-1) != 1 or dst.numel() == 0:
        return None
    storage = torch.empty(0, dtype=torch.uint8).set_(dst.untyped_storage())
    base = memoryview(storage.numpy())
    starts = torch.full((), dst.storage_offset(), dtype=torch.int64)
    for size, stride in zip(dst.shape[:-1], dst.stride()[:-1]):
        starts = (starts.unsqueeze(-1) + torch.arange(size) * stride).flatten()
    itemsize, row = dst.element_size(), dst.shape[-1] * dst.element_size()
    return [base[o * itemsize : o * itemsize + row] for o in starts.tolist()]


_IOV_MAX = 1024  # Linux's limit on one preadv's buffers


def _preadv_all(file: Path, views: list[memoryview], offset: int) -> None:
    """Fill `views` (none empty) in order from the consecutive bytes of `file` at `offset`."""
    views = list(views)
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{file}: unreadable ({exc.strerror or exc})") from None
    try:
        i, pos = 0, offset
        while i < len(views):
            batch = views[i : i + _IOV_MAX]
            got = os.preadv(fd, batch, pos)
            if got == 0:
                raise CheckpointError(f"{file}: truncated (a chunk's bytes end at {pos})")
            pos += got
            if got == sum(map(len, batch)):
                i += len(batch)
                continue
            while got >= len(views[i]):  # a short read: go on from the first view not filled
                got -= len(views[i])
                i += 1
            views[i] = views[i][got:]
    finally:
        os.close(fd)


def _pread_into(file: Path, dst: torch.Tensor, offset: int) -> None:
    """dst.nbytes bytes of `file` from `offset` into the contiguous tensor `dst`'s memory."""
    if dst.numel():
        _preadv_all(file, [_bytes_of(dst)], offset)
