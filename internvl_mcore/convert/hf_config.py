"""config.json <-> ModelConfig for both HF layouts.

Nothing here imports transformers: config.json files are read and written as plain JSON. Field names
and defaults follow transformers' `InternVLConfig` / `InternVLVisionConfig` (5.x) and InternVL's
`InternVLChatConfig` / `InternVisionConfig` (remote code); a key absent from a saved config takes that
class's default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from internvl_mcore.cli_errors import read_json
from ..checkpoint.safetensors_io import CONFIG_NAME, dtype_name
from ..errors import ConversionError
from ..config.model import LLMConfig, ModelConfig, VisionConfig
from ..config.presets import PRESETS

# =============================================================================================
# config.json <-> ModelConfig
# =============================================================================================

_REQUIRED = object()


def _get(d: Mapping[str, Any], key: str, where: str, default: Any = _REQUIRED) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is _REQUIRED:
        raise ConversionError(f"{where}: required key {key!r} is missing")
    return default


def _require(d: Mapping[str, Any], key: str, allowed: tuple, where: str, default: Any) -> Any:
    value = d.get(key, default)
    if value not in allowed:
        raise ConversionError(f"{where}: {key}={value!r} is not supported (supported: {', '.join(map(repr, allowed))})")
    return value


def _first(x: Any) -> int:
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


_NORMS = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}
_NORMS_INV = {v: k for k, v in _NORMS.items()}


@dataclass(frozen=True)
class VisionSchema:
    """How one format's vision config spells each VisionConfig field, and its class defaults."""

    keys: dict[str, str]
    """VisionConfig field -> config key."""
    defaults: dict[str, Any]
    """Config key -> default of the HF config class (saved configs may omit defaults)."""
    fixed: dict[str, tuple]
    """Config key -> the values our model supports (anything else is refused)."""


VISION_SCHEMAS: dict[str, VisionSchema] = {
    "transformers": VisionSchema(
        keys=dict(
            num_layers="num_hidden_layers",
            hidden_size="hidden_size",
            num_attention_heads="num_attention_heads",
            ffn_hidden_size="intermediate_size",
            image_size="image_size",
            patch_size="patch_size",
            qkv_bias="attention_bias",
            normalization="norm_type",
            qk_normalization="use_qk_norm",
            layernorm_epsilon="layer_norm_eps",
            layer_scale_init="layer_scale_init_value",
        ),
        defaults=dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=448,
            patch_size=14,
            attention_bias=False,
            norm_type="layer_norm",
            use_qk_norm=False,
            layer_norm_eps=1e-6,
            layer_scale_init_value=0.1,
        ),
        # a final LayerNorm (use_mean_pooling=False) or no position embedding are not InternViT
        fixed=dict(
            hidden_act=("gelu",),
            use_mean_pooling=(True,),
            use_absolute_position_embeddings=(True,),
            num_channels=(3,),
            use_mask_token=(False,),
        ),
    ),
    "internvl": VisionSchema(
        keys=dict(
            num_layers="num_hidden_layers",
            hidden_size="hidden_size",
            num_attention_heads="num_attention_heads",
            ffn_hidden_size="intermediate_size",
            image_size="image_size",
            patch_size="patch_size",
            qkv_bias="qkv_bias",
            normalization="norm_type",
            qk_normalization="qk_normalization",
            layernorm_epsilon="layer_norm_eps",
            layer_scale_init="initializer_factor",
            drop_path_rate="drop_path_rate",
        ),
        defaults=dict(
            hidden_size=3200,
            num_hidden_layers=48,
            num_attention_heads=25,
            intermediate_size=12800,
            image_size=224,
            patch_size=14,
            qkv_bias=False,
            norm_type="rms_norm",
            qk_normalization=True,
            layer_norm_eps=1e-6,
            initializer_factor=0.1,
            drop_path_rate=0.0,
        ),
        fixed=dict(hidden_act=("gelu",), num_channels=(3,), use_moe=(False,)),
    ),
}

_VISION_CONVERT: dict[str, Callable[[Any], Any]] = {
    "image_size": _first,
    "patch_size": _first,
    "qkv_bias": bool,
    "qk_normalization": bool,
    "normalization": lambda v: _NORMS[v],
    "layernorm_epsilon": float,
    "layer_scale_init": float,
    "drop_path_rate": float,
}


def _vision_from(vc: Mapping[str, Any], fmt: str, select_layer: int, where: str) -> VisionConfig:
    schema = VISION_SCHEMAS[fmt]
    for key, allowed in schema.fixed.items():
        _require(vc, key, allowed, where, allowed[0])
    norm = vc.get(schema.keys["normalization"], schema.defaults[schema.keys["normalization"]])
    if norm not in _NORMS:
        raise ConversionError(f"{where}: norm_type={norm!r} is not supported (layer_norm, rms_norm)")
    fields = {
        f: _VISION_CONVERT.get(f, int)(_get(vc, k, where, schema.defaults.get(k, _REQUIRED)))
        for f, k in schema.keys.items()
    }
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ConversionError(
            f"{where}: hidden_size {fields['hidden_size']} is not a multiple of "
            f"num_attention_heads {fields['num_attention_heads']}"
        )
    return VisionConfig(select_layer=select_layer, **fields)


@dataclass(frozen=True)
class LLMSpec:
    """One HF LLM class: how its config spells our fields, and what it adds that we lack."""

    family: str
    """LLMConfig.family (selects the key map)."""
    architecture: str
    """`architectures[0]` in an InternVL llm_config."""
    model_type: str
    qkv_bias: str | bool
    """Config key of the q/k/v bias flag, or the class's fixed answer."""
    must_be_false: tuple[str, ...] = ()
    """Config keys whose true value our decoder does not model (o_proj / MLP biases, sliding window)."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """Class defaults of keys a saved config may omit."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Extra keys written on export (remote-code auto_map, ...)."""
    qk_norm: bool = False
    """The class always has per-head RMSNorm on q and k (`self_attn.q_norm` / `k_norm`: Qwen3)."""
    head_dim: bool = True
    """The class reads `head_dim` from its config (InternLM2's remote code always uses hidden / heads)."""
    moe: bool = False
    """Mixture-of-experts MLPs (Qwen3-MoE's config keys: `_moe_from`)."""


LLM_SPECS: dict[str, LLMSpec] = {  # keyed by architecture
    "Qwen2ForCausalLM": LLMSpec(
        "qwen2",
        "Qwen2ForCausalLM",
        "qwen2",
        qkv_bias=True,
        must_be_false=("use_sliding_window",),
        defaults=(("rope_theta", 10000.0), ("tie_word_embeddings", False)),
    ),
    "LlamaForCausalLM": LLMSpec(
        "llama",
        "LlamaForCausalLM",
        "llama",
        qkv_bias=False,
        must_be_false=("attention_bias", "mlp_bias"),
        defaults=(("rope_theta", 10000.0), ("tie_word_embeddings", False)),
    ),
    "InternLM3ForCausalLM": LLMSpec(
        "llama",
        "InternLM3ForCausalLM",
        "internlm3",
        qkv_bias="qkv_bias",
        must_be_false=("bias",),
        defaults=(("qkv_bias", False), ("bias", False), ("rope_theta", 10000.0), ("tie_word_embeddings", False)),
    ),
    "Qwen3ForCausalLM": LLMSpec(
        "qwen3",
        "Qwen3ForCausalLM",
        "qwen3",
        qkv_bias=False,
        qk_norm=True,
        must_be_false=("attention_bias", "use_sliding_window"),
        defaults=(("head_dim", 128), ("rope_theta", 10000.0), ("tie_word_embeddings", False)),
    ),
    "InternLM2ForCausalLM": LLMSpec(
        "internlm2",
        "InternLM2ForCausalLM",
        "internlm2",
        qkv_bias=False,
        must_be_false=("bias",),
        head_dim=False,
        defaults=(("bias", True), ("rope_theta", 10000), ("tie_word_embeddings", False)),
        extra=(
            (
                "auto_map",
                {
                    "AutoConfig": "configuration_internlm2.InternLM2Config",
                    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
                },
            ),
        ),
    ),
    "Qwen3MoeForCausalLM": LLMSpec(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        qkv_bias=False,
        qk_norm=True,
        must_be_false=("attention_bias", "use_sliding_window"),
        defaults=(
            ("head_dim", 128),
            ("rope_theta", 10000.0),
            ("tie_word_embeddings", False),
            ("norm_topk_prob", False),
            ("router_aux_loss_coef", 0.001),
            ("decoder_sparse_step", 1),
        ),
        moe=True,
    ),
}
# transformers' InternVL text_config is a native transformers class, found by model_type
TEXT_MODEL_TYPES: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# On export, the class written for each family (transformers has no InternLM2: Llama naming, same math)
EXPORT_ARCH: dict[str, dict[str, str]] = {
    "internvl": {
        "qwen2": "Qwen2ForCausalLM",
        "llama": "LlamaForCausalLM",
        "internlm2": "InternLM2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
    },
    "transformers": {
        "qwen2": "Qwen2ForCausalLM",
        "llama": "LlamaForCausalLM",
        "internlm2": "LlamaForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
    },
}
# LLM classes InternVL releases that the decoder does not model, with what it lacks (architecture in an
# InternVL llm_config, or model_type in a transformers text_config)
UNSUPPORTED_LLMS: dict[str, str] = {
    "GptOssForCausalLM": "GPT-OSS (InternVL3.5-20B-A4B) needs attention sinks, alternating sliding-window / "
    "full attention, YaRN RoPE, the clamped SwiGLU with biases, its mixture-of-experts "
    "router and MXFP4 expert weights, none of which this decoder implements",
}
UNSUPPORTED_LLMS["gpt_oss"] = UNSUPPORTED_LLMS["GptOssForCausalLM"]
_ROPE_TYPES = ("default", "dynamic")  # dynamic NTK equals default RoPE up to max_position_embeddings


def _rope_theta(tc: Mapping[str, Any], defaults: dict, where: str) -> float:
    params = tc.get("rope_parameters") or {}
    scaling = tc.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise ConversionError(f"{where}: RoPE scaling {rope_type!r} is not supported (default, dynamic)")
    if rope_type == "dynamic":
        warnings.warn(
            f"{where}: dynamic NTK RoPE scaling is not modelled; it equals plain RoPE for "
            f"sequences up to max_position_embeddings ({tc.get('max_position_embeddings')})"
        )
    theta = params.get("rope_theta", tc.get("rope_theta", defaults.get("rope_theta")))
    return float(_get({"rope_theta": theta}, "rope_theta", where))


def _llm_from(tc: Mapping[str, Any], spec: LLMSpec, tie: bool | None, where: str) -> LLMConfig:
    defaults = dict(spec.defaults)
    for key in spec.must_be_false:
        if tc.get(key, defaults.get(key, False)):
            raise ConversionError(f"{where}: {key}=True is not supported (our decoder does not model it)")
    _require(tc, "hidden_act", ("silu",), where, "silu")
    hidden = int(_get(tc, "hidden_size", where))
    heads = int(_get(tc, "num_attention_heads", where))
    head_dim = tc.get("head_dim", defaults.get("head_dim")) if spec.head_dim else None
    # a head width other than hidden / heads becomes kv_channels (None keeps the configs of presets equal)
    kv_channels = int(head_dim) if head_dim is not None and int(head_dim) * heads != hidden else None
    qkv_bias = (
        spec.qkv_bias if isinstance(spec.qkv_bias, bool) else bool(tc.get(spec.qkv_bias, defaults.get(spec.qkv_bias)))
    )
    return LLMConfig(
        family=spec.family,  # type: ignore[arg-type]
        num_layers=int(_get(tc, "num_hidden_layers", where)),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(tc.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(_get(tc, "intermediate_size", where)),
        vocab_size=int(_get(tc, "vocab_size", where)),
        qkv_bias=qkv_bias,
        rope_theta=_rope_theta(tc, defaults, where),
        norm_epsilon=float(_get(tc, "rms_norm_eps", where, 1e-6)),
        tie_word_embeddings=bool(
            tie if tie is not None else tc.get("tie_word_embeddings", defaults["tie_word_embeddings"])
        ),
        max_position_embeddings=int(_get(tc, "max_position_embeddings", where, 32768)),
        qk_layernorm=spec.qk_norm,
        kv_channels=kv_channels,
        **(_moe_from(tc, defaults, where) if spec.moe else {}),
    )


def _moe_from(tc: Mapping[str, Any], defaults: dict, where: str) -> dict:
    """LLMConfig's MoE fields from a Qwen3-MoE config. Every decoder layer must be MoE; the aux-loss
    coefficient becomes megatron-core's per-layer one: router_aux_loss_coef x top-k / layers
    (transformers' loss counts each routed (token, expert) slot, megatron-core's divides by top-k;
    summing over layers instead of transformers' all-layers pooling: docs/moe.md)."""
    if int(tc.get("decoder_sparse_step", defaults.get("decoder_sparse_step", 1))) != 1 or tc.get("mlp_only_layers"):
        raise ConversionError(
            f"{where}: decoder_sparse_step != 1 / mlp_only_layers (dense layers between MoE "
            "layers) are not supported: every decoder layer must be MoE"
        )
    topk = int(_get(tc, "num_experts_per_tok", where))
    coef = float(tc.get("router_aux_loss_coef", defaults.get("router_aux_loss_coef", 0.0)))
    # transformers 5 saves Qwen3MoeConfig.num_experts as num_local_experts; Qwen3's own configs say num_experts
    experts = tc.get("num_experts", tc.get("num_local_experts"))
    return dict(
        num_experts=int(_get({"num_experts": experts}, "num_experts", where)),
        moe_ffn_hidden_size=int(_get(tc, "moe_intermediate_size", where)),
        moe_router_topk=topk,
        moe_norm_topk_prob=bool(tc.get("norm_topk_prob", defaults.get("norm_topk_prob", False))),
        moe_aux_loss_coeff=coef * topk / int(_get(tc, "num_hidden_layers", where)),
    )


def _moe_config_dict(m: LLMConfig) -> dict:
    """Inverse of `_moe_from` (empty for a dense model)."""
    if not m.is_moe:
        return {}
    return {
        "num_experts": m.num_experts,
        "moe_intermediate_size": m.moe_ffn_hidden_size,
        "num_experts_per_tok": m.moe_router_topk,
        "norm_topk_prob": m.moe_norm_topk_prob,
        "router_aux_loss_coef": m.moe_aux_loss_coeff * m.num_layers / m.moe_router_topk,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _check_downsample(ratio: float, where: str) -> float:
    inv = 1.0 / ratio
    if abs(inv - round(inv)) > 1e-9:
        raise ConversionError(f"{where}: downsample_ratio={ratio} must be 1/integer")
    return float(ratio)


def _from_transformers(c: Mapping[str, Any], where: str) -> tuple[ModelConfig, dict]:
    vc = _get(c, "vision_config", where)
    tc = _get(c, "text_config", where)
    _require(c, "vision_feature_select_strategy", ("default",), where, "default")
    _require(c, "projector_hidden_act", ("gelu",), where, "gelu")
    layer = c.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ConversionError(f"{where}: vision_feature_layer={layer!r}: only a single layer is supported")
    text_type = _get(tc, "model_type", where + " text_config")
    if text_type in UNSUPPORTED_LLMS:
        raise ConversionError(
            f"{where}: text_config model_type {text_type!r} is not supported: {UNSUPPORTED_LLMS[text_type]}"
        )
    if text_type not in TEXT_MODEL_TYPES:
        raise ConversionError(
            f"{where}: text_config model_type {text_type!r} is not supported (supported: {', '.join(TEXT_MODEL_TYPES)})"
        )
    # transformers 5 ties lm_head by the top-level flag (default True); older configs kept it in text_config
    tie = c.get("tie_word_embeddings", tc.get("tie_word_embeddings", True))
    vision = _vision_from(vc, "transformers", layer, where + " vision_config")
    llm = _llm_from(tc, LLM_SPECS[TEXT_MODEL_TYPES[text_type]], tie, where + " text_config")
    ratio = _check_downsample(float(c.get("downsample_ratio", 0.5)), where)
    ids = {"img_context_token_id": int(c["image_token_id"])} if c.get("image_token_id") is not None else {}
    return ModelConfig(name="", vision=vision, llm=llm, downsample_ratio=ratio), ids


def _from_internvl(c: Mapping[str, Any], where: str) -> tuple[ModelConfig, dict]:
    vc = _get(c, "vision_config", where)
    lc = _get(c, "llm_config", where)
    _require(c, "ps_version", ("v2",), where, "v1")
    for key in ("use_backbone_lora", "use_llm_lora"):
        if c.get(key):
            raise ConversionError(f"{where}: {key}={c[key]}: merge the LoRA weights before converting")
    arch = _get(lc, "architectures", where + " llm_config")[0]
    if arch in UNSUPPORTED_LLMS:
        raise ConversionError(f"{where}: llm_config architecture {arch!r} is not supported: {UNSUPPORTED_LLMS[arch]}")
    if arch not in LLM_SPECS:
        raise ConversionError(
            f"{where}: llm_config architecture {arch!r} is not supported (supported: {', '.join(LLM_SPECS)})"
        )
    vision = _vision_from(vc, "internvl", int(c.get("select_layer", -1)), where + " vision_config")
    force = c.get("force_image_size")
    if force is not None and int(force) != vision.image_size:
        raise ConversionError(
            f"{where}: force_image_size={force} differs from vision_config image_size="
            f"{vision.image_size}; resize the position embedding first"
        )
    llm = _llm_from(lc, LLM_SPECS[arch], None, where + " llm_config")
    ratio = _check_downsample(float(c.get("downsample_ratio", 0.5)), where)
    ids = {"img_context_token_id": int(c["img_context_token_id"])} if c.get("img_context_token_id") is not None else {}
    extra = {"template": c["template"]} if c.get("template") else {}
    return ModelConfig(name="", vision=vision, llm=llm, downsample_ratio=ratio, **extra), ids


# config.json model_type -> (our format name, reader)
FORMAT_OF_MODEL_TYPE: dict[str, tuple[str, Callable[[Mapping[str, Any], str], tuple[ModelConfig, dict]]]] = {
    "internvl": ("transformers", _from_transformers),
    "internvl_chat": ("internvl", _from_internvl),
}

_TOKEN_FIELDS = {"<IMG_CONTEXT>": "img_context_token_id", "<img>": "img_start_token_id", "</img>": "img_end_token_id"}


def _tokenizer_ids(hf_dir: Path | None) -> dict[str, int]:
    """Special-token ids from the tokenizer files next to the weights, if any."""
    if hf_dir is None:
        return {}
    vocab: dict[str, int] = {}
    tok_json = hf_dir / "tokenizer.json"
    if tok_json.exists():
        vocab.update({t["content"]: int(t["id"]) for t in read_json(tok_json, ConversionError).get("added_tokens", [])})
    added = hf_dir / "added_tokens.json"
    if added.exists():
        vocab.update({k: int(v) for k, v in read_json(added, ConversionError).items()})
    tok_cfg_path = hf_dir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path, ConversionError) if tok_cfg_path.exists() else {}
    vocab.update({v["content"]: int(k) for k, v in tok_cfg.get("added_tokens_decoder", {}).items()})
    ids = {field: vocab[tok] for tok, field in _TOKEN_FIELDS.items() if tok in vocab}
    pad = tok_cfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad in vocab:
        ids["pad_token_id"] = vocab[pad]
    return ids


def _structure(cfg: ModelConfig) -> tuple:
    """The parts of a config that decide tensor shapes and the computation (not training knobs)."""
    return (
        dataclasses.replace(cfg.vision, drop_path_rate=0.0, layer_scale_init=0.1),
        dataclasses.replace(cfg.llm, max_position_embeddings=0),
        cfg.downsample_ratio,
    )


def matching_preset(cfg: ModelConfig) -> ModelConfig | None:
    """The preset with the same architecture as `cfg`, if any."""
    return next((p for p in PRESETS.values() if _structure(p) == _structure(cfg)), None)


_ID_FIELDS = ("img_context_token_id", "img_start_token_id", "img_end_token_id", "pad_token_id")
_TOKENIZER_FILES = "tokenizer.json / tokenizer_config.json / added_tokens.json"


def _config_pad_id(config: Mapping[str, Any]) -> dict[str, int]:
    """The pad id config.json states (transformers' text_config, InternVL's llm_config, or the top level)."""
    sub = config.get("text_config") or config.get("llm_config") or {}
    pad = sub.get("pad_token_id", config.get("pad_token_id")) if isinstance(sub, Mapping) else None
    return {"pad_token_id": int(pad)} if isinstance(pad, int) and not isinstance(pad, bool) else {}


def _special_ids(
    config: Mapping[str, Any],
    cfg: ModelConfig,
    stated: dict,
    preset: ModelConfig | None,
    hf_dir: Path | None,
    where: str,
) -> dict[str, int]:
    """Special-token ids from the tokenizer files, else config.json (`stated`: image_token_id /
    img_context_token_id, the LLM config's pad_token_id), else the preset of the same architecture.
    An id nothing states, or one outside the LLM's vocabulary, is refused: training would index past
    the embedding."""
    ids = {f: getattr(preset, f) for f in _ID_FIELDS} if preset else {}
    ids.update(_config_pad_id(config))
    ids.update(stated)
    ids.update(_tokenizer_ids(hf_dir))
    missing = [f for f in _ID_FIELDS if f not in ids]
    if missing:
        place = f"{hf_dir} has no tokenizer files ({_TOKENIZER_FILES}) naming them" if hf_dir else "no tokenizer files"
        raise ConversionError(
            f"{where}: special-token ids {', '.join(missing)} are unknown: no preset has this "
            f"architecture, config.json does not state them and {place}; put the model's "
            "tokenizer files next to config.json"
        )
    vocab = cfg.llm.vocab_size
    outside = [f"{f}={ids[f]}" for f in _ID_FIELDS if not 0 <= ids[f] < vocab]
    if outside:
        raise ConversionError(
            f"{where}: special-token ids {', '.join(outside)} are outside the LLM's vocabulary "
            f"of {vocab} rows (vocab_size); the tokenizer files do not belong to this model"
        )
    return {f: ids[f] for f in _ID_FIELDS}


def model_config_from_hf(config: Mapping[str, Any], hf_dir: str | os.PathLike | None = None) -> tuple[ModelConfig, str]:
    """config.json contents -> (ModelConfig, format). Special-token ids come from the tokenizer
    files in `hf_dir`, else config.json, else the preset of the same architecture; one that none of
    them states is refused (`_special_ids`). The name is the matching preset's, else "hf:<dir name>"."""
    where = f"{Path(hf_dir) / CONFIG_NAME}" if hf_dir is not None else CONFIG_NAME
    model_type = config.get("model_type")
    if model_type not in FORMAT_OF_MODEL_TYPE:
        raise ConversionError(
            f"{where}: unknown model_type {model_type!r} (supported: {', '.join(FORMAT_OF_MODEL_TYPE)})"
        )
    fmt, reader = FORMAT_OF_MODEL_TYPE[model_type]
    cfg, stated = reader(config, where)
    preset = matching_preset(cfg)
    ids: dict[str, Any] = _special_ids(config, cfg, stated, preset, Path(hf_dir) if hf_dir else None, where)
    name = preset.name if preset else f"hf:{Path(hf_dir).name if hf_dir else 'model'}"
    if preset is not None and "template" not in config:
        ids["template"] = preset.template
    return cfg.replace(name=name, **ids), fmt


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """The config.json of an HF checkpoint directory."""
    path = Path(hf_dir) / CONFIG_NAME
    if not path.exists():
        raise ConversionError(f"{path}: no config.json (is {hf_dir} an HF checkpoint directory?)")
    config = read_json(path, ConversionError)
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: not a model config (a JSON {type(config).__name__}, not an object)")
    return config


def _llm_config_dicts(cfg: ModelConfig, fmt: str, dtype: torch.dtype, arch: str | None) -> tuple[dict, dict]:
    """(modelled keys, boilerplate keys) of the LLM sub-config."""
    m = cfg.llm
    spec = LLM_SPECS[arch or EXPORT_ARCH[fmt][m.family]]
    fixed_bias = spec.qkv_bias if isinstance(spec.qkv_bias, bool) else None
    if fixed_bias is not None and fixed_bias != m.qkv_bias:
        raise ConversionError(
            f"{spec.architecture} {'always' if fixed_bias else 'never'} has q/k/v biases, "
            f"but this model has qkv_bias={m.qkv_bias}"
        )
    if spec.qk_norm != m.qk_layernorm:
        raise ConversionError(
            f"{spec.architecture} {'always' if spec.qk_norm else 'never'} has per-head QK-norm, "
            f"but this model has qk_layernorm={m.qk_layernorm}"
        )
    d = {
        "model_type": spec.model_type,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "vocab_size": m.vocab_size,
        "rms_norm_eps": m.norm_epsilon,
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": m.tie_word_embeddings,
        **_moe_config_dict(m),
    }
    # bias flags: stated when the class default would be wrong, else only without a template
    defaults = dict(spec.defaults)
    if m.kv_channels is not None and not spec.head_dim:
        raise ConversionError(
            f"{spec.architecture} has no head_dim setting, but this model's heads are "
            f"{m.kv_channels} wide, not hidden_size / num_attention_heads"
        )
    if m.kv_channels is not None or "head_dim" in defaults:  # Qwen3's class default (128) may be wrong
        d["head_dim"] = m.head_dim
    flags = {k: False for k in spec.must_be_false}
    if isinstance(spec.qkv_bias, str):
        flags[spec.qkv_bias] = m.qkv_bias
    d.update({k: v for k, v in flags.items() if defaults.get(k, False) != v})
    boiler = {"hidden_act": "silu", **flags, **dict(spec.extra)}
    if fmt == "transformers":  # transformers 5 spelling
        d.update(rope_parameters={"rope_theta": m.rope_theta, "rope_type": "default"}, dtype=dtype_name(dtype))
    else:  # the transformers 4.x InternVL's remote code runs with
        d.update(architectures=[spec.architecture], rope_theta=m.rope_theta, torch_dtype=dtype_name(dtype))
    return d, boiler


def _vision_config_dicts(cfg: ModelConfig, fmt: str) -> tuple[dict, dict]:
    """(modelled keys, boilerplate keys) of the vision sub-config."""
    v = cfg.vision
    schema = VISION_SCHEMAS[fmt]
    values = {
        "num_layers": v.num_layers,
        "hidden_size": v.hidden_size,
        "num_attention_heads": v.num_attention_heads,
        "ffn_hidden_size": v.ffn_hidden_size,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "qkv_bias": v.qkv_bias,
        "normalization": _NORMS_INV[v.normalization],
        "qk_normalization": v.qk_normalization,
        "layernorm_epsilon": v.layernorm_epsilon,
        "layer_scale_init": v.layer_scale_init,
        "drop_path_rate": v.drop_path_rate,
    }
    modelled = {key: values[f] for f, key in schema.keys.items()}
    return modelled, {key: allowed[0] for key, allowed in schema.fixed.items()}


def _transformers_config(cfg: ModelConfig, dt: torch.dtype, arch: str | None) -> tuple[dict, dict]:
    vision, vision_boiler = _vision_config_dicts(cfg, "transformers")
    vision.update(image_size=[cfg.vision.image_size] * 2, patch_size=[cfg.vision.patch_size] * 2)
    text, text_boiler = _llm_config_dicts(cfg, "transformers", dt, arch)
    modelled = {
        "vision_config": vision,
        "text_config": text,
        "image_token_id": cfg.img_context_token_id,
        "image_seq_length": cfg.num_image_token,
        "downsample_ratio": cfg.downsample_ratio,
        "vision_feature_layer": cfg.vision.select_layer,
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
        "dtype": dtype_name(dt),
    }
    boiler = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": {"model_type": "internvl_vision", **vision_boiler},
        "text_config": text_boiler,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
    }
    return modelled, boiler


def _internvl_config(cfg: ModelConfig, dt: torch.dtype, arch: str | None) -> tuple[dict, dict]:
    vision, vision_boiler = _vision_config_dicts(cfg, "internvl")
    llm, llm_boiler = _llm_config_dicts(cfg, "internvl", dt, arch)
    modelled = {
        "vision_config": vision,
        "llm_config": llm,
        "downsample_ratio": cfg.downsample_ratio,
        "ps_version": cfg.ps_version,
        "select_layer": cfg.vision.select_layer,
        "template": cfg.template,
        "force_image_size": cfg.vision.image_size,
        "torch_dtype": dtype_name(dt),
    }
    boiler = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", **vision_boiler},
        "llm_config": llm_boiler,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "tie_word_embeddings": False,
    }
    return modelled, boiler


# format -> builder of (keys derived from the ModelConfig, boilerplate used only without a template)
_CONFIG_BUILDERS: dict[str, Callable[[ModelConfig, torch.dtype, str | None], tuple[dict, dict]]] = {
    "transformers": _transformers_config,
    "internvl": _internvl_config,
}
MODEL_TYPE_OF_FORMAT = {fmt: mt for mt, (fmt, _) in FORMAT_OF_MODEL_TYPE.items()}
# sub-configs that are merged into a template's rather than replacing it
_SUB_CONFIGS = ("vision_config", "llm_config", "text_config")
_DTYPE_KEYS = ("torch_dtype", "dtype")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any], keep_dtype_spelling: bool) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in over.items():
        if keep_dtype_spelling and key in _DTYPE_KEYS and key not in out:
            continue  # keep the template's spelling of the dtype key
        if key in _SUB_CONFIGS and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, keep_dtype_spelling)
        else:
            out[key] = value
    return out


def _template_arch(cfg: ModelConfig, fmt: str, template: Mapping[str, Any] | None) -> str | None:
    """The template's LLM class if it is of our family (InternLM3 is Llama-shaped: keep its name)."""
    sub = (template or {}).get("llm_config" if fmt == "internvl" else "text_config") or {}
    arch = (sub.get("architectures") or [None])[0] if fmt == "internvl" else TEXT_MODEL_TYPES.get(sub.get("model_type"))
    return arch if arch in LLM_SPECS and LLM_SPECS[arch].family == cfg.llm.family else None


def hf_config_for(cfg: ModelConfig, fmt: str, dtype: torch.dtype, template: Mapping[str, Any] | None = None) -> dict:
    """config.json for `cfg` in format `fmt`. With a template (the config.json the model came from)
    every key derived from the ModelConfig is overwritten and everything else is kept as it was."""
    if fmt not in _CONFIG_BUILDERS:
        raise ConversionError(f"unknown HF format {fmt!r}; choose one of {', '.join(_CONFIG_BUILDERS)}")
    modelled, boiler = _CONFIG_BUILDERS[fmt](cfg, dtype, _template_arch(cfg, fmt, template))
    if template is None:
        return _merge(boiler, modelled, keep_dtype_spelling=False)
    if template.get("model_type") != MODEL_TYPE_OF_FORMAT[fmt]:
        raise ConversionError(
            f"template config.json has model_type {template.get('model_type')!r}, "
            f"format {fmt!r} needs {MODEL_TYPE_OF_FORMAT[fmt]!r}"
        )
    return _merge(template, modelled, keep_dtype_spelling=True)
