"""LoRA configuration: which parallel linears get low-rank adapters, of which rank and scale.

Every field becomes a flag through `config/cli.py` (`--lora-rank 16 --lora-target all ...`); the
adapters themselves live in `models/lora.py`, their export in `convert/lora_export.py`. The adapter
parameter names (`<linear>.lora.a` / `.lora.b`) and the run.json record (`LoRAInfo`) are here, plain
data, so that the export reads them without importing megatron-core.

Module names are megatron-core's, the same in the LLM and the ViT:

    linear_qkv   fused q/k/v projection     LLM q_proj/k_proj/v_proj    ViT attn.qkv (q/k/v_proj)
    linear_proj  attention output           LLM o_proj                  ViT attn.proj (projection_layer)
    linear_fc1   MLP input                  LLM gate_proj + up_proj     ViT mlp.fc1
    linear_fc2   MLP output                 LLM down_proj               ViT mlp.fc2

A fused linear gets one adapter: one A shared by q, k and v (and by gate and up), and a B with a row
for every output row. Exported to per-projection PEFT modules, the shared A is repeated and B is
split like the weight, which gives exactly the same update.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional
from ..errors import CheckpointError

LORA_MODULES: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""Every module name `--lora-modules` accepts."""

LORA_TOWERS: dict[str, tuple[str, ...]] = {
    "llm": ("language_model",),
    "vit": ("vision_model",),
    "all": ("language_model", "vision_model"),
}
"""`--lora-target` -> the top-level parts of the model whose layers get adapters (the projector is
small and is never adapted: it stays frozen under LoRA, as in InternVL's LoRA recipes)."""


@dataclass
class LoRAConfig:
    """LoRA fine-tuning: low-rank adapters on the tensor-parallel linears, base weights frozen."""

    lora_rank: int = 0
    """Rank r of the adapters (0: no LoRA, train as the stage says)."""
    lora_alpha: Optional[float] = None
    """Scale numerator: the update is (alpha / r) * B A (default 2 * r, as InternVL uses)."""
    lora_dropout: float = 0.05
    """Dropout on the adapter's input during training (InternVL's value)."""
    lora_target: Literal["llm", "vit", "all"] = "llm"
    """Which towers get adapters: the language model, the vision encoder, or both."""
    lora_modules: list[str] = field(default_factory=lambda: list(LORA_MODULES))
    """Adapted linears in each layer of the target towers (linear_qkv linear_proj linear_fc1 linear_fc2)."""

    @property
    def enabled(self) -> bool:
        """LoRA is on (rank > 0)."""
        return self.lora_rank > 0

    @property
    def alpha(self) -> float:
        """lora_alpha with its default filled in."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def scaling(self) -> float:
        """The factor alpha / r applied to B A x."""
        return self.alpha / self.lora_rank

    def to_dict(self) -> dict:
        """JSON-able form (what checkpoints record)."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "LoRAConfig":
        """Inverse of `to_dict`; unknown keys are refused by name."""
        names = {f.name for f in dataclasses.fields(LoRAConfig)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"unknown LoRA setting(s) {', '.join(unknown)}")
        return LoRAConfig(**dict(d))


LORA_INFIX = ".lora."


def adapts(lora: LoRAConfig, module: str) -> bool:
    """Whether the linear named `module` gets an adapter: one of `lora_modules` in a layer of the
    `lora_target` towers (the projector and the output layer never). models/lora.py attaches the
    adapters by it; the planner (plan/params.py) lists them by it."""
    return (
        module.split(".", 1)[0] in LORA_TOWERS[lora.lora_target]
        and ".layers." in module
        and module.rsplit(".", 1)[-1] in lora.lora_modules
        and not is_routed_expert(module)
    )


def is_routed_expert(module: str) -> bool:
    """A linear of an MoE layer's routed experts (`...mlp.experts.local_experts.E.linear_fc1`; not
    the shared experts'). These get no adapter: megatron-core's expert linears are expert-parallel
    (each EP rank holds other experts, their gradients reduce over the expert-data-parallel group
    and their checkpoint keys carry the global expert index), which the adapter does not model;
    adapting them would train wrongly at EP > 1. Attention, dense MLPs and shared experts are adapted."""
    return ".mlp.experts." in module


def is_lora_name(name: str) -> bool:
    """A LoRA adapter parameter (`...linear_qkv.lora.a`)."""
    return LORA_INFIX in name


def base_weight_name(name: str) -> str:
    """`x.lora.a` / `x.lora.b` -> `x.weight`: the base weight whose sharding rule the adapter follows."""
    return name.split(LORA_INFIX, 1)[0] + ".weight"


@dataclass
class LoRAInfo:
    """What a model's adapters are and what they sit on (recorded in checkpoints' run.json)."""

    config: LoRAConfig
    """Rank, alpha, dropout, target towers and modules."""
    base: Optional[str] = None
    """The base weights: the --pretrained path the run started from (None: fresh init from `seed`)."""
    seed: int = 0
    """Seed of the adapter init (and of the base init when `base` is None)."""
    requires_grad_before: dict = dataclasses.field(default_factory=dict, repr=False)
    """Each base parameter's requires_grad before `add_lora` froze it (restored by `merge_lora_`)."""
    hooks: list = dataclasses.field(default_factory=list, repr=False)
    """Forward-hook handles of `_make_inputs_require_grad` (removed by `merge_lora_`)."""

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {**self.config.to_dict(), "base": self.base, "seed": self.seed}

    @staticmethod
    def from_dict(d: dict) -> "LoRAInfo":
        """Inverse of `to_dict`."""
        d = dict(d)
        base, seed = d.pop("base", None), d.pop("seed", 0)
        return LoRAInfo(LoRAConfig.from_dict(d), base, seed)
