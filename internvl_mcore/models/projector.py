"""InternVL's `mlp1`: LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H), after pixel shuffle."""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from torch import nn


class Projector(MegatronModule):
    """Vision features after pixel shuffle (T, N', 4C) -> LLM embeddings (T, N', H).

    The LayerNorm is replicated; the MLP is megatron-core's (column- then row-parallel), so its
    output is whole on every TP rank."""

    def __init__(self, config: Any, submodules: MLPSubmodules, input_size: int, eps: float = 1e-5,
                 pg_collection: Optional[ProcessGroupCollection] = None) -> None:
        super().__init__(config=config)
        self.layer_norm = nn.LayerNorm(input_size, eps=eps, dtype=config.params_dtype)
        tp_group = pg_collection.tp if pg_collection is not None else None
        self.mlp = MLP(config=config, submodules=submodules, input_size=input_size, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, bias = self.mlp(self.layer_norm(x))
        return out + bias if bias is not None else out
