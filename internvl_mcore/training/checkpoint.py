"""Training checkpoints: megatron-core dist_checkpointing for model + optimizer, small files for the rest.

    SAVE/iter_0000010/            one checkpoint (dist_checkpointing: layout-independent tensors)
        run.json                  iteration, LR-schedule state, model config, layout, format version
        rank_00003.json           per-rank RNG states (python, numpy, torch, the TP RNG tracker, cuda)
        data_dp00001.json         data-loader position of data-parallel rank 1
        checksums.json            size and sha256 of every other file, checked by --load
        .metadata, *.distcp, common.pt, metadata.json   megatron-core's part
    SAVE/latest_checkpointed_iteration.txt

A checkpoint is written into tmp_iter_NNNNNNN/ and renamed only when every rank has finished, then
the `latest` pointer is replaced atomically, so a crash mid-save leaves the previous checkpoint as
the one `--load` finds. `--load` verifies the checksums (the ranks share the files) and, when the
latest checkpoint fails them, falls back to the newest older one that passes (a warning names the
file that failed; --no-fallback refuses instead); a root whose tracker is gone resumes from its newest
complete checkpoint with a warning. --keep-checkpoints N deletes all but the newest N. A save that
fails (a full disk on any rank) removes its tmp_iter_ directory and stops every rank with one line. Loading into another TP/PP/DP layout restores the model weights (megatron-core
reshards them) and, when the data-parallel size is unchanged, the data position; optimizer state and
RNG streams are restored only on the same layout.

Nothing in a checkpoint directory is trusted to be what we wrote (whoever wrote the directory wrote
its checksums too): our files are JSON (byte tensors as base64), and megatron-core's pickled parts
are checked by checkpoint/trust.py before it reads them. Format version 2 (this one) always has
checksums.json: one without it is refused. Version 1 kept the RNG and data files as pickles; --load
refuses such a checkpoint (its weights load with --pretrained or tools/convert_to_hf.py, which read
only the megatron-core part).

This module saves and resumes a training run (model, optimizer, RNG, data position, schedule); the
directory format and tracker (checkpoint/format.py), checksums (checkpoint/checksums.py), the choice
of the checkpoint --load takes (checkpoint/selection.py) and reading a checkpoint's model weights
(checkpoint/weights.py) are in internvl_mcore/checkpoint/, shared with convert/.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from ..checkpoint.canonical import CanonicalCheckpoint
from ..checkpoint.checksums import write_checksums
from ..checkpoint.format import (FORMAT_VERSION, RUN_INFO, TRACKER, CheckpointError, check_model, checkpoint_dir,
                                 is_training_checkpoint, iter_dir, read_run_json)
from ..checkpoint.safetensors_io import ConversionError, SafetensorsDir
from ..checkpoint.selection import remove_old_checkpoints
from ..checkpoint.weights import load_across_backends, load_training_weights
from ..config.model import ModelConfig, ParallelConfig
from ..convert.hf import HFAsCanonical
from ..convert.hf_config import model_config_from_hf, read_hf_config
from ..convert.source import checkpoint_kind
from ..models.lora import adopt_checkpoint_lora, lora_info_of
from ..models.weights import load_canonical
from .guards import fault_point


def writable_problem(save: str) -> Optional[str]:
    """Why --save DIR cannot take checkpoints (checked at start-up, before any training), or None."""
    path = Path(save)
    probe = path / f".write_test_{os.uname().nodename}_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return f"--save {save}: cannot write there ({exc.strerror or exc})"
    return None


def _tensor_json(t: torch.Tensor) -> dict:
    """An RNG-state tensor as JSON: dtype, shape and its bytes in base64."""
    shape = list(t.shape)
    t = t.detach().cpu().contiguous().reshape(-1)
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": shape,
            "base64": base64.b64encode(t.view(torch.uint8).numpy().tobytes()).decode()}


def _json_tensor(d: dict) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {d['dtype']!r}")
    raw = bytearray(base64.b64decode(d["base64"], validate=True))
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(d["shape"]).clone()


def rng_state() -> dict:
    """Every random stream a step draws from on this rank, as JSON-serializable values."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"python": [version, list(keys), gauss],
            "numpy": [name, [int(k) for k in mt], int(pos), int(has_gauss), float(cached)],
            "torch": _tensor_json(torch.get_rng_state()),
            "tracker": {k: _tensor_json(v) for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
            "cuda": None if cuda is None else [_tensor_json(t) for t in cuda]}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`."""
    version, keys, gauss = state["python"]
    random.setstate((int(version), tuple(int(k) for k in keys), None if gauss is None else float(gauss)))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.array(mt, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(_json_tensor(state["torch"]))
    tensor_parallel.get_cuda_rng_tracker().set_states({k: _json_tensor(v) for k, v in state["tracker"].items()})
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_json_tensor(t) for t in state["cuda"]])


def _read_state(file: Path, use: Any) -> Any:
    """`use(state)` of JSON file `file`; a malformed one is an error naming it."""
    try:
        return use(json.loads(file.read_text()))
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: unusable ({type(exc).__name__}: {exc})") from None


# The distributed optimizer's default checkpoint format in megatron-core 0.16 uses flattened ranges,
# which its torch_dist backend refuses; "dp_reshardable" stores each DP rank's flat shard instead.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _init_optimizer_state(optimizer: Any) -> None:
    """Create Adam's state tensors before loading into them.

    megatron-core's sharded_state_dict(is_loading=True) builds the state through `init_state_fn`
    for apex/TE's fused Adam; torch's Adam (the CPU fallback) creates it lazily at the first step,
    so an optimizer that has not stepped yet has nothing to load into. Zero-filled state with a
    step count of 0 is what Adam holds before its first step. Other optimizers are left alone."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        # only torch's Adam creates its state lazily and keeps a 'step' tensor per parameter; apex's
        # and TE's FusedAdam have their own state layout (TE's state_dict() raises KeyError on a
        # 'step' entry) and megatron-core builds it for them
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _restore_adam_step(optimizer: Any, loaded: dict) -> None:
    """megatron-core 0.16's distributed optimizer keeps torch Adam's step in its param groups but then
    overwrites the per-parameter step with the value in its dp_reshardable buffer state, which is
    the pre-load zero; put the saved step back (a no-op for the plain optimizer, whose state round
    trips as is)."""
    saved = loaded.get("optimizer") if isinstance(loaded, dict) else None
    if not isinstance(saved, dict) or "param_groups" not in saved:
        return
    steps = {g["step"] for g in saved["param_groups"] if "step" in g}
    if len(steps) != 1:
        return
    step = float(steps.pop())
    inner = getattr(optimizer, "optimizer", None)
    for state in (inner.state.values() if inner is not None else []):
        if "step" in state:
            state["step"] = torch.tensor(step)


def _layout(par: ParallelConfig, dp: int) -> dict:
    layout = {"tensor_model_parallel_size": par.tensor_model_parallel_size,
              "pipeline_model_parallel_size": par.pipeline_model_parallel_size,
              "context_parallel_size": par.context_parallel_size, "data_parallel_size": dp}
    if par.expert_model_parallel_size != 1 or par.expert_tensor_parallel_size is not None:
        # optimizer state of expert weights is sharded over the expert data-parallel group
        layout.update(expert_model_parallel_size=par.expert_model_parallel_size,
                      expert_tensor_parallel_size=par.expert_tensor_parallel_size)
    return layout


def _groups(pg: Optional[ProcessGroupCollection], module: torch.nn.Module) -> ProcessGroupCollection:
    """The process groups a save/load runs in: the ones given, else the ones the model was built on."""
    return pg if pg is not None else module.pg_collection


def save(root: str | Path, iteration: int, model_chunk: torch.nn.Module, optimizer: Any, scheduler: Any,
         model_cfg: ModelConfig, par: ParallelConfig, pg: Optional[ProcessGroupCollection] = None,
         data_state: Any = None, extra: Optional[dict] = None, keep: int = 0) -> Path:
    """Write checkpoint `iteration` under `root` atomically (collective: every rank calls it); with
    `keep` > 0 only the newest `keep` checkpoints stay. `pg`: the process groups init_distributed
    returned (default: the model's own, `pg_collection`).

    The save runs in phases (prepare, write, checksums, publish); after each one the ranks agree
    whether every rank's writes succeeded (an all-gather, bounded by the process group's timeout), so
    a write that fails on one rank (a full disk, a quota, EIO) stops all of them together: the partial
    tmp_iter_ directory is removed by every rank and CheckpointError names --save and the reason;
    the earlier checkpoints and the tracker are untouched."""
    root = Path(root)
    rank = dist.get_rank()
    tmp, final = iter_dir(root, iteration, tmp=True), iter_dir(root, iteration)
    module = unwrap_model(model_chunk)
    pg = _groups(pg, module)

    def write() -> None:
        _write_state(tmp, iteration, module, optimizer, pg, data_state)
        if rank == 0:
            (tmp / RUN_INFO).write_text(json.dumps(_run_info(iteration, scheduler, model_cfg, par, pg, module, extra),
                                                   indent=2, default=str))

    phases = [lambda: _prepare(tmp) if rank == 0 else None, write, lambda: write_checksums(tmp),
              lambda: _publish(root, tmp, final, iteration) if rank == 0 else None]
    for phase in phases:
        failed = _agree(_attempt(phase))
        if failed:
            _abandon(root, tmp, iteration, failed)
    if rank == 0 and keep:
        remove_old_checkpoints(root, keep)
    dist.barrier()
    return final


def _prepare(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a save that was interrupted
    tmp.mkdir(parents=True)


def _write_state(tmp: Path, iteration: int, module: torch.nn.Module, optimizer: Any, pg: ProcessGroupCollection,
                 data_state: Any) -> None:
    """This rank's part of the checkpoint: its tensor shards (collective), RNG states, data position."""
    model_sd = module.sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)
    dist_checkpointing.save(state, str(tmp))
    (tmp / f"rank_{dist.get_rank():05d}.json").write_text(json.dumps({"rng": rng_state()}))
    if pg.tp.rank() == 0 and pg.pp.rank() == 0 and pg.cp.rank() == 0:  # one data position per DP rank
        (tmp / f"data_dp{pg.dp.rank():05d}.json").write_text(json.dumps(data_state))
    fault_point("save", iteration)


def _run_info(iteration: int, scheduler: Any, model_cfg: ModelConfig, par: ParallelConfig,
              pg: ProcessGroupCollection, module: torch.nn.Module, extra: Optional[dict]) -> dict:
    """run.json's content."""
    info = {"format_version": FORMAT_VERSION, "iteration": iteration,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "model": dataclasses.asdict(model_cfg),
            "layout": _layout(par, pg.dp.size()),
            "world_size": dist.get_world_size(), **(extra or {})}
    lora = lora_info_of(module)
    if lora is not None:  # LoRA run: its adapters are in the tensors; name the base they sit on
        info["lora"] = lora.to_dict()
    return info


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc`, what it was raised from, and (dist-checkpoint's CheckpointException) every rank's failure."""
    out: list[BaseException] = []
    todo = [exc]
    while todo and len(out) < 20:
        e = todo.pop(0)
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [pair[0] for pair in e.failures.values()]
    return [e for e in out if e is not None]


def write_failure(exc: BaseException) -> Optional[str]:
    """Why a checkpoint write failed ('No space left on device: FILE'), or None when `exc` is not a
    failed write (a lost peer or a bug, which keep their own handling)."""
    for e in _causes(exc):
        if isinstance(e, OSError) and not isinstance(e, ConnectionError):
            reason = e.strerror or str(e) or type(e).__name__
            return f"{reason}: {e.filename}" if e.filename else reason
    text = str(exc)
    if isinstance(exc, (RuntimeError, CheckpointException)) and any(
            marker in text for marker in ("file write failed", "unexpected pos", "Worker failure")):
        return " ".join(text.split())[:300]
    return None


def _attempt(phase: Any) -> Optional[str]:
    """Run one phase of a save on this rank: None, or why its writes failed."""
    try:
        phase()
    except (OSError, RuntimeError, CheckpointException) as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        return reason
    return None


def _agree(reason: Optional[str]) -> list[str]:
    """Every rank's failure of this phase ('rank R: reason'), the same list on every rank (collective,
    bounded by the process group's timeout, --distributed-timeout-minutes)."""
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return [f"rank {r}: {text}" for r, text in enumerate(reasons) if text]


def _abandon(root: Path, tmp: Path, iteration: int, failed: list[str]) -> None:
    """Every rank removes the partial checkpoint (its node's part, when --save is node-local), then the
    save fails on all of them with the same line."""
    shutil.rmtree(tmp, ignore_errors=True)
    if dist.get_rank() == 0:
        (root / (TRACKER + ".tmp")).unlink(missing_ok=True)
    dist.barrier()
    raise CheckpointError(f"--save {root}: writing checkpoint iteration {iteration} failed ({'; '.join(failed)}); "
                          f"removed the partial {tmp.name}, the earlier checkpoints and {TRACKER} are unchanged")


def _publish(root: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Rename the finished checkpoint into place, then point `latest` at it (both atomic). The new
    pointer is written before anything is renamed, so a full disk leaves the old state as it was."""
    pointer = root / (TRACKER + ".tmp")
    pointer.write_text(str(iteration))
    with open(pointer) as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    os.replace(pointer, root / TRACKER)


def load(root: str | Path, model_chunk: torch.nn.Module, optimizer: Any, scheduler: Any, model_cfg: ModelConfig,
         par: ParallelConfig, pg: Optional[ProcessGroupCollection] = None,
         load_optim: bool = True) -> tuple[int, Any, dict]:
    """Resume from `root`: a checkpoint directory (iter_NNNNNNN/, as `select` returns) or a --save
    root (its latest checkpoint). Returns (iteration, this rank's data state or None when the
    data-parallel size changed, the run.json). The scheduler state is left to the caller unless a
    scheduler is given (training/schedule.py decides what a changed schedule means). `pg`: the process
    groups init_distributed returned (default: the model's own, `pg_collection`)."""
    path = checkpoint_dir(root)
    info = read_run_json(path)
    iteration = int(info["iteration"])
    check_model(info, model_cfg, path)
    module = unwrap_model(model_chunk)
    pg = _groups(pg, module)
    dp = pg.dp.size()
    same_layout = info["layout"] == _layout(par, dp)
    _adopt_lora(info, module, path)
    model_sd = module.sharded_state_dict()
    state = {"model": model_sd}
    restore_all = same_layout and load_optim and optimizer is not None
    if restore_all:
        _init_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_METADATA)
    loaded = load_across_backends(state, path, module)
    if scheduler is not None and info.get("scheduler") is not None:
        scheduler.load_state_dict(info["scheduler"])
    if restore_all:
        with torch.no_grad():  # the distributed optimizer copies into leaf parameters
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_step(optimizer, loaded["optimizer"])
        _read_state(path / f"rank_{dist.get_rank():05d}.json", lambda state: set_rng_state(state["rng"]))
    elif dist.get_rank() == 0:
        print(f"checkpoint {path} was saved with layout {info['layout']}: restored model weights, schedule and "
              f"data position{'' if same_layout else ' (where the data-parallel size allows)'}; fresh optimizer "
              "state", flush=True)
    if info["layout"]["data_parallel_size"] != dp:
        return iteration, None, info
    return iteration, _read_state(path / f"data_dp{pg.dp.rank():05d}.json", lambda state: state), info


def _adopt_lora(info: dict, module: torch.nn.Module, where: Path) -> None:
    """The run's LoRA flags must match the checkpoint's adapters; the run takes over the base they name."""
    try:
        adopt_checkpoint_lora(info.get("lora"), module)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def load_weights(path: str | Path, model_chunk: torch.nn.Module, model_cfg: ModelConfig) -> str:
    """Weights only (`--pretrained`): a training checkpoint (root or iter_ dir, any layout), a
    canonical checkpoint from tools/convert_from_hf.py, or an HF checkpoint directory (either layout,
    converted on the fly). From the latter two each rank reads only the slices of its own shards
    (models/weights.py: load_canonical), so its peak host memory is its shard plus one local tensor.
    Returns which kind was read."""
    path = Path(path)
    module = unwrap_model(model_chunk)
    if is_training_checkpoint(path):
        return load_training_weights(path, module, model_cfg)
    if not path.exists():
        raise CheckpointError(f"--pretrained {path}: no such file or directory")
    if checkpoint_kind(path) == "hf":
        return _load_hf_weights(path, module, model_cfg)
    try:
        ckpt = CanonicalCheckpoint.open(path)
    except ConversionError as exc:  # a damaged model_config.json or safetensors header, named by the reader
        raise CheckpointError(f"--pretrained {path}: {exc}") from None
    check_model({"model": dataclasses.asdict(ckpt.config), "name": ckpt.config.name}, model_cfg, path)
    load_canonical(module, ckpt.tensors, ckpt.config)
    return "converted checkpoint"


def _load_hf_weights(path: Path, module: torch.nn.Module, model_cfg: ModelConfig) -> str:
    """An HF checkpoint directory (either layout), converted tensor by tensor while each rank loads its
    shards: what tools/convert_from_hf.py would write, without the intermediate files. Each rank
    reads only the HF slices its shards are made of (convert/hf.py: HFAsCanonical.read_index)."""
    try:
        cfg, fmt = model_config_from_hf(read_hf_config(path), path)
        check_model({"model": dataclasses.asdict(cfg), "name": cfg.name}, model_cfg, path)
        load_canonical(module, HFAsCanonical(SafetensorsDir(path), cfg, fmt), model_cfg)
    except (ConversionError, FileNotFoundError) as exc:
        raise CheckpointError(f"--pretrained {path}: {exc}") from None
    return f"HF checkpoint ({fmt} layout)"
