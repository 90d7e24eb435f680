"""Export to HF by streaming (tools/convert_to_hf.py): a training checkpoint (megatron-core torch_dist,
any TP/PP/EP layout) or a canonical checkpoint -> an HF directory in either format.

No model is built and no process group started: the canonical tensors come one at a time from the
checkpoint files (training: checkpoint/dist_canonical.py over checkpoint/dist_reader.py, which reads
each tensor's chunks from their byte ranges and removes the saving layout's padding; canonical: the
safetensors files), go through the key maps (convert/hf.py `canonical_to_hf`) and are written
straight into their places in the safetensors shards, which `write_hf_dir`'s ShardedWriter lays out
first from the shapes and dtypes the checkpoint's index gives (`hf_plan`): the writer holds no tensor
and writes each byte once; tensors whose rows are byte ranges of a training checkpoint's files are
copied file to file in the kernel (`canonical_to_hf`'s `StoredBytes`). The dtype written is
`ExportSource.default_dtype` unless the caller gives one. Peak memory is a few times the largest tensor, whatever the model's size;
nothing is written but the export.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint.dist_canonical import DistCanonicalView
from ..checkpoint.dist_reader import DistCheckpointReader
from ..checkpoint.canonical import CanonicalCheckpoint, model_config_from_dict, save_canonical
from ..checkpoint.format import TRACKER, is_training_checkpoint, resolve_iteration_dir
from ..errors import CheckpointError
from ..checkpoint.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    copy_side_files,
    dtype_name,
    parse_dtype,
    write_hf_dir,
)
from ..checkpoint.trust import check_dist_checkpoint
from ..config.model import ModelConfig
from .hf import canonical_to_hf, hf_plan
from .hf_config import MODEL_TYPE_OF_FORMAT, hf_config_for, read_hf_config


@dataclass
class ExportSource:
    """The canonical tensors of a checkpoint (read lazily), its model config and the record of the HF
    checkpoint it came from ({"format", "dtype", "hf_config"}, as far as known)."""

    tensors: Mapping[str, torch.Tensor]
    config: ModelConfig
    source: dict = field(default_factory=dict)

    @property
    def source_dtype(self) -> torch.dtype:
        """dtype of the HF checkpoint it came from."""
        return parse_dtype(self.source.get("dtype", "float32"))

    def default_dtype(self) -> tuple[torch.dtype, str]:
        """The export's dtype when --dtype is not given, and why: the dtype the checkpoint stores its
        weights in (a --bf16 run stores bf16: exporting fp32 would double the bytes and add nothing),
        except that fp32 weights of a run from a narrower HF checkpoint go back to that checkpoint's
        dtype, as they were (a fp32 run from a bf16 model exports bf16, the model's own dtype)."""
        stored = stored_dtype(self.tensors)
        if stored is None or (stored == torch.float32 and self.source_dtype.itemsize < 4):
            return (
                self.source_dtype,
                f"the dtype of the HF checkpoint it started from; it stores {dtype_name(stored or self.source_dtype)}",
            )
        return stored, "the dtype the checkpoint stores its weights in"


def stored_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype most floating-point tensors of `tensors` are stored in, from its `dtype` method (a
    lazy view: read from the checkpoint's index, no tensor read); None when it has none."""
    dtype_of = getattr(tensors, "dtype", None)
    if not callable(dtype_of):
        return None
    counts: dict[torch.dtype, int] = {}
    for name in tensors:
        dt = dtype_of(name)
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else None


def open_training_checkpoint(path: str | os.PathLike) -> tuple[ExportSource, dict]:
    """A training checkpoint (root with the `latest` pointer, or one iter_ dir) as canonical tensors,
    and its run.json. The directory's pickled parts are checked first (checkpoint/trust.py)."""
    iteration_dir, info = resolve_iteration_dir(Path(path))
    metadata = check_dist_checkpoint(iteration_dir)  # its index, read once: the reader takes it
    cfg = model_config_from_dict(info["model"])
    view = DistCanonicalView(DistCheckpointReader(iteration_dir, metadata), cfg)
    return ExportSource(view, cfg, dict(info.get("source") or {"dtype": "float32"})), info


def open_export_source(path: str | os.PathLike) -> ExportSource:
    """A training checkpoint (not a LoRA run's: convert/lora_export.py) or a canonical checkpoint."""
    if not is_training_checkpoint(path):
        ckpt = CanonicalCheckpoint.open(path)
        return ExportSource(ckpt.tensors, ckpt.config, dict(ckpt.meta.get("source", {})))
    src, info = open_training_checkpoint(path)
    if info.get("lora") is not None:
        raise CheckpointError(
            f"{path} is a LoRA run's checkpoint: export it with --merge-lora or --lora-only (tools/convert_to_hf.py)"
        )
    return src


def write_hf_export(
    src: ExportSource,
    save: str | os.PathLike,
    fmt: str,
    template_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> list[Path]:
    """Stream `src`'s tensors into an HF directory of format `fmt`; returns the shard files.

    config.json starts from the template dir's config.json, else the source's config.json (kept in the
    checkpoint) when the formats agree, so keys we do not model survive; side files (remote code,
    tokenizer) are copied from `template_dir`."""
    if dtype is None:
        out_dtype, why = src.default_dtype()
    else:
        out_dtype, why = dtype, "--dtype"
    if progress:
        print(f"writing {dtype_name(out_dtype)} tensors ({why})", flush=True)
    template = None
    if template_dir is not None:
        template = read_hf_config(template_dir)
    elif src.source.get("format") == fmt:
        template = src.source.get("hf_config")
    if template is not None and template.get("model_type") != MODEL_TYPE_OF_FORMAT.get(fmt):
        template = None  # a template of the other format only supplies side files
    config = hf_config_for(src.config, fmt, out_dtype, template)
    out = Path(save)
    files = write_hf_dir(
        out,
        canonical_to_hf(src.tensors, src.config, fmt, out_dtype, progress),
        config,
        hf_plan(src.tensors, src.config, fmt, out_dtype),
        max_shard_bytes,
    )
    if template_dir is not None:
        copy_side_files(template_dir, out)
    elif fmt == "internvl":
        warnings.warn(
            f"{out}: no --hf-template-dir given: the export has no remote-code .py files or "
            f"tokenizer, which InternVL's tooling needs; copy them from the original checkpoint"
        )
    return files


def convert_checkpoint_to_hf(
    load: str | os.PathLike,
    save: str | os.PathLike,
    fmt: str,
    template_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> list[Path]:
    """Write an HF checkpoint in format `fmt` ("internvl" | "transformers") from a canonical checkpoint
    or a training checkpoint of any layout, streaming (`write_hf_export`)."""
    return write_hf_export(open_export_source(load), save, fmt, template_dir, dtype, max_shard_bytes, progress)


def training_checkpoint_to_canonical(
    path: str | os.PathLike, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> ModelConfig:
    """A training checkpoint of any layout (not a LoRA run's) -> a canonical checkpoint, streaming:
    the same view of the files as the HF export, each tensor written as it is read."""
    if not is_training_checkpoint(path):
        raise CheckpointError(f"{path}: not a training checkpoint (no run.json or {TRACKER})")
    src = open_export_source(path)
    save_canonical(out_dir, src.config, src.tensors, src.source, max_shard_bytes=max_shard_bytes)
    return src.config
