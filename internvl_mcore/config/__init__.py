"""Typed configuration: the model tree (model.py), presets as data (presets.py), and the conversion
to megatron-core TransformerConfigs (megatron.py, imported lazily since it needs megatron-core)."""

from .model import LLMConfig, ModelConfig, ParallelConfig, VisionConfig
from .presets import PRESETS, get_preset

__all__ = ["LLMConfig", "ModelConfig", "ParallelConfig", "VisionConfig", "PRESETS", "get_preset"]
