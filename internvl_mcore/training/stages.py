"""Stage presets resolved against explicit flags, and freezing the parts a stage does not train."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..config.training import STAGES, TrainConfig

DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class Plan:
    """What this run trains and with which schedule, after stage + overrides."""

    train_vit: bool
    train_projector: bool
    train_llm: bool
    unfreeze_vit_layers: int
    lr: float
    lr_decay_style: str
    drop_path_rate: float


def resolve(train: TrainConfig, vit_layers: int) -> Plan:
    """Combine --stage with explicit flags; contradictions raise ConfigError naming the flags."""
    stage = STAGES[train.stage] if train.stage else None

    def trains(frozen_flag, stage_trains):  # an explicit --freeze-X / --no-freeze-X wins
        if frozen_flag is not None:
            return not frozen_flag
        return stage_trains if stage is not None else True

    def value(flag_value, stage_value, default):
        if flag_value is not None:
            return flag_value
        return stage_value if stage is not None else default

    train_vit = trains(train.freeze_vit, stage and stage.train_vit)
    train_projector = trains(train.freeze_projector, stage and stage.train_projector)
    train_llm = trains(train.freeze_llm, stage and stage.train_llm)
    drop_path = value(train.drop_path_rate, stage and stage.drop_path_rate, 0.0)
    plan = Plan(
        train_vit=train_vit, train_projector=train_projector, train_llm=train_llm,
        unfreeze_vit_layers=train.unfreeze_vit_layers,
        lr=value(train.lr, stage and stage.lr, DEFAULT_LR),
        lr_decay_style=value(train.lr_decay_style, stage and stage.lr_decay_style, "cosine"),
        drop_path_rate=drop_path)
    if train.unfreeze_vit_layers < 0 or train.unfreeze_vit_layers > vit_layers:
        raise ConfigError(f"--unfreeze-vit-layers {train.unfreeze_vit_layers} must be in [0, {vit_layers}]")
    if train.unfreeze_vit_layers and train_vit:
        raise ConfigError("--unfreeze-vit-layers only makes sense with a frozen ViT "
                          "(--freeze-vit or a stage that freezes it)")
    if not (train_vit or train_projector or train_llm or train.unfreeze_vit_layers):
        raise ConfigError("nothing to train: --freeze-vit, --freeze-projector and --freeze-llm (or the "
                          "stage) freeze every part")
    if drop_path > 0 and not (train_vit or train.unfreeze_vit_layers):
        raise ConfigError(f"--drop-path-rate {drop_path} (or the stage's) is for training the ViT, but the "
                          "ViT is frozen; drop it or unfreeze the ViT")
    return plan


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
