"""The model's parameter list, from the config alone: every tensor `models/internvl.py: build_model`
creates, in build order, by canonical name (TP1/PP1 names, global layer and expert indices) and
canonical shape, with what decides its place in memory: which part it belongs to, whether it is split
over tensor-parallel ranks (its sharding rule, models/sharding.py, gives the local shape), whether it is
an expert weight or a torch norm.

Written once here and read by the converter's canonical shapes (convert/keymaps.py: canonical_shapes),
by the planner's per-rank inventory (plan/params.py: stage_params) and, through the base weights'
local shapes, by its LoRA adapters. tests/plan/test_state_bytes.py compares the planner's lists with
built models' `named_parameters()` (dense, MoE, LoRA); tests/convert/test_convert.py the canonical
shapes with the canonical state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.model import ModelConfig

Part = Literal["vision", "projector", "llm"]


@dataclass(frozen=True)
class Param:
    """One parameter tensor of the single-process model."""

    name: str
    """Canonical name (TP1 / PP1: global layer and expert indices)."""
    shape: tuple[int, ...]
    """Canonical (TP1, unpadded) shape."""
    part: Part
    """Which part of the model it belongs to (what `--freeze-*` / stages switch)."""
    split: bool = False
    """Split over tensor-parallel ranks by its sharding rule (else replicated)."""
    torch_norm: bool = False
    """A norm built by megatron-core's `WrappedTorchNorm` (local backend): torch creates it in fp32."""
    expert: bool = False
    """An MoE expert weight (split over expert-TP, one copy per EP rank's experts)."""


def vision_layers_built(model: ModelConfig) -> int:
    """InternViT blocks built: all, or up to `select_layer` (blocks after it never run)."""
    v = model.vision
    return v.num_layers if v.select_layer == -1 else v.num_layers + v.select_layer + 1


def _norm(prefix: str, width: int, kind: str, part: Part, torch_norm: bool = True) -> list[Param]:
    specs = [Param(f"{prefix}.weight", (width,), part, torch_norm=torch_norm)]
    if kind == "LayerNorm":
        specs.append(Param(f"{prefix}.bias", (width,), part, torch_norm=torch_norm))
    return specs


def vision_embeddings(model: ModelConfig) -> list[Param]:
    """Class token, position embedding, patch convolution."""
    v, p = model.vision, "vision_model.embeddings"
    c = v.hidden_size
    return [
        Param(f"{p}.class_embedding", (1, 1, c), "vision"),
        Param(f"{p}.position_embedding", (1, v.num_patches + 1, c), "vision"),
        Param(f"{p}.patch_embedding.weight", (c, 3, v.patch_size, v.patch_size), "vision"),
        Param(f"{p}.patch_embedding.bias", (c,), "vision"),
    ]


def vision_layer(model: ModelConfig, i: int) -> list[Param]:
    """InternViT block `i`: layer scale, norms, attention (real heads: the sharding rule pads), MLP."""
    v = model.vision
    c, hd, f = v.hidden_size, v.num_attention_heads * v.head_dim, v.ffn_hidden_size
    lp = f"vision_model.encoder.layers.{i}"
    specs = [Param(f"{lp}.ls1", (c,), "vision"), Param(f"{lp}.ls2", (c,), "vision")]
    specs += _norm(f"{lp}.input_layernorm", c, v.normalization, "vision")
    specs += [
        Param(f"{lp}.self_attention.linear_proj.weight", (c, hd), "vision", split=True),
        Param(f"{lp}.self_attention.linear_proj.bias", (c,), "vision"),
        Param(f"{lp}.self_attention.linear_qkv.weight", (3 * hd, c), "vision", split=True),
    ]
    if v.qkv_bias:
        specs.append(Param(f"{lp}.self_attention.linear_qkv.bias", (3 * hd,), "vision", split=True))
    if v.qk_normalization:
        specs += [Param(f"{lp}.self_attention.{x}_layernorm.weight", (hd,), "vision", split=True) for x in "qk"]
    specs += _norm(f"{lp}.pre_mlp_layernorm", c, v.normalization, "vision")
    return specs + [
        Param(f"{lp}.mlp.linear_fc1.weight", (f, c), "vision", split=True),
        Param(f"{lp}.mlp.linear_fc1.bias", (f,), "vision", split=True),
        Param(f"{lp}.mlp.linear_fc2.weight", (c, f), "vision", split=True),
        Param(f"{lp}.mlp.linear_fc2.bias", (c,), "vision"),
    ]


def projector(model: ModelConfig) -> list[Param]:
    """LayerNorm(4C) -> column-parallel Linear(4C, H) -> GELU -> row-parallel Linear(H, H)."""
    cin, h = model.projector_input_size, model.llm.hidden_size
    return [
        *_norm("projector.layer_norm", cin, "LayerNorm", "projector", torch_norm=False),
        Param("projector.mlp.linear_fc1.weight", (h, cin), "projector", split=True),
        Param("projector.mlp.linear_fc1.bias", (h,), "projector", split=True),
        Param("projector.mlp.linear_fc2.weight", (h, h), "projector", split=True),
        Param("projector.mlp.linear_fc2.bias", (h,), "projector"),
    ]


def word_embeddings(model: ModelConfig) -> Param:
    """The LLM's input embedding (vocabulary rows: the sharding rule pads them)."""
    return Param(
        "language_model.embedding.word_embeddings.weight",
        (model.llm.vocab_size, model.llm.hidden_size),
        "llm",
        split=True,
    )


def output_layer(model: ModelConfig) -> Param:
    """The LLM's output layer (absent from a single-stage model with tied embeddings)."""
    return Param("language_model.output_layer.weight", (model.llm.vocab_size, model.llm.hidden_size), "llm", split=True)


def final_norm(model: ModelConfig) -> Param:
    """The LLM's final RMSNorm."""
    return Param("language_model.decoder.final_layernorm.weight", (model.llm.hidden_size,), "llm", torch_norm=True)


def decoder_layer(model: ModelConfig, i: int, experts: range | None = None) -> list[Param]:
    """Decoder layer `i`: pre-norm GQA (+ per-head QK-norm, replicated) and a SwiGLU MLP, or the MoE
    router and the `experts` (default: all) as SwiGLUs."""
    m = model.llm
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d
    lp = f"language_model.decoder.layers.{i}"
    specs = [
        Param(f"{lp}.input_layernorm.weight", (h,), "llm", torch_norm=True),
        Param(f"{lp}.self_attention.linear_proj.weight", (h, m.num_attention_heads * d), "llm", split=True),
        Param(f"{lp}.self_attention.linear_qkv.weight", (qkv, h), "llm", split=True),
    ]
    if m.qkv_bias:
        specs.append(Param(f"{lp}.self_attention.linear_qkv.bias", (qkv,), "llm", split=True))
    if m.qk_layernorm:  # per-head, replicated over TP, in params_dtype (models/qk_norm.py)
        specs += [Param(f"{lp}.self_attention.{x}_layernorm.weight", (d,), "llm") for x in "qk"]
    specs.append(Param(f"{lp}.pre_mlp_layernorm.weight", (h,), "llm", torch_norm=True))
    if not m.is_moe:
        return specs + [
            Param(f"{lp}.mlp.linear_fc1.weight", (2 * f, h), "llm", split=True),
            Param(f"{lp}.mlp.linear_fc2.weight", (h, f), "llm", split=True),
        ]
    fe = m.moe_ffn_hidden_size
    specs.append(Param(f"{lp}.mlp.router.weight", (m.num_experts, h), "llm"))
    for e in range(m.num_experts) if experts is None else experts:
        ex = f"{lp}.mlp.experts.local_experts.{e}"
        specs += [
            Param(f"{ex}.linear_fc1.weight", (2 * fe, h), "llm", split=True, expert=True),
            Param(f"{ex}.linear_fc2.weight", (h, fe), "llm", split=True, expert=True),
        ]
    return specs


def model_parameters(model: ModelConfig, all_vision_layers: bool = False) -> list[Param]:
    """Every parameter of the single-process (TP1, PP1, EP1) model in build order; with
    `all_vision_layers`, also the InternViT blocks past `select_layer` that a checkpoint holds but
    the model does not build."""
    layers = model.vision.num_layers if all_vision_layers else vision_layers_built(model)
    specs = vision_embeddings(model)
    for i in range(layers):
        specs += vision_layer(model, i)
    specs += projector(model) + [word_embeddings(model)]
    for i in range(model.llm.num_layers):
        specs += decoder_layer(model, i)
    specs.append(final_norm(model))
    if not model.llm.tie_word_embeddings:
        specs.append(output_layer(model))
    return specs
