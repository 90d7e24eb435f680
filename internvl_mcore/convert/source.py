"""What `--model` and `--pretrained` may name, and the model config each one carries.

    preset name            a built-in shape (config/presets.py)
    HF checkpoint dir      config.json of either layout (transformers' InternVLForConditionalGeneration
                           or InternVL's own InternVLChatModel): the config is inferred exactly as
                           tools/convert_from_hf.py infers it (convert/hf.py: model_config_from_hf)
    canonical checkpoint   tools/convert_from_hf.py output (model_config.json)
    training checkpoint    a --save directory (its root or one iter_NNNNNNN/): run.json

So `pretrain_internvl.py --model DIR --pretrained DIR` fine-tunes any supported checkpoint without
naming its shape anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from internvl_mcore.cli_errors import read_json
from ..config.model import ModelConfig
from ..config.presets import PRESETS
from ..checkpoint.canonical import META_NAME, model_config_from_dict
from ..checkpoint.format import RUN_INFO, iter_dir
from ..checkpoint.format import TRACKER as TRAINING_TRACKER
from ..checkpoint.safetensors_io import CONFIG_NAME
from ..errors import ConversionError
from .hf_config import model_config_from_hf, read_hf_config


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    """'training' | 'canonical' | 'hf' for a directory holding that kind of checkpoint, else None."""
    p = Path(path)
    if (p / TRAINING_TRACKER).exists() or (p / RUN_INFO).exists():
        return "training"
    if (p / META_NAME).exists():
        return "canonical"
    if (p / CONFIG_NAME).exists():
        return "hf"
    return None


def _training_run_info(path: Path) -> tuple[dict, Path]:
    if (path / TRAINING_TRACKER).exists():
        text = (path / TRAINING_TRACKER).read_text().strip()
        if not text.isdigit():
            raise ConversionError(f"{path / TRAINING_TRACKER}: expected an iteration number, found {text!r}")
        path = iter_dir(path, int(text))
    info_path = path / RUN_INFO
    if not info_path.exists():
        raise ConversionError(f"{info_path}: missing (the latest checkpoint of {path.parent} is incomplete)")
    return read_json(info_path, ConversionError), info_path


def model_config_from_path(path: str | os.PathLike) -> ModelConfig:
    """The model config a checkpoint directory of any kind carries; errors name the file."""
    p = Path(path)
    kind = checkpoint_kind(p)
    if kind == "training":
        info, where = _training_run_info(p)
        if "model" not in info:
            raise ConversionError(f"{where}: no 'model' entry")
        return model_config_from_dict(info["model"])
    if kind == "canonical":
        return model_config_from_dict(read_json(p / META_NAME, ConversionError)["model"])
    if kind == "hf":
        return model_config_from_hf(read_hf_config(p), p)[0]
    raise ConversionError(
        f"{p}: not a checkpoint directory (no {CONFIG_NAME}, {META_NAME}, {RUN_INFO} or {TRAINING_TRACKER})"
    )


def resolve_model(spec: str) -> ModelConfig:
    """`--model`: a preset name, else a checkpoint directory of any kind (module docstring)."""
    if spec in PRESETS:
        return PRESETS[spec]
    if os.path.isdir(spec):
        return model_config_from_path(spec)
    raise ConversionError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
