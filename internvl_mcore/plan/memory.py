"""Bytes a rank holds while training: model state (parameters, gradients, optimizer) and activations.

Model state is modelled on what megatron-core 0.16 really allocates, so it can be checked exactly
(`tests/plan/test_state_bytes.py` builds models and compares byte for byte):

- `DistributedDataParallel` puts every *trainable* parameter's gradient in one flat buffer per
  (param dtype, grad dtype) (`distributed/param_and_grad_buffer.py`), fp32 here because the
  training loop sets `grad_reduce_in_fp32=True`. Without the distributed optimizer the buffer is
  exactly the trainable numel. With it, each parameter's start is padded to a multiple of 64
  elements and each bucket's end to a multiple of lcm(DP, 128), so the buffer shards evenly over
  DP; the parameters are then re-homed into an equally padded param buffer.
- Adam keeps exp_avg and exp_avg_sq per trainable element in fp32 (the main-param dtype); for
  bf16 training a fp32 master copy too. The plain optimizer keeps them for every local trainable
  element; the distributed optimizer (`optimizer/distrib_optimizer.py`) only for the elements of
  its 1/DP slice of each bucket (padding excluded).
- torch.optim.AdamW (the CPU fallback when neither transformer-engine nor apex is installed) also
  keeps a 4-byte `step` tensor per parameter tensor; TE/apex FusedAdam keep it per group. That is
  `adam_step_bytes` (0 for GPU plans, 4 to match the CPU test exactly).

Activations follow the tensors the layers save for backward (see `llm_layer_bytes`, `vit_layer_bytes`), per
microbatch, times the microbatches a 1F1B pipeline keeps in flight on the stage.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Literal, Optional, Sequence

from ..config.lora import LoRAConfig
from ..config.model import ModelConfig, ParallelConfig, virtual_pipeline_size
from .stages import interleaved_in_flight
from .params import (
    PARTS,
    ParamSpec,
    decoder_layers_per_stage,
    shape_key,
    padded_vision_heads,
    padded_vocab,
    stage_params,
    vision_layers_built,
)

GiB = 1024**3

Kernels = Literal["gpu", "cpu"]
"""Which kernels save what: 'gpu' = transformer-engine norms + flash attention (O(S) memory);
'cpu' = torch's composite RMSNorm (attention is flash-style on both, see `_attention_bytes`)."""


# --- model state ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradBuffer:
    """Layout of one DDP gradient buffer (megatron-core's `_ParamAndGradBuffer`)."""

    numel: int
    """Elements allocated, padding included."""
    param_ranges: tuple[tuple[int, int], ...]
    """(start, end) of each parameter in the buffer, in the order the params were given."""
    bucket_ranges: tuple[tuple[int, int], ...]
    """(start, end) of each bucket."""


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def grad_buffer(
    specs: Sequence[ParamSpec], dp: int, use_distributed_optimizer: bool, bucket_size: Optional[int] = None
) -> GradBuffer:
    """Where megatron-core puts each trainable param's gradient (same walk as `_ParamAndGradBuffer`).

    Parameters are laid out in reverse order (roughly backprop order). With the distributed
    optimizer each param start is 64-aligned, each bucket end padded to lcm(dp, 128), and a tied
    embedding split over pipeline stages gets a bucket of its own. `bucket_size` None = one bucket
    (the loop runs with overlap_grad_reduce off)."""
    dist = use_distributed_optimizer
    bucket_div = math.lcm(dp, 128)
    ranges: dict[int, tuple[int, int]] = {}
    buckets: list[tuple[int, int]] = []
    start = bucket_start = 0
    open_bucket = False
    end = 0
    for i in reversed(range(len(specs))):
        spec = specs[i]
        if dist:
            start = _ceil_to(start, 64)
        own = spec.shared_embedding and dist
        if own and open_bucket:  # close the previous bucket first
            end_b = _ceil_to(start, bucket_div)
            buckets.append((bucket_start, end_b))
            bucket_start = start = end_b
        end = start + spec.numel
        ranges[i] = (start, end)
        open_bucket = True
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own:
            end_b = _ceil_to(end, bucket_div) if dist else end
            buckets.append((bucket_start, end_b))
            bucket_start = start = end_b
            open_bucket = False
        else:
            start = end
    if open_bucket:
        end_b = _ceil_to(end, bucket_div) if dist else end
        buckets.append((bucket_start, end_b))
        bucket_start = end_b
    numel = bucket_start if buckets else 0
    return GradBuffer(numel, tuple(ranges[i] for i in range(len(specs))), tuple(buckets))


def owned_elements(buf: GradBuffer, dp: int, dp_rank: int) -> list[int]:
    """Per parameter, how many of its elements fall in `dp_rank`'s 1/dp slice of each bucket."""
    owned = [0] * len(buf.param_ranges)
    for b0, b1 in buf.bucket_ranges:
        size = (b1 - b0) // dp
        lo, hi = b0 + dp_rank * size, b0 + (dp_rank + 1) * size
        for i, (p0, p1) in enumerate(buf.param_ranges):
            if p0 >= b0 and p1 <= b1:
                owned[i] += max(0, min(p1, hi) - max(p0, lo))
    return owned


def _max_shard(buf: GradBuffer, dp: int, bytes_per_element: int, bytes_per_tensor: int) -> int:
    """max over DP ranks of owned elements x bytes_per_element + shards x bytes_per_tensor, using
    prefix sums over the (disjoint) parameter ranges instead of a walk per rank."""
    order = sorted(buf.param_ranges)
    starts = [p0 for p0, _ in order]
    prefix = [0]
    for p0, p1 in order:
        prefix.append(prefix[-1] + p1 - p0)
    best = 0
    for r in range(dp):
        elems = tensors = 0
        for b0, b1 in buf.bucket_ranges:
            size = (b1 - b0) // dp
            lo, hi = b0 + r * size, b0 + (r + 1) * size
            i = bisect.bisect_right(starts, lo) - 1  # the param that may straddle lo
            if i < 0 or order[i][1] <= lo:
                i += 1
            j = bisect.bisect_left(starts, hi)  # params [i, j) start before hi
            if j <= i:
                continue
            elems += prefix[j] - prefix[i]
            elems -= max(0, lo - order[i][0])
            elems -= max(0, order[j - 1][1] - hi)
            tensors += j - i
        best = max(best, elems * bytes_per_element + tensors * bytes_per_tensor)
    return best


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes of one rank."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def state_bytes(
    model: ModelConfig,
    par: ParallelConfig,
    pp_rank: int,
    data_parallel_size: int,
    trainable: Iterable[str] = PARTS,
    param_bytes: int = 2,
    use_distributed_optimizer: bool = False,
    dp_rank: Optional[int] = None,
    grad_reduce_in_fp32: bool = True,
    adam_step_bytes: int = 0,
    lora: Optional[LoRAConfig] = None,
    bucket_size: Optional[int] = None,
    norms_fp32: bool = False,
    expert_dp_rank: Optional[int] = None,
) -> StateBytes:
    """Parameter, gradient and Adam-state bytes on one rank of stage `pp_rank`.

    trainable: parts that get gradients ('vision', 'projector', 'llm', and 'lora' for the adapters of `lora`).
    param_bytes: 2 for bf16 training (fp32 master weights live in the optimizer), 4 for fp32.
    dp_rank: the distributed optimizer's shards differ by a few elements between DP ranks (padding);
        None gives the largest over the DP group (what a plan needs), an int that rank exactly.
    norms_fp32: norms kept in fp32 in bf16 training (megatron-core's torch norm wrapper does that
        unless the model builder casts them, as `models/internvl.py: build_model` does); DDP then keeps
        a second buffer for them (one buffer per parameter dtype), sharded and padded on its own.
    expert_dp_rank: with dp_rank, this rank's place in the expert data-parallel group (MoE).
    The DP group megatron shards over is data x context parallel; MoE expert weights have buffers of
    their own over the expert data-parallel group (TP x CP x DP / (EP x expert-TP) ranks)."""
    args = (
        model,
        shape_key(par),
        pp_rank,
        data_parallel_size * par.context_parallel_size,
        frozenset(trainable),
        param_bytes,
        use_distributed_optimizer,
        dp_rank,
        grad_reduce_in_fp32,
        adam_step_bytes,
        bucket_size,
        norms_fp32,
        expert_dp_rank,
    )
    if lora is not None and lora.enabled:  # a LoRAConfig is not hashable: not cached
        return _state_bytes(*args, lora)
    return _cached_state_bytes(*args)


@lru_cache(maxsize=4096)
def _cached_state_bytes(*args) -> StateBytes:
    """`_state_bytes` without adapters, cached: a layout search asks again for every recompute /
    sequence-parallel variant of the same sizes, and an MoE stage's buffer walk covers thousands of
    expert weights."""
    return _state_bytes(*args, None)


def _state_bytes(
    model: ModelConfig,
    par: ParallelConfig,
    pp_rank: int,
    dense_dp: int,
    keep: frozenset[str],
    param_bytes: int,
    use_distributed_optimizer: bool,
    dp_rank: Optional[int],
    grad_reduce_in_fp32: bool,
    adam_step_bytes: int,
    bucket_size: Optional[int],
    norms_fp32: bool,
    expert_dp_rank: Optional[int],
    lora: Optional[LoRAConfig],
) -> StateBytes:
    """state_bytes over the data x context parallel group of `dense_dp` ranks."""
    specs = stage_params(model, par, pp_rank, lora)
    tp, ep = par.tensor_model_parallel_size, par.expert_model_parallel_size
    expert_dp = dense_dp * tp // (ep * (par.expert_tensor_parallel_size or tp))

    def width(s: ParamSpec) -> int:
        return 4 if (norms_fp32 and s.torch_norm) else param_bytes

    params = sum(s.numel * width(s) for s in specs if s.part not in keep)  # frozen: own storage
    grads = opt = 0
    largest = dp_rank is None
    # one DDP buffer per (parameter dtype, expert or not)
    for nbytes, expert in sorted({(width(s), s.expert) for s in specs}):
        train = [s for s in specs if s.part in keep and width(s) == nbytes and s.expert == expert]
        if not train:
            continue
        dp, rank = (expert_dp, expert_dp_rank) if expert else (dense_dp, dp_rank)
        grad_bytes = 4 if grad_reduce_in_fp32 else nbytes
        buf = _buffer_state(
            train, nbytes, grad_bytes, dp, rank, largest, use_distributed_optimizer, bucket_size, adam_step_bytes
        )
        params, grads, opt = params + buf.params, grads + buf.grads, opt + buf.optimizer
    return StateBytes(params=params, grads=grads, optimizer=opt)


def _buffer_state(
    train: list[ParamSpec],
    nbytes: int,
    grad_bytes: int,
    dp: int,
    rank: Optional[int],
    largest: bool,
    distributed: bool,
    bucket_size: Optional[int],
    adam_step_bytes: int,
) -> StateBytes:
    """The trainable parameters, gradients (`grad_bytes` each) and Adam state of one DDP buffer (`train`,
    all `nbytes` wide) over `dp` ranks; with the distributed optimizer (`distributed`) the Adam state of
    the largest shard (`largest`) or of rank `rank`'s."""
    master = 4 if nbytes != 4 else 0  # fp32 copy of bf16/fp16 params
    buf = grad_buffer(train, dp, distributed, bucket_size)
    grads = buf.numel * grad_bytes
    if not distributed:
        numel = sum(s.numel for s in train)
        return StateBytes(numel * nbytes, grads, numel * (8 + master) + adam_step_bytes * len(train))
    if largest:
        opt = _max_shard(buf, dp, 8 + master, adam_step_bytes)
    else:
        owned = owned_elements(buf, dp, rank if rank is not None else 0)
        opt = sum(owned) * (8 + master) + adam_step_bytes * sum(1 for n in owned if n > 0)
    return StateBytes(buf.numel * nbytes, grads, opt)  # trainable params are re-homed in a padded buffer


# --- activations ---------------------------------------------------------------------------------
def _norm_bytes(tokens: float, width: int, kind: str, e: int, kernels: Kernels, weight_grad: bool = True) -> float:
    """What a norm saves: its input plus per-token statistics (and torch's composite RMSNorm on
    CPU also keeps the normalized tensor for the weight's gradient, when the weight trains)."""
    if kind == "LayerNorm":  # input + mean + rstd (fp32)
        return tokens * (width * e + 8)
    if kernels == "cpu":  # composite RMSNorm: input, rstd, x * rstd
        return tokens * ((2 if weight_grad else 1) * width * e + e)
    return tokens * (width * e + 4)  # fused RMSNorm: input + rsigma (fp32)


def _attention_bytes(
    tokens: float, seg_sq: float, heads_q: int, heads_kv: int, d: int, e: int, kernels: Kernels
) -> float:
    """Core attention's saved tensors for `tokens` tokens: q, k, v, out and the fp32 log-sum-exp.
    Both kernels are flash-style here: parallel/attention.py hands torch's SDPA 4-D inputs, which on
    CPU take its flash kernel (no L x L matrix), as flash-attn / TE do on GPU. `seg_sq` (sum of the
    segments' squared lengths) is kept for kernels that would materialize the scores."""
    return tokens * ((2 * heads_q + 2 * heads_kv) * d * e + 4 * heads_q)


def llm_layer_bytes(
    model: ModelConfig,
    par: ParallelConfig,
    tokens: float,
    seg_sq: float,
    e: int,
    kernels: Kernels,
    weight_grads: bool = True,
) -> float:
    """Saved-for-backward bytes of one decoder layer for `tokens` tokens on one TP/CP rank.

    Per token: RMSNorm + linear_qkv input (the linear keeps the sequence-parallel shard, 1/TP),
    RoPE cos/sin for q and k, core attention, linear_proj input; RMSNorm + linear_fc1 input, then
    SwiGLU: fc1 output (2F), silu(gate) (F), up + glu_linear_offset (F), product = fc2 input (F);
    with per-head QK-norm (Qwen3) also the norm's inputs, outputs and per-head statistic.
    weight_grads=False (a frozen LLM that still passes gradients back to the projector): the linears
    keep no inputs, since only their weights' gradients would need them."""
    m = model.llm
    tp = par.tensor_model_parallel_size
    sp = tp if par.sequence_parallel else 1
    h, d = m.hidden_size, m.head_dim
    hq, hkv, f = m.num_attention_heads // tp, m.num_query_groups // tp, m.ffn_hidden_size // tp
    # MLP tokens and width: an MoE layer's experts see each token k times (routed copies, gathered
    # over the expert-TP group; balanced routing assumed) at the expert width / expert-TP
    mlp_tokens, mlp_in = tokens, tokens / sp
    if m.is_moe:
        etp = par.expert_tensor_parallel_size or tp
        mlp_tokens = mlp_in = tokens / sp * etp * m.moe_router_topk
        f = m.moe_ffn_hidden_size // etp
        per_router = (tokens / sp) * m.num_experts * 4 * 2  # fp32 logits and probabilities
    per = 2 * _norm_bytes(tokens / sp, h, "RMSNorm", e, kernels, weight_grads)
    per += tokens * 4 * d * e  # cos, sin for q and k
    per += _attention_bytes(tokens, seg_sq, hq, hkv, d, e, kernels)
    per += mlp_tokens * 4 * f * e  # SwiGLU: fc1 out, silu out, up copy
    if m.is_moe:
        per += per_router
    if m.qk_layernorm:  # per-head QK-norm: q, k inputs and normalized
        per += tokens * ((hq + hkv) * 2 * d * e + (hq + hkv) * 4)  # copies, fp32 statistic per head
    if weight_grads:  # linear inputs: qkv, fc1, proj, fc2
        per += (tokens / sp) * h * e + mlp_in * h * e + tokens * hq * d * e + mlp_tokens * f * e
    return per


def vit_layer_bytes(model: ModelConfig, par: ParallelConfig, tiles: float, e: int, kernels: Kernels) -> float:
    """Saved bytes of one InternViT block for `tiles` tiles (1 + patches tokens each; no SP/CP).

    norm + qkv input, core attention (per tile), proj input, ls1 * attn keeps attn, norm + fc1
    input, GELU input and output (fc2 input), ls2 * mlp keeps mlp; QK-norm keeps q, k, their
    normalized copies and the per-token statistic."""
    v = model.vision
    tp = par.tensor_model_parallel_size
    n = v.num_patches + 1
    tokens = tiles * n
    c, d = v.hidden_size, v.head_dim
    heads = padded_vision_heads(v.num_attention_heads, tp) // tp
    f = v.ffn_hidden_size // tp
    per = 2 * _norm_bytes(tokens, c, v.normalization, e, kernels)
    per += tokens * (2 * c + 2 * c) * e  # qkv input, fc1 input, ls1/ls2 branches
    per += _attention_bytes(tokens, tiles * n * n, heads, heads, d, e, kernels)
    per += tokens * heads * d * e  # linear_proj input
    per += tokens * 2 * f * e  # GELU input, fc2 input
    if v.qk_normalization:
        per += tokens * (4 * heads * d * e + 2 * 4)
    return per


def projector_bytes(model: ModelConfig, par: ParallelConfig, tiles: float, e: int) -> float:
    """LayerNorm(4C) (input, mean, rstd) + fc1 input + GELU input and output, per image token."""
    tokens = tiles * model.num_image_token
    cin, hp = model.projector_input_size, model.llm.hidden_size // par.tensor_model_parallel_size
    return tokens * ((2 * cin) * e + 8 + 2 * hp * e)


def kv_cache_bytes(
    model: ModelConfig, par: ParallelConfig, stage: int, sequences: int, max_sequence_length: int, param_bytes: int
) -> int:
    """The KV cache one rank of pipeline stage `stage` holds while decoding `sequences` rows of up to
    `max_sequence_length` tokens (prompt + response) with megatron-core's StaticInferenceContext
    (inference/decode.py): `Attention._allocate_memory` gives each of the stage's decoder layers a key
    and a value buffer of (max_sequence_length, sequences, num_query_groups / TP, head_dim) in the
    activations' dtype (the parameters'), for the whole decode. The ViT runs once per prompt and
    keeps no cache."""
    layers = decoder_layers_per_stage(model.llm.num_layers, par)[stage]
    groups = model.llm.num_query_groups // par.tensor_model_parallel_size
    return 2 * layers * max_sequence_length * sequences * groups * model.llm.head_dim * param_bytes


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes of one rank at the peak of a training step."""

    vision: float
    """ViT + projector (stage 0 only), per microbatch."""
    llm: float
    """Decoder layers of this stage (+ embedding inputs), per microbatch."""
    head: float
    """Final norm, output layer input and the fp32 softmax of the loss (last stage), per microbatch."""
    in_flight: int
    """Microbatches whose activations are held at once (1F1B: pp - stage, at most all of them)."""
    recompute_buffer: float
    """With full recompute: one recomputed layer's activations alive during its backward."""
    chunk_in_flight: tuple[int, ...] = ()
    """Interleaved schedule (V model chunks): microbatches each chunk holds at the rank's peak (the
    ViT's with chunk 0, the loss's with the last chunk, 1/V of `llm` each); () with one chunk."""

    @property
    def per_microbatch(self) -> float:
        return self.vision + self.llm + self.head

    @property
    def total(self) -> float:
        if self.chunk_in_flight:
            return _chunk_bytes(self.chunk_in_flight, self.vision, self.llm, self.head) + self.recompute_buffer
        return self.in_flight * self.per_microbatch + self.recompute_buffer


def _chunk_bytes(held: tuple[int, ...], vision: float, llm: float, head: float) -> float:
    """Bytes of `held[c]` microbatches on each of V chunks: 1/V of the stage's layers each, the ViT
    on chunk 0 (stage 0) and the loss on chunk V-1 (last stage)."""
    return held[0] * vision + sum(held) * llm / len(held) + held[-1] * head


def _head_bytes(
    model: ModelConfig,
    par: ParallelConfig,
    tokens: float,
    e: int,
    kernels: Kernels,
    llm_weights: bool,
    cross_entropy_chunk_size: int = 0,
) -> float:
    """What the final norm, output layer and loss keep for the backward (last stage)."""
    tp = par.tensor_model_parallel_size
    sp = tp if par.sequence_parallel else 1
    h = model.llm.hidden_size
    head = _norm_bytes(tokens / sp, h, "RMSNorm", e, kernels, llm_weights)
    if cross_entropy_chunk_size:  # models/chunked_loss.py keeps no logits
        head += tokens * h * e  # the output layer input, gathered over sequence parallelism
        return head + tokens * (4 + 8 + 1 + 1)  # fp32 log-sum-exp, labels, in-shard mask, loss mask
    head += tokens / sp * h * e if llm_weights else 0.0  # output layer input
    return head + tokens * (4 * (padded_vocab(model, tp) // tp) + 8 + 1)  # fp32 softmax of the loss, labels, mask


def _encoder_bytes(
    model: ModelConfig, par: ParallelConfig, tiles: float, e: int, kernels: Kernels, keep: set[str], recompute: bool
) -> tuple[float, float]:
    """The ViT's and projector's activations for `tiles` tiles on stage 0, and the ViT layer's full
    activations kept while it is recomputed (0 without recomputation or a frozen ViT)."""
    vision = buffer = 0.0
    if "vision" in keep:
        v = model.vision
        one_vit = vit_layer_bytes(model, par, tiles, e, kernels)
        vit_tokens = tiles * (v.num_patches + 1)
        vision += vision_layers_built(model) * (vit_tokens * v.hidden_size * e if recompute else one_vit)
        vision += tiles * 3 * v.image_size**2 * e  # conv input (pixels)
        if recompute:
            buffer = one_vit
    if "vision" in keep or "projector" in keep:
        vision += projector_bytes(model, par, tiles, e)
    return vision, buffer


def activation_bytes(
    model: ModelConfig,
    par: ParallelConfig,
    pp_rank: int,
    seq_length: int,
    micro_batch_size: int = 1,
    tiles_per_microbatch: float = 0.0,
    num_microbatches: int = 1,
    param_bytes: int = 2,
    sample_lengths: Optional[Sequence[int]] = None,
    trainable: Iterable[str] = PARTS,
    kernels: Kernels = "gpu",
    cross_entropy_chunk_size: int = 0,
) -> ActivationBytes:
    """Activation memory of one rank of stage `pp_rank` during a 1F1B training step (or the
    interleaved schedule's, with virtual stages in `par`: stages.interleaved_in_flight).

    seq_length x micro_batch_size tokens per microbatch, split over CP ranks; tiles_per_microbatch
    tiles go through the ViT on stage 0 (every CP rank runs them all). sample_lengths: lengths of
    the packed samples of one microbatch (only the 'cpu' kernels' attention depends on them;
    default: one sample per sequence). A frozen ViT saves nothing (no input needs a gradient); a
    frozen LLM keeps what passing gradients back to the projector needs, but no linear inputs.
    With --recompute-granularity full each layer keeps only its input, plus one layer's full
    activations during its recomputation. cross_entropy_chunk_size: --cross-entropy-chunk-size (the
    chunked loss keeps no logits)."""
    e = param_bytes
    keep = set(trainable)
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    sp = tp if par.sequence_parallel else 1
    recompute = par.recompute_granularity == "full"
    tokens = seq_length * micro_batch_size / cp
    lengths = list(sample_lengths) if sample_lengths is not None else [seq_length] * micro_batch_size
    seg_sq = sum(float(n) ** 2 for n in lengths) / cp**2 * cp  # each CP rank: 1/cp of q vs 1/cp of k, cp steps
    first, last = pp_rank == 0, pp_rank == pp - 1
    layers = decoder_layers_per_stage(model.llm.num_layers, par)[pp_rank]
    h = model.llm.hidden_size

    llm_weights = bool({"llm", "lora"} & keep)  # LoRA's A matmul keeps the base layer's input too
    one_llm = llm_layer_bytes(model, par, tokens, seg_sq, e, kernels, llm_weights)
    ckpt_llm = tokens / sp * h * e
    buffer = one_llm if (recompute and layers) else 0.0
    llm = layers * (ckpt_llm if recompute else one_llm)
    if first:
        llm += tokens * (8 + 1)  # token ids (int64) for the embedding backward, <IMG_CONTEXT> mask

    vision = 0.0
    if first and tiles_per_microbatch > 0:
        vision, vit_buffer = _encoder_bytes(model, par, tiles_per_microbatch, e, kernels, keep, recompute)
        buffer = max(buffer, vit_buffer)

    head = _head_bytes(model, par, tokens, e, kernels, llm_weights, cross_entropy_chunk_size) if last else 0.0

    in_flight = min(pp - pp_rank, num_microbatches) if pp > 1 else 1
    chunks = _interleaved_peak(model, par, pp_rank, num_microbatches, vision, llm, head)
    if chunks:
        in_flight = -(-sum(chunks) // len(chunks))
    return ActivationBytes(
        vision=vision, llm=llm, head=head, in_flight=in_flight, recompute_buffer=buffer, chunk_in_flight=chunks
    )


def _interleaved_peak(
    model: ModelConfig, par: ParallelConfig, pp_rank: int, microbatches: int, vision: float, llm: float, head: float
) -> tuple[int, ...]:
    """With virtual stages: the microbatches each chunk holds at the rank's peak of the interleaved
    schedule, the ViT's and the loss's chunks weighed apart; () with one chunk per rank."""
    v = virtual_pipeline_size(par, model.llm.num_layers) or 1
    if v == 1:
        return ()
    states = interleaved_in_flight(par.pipeline_model_parallel_size, v, microbatches, pp_rank)
    return max(states, key=lambda held: _chunk_bytes(held, vision, llm, head))
