"""Which device a run uses (--device), and what follows from it: backend, fusions, init placement.

Semantics of `--device`:

- "auto" (default): CUDA when `torch.cuda.is_available()`. Without CUDA the run uses the CPU
  (gloo, fp32 kernels) *only if nothing says a GPU was meant to be there*; if the machine shows
  signs of one (NVIDIA device files, NVIDIA_VISIBLE_DEVICES set as NVIDIA's container images do,
  transformer-engine installed) it refuses to start, because silently training on CPU/gloo on a GPU
  node (a container started without `--gpus`, a broken driver) wastes the allocation.
- "cuda": CUDA or a refusal.
- "cpu": the CPU path, even where CUDA is available (gloo, local layer specs' CPU code paths).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

import torch
from ..errors import ConfigError

DEVICES = ("auto", "cuda", "cpu")


def gpu_expected() -> Optional[str]:
    """Why this machine looks like it should have a GPU, or None."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return "NVIDIA device files /dev/nvidia* exist"
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "")
    if visible and visible not in ("void", "none"):
        return f"NVIDIA_VISIBLE_DEVICES={visible} (NVIDIA's container images set it)"
    if importlib.util.find_spec("transformer_engine") is not None:
        return "transformer-engine is installed"
    return None


def resolve_device(requested: str = "auto") -> str:
    """'cuda' or 'cpu' for a --device value; refuses (ConfigError naming the flag) as described above."""
    if requested not in DEVICES:
        raise ConfigError(f"--device {requested!r}: choose one of {DEVICES}")
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise ConfigError(
            "--device cuda: torch.cuda.is_available() is False (no GPU visible to this "
            "process: driver, CUDA_VISIBLE_DEVICES, or a container started without --gpus)"
        )
    why = gpu_expected()
    if why is not None:
        raise ConfigError(
            f"--device auto: no CUDA device is visible, but a GPU is expected here ({why}). "
            "Refusing to train silently on the CPU with gloo; fix the GPU setup (e.g. "
            "`docker run --gpus all`), or pass --device cpu to use the CPU deliberately"
        )
    return "cpu"


def have_apex_wgrad_fusion() -> bool:
    """apex's fused weight-gradient accumulation kernel (megatron-core's local linears need it for
    gradient_accumulation_fusion)."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def have_fusion_kernels() -> bool:
    """transformer-engine (its pytorch module) or apex importable: the CUDA fusion kernels exist."""
    for name in ("transformer_engine.pytorch", "apex"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # parent package missing
            continue
    return False
