"""Streaming conversion between HF tensors and canonical tensors through the key maps
(convert/keymaps.py), for both HF layouts, and `convert_hf_to_checkpoint` (an HF directory -> a
canonical checkpoint, tensor by tensor).

The HF directory's pieces live elsewhere: safetensors I/O and the directory files in
checkpoint/safetensors_io.py, config.json <-> ModelConfig in convert/hf_config.py, the canonical
directory in checkpoint/canonical.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import torch
from tqdm import tqdm

from ..checkpoint.canonical import save_canonical
from ..checkpoint.safetensors_io import (DEFAULT_MAX_SHARD_BYTES, ConversionError, Renamed, SafetensorsDir, dtype_name,
                                         source_dtype, tensor_shape)
from ..config.model import ModelConfig, ParallelConfig
from .hf_config import model_config_from_hf, read_hf_config
from .keymaps import READ_ALIASES, Entry, canonical_shapes, expand, keymap

# =============================================================================================
# streaming tensor conversion
# =============================================================================================

def _expected_hf_shapes(e: Entry, cfg: ModelConfig, canonical_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """HF shapes a canonical shape maps to. Every transform splits/stacks along dim 0 only, so a
    probe with the real dim 0 and size-1 trailing dims finds them without allocating the tensor
    (meta tensors would work too, but their first use imports torch's whole compiler stack: ~10 s)."""
    head, rest = canonical_shape[0], tuple(canonical_shape[1:])
    probe = torch.empty((head,) + (1,) * len(rest))
    return [(t.shape[0],) + rest for t in e.transform.to_hf(probe, cfg)]


def _normalize(src: Mapping[str, torch.Tensor], fmt: str) -> Mapping[str, torch.Tensor]:
    aliases = READ_ALIASES[fmt]
    return Renamed(src, aliases) if aliases else src


def _where(src: Mapping[str, torch.Tensor], name: str) -> str:
    base = src.base if isinstance(src, Renamed) else src
    orig = src.original(name) if isinstance(src, Renamed) else name
    where = getattr(base, "where", None)
    return f"{orig!r} in {where(orig)}" if callable(where) else repr(orig)


def check_hf_tensors(src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str) -> list[Entry]:
    """Refuse a checkpoint whose tensors do not match the key map and config (names the key)."""
    entries = expand(keymap(fmt, cfg.llm.family), cfg)
    shapes = canonical_shapes(cfg)
    wanted: set[str] = set()
    for e in entries:
        if not e.present:
            continue
        for h, want in zip(e.hf, _expected_hf_shapes(e, cfg, shapes[e.canonical])):
            wanted.add(h)
            if h not in src:
                raise ConversionError(f"missing tensor {h!r} (for {e.canonical}) in the {fmt} checkpoint")
            got = tensor_shape(src, h)
            if got != want:
                raise ConversionError(f"tensor {_where(src, h)} has shape {got}, but config.json implies {want}")
    extra = sorted(set(src) - wanted)
    if extra and cfg.llm.tie_word_embeddings:
        # an in-memory state dict of a tied model also lists lm_head; harmless if it is the embedding
        tied = {e.hf[0] for e in entries if e.canonical == "language_model.output_layer.weight"}
        emb = next(e.hf[0] for e in entries if e.canonical == "language_model.embedding.word_embeddings.weight")
        for h in [x for x in extra if x in tied]:
            if not torch.equal(src[h], src[emb]):
                raise ConversionError(f"tensor {_where(src, h)} differs from {emb!r} but config.json ties them")
            extra.remove(h)
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ConversionError(f"unexpected tensor(s) {', '.join(_where(src, x) for x in extra[:5])}{more}: "
                              f"not part of the {fmt} layout of this config")
    return entries


def hf_to_canonical(src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str,
                    progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (canonical name, tensor) pairs from HF tensors; validates everything before the first
    tensor is read. Tensors keep their dtype."""
    src = _normalize(src, fmt)
    entries = [e for e in check_hf_tensors(src, cfg, fmt) if e.present]
    for e in tqdm(entries, desc="HF -> canonical", unit="tensor", disable=None if progress else True):  # a bar on a terminal only
        yield e.canonical, e.transform.to_canonical([src[h] for h in e.hf], cfg).contiguous()


class HFAsCanonical(Mapping[str, torch.Tensor]):
    """The canonical tensors of an HF checkpoint, each converted when it is read (so a rank loading
    its shards reads only the HF tensors it needs). Names, shapes and the layout are validated first."""

    def __init__(self, src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str) -> None:
        self.src = _normalize(src, fmt)
        self.cfg = cfg
        self._entries = {e.canonical: e for e in check_hf_tensors(self.src, cfg, fmt) if e.present}

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        return e.transform.to_canonical([self.src[h] for h in e.hf], self.cfg).contiguous()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def canonical_to_hf(src: Mapping[str, torch.Tensor], cfg: ModelConfig, fmt: str,
                    dtype: torch.dtype | None = None, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, tensor) pairs in format `fmt` from canonical tensors (cast to `dtype` if
    given). Refuses missing, unexpected or mis-shaped canonical tensors before writing anything."""
    entries = [e for e in expand(keymap(fmt, cfg.llm.family), cfg) if e.present]
    shapes = canonical_shapes(cfg)
    known = {e.canonical for e in entries}
    for e in entries:
        if e.canonical not in src:
            raise ConversionError(f"canonical checkpoint has no tensor {e.canonical!r}")
    extra = sorted(set(src) - known)
    if extra:
        raise ConversionError(f"canonical checkpoint has tensor(s) {', '.join(map(repr, extra[:5]))} that the "
                              f"{fmt} layout of this config has no place for")
    for name in known & set(src):
        got = tensor_shape(src, name)
        if got != shapes[name]:
            raise ConversionError(f"canonical tensor {name!r} has shape {got}, the config implies {shapes[name]}")
    for e in tqdm(entries, desc=f"canonical -> {fmt}", unit="tensor", disable=None if progress else True):  # a bar on a terminal only
        t = src[e.canonical]
        for h, out in zip(e.hf, e.transform.to_hf(t, cfg)):
            yield h, (out if dtype is None else out.to(dtype)).contiguous()


# =============================================================================================
# end-to-end conversion
# =============================================================================================

def convert_hf_to_checkpoint(hf_dir: str | os.PathLike, save: str | os.PathLike, layout: ParallelConfig | None = None,
                             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> ModelConfig:
    """Read an HF checkpoint (either layout; the format and model come from config.json) and write a
    canonical checkpoint. Everything is validated before the first tensor is converted."""
    hf_config = read_hf_config(hf_dir)
    cfg, fmt = model_config_from_hf(hf_config, hf_dir)
    src = SafetensorsDir(hf_dir)
    dtype = source_dtype(src)
    source = {"format": fmt, "dtype": dtype_name(dtype), "hf_config": hf_config, "hf_dir": str(Path(hf_dir).resolve())}
    save_canonical(save, cfg, hf_to_canonical(src, cfg, fmt, progress=progress), source, layout, max_shard_bytes)
    return cfg
