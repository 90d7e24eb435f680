"""Where the tensor of one `torch.save` record lies, read from the record's zip directory and pickle
without `torch.load`.

Torch DCP writes every chunk of a torch_dist checkpoint as a `torch.save` record (a zip archive,
stored, not compressed) at a byte range of a `.distcp` file:

    <prefix>/data.pkl       the pickle: torch._utils._rebuild_tensor_v2(storage, storage_offset,
                            size, stride, requires_grad, OrderedDict()), the storage a persistent
                            id ("storage", torch.<Type>Storage, key, location, numel)
    <prefix>/byteorder      "little"
    <prefix>/data/<key>     the storage's raw bytes
    ... and version records; the central directory at the end

`locate_tensor` reads the end-of-directory record, the directory, the pickle (through an unpickler
that resolves only the three globals above, to local stand-ins: nothing of the record's runs) and
the data entry's local header: a few small reads, where `torch.load(map_location="meta")` of the
record cost ~2 ms of CPU each (~1.5 CPU-s for the 834 chunks of the 1b shape). Anything it does not
recognise (zip64, a compressed entry, another pickle) returns None, and the caller falls back to
`torch.load(weights_only=True)`, which reads every record torch writes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

_EOCD = struct.Struct("<IHHHHIIH")  # signature, disks, cd disk, entries here, entries, cd size, cd offset, comment
_CDIR = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry, 46 bytes
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end record (56 bytes)
_LOCATOR = struct.Struct("<IIQI")  # zip64 end record locator (20 bytes)
_EOCD_SIG, _CDIR_SIG, _LOCAL_SIG = 0x06054B50, 0x02014B50, 0x04034B50
_EOCD64_SIG, _LOCATOR_SIG = 0x06064B50, 0x07064B50
_TAIL = 4096  # one read at the end holds the end record and the directory of a tensor record
_MAX_PICKLE = 1 << 20

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _NotPlain(Exception):
    """The record is not the plain one-tensor zip this module reads (never leaves `locate_tensor`)."""


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class TensorRecord:
    """A record's tensor: its dtype, shape and stride, and where its first element is in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    data_offset: int  # of the tensor's first element (its storage offset included), in the file
    storage_end: int  # where the storage's bytes end, in the file


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> tuple:
    """_rebuild_tensor_v2's stand-in: its arguments, nothing built."""
    return ("tensor", storage, offset, size, stride)


class _RecordUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype):
            return _Storage(pid[1], str(pid[2]), int(pid[4]))
        raise pickle.UnpicklingError("an unknown persistent id")


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise _NotPlain("truncated")
    return data


def _end_record(tail: bytes) -> tuple[int, int, int, int]:
    """(entries, directory size, directory offset, where the directory ends in `tail`) from the end
    of a record: torch writes a zip64 end record and its locator before the plain one."""
    sig, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, len(tail) - _EOCD.size)
    if sig != _EOCD_SIG or comment:
        raise _NotPlain("not a plain zip end record")
    at = len(tail) - _EOCD.size - _LOCATOR.size
    if at >= 0 and _LOCATOR.unpack_from(tail, at)[0] == _LOCATOR_SIG:
        zip64 = len(tail) - _EOCD.size - _LOCATOR.size - _EOCD64.size
        f = _EOCD64.unpack_from(tail, zip64)
        if f[0] != _EOCD64_SIG:
            raise _NotPlain("a bad zip64 end record")
        count, cd_size, cd_offset = f[7], f[8], f[9]
        cd_end = zip64
    else:
        cd_end = len(tail) - _EOCD.size
    return count, cd_size, cd_offset, cd_end


def _directory(fd: int, start: int, length: int) -> dict[str, tuple[int, int, int]]:
    """name -> (compression method, size, local header offset) of the record's entries."""
    tail_len = min(length, _TAIL)
    tail = _pread(fd, tail_len, start + length - tail_len)
    count, cd_size, cd_offset, cd_end = _end_record(tail)
    if cd_size > cd_end or cd_offset + cd_size != length - tail_len + cd_end:
        raise _NotPlain("a directory not just before the end records")
    entries, pos = {}, cd_end - cd_size
    for _ in range(count):
        f = _CDIR.unpack_from(tail, pos)
        if f[0] != _CDIR_SIG:
            raise _NotPlain("a bad directory entry")
        name_len, extra_len, comment_len = f[10], f[11], f[12]
        name = tail[pos + _CDIR.size : pos + _CDIR.size + name_len].decode()
        entries[name] = (f[4], f[9], f[16])  # method, uncompressed size, local header offset
        pos += _CDIR.size + name_len + extra_len + comment_len
    return entries


def _entry_data(fd: int, start: int, length: int, entry: tuple[int, int, int]) -> int:
    """Offset (in the record) of a stored entry's bytes, from its local header."""
    method, size, local = entry
    if method != 0 or 0xFFFFFFFF in (size, local):
        raise _NotPlain("a compressed or zip64 entry")
    f = _LOCAL.unpack(_pread(fd, _LOCAL.size, start + local))
    if f[0] != _LOCAL_SIG:
        raise _NotPlain("a bad local header")
    data = local + _LOCAL.size + f[9] + f[10]
    if data + size > length:
        raise _NotPlain("an entry past the record's end")
    return data


def _unpickle(fd: int, start: int, length: int, entries: dict, prefix: str) -> tuple:
    entry = entries[prefix + "data.pkl"]
    if entry[1] > _MAX_PICKLE:
        raise _NotPlain("a large pickle")
    at = _entry_data(fd, start, length, entry)
    rebuilt = _RecordUnpickler(io.BytesIO(_pread(fd, entry[1], start + at))).load()
    if not (isinstance(rebuilt, tuple) and rebuilt[0] == "tensor" and isinstance(rebuilt[1], _Storage)):
        raise _NotPlain("not one tensor")
    return rebuilt


def locate_tensor(fd: int, start: int, length: int) -> TensorRecord | None:
    """The tensor of the `torch.save` record at bytes [start, start + length) of open file `fd`, or
    None where the record is not the plain one-tensor zip torch writes (the caller then uses torch.load)."""
    try:
        entries = _directory(fd, start, length)
        prefixes = [n[: -len("data.pkl")] for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(prefixes) != 1:
            return None
        prefix = prefixes[0]
        byteorder = entries.get(prefix + "byteorder")
        if byteorder is not None:
            at = _entry_data(fd, start, length, byteorder)
            if _pread(fd, byteorder[1], start + at) != b"little":
                return None
        _, storage, offset, size, stride = _unpickle(fd, start, length, entries, prefix)
        shape, strides, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
        data_entry = entries[prefix + "data/" + storage.key]
        data = _entry_data(fd, start, length, data_entry)
        itemsize = storage.dtype.itemsize
        if data_entry[1] != storage.numel * itemsize or len(shape) != len(strides):
            return None
        return TensorRecord(
            storage.dtype, shape, strides, start + data + offset * itemsize, start + data + data_entry[1]
        )
    except Exception:  # noqa: BLE001 -- anything unexpected: torch.load reads it (and names what is wrong)
        return None
