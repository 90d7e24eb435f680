"""The model weights of a training checkpoint (megatron-core dist_checkpointing; directory format:
checkpoint/format.py), read into a model of any layout and either layer-spec backend.
Used by `--pretrained` (training/checkpoint.py) and the HF export (convert/distributed.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from ..config.model import ModelConfig
from ..models.lora import LoRAInfo, add_lora, lora_info_of, merge_lora_
from ..errors import CheckpointError
from .format import check_model, resolve_iteration_dir
from .trust import check_dist_checkpoint

EXTRA_STATE = "_extra_state"


def load_across_backends(state: dict, path: Path, module: torch.nn.Module) -> dict:
    """dist_checkpointing.load of `state` ({"model": ..., maybe "optimizer": ...}) from `path`, then
    the model's tensors into `module`; returns what was loaded.

    Checkpoints move between the layer-spec backends (models/specs.py) both ways: parameter names
    are the same, but transformer-engine modules add `<module>._extra_state` entries (FP8 metadata,
    empty in bf16 runs) that the local backend neither writes nor reads. A TE checkpoint loaded by
    the local model: those entries are simply not asked for. A local checkpoint loaded by the TE
    model: the entries it asks for are absent; they -- and only they -- may be, and the module keeps
    its own (fresh) extra state. Any other absent tensor is an error naming the keys. The pickled
    parts of the directory are checked first (checkpoint/trust.py): a checkpoint may come from anyone."""
    check_dist_checkpoint(path)
    loaded, _, absent = dist_checkpointing.load(state, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    other = sorted(k for k in absent if EXTRA_STATE not in k)
    if other:
        raise CheckpointError(
            f"{path} lacks {len(other)} tensor(s) this model needs: {other[:5]}{' ...' if len(other) > 5 else ''}"
        )
    model_sd = loaded["model"]
    for key, value in module.state_dict().items():
        if key.endswith(EXTRA_STATE) and key not in model_sd:
            model_sd[key] = value
    module.load_state_dict(model_sd, strict=True)
    return loaded


def load_training_weights(path: str | Path, module: torch.nn.Module, model_cfg: ModelConfig) -> str:
    """The model weights of a training checkpoint (root or iter_ dir, saved in any layout) into
    `module` (an unwrapped model chunk). A LoRA run's checkpoint loaded into a model without adapters:
    its adapters are added, loaded, then folded into the weights (models/lora.py)."""
    path, info = resolve_iteration_dir(path)
    check_model(info, model_cfg, path)
    merge = info.get("lora") is not None and lora_info_of(module) is None
    if merge:
        add_lora(module, LoRAInfo.from_dict(info["lora"]).config, model_cfg, seed=0)
    load_across_backends({"model": module.sharded_state_dict()}, path, module)
    if merge:
        merge_lora_(module)
        return "training checkpoint (LoRA adapters merged into the weights)"
    return "training checkpoint"
