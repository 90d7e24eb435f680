"""Conversions that need the model built in a parallel layout (spawned gloo worlds):

`gather_canonical_state` (a TP/PP-sharded model -> the canonical dict, inverse of
`weights.load_canonical`), `verify_layout` (load + gather in a TP x PP world, compared bit for bit),
`training_checkpoint_to_canonical` (a megatron-core dist_checkpointing training checkpoint, loaded in
the layout it was saved with and gathered), and `convert_checkpoint_to_hf` (canonical or training
checkpoint -> HF). The canonical directory itself: checkpoint/canonical.py.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.utils import unwrap_model

from ..checkpoint.canonical import CanonicalCheckpoint, model_config_from_dict, save_canonical
from ..checkpoint.format import is_training_checkpoint, resolve_iteration_dir
from ..checkpoint.safetensors_io import DEFAULT_MAX_SHARD_BYTES, ConversionError, copy_side_files, write_hf_dir
from ..checkpoint.trust import check_dist_checkpoint
from ..checkpoint.weights import load_training_weights
from ..config.model import ModelConfig, ParallelConfig
from ..models.internvl import build_model
from ..models.sharding import rule_for
from ..models.weights import ShardPlacement, is_expert_param, load_canonical, local_params
from ..parallel.state import destroy_distributed, init_distributed
from .hf import canonical_to_hf
from .hf_config import MODEL_TYPE_OF_FORMAT, hf_config_for, read_hf_config


def convert_checkpoint_to_hf(load: str | os.PathLike, save: str | os.PathLike, fmt: str,
                             template_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> list[Path]:
    """Write an HF checkpoint in format `fmt` ("internvl" | "transformers") from a canonical
    checkpoint or a training checkpoint (`training_checkpoint_to_canonical` first).

    config.json starts from the template dir's config.json, else the source's config.json (kept in the
    checkpoint) when the formats agree, so keys we do not model survive; side files (remote code,
    tokenizer) are copied from `template_dir`."""
    if is_training_checkpoint(load):
        with tempfile.TemporaryDirectory(dir=Path(save).parent if Path(save).parent.exists() else None) as tmp:
            training_checkpoint_to_canonical(load, tmp)
            return convert_checkpoint_to_hf(tmp, save, fmt, template_dir, dtype, max_shard_bytes, progress)
    ckpt = CanonicalCheckpoint.open(load)
    out_dtype = dtype or ckpt.source_dtype
    source = ckpt.meta.get("source", {})
    template = None
    if template_dir is not None:
        template = read_hf_config(template_dir)
    elif source.get("format") == fmt:
        template = source.get("hf_config")
    if template is not None and template.get("model_type") != MODEL_TYPE_OF_FORMAT.get(fmt):
        template = None  # a template of the other format only supplies side files
    config = hf_config_for(ckpt.config, fmt, out_dtype, template)
    out = Path(save)
    out.mkdir(parents=True, exist_ok=True)
    files = write_hf_dir(out, canonical_to_hf(ckpt.tensors, ckpt.config, fmt, out_dtype, progress), config,
                         max_shard_bytes)
    if template_dir is not None:
        copy_side_files(template_dir, out)
    elif fmt == "internvl":
        warnings.warn(f"{out}: no --hf-template-dir given: the export has no remote-code .py files or "
                      f"tokenizer, which InternVL's tooling needs; copy them from the original checkpoint")
    return files


# =============================================================================================
# sharded model -> canonical (inverse of weights.shard)
# =============================================================================================

def unshard(parts: Sequence[torch.Tensor], name: str, param: torch.nn.Parameter, cfg: ModelConfig) -> torch.Tensor:
    """The canonical tensor from every TP rank's piece (in TP rank order); inverse of `weights.shard`."""
    return rule_for(name).unshard(list(parts), param.partition_dim, cfg)


@torch.no_grad()
def gather_canonical_state(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The full canonical state dict of a TP/PP-sharded model on global rank 0 (None elsewhere).

    Tensors travel through gloo/pickle: meant for verification and small models, not for saving
    large training checkpoints (that is megatron-core dist_checkpointing's job). The groups are the
    ones the model was built with (`model.pg_collection`)."""
    pg = unwrap_model(model).pg_collection
    layout = ShardPlacement.of(model)
    local: dict[str, torch.Tensor] = {}
    for _, name, p in local_params(model, layout):
        t = p.detach().contiguous()
        expert = is_expert_param(name)
        size = layout.for_param(name)[1]
        if getattr(p, "tensor_model_parallel", False) and size > 1:
            group = pg.expt_tp if expert else pg.tp
            parts = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(parts, t, group=group)
            t = unshard(parts, name, p, cfg)
        local.setdefault(name, t.clone())
    if layout.ep_size > 1:  # every expert-parallel rank holds other experts: collect them all
        mine = {k: v for k, v in local.items() if is_expert_param(k)}
        expert_pieces: list[Any] = [None] * layout.ep_size
        dist.all_gather_object(expert_pieces, mine, group=pg.ep)
        for piece in expert_pieces:
            local.update(piece)
    if pg.dp.rank() != 0 or pg.tp.rank() != 0:
        return None
    pp = pg.pp.size()
    if pp > 1:
        pieces: list[Any] = [None] * pp if pg.pp.rank() == 0 else None
        dist.gather_object(local, pieces, group=pg.pp, group_dst=0)
        if pieces is None:
            return None
        merged: dict[str, torch.Tensor] = {}
        for piece in pieces:
            for k, v in piece.items():
                if k in merged and not torch.equal(merged[k], v):
                    raise ConversionError(f"{k}: pipeline stages disagree (tied embedding out of sync?)")
                merged.setdefault(k, v)
        local = merged
    return local if dist.get_rank() == 0 else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conversion_layout(tp: int = 1, pp: int = 1) -> ParallelConfig:
    """The layout a conversion world runs in: always the CPU with gloo, even on a GPU host, so a
    TP x PP larger than the visible GPUs converts, and NCCL / transformer-engine / `cuda:rank` play
    no part in it (the local specs hold the same canonical tensors)."""
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, device="cpu")


def _layout_worker(rank: int, world: int, port: int, tp: int, pp: int,
                   jobs: Sequence[tuple[str, str | None]], result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    par = conversion_layout(tp, pp)
    pg = init_distributed(par, seed=0)
    report = []
    try:
        for ckpt_dir, out_dir in jobs:
            ckpt = CanonicalCheckpoint.open(ckpt_dir)
            model = build_model(ckpt.config, par, pg)
            load_canonical(model, ckpt.tensors, ckpt.config)
            state = gather_canonical_state(model, ckpt.config)
            if state is None:
                continue
            mismatched = sorted(k for k in ckpt.tensors if k not in state or not torch.equal(state[k], ckpt.tensors[k].to(state[k].dtype)))
            report.append({"ckpt": ckpt_dir, "mismatched": mismatched, "missing_in_file": sorted(set(state) - set(ckpt.tensors))})
            if out_dir is not None:
                layout_par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
                dtypes = {k: ckpt.tensors.dtype(k) for k in ckpt.tensors}
                save_canonical(out_dir, ckpt.config, ((k, v.to(dtypes.get(k, v.dtype))) for k, v in state.items()),
                               ckpt.meta.get("source"), layout_par)
    finally:
        if rank == 0:
            Path(result_dir, "report.json").write_text(json.dumps(report))
        destroy_distributed()


def _spawn(fn: Any, nprocs: int, args: tuple, timeout_s: float, what: str) -> None:
    """Run fn(rank, nprocs, port, *args) in `nprocs` spawned processes (a gloo world) and wait."""
    ctx = mp.start_processes(fn, args=(nprocs, _free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{what} did not finish in {timeout_s:.0f}s")


def verify_layout(jobs: Sequence[tuple[str | os.PathLike, str | os.PathLike | None]], tp: int, pp: int,
                  timeout_s: float = 300.0) -> list[dict]:
    """Load each canonical checkpoint into a TP x PP model in `tp * pp` spawned gloo processes,
    gather it back, and compare bit for bit with the file. `jobs`: (checkpoint dir, optional dir
    to write the gathered canonical checkpoint to). Returns one report per checkpoint; raises
    if any tensor differs."""
    jobs = [(str(c), None if o is None else str(o)) for c, o in jobs]
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_layout_worker, tp * pp, (tp, pp, jobs, tmp), timeout_s, f"verify_layout tp={tp} pp={pp}")
        report = json.loads(Path(tmp, "report.json").read_text())
    bad = [r for r in report if r["mismatched"] or r["missing_in_file"]]
    if bad:
        raise ConversionError(f"TP{tp}xPP{pp} load/gather changed tensors: {bad}")
    return report


# =============================================================================================
# training checkpoints (megatron-core dist_checkpointing; format: internvl_mcore/checkpoint/format.py)
# =============================================================================================

def _export_worker(rank: int, world: int, port: int, tp: int, pp: int, ckpt: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    par = conversion_layout(tp, pp)
    pg = init_distributed(par, seed=0)
    try:
        _, info = resolve_iteration_dir(Path(ckpt))
        cfg = model_config_from_dict(info["model"])
        model = build_model(cfg, par, pg)
        load_training_weights(ckpt, model, cfg)
        state = gather_canonical_state(model, cfg)
        if state is not None:
            source = info.get("source") or {"dtype": "float32"}
            save_canonical(out_dir, cfg, state, source, par)
    finally:
        destroy_distributed()


def training_checkpoint_to_canonical(path: str | os.PathLike, out_dir: str | os.PathLike,
                                     timeout_s: float = 3600.0) -> ModelConfig:
    """A training checkpoint (root with the `latest` pointer, or one iter_ directory) -> canonical dir.

    The checkpoint is loaded in the TP x PP layout it was saved with (spawned gloo processes, data
    parallel size 1), so padded vision heads and vocabulary rows match whatever the saving layout
    had, then gathered and unpadded on rank 0: memory there is one full copy of the model."""
    path = Path(path)
    if not is_training_checkpoint(path):
        raise ConversionError(f"{path}: not a training checkpoint (no run.json or latest_checkpointed_iteration.txt)")
    iteration_dir, info = resolve_iteration_dir(path)
    check_dist_checkpoint(iteration_dir)  # here, for a one-line error: the workers check again
    layout = info.get("layout", {})
    tp = int(layout.get("tensor_model_parallel_size", 1))
    pp = int(layout.get("pipeline_model_parallel_size", 1))
    _spawn(_export_worker, tp * pp, (tp, pp, str(path), str(out_dir)), timeout_s,
           f"loading {path} (TP{tp} x PP{pp})")
    return model_config_from_dict(info["model"])
