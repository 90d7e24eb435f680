"""Parameter inventory derived from the config alone: every tensor a rank builds, in build order.

`stage_params` lists the local parameters of one (pipeline stage, tensor-parallel rank) exactly as
`models/internvl.py: build_model` creates them (names, local shapes, order), without building
anything. A tensor-parallel parameter is listed by its canonical (TP 1) shape and partition dim; its
local shape, padding included, comes from its sharding rule (models/sharding.py), the one the model
loader and the converter use. Memory planning needs the order too: with the distributed optimizer megatron-core aligns
every parameter's start in its gradient buffer to 64 elements, so the padding depends on it
(`plan/memory.py`). `tests/plan/test_state_bytes.py` checks the inventory against built models.

`count_params` gives the size of the released model (the HF checkpoint): real vision heads, real
vocabulary, no copies. Local counts differ from it by design:

- InternViT heads are padded up to a multiple of TP with zero heads (`config/megatron.py`).
- The vocabulary is padded to a multiple of lcm(128, TP) (`config/model.py: padded_vocab_size`).
- Tied embeddings keep a copy of the output weight on the last stage when PP > 1.
- InternViT-6B blocks have no qkv bias (models/specs.py forces it off although proj/fc have one).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import Iterable, Literal

# padded_vision_heads is read from here by memory.py and layouts.py
from ..errors import ConfigError
from ..config.model import ModelConfig, ParallelConfig, padded_vision_heads, padded_vocab_size  # noqa: F401
from ..models.sharding import rule_for

Part = Literal["vision", "projector", "llm"]
PARTS: tuple[Part, ...] = ("vision", "projector", "llm")


@dataclass(frozen=True)
class ParamSpec:
    """One local parameter tensor."""

    name: str
    """Name as `model.named_parameters()` reports it (layer numbers are local to the stage)."""
    shape: tuple[int, ...]
    """Local shape on this TP rank."""
    part: Part
    """Which part of the model it belongs to (what `--freeze-*` / stages switch)."""
    shared_embedding: bool = False
    """megatron-core's `shared_embedding` tag (tied embedding split over pipeline stages)."""
    torch_norm: bool = False
    """A norm built by megatron-core's `WrappedTorchNorm` (local backend): torch creates it in fp32
    whatever the training dtype; `build_model` casts it to the training dtype, as transformer-engine's
    norms are."""
    expert: bool = False
    """An MoE expert weight: this EP rank's experts, split over expert-TP; DDP keeps their gradients
    in buffers of their own, reduced (and distributed-optimizer-sharded) over the expert
    data-parallel group."""

    @property
    def numel(self) -> int:
        return prod(self.shape)


def vision_layers_built(model: ModelConfig) -> int:
    """InternViT blocks built: all, or up to `select_layer` (blocks after it never run)."""
    v = model.vision
    return v.num_layers if v.select_layer == -1 else v.num_layers + v.select_layer + 1


def decoder_layers_per_stage(num_layers: int, par: ParallelConfig) -> list[int]:
    """Decoder layers on each pipeline stage, by megatron-core's rule (uneven first/last allowed)."""
    pp = par.pipeline_model_parallel_size
    first, last = par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers
    if pp == 1:
        return [num_layers]
    if first is None and last is None:
        if num_layers % pp:
            raise ConfigError(f"{num_layers} decoder layers are not divisible by "
                              f"--pipeline-model-parallel-size {pp}")
        return [num_layers // pp] * pp
    rest, stages_left = num_layers, pp
    if first is not None:
        rest, stages_left = rest - first, stages_left - 1
    if last is not None:
        rest, stages_left = rest - last, stages_left - 1
    if rest < 0 or (stages_left > 0 and rest % stages_left):
        raise ConfigError(f"{num_layers} decoder layers cannot be split as first={first}, last={last} over "
                          f"{pp} stages (the middle stages need an equal share)")
    middle = rest // stages_left if stages_left else 0
    counts = [middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def _split(name: str, canonical: tuple[int, ...], dim: int, size: int, model: ModelConfig, part: Part,
           **tags: bool) -> ParamSpec:
    """A parameter split over `size` tensor-parallel ranks along `dim`: the local shape is its
    sharding rule's (models/sharding.py: padded heads, padded vocabulary, even split)."""
    return ParamSpec(name, rule_for(name).local_shape(canonical, dim, size, model), part, **tags)


def _norm(prefix: str, width: int, kind: str, part: Part) -> list[ParamSpec]:
    specs = [ParamSpec(f"{prefix}.weight", (width,), part, torch_norm=True)]
    if kind == "LayerNorm":
        specs.append(ParamSpec(f"{prefix}.bias", (width,), part, torch_norm=True))
    return specs


def vision_params(model: ModelConfig, tp: int) -> list[ParamSpec]:
    """InternViT on one TP rank: embeddings, then blocks (layer scale, norms, attention, MLP)."""
    v = model.vision
    c, hd, f = v.hidden_size, v.num_attention_heads * v.head_dim, v.ffn_hidden_size  # real heads: rules pad
    p = "vision_model"
    specs = [
        ParamSpec(f"{p}.embeddings.class_embedding", (1, 1, c), "vision"),
        ParamSpec(f"{p}.embeddings.position_embedding", (1, v.num_patches + 1, c), "vision"),
        ParamSpec(f"{p}.embeddings.patch_embedding.weight", (c, 3, v.patch_size, v.patch_size), "vision"),
        ParamSpec(f"{p}.embeddings.patch_embedding.bias", (c,), "vision"),
    ]
    for i in range(vision_layers_built(model)):
        lp = f"{p}.encoder.layers.{i}"
        specs += [ParamSpec(f"{lp}.ls1", (c,), "vision"), ParamSpec(f"{lp}.ls2", (c,), "vision")]
        specs += _norm(f"{lp}.input_layernorm", c, v.normalization, "vision")
        specs += [
            _split(f"{lp}.self_attention.linear_proj.weight", (c, hd), 1, tp, model, "vision"),
            ParamSpec(f"{lp}.self_attention.linear_proj.bias", (c,), "vision"),
            _split(f"{lp}.self_attention.linear_qkv.weight", (3 * hd, c), 0, tp, model, "vision"),
        ]
        if v.qkv_bias:
            specs.append(_split(f"{lp}.self_attention.linear_qkv.bias", (3 * hd,), 0, tp, model, "vision"))
        if v.qk_normalization:
            specs += [_split(f"{lp}.self_attention.{x}_layernorm.weight", (hd,), 0, tp, model, "vision") for x in "qk"]
        specs += _norm(f"{lp}.pre_mlp_layernorm", c, v.normalization, "vision")
        specs += [
            _split(f"{lp}.mlp.linear_fc1.weight", (f, c), 0, tp, model, "vision"),
            _split(f"{lp}.mlp.linear_fc1.bias", (f,), 0, tp, model, "vision"),
            _split(f"{lp}.mlp.linear_fc2.weight", (c, f), 1, tp, model, "vision"),
            ParamSpec(f"{lp}.mlp.linear_fc2.bias", (c,), "vision"),
        ]
    return specs


def projector_params(model: ModelConfig, tp: int) -> list[ParamSpec]:
    """LayerNorm(4C) -> column-parallel Linear(4C, H) -> GELU -> row-parallel Linear(H, H)."""
    cin, h = model.projector_input_size, model.llm.hidden_size
    return [
        ParamSpec("projector.layer_norm.weight", (cin,), "projector"),
        ParamSpec("projector.layer_norm.bias", (cin,), "projector"),
        _split("projector.mlp.linear_fc1.weight", (h, cin), 0, tp, model, "projector"),
        _split("projector.mlp.linear_fc1.bias", (h,), 0, tp, model, "projector"),
        _split("projector.mlp.linear_fc2.weight", (h, h), 1, tp, model, "projector"),
        ParamSpec("projector.mlp.linear_fc2.bias", (h,), "projector"),
    ]


def padded_vocab(model: ModelConfig, tp: int) -> int:
    """Embedding/output rows: `config.model.padded_vocab_size` (a multiple of lcm(128, TP))."""
    return padded_vocab_size(model.llm.vocab_size, tp)


def decoder_layer_params(model: ModelConfig, tp: int, index: int, ep: int = 1,
                         etp: int | None = None) -> list[ParamSpec]:
    """One pre-norm GQA + SwiGLU (or MoE) decoder layer on one TP rank and EP / expert-TP rank (+ per-head
    QK-norm; head_dim may be decoupled)."""
    m = model.llm
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * d
    lp = f"language_model.decoder.layers.{index}"
    specs = [
        ParamSpec(f"{lp}.input_layernorm.weight", (h,), "llm", torch_norm=True),
        _split(f"{lp}.self_attention.linear_proj.weight", (h, m.num_attention_heads * d), 1, tp, model, "llm"),
        _split(f"{lp}.self_attention.linear_qkv.weight", (qkv, h), 0, tp, model, "llm"),
    ]
    if m.qkv_bias:
        specs.append(_split(f"{lp}.self_attention.linear_qkv.bias", (qkv,), 0, tp, model, "llm"))
    if m.qk_layernorm:  # per-head, replicated over TP, in params_dtype (models/qk_norm.py)
        specs += [ParamSpec(f"{lp}.self_attention.{x}_layernorm.weight", (d,), "llm") for x in "qk"]
    specs.append(ParamSpec(f"{lp}.pre_mlp_layernorm.weight", (h,), "llm", torch_norm=True))
    if m.is_moe:
        return specs + moe_params(model, lp, ep, etp or tp)
    return specs + [_split(f"{lp}.mlp.linear_fc1.weight", (2 * f, h), 0, tp, model, "llm"),
                    _split(f"{lp}.mlp.linear_fc2.weight", (h, f), 1, tp, model, "llm")]


def moe_params(model: ModelConfig, lp: str, ep: int, etp: int) -> list[ParamSpec]:
    """megatron-core MoELayer: the router (replicated), then this EP rank's E/EP SwiGLU experts."""
    m = model.llm
    h, fe = m.hidden_size, m.moe_ffn_hidden_size
    specs = [ParamSpec(f"{lp}.mlp.router.weight", (m.num_experts, h), "llm")]
    for j in range(m.num_experts // ep):
        ex = f"{lp}.mlp.experts.local_experts.{j}"
        specs += [_split(f"{ex}.linear_fc1.weight", (2 * fe, h), 0, etp, model, "llm", expert=True),
                  _split(f"{ex}.linear_fc2.weight", (h, fe), 1, etp, model, "llm", expert=True)]
    return specs


def stage_params(model: ModelConfig, par: ParallelConfig, pp_rank: int) -> list[ParamSpec]:
    """Every local parameter of pipeline stage `pp_rank` on one TP rank, in build order."""
    return list(_stage_params(model, par, pp_rank))


@lru_cache(maxsize=256)
def _stage_params(model: ModelConfig, par: ParallelConfig, pp_rank: int) -> tuple[ParamSpec, ...]:
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    check_divisibility(model, par)
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = model.llm.tie_word_embeddings
    h, vocab = model.llm.hidden_size, model.llm.vocab_size  # the rule pads the vocabulary
    specs: list[ParamSpec] = []
    if first:
        specs += vision_params(model, tp) + projector_params(model, tp)
        specs.append(_split("language_model.embedding.word_embeddings.weight", (vocab, h), 0, tp, model, "llm",
                            shared_embedding=tied and pp > 1))
    for i in range(decoder_layers_per_stage(model.llm.num_layers, par)[pp_rank]):
        specs += decoder_layer_params(model, tp, i, par.expert_model_parallel_size, par.expert_tensor_parallel_size)
    if last:
        specs.append(ParamSpec("language_model.decoder.final_layernorm.weight", (h,), "llm", torch_norm=True))
        if not (first and tied):  # PP1 + tied: the output layer reuses the embedding
            specs.append(_split("language_model.output_layer.weight", (vocab, h), 0, tp, model, "llm",
                                shared_embedding=tied and pp > 1))
    return tuple(specs)


def check_divisibility(model: ModelConfig, par: ParallelConfig) -> None:
    """Raise ValueError naming the shape TP does not divide (megatron-core would assert later)."""
    tp = par.tensor_model_parallel_size
    m, v = model.llm, model.vision
    need = {
        "LLM attention heads": m.num_attention_heads, "LLM key/value heads": m.num_query_groups,
        "LLM ffn_hidden_size": m.ffn_hidden_size, "LLM hidden_size (projector)": m.hidden_size,
        "ViT ffn_hidden_size": v.ffn_hidden_size,
    }
    if m.is_moe:  # the dense ffn width is unused; experts split over EP and expert-TP instead
        del need["LLM ffn_hidden_size"]
        ep, etp = par.expert_model_parallel_size, par.expert_tensor_parallel_size or tp
        if m.num_experts % ep:
            raise ConfigError(f"--expert-model-parallel-size {ep} does not divide the {m.num_experts} experts of "
                              f"{model.name}")
        if m.moe_ffn_hidden_size % etp:
            raise ConfigError(f"expert tensor parallel size {etp} does not divide the expert width "
                              f"({m.moe_ffn_hidden_size}) of {model.name}")
    for what, n in need.items():
        if n % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the {what} ({n}) of "
                              f"{model.name}")


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the released model (HF layout: real heads, real vocabulary, no copies)."""

    vision: int
    projector: int
    llm: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm


def count_params(model: ModelConfig) -> ParamCounts:
    """Released-model parameter counts per part, from the config.

    TP1/PP1 inventory minus what only this implementation allocates: the vocabulary padding rows
    of the embedding (and the untied output layer). (At TP1 there are no padded heads, and tied
    embeddings are one tensor.)"""
    par = ParallelConfig()
    specs = stage_params(model, par, 0)
    pad_rows = padded_vocab(model, 1) - model.llm.vocab_size
    vocab_tensors = 1 if model.llm.tie_word_embeddings else 2
    by = {part: sum(s.numel for s in specs if s.part == part) for part in PARTS}
    return ParamCounts(vision=by["vision"], projector=by["projector"],
                       llm=by["llm"] - pad_rows * model.llm.hidden_size * vocab_tensors)


def active_params(model: ModelConfig) -> ParamCounts:
    """Parameters one token uses: `count_params` minus, in every MoE layer, the experts it is not
    routed to (num_experts - top-k of them); equal to `count_params` for a dense model."""
    counts = count_params(model)
    m = model.llm
    if not m.is_moe:
        return counts
    idle = m.num_layers * (m.num_experts - m.moe_router_topk) * 3 * m.hidden_size * m.moe_ffn_hidden_size
    return ParamCounts(vision=counts.vision, projector=counts.projector, llm=counts.llm - idle)


def trainable_numel(specs: Iterable[ParamSpec], trainable: Iterable[Part]) -> int:
    """Elements of the specs whose part is trainable."""
    keep = set(trainable)
    return sum(s.numel for s in specs if s.part in keep)
