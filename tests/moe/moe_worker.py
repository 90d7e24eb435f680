"""Several MoE checks in one world (tests/moe/test_moe.py), on a converted tiny Qwen3-MoE
InternVL (`--ckpt`, a canonical checkpoint from transformers' weights), through the real training
loop (training/loop.py: setup, train_step, save, --load):

1. gradients of one global batch (4 microbatches of mock data, aux loss included) in the canonical
   layout: saved with --ref, else compared shard by shard with the reference (--grads);
2. the first ITERS training losses and logged aux losses (written for the test to compare);
3. with --save DIR: a checkpoint at iteration RESUME_AT, then a fresh trainer resumed from it
   (--load) replays iterations RESUME_AT+1 .. ITERS, and the final weights are saved.

0. the --pretrained weights in this rank's shards (read through per-rank slices) equal the shards
   cut from whole tensors, and so do the slices read from the HF directory;
4. megatron-core, called by the package (DDP, optimizer, schedules, aux-loss reduction, checkpoint
   tensors), reads no group, rank or size from its global parallel_state: the package passes the
   groups init_distributed returned (the look-ups it makes anyway are listed for the test).

Each rank writes rank{r}.json with what it measured; the test asserts on them. Everything runs
under `main()`: megatron-core's checkpoint writer starts a multiprocessing Manager, which
re-imports __main__.
"""

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from internvl_mcore.config import ModelConfig, ParallelConfig
from internvl_mcore.config.training import CheckpointConfig, DataConfig, LogConfig, RunConfig, TrainConfig
from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint

ITERS, RESUME_AT, SEQ, GBS = 10, 5, 64, 4


def canonical_grads(ddp: torch.nn.Module, cfg: ModelConfig) -> dict:
    """main_grad of every local parameter after one global batch, by canonical name."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from internvl_mcore.models.weights import ShardPlacement, local_params
    from internvl_mcore.training.mock import mock_batches
    from internvl_mcore.training.step import forward_step

    dp = ps.get_data_parallel_world_size()
    batches = mock_batches(
        cfg,
        seed=3,
        seq_length=SEQ,
        tiles=1,
        micro_batch_size=1,
        global_batch_size=GBS,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=dp,
    )
    ddp.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[ddp],
        num_microbatches=GBS // dp,
        seq_length=SEQ,
        micro_batch_size=1,
    )
    clear_aux_losses_tracker()  # the training steps log their own aux losses
    grads = {
        name: p.main_grad.detach().clone() for _, name, p in local_params(ddp.module, ShardPlacement.of(ddp.module))
    }
    ddp.zero_grad_buffer()
    return grads


def check_slice_reads(model: torch.nn.Module, ckpt: Path) -> dict:
    """The weights --pretrained put in this rank's shards (read through slices of the canonical
    checkpoint) equal the shards cut from the whole tensors bit for bit; so do the slices read from
    the transformers-layout HF directory it was converted from (`ckpt/../hf`, when there)."""
    from internvl_mcore.checkpoint.safetensors_io import SafetensorsDir
    from internvl_mcore.convert.hf import HFAsCanonical, model_config_from_hf, read_hf_config
    from internvl_mcore.models.weights import ShardPlacement, local_params, read_shard, shard

    full = CanonicalCheckpoint.open(ckpt)
    hf_dir = ckpt.parent / "hf"
    hf = (
        HFAsCanonical(SafetensorsDir(hf_dir), *model_config_from_hf(read_hf_config(hf_dir), hf_dir))
        if hf_dir.is_dir()
        else None
    )
    layout = ShardPlacement.of(model)
    bad, checked = [], 0
    for _, name, p in local_params(model, layout):
        want = shard(full.tensors[name], name, p, full.config, layout).to(p.dtype)
        got = [p.detach()] + ([read_shard(hf, name, p, full.config, layout).to(p.dtype)] if hf else [])
        bad += [name for g in got if not torch.equal(g, want)]
        checked += len(got)
    return {"slice_checked": checked, "slice_mismatch": bad[:5]}


def compare_grads(ddp: torch.nn.Module, cfg: ModelConfig, grads: dict, ref: dict) -> dict:
    """Worst relative error of this rank's gradient shards against the canonical reference."""
    from internvl_mcore.models.weights import ShardPlacement, local_params, shard

    layout = ShardPlacement.of(ddp.module)
    worst, worst_name, checked, experts = 0.0, "", 0, 0
    for _, name, p in local_params(ddp.module, layout):
        expect = shard(ref[name], name, p, cfg, layout)
        got = grads[name]
        assert got.shape == expect.shape, (name, got.shape, expect.shape)
        err = float((got - expect).abs().max() / expect.abs().max().clamp_min(1e-12))
        checked += 1
        experts += ".local_experts." in name
        if err > worst:
            worst, worst_name = err, name
    return {"max_rel_grad_err": worst, "worst": worst_name, "params_checked": checked, "expert_params": experts}


# global look-ups megatron-core 0.16.1 makes however it is called: RowParallelLinear.forward passes
# tp_group=None to its own linear function, and vocab_parallel_cross_entropy takes no group
UNAVOIDABLE_LOOKUPS = {
    ("tensor_parallel/layers.py", "linear_with_frozen_weight"),
    ("tensor_parallel/layers.py", "linear_with_grad_accumulation_and_async_allreduce"),
    ("tensor_parallel/cross_entropy.py", "forward"),
}


def record_global_lookups() -> set:
    """From now on, megatron-core functions that read a group, rank or size from parallel_state
    while the package (outside parallel/state.py) is calling them, as (file, function)."""
    from megatron.core import parallel_state as ps

    seen: set = set()

    def caller() -> tuple | None:
        frame, inner = sys._getframe(2), None
        while frame is not None and "megatron/core/" in frame.f_code.co_filename:
            path, name = frame.f_code.co_filename.split("megatron/core/")[-1], frame.f_code.co_name
            if inner is None and path != "parallel_state.py" and name != "get_tensor_model_parallel_group_if_none":
                inner = (path, name)
            frame = frame.f_back
        if (
            frame is None
            or "internvl_mcore" not in frame.f_code.co_filename
            or frame.f_code.co_filename.endswith("parallel/state.py")
        ):
            return None  # the worker's own look-ups, or start-up
        return inner

    def wrap(fn):
        def wrapped(*args, **kwargs):
            where = caller()
            if where is not None and where not in UNAVOIDABLE_LOOKUPS:
                seen.add(where)
            return fn(*args, **kwargs)

        return wrapped

    for name in dir(ps):
        if re.match(r"^(get_\w*(group|groups|rank|world_size)|is_pipeline_\w+_stage)$", name):
            setattr(ps, name, wrap(getattr(ps, name)))
    return seen


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--ref", action="store_true")
    p.add_argument("--grads", action="store_true")
    p.add_argument("--save", default=None)
    a = p.parse_args()

    from internvl_mcore.training import loop

    cfg = CanonicalCheckpoint.open(a.ckpt).config
    par = ParallelConfig(
        tensor_model_parallel_size=a.tp,
        pipeline_model_parallel_size=a.pp,
        expert_model_parallel_size=a.ep,
        expert_tensor_parallel_size=a.etp,
        sequence_parallel=a.tp > 1,
    )
    run = RunConfig(
        model=cfg,
        parallel=par,
        train=TrainConfig(
            global_batch_size=GBS,
            seq_length=SEQ,
            train_iters=ITERS,
            lr=2e-3,
            lr_warmup_iters=2,
            seed=5,
            use_distributed_optimizer=a.dist_opt,
        ),
        data=DataConfig(mock_data=True, mock_tiles_per_sample=1),
        log=LogConfig(),
        checkpoint=CheckpointConfig(pretrained=a.ckpt, save=a.save),
    )
    lookups = record_global_lookups()
    trainer = loop.setup(run)
    out = Path(a.out)
    report: dict = {"rank": dist.get_rank(), **check_slice_reads(trainer.model[0].module, Path(a.ckpt))}
    if a.ref or a.grads:
        grads = canonical_grads(trainer.model[0], cfg)
        if a.ref:
            torch.save({"grads": grads}, out / "ref.pt")
        else:
            report.update(compare_grads(trainer.model[0], cfg, grads, torch.load(out / "ref.pt")["grads"]))

    stats = []
    while trainer.iteration < ITERS:
        stats.append(loop.train_step(trainer))
        if a.save and trainer.iteration == RESUME_AT:
            loop.save(trainer)
    report["losses"] = [s["loss"] for s in stats]
    report["aux_losses"] = [s["moe_aux_loss"] for s in stats]

    if a.save:  # resume from iteration RESUME_AT in a fresh trainer and replay the rest
        resumed = loop.setup(dataclasses.replace(run, checkpoint=CheckpointConfig(load=a.save, save=a.save)))
        report["resumed_at"] = resumed.iteration
        report["resumed_losses"] = [loop.train_step(resumed)["loss"] for _ in range(ITERS - RESUME_AT)]
        loop.save(resumed)  # the final weights, for the export check
    report["global_lookups"] = sorted(lookups)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
