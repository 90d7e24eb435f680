"""InternVL's pixel shuffle and `mlp1`: LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from torch import nn


class Projector(MegatronModule):
    """Vision features after pixel shuffle (T, N', 4C) -> LLM embeddings (T, N', H).

    The LayerNorm is replicated; the MLP is megatron-core's (column- then row-parallel), so its
    output is whole on every TP rank."""

    def __init__(
        self,
        config: Any,
        submodules: MLPSubmodules,
        input_size: int,
        eps: float = 1e-5,
        *,
        pg_collection: ProcessGroupCollection,
    ) -> None:
        super().__init__(config=config)
        self.tp_group = pg_collection.tp  # read by megatron-core's sharded_state_dict (else: its global group)
        self.layer_norm = nn.LayerNorm(input_size, eps=eps, dtype=config.params_dtype)
        self.mlp = MLP(config=config, submodules=submodules, input_size=input_size, tp_group=pg_collection.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, bias = self.mlp(self.layer_norm(x))
        return out + bias if bias is not None else out


def pixel_shuffle_v2(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL's pixel shuffle (ps_version v2): (T, W, H, C) -> (T, W*r, H*r, C/r^2)."""
    t, w, h, c = x.shape
    x = x.reshape(t, w, int(h * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(t, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3).contiguous()
