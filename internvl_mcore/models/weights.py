"""Weights in the canonical layout, and how each rank's local shard is cut from them.

The canonical layout is this model's own parameter names at TP 1 / PP 1, with real (unpadded)
vision heads and the real vocabulary: what a single process builds. Everything that must not depend
on the parallel layout goes through it: fresh initialization (`init_weights`: every tensor drawn
from a generator seeded by its canonical name), loading a full state dict into a sharded model
(`load_canonical`), and tests comparing a sharded model with the single-process one (`shard`).

How a canonical tensor becomes a local one and back is decided by the rules of models/sharding.py
(`SHARD_RULES`, data matched against the canonical name), along the partition dim megatron-core
tags the parameter with.

MoE experts: the canonical name numbers experts globally
(`...mlp.experts.local_experts.{e}.linear_fc1.weight`, e over all experts); an expert-parallel rank
holds experts [ep_rank * E/EP, (ep_rank + 1) * E/EP) as its local experts 0 .. E/EP - 1, and their
linears are split over the expert-tensor-parallel group instead of the tensor-parallel one.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.utils import unwrap_model

from ..config.model import ModelConfig
from .sharding import rule_for, split_dim


_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)(\..*)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_WEIGHT = re.compile(r"^weight\d*$")  # a linear's weight; weight{i}: transformer-engine's grouped linears
_PARALLEL_KINDS = ("ColumnParallelLinear", "RowParallelLinear", "ParallelGroupedLinear", "VocabParallelEmbedding")
_ONES = re.compile(r"(norm|layernorm|layer_norm)\.weight$")


@dataclass(frozen=True)
class ShardPlacement:
    """Where this rank sits: TP rank/size, the global index of its first decoder layer, and for MoE
    experts the expert-parallel rank/size and expert-tensor-parallel rank/size."""

    tp_rank: int
    tp_size: int
    layer_offset: int
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1

    @staticmethod
    def of(model: torch.nn.Module, pg_collection: ProcessGroupCollection | None = None) -> "ShardPlacement":
        """This rank's place in `pg_collection`, by default the groups the model was built with."""
        pg = pg_collection or unwrap_model(model).pg_collection
        layers = model.language_model.decoder.layers
        offset = layers[0].layer_number - 1 if len(layers) else 0
        ep, etp = getattr(pg, "ep", None), getattr(pg, "expt_tp", None)
        return ShardPlacement(
            pg.tp.rank(),
            pg.tp.size(),
            offset,
            ep.rank() if ep is not None else 0,
            ep.size() if ep is not None else 1,
            etp.rank() if etp is not None else 0,
            etp.size() if etp is not None else 1,
        )

    def for_param(self, name: str) -> tuple[int, int]:
        """(rank, size) of the group a parameter is tensor-split over: expert-TP for expert weights."""
        return (self.etp_rank, self.etp_size) if is_expert_param(name) else (self.tp_rank, self.tp_size)


def is_expert_param(name: str) -> bool:
    """An MoE expert's weight (split over expert-parallel and expert-tensor-parallel ranks)."""
    return _EXPERT.match(name) is not None


def mark_tensor_parallel_params(model: torch.nn.Module) -> None:
    """Tag TP-split weights the way megatron-core's own initializers do, along `sharding.split_dim`.

    With `perform_initialization=False` (weights come from `init_weights` / a checkpoint instead)
    megatron-core's linears skip tagging their weights; the grad-norm, optimizer, LoRA and checkpoint
    code read these tags, so they are set here. transformer-engine tags its weights itself, but a
    linear it builds with `parallel_mode=None` -- megatron-core's expert linears whenever expert-TP or
    EP > 1 -- gets every weight tagged as split on dim 0, the row-parallel fc2 included; so the dim of
    a tagged weight is corrected from the table too (else canonical shapes and exports go wrong)."""
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        if not any(k in kind for k in _PARALLEL_KINDS):
            continue
        for pname, weight in module.named_parameters(recurse=False):
            if not _WEIGHT.match(pname):
                continue
            name = f"{module_name}.{pname}"
            if getattr(weight, "tensor_model_parallel", False):
                weight.partition_dim = split_dim(name)
                continue
            if hasattr(weight, "tensor_model_parallel"):
                continue  # tagged as replicated
            if getattr(module, "is_expert", False) and module.tp_group.size() == 1:
                continue  # an expert linear with expert-TP 1 is whole on every rank that holds it
            dim = split_dim(name)
            if dim != (1 if "Row" in kind else 0):
                raise ValueError(
                    f"{name}: a {kind} whose name models/sharding.py's ROW_PARALLEL "
                    f"{'matches' if dim else 'does not match'}; extend the table"
                )
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def canonical_name(local_name: str, model: torch.nn.Module, layout: ShardPlacement) -> str:
    """Local parameter name -> canonical name (global layer index; a last-stage copy of tied
    embeddings -> the embedding itself)."""
    e = _EXPERT.match(local_name)
    if e:  # local expert j of expert-parallel rank r is global expert r * (E / EP) + j
        per_rank = unwrap_model(model).model_cfg.llm.num_experts // layout.ep_size
        local_name = f"{e.group(1)}{layout.ep_rank * per_rank + int(e.group(2))}{e.group(3)}"
    m = _LAYER.match(local_name)
    if m:
        return f"{m.group(1)}{int(m.group(2)) + layout.layer_offset}{m.group(3)}"
    if local_name == "language_model.output_layer.weight" and unwrap_model(model).share_embeddings_and_output_weights:
        return "language_model.embedding.word_embeddings.weight"
    return local_name


def shard(
    full: torch.Tensor, name: str, param: torch.nn.Parameter, cfg: ModelConfig, layout: ShardPlacement
) -> torch.Tensor:
    """This rank's piece of the canonical tensor `full` for the local parameter `param`."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    rank, size = layout.for_param(name)
    return rule_for(name).shard(full, param.partition_dim, rank, size, cfg)


def canonical_shape(name: str, param: torch.nn.Parameter, cfg: ModelConfig, layout: ShardPlacement) -> tuple[int, ...]:
    """Shape of the canonical tensor behind a local parameter (inverse of `shard` on shapes)."""
    if not getattr(param, "tensor_model_parallel", False):
        return tuple(param.shape)
    return rule_for(name).canonical_shape(tuple(param.shape), param.partition_dim, layout.for_param(name)[1], cfg)


def local_params(model: torch.nn.Module, layout: ShardPlacement) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, canonical name, parameter) for every parameter of this rank's model."""
    model = unwrap_model(model)
    for local, p in model.named_parameters():
        yield local, canonical_name(local, model, layout), p


def canonical_init(
    name: str,
    shape: tuple[int, ...],
    cfg: ModelConfig,
    seed: int,
    std: float = 0.02,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A fresh canonical tensor that depends only on (seed, name, device type): same on every layout.

    Drawn on `device` with that device's generator: on a GPU the full tensor is drawn there in
    milliseconds instead of on the host (the CUDA and CPU streams differ, so a GPU-initialized
    model is not the CPU-initialized one; both are layout-independent)."""
    if name.endswith((".ls1", ".ls2")):
        return torch.full(shape, cfg.vision.layer_scale_init, device=device)
    if _ONES.search(name):
        return torch.ones(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=gen, device=device) * std


@torch.no_grad()
def init_weights(
    model: torch.nn.Module, cfg: ModelConfig, seed: int, pg_collection: ProcessGroupCollection | None = None
) -> None:
    """Fill every parameter with its shard of `canonical_init` (fresh training)."""
    layout = ShardPlacement.of(unwrap_model(model), pg_collection)
    for _, name, p in local_params(model, layout):
        full = canonical_init(name, canonical_shape(name, p, cfg, layout), cfg, seed, device=p.device)
        p.copy_(shard(full, name, p, cfg, layout).to(p.dtype))


def shard_index(name: str, param: torch.nn.Parameter, cfg: ModelConfig, layout: ShardPlacement) -> torch.Tensor | None:
    """The canonical positions along the partition dim that this rank's shard of `name` holds, in
    order, -1 for padding; None for a replicated parameter (the shard is the whole tensor).

    Found by sharding the positions themselves with the parameter's rule (models/sharding.py), so the
    slices a reader fetches are by construction the ones `shard` would cut."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    rank, size = layout.for_param(name)
    length = canonical_shape(name, param, cfg, layout)[param.partition_dim]
    positions = torch.arange(1, length + 1, dtype=torch.int64)  # 0: the zeros a rule pads with
    return rule_for(name).shard(positions, 0, rank, size, cfg) - 1


def read_shard(
    state: Mapping[str, torch.Tensor],
    name: str,
    param: torch.nn.Parameter,
    cfg: ModelConfig,
    layout: ShardPlacement,
    into_param: bool = False,
) -> torch.Tensor:
    """This rank's shard of the canonical tensor `state[name]` for the local parameter `param`.

    A source with `read_index(name, dim, index, out)` (convert/: SafetensorsDir for canonical
    checkpoints, HFAsCanonical for HF directories) reads only the shard's slices, so a rank holds its
    shard and never the whole tensor -- with `into_param`, straight into the parameter's memory where
    the dtypes agree (then the result is `param.data`); any other mapping is indexed whole and cut
    with `shard`."""
    index = shard_index(name, param, cfg, layout)
    reader = getattr(state, "read_index", None)
    if index is None or not callable(reader):
        return shard(state[name], name, param, cfg, layout)
    return reader(name, param.partition_dim, index, param.data if into_param else None)


@torch.no_grad()
def load_canonical(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    pg_collection: ProcessGroupCollection | None = None,
    strict: bool = True,
) -> None:
    """Copy a canonical (TP1/PP1) state dict into this rank's shards; shape errors name the key.

    Tensor by tensor through `read_shard`: from a lazy source a rank reads only its own slices, so
    its peak host memory is its model shard plus one local tensor (none where the slices go straight
    into the parameter; replicated tensors are read whole: the rank holds them whole)."""
    layout = ShardPlacement.of(unwrap_model(model), pg_collection)
    for local, name, p in local_params(model, layout):
        if name not in state:
            if strict:
                raise KeyError(f"canonical state dict has no {name!r} (for local parameter {local!r})")
            continue
        lazy = callable(getattr(state, "shape", None))  # knows shapes without reading the tensor
        full = None if lazy else state[name]
        got = tuple(state.shape(name)) if lazy else tuple(full.shape)
        want = canonical_shape(name, p, cfg, layout)
        if got != want:
            raise ValueError(f"{name}: canonical tensor has shape {got}, model expects {want}")
        piece = read_shard(state, name, p, cfg, layout, into_param=True) if lazy else shard(full, name, p, cfg, layout)
        if piece.data_ptr() != p.data_ptr():  # else read straight into the parameter
            p.copy_(piece.to(p.dtype))
        del full, piece  # before the next read: at most one tensor besides the model at a time


def canonical_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The canonical state dict of a single-process (TP1/PP1) model."""
    layout = ShardPlacement(0, 1, 0)
    return {name: p.detach().clone() for _, name, p in local_params(model, layout)}
