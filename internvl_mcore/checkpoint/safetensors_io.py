"""HF checkpoint directories on disk: sharded safetensors read and written with plain file I/O
(`SafetensorsDir`; `ShardedWriter`, the one writer: shards laid out from a plan, tensors written in
place), dtype names, config.json + side files of an HF directory. No model knowledge here (config.json <-> ModelConfig: convert/hf_config.py;
tensor conversion through the key maps: convert/hf.py).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from internvl_mcore.cli_errors import naming, read_json, user_path
from internvl_mcore.errors import ConfigError, ConversionError

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> the name config.json uses ("bfloat16")."""
    return _DTYPE_NAMES[dtype]


def parse_dtype(name: str) -> torch.dtype:
    """ "bf16" / "bfloat16" / "fp32" / "float32" / "fp16" / "float16" -> torch dtype."""
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
    by_name = {v: k for k, v in _DTYPE_NAMES.items()}
    key = aliases.get(name, name)
    if key not in by_name:
        raise ConfigError(f"unknown dtype {name!r}; choose bf16, fp16 or fp32")
    return by_name[key]


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '64KB' / '1024' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    upper = text.strip().upper()
    for unit, mult in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * mult)
    return int(upper)


# =============================================================================================
# safetensors directories
# =============================================================================================

# safetensors files are read and written here with plain file I/O rather than the safetensors
# library: its reader memory-maps files, so every byte read stays in the process's RSS until the
# file is closed, and its writer serializes a whole shard to a second in-memory copy. The format is
# an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} padded to
# 8 bytes, then the raw tensor bytes.


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


# the safetensors library's own bound on the JSON header; a larger length is a damaged file
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts) of a safetensors file. The one reader of
    safetensors headers: a length past the file or the format's bound, a header that is not a JSON
    object, or an entry whose dtype / shape / offsets do not fit the file is a ConversionError
    naming the file (and tensor), before anything is allocated for it."""
    with user_path(ConversionError):  # a shard that cannot be opened (permissions, a directory): named
        f = open(path, "rb")
    with f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ConversionError(f"{path}: damaged safetensors file (header length {n} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly nested JSON
            raise ConversionError(f"{path}: unreadable safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: damaged safetensors file (header is not a JSON object)")
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, size - 8 - n)
    return header, 8 + n


def _check_entry(path: str | os.PathLike, name: str, entry: Any, data_bytes: int) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, offsets inside the data whose
    length is the shape's."""
    try:
        dtype = _ST_DTYPES[entry["dtype"]]
        shape, (begin, end) = list(entry["shape"]), entry["data_offsets"]
        if not all(type(x) is int for x in (*shape, begin, end)):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(dtype, str) and dtype not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {dtype}") from None
        raise ConversionError(f"{path}: damaged safetensors header entry for tensor {name!r}") from None
    numel = 1
    for d in shape:
        numel *= d
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_bytes or end - begin != numel * dtype.itemsize:
        raise ConversionError(
            f"{path}: damaged safetensors header: tensor {name!r} (shape {shape}, offsets "
            f"{begin}..{end}) does not fit the file's {data_bytes} data bytes"
        )


def _header_bytes(entries: Mapping[str, Any], metadata: Mapping[str, str] | None) -> bytes:
    """The length-prefixed JSON header of a safetensors file, padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    header.update((name, entries[name]) for name in sorted(entries))
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _entry(dtype: torch.dtype, shape: Sequence[int], offset: int) -> dict[str, Any]:
    """A tensor's header entry, its bytes starting at `offset` of the data block."""
    nbytes = math.prod(shape) * dtype.itemsize
    return {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}


def _write_bytes(f: Any, t: torch.Tensor) -> None:
    if t.numel():
        f.write(_bytes_of(t))


def _header(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, int]]:
    """The header block of a safetensors file holding tensors of these (dtype, shape), laid out in
    the order given (the writer's plan order), and each tensor's offset from the start of the file
    (ShardedWriter writes each tensor there)."""
    entries, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        entries[name] = _entry(dtype, shape, offset)
        offset = entries[name]["data_offsets"][1]
    block = _header_bytes(entries, metadata)
    return block, {name: len(block) + e["data_offsets"][0] for name, e in entries.items()}


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write contiguous CPU tensors as one safetensors file, straight from their memory."""
    names = sorted(tensors)
    entries, offset = {}, 0
    for name in names:
        entries[name] = _entry(tensors[name].dtype, tensors[name].shape, offset)
        offset = entries[name]["data_offsets"][1]
    with naming(path), open(path, "wb") as f:
        f.write(_header_bytes(entries, metadata))
        for name in names:
            _write_bytes(f, tensors[name])


class SafetensorsDir(Mapping[str, torch.Tensor]):
    """Lazy read-only view of the tensors of a directory of (sharded) safetensors files.

    Indexing reads one tensor from disk; shapes and dtypes come from the headers."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.exists():
            content = read_json(index, ConversionError)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            # plain file names only: an index must not send the reader outside the checkpoint directory
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..") for f in weight_map.values()
            ):
                raise ConversionError(f"{index}: weight_map must map tensor names to file names in {self.path}")
            files = sorted({self.path / f for f in weight_map.values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.path}: no *.safetensors files (and no {INDEX_NAME})")
        self._info: dict[str, _TensorInfo] = {}
        self.bytes_read = 0
        """Tensor bytes read from disk so far (tests check that a rank reads only its shards)."""
        for f in files:
            if not f.exists():
                raise ConversionError(f"{f}: listed in {index} but missing")
            header, data_start = read_safetensors_header(f)
            for name, h in header.items():
                if name == "__metadata__":
                    continue
                begin, end = h["data_offsets"]
                self._info[name] = _TensorInfo(
                    f, _ST_DTYPES[h["dtype"]], tuple(h["shape"]), data_start + begin, end - begin
                )

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._info.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        buf = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buf) != info.nbytes:
                raise ConversionError(f"{info.file}: truncated data for tensor {name!r}")
        self.bytes_read += info.nbytes
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def stored(self, name: str, first: int = 0, rows: int | None = None) -> tuple[Path, int, int]:
        """Where rows `first` .. `first + rows` (dim 0; default: to the end) of tensor `name` lie:
        (file, offset, bytes), for a writer that copies them file to file (`StoredBytes`)."""
        info = self._info.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        length = info.shape[0] if info.shape else 1
        rows = length - first if rows is None else rows
        if not 0 <= first <= first + rows <= length:
            raise IndexError(f"{name}: rows {first}..{first + rows} of {length}")
        row_bytes = info.nbytes // length if length else 0
        return info.file, info.start + first * row_bytes, rows * row_bytes

    def read_index(self, name: str, dim: int, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`self[name].index_select(dim, index)` with zeros where `index` is -1, reading from disk only
        the selected slices: each run of consecutive indices is one read per element of the dims
        before `dim` (one read in all along dim 0), straight into the result -- into `out` when it
        is a contiguous tensor of the result's dtype and shape (a parameter: no copy at all)."""
        info = self._info.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        shape = list(info.shape)
        length, shape[dim] = shape[dim], len(index)
        if out is None or out.dtype != info.dtype or list(out.shape) != shape or not out.is_contiguous():
            out = torch.zeros(shape, dtype=info.dtype)
        elif bool((index < 0).any()):
            out.index_fill_(dim, (index < 0).nonzero().flatten(), 0)
        inner = info.dtype.itemsize * math.prod(info.shape[dim + 1 :])
        outer = math.prod(info.shape[:dim])
        dst = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else None
        with open(info.file, "rb") as f:
            fd = f.fileno()
            for pos, first, n in index_runs(index):
                if not 0 <= first <= first + n <= length:
                    raise IndexError(f"{name}: rows {first}..{first + n} of {length} along dim {dim}")
                for o in range(outer):
                    at = (o * len(index) + pos) * inner
                    want = n * inner
                    if os.preadv(fd, [dst[at : at + want]], info.start + (o * length + first) * inner) != want:
                        raise ConversionError(f"{info.file}: truncated data for tensor {name!r}")
                    self.bytes_read += want
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header."""
        return self._info[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """dtype from the file header."""
        return self._info[name].dtype

    def where(self, name: str) -> str:
        """The file holding `name` (for error messages)."""
        return str(self._info[name].file)


class Renamed(Mapping[str, torch.Tensor]):
    """A view of `base` with key prefixes rewritten (`aliases`: (seen prefix, canonical prefix))."""

    def __init__(self, base: Mapping[str, torch.Tensor], aliases: Iterable[tuple[str, str]]) -> None:
        self.base = base
        self._orig: dict[str, str] = {}
        aliases = tuple(aliases)
        for k in base:
            new = next((to + k[len(frm) :] for frm, to in aliases if k.startswith(frm)), k)
            if new in self._orig:
                raise ConversionError(f"tensors {self._orig[new]!r} and {k!r} are the same weight under two names")
            self._orig[new] = k

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.base[self._orig[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._orig)

    def __len__(self) -> int:
        return len(self._orig)

    def original(self, name: str) -> str:
        return self._orig[name]

    def read_index(self, name: str, dim: int, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return read_index(self.base, self._orig[name], dim, index, out)

    def shape(self, name: str) -> tuple[int, ...]:
        return tensor_shape(self.base, self._orig[name])

    def stored(self, name: str, first: int = 0, rows: int | None = None) -> tuple[Path, int, int]:
        return self.base.stored(self._orig[name], first, rows)

    def dtype(self, name: str) -> torch.dtype:
        dtype = getattr(self.base, "dtype", None)
        return dtype(self._orig[name]) if callable(dtype) else self.base[self._orig[name]].dtype


def index_runs(index: torch.Tensor) -> Iterator[tuple[int, int, int]]:
    """(position in `index`, first source index, length) of every run of consecutive indices >= 0."""
    idx = index.tolist()
    pos = 0
    while pos < len(idx):
        if idx[pos] < 0:
            pos += 1
            continue
        end = pos + 1
        while end < len(idx) and idx[end] == idx[end - 1] + 1:
            end += 1
        yield pos, idx[pos], end - pos
        pos = end


def read_index(
    src: Mapping[str, torch.Tensor], name: str, dim: int, index: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`src[name]` at positions `index` along `dim` (-1: a zero slice). Through the source's own
    `read_index` when it has one (only those slices are read, into `out` where it fits), else cut
    from the whole tensor."""
    reader = getattr(src, "read_index", None)
    if callable(reader):
        return reader(name, dim, index, out)
    full = src[name]
    out = full.index_select(dim, index.clamp(min=0))
    if bool((index < 0).any()):
        out.index_fill_(dim, (index < 0).nonzero().flatten(), 0)
    return out


def tensor_shape(src: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    shape = getattr(src, "shape", None)
    return shape(name) if callable(shape) else tuple(src[name].shape)


PlanItem = tuple[str, torch.dtype, tuple[int, ...]]
"""(name, dtype, shape) of a tensor to be written."""


def tensor_dtype(src: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    dtype = getattr(src, "dtype", None)
    return dtype(name) if callable(dtype) else src[name].dtype


def plan_of(tensors: Mapping[str, torch.Tensor]) -> list[PlanItem]:
    """The writer's plan for every tensor of a mapping, in its order: from its `shape` / `dtype`
    methods where it has them (lazy views: nothing is read), else from the tensors."""
    return [(name, tensor_dtype(tensors, name), tuple(tensor_shape(tensors, name))) for name in tensors]


@dataclass(frozen=True)
class StoredBytes:
    """A tensor given by where its bytes lie in files: (file, offset, length) ranges, in order. The
    writer copies them file to file in the kernel (`os.copy_file_range`, as `cp` does), so they are
    never read into this process."""

    ranges: tuple[tuple[Path, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.ranges)

    @staticmethod
    def of(ranges: Iterable[tuple[Path, int, int]]) -> "StoredBytes":
        """Ranges that continue each other in one file merged into one (one copy instead of several)."""
        merged: list[tuple[Path, int, int]] = []
        for path, offset, n in ranges:
            if merged and merged[-1][0] == path and merged[-1][1] + merged[-1][2] == offset:
                merged[-1] = (path, merged[-1][1], merged[-1][2] + n)
            elif n:
                merged.append((path, offset, n))
        return StoredBytes(tuple(merged))


_COPY_CHUNK = 16 * 1024**2
# errors of a copy_file_range the kernel or file system does not offer for these files (older
# kernels across file systems, some network / FUSE file systems): copied through a buffer instead
_NO_KERNEL_COPY = {
    getattr(errno, n) for n in ("EXDEV", "ENOSYS", "EOPNOTSUPP", "ENOTSUP", "EINVAL", "EBADF") if hasattr(errno, n)
}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of `data` at `offset` (one pwrite writes at most ~2 GiB on Linux)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, n: int, what: str) -> None:
    """`n` bytes from `src` at `src_offset` to `dst` at `dst_offset`: in the kernel where it can,
    else through a bounded buffer. A source that ends early is a ConversionError naming `what`."""
    kernel_copy = getattr(os, "copy_file_range", None)
    while n and kernel_copy is not None:
        try:
            done = kernel_copy(src, dst, n, src_offset, dst_offset)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            break
        if done == 0:  # end of the source file: the buffered copy below says so
            break
        n, src_offset, dst_offset = n - done, src_offset + done, dst_offset + done
    buf = memoryview(bytearray(min(n, _COPY_CHUNK))) if n else None
    while n:
        got = os.preadv(src, [buf[: min(n, _COPY_CHUNK)]], src_offset)
        if got == 0:
            raise ConversionError(f"{what}: truncated data")
        _pwrite_all(dst, buf[:got], dst_offset)
        n, src_offset, dst_offset = n - got, src_offset + got, dst_offset + got


def _layout(plan: Iterable[PlanItem], max_shard_bytes: int) -> list[dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """The tensors of each shard, in plan order: a tensor that would overflow a non-empty shard
    starts the next one (so a tensor larger than the limit has a shard of its own)."""
    shards: list[dict[str, tuple[torch.dtype, tuple[int, ...]]]] = []
    seen: set[str] = set()
    size = 0
    for name, dtype, shape in plan:
        nbytes = math.prod(shape) * dtype.itemsize
        if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
            shards.append({})
            size = 0
        if name in seen:
            raise ConversionError(f"tensor {name!r} written twice")
        seen.add(name)
        shards[-1][name] = (dtype, tuple(shape))
        size += nbytes
    return shards


class ShardedWriter:
    """The one safetensors writer: shards of at most `max_shard_bytes` and an index (transformers'
    naming: `model.safetensors` alone, or `model-0000k-of-0000n.safetensors` +
    `model.safetensors.index.json`), laid out from `plan` -- (name, dtype, shape) of every tensor,
    in the order they will be added (`plan_of` a mapping). The shards and their headers are written
    first; each tensor is written at its place when it is added, from its memory (`os.pwrite`) or,
    given as `StoredBytes`, file to file in the kernel. So the writer holds no tensor and writes each
    byte once: memory is the caller's one tensor whatever the shard size. `peak_tensor_bytes`: the
    largest tensor added (tests bound the exporters' memory with it). Use it as a context manager
    (or call `release` on failure) so its open file is closed whatever happens."""

    def __init__(
        self, out_dir: str | os.PathLike, plan: Iterable[PlanItem], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    ) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_shard_bytes
        shards = _layout(plan, max_shard_bytes)
        self.total_bytes = sum(math.prod(sh) * dt.itemsize for specs in shards for dt, sh in specs.values())
        self.peak_tensor_bytes = 0
        self._place: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        for k, specs in enumerate(shards):
            block, starts = _header(specs, {"format": "pt"})
            with naming(self._tmp(k)), open(self._tmp(k), "wb") as f:
                f.write(block)
                f.truncate(len(block) + sum(math.prod(sh) * dt.itemsize for dt, sh in specs.values()))
            self._place.update({n: (k, starts[n], *specs[n]) for n in specs})
        self._shards = [list(specs) for specs in shards]
        self._pending = set(self._place)
        self._fd: tuple[int, int] | None = None
        """(shard, descriptor) of the shard written last: tensors arrive in plan order, shard by shard."""

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _tmp(self, k: int) -> Path:
        return self.out / f".shard-{k:05d}.safetensors.tmp"

    def _shard_fd(self, k: int) -> int:
        if self._fd is None or self._fd[0] != k:
            self.release()
            self._fd = (k, os.open(self._tmp(k), os.O_WRONLY))
        return self._fd[1]

    def release(self) -> None:
        """Close the open shard file (the files stay; `close` finishes them)."""
        if self._fd is not None:
            os.close(self._fd[1])
            self._fd = None

    def add(self, name: str, tensor: torch.Tensor | StoredBytes) -> None:
        """Write one planned tensor (or its stored bytes) at its place in its shard."""
        if name not in self._pending:
            raise ConversionError(f"tensor {name!r} {'written twice' if name in self._place else 'not planned'}")
        k, start, dtype, shape = self._place[name]
        nbytes = math.prod(shape) * dtype.itemsize
        if isinstance(tensor, StoredBytes):
            if tensor.nbytes != nbytes:
                raise ConversionError(f"tensor {name!r}: {tensor.nbytes} stored bytes, planned {dtype} {shape}")
            with naming(self._tmp(k)):
                self._copy(name, tensor, self._shard_fd(k), start)
        else:
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ConversionError(
                    f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
                )
            if tensor.numel():
                with naming(self._tmp(k)):
                    _pwrite_all(self._shard_fd(k), _bytes_of(tensor), start)
        self._pending.discard(name)
        self.peak_tensor_bytes = max(self.peak_tensor_bytes, nbytes)

    @staticmethod
    def _copy(name: str, stored: StoredBytes, fd: int, at: int) -> None:
        for path, offset, n in stored.ranges:
            with naming(path):
                src = os.open(path, os.O_RDONLY)
            try:
                _copy_range(src, offset, fd, at, n, f"{path}: tensor bytes for {name!r}")
            finally:
                os.close(src)
            at += n

    def close(self) -> list[Path]:
        """Check every planned tensor was written, name the files, write the index; returns the shard paths."""
        self.release()
        if self._pending:
            raise ConversionError(f"tensor(s) {sorted(self._pending)[:5]} planned but never written")
        n = len(self._shards)
        if n == 0:
            raise ConversionError("no tensors to write")
        if n == 1:
            final = [self.out / SINGLE_NAME]
        else:
            final = [self.out / f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, path in enumerate(final):
            os.replace(self._tmp(k), path)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: final[k].name for k, names in enumerate(self._shards) for name in sorted(names)},
            }
            with naming(self.out / INDEX_NAME):
                (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return final


# =============================================================================================
# directories
# =============================================================================================

_WEIGHT_FILES = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    CONFIG_NAME,
)


def copy_side_files(template_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy everything but weights and config.json (remote-code .py files, tokenizer, processor and
    generation configs) from the checkpoint the model started from."""
    src, dst = Path(template_dir), Path(out_dir)
    skip = {p.name for pattern in _WEIGHT_FILES for p in src.glob(pattern)}
    copied = []
    for p in sorted(src.iterdir()):
        if p.name in skip or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, dirs_exist_ok=True)
        else:
            shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def write_hf_dir(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: Mapping[str, Any],
    plan: Iterable[PlanItem],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write config.json and the (sharded) safetensors of `tensors`, streaming: `plan` is
    (name, dtype, shape) of every tensor `tensors` yields, in its order (ShardedWriter)."""
    out = Path(out_dir)
    with ShardedWriter(out, plan, max_shard_bytes) as writer:
        for name, t in tensors:
            writer.add(name, t)
        files = writer.close()
    with naming(out / CONFIG_NAME):
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return files


def source_dtype(src: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of a checkpoint's floating-point tensors have (what an export reproduces)."""
    counts: dict[torch.dtype, int] = {}
    dtype_of = getattr(src, "dtype", None)
    for name in src:
        dt = dtype_of(name) if callable(dtype_of) else src[name].dtype
        counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32
