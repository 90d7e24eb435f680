"""Checkpoint converters between HF layouts and our canonical (layout-independent) checkpoints.

- keymaps.py: the key maps as data (rules + named reshape functions), and canonical shapes.
- safetensors_io.py: HF directories on disk: sharded safetensors read/write, config.json and side files.
- hf_config.py: config.json <-> ModelConfig for both HF layouts.
- hf.py: streaming conversion between HF and canonical tensors through the key maps.
- canonical.py: the canonical checkpoint directory and `convert_hf_to_checkpoint` (no megatron-core).
- export.py: `convert_checkpoint_to_hf` (tools/convert_to_hf.py): a training checkpoint of any layout
  (read without a model: internvl_mcore/checkpoint/) or a canonical one -> HF, streaming.
- distributed.py: what needs a model built in a parallel layout: sharded model -> canonical, layout
  verification, training checkpoints -> canonical by loading and gathering (LoRA merge).

Dependencies run training -> convert -> models: nothing here imports the training package.
"""
import importlib

from .export import convert_checkpoint_to_hf
from .canonical import (CanonicalCheckpoint, convert_hf_to_checkpoint, model_config_from_dict, model_config_to_dict,
                        save_canonical)
from .hf import canonical_to_hf, hf_to_canonical
from .hf_config import hf_config_for, model_config_from_hf, read_hf_config
from .safetensors_io import ConversionError, SafetensorsDir, write_hf_dir
from .keymaps import FORMATS, canonical_shapes, keymap

__all__ = [
    "CanonicalCheckpoint", "ConversionError", "FORMATS", "SafetensorsDir", "canonical_shapes", "canonical_to_hf",
    "convert_checkpoint_to_hf", "convert_hf_to_checkpoint", "gather_canonical_state", "hf_config_for",
    "hf_to_canonical", "keymap", "model_config_from_dict", "model_config_from_hf", "model_config_to_dict",
    "read_hf_config", "save_canonical", "training_checkpoint_to_canonical", "unshard", "verify_layout",
    "write_hf_dir",
]

# distributed.py builds models (megatron-core); importing it here would make every `internvl_mcore.convert.*`
# import -- the CLIs' flag parsing included -- pay for megatron-core, so its names resolve on first use
_DISTRIBUTED = ("gather_canonical_state", "training_checkpoint_to_canonical", "unshard",
                "verify_layout")


def __getattr__(name: str):
    if name in _DISTRIBUTED:
        return getattr(importlib.import_module(".distributed", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
