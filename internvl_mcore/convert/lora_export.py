"""Export a LoRA training checkpoint: adapters merged into a full HF model, or a PEFT adapter.

    merged:  W' = W + (alpha / r) * B A for every adapted linear (each rank's shards, in the layout
             that saved the checkpoint), then the ordinary conversion to either HF layout.
    PEFT:    adapter_config.json + adapter_model.safetensors for transformers'
             `InternVLForConditionalGeneration`, loadable with `peft.PeftModel.from_pretrained` on top
             of the transformers export of the base.

Our fused linears become several PEFT modules. The key map's reshape function for the base weight
(`keymaps.TRANSFORMS`, which only rearranges rows) is applied to B, and every resulting module gets
the same A: for linear_qkv -> q/k/v_proj that is B's rows split like the weight's (group-interleaved
-> q, k, v), for a SwiGLU fc1 -> gate_proj/up_proj the two halves. Since delta_W = B A row by row,
each module's B_part A is exactly its rows of delta_W.

For the PEFT adapter (and `read_lora_checkpoint`) a training checkpoint is read in this process at
TP1 x PP1 (megatron-core dist_checkpointing reshards whatever layout saved it); layouts whose padded
vision heads or vocabulary rows change tensor shapes are refused (see its docstring).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.process_groups_config import ProcessGroupCollection

from internvl_mcore.cli_errors import naming, read_json
from ..checkpoint.canonical import META_NAME, model_config_from_dict
from ..checkpoint.format import RUN_INFO, TRACKER, is_training_checkpoint, resolve_iteration_dir
from ..checkpoint.safetensors_io import DEFAULT_MAX_SHARD_BYTES, ConversionError, write_safetensors
from ..checkpoint.trust import check_dist_checkpoint
from ..config.lora import LORA_TOWERS
from ..config.megatron import padded_vision_heads
from ..config.model import ModelConfig, ParallelConfig
from ..models.internvl import build_model
from ..models.language import padded_vocab_size
from ..models.lora import LoRAInfo, add_lora, base_weight_name, is_lora_name
from ..models.weights import canonical_state_dict
from ..parallel.state import init_distributed, process_groups
from .distributed import convert_checkpoint_to_hf, training_checkpoint_to_canonical
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


def _ensure_single_process_world() -> ProcessGroupCollection:
    """The groups of this process's TP1 x PP1 world (joined here when there is none yet)."""
    if dist.is_initialized() and ps.model_parallel_is_initialized():
        pg = process_groups()
        sizes = (pg.tp.size(), pg.pp.size())
        if sizes != (1, 1):
            raise ConversionError(f"reading a checkpoint needs a TP1 x PP1 world; this process has TP{sizes[0]} x PP{sizes[1]}")
        return pg
    return init_distributed(ParallelConfig(device="cpu"), seed=0)  # conversion: CPU + gloo anywhere


def read_lora_checkpoint(path: str | os.PathLike, adapters_only: bool = False) -> LoRACheckpoint:
    """Load a LoRA training checkpoint (root or iter_ dir, any TP/PP layout) into a TP1 model in this
    process and return its canonical tensors.

    A layout whose TP size pads tensors (vision heads not divisible by TP, as InternViT-6B's 25;
    vocabulary rows) saved them with other global shapes than TP1 has, and is refused: export such a
    run's adapters with `adapters_only` when they are not on the padded tensors (LLM-only LoRA
    pads nothing), or merge them (`export_merged` loads at the saved layout)."""
    iter_dir, info = _iter_dir_and_info(Path(path))
    if info.get("lora") is None:
        raise ConversionError(f"{iter_dir}/run.json: not a LoRA checkpoint (no 'lora' record)")
    cfg = model_config_from_dict(info["model"])
    lora = LoRAInfo.from_dict(info["lora"])
    tp = int(info.get("layout", {}).get("tensor_model_parallel_size", 1))
    padded = []
    if padded_vision_heads(cfg.vision.num_attention_heads, tp) != cfg.vision.num_attention_heads and (
            not adapters_only or "vision_model" in _towers(lora)):
        padded.append(f"{cfg.vision.num_attention_heads} vision heads are padded at TP{tp}")
    if padded_vocab_size(cfg.llm.vocab_size, tp) != cfg.llm.vocab_size and not adapters_only:
        padded.append(f"vocabulary {cfg.llm.vocab_size} is padded at TP{tp}")
    if padded:
        raise ConversionError(f"{iter_dir}: {'; '.join(padded)}, so its tensors do not load at TP1; "
                              "see read_lora_checkpoint's docstring for the ways out")
    model = build_model(cfg, ParallelConfig(device="cpu"), _ensure_single_process_world())
    add_lora(model, lora.config, cfg, seed=lora.seed)
    sharded = model.sharded_state_dict()
    if adapters_only:
        sharded = {k: v for k, v in sharded.items() if ".lora." in k}
    check_dist_checkpoint(iter_dir)  # its pickled parts, before megatron-core unpickles them
    # nested under "model" as training/checkpoint.py saves it (the common state holds more keys)
    loaded = dist_checkpointing.load({"model": sharded}, str(iter_dir))["model"]
    model.load_state_dict(loaded, strict=not adapters_only)
    state = canonical_state_dict(model)
    adapters = {k: v for k, v in state.items() if is_lora_name(k)}
    base = {} if adapters_only else {k: v for k, v in state.items() if not is_lora_name(k)}
    return LoRACheckpoint(iter_dir, cfg, lora, base, adapters)


def _towers(lora: LoRAInfo) -> tuple[str, ...]:
    return LORA_TOWERS[lora.config.lora_target]


def adapter_pairs(adapters: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Canonical base weight name -> (A, B) of its adapter; a lone A or B is an error naming it."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in adapters.items():
        pairs.setdefault(base_weight_name(name), {})[name.rsplit(".", 1)[1]] = t
    for w, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise ConversionError(f"adapter of {w} has {sorted(ab)} but needs both lora.a and lora.b")
    return {w: (ab["a"], ab["b"]) for w, ab in pairs.items()}


@torch.no_grad()
def merge_adapters(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor],
                   scaling: float) -> dict[str, torch.Tensor]:
    """Canonical base + adapters -> canonical merged weights: W + scaling * B A (computed in fp32,
    stored in W's dtype)."""
    merged = dict(base)
    for w, (a, b) in adapter_pairs(adapters).items():
        if w not in base:
            raise ConversionError(f"adapter for {w!r}, but the base has no such weight")
        weight = base[w]
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
            raise ConversionError(f"adapter of {w}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the weight "
                                  f"{tuple(weight.shape)}")
        merged[w] = (weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype)
    return merged


def _source_meta(base: Optional[str]) -> dict:
    """The `source` record (HF format, dtype, config.json) of the canonical checkpoint the run started
    from, when it still exists: the merged export then keeps its dtype and config keys."""
    if base and (Path(base) / META_NAME).exists():
        return read_json(Path(base) / META_NAME, ConversionError).get("source", {})
    return {}


def export_merged(load: str | os.PathLike, save: str | os.PathLike, fmt: str,
                  template_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                  max_shard_bytes: Optional[int] = None, progress: bool = False) -> list[Path]:
    """`tools/convert_to_hf.py --merge-lora`: a full HF model (format "internvl" or "transformers")
    with the adapters merged into the weights.

    The converter's training-checkpoint path does the work: it loads the checkpoint in the layout
    that saved it (so padded heads / vocabulary are no obstacle), where `checkpoint/weights.py:
    load_training_weights` folds each rank's adapter shards into its weight shards (`models.lora.merge_lora_`),
    and gathers the merged canonical weights. The canonical source record (dtype, original
    config.json) of the base the run started from is carried over, so the export keeps them."""
    iter_dir, info = _iter_dir_and_info(Path(load))
    if info.get("lora") is None:
        raise ConversionError(f"{iter_dir}/run.json: not a LoRA checkpoint (no 'lora' record)")
    source = _source_meta(info["lora"].get("base"))
    out = Path(save)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merged-canonical-") as tmp:
        training_checkpoint_to_canonical(iter_dir, tmp)
        if source:
            meta = read_json(Path(tmp) / META_NAME, ConversionError)
            meta["source"] = source
            (Path(tmp) / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return convert_checkpoint_to_hf(tmp, out, fmt, template_dir, dtype,
                                        max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, progress)


def _module_name(hf_weight: str) -> str:
    """On-disk transformers weight name -> the module's name in the loaded model (what PEFT targets)."""
    for in_memory, on_disk in TRANSFORMERS_READ_ALIASES:
        if hf_weight.startswith(on_disk):
            hf_weight = in_memory + hf_weight[len(on_disk):]
            break
    if not hf_weight.endswith(".weight"):
        raise ConversionError(f"{hf_weight}: not a linear weight")
    return hf_weight[: -len(".weight")]


def peft_adapter_tensors(adapters: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical adapters -> PEFT tensors for transformers' InternVL model:
    `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)."""
    entries = {e.canonical: e for e in expand(keymap("transformers", cfg.llm.family), cfg) if e.present}
    out: dict[str, torch.Tensor] = {}
    for w, (a, b) in sorted(adapter_pairs(adapters).items()):
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
        "peft_type": "LORA", "task_type": None, "r": c.lora_rank, "lora_alpha": c.alpha,
        "lora_dropout": c.lora_dropout, "target_modules": _target_regex(modules), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_name_or_path,
        "auto_mapping": {"base_model_class": "InternVLForConditionalGeneration",
                         "parent_library": "transformers.models.internvl.modeling_internvl"},
    }


def export_peft_adapter(load: str | os.PathLike, save: str | os.PathLike, dtype: torch.dtype | None = None,
                        base_name_or_path: Optional[str] = None) -> Path:
    """`tools/convert_to_hf.py --lora-only`: write a PEFT adapter directory for the transformers export
    of the base. Returns the safetensors path."""
    ckpt = read_lora_checkpoint(load, adapters_only=True)
    tensors = peft_adapter_tensors(ckpt.adapters, ckpt.config)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    modules = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    out = Path(save)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    config = peft_adapter_config(modules, ckpt.lora, base_name_or_path)
    with naming(out / ADAPTER_CONFIG):
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out / ADAPTER_WEIGHTS


def export_lora(load: str | os.PathLike, save: str | os.PathLike, fmt: str, merge: bool, lora_only: bool,
                template_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                max_shard_bytes: Optional[int] = None, progress: bool = False) -> list[Path]:
    """The LoRA side of tools/convert_to_hf.py: checks the flags against the checkpoint, then
    `export_merged` (--merge-lora) or `export_peft_adapter` (--lora-only)."""
    if merge and lora_only:
        raise ConversionError("--merge-lora and --lora-only exclude each other")
    lora = is_lora_checkpoint(load)
    if not lora:
        raise ConversionError(f"{load}: {'--merge-lora' if merge else '--lora-only'} needs a LoRA training "
                              "checkpoint (its run.json has no 'lora' record)")
    if not (merge or lora_only):
        raise ConversionError(f"{load} holds LoRA adapters: pass --merge-lora (full model with the adapters "
                              "merged) or --lora-only (a PEFT adapter for the base's transformers export)")
    if lora_only:
        if fmt != "transformers":
            raise ConversionError("--lora-only writes a PEFT adapter for transformers' InternVL model: "
                                  "use --format transformers")
        return [export_peft_adapter(load, save, dtype, str(template_dir) if template_dir else None)]
    return export_merged(load, save, fmt, template_dir, dtype, max_shard_bytes, progress)
