"""The one place the config tree becomes megatron-core `TransformerConfig`s."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from .device import have_apex_wgrad_fusion, have_fusion_kernels, resolve_device
from .model import ModelConfig, ParallelConfig, padded_vision_heads, virtual_pipeline_size
from .training import DEFAULT_COMPUTE, ComputeConfig


@dataclass
class VisionTransformerConfig(TransformerConfig):
    """TransformerConfig plus what InternViT blocks need and megatron-core has no field for."""

    layer_scale_init: float = 0.1
    """Initial value of ls1/ls2."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the last block (linear ramp from 0 over the blocks)."""
    real_attention_heads: int = 0
    """Heads before padding to a multiple of TP; the padded ones are zero (models/vision.py)."""


def _fused(compute: ComputeConfig) -> bool:
    """megatron-core's jit-fused elementwise kernels (torch.compile'd; exact): on CUDA with TE or apex
    importable, or with --torch-compile (inductor's CPU backend compiles them too)."""
    return (resolve_device(compute.device) == "cuda" and have_fusion_kernels()) or compute.torch_compile


def _common(par: ParallelConfig, dtype: torch.dtype, compute: ComputeConfig) -> dict:
    on_cuda = resolve_device(compute.device) == "cuda"
    return dict(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # exact fusions only, and only with CUDA kernels (off on CPU, where the unfused paths run).
        # Bias-activation: the LLM's SwiGLU sets it below; megatron's bias-GELU fusion is the tanh
        # approximation, not InternViT's / the projector's erf GELU, so it stays off for them.
        bias_activation_fusion=False,
        bias_dropout_fusion=_fused(compute),
        masked_softmax_fusion=False,  # our core attention never uses megatron's masked softmax
        # TE's fused RoPE takes one (S, 1, 1, D) angle table for the whole batch; V2PE's per-token
        # float positions need per-row angles (S, B, 1, D), so RoPE stays unfused (models/language.py)
        apply_rope_fusion=False,
        # the local linears (embedding, output layer) need apex's wgrad kernel for this
        gradient_accumulation_fusion=on_cuda and have_apex_wgrad_fusion(),
        persist_layer_norm=False,
        # weights are filled layout-independently by models/weights.py; megatron's own init would
        # draw per-rank random numbers that differ between layouts. On GPU the parameters are
        # allocated directly on the device (no CPU copy of every shard first).
        perform_initialization=False,
        use_cpu_initialization=not on_cuda,
        calculate_per_token_loss=True,
        # megatron-core 0.16's default "full" is deprecated and warns on every build (a second stderr
        # line under a one-line error); [] is the same scope (the whole layer) under its new spelling
        cuda_graph_scope=[],
    )


def vision_transformer_config(
    model: ModelConfig,
    par: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> VisionTransformerConfig:
    """InternViT blocks; all on the first pipeline stage, never context- or sequence-split."""
    v = model.vision
    heads = padded_vision_heads(v.num_attention_heads, par.tensor_model_parallel_size)
    num_layers = v.num_layers if v.select_layer == -1 else v.num_layers + v.select_layer + 1
    cfg = _common(par, dtype, compute)
    return VisionTransformerConfig(
        num_layers=num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=v.head_dim,
        ffn_hidden_size=v.ffn_hidden_size,
        normalization=v.normalization,
        layernorm_epsilon=v.layernorm_epsilon,
        add_bias_linear=True,
        add_qkv_bias=v.qkv_bias,
        gated_linear_unit=False,
        activation_func=F.gelu,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        layer_scale_init=v.layer_scale_init,
        drop_path_rate=v.drop_path_rate,
        real_attention_heads=v.num_attention_heads,
        recompute_granularity=par.recompute_granularity,
        recompute_method="uniform" if par.recompute_granularity == "full" else None,
        recompute_num_layers=par.recompute_num_layers if par.recompute_granularity == "full" else None,
        **cfg,
    )


def projector_transformer_config(
    model: ModelConfig,
    par: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> TransformerConfig:
    """The projector MLP: Linear(4C -> H) -> GELU -> Linear(H -> H), column- then row-parallel."""
    h = model.llm.hidden_size
    return TransformerConfig(
        num_layers=1,
        hidden_size=h,
        ffn_hidden_size=h,
        num_attention_heads=par.tensor_model_parallel_size,  # unused (no attention); TP must divide it
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        **_common(par, dtype, compute),
    )


def llm_transformer_config(
    model: ModelConfig,
    par: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> TransformerConfig:
    """The decoder, split over pipeline stages (optionally fewer layers on stage 0) and, with the
    interleaved schedule, over each stage's model chunks; a --pipeline-model-parallel-layout goes to
    megatron-core as Megatron-LM passes it (the string: megatron-core parses it and places each chunk's
    layers and layer numbers from it)."""
    m = model.llm
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(par, m.num_layers),
        **_interleaved_p2p(virtual_pipeline_size(par, m.num_layers)),
        context_parallel_size=par.context_parallel_size,
        cp_comm_type=par.cp_comm_type,
        hierarchical_context_parallel_sizes=par.hierarchical_context_parallel_sizes,
        sequence_parallel=par.sequence_parallel,
        num_layers_in_first_pipeline_stage=par.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=par.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=par.pipeline_model_parallel_layout,
        recompute_granularity=par.recompute_granularity,
        recompute_method="uniform" if par.recompute_granularity == "full" else None,
        recompute_num_layers=par.recompute_num_layers if par.recompute_granularity == "full" else None,
        **_moe(model, par),
        # bias-free SwiGLU: megatron's fused swiglu is exact
        **{**_common(par, dtype, compute), "bias_activation_fusion": _fused(compute)},
    )


def _interleaved_p2p(chunks: int | None) -> dict:
    """Megatron-LM's pipeline P2P settings for the interleaved schedule: overlapped, unbatched sends
    and receives. Batched, a rank of a 2-stage pipeline posts its activation for the next stage and its
    gradient for the previous one to the same peer in one batch, which receives them in the other order
    (same shapes: silently swapped); unbatched, megatron-core sends the two directions over two groups."""
    return dict(overlap_p2p_comm=True, batch_p2p_comm=False) if chunks else {}


def _moe(model: ModelConfig, par: ParallelConfig) -> dict:
    """megatron-core's MoE settings giving Qwen3-MoE's routing exactly: softmax router in fp32 (as
    transformers computes it), top-k, renormalized top-k probabilities (softmax over the top-k
    logits = p_i / sum of the top-k p), dropless (no capacity factor), load-balancing aux loss.
    Tokens travel by all-to-all over the expert-parallel group (gloo has all_to_all_single)."""
    m = model.llm
    ep, etp = par.expert_model_parallel_size, par.expert_tensor_parallel_size
    if not m.is_moe:
        return dict(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_router_topk=m.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not m.moe_norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_expert_capacity_factor=None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
