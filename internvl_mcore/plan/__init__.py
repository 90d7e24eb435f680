"""Capacity planning: parameter counts, per-rank memory, model FLOPs and step-time estimates.

- params.py: the parameter inventory of each (stage, TP rank) derived from the config, and the
  released models' parameter counts.
- memory.py: parameter / gradient / optimizer bytes as megatron-core allocates them, activations,
  online RL's KV cache (as megatron-core's static inference context allocates it).
- flops.py: model FLOPs of a training step (`train_step_flops`, used for the training log's MFU).
- layouts.py: hardware presets, per-layout plans (memory + step time + MFU), the layout search.

Pure arithmetic on the config: importing this package needs neither torch nor megatron-core.
"""

from .flops import FlopBreakdown, forward_flops, train_step_flops
from .layouts import HARDWARE, Hardware, Layout, LayoutPlan, Rollout, Workload, plan, search
from .memory import ActivationBytes, StateBytes, activation_bytes, kv_cache_bytes, state_bytes
from .params import ParamCounts, ParamSpec, count_params, stage_params

__all__ = [
    "FlopBreakdown",
    "forward_flops",
    "train_step_flops",
    "HARDWARE",
    "Hardware",
    "Layout",
    "LayoutPlan",
    "Rollout",
    "Workload",
    "plan",
    "search",
    "ActivationBytes",
    "StateBytes",
    "activation_bytes",
    "kv_cache_bytes",
    "state_bytes",
    "ParamCounts",
    "ParamSpec",
    "count_params",
    "stage_params",
]
