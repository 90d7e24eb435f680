"""Freezing the parts a stage does not train. The stage presets, their resolution against the explicit
flags (`Plan`, `resolve_stage`) and its checks are plain config: config/training.py, config/problems.py."""

from __future__ import annotations

import torch

from ..config.training import Plan, resolve_stage

__all__ = ["Plan", "apply_freeze", "resolve_stage"]


def apply_freeze(model: torch.nn.Module, plan: Plan) -> None:
    """Set requires_grad per part, before DDP and the optimizer are built: frozen parameters then get
    no gradient buffer and no optimizer state, and stay bit-identical."""
    vit_layers = None
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        if part == "vision_model":
            train = plan.train_vit
            if not train and plan.unfreeze_vit_layers and ".encoder.layers." in name:
                if vit_layers is None:
                    vit_layers = len(model.vision_model.encoder.layers)
                index = int(name.split(".encoder.layers.", 1)[1].split(".", 1)[0])
                train = index >= vit_layers - plan.unfreeze_vit_layers
        elif part == "projector":
            train = plan.train_projector
        elif part == "language_model":
            train = plan.train_llm
        else:
            raise RuntimeError(f"parameter {name} belongs to no known part")  # a model this module lacks: a bug
        p.requires_grad_(train)
