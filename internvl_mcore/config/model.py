"""The typed model config tree: vision encoder, projector, language model, special tokens.

Every field has a docstring; presets (presets.py) are plain instances of these classes. The one
place that turns them into megatron-core `TransformerConfig`s is `internvl_mcore.config.megatron`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

from . import pipeline_layout


def padded_vision_heads(num_heads: int, tp: int) -> int:
    """InternViT heads rounded up to a multiple of TP (InternViT-6B has 25; TP 2 -> 26, one zero head)."""
    return -(-num_heads // tp) * tp


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
    """A decoder-only LLM: RMSNorm, SwiGLU, RoPE, GQA (Qwen2/2.5, Llama/InternLM3, InternLM2.5, Qwen3), with
    mixture-of-experts SwiGLU MLPs when `num_experts` > 0 (Qwen3-MoE)."""

    family: Literal["qwen2", "llama", "internlm2", "qwen3", "qwen3_moe"]
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
    qk_layernorm: bool = False
    """RMSNorm over each head's query and key channels (one weight of head_dim shared by all heads),
    after the q/k/v split and before RoPE (Qwen3's q_norm / k_norm; megatron-core's qk_layernorm slot)."""
    kv_channels: Optional[int] = None
    """Channels per attention head when they are not hidden_size / num_attention_heads (Qwen3's
    `head_dim`, Megatron's --kv-channels); None: hidden_size / num_attention_heads."""
    num_experts: int = 0
    """Routed experts per MoE layer (0: a dense model; every decoder layer is MoE otherwise, as in
    Qwen3-MoE with decoder_sparse_step 1 and no mlp_only_layers)."""
    moe_ffn_hidden_size: int = 0
    """SwiGLU inner width of one expert (Qwen3-MoE's moe_intermediate_size)."""
    moe_router_topk: int = 2
    """Experts each token is routed to (num_experts_per_tok); their probabilities are renormalized
    to sum to 1 (Qwen3-MoE's norm_topk_prob)."""
    moe_norm_topk_prob: bool = True
    """Renormalize the top-k routing probabilities to sum to 1 (Qwen3-MoE's norm_topk_prob):
    megatron-core's softmax over the top-k logits; False: top-k of the softmax over all experts."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of megatron-core's per-layer load-balancing loss, summed over layers; from an HF
    config it is router_aux_loss_coef x top-k / layers (docs/moe.md: how this relates to
    transformers' loss)."""

    def __post_init__(self) -> None:
        # one spelling per shape: kv_channels equal to hidden / heads is the default, so configs compare equal
        if self.kv_channels is not None and self.kv_channels * self.num_attention_heads == self.hidden_size:
            object.__setattr__(self, "kv_channels", None)

    @property
    def head_dim(self) -> int:
        """Channels per head (kv_channels, else hidden_size / num_attention_heads)."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        """Whether the decoder's MLPs are mixtures of experts."""
        return self.num_experts > 0


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
        return int(side * side * self.downsample_ratio**2)

    @property
    def projector_input_size(self) -> int:
        """Channels after pixel shuffle: C_vit / downsample_ratio^2."""
        return int(self.vision.hidden_size / self.downsample_ratio**2)

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
    """--cp-split: how CP splits a packed batch: whole rows (row; our ring/a2a kernels) or per sample padded to 2C
    (thd; TE's CP on GPU); auto: thd with TE on CUDA, else row."""
    hierarchical_context_parallel_sizes: Optional[list[int]] = None
    """--hierarchical-context-parallel-sizes A P: with a2a+p2p, all-to-all inside groups of A, ring over P."""
    sequence_parallel: bool = False
    """--sequence-parallel: split norms/dropout activations over the TP group along the sequence."""
    decoder_first_pipeline_num_layers: int | None = None
    """--decoder-first-pipeline-num-layers: fewer decoder layers on stage 0, which carries the ViT."""
    decoder_last_pipeline_num_layers: int | None = None
    """--decoder-last-pipeline-num-layers: decoder layers on the last stage."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """--num-layers-per-virtual-pipeline-stage: decoder layers per model chunk of the interleaved
    (virtual) pipeline schedule; each rank holds (layers / pipeline size) / this many chunks."""
    num_virtual_stages_per_pipeline_rank: int | None = None
    """--num-virtual-stages-per-pipeline-rank: model chunks per pipeline rank of the interleaved
    (virtual) pipeline schedule (the ViT and projector go with the first rank's first chunk)."""
    pipeline_model_parallel_layout: str | None = None
    """--pipeline-model-parallel-layout: the layers of every model chunk, stages split by | in virtual
    order (stage i: pipeline rank i mod PP, chunk i // PP), E = embedding + ViT + projector, t = decoder
    layer, L = output layer + loss, x*N / (..)*N repeats, e.g. "Et|tt|ttt|tL" (PP2: 2 chunks per rank);
    the chunks per rank come from it (config/pipeline_layout.py)."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """--recompute-granularity: activation recomputation (full = whole layers)."""
    recompute_num_layers: int = 1
    """--recompute-num-layers: layers per recomputed chunk (with full/uniform)."""
    expert_model_parallel_size: int = 1
    """--expert-model-parallel-size: ranks the experts of an MoE layer are split over (each holds
    num_experts / EP whole experts; tokens travel to them by all-to-all). Carved out of the
    data-parallel x context-parallel ranks, so it must divide them (times TP / expert TP)."""
    expert_tensor_parallel_size: int | None = None
    """--expert-tensor-parallel-size: ranks each expert's weights are split over (default: the
    tensor-parallel size, megatron-core's default)."""


def virtual_pipeline_size(par: ParallelConfig, num_layers: int) -> int | None:
    """Model chunks per pipeline rank of the interleaved schedule (megatron-core's
    virtual_pipeline_model_parallel_size), None without one; Megatron-LM's rule for the two flags:
    --num-layers-per-virtual-pipeline-stage N gives (num_layers / PP) / N chunks, a
    --pipeline-model-parallel-layout its stage count / PP. One chunk is no
    interleaving (None). The flags' consistency is config/problems.py's `virtual_pipeline_problems`."""
    if par.pipeline_model_parallel_layout is not None:
        size = len(pipeline_layout.stages(par.pipeline_model_parallel_layout)) // par.pipeline_model_parallel_size
    elif par.num_virtual_stages_per_pipeline_rank is not None:
        size = par.num_virtual_stages_per_pipeline_rank
    elif par.num_layers_per_virtual_pipeline_stage is not None:
        size = num_layers // par.pipeline_model_parallel_size // par.num_layers_per_virtual_pipeline_stage
    else:
        return None
    return size if size > 1 else None
