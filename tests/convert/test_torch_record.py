"""checkpoint/torch_record.py locates a `torch.save` record's tensor from its zip directory and pickle
(no torch.load), refuses (None: the reader falls back to torch.load weights-only) whatever is not a
plain one-tensor record, runs nothing of the record's; checkpoint/trust.py reads a DCP index into
stand-ins without importing torch.distributed.checkpoint."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from internvl_mcore.checkpoint.torch_record import locate_tensor
from tests.launch import REPO


def _record(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _locate(tmp_path: Path, rec: bytes, pad: int = 37):
    """locate_tensor of `rec` placed at byte `pad` of a file (as a chunk in a .distcp file), and the fd."""
    path = tmp_path / "f.distcp"
    path.write_bytes(b"x" * pad + rec + b"y" * 11)
    fd = os.open(path, os.O_RDONLY)
    return locate_tensor(fd, pad, len(rec)), fd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_locates_the_tensor_bytes(tmp_path, dtype) -> None:
    base = (torch.randn(6, 5) * 100).to(dtype)
    for t in (base, base[2:4], base[:, 1]):  # whole, a view with a storage offset, non-contiguous
        found, fd = _locate(tmp_path, _record(t))
        try:
            assert found is not None and found.dtype == dtype and found.shape == tuple(t.shape)
            assert found.stride == tuple(t.stride())
            n = (t.storage_offset() + 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()
            raw = os.pread(fd, n - t.storage_offset() * t.element_size(), found.data_offset)
            got = torch.frombuffer(bytearray(raw), dtype=dtype).as_strided(tuple(t.shape), tuple(t.stride()))
            assert torch.equal(got, t)
            assert found.storage_end - found.data_offset == (base.numel() - t.storage_offset()) * t.element_size()
        finally:
            os.close(fd)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_anything_else_is_left_to_torch_load(tmp_path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    compressed = io.BytesIO()
    with (
        zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as z,
        zipfile.ZipFile(io.BytesIO(_record(torch.ones(3)))) as r,
    ):
        for name in r.namelist():
            z.writestr(name, r.read(name))
    others = {
        "payload": _record(_Payload(marker)),
        "two tensors": _record({"a": torch.ones(2), "b": torch.zeros(2)}),
        "not a zip": pickle.dumps([1, 2, 3]),
        "compressed": compressed.getvalue(),
        "cut short": _record(torch.ones(4))[:-30],
    }
    for what, rec in others.items():
        found, fd = _locate(tmp_path, rec)
        os.close(fd)
        assert found is None, what
    assert not marker.exists()


def test_index_is_read_without_torch_distributed_checkpoint(tmp_path) -> None:
    """The export's modules and the index reader do not import torch.distributed.checkpoint (~1.8
    CPU-s of the export's start-up); the stand-ins carry what the readers use."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    chunk = ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3]))
    tensor = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size([2, 3]), [chunk])
    index = MetadataIndex("w", [0, 0])
    metadata = Metadata({"w": tensor, "obj": BytesStorageMetadata()}, storage_data={index: _StorageInfo("a", 5, 7)})
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    probe = (
        "import sys; from pathlib import Path\n"
        "import internvl_mcore.convert.export, internvl_mcore.convert.lora_export\n"
        "from internvl_mcore.checkpoint.trust import read_dist_metadata, TensorStorageMetadata, BytesStorageMetadata\n"
        f"m = read_dist_metadata(Path({str(tmp_path)!r}))\n"
        "w = m.state_dict_metadata['w']; (i, s), = m.storage_data.items()\n"
        "assert isinstance(w, TensorStorageMetadata) and isinstance(m.state_dict_metadata['obj'], BytesStorageMetadata)\n"
        "assert str(w.properties.dtype) == 'torch.bfloat16' and tuple(w.size) == (2, 3)\n"
        "assert [(tuple(c.offsets), tuple(c.sizes)) for c in w.chunks] == [((0, 0), (2, 3))]\n"
        "assert (i.fqn, tuple(i.offset), s.relative_path, s.offset, s.length) == ('w', (0, 0), 'a', 5, 7)\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_scattered_reads_fill_the_columns_of_each_row(tmp_path, monkeypatch) -> None:
    """A row-parallel piece (a chunk of whole rows in the file) read into its columns of a box, one
    scattered read; short reads (as the kernel may return) go on where they stopped."""
    from internvl_mcore.checkpoint import dist_reader

    piece = torch.arange(6 * 5, dtype=torch.float32).reshape(6, 5)
    path = tmp_path / "f.distcp"
    path.write_bytes(b"z" * 13 + piece.numpy().tobytes())
    real = os.preadv

    def short_preadv(fd, views, offset):  # at most 7 bytes per call: every view is cut somewhere
        return real(fd, [memoryview(views[0])[:7]], offset)

    monkeypatch.setattr(dist_reader.os, "preadv", short_preadv)
    for box in (torch.zeros(6, 9), torch.zeros(2, 6, 9)[1]):  # the box alone, a layer of a stacked one
        dst = box[:, 2:7]
        views = dist_reader._row_views(dst)
        assert views is not None and len(views) == 6
        dist_reader._preadv_all(path, views, 13)
        assert torch.equal(dst, piece) and box[:, :2].abs().sum() == 0 and box[:, 7:].abs().sum() == 0
    assert dist_reader._row_views(torch.zeros(4, 6)[:, ::2]) is None  # columns not contiguous: read through a buffer
    monkeypatch.setattr(dist_reader.os, "preadv", real)
    with pytest.raises(dist_reader.CheckpointError, match="truncated"):
        dist_reader._preadv_all(path, [memoryview(bytearray(200))], 13)
