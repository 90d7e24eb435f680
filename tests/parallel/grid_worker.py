"""One forward/backward step of a debug model on one parallel layout (a job of tests/worldpool.py, or under torchrun).

--ref: save the loss and every gradient in the canonical layout (single process).
otherwise: load the reference, compare this rank's loss and gradient shards, write a JSON report
(with how many of this stage's forwards were handed image tensors).
--vpp V: V model chunks per pipeline rank, megatron-core's interleaved schedule.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from internvl_mcore.config import ParallelConfig, get_preset
from internvl_mcore.parallel.state import init_distributed

p = argparse.ArgumentParser()
p.add_argument("--model", default="debug")
p.add_argument("--tp", type=int, default=1)
p.add_argument("--pp", type=int, default=1)
p.add_argument("--vpp", type=int, default=None)
p.add_argument("--sp", action="store_true")
p.add_argument("--dist-opt", action="store_true")
p.add_argument("--ref", action="store_true")
p.add_argument("--out", required=True)
a = p.parse_args()

par = ParallelConfig(
    tensor_model_parallel_size=a.tp,
    pipeline_model_parallel_size=a.pp,
    sequence_parallel=a.sp,
    num_virtual_stages_per_pipeline_rank=a.vpp,
)
init_distributed(par, seed=7, virtual_stages=a.vpp)
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from internvl_mcore.models.internvl import build_model_chunks
from internvl_mcore.parallel.schedules import forward_backward
from internvl_mcore.parallel.state import process_groups
from internvl_mcore.models.weights import ShardPlacement, init_weights, local_params, shard
from internvl_mcore.training.mock import mock_batches
from internvl_mcore.training.step import forward_step

cfg = get_preset(a.model)
SEQ, GBS = 64, 4
pg = process_groups()
chunks = build_model_chunks(cfg, par, pg)
ddps = []
for i, model in enumerate(chunks):
    init_weights(model, cfg, seed=11)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=a.dist_opt)
    # as Megatron-LM's get_model: one bucket set, the first chunk's
    ddps.append(DistributedDataParallel(model.config, ddp_config, model, disable_bucketing=i > 0, pg_collection=pg))
    model.config.finalize_model_grads_func = finalize_model_grads
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
for ddp in ddps:
    ddp.zero_grad_buffer()
sys.path.insert(0, ".")  # the repo root (torchrun and tests/worldpool.py run from there)
from tests.launch import recording_calls  # noqa: E402

calls = []  # per forward: (the first stage's chunk?, did image tensors reach it) (only it reads them)
with recording_calls(
    type(model), "forward", lambda self, *a, **kw: calls.append((self.pre_process, kw.get("pixel_values") is not None))
):
    losses = forward_backward(
        pg,
        forward_step_func=forward_step,
        data_iterator=batches,
        model=ddps,
        num_microbatches=GBS // dp,
        seq_length=SEQ,
        micro_batch_size=1,
    )
loss = None
if ps.is_pipeline_last_stage():
    tot = sum(x["lm loss"] for x in losses).double()
    dist.all_reduce(tot, group=ps.get_data_parallel_group())
    loss = float(tot[0] / tot[1])
# every chunk's local names map to canonical ones through its own layer offset
placed = [(model, ShardPlacement.of(model)) for model in chunks]
grads = {name: p.main_grad.detach().clone() for model, layout in placed for _, name, p in local_params(model, layout)}
out = Path(a.out)
if a.ref:
    torch.save({"loss": loss, "grads": grads}, out / "ref.pt")
else:
    ref = torch.load(out / "ref.pt")
    worst, worst_name, checked = 0.0, "", 0
    for model, layout in placed:
        for local, name, p in local_params(model, layout):
            expect = shard(ref["grads"][name], name, p, cfg, layout)
            got = grads[name]
            assert got.shape == expect.shape, (name, got.shape, expect.shape)
            err = float((got - expect).abs().max() / expect.abs().max().clamp_min(1e-12))
            checked += 1
            if err > worst:
                worst, worst_name = err, name
    report = {
        "rank": dist.get_rank(),
        "loss": loss,
        "ref_loss": ref["loss"],
        "max_rel_grad_err": worst,
        "worst": worst_name,
        "params_checked": checked,
        "first_stage": ps.is_pipeline_first_stage(),
        "forwards": len(calls),
        "with_pixels": sum(pixels for _, pixels in calls),
        "first_chunk_forwards": sum(first for first, _ in calls),
        "pp_rank": pg.pp.rank(),
        "chunks": len(chunks),
        "layers": sorted(layer.layer_number for m in chunks for layer in m.language_model.decoder.layers),
        "vision_chunks": [i for i, m in enumerate(chunks) if hasattr(m, "vision_model")],
        "loss_chunks": [i for i, m in enumerate(chunks) if m.post_process],
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
