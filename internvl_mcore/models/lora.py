"""LoRA adapters on megatron-core's tensor-parallel linears, sharded the way the base layer is.

A linear y = W x becomes y = W x + s * B (A dropout(x)), s = alpha / r, with A (r x in) and
B (out x r) trained and W frozen. Under tensor parallelism the adapter follows its base layer:

column-parallel (linear_qkv, linear_fc1; W split by output rows, y_local = W_local x):
    A replicated, B split by rows exactly like W -- including the fused layouts: B's rows of a
    qkv layer follow megatron's group-interleaved [q.., k, v] order and a SwiGLU fc1's B is split
    half by half ([gate; up] chunks), ViT heads padded for TP get zero rows (sharding.SHARD_RULES
    of the base weight decide, through `base_weight_name`). Each rank computes u = A x (S, B, r)
    and its own rows B_local u, so the adapted output shard equals the unsharded one.
row-parallel (linear_proj, linear_fc2; W split by input columns, y = sum_ranks W_local x_local):
    A split by columns like W, B replicated. The partial products u_k = A_local x_local are summed
    by an all-reduce of our own on the (S, B, r) tensor (r << out, so much cheaper than folding the
    (S, B, out) product into the layer's all-reduce), then every rank applies the whole B.

The r-wide exchanges are megatron-core's autograd mappings, so the backward is right too:
column: copy-to-TP-region on u (backward all-reduce: A's gradient and the input gradient need the
sum of every rank's B_local^T du); row: reduce-from-TP-region (backward identity). With sequence
parallelism they become all-gather / reduce-scatter along the sequence and the replicated factor
(column A, row B) sees only this rank's tokens, so it is tagged `sequence_parallel` and
finalize_model_grads sums its gradient over TP like a norm weight's.

Adapters are initialized layout-independently: every canonical (TP1) tensor is drawn from a
generator seeded by its canonical name (A: PEFT's kaiming-uniform, bound 1/sqrt(in); B: zero)
and sharded with the base weight's rule. Checkpoints get them through `sharded_state_dict`
(replicated vs TP-split along the right axis; the SwiGLU B through megatron's swiglu factory).

Parameters are named `<linear>.lora.a` / `<linear>.lora.b` next to `<linear>.weight`, so base
weight names (and every key map / checkpoint key) are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import unwrap_model
from torch import nn

# the adapter names and the run.json record are plain data (config/lora.py: the exports read them
# without megatron-core); re-exported here where the adapters live
from ..config.lora import LORA_TOWERS, LoRAConfig, LoRAInfo, adapts, base_weight_name, is_lora_name
from ..errors import CheckpointError
from ..config.model import ModelConfig
from .weights import ShardPlacement, canonical_shape, local_params, shard

Parallel = Literal["column", "row"]


class LoRAAdapter(nn.Module):
    """The low-rank update s * B A x of one parallel linear (this rank's shard of A and B)."""

    def __init__(
        self,
        parallel: Parallel,
        weight: torch.Tensor,
        rank: int,
        scaling: float,
        dropout: float,
        sequence_parallel: bool,
        tp_group: Any,
        gated: bool,
    ) -> None:
        super().__init__()
        out_local, in_local = weight.shape  # (out/tp, in) column-parallel, (out, in/tp) row-parallel
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.a = nn.Parameter(torch.zeros(rank, in_local, **kw))  # (r, in_local)
        self.b = nn.Parameter(torch.zeros(out_local, rank, **kw))  # (out_local, r)
        self.parallel = parallel
        self.scaling = scaling
        self.dropout = dropout
        self.sequence_parallel = sequence_parallel
        self.tp_group = tp_group
        self.gated = gated
        split, replicated = (self.b, self.a) if parallel == "column" else (self.a, self.b)
        set_tensor_model_parallel_attributes(split, True, 0 if parallel == "column" else 1, 1)
        # the replicated factor's gradient is a partial sum over this rank's tokens under SP
        replicated.sequence_parallel = sequence_parallel

    def extra_repr(self) -> str:
        return (
            f"{self.parallel}-parallel, r={self.a.shape[0]}, a={tuple(self.a.shape)}, b={tuple(self.b.shape)}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base layer's input (S, B, in_local) (sequence-split under SP) -> its output shard's update."""
        if self.dropout > 0.0 and self.training:
            if self.parallel == "row" or self.sequence_parallel:
                # this rank's slice of features (or tokens): its own mask, like megatron's TP dropout
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    x = F.dropout(x, self.dropout, True)
            else:  # replicated input: the default generator draws the same mask on every TP rank
                x = F.dropout(x, self.dropout, True)
        u = F.linear(x, self.a)  # (S, B, r), a partial sum over input shards for a row-parallel layer
        if self.parallel == "column":
            u = (
                tensor_parallel.gather_from_sequence_parallel_region(u, group=self.tp_group)
                if self.sequence_parallel
                else tensor_parallel.copy_to_tensor_model_parallel_region(u, group=self.tp_group)
            )
        else:
            u = (
                tensor_parallel.reduce_scatter_to_sequence_parallel_region(u, group=self.tp_group)
                if self.sequence_parallel
                else tensor_parallel.reduce_from_tensor_model_parallel_region(u, group=self.tp_group)
            )
        return F.linear(u, self.b) * self.scaling  # (S, B, out_local)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict:
        """A and B for dist_checkpointing: the split factor TP-sharded along its axis, the other replicated."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        axis = {"b": 0} if self.parallel == "column" else {"a": 1}
        state = self.state_dict(prefix="", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(
            state, prefix, axis, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        if self.gated:  # [gate; up] halves, each split over TP: the same factory as the fc1 weight
            key = f"{prefix}b"
            out[key] = apply_swiglu_sharded_factory(
                out[key], sharded_offsets, metadata.get("singleton_local_shards", False)
            )
        return out


class _LoRALinear:
    """Mixed into a parallel linear's class by `add_lora`: adds the adapter's update to the output
    and checkpoints the adapter with its own sharding (the linear's would call it replicated)."""

    lora: LoRAAdapter

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if kwargs.get("runtime_gather_output"):
            raise ValueError("a LoRA linear adds its update to this rank's output shard; it cannot gather it")
        out, bias = super().forward(input_, *args, **kwargs)  # type: ignore[misc]
        return out + self.lora(input_).to(out.dtype), bias

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict:
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # type: ignore[misc]
        state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}lora.")}
        state.update(self.lora.sharded_state_dict(f"{prefix}lora.", sharded_offsets, metadata))
        return state


@functools.lru_cache(maxsize=None)
def _with_lora(cls: type) -> type:
    """`cls` (any column/row-parallel linear class: local, TE, or a spec's subclass) with LoRA."""
    return type(f"LoRA{cls.__name__}", (_LoRALinear, cls), {"__module__": __name__})


def lora_info_of(model: nn.Module) -> Optional[LoRAInfo]:
    """The LoRA description of a model (DDP-wrapped or not); None without adapters."""
    return getattr(unwrap_model(model), "lora_info", None)


def _parallel_kind(name: str, linear: nn.Module) -> Parallel:
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or not getattr(weight, "tensor_model_parallel", False):
        raise TypeError(f"{name} ({type(linear).__name__}) is not a tensor-parallel linear; LoRA wraps only those")
    if weight.partition_dim == 0:
        if getattr(linear, "gather_output", False):
            raise TypeError(f"{name}: a column-parallel linear with gather_output is not supported")
        return "column"
    if not getattr(linear, "input_is_parallel", True):
        raise TypeError(f"{name}: a row-parallel linear that scatters its own input is not supported")
    return "row"


def lora_targets(model: nn.Module, lora: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear this rank's model adapts: the `lora_modules` of every layer of
    the `lora_target` towers (projector and output layer never)."""
    return [(name, m) for name, m in unwrap_model(model).named_modules() if adapts(lora, name)]


def lora_parameters(
    model: nn.Module, layout: Optional[ShardPlacement] = None
) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(local name, canonical name, parameter) of every adapter parameter."""
    model = unwrap_model(model)
    layout = layout or ShardPlacement.of(model)
    for local, name, p in local_params(model, layout):
        if is_lora_name(name):
            yield local, name, p


def lora_canonical_init(name: str, shape: tuple[int, ...], seed: int, b_std: float = 0.0) -> torch.Tensor:
    """A fresh canonical adapter tensor that depends only on (seed, name): A kaiming-uniform with bound
    1/sqrt(in) as PEFT draws it, B zero (or N(0, b_std^2), for tests that need a non-trivial B)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if name.endswith(".lora.a"):
        bound = 1.0 / math.sqrt(shape[1])
        return (torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound
    if b_std == 0.0:
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * b_std


@torch.no_grad()
def init_lora_weights(model: nn.Module, model_cfg: ModelConfig, seed: int, b_std: float = 0.0) -> None:
    """Fill every adapter with its shard of `lora_canonical_init` (the same on every layout)."""
    layout = ShardPlacement.of(unwrap_model(model))
    for _, name, p in lora_parameters(model, layout):
        base = base_weight_name(name)
        full = lora_canonical_init(name, canonical_shape(base, p, model_cfg, layout), seed, b_std)
        p.copy_(shard(full, base, p, model_cfg, layout).to(p.dtype))


def _output_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output if output.requires_grad else output.detach().requires_grad_(True)


def _make_inputs_require_grad(model: nn.Module, lora: LoRAConfig) -> list:
    """Make the embeddings that feed each adapted tower require grad (PEFT's
    `enable_input_require_grads`). megatron-core's full recompute is a reentrant checkpoint: a
    layer block whose input does not require grad returns an output that does not either, so with
    the embeddings frozen no gradient would reach any adapter inside it. Costs nothing else: the
    gradient stops at the embedding output, which nothing consumes."""
    towers = LORA_TOWERS[lora.lora_target]
    entries = {"language_model": ("language_model", "embedding"), "vision_model": ("vision_model", "embeddings")}
    hooks = []
    for tower in towers:
        module = model
        for attr in entries[tower]:
            module = getattr(module, attr, None)
        if module is not None:  # the first pipeline stage only
            hooks.append(module.register_forward_hook(_output_requires_grad))
    return hooks


def add_lora(
    model: nn.Module, lora: LoRAConfig, model_cfg: ModelConfig, seed: int, base: Optional[str] = None
) -> LoRAInfo:
    """Attach adapters to this rank's target linears, freeze every base parameter, make the
    adapters the only trainable ones and initialize them. Call after the base weights are loaded
    and before DDP / the optimizer are built (they see only trainable parameters)."""
    model = unwrap_model(model)
    if not lora.enabled:
        raise ValueError("add_lora needs --lora-rank > 0")
    if lora_info_of(model) is not None:
        raise ValueError("the model already has LoRA adapters")
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in lora_targets(model, lora):
        parallel = _parallel_kind(name, linear)
        config = linear.config
        sequence_parallel = bool(getattr(linear, "sequence_parallel", config.sequence_parallel))
        linear.lora = LoRAAdapter(
            parallel,
            linear.weight,
            lora.lora_rank,
            lora.scaling,
            lora.lora_dropout,
            sequence_parallel,
            getattr(linear, "tp_group", None),
            gated=name.endswith("mlp.linear_fc1") and bool(config.gated_linear_unit),
        )
        linear.__class__ = _with_lora(type(linear))
    init_lora_weights(model, model_cfg, seed)
    info = LoRAInfo(
        dataclasses.replace(lora, lora_modules=list(lora.lora_modules)),
        base,
        seed,
        before,
        _make_inputs_require_grad(model, lora),
    )
    model.lora_info = info
    return info


@torch.no_grad()
def merge_lora_(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += s * B A, on each rank's own shards: a column
    layer's B rows and a row layer's A columns are exactly the local weight's rows / columns) and
    remove the adapters, leaving the model as it was before `add_lora` (requires_grad included)."""
    model = unwrap_model(model)
    info = lora_info_of(model)
    if info is None:
        raise ValueError("the model has no LoRA adapters to merge")
    for _, linear in model.named_modules():
        if not isinstance(linear, _LoRALinear):
            continue
        adapter = linear.lora
        delta = (adapter.b.float() @ adapter.a.float()) * adapter.scaling  # (out_local, in_local)
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
        del linear.lora
        linear.__class__ = type(linear).__bases__[1]  # _with_lora's (_LoRALinear, base class)
    for name, p in model.named_parameters():
        p.requires_grad_(info.requires_grad_before.get(name, True))
    for handle in info.hooks:
        handle.remove()
    del model.lora_info


def adopt_checkpoint_lora(saved: Optional[dict], model: nn.Module) -> None:
    """Check that a checkpoint's LoRA record (run.json "lora") fits the model it is resumed into and
    take over the base it names (a resumed run has no --pretrained of its own). ValueError says why not."""
    mine = lora_info_of(model)
    if saved is None and mine is None:
        return
    if saved is None:
        raise CheckpointError(
            "the checkpoint has no LoRA adapters but --lora-rank is set; to start LoRA from a "
            "fully trained checkpoint use --pretrained instead of --load"
        )
    theirs = LoRAInfo.from_dict(saved)
    if mine is None:
        raise CheckpointError(
            f"the checkpoint holds LoRA adapters (rank {theirs.config.lora_rank}, target "
            f"{theirs.config.lora_target}); resume with the same --lora-* flags"
        )
    a, b = theirs.config, mine.config
    diffs = [
        f"{flag}: checkpoint {x!r}, run {y!r}"
        for flag, x, y in (
            ("--lora-rank", a.lora_rank, b.lora_rank),
            ("--lora-alpha", a.alpha, b.alpha),
            ("--lora-target", a.lora_target, b.lora_target),
            ("--lora-modules", sorted(a.lora_modules), sorted(b.lora_modules)),
        )
        if x != y
    ]
    if diffs:
        raise CheckpointError("LoRA settings differ from the checkpoint's:\n  " + "\n  ".join(diffs))
    if mine.base is None:
        mine.base, mine.seed = theirs.base, theirs.seed
