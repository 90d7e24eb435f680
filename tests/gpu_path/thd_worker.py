"""One forward/backward step of the debug model with CP and the per-sample 'thd' split (TE's layout)
through the CPU reference attention, vs the single-process step (a job of tests/worldpool.py, or under torchrun).

--cp 1: save the loss and every gradient (canonical layout) to OUT/ref.pt.
--cp 2: compare this rank's loss and gradients with OUT/ref.pt, write OUT/rank{r}.json.
Counts the 'thd' splits built (one per microbatch expected).
Positions are V2PE-like fractions (x 0.37), so a path that re-derived integer positions would fail.
"""

import argparse
import sys
import json
from pathlib import Path

import torch
import torch.distributed as dist

from internvl_mcore.config import ParallelConfig, get_preset
from internvl_mcore.parallel.state import init_distributed

p = argparse.ArgumentParser()
p.add_argument("--cp", type=int, default=1)
p.add_argument("--out", required=True)
a = p.parse_args()

par = ParallelConfig(context_parallel_size=a.cp, cp_split="thd")
init_distributed(par, seed=7)
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from internvl_mcore.models.internvl import build_model  # noqa: E402
from internvl_mcore.parallel.state import process_groups  # noqa: E402
from internvl_mcore.models.weights import ShardPlacement, init_weights, local_params  # noqa: E402
from internvl_mcore.training.mock import mock_batches  # noqa: E402
from internvl_mcore.training.step import forward_step  # noqa: E402

cfg = get_preset("debug")
SEQ, MBS, GBS = 62, 2, 4  # 62: samples of odd lengths, padded per sample to multiples of 2C
model = build_model(cfg, par, process_groups())
assert model.cp_layout == ("thd" if a.cp > 1 else "none"), model.cp_layout
init_weights(model, cfg, seed=11)
ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
model.config.finalize_model_grads_func = finalize_model_grads


def v2pe(batches):
    for b in batches:
        b.position_ids = b.position_ids * 0.37
        yield b


batches = v2pe(
    mock_batches(
        cfg, seed=3, seq_length=SEQ, tiles=1, micro_batch_size=MBS, global_batch_size=GBS, dp_rank=0, dp_size=1
    )
)
ddp.zero_grad_buffer()
from internvl_mcore.parallel.context_parallel_thd import ThdSplit  # noqa: E402

sys.path.insert(0, ".")  # the repo root (torchrun and tests/worldpool.py run from there)
from tests.launch import recording_calls  # noqa: E402

builds = []  # one 'thd' split per microbatch: forward, its cp_splits and the loss weights share it
with recording_calls(ThdSplit, "build", lambda *a, **k: builds.append(1)):
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[ddp],
        num_microbatches=GBS // MBS,
        seq_length=SEQ,
        micro_batch_size=MBS,
    )
tot = sum(x["lm loss"] for x in losses).double()
dist.all_reduce(tot, group=ps.get_data_parallel_group(with_context_parallel=True))
loss = float(tot[0] / tot[1])
grads = {name: p.main_grad.detach().clone() for _, name, p in local_params(model, ShardPlacement.of(model))}
out = Path(a.out)
if a.cp == 1:
    torch.save({"loss": loss, "grads": grads}, out / "ref.pt")
else:
    ref = torch.load(out / "ref.pt")
    errs = {
        n: float((g - ref["grads"][n]).abs().max() / ref["grads"][n].abs().max().clamp_min(1e-12))
        for n, g in grads.items()
    }
    worst = max(errs, key=errs.get)
    (out / f"rank{dist.get_rank()}.json").write_text(
        json.dumps(
            {
                "loss": loss,
                "ref_loss": ref["loss"],
                "max_rel_grad_err": errs[worst],
                "worst": worst,
                "params_checked": len(errs),
                "thd_builds": len(builds),
                "microbatches": GBS // MBS,
                "grad_scale": float(max(g.abs().max() for g in grads.values())),
            }
        )
    )
