"""Key maps between our canonical weight layout and the HF checkpoint layouts, as data.

A key map is a tuple of `Rule`s. Each rule ties one canonical tensor (our parameter name at TP1/PP1,
see models/weights.py) to one or more HF tensors and names the pure reshape function that turns the
HF tensors into the canonical one and back. `{i}` is a layer index; `layers` says which stack it
counts over. Tables are composed per (HF format, LLM naming); nothing here branches on model names.

Layouts:
- "transformers": what `InternVLForConditionalGeneration.save_pretrained` writes (transformers 5.x
  saves the same on-disk names as 4.5x and the released `*-hf` checkpoints: `vision_tower.*`,
  `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`). The
  in-memory module names (`model.vision_tower.*`, `model.language_model.*`, `lm_head.weight`) are
  accepted on read through `TRANSFORMERS_READ_ALIASES`.
- "internvl": InternVL's own `InternVLChatModel` (`vision_model.*`, `mlp1.*`, `language_model.*`),
  with the LLM named as in its HF family (Qwen2 / Llama / InternLM3 alike, or InternLM2).

Fused-tensor layouts (d = head_dim, H = input width):
- megatron-core `linear_qkv`: per query group g: [q_g0 .. q_g(hpg-1), k_g, v_g] rows of d each.
  For the ViT (MHA, one head per group) that is [q_h, k_h, v_h] per head.
- HF q_proj/k_proj/v_proj: [q_0 .. q_(n-1)], [k_0 .. k_(g-1)], [v_0 .. v_(g-1)].
- InternViT `attn.qkv`: [Q; K; V] stacked (its forward reshapes the output to (3, heads, d)).
- InternLM2 `attention.wqkv`: its forward views the output as (groups, hpg + 2, d) and takes the
  first hpg slots as queries, then k, then v -- exactly megatron-core's grouped layout, so it maps
  with "copy".
- megatron-core SwiGLU `linear_fc1`: [gate; up]; HF gate_proj/up_proj, InternLM2 w1/w3.
- MoE (Qwen3-MoE, both formats): HF keeps one gate_proj/up_proj/down_proj per expert
  (`mlp.experts.{e}.*`, what transformers 5 `save_pretrained` writes although it fuses them in
  memory) and the router as `mlp.gate`; megatron-core's SequentialMLP holds expert e as
  `mlp.experts.local_experts.{e}` (canonical = global expert index, models/weights.py) and the
  router as `mlp.router`. `{e}` runs over the experts (`layers="llm_expert"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from ..errors import ConversionError
from ..config.model import ModelConfig
from ..models.parameters import model_parameters, output_layer

Tower = Literal["vision", "llm", "llm_expert"]


@dataclass(frozen=True)
class Rule:
    """One canonical tensor <-> its HF tensor(s)."""

    canonical: str
    """Canonical name; `{i}` is the layer index."""
    hf: tuple[str, ...]
    """HF name(s) the transform reads (import) and writes (export), in the transform's order."""
    transform: str = "copy"
    """Key of `TRANSFORMS`."""
    layers: Tower | None = None
    """Stack `{i}` runs over (vision blocks or LLM decoder layers; "llm_expert": decoder layers x
    experts, `{e}` the expert); None: not per layer."""
    when: str | None = None
    """Key of `PREDICATES`: the tensor exists (in HF and in our model) only for configs where it holds."""


# --- named reshape functions: pure, exact (reshape / cat / split only) ---------------------------
# Each one rearranges rows (dim 0) only and passes trailing dims through (hf.py relies on it to
# compute expected HF shapes cheaply).


def _grouped_from_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, d: int) -> torch.Tensor:
    """HF q (n*d, ...), k (g*d, ...), v (g*d, ...) -> megatron grouped rows (g*(hpg+2)*d, ...)."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)  # (g, hpg*d, ...)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_from_grouped(w: torch.Tensor, heads: int, groups: int, d: int) -> list[torch.Tensor]:
    """Inverse of `_grouped_from_split`."""
    rest = w.shape[1:]
    hpg = heads // groups
    q, k, v = w.reshape(groups, (hpg + 2) * d, *rest).split([hpg * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def _llm_geom(cfg: ModelConfig) -> tuple[int, int, int]:
    return cfg.llm.num_attention_heads, cfg.llm.num_query_groups, cfg.llm.head_dim


def _vit_geom(cfg: ModelConfig) -> tuple[int, int, int]:
    h = cfg.vision.num_attention_heads
    return h, h, cfg.vision.head_dim  # MHA: one head per group


def llm_qkv_to_canonical(ts: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """LLM q_proj, k_proj, v_proj -> linear_qkv (weights or biases)."""
    _, g, d = _llm_geom(cfg)
    return _grouped_from_split(*ts, groups=g, d=d)


def llm_qkv_to_hf(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """linear_qkv -> LLM q_proj, k_proj, v_proj."""
    return _split_from_grouped(t, *_llm_geom(cfg))


def vit_qkv_split_to_canonical(ts: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """ViT q_proj, k_proj, v_proj (transformers) -> per-head [q_h, k_h, v_h] linear_qkv."""
    _, g, d = _vit_geom(cfg)
    return _grouped_from_split(*ts, groups=g, d=d)


def vit_qkv_split_to_hf(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """linear_qkv -> ViT q_proj, k_proj, v_proj."""
    return _split_from_grouped(t, *_vit_geom(cfg))


def vit_qkv_fused_to_canonical(ts: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """InternViT attn.qkv [Q; K; V] -> per-head [q_h, k_h, v_h] linear_qkv."""
    (qkv,) = ts
    if qkv.shape[0] % 3:
        raise ConversionError(f"fused qkv has {qkv.shape[0]} rows, not a multiple of 3")
    return vit_qkv_split_to_canonical(qkv.chunk(3, dim=0), cfg)


def vit_qkv_fused_to_hf(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """linear_qkv -> InternViT attn.qkv [Q; K; V]."""
    return [torch.cat(vit_qkv_split_to_hf(t, cfg), dim=0)]


def gate_up_to_canonical(ts: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """gate_proj (w1), up_proj (w3) -> SwiGLU linear_fc1 [gate; up]."""
    gate, up = ts
    if gate.shape != up.shape:
        raise ConversionError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} projections differ in shape")
    return torch.cat([gate, up], dim=0)


def gate_up_to_hf(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """SwiGLU linear_fc1 [gate; up] -> gate_proj (w1), up_proj (w3)."""
    return list(t.chunk(2, dim=0))


def copy_to_canonical(ts: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The same tensor under another name."""
    (t,) = ts
    return t


def copy_to_hf(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The same tensor under another name."""
    return [t]


@dataclass(frozen=True)
class Transform:
    """A pair of inverse functions; `arity` HF tensors <-> one canonical tensor."""

    arity: int
    to_canonical: Callable[[Sequence[torch.Tensor], ModelConfig], torch.Tensor]
    to_hf: Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(1, copy_to_canonical, copy_to_hf),
    "llm_qkv": Transform(3, llm_qkv_to_canonical, llm_qkv_to_hf),
    "vit_qkv_split": Transform(3, vit_qkv_split_to_canonical, vit_qkv_split_to_hf),
    "vit_qkv_fused": Transform(1, vit_qkv_fused_to_canonical, vit_qkv_fused_to_hf),
    "gate_up": Transform(2, gate_up_to_canonical, gate_up_to_hf),
}

PREDICATES: dict[str, Callable[[ModelConfig], bool]] = {
    "vision_qkv_bias": lambda c: c.vision.qkv_bias,
    "vision_norm_bias": lambda c: c.vision.normalization == "LayerNorm",
    "vision_qk_norm": lambda c: c.vision.qk_normalization,
    "llm_qkv_bias": lambda c: c.llm.qkv_bias,
    "llm_qk_norm": lambda c: c.llm.qk_layernorm,
    "untied_output": lambda c: not c.llm.tie_word_embeddings,
    "dense_mlp": lambda c: not c.llm.is_moe,
    "moe": lambda c: c.llm.is_moe,
}


# --- tables ---------------------------------------------------------------------------------------
_V = "vision_model.encoder.layers.{i}."
_L = "language_model.decoder.layers.{i}."
_E = _L + "mlp.experts.local_experts.{e}."


def _vision_rules(prefix: str, names: dict[str, str], qkv: tuple[tuple[str, ...], str]) -> tuple[Rule, ...]:
    """Vision tables differ only in names and in how q/k/v are stored."""
    layer = prefix + names["layer"]
    qkv_names, qkv_transform = qkv
    per_layer = (
        (_V + "ls1", (layer + names["ls1"],), "copy", None),
        (_V + "ls2", (layer + names["ls2"],), "copy", None),
        (_V + "input_layernorm.weight", (layer + names["norm1"] + ".weight",), "copy", None),
        (_V + "input_layernorm.bias", (layer + names["norm1"] + ".bias",), "copy", "vision_norm_bias"),
        (_V + "self_attention.linear_qkv.weight", tuple(layer + n + ".weight" for n in qkv_names), qkv_transform, None),
        (
            _V + "self_attention.linear_qkv.bias",
            tuple(layer + n + ".bias" for n in qkv_names),
            qkv_transform,
            "vision_qkv_bias",
        ),
        (_V + "self_attention.q_layernorm.weight", (layer + names["q_norm"] + ".weight",), "copy", "vision_qk_norm"),
        (_V + "self_attention.k_layernorm.weight", (layer + names["k_norm"] + ".weight",), "copy", "vision_qk_norm"),
        (_V + "self_attention.linear_proj.weight", (layer + names["proj"] + ".weight",), "copy", None),
        (_V + "self_attention.linear_proj.bias", (layer + names["proj"] + ".bias",), "copy", None),
        (_V + "pre_mlp_layernorm.weight", (layer + names["norm2"] + ".weight",), "copy", None),
        (_V + "pre_mlp_layernorm.bias", (layer + names["norm2"] + ".bias",), "copy", "vision_norm_bias"),
        (_V + "mlp.linear_fc1.weight", (layer + names["fc1"] + ".weight",), "copy", None),
        (_V + "mlp.linear_fc1.bias", (layer + names["fc1"] + ".bias",), "copy", None),
        (_V + "mlp.linear_fc2.weight", (layer + names["fc2"] + ".weight",), "copy", None),
        (_V + "mlp.linear_fc2.bias", (layer + names["fc2"] + ".bias",), "copy", None),
    )
    emb = "vision_model.embeddings."
    return (
        Rule(emb + "class_embedding", (prefix + names["cls"],)),
        Rule(emb + "patch_embedding.weight", (prefix + names["patch"] + ".weight",)),
        Rule(emb + "patch_embedding.bias", (prefix + names["patch"] + ".bias",)),
        Rule(emb + "position_embedding", (prefix + names["pos"],)),
    ) + tuple(Rule(c, h, t, "vision", w) for c, h, t, w in per_layer)


def _projector_rules(prefix: str, norm: str, fc1: str, fc2: str) -> tuple[Rule, ...]:
    return tuple(
        Rule(f"projector.{ours}.{p}", (f"{prefix}{theirs}.{p}",))
        for ours, theirs in (("layer_norm", norm), ("mlp.linear_fc1", fc1), ("mlp.linear_fc2", fc2))
        for p in ("weight", "bias")
    )


def _llm_rules(model: str, head: str, n: dict[str, str]) -> tuple[Rule, ...]:
    """An LLM table: `model` is the decoder's prefix, `head` the output layer's full name."""
    layer = model + "layers.{i}."
    qkv = (n["q"], n["k"], n["v"])
    per_layer = (
        (_L + "input_layernorm.weight", (layer + n["norm1"] + ".weight",), "copy", None),
        (_L + "self_attention.linear_qkv.weight", tuple(layer + x + ".weight" for x in qkv), n["qkv_transform"], None),
        (
            _L + "self_attention.linear_qkv.bias",
            tuple(layer + x + ".bias" for x in qkv),
            n["qkv_transform"],
            "llm_qkv_bias",
        ),
        (_L + "self_attention.q_layernorm.weight", (layer + n["q_norm"] + ".weight",), "copy", "llm_qk_norm"),
        (_L + "self_attention.k_layernorm.weight", (layer + n["k_norm"] + ".weight",), "copy", "llm_qk_norm"),
        (_L + "self_attention.linear_proj.weight", (layer + n["o"] + ".weight",), "copy", None),
        (_L + "pre_mlp_layernorm.weight", (layer + n["norm2"] + ".weight",), "copy", None),
        (
            _L + "mlp.linear_fc1.weight",
            (layer + n["gate"] + ".weight", layer + n["up"] + ".weight"),
            "gate_up",
            "dense_mlp",
        ),
        (_L + "mlp.linear_fc2.weight", (layer + n["down"] + ".weight",), "copy", "dense_mlp"),
        (_L + "mlp.router.weight", (layer + "mlp.gate.weight",), "copy", "moe"),
    )
    expert = layer + "mlp.experts.{e}."
    per_expert = (
        (_E + "linear_fc1.weight", (expert + "gate_proj.weight", expert + "up_proj.weight"), "gate_up", "moe"),
        (_E + "linear_fc2.weight", (expert + "down_proj.weight",), "copy", "moe"),
    )
    # `n["q"] == n["k"] == n["v"]` for packed layouts: collapse to one HF tensor
    per_layer = tuple((c, tuple(dict.fromkeys(h)), t, w) for c, h, t, w in per_layer)
    return (
        (Rule("language_model.embedding.word_embeddings.weight", (model + n["embed"] + ".weight",)),)
        + tuple(Rule(c, h, t, "llm", w) for c, h, t, w in per_layer)
        + tuple(Rule(c, h, t, "llm_expert", w) for c, h, t, w in per_expert)
        + (
            Rule("language_model.decoder.final_layernorm.weight", (model + n["final_norm"] + ".weight",)),
            Rule("language_model.output_layer.weight", (head,), when="untied_output"),
        )
    )


_HF_LLM_NAMES = dict(  # Qwen2, Llama, InternLM3, Qwen3 (transformers' LlamaForCausalLM naming; Qwen3 adds q/k_norm)
    embed="embed_tokens",
    norm1="input_layernorm",
    norm2="post_attention_layernorm",
    final_norm="norm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    qkv_transform="llm_qkv",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
)
_INTERNLM2_NAMES = dict(
    embed="tok_embeddings",
    norm1="attention_norm",
    norm2="ffn_norm",
    final_norm="norm",
    q="attention.wqkv",
    k="attention.wqkv",
    v="attention.wqkv",
    o="attention.wo",
    q_norm="attention.q_norm",
    k_norm="attention.k_norm",  # never present: InternLM2 has no QK-norm
    qkv_transform="copy",  # wqkv is already megatron-core's grouped layout (module docstring)
    gate="feed_forward.w1",
    up="feed_forward.w3",
    down="feed_forward.w2",
)

# Names under "language_model." are shared by both formats (transformers saves its LLM there too).
LLM_TABLES: dict[str, tuple[Rule, ...]] = {
    "hf": _llm_rules("language_model.model.", "language_model.lm_head.weight", _HF_LLM_NAMES),
    "internlm2": _llm_rules("language_model.model.", "language_model.output.weight", _INTERNLM2_NAMES),
}

VISION_TABLES: dict[str, tuple[Rule, ...]] = {
    "transformers": _vision_rules(
        "vision_tower.",
        dict(
            cls="embeddings.cls_token",
            patch="embeddings.patch_embeddings.projection",
            pos="embeddings.position_embeddings",
            layer="encoder.layer.{i}.",
            ls1="lambda_1",
            ls2="lambda_2",
            norm1="layernorm_before",
            norm2="layernorm_after",
            q_norm="attention.q_norm",
            k_norm="attention.k_norm",
            proj="attention.projection_layer",
            fc1="mlp.fc1",
            fc2="mlp.fc2",
        ),
        (("attention.q_proj", "attention.k_proj", "attention.v_proj"), "vit_qkv_split"),
    ),
    "internvl": _vision_rules(
        "vision_model.",
        dict(
            cls="embeddings.class_embedding",
            patch="embeddings.patch_embedding",
            pos="embeddings.position_embedding",
            layer="encoder.layers.{i}.",
            ls1="ls1",
            ls2="ls2",
            norm1="norm1",
            norm2="norm2",
            q_norm="attn.q_norm",
            k_norm="attn.k_norm",
            proj="attn.proj",
            fc1="mlp.fc1",
            fc2="mlp.fc2",
        ),
        (("attn.qkv",), "vit_qkv_fused"),
    ),
}

PROJECTOR_TABLES: dict[str, tuple[Rule, ...]] = {
    "transformers": _projector_rules("multi_modal_projector.", "layer_norm", "linear_1", "linear_2"),
    "internvl": _projector_rules("mlp1.", "0", "1", "3"),  # nn.Sequential(LayerNorm, Linear, GELU, Linear)
}

# Which LLM table each format uses per LLM family. transformers has no InternLM2 class, so a model
# of that family is exported there in Llama naming (same math: split wqkv, w1/w3 -> gate/up).
LLM_NAMING: dict[str, dict[str, str]] = {
    "transformers": {"qwen2": "hf", "llama": "hf", "internlm2": "hf", "qwen3": "hf", "qwen3_moe": "hf"},
    "internvl": {"qwen2": "hf", "llama": "hf", "internlm2": "internlm2", "qwen3": "hf", "qwen3_moe": "hf"},
}

FORMATS = tuple(LLM_NAMING)

# In-memory module prefixes of InternVLForConditionalGeneration -> its on-disk (saved) names.
TRANSFORMERS_READ_ALIASES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
READ_ALIASES: dict[str, tuple[tuple[str, str], ...]] = {"transformers": TRANSFORMERS_READ_ALIASES, "internvl": ()}


def keymap(fmt: str, family: str) -> tuple[Rule, ...]:
    """The rule table of HF format `fmt` ("transformers" | "internvl") for an LLM `family`."""
    if fmt not in LLM_NAMING:
        raise ConversionError(f"unknown HF format {fmt!r}; choose one of {', '.join(FORMATS)}")
    naming = LLM_NAMING[fmt].get(family)
    if naming is None:
        raise ConversionError(f"no {fmt} key map for LLM family {family!r}; known: {', '.join(LLM_NAMING[fmt])}")
    return VISION_TABLES[fmt] + PROJECTOR_TABLES[fmt] + LLM_TABLES[naming]


@dataclass(frozen=True)
class Entry:
    """A rule expanded for one layer index and checked against the config."""

    canonical: str
    hf: tuple[str, ...]
    transform: Transform
    present: bool
    """False: neither the HF checkpoint nor our model has this tensor for this config."""


def expand(rules: Sequence[Rule], cfg: ModelConfig) -> list[Entry]:
    """Concrete (canonical, hf names, transform) entries for every layer of `cfg`."""
    counts = {"vision": cfg.vision.num_layers, "llm": cfg.llm.num_layers, "llm_expert": cfg.llm.num_layers, None: 1}
    out = []
    for r in rules:
        present = PREDICATES[r.when](cfg) if r.when else True
        experts = range(max(cfg.llm.num_experts, 1)) if r.layers == "llm_expert" else (0,)
        for i in range(counts[r.layers]):
            for e in experts:
                out.append(
                    Entry(
                        r.canonical.format(i=i, e=e),
                        tuple(h.format(i=i, e=e) for h in r.hf),
                        TRANSFORMS[r.transform],
                        present,
                    )
                )
    return out


# --- canonical shapes from the config (checked against the real model in tests) -------------------


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical tensor of `cfg`: the model's parameter list (models/parameters.py),
    with all vision layers of the checkpoint, including any past `select_layer` that the model does
    not build, and the output layer whether or not the embeddings are tied (the key map's
    `untied_output` says whether a checkpoint holds it)."""
    params = model_parameters(cfg, all_vision_layers=True) + [output_layer(cfg)]
    return {p.name: p.shape for p in params}


def canonical_names(cfg: ModelConfig) -> list[str]:
    """The canonical tensors a checkpoint of `cfg` holds (any HF format gives the same set)."""
    return [e.canonical for e in expand(keymap("internvl", "qwen2"), cfg) if e.present]
