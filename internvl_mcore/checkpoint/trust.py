"""Reading a training checkpoint directory that someone else may have written, without running its code.

A checkpoint directory comes from wherever the user got it, and `checksums.json` proves nothing
against whoever wrote the directory (they write the checksums too). Our own files (run.json, the
RNG and data-position files of training/checkpoint.py) are JSON; megatron-core's dist_checkpointing
part still holds pickles, which `check_dist_checkpoint` inspects before megatron-core or torch
read the directory:

    .metadata         torch.distributed.checkpoint's index, a plain pickle (FileSystemReader.read_metadata):
                      unpickled here by `_MetadataUnpickler`, which resolves only the classes listed in
                      `_METADATA_GLOBALS` (plus torch dtypes), each to a local stand-in that holds the
                      fields (no import of torch.distributed.checkpoint); anything else refuses the checkpoint
    __*.distcp        tensors (torch reads them with weights_only=True) and, for megatron-core's
                      ShardedObjects (the modules' `_extra_state`), byte items that torch's load planner
                      unpickles with weights_only=False: each one is read here with weights_only=True
    common.pt         megatron-core's common state: read here with weights_only=True
    metadata.json     JSON; only the torch_dist / torch backends we write are accepted (another backend
                      would send megatron-core to other readers)

A file that passes is then read by megatron-core / torch as it is: the same bytes resolve the same
(allowed) classes. This does not guard against the directory being rewritten between the check and
the load (whoever can do that can also replace the program being run).
"""

from __future__ import annotations

import collections
import io
import json
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import CheckpointError

METADATA = ".metadata"
COMMON = "common.pt"
MEGATRON_METADATA = "metadata.json"


class _Record:
    """A stand-in for one of torch DCP's index dataclasses: unpickling sets its fields as attributes
    (pickle's default BUILD) and runs nothing else. Importing torch.distributed.checkpoint only to
    name these classes cost the export ~1.8 CPU-s; readers here need their fields only."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)})"


class Metadata(_Record):
    """torch.distributed.checkpoint.metadata.Metadata: state_dict_metadata, storage_data, ..."""

    state_dict_metadata: dict = {}
    storage_data: Any = None
    planner_data: Any = None
    storage_meta: Any = None
    version: Any = None


class MetadataIndex(_Record):
    """The key of `storage_data` (fqn, offset): hashable as torch's frozen dataclass is."""

    fqn: str = ""
    offset: Any = None
    index: Any = None

    def __hash__(self) -> int:
        return hash((self.fqn, self.offset))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetadataIndex) and (self.fqn, self.offset) == (other.fqn, other.offset)


class TensorStorageMetadata(_Record):
    """A global tensor: properties (its dtype), size and chunks (offsets, sizes)."""

    properties: Any = None
    size: Any = None
    chunks: list = []


class BytesStorageMetadata(_Record):
    """A non-tensor item (megatron-core's ShardedObjects)."""


class TensorProperties(_Record):
    """torch pickles this one as a tuple (dtype, layout, requires_grad, memory format, pin_memory)."""

    def __setstate__(self, state: tuple) -> None:
        self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory = state


class StorageInfo(_Record):
    """Where a chunk's bytes are: relative_path, offset, length (filesystem._StorageInfo)."""

    relative_path: str = ""
    offset: int = 0
    length: int = 0
    transform_descriptors: Any = None


class _Enum:
    """A stand-in for a DCP enum member (pickled as the class called with its value)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"


def _record(name: str) -> type:
    return type(name, (_Record,), {"__doc__": f"stand-in for DCP's {name} (fields only)"})


def _layout(name: str) -> str:
    """torch.serialization._get_layout's stand-in: the layout's name (a string), nothing looked up."""
    return str(name)


# what torch's DCP writes into .metadata (torch 2.x): its dataclasses and enums, torch.Size, and the
# layout helper, each resolved to a stand-in above that only holds fields; dtypes are allowed by
# `_allowed`. Building any of these runs no code of the checkpoint's.
_DCP = "torch.distributed.checkpoint."
_METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    (_DCP + "metadata", "Metadata"): Metadata,
    (_DCP + "metadata", "MetadataIndex"): MetadataIndex,
    (_DCP + "metadata", "StorageMeta"): _record("StorageMeta"),
    (_DCP + "metadata", "TensorProperties"): TensorProperties,
    (_DCP + "metadata", "TensorStorageMetadata"): TensorStorageMetadata,
    (_DCP + "metadata", "ChunkStorageMetadata"): _record("ChunkStorageMetadata"),
    (_DCP + "metadata", "BytesStorageMetadata"): BytesStorageMetadata,
    (_DCP + "metadata", "_MEM_FORMAT_ENCODING"): type("_MEM_FORMAT_ENCODING", (_Enum,), {}),
    (_DCP + "planner", "SavePlan"): _record("SavePlan"),
    (_DCP + "planner", "WriteItem"): _record("WriteItem"),
    (_DCP + "planner", "WriteItemType"): type("WriteItemType", (_Enum,), {}),
    (_DCP + "planner", "TensorWriteData"): _record("TensorWriteData"),
    (_DCP + "filesystem", "_StorageInfo"): StorageInfo,
    # a file-name prefix (one str): in the ranks' save plans that megatron-core's cached save structure
    # (--async-save, training/async_save.py) keeps in the index from a run's second save on
    (_DCP + "filesystem", "_StoragePrefix"): _record("_StoragePrefix"),
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _layout,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def _allowed(module: str, name: str) -> Any:
    if (module, name) in _METADATA_GLOBALS:
        return _METADATA_GLOBALS[(module, name)]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a checkpoint index never holds")


class _MetadataUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only `_allowed` globals (no persistent ids: the default refuses them)."""

    def find_class(self, module: str, name: str) -> Any:
        return _allowed(module, name)


def read_dist_metadata(path: Path) -> Metadata:
    """The .metadata of dist-checkpoint directory `path`, read through the allow-list (into the
    stand-ins above: the fields of torch's classes, not torch's classes)."""
    file = path / METADATA
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as exc:
        raise CheckpointError(f"{file}: unreadable ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 -- any malformed pickle is the same refusal
        raise CheckpointError(f"{file}: not a checkpoint index we load ({exc}); refusing the checkpoint") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{file}: holds a {type(metadata).__name__}, not a checkpoint index")
    return metadata


def _weights_only(data: Any, what: str) -> None:
    """torch.load(weights_only=True) of `data` (a path or bytes stream); `what` names it in the error."""
    try:
        torch.load(data, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- UnpicklingError, RuntimeError of a bad zip, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{what}: holds more than tensors and plain data ({first}); refusing the "
            "checkpoint (loading it could run code)"
        ) from None


def _check_byte_items(path: Path, metadata: Metadata) -> None:
    """Every non-tensor item of the .distcp files must load with weights_only=True."""
    for index, where in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        rel = PurePosixPath(str(where.relative_path))
        if rel.is_absolute() or ".." in rel.parts or where.transform_descriptors:
            raise CheckpointError(
                f"{path / METADATA}: item {index.fqn!r} is stored at {rel} with transforms "
                f"{where.transform_descriptors}; refusing the checkpoint"
            )
        try:
            with open(path / rel, "rb") as f:
                f.seek(int(where.offset))
                data = f.read(int(where.length))
        except OSError as exc:
            raise CheckpointError(f"{path / rel}: unreadable ({exc.strerror or exc})") from None
        _weights_only(io.BytesIO(data), f"{path / rel} (item {index.fqn!r})")


def _check_backends(path: Path) -> None:
    file = path / MEGATRON_METADATA
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    backends = (meta.get("sharded_backend"), meta.get("common_backend")) if isinstance(meta, dict) else None
    if backends != ("torch_dist", "torch"):
        raise CheckpointError(
            f"{file}: backends {backends}, expected ('torch_dist', 'torch') (what pretrain_internvl.py --save writes)"
        )


def check_dist_checkpoint(path: str | Path) -> Metadata:
    """Refuse (CheckpointError naming the file) a dist-checkpoint directory whose pickled parts hold
    anything but what megatron-core / torch write there; call before dist_checkpointing.load. Returns
    the index it read (the export's reader takes it instead of unpickling it again)."""
    path = Path(path)
    _check_backends(path)
    metadata = read_dist_metadata(path)
    if (path / COMMON).exists():
        _weights_only(path / COMMON, str(path / COMMON))
    _check_byte_items(path, metadata)
    return metadata
