"""The canonical checkpoint directory, independent of the parallel layout:

    CKPT/model_config.json   {"format_version", "model": ModelConfig, "source": {format, dtype,
                               hf_config}, "layout": {tensor/pipeline parallel sizes it was made for}}
    CKPT/model.safetensors   or model-0000k-of-0000n.safetensors + model.safetensors.index.json,
                             holding the canonical state dict (models/weights.py names, TP1/PP1)

HF -> canonical (`convert_hf_to_checkpoint`, streaming) is convert/hf.py. Any rank of any TP/PP
layout loads its shards from it with `models/weights.py: load_canonical` (reading only the slices
it holds). What needs a model built in a parallel layout (gathering, verifying a layout, exporting a
training checkpoint, canonical -> HF) is in convert/distributed.py. This module imports no
megatron-core, so the CLIs' flag parsing (convert/source.py) stays light.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from internvl_mcore.cli_errors import naming, read_json
from ..config.model import LLMConfig, ModelConfig, ParallelConfig, VisionConfig
from ..errors import ConversionError
from .safetensors_io import DEFAULT_MAX_SHARD_BYTES, PlanItem, SafetensorsDir, ShardedWriter, parse_dtype, plan_of

META_NAME = "model_config.json"
FORMAT_VERSION = 1


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """ModelConfig -> plain JSON-able dict."""
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of `model_config_to_dict`; unknown keys are refused by name."""
    d = dict(d)
    try:
        vision = VisionConfig(**d.pop("vision"))
        llm = LLMConfig(**d.pop("llm"))
        return ModelConfig(vision=vision, llm=llm, **d)
    except TypeError as e:
        raise ConversionError(f"{META_NAME}: {e}") from None


@dataclass
class CanonicalCheckpoint:
    """An opened canonical checkpoint directory (tensors are read lazily)."""

    path: Path
    config: ModelConfig
    meta: dict
    tensors: SafetensorsDir

    @staticmethod
    def open(path: str | os.PathLike) -> "CanonicalCheckpoint":
        path = Path(path)
        meta_path = path / META_NAME
        if not meta_path.exists():
            raise ConversionError(f"{meta_path}: not a canonical checkpoint (no {META_NAME})")
        meta = read_json(meta_path, ConversionError)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConversionError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        return CanonicalCheckpoint(path, model_config_from_dict(meta["model"]), meta, SafetensorsDir(path))

    @property
    def source_dtype(self) -> torch.dtype:
        """dtype of the HF checkpoint it came from (the default export dtype)."""
        return parse_dtype(self.meta.get("source", {}).get("dtype", "float32"))


def save_canonical(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    tensors: Any,
    source: Mapping[str, Any] | None = None,
    layout: ParallelConfig | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    plan: Sequence[PlanItem] | None = None,
) -> Path:
    """Write a canonical checkpoint from (name, tensor or StoredBytes) pairs (an iterator is
    streamed), each written in place in its shard (ShardedWriter: the writer holds no tensor).
    `plan`: (name, dtype, shape) of every tensor, in order; taken from `tensors` when it is a mapping."""
    out = Path(out_dir)
    if plan is None:
        if not isinstance(tensors, Mapping):
            raise TypeError("save_canonical: give the plan of an iterator of tensors")
        plan = plan_of(tensors)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with ShardedWriter(out, plan, max_shard_bytes) as writer:
        for name, t in items:
            writer.add(name, t)
        writer.close()
    layout = layout or ParallelConfig()
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model_config_to_dict(cfg),
        "source": dict(source or {}),
        "layout": {
            "tensor_model_parallel_size": layout.tensor_model_parallel_size,
            "pipeline_model_parallel_size": layout.pipeline_model_parallel_size,
        },
    }
    with naming(out / META_NAME):
        (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out
