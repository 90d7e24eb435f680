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
fails (a full disk on any rank) removes its tmp_iter_ directory and stops every rank with one line.

Loading into another TP/PP/DP/EP/CP layout restores the model weights and the optimizer state
(distributed or not: megatron-core reshards both, the optimizer state being saved in its
model-space "fully_reshardable" format, OPTIMIZER_FORMAT) and the data position (with another
data-parallel size the loader splits the same global batches over the new ranks:
`data_states`). RNG streams are restored only on the same layout. A change the optimizer state
cannot follow (--use-distributed-optimizer switched on or off, or a checkpoint of the older
dp_reshardable format into another layout) is refused naming --no-load-optim, which loads the
rest with a fresh optimizer. A pipeline stage whose parameters are all frozen (`--stage 1` at PP2)
has no optimizer state, and its ranks save and load none (`trains`). With the interleaved pipeline
schedule a rank saves its model chunks under "model", "model1", ... (`_model_state`); the tensors'
checkpoint keys number the decoder layers globally whatever the chunking, so a checkpoint loads into
any number of virtual stages (and the converters read it as any other).

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

With --async-save (training/async_save.py) the tensor files are written by a writer process per rank
while training goes on; `finish_pending` runs the last phases once every rank's writer is done: rank 0
gathers every rank's write results and checksums, writes megatron-core's metadata, checksums.json,
renames and advances the tracker, then all ranks agree it worked; so the rename and the tracker still
come last and a failed, dead or overdue writer on any rank stops every rank with the same line.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.utils import _get_failure_dict

from ..checkpoint.canonical import CanonicalCheckpoint
from ..checkpoint.checksums import write_checksums, write_checksums_here
from ..checkpoint.format import (
    FORMAT_VERSION,
    RUN_INFO,
    TRACKER,
    check_model,
    checkpoint_dir,
    is_training_checkpoint,
    iter_dir,
    read_run_json,
)
from ..errors import CheckpointError
from ..checkpoint.safetensors_io import SafetensorsDir
from ..errors import ConversionError
from ..checkpoint.selection import remove_old_checkpoints
from ..checkpoint.weights import EXTRA_STATE, load_across_backends, load_training_weights
from ..config.model import ModelConfig, ParallelConfig
from ..convert.hf import HFAsCanonical
from ..convert.hf_config import model_config_from_hf, read_hf_config
from ..convert.source import checkpoint_kind
from ..models.lora import adopt_checkpoint_lora, lora_info_of
from ..models.weights import load_canonical
from ..parallel.state import comm_device
from .async_save import AsyncWriter, Pending
from .guards import fault_point


def _tensor_json(t: torch.Tensor) -> dict:
    """An RNG-state tensor as JSON: dtype, shape and its bytes in base64."""
    shape = list(t.shape)
    t = t.detach().cpu().contiguous().reshape(-1)
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": shape,
        "base64": base64.b64encode(t.view(torch.uint8).numpy().tobytes()).decode(),
    }


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
    return {
        "python": [version, list(keys), gauss],
        "numpy": [name, [int(k) for k in mt], int(pos), int(has_gauss), float(cached)],
        "torch": _tensor_json(torch.get_rng_state()),
        "tracker": {k: _tensor_json(v) for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
        "cuda": None if cuda is None else [_tensor_json(t) for t in cuda],
    }


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


# How the optimizer state is laid out in the files (run.json's "optimizer_format"). megatron-core's
# "fully_reshardable" stores every state tensor (Adam's moments, the distributed optimizer's fp32 main
# params) in model space, sharded like its parameter, so it loads into any TP/PP/DP/EP/CP layout:
# the distributed optimizer gathers its DP shards at save and slices them at load. Checkpoints
# without the key were written with "dp_reshardable" (each DP rank's flat buffer shard: tied to
# the saving layout) and still load, on their own layout only. (0.16's default for the distributed
# optimizer, "fully_sharded_model_space", uses flattened ranges, which torch_dist refuses.)
OPTIMIZER_FORMAT = "fully_reshardable"
_LEGACY_OPTIMIZER_FORMAT = "dp_reshardable"


def _optim_metadata(fmt: str) -> dict:
    """The `metadata` megatron-core's optimizer sharded_state_dict takes for format `fmt`. A chained
    optimizer (one per parameter kind: dense and expert-parallel parameters) prefixes its tensors'
    keys with its index unless told not to; in the reshardable format they must not depend on how
    the parameters are grouped (EP1 has one optimizer, EP2 two)."""
    if fmt == _LEGACY_OPTIMIZER_FORMAT:
        return {"distrib_optim_sharding_type": fmt}
    return {"distrib_optim_sharding_type": fmt, "chained_optim_avoid_prefix": True}


def optimizer_kind(optimizer: Any) -> Optional[str]:
    """ "distributed" (--use-distributed-optimizer), "plain" or None (no optimizer): their files differ
    (the distributed one also stores fp32 main params), so one cannot load the other's state."""
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(p, DistributedOptimizer) for p in parts) else "plain"


def trains(module: torch.nn.Module) -> bool:
    """Whether this rank's model stage has a trainable parameter. A stage whose parameters are all
    frozen (`--stage 1` at PP2: a stage of LLM layers only) has an optimizer without parameters or
    state, which megatron-core 0.16 can neither save (the distributed optimizer, without TE/apex,
    asserts on the Adam step it finds in no parameter's state) nor load (the bf16 optimizer looks for
    its empty list of fp32 master weights in the common state, which only rank 0 writes and whose
    optimizer has them as tensors). Such a rank saves and loads no optimizer state: there is none.
    The same on every rank of a data-parallel group, so their collectives still match."""
    return any(p.requires_grad for p in module.parameters())


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


# Where a changed layout loads the optimizer state: under its own key, because the non-tensor part
# the files hold under "optimizer" (param groups, the chained optimizers' nesting) is the saving
# layout's and need not fit this one's (EP1 has one optimizer where EP2 has two, a pipeline stage
# other param groups); this run's own non-tensor part goes around the tensors instead.
_RESHARDED = "optimizer (resharded)"


def _not_loaded_part(sharded: Any) -> Any:
    """A copy of the parts of an optimizer's sharded state dict that dist_checkpointing takes from
    the files' common state rather than loads (param groups, flags): everything but its tensors
    and the local objects it fills in itself."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    _, rest = extract_matching_values(sharded, lambda v: isinstance(v, (ShardedBase, LocalNonpersistentObject)))
    return copy.deepcopy(rest)


def _merge_missing(into: Any, part: Any) -> None:
    """Put the entries of nested dicts/lists `part` into `into` where it lacks them."""
    if isinstance(into, dict) and isinstance(part, dict):
        for k, v in part.items():
            if k in into:
                _merge_missing(into[k], v)
            else:
                into[k] = v
    elif isinstance(into, list) and isinstance(part, list):
        for a, b in zip(into, part):
            _merge_missing(a, b)


def _saved_steps(tree: Any, group: bool = False) -> set[float]:
    """Adam's step counts in a loaded optimizer state: param groups' 'step' (the distributed
    optimizer's), a plain optimizer's 'common_step'; not the 'step' entries of dp_reshardable
    buffer state, which hold the pre-load zero. `group`: `tree` is a param group."""
    found: set[float] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if (k == "common_step" or (k == "step" and group)) and isinstance(v, (int, float, torch.Tensor)):
                found.add(float(v))
            elif k == "param_groups" and isinstance(v, list):
                found |= set().union(*(_saved_steps(g, group=True) for g in v))
            else:
                found |= _saved_steps(v)
    elif isinstance(tree, list):
        for v in tree:
            found |= _saved_steps(v)
    return found


def _put_common_step(tree: Any, steps: set[float]) -> None:
    """Give every torch optimizer state dict in `tree` (a plain optimizer's, as this run's fresh one
    has it: without 'common_step' before its first step) the saved step, which megatron-core's
    load_state_dict hands to each parameter's state."""
    if isinstance(tree, list):
        for v in tree:
            _put_common_step(v, steps)
    if not isinstance(tree, dict):
        return
    if isinstance(tree.get("state"), dict) and "param_groups" in tree and len(steps) == 1:
        tree["state"]["common_step"] = torch.tensor(next(iter(steps)))
    for k, v in tree.items():
        if k != "state":
            _put_common_step(v, steps)


def _restore_adam_step(optimizer: Any, saved: Any) -> None:
    """Torch Adam's per-parameter step from the files' optimizer state `saved` (the common part,
    loaded under "optimizer" whatever the layout). megatron-core 0.16's distributed optimizer keeps
    it in its param groups but its dp_reshardable load overwrites it with the pre-load zero, and a
    changed layout loads this run's fresh param groups; the saved step goes back in both cases (for
    the plain optimizer on its own layout it is already right). Steps are synchronized over the
    chained optimizers, so there is one value, or none before the first step."""
    steps = _saved_steps(saved)
    if len(steps) != 1:
        return
    step = steps.pop()
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        for state in inner.state.values() if inner is not None else []:
            if "step" in state:
                state["step"] = torch.tensor(step)


def _chunks(model: torch.nn.Module | list) -> list[torch.nn.Module]:
    """The unwrapped model chunks of this rank (one module, or the interleaved schedule's list)."""
    return [unwrap_model(m) for m in (model if isinstance(model, list) else [model])]


def _model_state(chunks: list[torch.nn.Module]) -> dict:
    """The model part of a rank's checkpoint state: chunk 0 under "model" (the only one without the
    interleaved schedule), chunk i under "model{i}" (their local names repeat; their tensors' keys do not)."""
    return {("model" if i == 0 else f"model{i}"): chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _layout(par: ParallelConfig, dp: int, chunks: int = 1) -> dict:
    layout = {
        "tensor_model_parallel_size": par.tensor_model_parallel_size,
        "pipeline_model_parallel_size": par.pipeline_model_parallel_size,
        "context_parallel_size": par.context_parallel_size,
        "data_parallel_size": dp,
    }
    if chunks > 1:  # another chunking orders the optimizer's parameters otherwise: another layout
        layout["virtual_pipeline_model_parallel_size"] = chunks
    if par.pipeline_model_parallel_layout is not None:  # so does another placement of the same chunk count
        layout["pipeline_model_parallel_layout"] = par.pipeline_model_parallel_layout
    if par.expert_model_parallel_size != 1 or par.expert_tensor_parallel_size is not None:
        # optimizer state of expert weights is sharded over the expert data-parallel group
        layout.update(
            expert_model_parallel_size=par.expert_model_parallel_size,
            expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        )
    return layout


def _groups(pg: Optional[ProcessGroupCollection], module: torch.nn.Module) -> ProcessGroupCollection:
    """The process groups a save/load runs in: the ones given, else the ones the model was built on."""
    return pg if pg is not None else module.pg_collection


def save(
    root: str | Path,
    iteration: int,
    model_chunk: torch.nn.Module | list,
    optimizer: Any,
    scheduler: Any,
    model_cfg: ModelConfig,
    par: ParallelConfig,
    pg: Optional[ProcessGroupCollection] = None,
    data_state: Any = None,
    extra: Optional[dict] = None,
    keep: int = 0,
    writer: Optional[AsyncWriter] = None,
) -> Path:
    """Write checkpoint `iteration` under `root` atomically (collective: every rank calls it); with
    `keep` > 0 only the newest `keep` checkpoints stay. `model_chunk`: the model, or the list of this
    rank's model chunks (interleaved schedule). `pg`: the process groups init_distributed returned
    (default: the model's own, `pg_collection`).

    The save runs in phases (prepare, write, checksums, publish); after each one the ranks agree
    whether every rank's writes succeeded (an all-gather, bounded by the process group's timeout), so
    a write that fails on one rank (a full disk, a quota, EIO) stops all of them together: the partial
    tmp_iter_ directory is removed by every rank and CheckpointError names --save and the reason;
    the earlier checkpoints and the tracker are untouched.

    With `writer` (--async-save, training/async_save.py; it must hold no pending save) the tensors
    are written by the writer process: `save` returns once they are handed over (our JSON files are
    written by then), and `finish_pending` runs the remaining phases (megatron-core's finalize,
    checksums, publish, retention) once every rank's writer is done."""
    root = Path(root)
    rank = dist.get_rank()
    tmp, final = iter_dir(root, iteration, tmp=True), iter_dir(root, iteration)
    chunks = _chunks(model_chunk)
    module = chunks[0]
    pg = _groups(pg, module)
    assert writer is None or writer.pending is None, "finish_pending first: one checkpoint in flight at a time"
    pending = None if writer is None else _pending(root, tmp, final, iteration, keep)
    if writer is not None:
        writer.prepare()

    def write() -> None:
        _write_state(tmp, iteration, chunks, optimizer, pg, data_state, writer, pending)
        if rank == 0:
            (tmp / RUN_INFO).write_text(
                json.dumps(
                    _run_info(iteration, scheduler, model_cfg, par, pg, chunks, extra, optimizer), indent=2, default=str
                )
            )

    _run_phases(root, tmp, iteration, [lambda: _prepare(tmp) if rank == 0 else None, write])
    if pending is None:
        _finish(root, tmp, final, iteration, keep)
    return final


def _run_phases(root: Path, tmp: Path, iteration: int, phases: list) -> None:
    for phase in phases:
        failed = _agree(_attempt(phase))
        if failed:
            _abandon(root, tmp, iteration, failed)


def _finish(root: Path, tmp: Path, final: Path, iteration: int, keep: int) -> None:
    """The phases after a synchronous save's writes (collective): checksums, publish; then retention."""
    rank = dist.get_rank()
    _run_phases(
        root,
        tmp,
        iteration,
        [lambda: write_checksums(tmp), lambda: _publish(root, tmp, final, iteration) if rank == 0 else None],
    )
    if rank == 0 and keep:
        remove_old_checkpoints(root, keep)
    dist.barrier()


def _pending(root: Path, tmp: Path, final: Path, iteration: int, keep: int) -> Pending:
    """The record of an async save that `finish_pending` completes or abandons."""
    pending = Pending(
        iteration,
        finish=lambda: _finish_async(root, tmp, final, iteration, keep, pending),
        abandon=lambda failed: _abandon(root, tmp, iteration, failed),
        remove=lambda: shutil.rmtree(tmp, ignore_errors=True),
    )
    return pending


def _finish_async(root: Path, tmp: Path, final: Path, iteration: int, keep: int, pending: Pending) -> None:
    """The phases after an async save's writes (collective), as few round trips of every rank as
    they need, since they run in a training step: every rank's write results and the checksums its
    writer computed are gathered to rank 0, which alone writes megatron-core's `.metadata` and
    metadata.json (its finalize, the same files), checksums.json and publishes; one agreement on
    whether that worked (a failure there stops every rank with one line); then retention."""
    rank = dist.get_rank()
    if pending.results_queue is not None:  # where megatron-core's storage writer reads them from
        pending.results_queue.put(pending.reply[1]["results"])
    mine = (pending.plan[0].retrieve_write_results(), pending.reply[1]["checksums"])
    parts: Optional[list] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    reason = None
    if rank == 0:
        try:
            _finalize_and_publish(root, tmp, final, iteration, pending, parts)
        except Exception as exc:  # the others wait in _agree: every failure is reported, as one line
            reason = write_failure(exc) or " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    failed = _agree(reason)
    if failed:
        _abandon(root, tmp, iteration, failed)
    if rank == 0 and keep:
        remove_old_checkpoints(root, keep)


def _finalize_and_publish(root: Path, tmp: Path, final: Path, iteration: int, pending: Pending, parts: list) -> None:
    """Rank 0's part of `_finish_async`: what megatron-core's finalize functions write (from every
    rank's write results), checksums.json, then the rename and the tracker."""
    storage_writer, global_metadata, _ = pending.plan
    results = [part[0] for part in parts]
    failures = _get_failure_dict(results)
    if failures:
        raise CheckpointException("write", failures)
    storage_writer.finish(global_metadata, results)
    save_config(pending.config, str(tmp))
    write_checksums_here(tmp, {name: value for part in parts for name, value in part[1].items()})
    _publish(root, tmp, final, iteration)


def finish_pending(writer: Optional[AsyncWriter], blocking: bool) -> Optional[int]:
    """Publish the checkpoint `writer` is writing once every rank's writer is done (collective; a
    no-op without one). Not `blocking`: one tiny all-reduce, and it returns None while any rank still
    writes. Blocking: polls (all ranks together) until done or a rank's deadline passes. A failed or
    overdue write on any rank stops every rank with one line (CheckpointError naming --save); the
    tracker and earlier checkpoints are untouched. Returns the iteration published."""
    if writer is None or writer.pending is None:
        return None
    while True:
        reason = writer.status(write_failure)
        flags = torch.tensor([int(reason is None), int(bool(reason))], dtype=torch.int32, device=comm_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        running, failed = (bool(v) for v in flags.tolist())
        if failed:
            pending, writer.pending = writer.pending, None
            writer.stop(abort=True)  # before its directory is removed: it may still be writing there
            pending.abandon(_agree(reason or None))
        if not running:
            break
        if not blocking:
            return None
        time.sleep(0.05)
    pending, writer.pending = writer.pending, None
    pending.finish()
    return pending.iteration


def _prepare(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a save that was interrupted
    tmp.mkdir(parents=True)


def _write_state(
    tmp: Path,
    iteration: int,
    chunks: list[torch.nn.Module],
    optimizer: Any,
    pg: ProcessGroupCollection,
    data_state: Any,
    writer: Optional[AsyncWriter] = None,
    pending: Optional[Pending] = None,
) -> None:
    """This rank's part of the checkpoint: its tensor shards (collective; handed to `writer` under
    --async-save), RNG states, data position."""
    model_sd = _model_state(chunks)
    state = dict(model_sd)
    if optimizer is not None and any(trains(chunk) for chunk in chunks):
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_optim_metadata(OPTIMIZER_FORMAT))
    if writer is None:
        dist_checkpointing.save(state, str(tmp))
    else:
        # the writer's strategy caches the save plan; the sharding, constant within a run, is validated
        # (a collective over every shard's metadata) at the first save only, as Megatron-LM does
        writer.plan_for(state)
        request = dist_checkpointing.save(
            state,
            str(tmp),
            sharded_strategy=writer.strategy,
            async_sharded_save=True,
            validate_access_integrity=writer.saves == 0,
        )
        writer.planned()
        pending.plan = writer.strategy.last
        pending.config = CheckpointingConfig(writer.strategy.backend, writer.strategy.version)
        writer.submit(request, iteration, pending, dist.get_rank())
    (tmp / f"rank_{dist.get_rank():05d}.json").write_text(json.dumps({"rng": rng_state()}))
    if pg.tp.rank() == 0 and pg.pp.rank() == 0 and pg.cp.rank() == 0:  # one data position per DP rank
        (tmp / f"data_dp{pg.dp.rank():05d}.json").write_text(json.dumps(data_state))
    if writer is None:  # under --async-save the writer process passes this point (async_save.py)
        fault_point("save", iteration)


def _run_info(
    iteration: int,
    scheduler: Any,
    model_cfg: ModelConfig,
    par: ParallelConfig,
    pg: ProcessGroupCollection,
    chunks: list[torch.nn.Module],
    extra: Optional[dict],
    optimizer: Any = None,
) -> dict:
    """run.json's content."""
    info = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "model": dataclasses.asdict(model_cfg),
        "layout": _layout(par, pg.dp.size(), len(chunks)),
        "world_size": dist.get_world_size(),
        **(extra or {}),
    }
    if optimizer_kind(optimizer) is not None:  # what `load` needs to read the optimizer state back
        info.update(optimizer=optimizer_kind(optimizer), optimizer_format=OPTIMIZER_FORMAT)
    lora = lora_info_of(chunks[0])
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
        marker in text for marker in ("file write failed", "unexpected pos", "Worker failure")
    ):
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
    bounded by the process group's timeout, --distributed-timeout-minutes). One all-reduce when every
    rank succeeded (the reasons are gathered only after a failure): each round trip of all ranks is
    time an --async-save takes from the training step."""
    flag = torch.tensor([int(bool(reason))], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return []
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
    raise CheckpointError(
        f"--save {root}: writing checkpoint iteration {iteration} failed ({'; '.join(failed)}); "
        f"removed the partial {tmp.name}, the earlier checkpoints and {TRACKER} are unchanged"
    )


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


def load(
    root: str | Path,
    model_chunk: torch.nn.Module | list,
    optimizer: Any,
    scheduler: Any,
    model_cfg: ModelConfig,
    par: ParallelConfig,
    pg: Optional[ProcessGroupCollection] = None,
    load_optim: bool = True,
) -> tuple[int, Any, dict]:
    """Resume from `root`: a checkpoint directory (iter_NNNNNNN/, as `select` returns) or a --save
    root (its latest checkpoint). Returns (iteration, this rank's data state or None when the
    data-parallel size changed (`data_states` then has every saved rank's), the run.json). The
    scheduler state is left to the caller unless a scheduler is given (training/schedule.py decides
    what a changed schedule means). `pg`: the process groups init_distributed returned (default: the
    model's own, `pg_collection`).

    The weights load into any layout (megatron-core reshards them), and so does the optimizer state
    of a checkpoint in OPTIMIZER_FORMAT; one of the legacy format only on its own layout, and neither
    across --use-distributed-optimizer on/off (CheckpointError naming --no-load-optim, which takes
    the weights alone). RNG streams are restored only on the same layout: another layout's ranks
    draw from other streams (a fresh start at that layout seeds them)."""
    path = checkpoint_dir(root)
    info = read_run_json(path)
    iteration = int(info["iteration"])
    check_model(info, model_cfg, path)
    chunks = _chunks(model_chunk)
    module = chunks[0]
    pg = _groups(pg, module)
    dp = pg.dp.size()
    same_layout = info["layout"] == _layout(par, dp, len(chunks))
    fmt = _optimizer_format(info, path, optimizer, same_layout) if load_optim and optimizer is not None else None
    _adopt_lora(info, module, path)
    model_sd = _model_state(chunks)
    state = dict(model_sd)
    key = "optimizer" if same_layout else _RESHARDED
    mine = fmt is not None and any(trains(chunk) for chunk in chunks)  # a frozen stage's optimizer: no state
    if mine:
        _init_optimizer_state(optimizer)
        state[key] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_optim_metadata(fmt))
        own = _not_loaded_part(state[key])
    loaded = load_across_backends(state, path, module)
    for i, chunk in enumerate(chunks[1:], start=1):  # read by the same load; chunk 0 is in already
        _load_chunk(chunk, loaded[f"model{i}"])
    if scheduler is not None and info.get("scheduler") is not None:
        scheduler.load_state_dict(info["scheduler"])
    if mine:
        _restore_optimizer(optimizer, loaded, key, own, same_layout)
    if same_layout:
        _read_state(path / f"rank_{dist.get_rank():05d}.json", lambda state: set_rng_state(state["rng"]))
    if dist.get_rank() == 0 and not (same_layout and fmt is not None):
        _say_what_was_restored(path, info, fmt, same_layout)
    if info["layout"]["data_parallel_size"] != dp:
        return iteration, None, info
    return iteration, _read_state(path / f"data_dp{pg.dp.rank():05d}.json", lambda state: state), info


def _load_chunk(module: torch.nn.Module, model_sd: dict) -> None:
    """A further model chunk's loaded tensors into it, as checkpoint/weights.py: load_across_backends
    does for the first (transformer-engine extra state absent from the checkpoint: the module's own)."""
    for key, value in module.state_dict().items():
        if key.endswith(EXTRA_STATE) and key not in model_sd:
            model_sd[key] = value
    module.load_state_dict(model_sd, strict=True)


def _restore_optimizer(optimizer: Any, loaded: dict, key: str, own: Any, same_layout: bool) -> None:
    """Load the optimizer state read under `key` (another layout's: wrapped in this run's own
    structure `own` first), then the saved Adam step."""
    if not same_layout:  # this run's own structure around the tensors read from the files
        _merge_missing(loaded[key], own)
        _put_common_step(loaded[key], _saved_steps(loaded.get("optimizer")))
    with torch.no_grad():  # the distributed optimizer copies into leaf parameters
        optimizer.load_state_dict(loaded[key])
    _restore_adam_step(optimizer, loaded.get("optimizer"))


def _say_what_was_restored(path: Path, info: dict, fmt: Optional[str], same_layout: bool) -> None:
    """The line a resume prints when it restores less than everything (another layout, --no-load-optim)."""
    what = (
        "schedule, data position and optimizer state"
        if fmt is not None
        else "schedule and data position; fresh optimizer state (--no-load-optim)"
    )
    print(
        f"checkpoint {path} was saved with layout {info['layout']}: restored model weights, {what}"
        f"{'' if same_layout else '; RNG streams start fresh at this layout'}",
        flush=True,
    )


def _optimizer_format(info: dict, path: Path, optimizer: Any, same_layout: bool) -> str:
    """The format checkpoint `path` keeps its optimizer state in, when this run can load it; else
    CheckpointError naming --no-load-optim."""
    fmt = info.get("optimizer_format", _LEGACY_OPTIMIZER_FORMAT)
    saved, mine = info.get("optimizer"), optimizer_kind(optimizer)
    if saved is not None and saved != mine:
        why = (
            f"its optimizer state is the {saved} optimizer's, this run uses the {mine} one "
            f"({'with' if mine == 'distributed' else 'without'} --use-distributed-optimizer)"
        )
    elif not same_layout and fmt != OPTIMIZER_FORMAT:
        why = (
            f"it was saved with layout {info['layout']} by an older version, whose optimizer state "
            f"({fmt}) loads only into that layout"
        )
    else:
        return fmt
    raise CheckpointError(
        f"--load {path}: {why}; --no-load-optim loads its weights, schedule and data position with a fresh optimizer"
    )


def data_states(root: str | Path) -> list[dict]:
    """Every data-parallel rank's saved data position of checkpoint `root`, in DP-rank order (for a
    run whose data-parallel size differs: the loader derives its own position from them)."""
    path = checkpoint_dir(root)
    saved_dp = int(read_run_json(path)["layout"]["data_parallel_size"])
    return [_read_state(path / f"data_dp{r:05d}.json", lambda state: state) for r in range(saved_dp)]


def _adopt_lora(info: dict, module: torch.nn.Module, where: Path) -> None:
    """The run's LoRA flags must match the checkpoint's adapters; the run takes over the base they name."""
    try:
        adopt_checkpoint_lora(info.get("lora"), module)
    except CheckpointError as exc:
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
