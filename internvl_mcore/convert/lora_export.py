"""Export a LoRA training checkpoint: adapters merged into a full HF model, or a PEFT adapter.

    merged:  W' = W + (alpha / r) * B A for every adapted linear, then the ordinary key map to
             either HF layout.
    PEFT:    adapter_config.json + adapter_model.safetensors for transformers'
             `InternVLForConditionalGeneration`, loadable with `peft.PeftModel.from_pretrained` on top
             of the transformers export of the base.

Both read the checkpoint's torch_dist files directly (convert/export.py's `open_training_checkpoint`:
checkpoint/dist_reader.py + dist_canonical.py): no model is built and no process group is needed,
whatever TP / PP layout saved it. A tensor is read as its global (TP1) tensor, one layer at a time,
and padding is undone with the sharding rules of models/sharding.py: the canonical view unpads the
weights, `CheckpointTensors` the adapters (an adapter's split factor is padded like its base weight:
a column layer's B rows, a row layer's A columns), so layouts that pad vision heads or vocabulary
rows export too. The merged export streams through `write_hf_export`: each HF tensor is computed
from one canonical weight and its A and B (memory: a few of the largest tensors); the PEFT adapter
is held whole (it is the size of the adapters).

Our fused linears become several PEFT modules. The key map's reshape function for the base weight
(`keymaps.TRANSFORMS`, which only rearranges rows) is applied to B, and every resulting module gets
the same A: for linear_qkv -> q/k/v_proj that is B's rows split like the weight's (group-interleaved
-> q, k, v), for a SwiGLU fc1 -> gate_proj/up_proj the two halves. Since delta_W = B A row by row,
each module's B_part A is exactly its rows of delta_W.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch

from internvl_mcore.cli_errors import naming, read_json
from ..checkpoint.canonical import META_NAME
from ..checkpoint.format import RUN_INFO, TRACKER, is_training_checkpoint, resolve_iteration_dir
from ..checkpoint.safetensors_io import DEFAULT_MAX_SHARD_BYTES, tensor_dtype, write_safetensors
from ..errors import ConversionError
from ..config.lora import LoRAInfo, base_weight_name, is_lora_name
from ..config.model import ModelConfig
from ..models.sharding import rule_for, split_dim
from .export import ExportSource, open_training_checkpoint, write_hf_export
from .keymaps import TRANSFORMERS_READ_ALIASES, expand, keymap

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRACheckpoint:
    """A LoRA training checkpoint in the canonical layout (TP1 / PP1 names, unpadded)."""

    path: Path
    """The iter_ directory read."""
    config: ModelConfig
    """The model."""
    lora: LoRAInfo
    """Rank, alpha, targets, and the base the adapters sit on."""
    base: dict[str, torch.Tensor]
    """Canonical base weights (empty when read with adapters_only)."""
    adapters: dict[str, torch.Tensor]
    """Canonical adapters: `<linear>.lora.a` (r, in) and `<linear>.lora.b` (out, r)."""


def _iter_dir_and_info(path: Path) -> tuple[Path, dict]:
    if not is_training_checkpoint(path):
        raise ConversionError(f"{path}: not a training checkpoint (no {RUN_INFO} or {TRACKER})")
    return resolve_iteration_dir(path)


def is_lora_checkpoint(path: str | os.PathLike) -> bool:
    """A training checkpoint whose run.json records LoRA adapters."""
    path = Path(path)
    if not is_training_checkpoint(path):
        return False
    return _iter_dir_and_info(path)[1].get("lora") is not None


# =============================================================================================
# canonical tensors of a training checkpoint, read from its files
# =============================================================================================


def _unpad_adapter(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """An adapter's split factor is padded like its base weight along the weight's split dim (a column
    layer's B rows, a row layer's A columns); the replicated factor is never padded."""
    base = base_weight_name(name)
    dim = split_dim(base)
    if (dim == 0) != name.endswith(".lora.b"):
        return t
    rule = rule_for(base)
    return t if rule.unpadded(t.shape[dim], 1, cfg) == t.shape[dim] else rule.unpad(t, dim, cfg)


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """The canonical tensors (base weights and adapters) of a LoRA training checkpoint, read when
    indexed: the checkpoint's canonical view (checkpoint/dist_canonical.py, which unpads weights by
    their sharding rules) with the adapters unpadded like their base weights."""

    def __init__(self, view: Mapping[str, torch.Tensor], cfg: ModelConfig, where: Path) -> None:
        self.view, self.cfg, self.where = view, cfg, where

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.view[name]
        if not is_lora_name(name):
            return t
        t = _unpad_adapter(name, t, self.cfg)
        if tuple(t.shape) != self.shape(name):
            raise ConversionError(
                f"{self.where}: adapter {name} has shape {tuple(t.shape)}, but its weight "
                f"{base_weight_name(name)} is {tuple(self.view.shape(base_weight_name(name)))}"
            )
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.view)

    def __len__(self) -> int:
        return len(self.view)

    def __contains__(self, name: object) -> bool:
        return name in self.view

    def shape(self, name: str) -> tuple[int, ...]:
        """Canonical shape, from the checkpoint's index alone (an adapter's from its weight's)."""
        if not is_lora_name(name):
            return tuple(self.view.shape(name))
        base = base_weight_name(name)
        if base not in self.view:
            raise ConversionError(f"{self.where}: adapter {name} without its weight {base}")
        out_dim, in_dim = self.view.shape(base)
        saved = self.view.shape(name)
        return (saved[0], in_dim) if name.endswith(".lora.a") else (out_dim, saved[1])

    def dtype(self, name: str) -> torch.dtype:
        return self.view.dtype(name)


def _open(path: str | os.PathLike) -> tuple[Path, ExportSource, dict, LoRAInfo]:
    """(iter_ dir, its canonical tensors as an ExportSource, run.json, LoRA record) of a LoRA checkpoint."""
    iter_dir, info = _iter_dir_and_info(Path(path))
    if info.get("lora") is None:
        raise ConversionError(f"{iter_dir}/run.json: not a LoRA checkpoint (no 'lora' record)")
    src, _ = open_training_checkpoint(iter_dir)
    src.tensors = CheckpointTensors(src.tensors, src.config, iter_dir)
    return iter_dir, src, info, LoRAInfo.from_dict(info["lora"])


def read_lora_checkpoint(path: str | os.PathLike, adapters_only: bool = False) -> LoRACheckpoint:
    """Every canonical tensor of a LoRA training checkpoint (root or iter_ dir, any TP/PP layout),
    read into memory (for tests and small models; the exports below stream)."""
    iter_dir, src, _, lora = _open(path)
    tensors = src.tensors
    adapters = {k: tensors[k] for k in tensors if is_lora_name(k)}
    base = {} if adapters_only else {k: tensors[k] for k in tensors if not is_lora_name(k)}
    return LoRACheckpoint(iter_dir, src.config, lora, base, adapters)


# =============================================================================================
# merged export
# =============================================================================================


def adapter_pairs(adapters: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Canonical base weight name -> (name of its A, name of its B); a lone A or B is an error naming it."""
    pairs: dict[str, dict[str, str]] = {}
    for name in adapters:
        pairs.setdefault(base_weight_name(name), {})[name.rsplit(".", 1)[1]] = name
    for w, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise ConversionError(f"adapter of {w} has {sorted(ab)} but needs both lora.a and lora.b")
    return {w: (ab["a"], ab["b"]) for w, ab in pairs.items()}


@torch.no_grad()
def merge_weight(name: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A (computed in fp32, stored in W's dtype); `name` names W in the error."""
    if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
        raise ConversionError(
            f"adapter of {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the weight {tuple(weight.shape)}"
        )
    delta = b.float() @ a.float()
    # in place: one (out, in) fp32 temporary; fp32 addition commutes, so this is W.float() + s * B A exactly
    return delta.mul_(scaling).add_(weight).to(weight.dtype)


def merge_adapters(
    base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """Canonical base + adapters -> canonical merged weights (in memory; see `MergedWeights`)."""
    merged = MergedWeights(base, adapters, scaling)
    return {name: merged[name] for name in merged}


class MergedWeights(Mapping[str, torch.Tensor]):
    """Canonical merged weights, each computed when indexed from its base weight and adapter."""

    def __init__(self, base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], scaling: float) -> None:
        self.base, self.adapters, self.scaling = base, adapters, scaling
        self.pairs = adapter_pairs(adapters)
        missing = sorted(w for w in self.pairs if w not in base)
        if missing:
            raise ConversionError(f"adapter for {missing[0]!r}, but the base has no such weight")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.pairs:
            return self.base[name]
        a, b = self.pairs[name]
        return merge_weight(name, self.base[name], self.adapters[a], self.adapters[b], self.scaling)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        """The base weight's shape (merging keeps it)."""
        shape = getattr(self.base, "shape", None)
        return shape(name) if callable(shape) else tuple(self.base[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """The base weight's dtype (merging keeps it): the export's default dtype reads it."""
        return tensor_dtype(self.base, name)


class _Only(Mapping[str, torch.Tensor]):
    """The names of `src` that `keep` accepts (a lazy view)."""

    def __init__(self, src: Mapping[str, torch.Tensor], keep: Callable[[str], bool]) -> None:
        self.src, self._names = src, [n for n in src if keep(n)]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.src[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return tensor_dtype(self.src, name)


def _source_meta(base: Optional[str], info: dict) -> dict:
    """The `source` record (HF format, dtype, config.json) of the canonical checkpoint the run started
    from, when it still exists: the merged export then keeps its dtype and config keys; else the
    training checkpoint's own."""
    if base and (Path(base) / META_NAME).exists():
        source = read_json(Path(base) / META_NAME, ConversionError).get("source", {})
        if source:
            return source
    return info.get("source") or {"dtype": "float32"}


def export_merged(
    load: str | os.PathLike,
    save: str | os.PathLike,
    fmt: str,
    template_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: Optional[int] = None,
    progress: bool = False,
) -> list[Path]:
    """`tools/convert_to_hf.py --merge-lora`: a full HF model (format "internvl" or "transformers")
    with the adapters merged into the weights, streamed from the checkpoint's files (each weight
    merged when its HF tensors are written). The canonical source record (dtype, original
    config.json) of the base the run started from is carried over, so the export keeps them."""
    _, src, info, lora = _open(load)
    tensors = src.tensors
    merged = MergedWeights(
        _Only(tensors, lambda n: not is_lora_name(n)), _Only(tensors, is_lora_name), lora.config.scaling
    )
    return write_hf_export(
        ExportSource(merged, src.config, _source_meta(lora.base, info)),
        save,
        fmt,
        template_dir,
        dtype,
        max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
        progress,
    )


# =============================================================================================
# PEFT adapter
# =============================================================================================


def _module_name(hf_weight: str) -> str:
    """On-disk transformers weight name -> the module's name in the loaded model (what PEFT targets)."""
    for in_memory, on_disk in TRANSFORMERS_READ_ALIASES:
        if hf_weight.startswith(on_disk):
            hf_weight = in_memory + hf_weight[len(on_disk) :]
            break
    if not hf_weight.endswith(".weight"):
        raise ConversionError(f"{hf_weight}: not a linear weight")
    return hf_weight[: -len(".weight")]


def peft_adapter_tensors(adapters: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical adapters -> PEFT tensors for transformers' InternVL model:
    `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)."""
    entries = {e.canonical: e for e in expand(keymap("transformers", cfg.llm.family), cfg) if e.present}
    out: dict[str, torch.Tensor] = {}
    for w, (a_name, b_name) in sorted(adapter_pairs(adapters).items()):
        a, b = adapters[a_name], adapters[b_name]
        if w not in entries:
            raise ConversionError(f"adapter of {w!r}: the transformers layout has no weight for it")
        e = entries[w]
        parts = e.transform.to_hf(b, cfg)  # B's rows split / reordered exactly like the weight's
        for hf_name, b_part in zip(e.hf, parts):
            module = _module_name(hf_name)
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_part.contiguous()
    return out


def _target_regex(modules: list[str]) -> str:
    """A regex PEFT full-matches against module names, naming exactly `modules` (layer indices as
    alternations, so the config stays short for deep models)."""
    groups: dict[str, list[str]] = {}
    for m in modules:
        template = re.sub(r"\.(\d+)\.", ".{i}.", m, count=1)
        index = re.search(r"\.(\d+)\.", m)
        groups.setdefault(template, []).append(index.group(1) if index else "")
    alternatives = []
    for template, indices in sorted(groups.items()):
        idx = "(?:" + "|".join(sorted(set(indices), key=lambda s: (len(s), s))) + ")"
        alternatives.append(re.escape(template).replace(re.escape("{i}"), idx))
    return "(?:" + "|".join(alternatives) + ")"


def peft_adapter_config(modules: list[str], lora: "LoRAInfo", base_name_or_path: Optional[str] = None) -> dict:  # noqa: F821
    """adapter_config.json of a PEFT LoRA adapter on `modules` (names in the transformers model)."""
    c = lora.config
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": c.lora_rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.lora_dropout,
        "target_modules": _target_regex(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_name_or_path,
        "auto_mapping": {
            "base_model_class": "InternVLForConditionalGeneration",
            "parent_library": "transformers.models.internvl.modeling_internvl",
        },
    }


def export_peft_adapter(
    load: str | os.PathLike,
    save: str | os.PathLike,
    dtype: torch.dtype | None = None,
    base_name_or_path: Optional[str] = None,
) -> Path:
    """`tools/convert_to_hf.py --lora-only`: write a PEFT adapter directory for the transformers export
    of the base. Returns the safetensors path."""
    ckpt = read_lora_checkpoint(load, adapters_only=True)
    tensors = peft_adapter_tensors(ckpt.adapters, ckpt.config)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    modules = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors})
    out = Path(save)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    config = peft_adapter_config(modules, ckpt.lora, base_name_or_path)
    with naming(out / ADAPTER_CONFIG):
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out / ADAPTER_WEIGHTS


def export_lora(
    load: str | os.PathLike,
    save: str | os.PathLike,
    fmt: str,
    merge: bool,
    lora_only: bool,
    template_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: Optional[int] = None,
    progress: bool = False,
) -> list[Path]:
    """The LoRA side of tools/convert_to_hf.py: checks the flags against the checkpoint, then
    `export_merged` (--merge-lora) or `export_peft_adapter` (--lora-only)."""
    if merge and lora_only:
        raise ConversionError("--merge-lora and --lora-only exclude each other")
    lora = is_lora_checkpoint(load)
    if not lora:
        raise ConversionError(
            f"{load}: {'--merge-lora' if merge else '--lora-only'} needs a LoRA training "
            "checkpoint (its run.json has no 'lora' record)"
        )
    if not (merge or lora_only):
        raise ConversionError(
            f"{load} holds LoRA adapters: pass --merge-lora (full model with the adapters "
            "merged) or --lora-only (a PEFT adapter for the base's transformers export)"
        )
    if lora_only:
        if fmt != "transformers":
            raise ConversionError(
                "--lora-only writes a PEFT adapter for transformers' InternVL model: use --format transformers"
            )
        return [export_peft_adapter(load, save, dtype, str(template_dir) if template_dir else None)]
    return export_merged(load, save, fmt, template_dir, dtype, max_shard_bytes, progress)
