"""The typed model config tree: vision encoder, projector, language model, special tokens.

Every field has a docstring; presets (presets.py) are plain instances of these classes. The one
place that turns them into megatron-core `TransformerConfig`s is `internvl_mcore.config.megatron`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Rows of the embedding / output layer: the vocabulary rounded up to a multiple of lcm(128, TP).

    megatron-core splits rows evenly over TP. Megatron-LM pads to 128 x TP, which makes the tensor
    shape depend on the layout; lcm(128, TP) is the same for every TP dividing 128, so checkpoints
    reshard freely between them. Padded rows never win: their logits are -inf (models/language.py)."""
    multiple = 128 * tp // math.gcd(128, tp)
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class VisionConfig:
    """InternViT: patch conv + class token + learned positions, pre-norm blocks with layer scale."""

    num_layers: int
    """Transformer blocks kept (InternVL drops the last ones of InternViT-6B: 45 of 48)."""
    hidden_size: int
    """Width C of the encoder."""
    num_attention_heads: int
    """Real attention heads; padded up to a multiple of TP with zero heads (see models/vision.py)."""
    ffn_hidden_size: int
    """MLP inner width (fc1 output)."""
    image_size: int = 448
    """Tile side in pixels; position embeddings are interpolated for other sizes."""
    patch_size: int = 14
    """Side of the square patch the stride-`patch_size` conv embeds."""
    qkv_bias: bool = True
    """Bias on the fused qkv projection (InternViT-300M: yes, 6B: no)."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """Norm used before attention and MLP (300M: LayerNorm, 6B: RMSNorm)."""
    qk_normalization: bool = False
    """RMSNorm over the full (all-heads) query and key vectors (InternViT-6B)."""
    layernorm_epsilon: float = 1e-6
    """Epsilon of every vision norm."""
    layer_scale_init: float = 0.1
    """Initial value of the layer-scale vectors ls1/ls2 (used only for fresh weights)."""
    drop_path_rate: float = 0.0
    """Stochastic-depth rate of the last block; block i uses rate * i / (num_layers - 1)."""
    select_layer: int = -1
    """Which block's output feeds the projector (-1: the last). Blocks after it are not built."""

    @property
    def head_dim(self) -> int:
        """Channels per head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per tile at `image_size`."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LLMConfig:
    """A decoder-only LLM: RMSNorm, SwiGLU, RoPE, GQA (Qwen2/2.5, Llama/InternLM3, InternLM2.5)."""

    family: Literal["qwen2", "llama", "internlm2"]
    """Checkpoint layout of the HF model; selects the converter key map, never a code path here."""
    num_layers: int
    """Decoder layers."""
    hidden_size: int
    """Model width H."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups)."""
    ffn_hidden_size: int
    """SwiGLU inner width."""
    vocab_size: int
    """Rows of the embedding / output layer (padded to a multiple of TP when sharded)."""
    qkv_bias: bool = True
    """Bias on q, k, v projections (Qwen2: yes; Llama/InternLM: no)."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Output layer shares the embedding matrix (the InternVL3 presets do not; the debug-6b preset does)."""
    max_position_embeddings: int = 32768
    """Longest sequence the RoPE table is built for."""

    @property
    def head_dim(self) -> int:
        """Channels per head."""
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    """A whole InternVL model: InternViT -> pixel shuffle -> MLP projector -> LLM."""

    name: str
    """Preset name (`--model`)."""
    vision: VisionConfig
    """The vision encoder."""
    llm: LLMConfig
    """The language model."""
    downsample_ratio: float = 0.5
    """Pixel-shuffle ratio: each side shrinks by it, channels grow by 1/ratio^2."""
    ps_version: Literal["v2"] = "v2"
    """Pixel-shuffle variant (InternVL's v2 transposes back after shuffling)."""
    template: str = "internvl2_5"
    """Chat template the data is rendered with."""
    img_context_token_id: int = 151667
    """Id of `<IMG_CONTEXT>`, replaced by image features."""
    img_start_token_id: int = 151665
    """Id of `<img>`."""
    img_end_token_id: int = 151666
    """Id of `</img>`."""
    pad_token_id: int = 151643
    """Id used to pad packs up to the sequence length (never a target)."""
    projector_layernorm_epsilon: float = 1e-5
    """Epsilon of the projector's LayerNorm (torch's default, as InternVL builds it)."""

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (image_size / patch)^2 * downsample_ratio^2 (256 for 448/14/0.5)."""
        side = self.vision.image_size // self.vision.patch_size
        return int(side * side * self.downsample_ratio ** 2)

    @property
    def projector_input_size(self) -> int:
        """Channels after pixel shuffle: C_vit / downsample_ratio^2."""
        return int(self.vision.hidden_size / self.downsample_ratio ** 2)

    def replace(self, **changes: object) -> "ModelConfig":
        """A copy with top-level fields changed (`vision=` / `llm=` take whole sub-configs)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over ranks (Megatron-LM flag names in the comments)."""

    tensor_model_parallel_size: int = 1
    """--tensor-model-parallel-size: ranks a layer's weights are split over."""
    pipeline_model_parallel_size: int = 1
    """--pipeline-model-parallel-size: stages the decoder layers are split over."""
    context_parallel_size: int = 1
    """--context-parallel-size: ranks one sequence is split over (LLM only; the ViT is not split)."""
    cp_comm_type: Literal["p2p", "a2a", "a2a+p2p"] = "p2p"
    """--cp-comm-type: ring attention (p2p), head-parallel all-to-all (a2a), or both in 2D (a2a+p2p)."""
    cp_split: Literal["auto", "row", "thd"] = "auto"
    """--cp-split: how CP splits a packed batch: whole rows (row; our ring/a2a kernels) or per sample padded to 2C (thd; TE's CP on GPU); auto: thd with TE on CUDA, else row."""
    hierarchical_context_parallel_sizes: Optional[list[int]] = None
    """--hierarchical-context-parallel-sizes A P: with a2a+p2p, all-to-all inside groups of A, ring over P."""
    sequence_parallel: bool = False
    """--sequence-parallel: split norms/dropout activations over the TP group along the sequence."""
    decoder_first_pipeline_num_layers: int | None = None
    """--decoder-first-pipeline-num-layers: fewer decoder layers on stage 0, which carries the ViT."""
    decoder_last_pipeline_num_layers: int | None = None
    """--decoder-last-pipeline-num-layers: decoder layers on the last stage."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """--recompute-granularity: activation recomputation (full = whole layers)."""
    recompute_num_layers: int = 1
    """--recompute-num-layers: layers per recomputed chunk (with full/uniform)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """--device: cuda when available; auto refuses a GPU-looking machine without CUDA (use cpu to force the CPU path; docs/gpu.md)."""
    extra: dict = field(default_factory=dict, compare=False)
    """Reserved for backend-specific knobs (e.g. cp_comm_type); not read by the CPU path."""
