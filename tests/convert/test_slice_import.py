"""Per-rank import through slice reads: the shard a rank reads from an HF directory (both
layouts, dense and MoE) or a canonical checkpoint equals the shard cut from the whole tensor bit for
bit, for every TP / expert-TP rank, and a TP2 rank reads about half the model's bytes.

No process group is needed: the local parameters of each rank are listed by plan/params.py (the
inventory tests/plan checks against built models), tagged as megatron-core tags them. In-world
checks of the same path: tests/convert/test_convert.py (canonical at TP2 x PP2, gathered back bit for
bit) and tests/moe/moe_worker.py (HF and canonical at EP2, TP2 x EP2, PP2 x EP2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from internvl_mcore.config import ParallelConfig
from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint
from internvl_mcore.errors import ConversionError
from internvl_mcore.checkpoint.safetensors_io import SafetensorsDir, ShardedWriter
from internvl_mcore.convert import canonical_shapes, convert_hf_to_checkpoint
from internvl_mcore.convert.hf import HFAsCanonical, model_config_from_hf, read_hf_config
from internvl_mcore.models.sharding import split_dim
from internvl_mcore.models.weights import ShardPlacement, read_shard, shard
from internvl_mcore.plan.params import stage_params

from .tiny_hf import save_transformers_dir, tiny_transformers_model, write_internvl_dir

pytest.importorskip("transformers")

# name: (HF format, text model, vision, tied, InternVL-layout LLM family); 6b vision: 25 heads (padded under TP)
SOURCES = {
    "internvl-internlm2": ("internvl", "llama", "6b", False, "internlm2"),
    "transformers-qwen2": ("transformers", "qwen2", "300m", False, None),
    "internvl-qwen3-moe": ("internvl", "qwen3_moe", "300m", False, "qwen3_moe"),
    "transformers-qwen3-moe": ("transformers", "qwen3_moe", "6b", True, None),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slices")
    out = {}
    for name, (fmt, text, vision, tie, family) in SOURCES.items():
        model = tiny_transformers_model(text, vision, tie, seed=3)
        out[name] = (
            save_transformers_dir(model, root / name)
            if fmt == "transformers"
            else write_internvl_dir(model, root / name, family, torch.bfloat16)
        )
    return out


def rank_params(cfg, tp: int, rank: int, dtype: torch.dtype) -> list[tuple[str, torch.nn.Parameter, ShardPlacement]]:
    """(canonical name, a NaN parameter tagged like megatron-core's, placement) on TP rank `rank` of
    a TP `tp` x PP1 x EP1 layout (expert-TP = TP): at PP1 / EP1 local names are canonical names."""
    shapes = canonical_shapes(cfg)
    layout = ShardPlacement(rank, tp, 0, etp_rank=rank, etp_size=tp)
    out = []
    for spec in stage_params(cfg, ParallelConfig(tensor_model_parallel_size=tp), 0):
        p = torch.nn.Parameter(torch.full(spec.shape, float("nan"), dtype=dtype), requires_grad=False)
        if spec.shape != shapes[spec.name]:  # split over TP (at TP > 1 every split tensor changes shape)
            p.tensor_model_parallel, p.partition_dim = True, split_dim(spec.name)
        out.append((spec.name, p, layout))
    return out


def _check_equal(src, full, cfg, tp: int) -> list[int]:
    """Compare every rank's slice-read shards with shards cut from `full`; the bytes each rank read."""
    read, direct = [], 0
    for rank in range(tp):
        before = src_bytes(src)
        for name, p, layout in rank_params(cfg, tp, rank, next(iter(full.values())).dtype):
            want = shard(full[name], name, p, cfg, layout)
            for into_param in (False, True):  # a new tensor, or (tensors stored as is) the parameter itself
                got = read_shard(src, name, p, cfg, layout, into_param=into_param)
                assert got.dtype == want.dtype and got.shape == p.shape == want.shape, (name, rank)
                assert torch.equal(got, want), (name, tp, rank, into_param)
                direct += into_param and got.data_ptr() == p.data_ptr()
        read.append((src_bytes(src) - before) // 2)
    assert direct > 0  # the padded embedding and the vision proj at least went straight into the parameter
    return read


def src_bytes(src) -> int:
    base = src.src if isinstance(src, HFAsCanonical) else src
    return getattr(base, "base", base).bytes_read


@pytest.mark.parametrize("name", list(SOURCES))
def test_slice_reads_equal_whole_tensor_shards(sources, tmp_path, name):
    hf = sources[name]
    cfg, fmt = model_config_from_hf(read_hf_config(hf), hf)
    full = dict(HFAsCanonical(SafetensorsDir(hf), cfg, fmt))  # the whole-tensor path: every tensor read whole
    convert_hf_to_checkpoint(hf, tmp_path / "ckpt")
    canonical = CanonicalCheckpoint.open(tmp_path / "ckpt").tensors
    assert all(torch.equal(canonical[k], v) for k, v in full.items())
    total = sum(t.numel() * t.element_size() for t in full.values())
    for src in (HFAsCanonical(SafetensorsDir(hf), cfg, fmt), canonical):
        read = _check_equal(src, full, cfg, 2)
        # each rank reads about half: its slices plus the (small) replicated tensors, never the model
        assert all(0.45 * total < r < 0.62 * total for r in read), (name, read, total)


# sha256 (first 16 hex digits) and size of the files the writers wrote for these tensors at commit 984f5f4,
# before the side-file writer and the plan-based one became one: the files must not change
_WRITER_FILES = {
    "model-00001-of-00004.safetensors": ("41b0dceb4c23ca61", 324),
    "model-00002-of-00004.safetensors": ("70d1bb1031746e8f", 204),
    "model-00003-of-00004.safetensors": ("4767773c220facc1", 164),
    "model-00004-of-00004.safetensors": ("740e195052eb293e", 244),
    "model.safetensors.index.json": ("af691082112526a4", 347),
}


def test_writer_files_unchanged_from_tensors_and_from_stored_bytes(tmp_path, monkeypatch):
    """The one writer (shards laid out from the plan, each tensor written in place) gives byte for byte
    the files of the former writers, across several shards, whether a tensor comes from memory or as
    byte ranges of another file (copied in the kernel, or through a buffer where the kernel cannot)."""
    import errno
    import hashlib

    from internvl_mcore.checkpoint.safetensors_io import StoredBytes

    dts = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    tensors = [
        (f"t{i}", (torch.arange((3 + i) * 5, dtype=torch.float32) / 7 - i).reshape(3 + i, 5).to(dt))
        for i, dt in enumerate(dts)
    ]
    tensors.insert(2, ("empty", torch.empty(0, 4)))
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors]
    with ShardedWriter(tmp_path / "a", plan, 150) as w:
        for k, t in tensors:
            w.add(k, t)
        w.close()
    got = {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest()[:16], p.stat().st_size) for p in (tmp_path / "a").iterdir()
    }
    assert got == _WRITER_FILES
    src = SafetensorsDir(tmp_path / "a")
    for out in ("b", "c"):
        with ShardedWriter(tmp_path / out, plan, 150) as w:
            for k, _ in tensors:  # in two ranges, copied one after the other
                rows = src.shape(k)[0]
                w.add(k, StoredBytes((src.stored(k, 0, rows // 2), src.stored(k, rows // 2))))
            w.close()
        assert all((tmp_path / out / f).read_bytes() == (tmp_path / "a" / f).read_bytes() for f in _WRITER_FILES)

        def no_kernel_copy(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr("os.copy_file_range", no_kernel_copy)
    with ShardedWriter(tmp_path / "d", plan, 150) as w:
        with pytest.raises(ConversionError, match="planned"):
            w.add("t0", tensors[0][1].double())
        with pytest.raises(ConversionError, match="stored bytes"):
            w.add("t0", StoredBytes((src.stored("t1"),)))
        with pytest.raises(ConversionError, match="never written"):
            w.close()
