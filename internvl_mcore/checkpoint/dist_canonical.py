"""A training checkpoint's model tensors under their canonical names (models/weights.py: this model's
own names at TP1/PP1, global layer and expert indices, real vision heads, real vocabulary), read one
tensor at a time from the torch_dist files (checkpoint/dist_reader.py): no model, no process group.

Megatron-core's checkpoint keys are already free of TP/PP/EP: layers and experts are stacked along
prepended axes, or (with `singleton_local_shards` / non-homogeneous layers) numbered in the key,
and the TP pieces tile the global tensor (SwiGLU's fc1 included: its global tensor is [gate; up]).
What is left to undo is padding that depends on the saving layout: vocabulary rows
(lcm(128, TP)) and InternViT's zero heads (multiple of TP), removed with the rules of
models/sharding.py (`unpad` along `split_dim`). So a canonical name maps to (key, index):

    language_model.decoder.layers.{i}.X                                <- layers.X[i]  or  layers.{i}.X
    ...layers.{i}.mlp.experts.local_experts.{e}.Y                      <- layers.mlp.experts.experts.Y[i, e]
                                                                          (or with i / e in the key)
    vision_model.encoder.layers.{i}.X                                  <- the same for the ViT blocks
    anything else                                                      <- the key itself

Both layer-spec backends write the same keys (models/specs.py; transformer-engine's `_extra_state`
items are not tensors). Tied embeddings are saved once, under the embedding's key. Optimizer
state (`optimizer.*`, `chained_<k>.optimizer.*` keys) is left out unless `include` asks for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from ..config.model import ModelConfig
from ..models.sharding import rule_for, split_dim
from .dist_reader import DistCheckpointReader, RowRanges

_LAYERS = re.compile(r"^(?P<pre>(?:vision_model\.encoder|language_model\.decoder)\.layers\.)(?P<i>\d+\.)?(?P<rest>.+)$")
_EXPERTS = re.compile(r"^mlp\.experts\.experts\.(?P<e>\d+\.)?(?P<rest>.+)$")
_OPTIMIZER = re.compile(r"^(chained_\d+\.)?optimizer\.")
"""Optimizer state: `optimizer.state.<exp_avg|...>.<model key>`, `chained_<k>.optimizer...` when
megatron-core chains optimizers (MoE: one for the experts, one for the rest)."""


def is_model_key(key: str) -> bool:
    """A model tensor (not optimizer state)."""
    return _OPTIMIZER.match(key) is None


@dataclass(frozen=True)
class Place:
    """Where a canonical tensor is: the checkpoint key and the index of its box (stacked axes)."""

    key: str
    index: tuple[int, ...] = ()


def _numbers(fixed: str | None, size: int) -> list[tuple[int, bool]]:
    """(index, stacked) for a layer / expert number written in the key, else every slot of its axis."""
    return [(int(fixed[:-1]), False)] if fixed else [(n, True) for n in range(size)]


def canonical_places(key: str, shape: tuple[int, ...]) -> Iterator[tuple[str, Place]]:
    """(canonical name, place) of every canonical tensor checkpoint key `key` (of global `shape`) holds."""
    m = _LAYERS.match(key)
    if m is None:
        yield key, Place(key)
        return
    axis = 0
    for i, stacked_i in _numbers(m["i"], shape[axis] if not m["i"] else 0):
        e = _EXPERTS.match(m["rest"])
        layer_ix = (i,) if stacked_i else ()
        if e is None:
            yield f"{m['pre']}{i}.{m['rest']}", Place(key, layer_ix)
            continue
        expert_axis = len(layer_ix)
        for x, stacked_x in _numbers(e["e"], shape[expert_axis] if not e["e"] else 0):
            yield (
                f"{m['pre']}{i}.mlp.experts.local_experts.{x}.{e['rest']}",
                Place(key, layer_ix + ((x,) if stacked_x else ())),
            )


def unpad(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The canonical tensor from its global (saving-layout padded) one: vocabulary rows and InternViT
    heads cut to the real ones by the tensor's sharding rule (a no-op for every other rule)."""
    if t.dim() == 0:
        return t
    dim = split_dim(name) if t.dim() > 1 else 0
    rule = rule_for(name)
    real = rule.unpadded(t.shape[dim], 1, cfg)
    return t if real == t.shape[dim] else rule.unpad(t, dim, cfg)


class DistCanonicalView(Mapping[str, torch.Tensor]):
    """The canonical tensors of one torch_dist checkpoint directory, each read when it is indexed
    (memory: that tensor plus one chunk). `shape` and `dtype` come from the index alone."""

    def __init__(
        self, reader: DistCheckpointReader, cfg: ModelConfig, include: Callable[[str], bool] = is_model_key
    ) -> None:
        self.reader, self.cfg = reader, cfg
        self.places: dict[str, Place] = {}
        for key in reader.keys():
            if include(key):
                self.places.update(canonical_places(key, reader.shape(key)))

    def __getitem__(self, name: str) -> torch.Tensor:
        place = self.places[name]
        return unpad(name, self.reader.read(place.key, place.index), self.cfg)

    def __iter__(self) -> Iterator[str]:
        return iter(self.places)

    def __len__(self) -> int:
        return len(self.places)

    def __contains__(self, name: object) -> bool:
        return name in self.places

    def shape(self, name: str) -> tuple[int, ...]:
        place = self.places[name]
        shape = list(self.reader.shape(place.key)[len(place.index) :])
        if shape:
            dim = split_dim(name) if len(shape) > 1 else 0
            shape[dim] = rule_for(name).unpadded(shape[dim], 1, self.cfg)
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(self.places[name].key)

    def stored_rows(self, name: str) -> RowRanges | None:
        """Where each row of canonical tensor `name` lies in the files (`DistCheckpointReader.row_ranges`),
        padding rows left out; None where its rows are not byte ranges of the files (pieces split
        along another dim, padding along another dim, a 0-dim tensor)."""
        place = self.places[name]
        where = self.reader.row_ranges(place.key, place.index)
        if where is None:
            return None
        padded = len(where.offsets)
        shape = self.reader.shape(place.key)[len(place.index) :]
        dim = split_dim(name) if len(shape) > 1 else 0
        real = rule_for(name).unpadded(shape[dim], 1, self.cfg)
        if real == shape[dim]:
            return where
        if dim != 0:
            return None
        rows = rule_for(name).unpad(torch.arange(padded), 0, self.cfg)  # the rule run on row numbers
        return where.take(rows) if len(rows) == real else None
