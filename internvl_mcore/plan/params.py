"""Parameter inventory derived from the config alone: every tensor a rank builds, in build order.

`stage_params` lists the local parameters of one (pipeline stage, tensor-parallel rank) exactly as
`models/internvl.py: build_model` creates them (names, local shapes, order), without building
anything: the model's parameter list (models/parameters.py, which the converter's canonical shapes
come from too) cut to the stage's layers and experts, each tensor-parallel parameter at the local
shape of its sharding rule (models/sharding.py: padding included), the LoRA adapters of
`--lora-target` / `--lora-modules` (config/lora.py: adapts) after the linears they adapt.
Memory planning needs the order too: with the distributed optimizer megatron-core aligns every
parameter's start in its gradient buffer to 64 elements, so the padding depends on it
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
from typing import Iterable, Literal, Optional

from ..config import pipeline_layout
from ..config.lora import LORA_INFIX, LoRAConfig, adapts

# padded_vision_heads is read from here by memory.py and layouts.py
from ..errors import ConfigError
from ..config.model import ModelConfig, ParallelConfig, padded_vision_heads, padded_vocab_size  # noqa: F401
from ..config.problems import expert_split_problem
from ..models.parameters import (
    Param,
    Part,
    decoder_layer,
    final_norm,
    output_layer,
    projector,
    vision_embeddings,
    vision_layer,
    vision_layers_built,
    word_embeddings,
)
from ..models.sharding import rule_for, split_dim

PARTS: tuple[Part, ...] = ("vision", "projector", "llm")


@dataclass(frozen=True)
class ParamSpec:
    """One local parameter tensor."""

    name: str
    """Name as `model.named_parameters()` reports it (layer numbers are local to the stage)."""
    shape: tuple[int, ...]
    """Local shape on this TP rank."""
    part: Part | Literal["lora"]
    """Which part of the model it belongs to (what `--freeze-*` / stages switch; 'lora': an adapter)."""
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


def decoder_layers_per_stage(num_layers: int, par: ParallelConfig) -> list[int]:
    """Decoder layers on each pipeline stage, by megatron-core's rule (uneven first/last allowed; a
    --pipeline-model-parallel-layout: the layers of all of a rank's chunks)."""
    pp = par.pipeline_model_parallel_size
    first, last = par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers
    if par.pipeline_model_parallel_layout is not None:
        return [sum(chunks) for chunks in pipeline_layout.decoder_layers(par.pipeline_model_parallel_layout, pp)]
    if pp == 1:
        return [num_layers]
    if first is None and last is None:
        if num_layers % pp:
            raise ConfigError(f"{num_layers} decoder layers are not divisible by --pipeline-model-parallel-size {pp}")
        return [num_layers // pp] * pp
    rest, stages_left = num_layers, pp
    if first is not None:
        rest, stages_left = rest - first, stages_left - 1
    if last is not None:
        rest, stages_left = rest - last, stages_left - 1
    if rest < 0 or (stages_left > 0 and rest % stages_left):
        raise ConfigError(
            f"{num_layers} decoder layers cannot be split as first={first}, last={last} over "
            f"{pp} stages (the middle stages need an equal share)"
        )
    middle = rest // stages_left if stages_left else 0
    counts = [middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def padded_vocab(model: ModelConfig, tp: int) -> int:
    """Embedding/output rows: `config.model.padded_vocab_size` (a multiple of lcm(128, TP))."""
    return padded_vocab_size(model.llm.vocab_size, tp)


def local(p: Param, size: int, model: ModelConfig, name: str | None = None, **tags: bool) -> ParamSpec:
    """`p` on one of `size` tensor-parallel (expert-TP for an expert) ranks, named `name` (its local
    name; default: the canonical one): a split parameter's local shape is its sharding rule's
    (models/sharding.py: padded heads, padded vocabulary, even split)."""
    name = name or p.name
    if p.split:
        rule, dim = _rule(p.name)
        shape = rule.local_shape(p.shape, dim, size, model)
    else:
        shape = p.shape
    return ParamSpec(name, shape, p.part, torch_norm=p.torch_norm, expert=p.expert, **tags)


@lru_cache(maxsize=1 << 16)
def _rule(name: str) -> tuple:
    """(sharding rule, split dim) of canonical `name`: a search lists the same names for many layouts."""
    return rule_for(name), split_dim(name)


def stage_numel(model: ModelConfig, par: ParallelConfig, pp_rank: int, parts: Iterable[str]) -> tuple[int, int]:
    """(dense, expert) elements of stage `pp_rank`'s parameters of `parts` on one rank (no adapters)."""
    return _stage_numel(model, shape_key(par), pp_rank, frozenset(parts))


@lru_cache(maxsize=1024)
def _stage_numel(model: ModelConfig, par: ParallelConfig, pp_rank: int, parts: frozenset) -> tuple[int, int]:
    specs = [s for s in _stage_params(model, par, pp_rank) if s.part in parts]
    return sum(s.numel for s in specs if not s.expert), sum(s.numel for s in specs if s.expert)


def stage_params(
    model: ModelConfig, par: ParallelConfig, pp_rank: int, lora: Optional[LoRAConfig] = None
) -> list[ParamSpec]:
    """Every local parameter of pipeline stage `pp_rank` on one TP rank, in build order (the
    adapters of `lora` after the linear they adapt, as `models/lora.py: add_lora` registers them)."""
    specs = list(_stage_params(model, shape_key(par), pp_rank))
    return with_lora(specs, lora) if lora is not None and lora.enabled else specs


def shape_key(par: ParallelConfig) -> ParallelConfig:
    """`par` reduced to the sizes that shape a stage's parameters: a search visits hundreds of
    layouts that differ only in DP/CP/recompute/sequence parallel, and an MoE stage lists thousands of
    expert weights, so the cache must not miss on those (it made a 30B-A3B search take ~25 CPU-s)."""
    return ParallelConfig(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        decoder_first_pipeline_num_layers=par.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=par.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=par.pipeline_model_parallel_layout,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
    )


@lru_cache(maxsize=256)
def _stage_params(model: ModelConfig, par: ParallelConfig, pp_rank: int) -> tuple[ParamSpec, ...]:
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    check_divisibility(model, par)
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = model.llm.tie_word_embeddings
    specs = list(_vision_specs(model, tp)) if first else []
    if first:
        specs.append(local(word_embeddings(model), tp, model, shared_embedding=tied and pp > 1))
    experts = range(model.llm.num_experts // par.expert_model_parallel_size)  # local experts 0 .. E/EP - 1
    etp = par.expert_tensor_parallel_size or tp
    for i in range(decoder_layers_per_stage(model.llm.num_layers, par)[pp_rank]):  # local layer numbers
        specs += _layer_specs(model, i, len(experts), tp, etp)
    if last:
        specs.append(local(final_norm(model), tp, model))
        if not (first and tied):  # PP1 + tied: the output layer reuses the embedding
            specs.append(local(output_layer(model), tp, model, shared_embedding=tied and pp > 1))
    return tuple(specs)


@lru_cache(maxsize=256)
def _vision_specs(model: ModelConfig, tp: int) -> tuple[ParamSpec, ...]:
    """Stage 0's ViT and projector parameters on one TP rank (every split of a search lists them again)."""
    base: list[Param] = list(vision_embeddings(model))
    for i in range(vision_layers_built(model)):
        base += vision_layer(model, i)
    base += projector(model)
    return tuple(local(p, tp, model) for p in base)


@lru_cache(maxsize=1 << 12)
def _layer_specs(model: ModelConfig, i: int, local_experts: int, tp: int, etp: int) -> tuple[ParamSpec, ...]:
    """Local decoder layer `i`'s parameters on one (expert-)TP rank: every split of a search lists
    layers 0 .. n-1 of its stages again (an MoE layer holds hundreds of expert weights)."""
    return tuple(local(p, etp if p.expert else tp, model) for p in decoder_layer(model, i, range(local_experts)))


def with_lora(specs: list[ParamSpec], lora: LoRAConfig) -> list[ParamSpec]:
    """`specs` with the LoRA adapters of `lora` (part 'lora') after each adapted linear's own
    parameters. Their shapes follow the base weight's local shape (out x in): A is r x in, B out x r
    (models/lora.py: a column-parallel layer's B is split like its rows, a row-parallel layer's A
    like its columns, the other factor replicated; padded heads included)."""
    out: list[ParamSpec] = []
    for k, s in enumerate(specs):
        out.append(s)
        module = s.name.rsplit(".", 1)[0]
        nxt = specs[k + 1].name.rsplit(".", 1)[0] if k + 1 < len(specs) else None
        if nxt == module or not adapts(lora, module):
            continue
        weight = next(w for w in specs[max(0, k - 1) : k + 1] if w.name == module + ".weight")
        rows, cols = weight.shape
        out += [
            ParamSpec(f"{module}{LORA_INFIX}a", (lora.lora_rank, cols), "lora"),
            ParamSpec(f"{module}{LORA_INFIX}b", (rows, lora.lora_rank), "lora"),
        ]
    return out


def check_divisibility(model: ModelConfig, par: ParallelConfig) -> None:
    """Raise ValueError naming the shape TP does not divide (megatron-core would assert later)."""
    tp = par.tensor_model_parallel_size
    m, v = model.llm, model.vision
    need = {
        "LLM attention heads": m.num_attention_heads,
        "LLM key/value heads": m.num_query_groups,
        "LLM ffn_hidden_size": m.ffn_hidden_size,
        "LLM hidden_size (projector)": m.hidden_size,
        "ViT ffn_hidden_size": v.ffn_hidden_size,
    }
    if m.is_moe:  # the dense ffn width is unused; experts split over EP and expert-TP instead
        del need["LLM ffn_hidden_size"]
        ep, etp = par.expert_model_parallel_size, par.expert_tensor_parallel_size or tp
        if problem := expert_split_problem(model, ep):
            raise ConfigError(problem)
        if m.moe_ffn_hidden_size % etp:
            raise ConfigError(
                f"expert tensor parallel size {etp} does not divide the expert width "
                f"({m.moe_ffn_hidden_size}) of {model.name}"
            )
    for what, n in need.items():
        if n % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the {what} ({n}) of {model.name}")


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
    return ParamCounts(
        vision=by["vision"], projector=by["projector"], llm=by["llm"] - pad_rows * model.llm.hidden_size * vocab_tensors
    )


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
