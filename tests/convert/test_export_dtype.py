"""The export's default dtype (tools/convert_to_hf.py without --dtype; convert/export.py:
`ExportSource.default_dtype`): the dtype the checkpoint stores its weights in, so a --bf16 run from
fp32 random weights exports bf16 (not fp32, twice the bytes); fp32 weights of a run from a narrower
HF checkpoint go back to that checkpoint's dtype. The choice is printed, and --dtype overrides it.
In process, on the debug preset's shapes: no launch."""

from __future__ import annotations

import contextlib
import io
from typing import Iterator, Mapping

import pytest
import torch

from internvl_mcore.checkpoint.safetensors_io import SafetensorsDir
from internvl_mcore.config import get_preset
from internvl_mcore.convert.export import ExportSource, write_hf_export
from internvl_mcore.convert.keymaps import canonical_shapes


class _Stored(Mapping[str, torch.Tensor]):
    """Canonical tensors with the lazy views' `shape` / `dtype` methods (answered from 'the index')."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype


def _debug_source(stored: torch.dtype, source: str) -> ExportSource:
    cfg = get_preset("debug")
    gen = torch.Generator().manual_seed(3)
    tensors = {n: torch.randn(s, generator=gen).to(stored) for n, s in canonical_shapes(cfg).items()}
    return ExportSource(_Stored(tensors), cfg, {"dtype": source})


@pytest.mark.parametrize(
    "stored, source, want",
    [
        (torch.bfloat16, "float32", torch.bfloat16),  # a --bf16 run from random (fp32) weights
        (torch.float16, "bfloat16", torch.float16),  # what the run stored wins over its start
        (torch.float32, "bfloat16", torch.bfloat16),  # a fp32 run from a bf16 model: the model's dtype
        (torch.float32, "float32", torch.float32),
    ],
)
def test_default_dtype_follows_what_the_checkpoint_stores(stored, source, want) -> None:
    dtype, why = _debug_source(stored, source).default_dtype()
    assert dtype == want, why


def test_export_writes_and_prints_the_stored_dtype_and_dtype_overrides(tmp_path) -> None:
    src = _debug_source(torch.bfloat16, "float32")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        write_hf_export(src, tmp_path / "bf16", "transformers", progress=True)
        write_hf_export(src, tmp_path / "fp32", "transformers", dtype=torch.float32, progress=True)
    lines = out.getvalue().splitlines()
    assert "writing bfloat16 tensors (the dtype the checkpoint stores its weights in)" in lines, lines
    assert "writing float32 tensors (--dtype)" in lines, lines
    bf16, fp32 = SafetensorsDir(tmp_path / "bf16"), SafetensorsDir(tmp_path / "fp32")
    assert len(bf16) > 10 and all(bf16.dtype(k) == torch.bfloat16 for k in bf16)
    assert all(fp32.dtype(k) == torch.float32 for k in fp32)
    # the bf16 export is the stored bytes; the fp32 one their exact upcast
    assert all(torch.equal(bf16[k].float(), fp32[k]) for k in bf16)
    assert (tmp_path / "bf16" / "config.json").read_text().count('"bfloat16"') >= 1
