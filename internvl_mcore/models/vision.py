"""InternViT on megatron-core: patch embedding, class token, learned positions, and a
`TransformerBlock` of `InternViTLayer`s (pre-norm, layer scale ls1/ls2, drop path).

Tensor parallelism is over attention heads and the MLP, as in any megatron-core layer. InternViT-6B
has 25 heads, which TP 2/4/8 does not divide: the config pads the head count up to a multiple of TP
(`config/model.py: padded_vision_heads`). The padded heads' q/k/v rows, proj columns and QK-norm
weights are zero (models/weights.py writes them so), so they output exactly zero; their gradients
are then zero too (proj columns are zero, so nothing flows back into them, and their q/k/v are zero,
so nothing flows forward), and Adam with weight decay keeps a zero parameter with zero gradient at
zero. The padded model therefore computes and trains exactly like the unpadded one; checkpoints
and HF conversion drop the padding (models/weights.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn

from ..config.model import VisionConfig


class FullWidthQKNorm(nn.Module):
    """InternViT-6B's QK-norm: one RMSNorm over the whole query (or key) vector, all heads at once.

    megatron-core applies `q_layernorm` per head on (S, B, heads_local, head_dim); here the mean of
    squares runs over every real head, so under TP the local sums are all-reduced (autograd-aware:
    the backward all-reduces too, since each rank's heads use the shared statistic differently)
    and divided by the real width (padded zero heads add nothing to the sum)."""

    def __init__(
        self,
        hidden_size: int,
        config: Any,
        eps: float = 1e-6,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        if config.tensor_model_parallel_size > 1 and tp_group is None:
            raise ValueError("FullWidthQKNorm under tensor parallelism needs its tp_group (models/specs.py)")
        self.tp_size = config.tensor_model_parallel_size
        self.heads_local = config.num_attention_heads // self.tp_size
        self.real_width = config.real_attention_heads * hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.heads_local * hidden_size, dtype=config.params_dtype))
        # sharded along dim 0 exactly like the heads of linear_qkv's output
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1
        self.tp_group = tp_group

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        """Checkpoint the weight as split over TP along dim 0 (megatron-core would call it replicated)."""
        state = self.state_dict(prefix="", keep_vars=True)
        dp_cp_group = ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"]
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0}, sharded_offsets, tp_group=self.tp_group, dp_cp_group=dp_cp_group
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (S, B, heads_local, head_dim)
        xf = x.float()
        sumsq = xf.pow(2).sum(dim=(-2, -1), keepdim=True)  # (S, B, 1, 1)
        if self.tp_size > 1:
            sumsq = dist_fn.all_reduce(sumsq, group=self.tp_group)
        normed = xf * torch.rsqrt(sumsq / self.real_width + self.eps)
        return self.weight.view(self.heads_local, -1) * normed.to(x.dtype)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on an (S, B, C) branch: drop whole samples (tiles) with probability p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((1, x.shape[1], 1)).bernoulli_(keep)
    return x * mask / keep


class InternViTLayer(TransformerLayer):
    """x + dp(ls1 * attn(norm1(x))), then + dp(ls2 * mlp(norm2(x))).

    megatron-core's TransformerLayer adds branches with bias-dropout-add; InternViT scales each
    branch by a learned vector and drops whole samples, so forward is written out here while every
    submodule (norms, parallel attention, parallel MLP) is megatron-core's, built from the spec."""

    def __init__(
        self, config: Any, submodules: TransformerLayerSubmodules, layer_number: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        h = config.hidden_size
        self.ls1 = nn.Parameter(torch.full((h,), config.layer_scale_init, dtype=config.params_dtype))
        self.ls2 = nn.Parameter(torch.full((h,), config.layer_scale_init, dtype=config.params_dtype))
        n = config.num_layers
        self.drop_path_rate = config.drop_path_rate * (layer_number - 1) / max(n - 1, 1)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:  # (S, B, C)
        attn, attn_bias = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask)
        if attn_bias is not None:
            attn = attn + attn_bias
        hidden_states = hidden_states + drop_path(self.ls1 * attn, self.drop_path_rate, self.training)
        mlp, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if mlp_bias is not None:
            mlp = mlp + mlp_bias
        hidden_states = hidden_states + drop_path(self.ls2 * mlp, self.drop_path_rate, self.training)
        return hidden_states, None


class InternViTEmbeddings(nn.Module):
    """Patch conv + class token + learned position embedding (bicubic-interpolated off-size)."""

    def __init__(self, vision: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        c = vision.hidden_size
        self.patch_size = vision.patch_size
        self.grid = vision.image_size // vision.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c, dtype=dtype))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=self.patch_size, stride=self.patch_size, dtype=dtype)
        self.position_embedding = nn.Parameter(torch.zeros(1, vision.num_patches + 1, c, dtype=dtype))

    def _patch_positions(self, h: int, w: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]  # (1, G*G, C)
        if (h, w) == (self.grid, self.grid):
            return pos
        c = pos.shape[-1]
        grid = pos.reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.to(pos.dtype).reshape(1, c, h * w).permute(0, 2, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (T, 3, H, W) normalized float
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (T, C, h, w)
        t, c, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # (T, h*w, C)
        cls = self.class_embedding.expand(t, 1, c)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(h, w)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos  # (T, 1 + h*w, C)


class InternViT(MegatronModule):
    """Tiles (T, 3, H, W) -> features of the selected block, (T, 1 + N, C)."""

    def __init__(
        self, config: Any, vision: VisionConfig, layer_spec: ModuleSpec, pg_collection: ProcessGroupCollection
    ) -> None:
        super().__init__(config=config)
        self.tp_group = pg_collection.tp  # read by megatron-core's sharded_state_dict (else: its global group)
        self.embeddings = InternViTEmbeddings(vision, config.params_dtype)
        self.encoder = TransformerBlock(
            config, layer_spec, post_layer_norm=False, pre_process=True, post_process=False, pg_collection=pg_collection
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values).transpose(0, 1).contiguous()  # (1+N, T, C)
        if torch.is_grad_enabled() and not x.requires_grad and any(p.requires_grad for p in self.encoder.parameters()):
            # frozen embeddings under trainable blocks (--unfreeze-vit-layers): megatron-core's full
            # recompute is reentrant and drops the blocks' weight gradients unless its input needs grad
            x.requires_grad_(True)
        x = self.encoder(hidden_states=x, attention_mask=None)
        return x.transpose(0, 1)  # (T, 1+N, C)
