"""What needs the model built in a parallel layout (spawned gloo worlds), for verification and small
models; no conversion uses it (convert/export.py and convert/lora_export.py stream from the checkpoint
files without a model):

`gather_canonical_state` (a TP/PP-sharded model -> the canonical dict, inverse of
`weights.load_canonical`: one full copy of the model on rank 0) and `verify_layout` (load + gather in
a TP x PP world, compared bit for bit). The canonical directory itself: checkpoint/canonical.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.utils import unwrap_model

from ..checkpoint.canonical import CanonicalCheckpoint, save_canonical
from ..errors import ConversionError
from ..config.model import ModelConfig, ParallelConfig
from ..config.training import ComputeConfig
from ..models.internvl import build_model
from ..models.sharding import rule_for
from ..models.weights import ShardPlacement, is_expert_param, load_canonical, local_params
from ..parallel.state import destroy_distributed, free_port, init_distributed


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


CONVERSION_COMPUTE = ComputeConfig(device="cpu")
"""A conversion world always runs on the CPU with gloo, even on a GPU host, so a TP x PP larger than
the visible GPUs converts, and NCCL / transformer-engine / `cuda:rank` play no part in it (the local
specs hold the same canonical tensors)."""


def conversion_layout(tp: int = 1, pp: int = 1) -> ParallelConfig:
    """The layout a conversion world runs in (on the CPU: `CONVERSION_COMPUTE`)."""
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _layout_worker(
    rank: int, world: int, port: int, tp: int, pp: int, jobs: Sequence[tuple[str, str | None]], result_dir: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    try:
        check_layout_in_world(tp, pp, jobs, result_dir)
    finally:
        destroy_distributed()


def check_layout_in_world(tp: int, pp: int, jobs: Sequence[tuple[str, str | None]], result_dir: str) -> None:
    """verify_layout's work on one rank of a gloo world of tp * pp ranks (joined from the environment
    unless this process is in one already): rank 0 writes result_dir/report.json. The caller ends the
    world (the tests run it in their reused worlds: tests/convert/layout_worker.py)."""
    par = conversion_layout(tp, pp)
    pg = init_distributed(par, seed=0, device=CONVERSION_COMPUTE.device)
    report = []
    try:
        for ckpt_dir, out_dir in jobs:
            ckpt = CanonicalCheckpoint.open(ckpt_dir)
            model = build_model(ckpt.config, par, pg, compute=CONVERSION_COMPUTE)
            load_canonical(model, ckpt.tensors, ckpt.config)
            state = gather_canonical_state(model, ckpt.config)
            if state is None:
                continue
            mismatched = sorted(
                k
                for k in ckpt.tensors
                if k not in state or not torch.equal(state[k], ckpt.tensors[k].to(state[k].dtype))
            )
            report.append(
                {"ckpt": ckpt_dir, "mismatched": mismatched, "missing_in_file": sorted(set(state) - set(ckpt.tensors))}
            )
            if out_dir is not None:
                layout_par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
                dtypes = {k: ckpt.tensors.dtype(k) for k in ckpt.tensors}
                plan = [(k, dtypes.get(k, v.dtype), tuple(v.shape)) for k, v in state.items()]
                save_canonical(
                    out_dir,
                    ckpt.config,
                    ((k, v.to(dtypes.get(k, v.dtype))) for k, v in state.items()),
                    ckpt.meta.get("source"),
                    layout_par,
                    plan=plan,
                )
    finally:
        if dist.get_rank() == 0:
            Path(result_dir, "report.json").write_text(json.dumps(report))


def _spawn(fn: Any, nprocs: int, args: tuple, timeout_s: float, what: str) -> None:
    """Run fn(rank, nprocs, port, *args) in `nprocs` spawned processes (a gloo world) and wait."""
    ctx = mp.start_processes(fn, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{what} did not finish in {timeout_s:.0f}s")


def verify_layout(
    jobs: Sequence[tuple[str | os.PathLike, str | os.PathLike | None]],
    tp: int,
    pp: int,
    timeout_s: float = 300.0,
    run_world: Callable[[int, int, list, str], None] | None = None,
) -> list[dict]:
    """Load each canonical checkpoint into a TP x PP model in `tp * pp` spawned gloo processes,
    gather it back, and compare bit for bit with the file. `jobs`: (checkpoint dir, optional dir
    to write the gathered canonical checkpoint to). Returns one report per checkpoint; raises
    if any tensor differs. `run_world(tp, pp, jobs, result_dir)`: runs `check_layout_in_world` on
    the tp * pp ranks of a world that exists already, instead of spawning one (the tests' reused worlds)."""
    jobs = [(str(c), None if o is None else str(o)) for c, o in jobs]
    with tempfile.TemporaryDirectory() as tmp:
        if run_world is not None:
            run_world(tp, pp, jobs, tmp)
        else:
            _spawn(_layout_worker, tp * pp, (tp, pp, jobs, tmp), timeout_s, f"verify_layout tp={tp} pp={pp}")
        report = json.loads(Path(tmp, "report.json").read_text())
    bad = [r for r in report if r["mismatched"] or r["missing_in_file"]]
    if bad:
        raise ConversionError(f"TP{tp}xPP{pp} load/gather changed tensors: {bad}")
    return report
