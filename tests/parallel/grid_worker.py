"""One forward/backward step of a debug model on one parallel layout (a job of tests/worldpool.py, or under torchrun).

--ref: save the loss and every gradient in the canonical layout (single process).
otherwise: load the reference, compare this rank's loss and gradient shards, write a JSON report
(with how many of this stage's forwards were handed image tensors).
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
p.add_argument("--sp", action="store_true")
p.add_argument("--dist-opt", action="store_true")
p.add_argument("--ref", action="store_true")
p.add_argument("--out", required=True)
a = p.parse_args()

par = ParallelConfig(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp, sequence_parallel=a.sp)
init_distributed(par, seed=7)
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from internvl_mcore.models.internvl import build_model
from internvl_mcore.parallel.state import process_groups
from internvl_mcore.models.weights import ShardPlacement, init_weights, local_params, shard
from internvl_mcore.training.mock import mock_batches
from internvl_mcore.training.step import forward_step

cfg = get_preset(a.model)
SEQ, GBS = 64, 4
model = build_model(cfg, par, process_groups())
init_weights(model, cfg, seed=11)
ddp = DistributedDataParallel(
    model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=a.dist_opt), model
)
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
ddp.zero_grad_buffer()
sys.path.insert(0, ".")  # the repo root (torchrun and tests/worldpool.py run from there)
from tests.launch import recording_calls  # noqa: E402

calls = []  # per forward: did image tensors reach this stage (only the first stage reads them)
with recording_calls(type(model), "forward", lambda *args, **kw: calls.append(kw.get("pixel_values") is not None)):
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[ddp],
        num_microbatches=GBS // dp,
        seq_length=SEQ,
        micro_batch_size=1,
    )
loss = None
if ps.is_pipeline_last_stage():
    tot = sum(x["lm loss"] for x in losses).double()
    dist.all_reduce(tot, group=ps.get_data_parallel_group())
    loss = float(tot[0] / tot[1])
layout = ShardPlacement.of(model)
grads = {name: p.main_grad.detach().clone() for _, name, p in local_params(model, layout)}
out = Path(a.out)
if a.ref:
    torch.save({"loss": loss, "grads": grads}, out / "ref.pt")
else:
    ref = torch.load(out / "ref.pt")
    worst, worst_name, checked = 0.0, "", 0
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
        "with_pixels": sum(calls),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
