"""Tiny HF InternVL checkpoints built offline for the converter and parity tests.

- `tiny_transformers_model`: a transformers `InternVLForConditionalGeneration` with random weights
  (every parameter, including norms and layer scale, is noised so no mapping mistake hides behind
  a default init).
- `write_internvl_dir`: the same weights in InternVL's own (remote-code) layout, written by this
  file's *independent* re-statement of InternVL's module structure (fused `attn.qkv` = [Q; K; V],
  `mlp1.0/1/3`, InternLM2's `wqkv` grouped as its forward unpacks it), so tests can check that our
  key maps send InternVL tensors to the right modules by comparing logits with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from internvl_mcore.config import PRESETS

# the debug presets' special tokens, so converted tiny models are the `debug` / `debug-6b` presets
IMG_START = PRESETS["debug"].img_start_token_id
IMG_END = PRESETS["debug"].img_end_token_id
IMG_CONTEXT = PRESETS["debug"].img_context_token_id
TOKENS_PER_TILE = 4  # (56 / 14)^2 * 0.5^2

VISIONS = {
    # InternViT-300M traits: LayerNorm, qkv bias, no QK-norm
    "300m": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        attention_bias=True,
        norm_type="layer_norm",
        use_qk_norm=False,
    ),
    # InternViT-6B traits: RMSNorm, no qkv bias, QK-norm over all heads, an odd head count
    "6b": dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        attention_bias=False,
        norm_type="rms_norm",
        use_qk_norm=True,
    ),
}
TEXTS = {
    "qwen2": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
    ),
    "llama": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=512,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        attention_bias=False,
        mlp_bias=False,
    ),
    # Qwen3 traits: per-head q_norm / k_norm, no qkv bias, head_dim (32) decoupled from hidden / heads (16)
    "qwen3": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=96,
        vocab_size=512,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        attention_bias=False,
    ),
    # Qwen3-MoE traits (the `debug-moe` preset's shapes): 4 experts, top-2 with renormalized
    # probabilities, every layer MoE, per-head QK-norm; router_aux_loss_coef 0.01 -> megatron-core's
    # per-layer coefficient 0.01 x top-k / layers = 0.01 (convert/hf_config.py: _moe_from)
    "qwen3_moe": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        vocab_size=512,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        attention_bias=False,
    ),
}


def tiny_config(text: str = "qwen2", vision: str = "300m", tie: bool = False, rope_theta: float = 10000.0):
    """An `InternVLConfig` with our debug shapes."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    vc = InternVLVisionConfig(
        image_size=56, patch_size=14, use_mean_pooling=True, layer_norm_eps=1e-6, hidden_act="gelu", **VISIONS[vision]
    )
    text_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}[text]
    tc = text_cls(
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
        tie_word_embeddings=tie,
        hidden_act="silu",
        **TEXTS[text],
    )
    return InternVLConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=IMG_CONTEXT,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=TOKENS_PER_TILE,
        tie_word_embeddings=tie,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Noise every parameter: norms around 1, layer scale around 0.3, the rest around 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "lambda_" in name:
            p.copy_(0.3 + 0.1 * noise)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.05 * noise)


def tiny_transformers_model(text: str = "qwen2", vision: str = "300m", tie: bool = False, seed: int = 0):
    """A random-weight `InternVLForConditionalGeneration` (fp32, eval mode, eager attention)."""
    from transformers import InternVLForConditionalGeneration

    cfg = tiny_config(text, vision, tie)
    cfg._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    return model


def tiny_batch(seed: int = 0, image_size: int = 56) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (2, 24) with 2 tiles in row 0 and 1 tile in row 1, and pixel values (3, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, min(IMG_START, IMG_END, IMG_CONTEXT), (2, 24), generator=g)
    ids[0, 2] = IMG_START
    ids[0, 3 : 3 + 2 * TOKENS_PER_TILE] = IMG_CONTEXT
    ids[0, 3 + 2 * TOKENS_PER_TILE] = IMG_END
    ids[1, 5] = IMG_START
    ids[1, 6 : 6 + TOKENS_PER_TILE] = IMG_CONTEXT
    ids[1, 6 + TOKENS_PER_TILE] = IMG_END
    pixels = torch.randn(3, 3, image_size, image_size, generator=g)
    return ids, pixels


def save_transformers_dir(model, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """`save_pretrained` in `dtype` (transformers' own on-disk layout), with the tokenizer_config.json
    that names the special tokens (a real checkpoint directory has its processor's files)."""
    model.to(dtype).save_pretrained(str(path))
    model.to(torch.float32)
    write_tokenizer_config(path, PRESETS["debug"].pad_token_id)
    return path


def write_tokenizer_config(path: Path, pad_id: int = 0) -> None:
    """The special tokens' ids as a tokenizer_config.json states them (what conversion reads)."""
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "added_tokens_decoder": {
                    str(IMG_START): {"content": "<img>"},
                    str(IMG_END): {"content": "</img>"},
                    str(IMG_CONTEXT): {"content": "<IMG_CONTEXT>"},
                    str(pad_id): {"content": "<pad>"},
                },
                "pad_token": "<pad>",
            }
        )
    )


# --- InternVL's own layout, restated independently ------------------------------------------------


def _internvl_llm_tensors(sd: dict, family: str, text: dict, tie: bool) -> dict:
    """LLM tensors of InternVL's checkpoint from transformers module names (`model.language_model.*`)."""
    out = {}
    n_layers = text["num_hidden_layers"]
    heads, groups = text["num_attention_heads"], text["num_key_value_heads"]
    d = text["hidden_size"] // heads
    lm = "model.language_model."
    if family != "internlm2":
        for k, v in sd.items():
            if k.endswith("mlp.experts.gate_up_proj"):  # transformers 5 fuses experts in memory: (E, 2I, H)
                for e, fused in enumerate(v):
                    gate, up = fused.chunk(2, dim=0)
                    base = "language_model.model." + k[len(lm) : -len("gate_up_proj")] + f"{e}."
                    out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate.contiguous(), up.contiguous()
            elif k.endswith("mlp.experts.down_proj"):  # (E, H, I)
                for e, down in enumerate(v):
                    out["language_model.model." + k[len(lm) : -len("down_proj")] + f"{e}.down_proj.weight"] = (
                        down.contiguous()
                    )
            elif k.startswith(lm):
                out["language_model.model." + k[len(lm) :]] = v
        if not tie:
            out["language_model.lm_head.weight"] = sd["lm_head.weight"]
        return out
    # InternLM2: its attention views wqkv's output as (groups, heads/groups + 2, d): q slots, k, v
    for i in range(n_layers):
        src = f"{lm}layers.{i}."
        dst = f"language_model.model.layers.{i}."
        q = sd[src + "self_attn.q_proj.weight"].reshape(groups, heads // groups, d, -1)
        k = sd[src + "self_attn.k_proj.weight"].reshape(groups, 1, d, -1)
        v = sd[src + "self_attn.v_proj.weight"].reshape(groups, 1, d, -1)
        out[dst + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1]).contiguous()
        out[dst + "attention.wo.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "feed_forward.w1.weight"] = sd[src + "mlp.gate_proj.weight"]
        out[dst + "feed_forward.w3.weight"] = sd[src + "mlp.up_proj.weight"]
        out[dst + "feed_forward.w2.weight"] = sd[src + "mlp.down_proj.weight"]
        out[dst + "attention_norm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = sd[src + "post_attention_layernorm.weight"]
    out["language_model.model.tok_embeddings.weight"] = sd[lm + "embed_tokens.weight"]
    out["language_model.model.norm.weight"] = sd[lm + "norm.weight"]
    if not tie:
        out["language_model.output.weight"] = sd["lm_head.weight"]
    return out


def _internvl_vision_tensors(sd: dict, n_layers: int) -> dict:
    vt = "model.vision_tower."
    out = {
        "vision_model.embeddings.class_embedding": sd[vt + "embeddings.cls_token"],
        "vision_model.embeddings.position_embedding": sd[vt + "embeddings.position_embeddings"],
        "vision_model.embeddings.patch_embedding.weight": sd[vt + "embeddings.patch_embeddings.projection.weight"],
        "vision_model.embeddings.patch_embedding.bias": sd[vt + "embeddings.patch_embeddings.projection.bias"],
    }
    renames = {
        "lambda_1": "ls1",
        "lambda_2": "ls2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "attention.projection_layer": "attn.proj",
        "attention.q_norm": "attn.q_norm",
        "attention.k_norm": "attn.k_norm",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(n_layers):
        src, dst = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        for k, v in sd.items():
            if not k.startswith(src):
                continue
            rest = k[len(src) :]
            for a, b in renames.items():
                if rest.startswith(a):
                    out[dst + b + rest[len(a) :]] = v
        for p in ("weight", "bias"):  # InternViT's qkv Linear output is [Q; K; V]
            parts = [src + f"attention.{x}_proj.{p}" for x in "qkv"]
            if parts[0] in sd:
                out[dst + f"attn.qkv.{p}"] = torch.cat([sd[x] for x in parts], dim=0)
    return out


def internvl_config(hf_config, family: str, tie: bool, dtype: torch.dtype) -> dict:
    """An InternVLChatConfig-style config.json for the same model (as InternVL's configs spell it)."""
    v = hf_config.vision_config
    t = hf_config.text_config
    arch = {
        "qwen2": "Qwen2ForCausalLM",
        "llama": "LlamaForCausalLM",
        "internlm2": "InternLM2ForCausalLM",
        "internlm3": "InternLM3ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
    }[family]
    llm = {
        "architectures": [arch],
        "model_type": {
            "qwen2": "qwen2",
            "llama": "llama",
            "internlm2": "internlm2",
            "internlm3": "internlm3",
            "qwen3": "qwen3",
            "qwen3_moe": "qwen3_moe",
        }[family],
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "vocab_size": t.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_parameters["rope_theta"],
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": tie,
        "torch_dtype": str(dtype).split(".")[-1],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"},
    }
    if family == "internlm2":
        llm.update(
            bias=False, attn_implementation="eager", auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config"}
        )
    if family == "internlm3":
        llm.update(qkv_bias=False, bias=False, head_dim=t.hidden_size // t.num_attention_heads)
    if family == "qwen3":  # InternVL3.5's llm_config: Qwen3Config keys, no RoPE scaling
        llm.update(head_dim=t.head_dim, attention_bias=False, use_sliding_window=False, rope_scaling=None)
    if family == "qwen3_moe":  # InternVL3.5-30B-A3B's llm_config: Qwen3MoeConfig keys (num_experts spelling)
        llm.update(
            head_dim=t.head_dim,
            attention_bias=False,
            use_sliding_window=False,
            rope_scaling=None,
            num_experts=t.num_experts,
            moe_intermediate_size=t.moe_intermediate_size,
            num_experts_per_tok=t.num_experts_per_tok,
            norm_topk_prob=t.norm_topk_prob,
            router_aux_loss_coef=t.router_aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
        )
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "image_size": v.image_size[0],
            "patch_size": v.patch_size[0],
            "qkv_bias": v.attention_bias,
            "qk_normalization": v.use_qk_norm,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps,
            "initializer_factor": 0.1,
            "drop_path_rate": 0.1,
            "hidden_act": "gelu",
            "num_channels": 3,
            "use_flash_attn": False,
            "dropout": 0.0,
        },
        "llm_config": llm,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "force_image_size": v.image_size[0],
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "torch_dtype": str(dtype).split(".")[-1],
        "some_unmodelled_key": [1, 2, 3],
    }


def write_internvl_dir(
    model, path: Path, family: str = "qwen2", dtype: torch.dtype = torch.float32, shards: int = 2
) -> Path:
    """Write `model`'s weights in InternVL's layout (+ config.json, a stand-in remote-code file and
    tokenizer config). `family` "internlm2" repacks a Llama-style text model as InternLM2."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tie = bool(cfg.tie_word_embeddings)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    t = cfg.text_config
    text = dict(
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        hidden_size=t.hidden_size,
    )
    tensors = _internvl_vision_tensors(sd, cfg.vision_config.num_hidden_layers)
    for ours, theirs in (("mlp1.0", "layer_norm"), ("mlp1.1", "linear_1"), ("mlp1.3", "linear_2")):
        for p in ("weight", "bias"):
            tensors[f"{ours}.{p}"] = sd[f"model.multi_modal_projector.{theirs}.{p}"]
    tensors.update(_internvl_llm_tensors(sd, family, text, tie))
    names = sorted(tensors)
    chunks = [names[k::shards] for k in range(shards)]
    weight_map = {}
    for k, chunk in enumerate(chunks):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(internvl_config(cfg, family, tie, dtype), indent=2))
    (path / "modeling_internvl_chat.py").write_text("# stand-in for InternVL's remote code\n")
    write_tokenizer_config(path)
    return path
