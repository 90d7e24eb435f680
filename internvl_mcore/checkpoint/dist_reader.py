"""Read tensors of a megatron-core torch_dist checkpoint directly from its files: no model, no
process group, and only the chunks a request touches.

The directory's `.metadata` (read through checkpoint_trust's allow-listed unpickler) lists, for
every global tensor, its shape, dtype and chunks (offsets + sizes in the global tensor); each chunk
is one `torch.save`d tensor at a byte range of a `__*.distcp` file, loaded with weights_only=True.

(Minimal stand-in written on issue-24-lora until issue-24-export's reader lands; same API.)
"""
from __future__ import annotations

import io
from pathlib import Path, PurePosixPath

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from ..checkpoint_format import CheckpointError
from ..checkpoint_trust import read_dist_metadata


class DistCheckpointReader:
    """The tensors of one iter_ directory (torch_dist), read chunk by chunk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._meta = read_dist_metadata(self.path)
        self._tensors = {k: v for k, v in self._meta.state_dict_metadata.items()
                         if isinstance(v, dcp_metadata.TensorStorageMetadata)}

    def keys(self) -> list[str]:
        """Every tensor key (megatron-core's sharded keys: layers stacked along a leading dim)."""
        return sorted(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of tensor `key`."""
        return tuple(self._tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        """dtype of tensor `key`."""
        return self._tensors[key].properties.dtype

    def _chunk(self, key: str, chunk: dcp_metadata.ChunkStorageMetadata) -> torch.Tensor:
        where = self._meta.storage_data[dcp_metadata.MetadataIndex(key, chunk.offsets)]
        rel = PurePosixPath(str(where.relative_path))
        if rel.is_absolute() or ".." in rel.parts or where.transform_descriptors:
            raise CheckpointError(f"{self.path}/.metadata: {key!r} is stored at {rel}; refusing the checkpoint")
        with open(self.path / rel, "rb") as f:
            f.seek(int(where.offset))
            data = f.read(int(where.length))
        t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(chunk.sizes):
            raise CheckpointError(f"{self.path / rel}: chunk of {key!r} at {tuple(chunk.offsets)} is not a "
                                  f"tensor of shape {tuple(chunk.sizes)}")
        return t

    def read(self, key: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        """Global tensor `key`, or its sub-tensor at leading indices `index` (e.g. (layer,)),
        assembled from the chunks that intersect it."""
        if key not in self._tensors:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        md = self._tensors[key]
        shape = tuple(md.size)
        out = torch.empty(shape[len(index):], dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            lo, sz = tuple(chunk.offsets), tuple(chunk.sizes)
            if any(not (o <= i < o + s) for i, o, s in zip(index, lo, sz)):
                continue
            t = self._chunk(key, chunk)[tuple(i - o for i, o in zip(index, lo))]
            dst = tuple(slice(o, o + s) for o, s in zip(lo[len(index):], sz[len(index):]))
            out[dst] = t
            covered += t.numel()
        if covered != out.numel():
            raise CheckpointError(f"{self.path}: the chunks of {key!r}{list(index) or ''} cover {covered} of "
                                  f"{out.numel()} elements")
        return out
