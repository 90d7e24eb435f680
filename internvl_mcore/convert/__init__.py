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

from .hf import canonical_to_hf, convert_hf_to_checkpoint, hf_to_canonical
from .hf_config import hf_config_for, model_config_from_hf, read_hf_config
from .keymaps import FORMATS, canonical_shapes, keymap

__all__ = [
    "FORMATS",
    "canonical_shapes",
    "canonical_to_hf",
    "convert_checkpoint_to_hf",
    "convert_hf_to_checkpoint",
    "gather_canonical_state",
    "hf_config_for",
    "hf_to_canonical",
    "keymap",
    "model_config_from_hf",
    "read_hf_config",
    "training_checkpoint_to_canonical",
    "unshard",
    "verify_layout",
]

# Their names resolve on first use, so that importing `internvl_mcore.convert.*` does not pay for
# them: distributed.py builds models (megatron-core), export.py reads torch_dist checkpoints
# (torch.distributed.checkpoint, seconds to import: most of what tools/convert_from_hf.py would spend
# before its first byte)
_LAZY = {
    "gather_canonical_state": ".distributed",
    "unshard": ".distributed",
    "verify_layout": ".distributed",
    "convert_checkpoint_to_hf": ".export",
    "training_checkpoint_to_canonical": ".export",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
