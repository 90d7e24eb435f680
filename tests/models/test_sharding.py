"""The sharding rules (models/sharding.py) agree with themselves: the local shape the planner reads is
the shape `shard` cuts, `canonical_shape` inverts it, and `unshard` restores the tensor (padding
included: debug-6b's 3 ViT heads are padded at TP 2, 4, 8; the vocabulary is padded at every TP)."""

from __future__ import annotations

import pytest
import torch

from internvl_mcore.config import PRESETS
from internvl_mcore.models.sharding import EvenSplit, GatedSplit, HeadSplit, VocabSplit, rule_for

CFG = PRESETS["debug-6b"]
V, L = CFG.vision, CFG.llm
VIT = "vision_model.encoder.layers.0.self_attention."
# (canonical name, canonical shape, partition dim, the rule it must follow)
CASES = [
    (VIT + "linear_qkv.weight", (3 * V.num_attention_heads * V.head_dim, V.hidden_size), 0, HeadSplit),
    (VIT + "linear_proj.weight", (V.hidden_size, V.num_attention_heads * V.head_dim), 1, HeadSplit),
    ("language_model.decoder.layers.0.mlp.linear_fc1.weight", (2 * L.ffn_hidden_size, L.hidden_size), 0, GatedSplit),
    ("language_model.decoder.layers.0.mlp.linear_fc2.weight", (L.hidden_size, L.ffn_hidden_size), 1, EvenSplit),
    ("language_model.output_layer.weight", (L.vocab_size, L.hidden_size), 0, VocabSplit),
]


@pytest.mark.parametrize("name,shape,dim,kind", CASES, ids=[c[0].rsplit(".", 2)[-2] for c in CASES])
def test_local_shape_is_what_shard_cuts(name, shape, dim, kind):
    rule = rule_for(name)
    assert type(rule) is kind
    full = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for tp in (1, 2, 4, 8):
        parts = [rule.shard(full, dim, r, tp, CFG) for r in range(tp)]
        local = rule.local_shape(shape, dim, tp, CFG)
        assert all(tuple(p.shape) == local for p in parts), (tp, local, [p.shape for p in parts])
        assert rule.canonical_shape(local, dim, tp, CFG) == shape
        assert torch.equal(rule.unshard(parts, dim, CFG), full)
