"""Model presets as data: the shapes of the released InternVL2.5, InternVL3 and InternVL3.5 (dense)
models plus tiny debug models.

Shapes are those of the released checkpoints' config.json (vision_config / llm_config); the test
suite checks every preset's parameter count against the published model size (tests/plan). A
preset is a shortcut: `--model DIR` reads the same from any checkpoint directory (convert/source.py).
"""

from __future__ import annotations

from ..errors import ConfigError
from .model import LLMConfig, ModelConfig, VisionConfig

INTERNVIT_300M = VisionConfig(
    num_layers=24,
    hidden_size=1024,
    num_attention_heads=16,
    ffn_hidden_size=4096,
    qkv_bias=True,
    normalization="LayerNorm",
    qk_normalization=False,
)
INTERNVIT_6B = VisionConfig(
    num_layers=45,
    hidden_size=3200,
    num_attention_heads=25,
    ffn_hidden_size=12800,
    qkv_bias=False,
    normalization="RMSNorm",
    qk_normalization=True,
)

_QWEN_VOCAB = 151674  # Qwen2.5's tokenizer plus InternVL's added tokens, as in InternVL3's configs

# InternVL3-1B/2B untie the output layer (their llm_config keeps Qwen2Config's default False, and the
# released sizes, 0.94B and 2.09B, count a separate lm_head), unlike the text-only Qwen2.5-0.5B/1.5B.
QWEN25_0_5B = LLMConfig(
    family="qwen2",
    num_layers=24,
    hidden_size=896,
    num_attention_heads=14,
    num_query_groups=2,
    ffn_hidden_size=4864,
    vocab_size=_QWEN_VOCAB,
    tie_word_embeddings=False,
)
QWEN25_1_5B = LLMConfig(
    family="qwen2",
    num_layers=28,
    hidden_size=1536,
    num_attention_heads=12,
    num_query_groups=2,
    ffn_hidden_size=8960,
    vocab_size=_QWEN_VOCAB,
    tie_word_embeddings=False,
)
QWEN25_7B = LLMConfig(
    family="qwen2",
    num_layers=28,
    hidden_size=3584,
    num_attention_heads=28,
    num_query_groups=4,
    ffn_hidden_size=18944,
    vocab_size=_QWEN_VOCAB,
)
QWEN25_14B = LLMConfig(
    family="qwen2",
    num_layers=48,
    hidden_size=5120,
    num_attention_heads=40,
    num_query_groups=8,
    ffn_hidden_size=13824,
    vocab_size=_QWEN_VOCAB,
)
QWEN25_32B = LLMConfig(
    family="qwen2",
    num_layers=64,
    hidden_size=5120,
    num_attention_heads=40,
    num_query_groups=8,
    ffn_hidden_size=27648,
    vocab_size=_QWEN_VOCAB,
)
QWEN25_72B = LLMConfig(
    family="qwen2",
    num_layers=80,
    hidden_size=8192,
    num_attention_heads=64,
    num_query_groups=8,
    ffn_hidden_size=29568,
    vocab_size=_QWEN_VOCAB,
)
INTERNLM3_8B = LLMConfig(
    family="llama",
    num_layers=48,
    hidden_size=4096,
    num_attention_heads=32,
    num_query_groups=2,
    ffn_hidden_size=10240,
    vocab_size=128512,
    qkv_bias=False,
    rope_theta=50_000_000.0,
    norm_epsilon=1e-5,
)

# InternLM2.5 (InternVL2.5-2B/8B/26B): InternLM2 layout, RoPE base 1e6, vocabulary 92544 + InternVL's 9 tokens
_INTERNLM2_VOCAB = 92553
INTERNLM25_1_8B = LLMConfig(
    family="internlm2",
    num_layers=24,
    hidden_size=2048,
    num_attention_heads=16,
    num_query_groups=8,
    ffn_hidden_size=8192,
    vocab_size=_INTERNLM2_VOCAB,
    qkv_bias=False,
    norm_epsilon=1e-5,
)
INTERNLM25_7B = LLMConfig(
    family="internlm2",
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=14336,
    vocab_size=_INTERNLM2_VOCAB,
    qkv_bias=False,
    norm_epsilon=1e-5,
)
INTERNLM25_20B = LLMConfig(
    family="internlm2",
    num_layers=48,
    hidden_size=6144,
    num_attention_heads=48,
    num_query_groups=8,
    ffn_hidden_size=16384,
    vocab_size=_INTERNLM2_VOCAB,
    qkv_bias=False,
    norm_epsilon=1e-5,
)
QWEN25_3B = LLMConfig(
    family="qwen2",
    num_layers=36,
    hidden_size=2048,
    num_attention_heads=16,
    num_query_groups=2,
    ffn_hidden_size=11008,
    vocab_size=_QWEN_VOCAB,
    tie_word_embeddings=False,
)


def _qwen3(layers: int, hidden: int, heads: int, ffn: int) -> LLMConfig:
    """A Qwen3 dense LLM as InternVL3.5 ships it: 8 KV heads of 128 channels (decoupled from hidden / heads),
    per-head QK-norm, no qkv bias, RoPE base 1e6, an untied output layer (the published InternVL3.5-1B/2B/4B
    language sizes, 0.8B/2.0B/4.4B, count a separate lm_head, unlike the text-only Qwen3-0.6B/1.7B/4B)."""
    return LLMConfig(
        family="qwen3",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=8,
        ffn_hidden_size=ffn,
        vocab_size=151936,
        qkv_bias=False,
        qk_layernorm=True,
        kv_channels=128,
        max_position_embeddings=40960,
    )


QWEN3_0_6B = _qwen3(28, 1024, 16, 3072)
QWEN3_1_7B = _qwen3(28, 2048, 16, 6144)
QWEN3_4B = _qwen3(36, 2560, 32, 9728)
QWEN3_8B = _qwen3(36, 4096, 32, 12288)
QWEN3_14B = _qwen3(40, 5120, 40, 17408)
QWEN3_32B = _qwen3(64, 5120, 64, 25600)


def _qwen3_moe(layers: int, hidden: int, heads: int, ffn: int, moe_ffn: int) -> LLMConfig:
    """A Qwen3-MoE LLM as InternVL3.5-30B-A3B / 241B-A28B ship it (Qwen3-30B-A3B / 235B-A22B's
    config.json): Qwen3 attention with 4 KV heads of 128 channels, every layer MoE with 128 experts,
    top-8 with renormalized probabilities, router_aux_loss_coef 0.001 (-> 0.001 x 8 / layers per
    layer in megatron-core's convention, convert/hf_config.py: _moe_from)."""
    return LLMConfig(
        family="qwen3_moe",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=4,
        ffn_hidden_size=ffn,
        vocab_size=151936,
        qkv_bias=False,
        qk_layernorm=True,
        kv_channels=128,
        max_position_embeddings=40960,
        num_experts=128,
        moe_ffn_hidden_size=moe_ffn,
        moe_router_topk=8,
        moe_norm_topk_prob=True,
        moe_aux_loss_coeff=0.001 * 8 / layers,
    )


QWEN3_30B_A3B = _qwen3_moe(48, 2048, 32, 6144, 768)
QWEN3_235B_A22B = _qwen3_moe(94, 4096, 64, 12288, 1536)

_QWEN_IDS = dict(img_context_token_id=151667, img_start_token_id=151665, img_end_token_id=151666, pad_token_id=151643)
_INTERNLM3_IDS = dict(img_context_token_id=128003, img_start_token_id=128001, img_end_token_id=128002, pad_token_id=2)
# InternLM2's tokenizer ends at 92543; InternVL appends <img>, </img>, <IMG_CONTEXT>, ...; pad is </s>
_INTERNLM2_IDS = dict(img_context_token_id=92546, img_start_token_id=92544, img_end_token_id=92545, pad_token_id=2)
# Qwen3's tokenizer ends at </think> 151668; InternVL appends its tokens after it; pad is <|endoftext|>
_QWEN3_IDS = dict(img_context_token_id=151671, img_start_token_id=151669, img_end_token_id=151670, pad_token_id=151643)

# Tiny models for tests and the CPU demo: 56-pixel tiles (16 patches, 4 LLM tokens per tile).
DEBUG_VISION = VisionConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, image_size=56)
DEBUG_LLM = LLMConfig(
    family="qwen2",
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=512,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
# the ids `data.synthetic.train_tiny_tokenizer(texts, dir, vocab_size=500)` gives its chat tokens
# (<|endoftext|> 500, <|im_start|> 501, <|im_end|> 502, <img> 503, </img> 504, <IMG_CONTEXT> 505)
_DEBUG_IDS = dict(img_context_token_id=505, img_start_token_id=503, img_end_token_id=504, pad_token_id=500)

# A "few hundred MB" model (66M parameters, 0.26 GB in fp32) for CPU throughput work
# (bench/train_throughput.py): InternViT-300M-style blocks at 224-pixel tiles (64 LLM tokens per
# tile) and a Qwen2-style GQA LLM with a 32k vocabulary, so the output layer weighs what it does in
# real models. Sized so that a 4096-token train step (~1.4 TFLOP) takes tens of seconds on 2 CPU
# cores. The chat-token ids are the tiny tokenizer's (as `debug`), so shards built with it, e.g.
# from `data.digits.build_digits_dataset(root, image_size=224)`, train this model too.
DEBUG_M_VISION = VisionConfig(
    num_layers=4, hidden_size=384, num_attention_heads=6, ffn_hidden_size=1536, image_size=224
)
DEBUG_M_LLM = LLMConfig(
    family="qwen2",
    num_layers=8,
    hidden_size=512,
    num_attention_heads=8,
    num_query_groups=2,
    ffn_hidden_size=1536,
    vocab_size=32000,
    max_position_embeddings=8192,
)

PRESETS: dict[str, ModelConfig] = {
    "debug": ModelConfig(name="debug", vision=DEBUG_VISION, llm=DEBUG_LLM, **_DEBUG_IDS),
    # InternViT-6B traits (RMSNorm, QK-norm, no qkv bias, a head count TP must pad) on a
    # Llama-style LLM without qkv bias and with tied embeddings.
    "debug-6b": ModelConfig(
        name="debug-6b",
        vision=VisionConfig(
            num_layers=2,
            hidden_size=48,
            num_attention_heads=3,
            ffn_hidden_size=96,
            image_size=56,
            qkv_bias=False,
            normalization="RMSNorm",
            qk_normalization=True,
        ),
        llm=LLMConfig(
            family="llama",
            num_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=96,
            vocab_size=512,
            qkv_bias=False,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
        **_DEBUG_IDS,
    ),
    # Qwen3-MoE traits at debug size: 4 experts, top-2, every layer MoE, per-head QK-norm, no qkv bias.
    "debug-moe": ModelConfig(
        name="debug-moe",
        vision=DEBUG_VISION,
        llm=LLMConfig(
            family="qwen3_moe",
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=512,
            qkv_bias=False,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            num_experts=4,
            moe_ffn_hidden_size=32,
            moe_router_topk=2,
            moe_aux_loss_coeff=0.01,
            qk_layernorm=True,
        ),
        **_DEBUG_IDS,
    ),
    "debug-m": ModelConfig(name="debug-m", vision=DEBUG_M_VISION, llm=DEBUG_M_LLM, **_DEBUG_IDS),
    # InternVL3.5-38B traits at debug size: InternViT-6B-style vision (full-width QK-norm, padded
    # heads) on a Qwen3 LLM (per-head QK-norm, no qkv bias, head_dim 32 decoupled from 64 / 4 heads).
    "debug-qwen3": ModelConfig(
        name="debug-qwen3",
        vision=VisionConfig(
            num_layers=2,
            hidden_size=48,
            num_attention_heads=3,
            ffn_hidden_size=96,
            image_size=56,
            qkv_bias=False,
            normalization="RMSNorm",
            qk_normalization=True,
        ),
        llm=LLMConfig(
            family="qwen3",
            num_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=96,
            vocab_size=512,
            qkv_bias=False,
            qk_layernorm=True,
            kv_channels=32,
            rope_theta=10000.0,
            max_position_embeddings=4096,
        ),
        **_DEBUG_IDS,
    ),
    "internvl3-1b": ModelConfig(name="internvl3-1b", vision=INTERNVIT_300M, llm=QWEN25_0_5B, **_QWEN_IDS),
    "internvl3-2b": ModelConfig(name="internvl3-2b", vision=INTERNVIT_300M, llm=QWEN25_1_5B, **_QWEN_IDS),
    "internvl3-8b": ModelConfig(name="internvl3-8b", vision=INTERNVIT_300M, llm=QWEN25_7B, **_QWEN_IDS),
    "internvl3-9b": ModelConfig(name="internvl3-9b", vision=INTERNVIT_300M, llm=INTERNLM3_8B, **_INTERNLM3_IDS),
    "internvl3-14b": ModelConfig(name="internvl3-14b", vision=INTERNVIT_300M, llm=QWEN25_14B, **_QWEN_IDS),
    "internvl3-38b": ModelConfig(name="internvl3-38b", vision=INTERNVIT_6B, llm=QWEN25_32B, **_QWEN_IDS),
    "internvl3-78b": ModelConfig(name="internvl3-78b", vision=INTERNVIT_6B, llm=QWEN25_72B, **_QWEN_IDS),
    # InternVL2.5 (2024-12): the same vision encoders (InternViT-*-448px-V2_5 have the V1.5 shapes);
    # 1B, 38B and 78B have the shapes of InternVL3-1B/38B/78B (a checkpoint of either reads as InternVL3's)
    "internvl2.5-1b": ModelConfig(name="internvl2.5-1b", vision=INTERNVIT_300M, llm=QWEN25_0_5B, **_QWEN_IDS),
    "internvl2.5-2b": ModelConfig(name="internvl2.5-2b", vision=INTERNVIT_300M, llm=INTERNLM25_1_8B, **_INTERNLM2_IDS),
    "internvl2.5-4b": ModelConfig(name="internvl2.5-4b", vision=INTERNVIT_300M, llm=QWEN25_3B, **_QWEN_IDS),
    "internvl2.5-8b": ModelConfig(name="internvl2.5-8b", vision=INTERNVIT_300M, llm=INTERNLM25_7B, **_INTERNLM2_IDS),
    "internvl2.5-26b": ModelConfig(name="internvl2.5-26b", vision=INTERNVIT_6B, llm=INTERNLM25_20B, **_INTERNLM2_IDS),
    "internvl2.5-38b": ModelConfig(name="internvl2.5-38b", vision=INTERNVIT_6B, llm=QWEN25_32B, **_QWEN_IDS),
    "internvl2.5-78b": ModelConfig(name="internvl2.5-78b", vision=INTERNVIT_6B, llm=QWEN25_72B, **_QWEN_IDS),
    # InternVL3.5 dense (2025-08): Qwen3 LLMs; chat template internvl2_5 (its SFT scripts' --conv_style)
    "internvl3.5-1b": ModelConfig(name="internvl3.5-1b", vision=INTERNVIT_300M, llm=QWEN3_0_6B, **_QWEN3_IDS),
    "internvl3.5-2b": ModelConfig(name="internvl3.5-2b", vision=INTERNVIT_300M, llm=QWEN3_1_7B, **_QWEN3_IDS),
    "internvl3.5-4b": ModelConfig(name="internvl3.5-4b", vision=INTERNVIT_300M, llm=QWEN3_4B, **_QWEN3_IDS),
    "internvl3.5-8b": ModelConfig(name="internvl3.5-8b", vision=INTERNVIT_300M, llm=QWEN3_8B, **_QWEN3_IDS),
    "internvl3.5-14b": ModelConfig(name="internvl3.5-14b", vision=INTERNVIT_300M, llm=QWEN3_14B, **_QWEN3_IDS),
    "internvl3.5-38b": ModelConfig(name="internvl3.5-38b", vision=INTERNVIT_6B, llm=QWEN3_32B, **_QWEN3_IDS),
    # InternVL3.5 MoE: Qwen3-MoE LLMs (3B / 22B active parameters of the LLM)
    "internvl3.5-30b-a3b": ModelConfig(
        name="internvl3.5-30b-a3b", vision=INTERNVIT_300M, llm=QWEN3_30B_A3B, **_QWEN3_IDS
    ),
    "internvl3.5-241b-a28b": ModelConfig(
        name="internvl3.5-241b-a28b", vision=INTERNVIT_6B, llm=QWEN3_235B_A22B, **_QWEN3_IDS
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
