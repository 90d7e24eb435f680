"""Checkpoint converters between HF layouts and our canonical (layout-independent) checkpoints.

- keymaps.py: the key maps as data (rules + named reshape functions), and canonical shapes.
- hf_config.py: config.json <-> ModelConfig for both HF layouts.
- hf.py: streaming conversion between HF and canonical tensors through the key maps, and
  `convert_hf_to_checkpoint` (no megatron-core).
- export.py: `convert_checkpoint_to_hf` (tools/convert_to_hf.py): a training checkpoint of any layout
  (read without a model: internvl_mcore/checkpoint/dist_reader.py) or a canonical one -> HF, and
  `training_checkpoint_to_canonical`, streaming.
- distributed.py: what needs a model built in a parallel layout: sharded model -> canonical, layout
  verification (tests compare a layout's load + gather with the source bit for bit).

The checkpoint files themselves (safetensors directories, the canonical directory, the training
checkpoint's format) are in internvl_mcore/checkpoint/.
Dependencies run training -> convert -> checkpoint -> models: nothing here imports the training package.
"""
import importlib

from .export import convert_checkpoint_to_hf, training_checkpoint_to_canonical
from .hf import canonical_to_hf, convert_hf_to_checkpoint, hf_to_canonical
from .hf_config import hf_config_for, model_config_from_hf, read_hf_config
from .keymaps import FORMATS, canonical_shapes, keymap

__all__ = [
    "FORMATS", "canonical_shapes", "canonical_to_hf", "convert_checkpoint_to_hf", "convert_hf_to_checkpoint",
    "gather_canonical_state", "hf_config_for", "hf_to_canonical", "keymap", "model_config_from_hf", "read_hf_config",
    "training_checkpoint_to_canonical", "unshard", "verify_layout",
]

# distributed.py builds models (megatron-core); importing it here would make every `internvl_mcore.convert.*`
# import -- the CLIs' flag parsing included -- pay for megatron-core, so its names resolve on first use
_DISTRIBUTED = ("gather_canonical_state", "unshard", "verify_layout")


def __getattr__(name: str):
    if name in _DISTRIBUTED:
        return getattr(importlib.import_module(".distributed", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
