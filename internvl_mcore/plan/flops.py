"""Model FLOPs of a training step: the number the training log's MFU divides by.

Counted as the matrix multiplications of the released model (real heads, real vocabulary; no
padding, no recomputation): 2 FLOPs per multiply-add in the forward pass, and 3x forward for
forward + backward (the backward does two matmuls per forward matmul: input and weight gradient).

    ViT, per tile of N = (448/14)^2 patches + 1 class token, per block:
        qkv 2*N*C*3C, proj 2*N*C*C, fc1/fc2 2*2*N*C*F_v, attention 2*2*N*N*C (bidirectional),
        + the patch embedding conv 2*patches*C*3*14*14 per tile
    projector, per image token (256 per tile): 2*4C*H + 2*H*H
    LLM, per token and layer: qkv 2*H*(n_q + 2*n_kv)*d, proj 2*n_q*d*H, SwiGLU 2*3*H*F
        (MoE: the k experts a token is routed to, 2*3*H*F_moe*k, plus the router 2*H*E: the
        *active* parameters, not all experts);
        causal attention 2*2*n_q*d per (query, key) pair, i.e. L*(L+1)/2 pairs per packed sample;
        LM head 2*H*V per token

Norms, softmax, activations and the embedding lookup are not counted (they are not matmuls).
Frozen parts count only the passes they run (`pass_multipliers`); recomputation is never counted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Optional, Sequence

from ..config.model import ModelConfig


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward-pass FLOPs by component."""

    vit_linear: float = 0.0
    vit_attention: float = 0.0
    vit_patch_embed: float = 0.0
    projector: float = 0.0
    llm_linear: float = 0.0
    llm_attention: float = 0.0
    lm_head: float = 0.0

    @property
    def forward(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def train(self) -> float:
        """Forward + backward: 3x forward."""
        return 3.0 * self.forward

    def step(self, trainable: Optional[Iterable[str]] = None) -> float:
        """Forward + backward with frozen parts costing only what they run (`pass_multipliers`)."""
        k = pass_multipliers(trainable)
        vit = self.vit_linear + self.vit_attention + self.vit_patch_embed
        llm = self.llm_linear + self.llm_attention + self.lm_head
        return k["vision"] * vit + k["projector"] * self.projector + k["llm"] * llm


def pass_multipliers(trainable: Optional[Iterable[str]] = None, recompute: bool = False) -> dict[str, float]:
    """Forward-pass multiples each part costs in a training step: 3 when its weights train
    (forward, input gradient, weight gradient), 2 for a frozen part that still passes gradients back
    to a trained part before it (forward + input gradient), 1 for a frozen part with nothing
    trainable before it (forward only). Full recompute adds one forward to parts that backprop.
    None: everything trains."""
    t = set(trainable) if trainable is not None else {"vision", "projector", "llm"}
    extra = 1.0 if recompute else 0.0
    vision = 3.0 + extra if "vision" in t else 1.0
    projector = 3.0 if "projector" in t else (2.0 if "vision" in t else 1.0)
    upstream = bool({"vision", "projector"} & t)
    llm = 3.0 + extra if {"llm", "lora"} & t else (2.0 + extra if upstream else 1.0)
    return {"vision": vision, "projector": projector, "llm": llm}


def causal_pairs(lengths: Sequence[int]) -> int:
    """(query, key) pairs a causal mask allows over packed samples: sum of L*(L+1)/2."""
    return sum(n * (n + 1) // 2 for n in lengths)


def forward_flops(
    model: ModelConfig,
    tokens: int,
    tiles: int,
    attention_lengths: Optional[Sequence[int]] = None,
    seq_length: Optional[int] = None,
    causal: bool = True,
    lm_head_tokens: Optional[int] = None,
) -> FlopBreakdown:
    """Forward FLOPs of `tokens` LLM tokens and `tiles` image tiles (see the module docstring).

    attention_lengths: lengths of the causally attending samples (packed samples; they must add up
    to `tokens`). Without them the tokens are `tokens / seq_length` whole sequences of seq_length.
    causal=False counts every (query, key) pair of each sample (what torch's FlopCounterMode
    counts for scaled_dot_product_attention, which ignores the mask). lm_head_tokens: the tokens
    whose logits are computed (default: all; the training step computes them only at the tokens that
    carry loss unless --all-token-logits)."""
    v, m = model.vision, model.llm
    if attention_lengths is None:
        if seq_length is None:
            raise ValueError("forward_flops needs attention_lengths or seq_length")
        if tokens % seq_length:
            raise ValueError(f"{tokens} tokens are not whole sequences of {seq_length}")
        attention_lengths = [seq_length] * (tokens // seq_length)
    if sum(attention_lengths) != tokens:
        raise ValueError(f"attention_lengths add up to {sum(attention_lengths)}, not {tokens} tokens")

    c, fv = v.hidden_size, v.ffn_hidden_size
    patches = v.num_patches
    n = patches + 1
    cv = v.num_attention_heads * v.head_dim  # real heads only
    vit_layers = v.num_layers if v.select_layer == -1 else v.num_layers + v.select_layer + 1
    vit_linear = tiles * vit_layers * 2 * n * (c * 3 * cv + cv * c + 2 * c * fv)
    vit_attention = tiles * vit_layers * 2 * 2 * n * n * cv
    patch_embed = tiles * 2 * patches * c * 3 * v.patch_size**2

    h = m.hidden_size
    projector = tiles * model.num_image_token * 2 * (model.projector_input_size * h + h * h)

    d, nq, nkv = m.head_dim, m.num_attention_heads, m.num_query_groups
    mlp = (
        (3 * h * m.moe_ffn_hidden_size * m.moe_router_topk + h * m.num_experts)
        if m.is_moe
        else 3 * h * m.ffn_hidden_size
    )
    llm_linear = tokens * m.num_layers * 2 * (h * (nq + 2 * nkv) * d + nq * d * h + mlp)
    pairs = causal_pairs(attention_lengths) if causal else sum(n_ * n_ for n_ in attention_lengths)
    llm_attention = m.num_layers * 2 * 2 * nq * d * pairs
    lm_head = (tokens if lm_head_tokens is None else lm_head_tokens) * 2 * h * m.vocab_size
    return FlopBreakdown(
        vit_linear=vit_linear,
        vit_attention=vit_attention,
        vit_patch_embed=patch_embed,
        projector=projector,
        llm_linear=llm_linear,
        llm_attention=llm_attention,
        lm_head=lm_head,
    )


def train_step_flops(
    model: ModelConfig,
    tokens_per_step: int,
    tiles_per_step: int,
    attention_lengths: Optional[Sequence[int]] = None,
    seq_length: Optional[int] = None,
    trainable: Optional[Iterable[str]] = None,
    lm_head_tokens: Optional[int] = None,
) -> float:
    """Model FLOPs of one optimizer step (forward + backward = 3x forward), over the whole job.

    tokens_per_step: LLM tokens of the global batch (global batch size x sequence length, padding
    included: the pad tokens are computed too); tiles_per_step: image tiles of the global batch;
    attention_lengths: the packed samples' lengths in the step (pads as their own sample), or
    seq_length to treat each sequence as one causal sample.
    trainable: the parts that train ('vision', 'projector', 'llm', 'lora'); None = all, i.e. the
    usual 3x forward. A frozen ViT counts its forward only, a frozen LLM forward + input gradient.
    lm_head_tokens: tokens of the step whose logits are computed (None: all of them).

    MFU = train_step_flops / (step_time * peak FLOP/s per GPU * GPUs)."""
    return forward_flops(
        model, tokens_per_step, tiles_per_step, attention_lengths, seq_length, lm_head_tokens=lm_head_tokens
    ).step(trainable)
