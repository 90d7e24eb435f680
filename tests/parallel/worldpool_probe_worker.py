"""A job for tests/parallel/test_worldpool.py: report what this rank finds left over from earlier jobs
of its reused world, then set up model parallelism and leave changes behind for the next job to not see.

--out DIR --tp N [--fail] [--manager] [--keep-group] [--moe-tracker]   (--fail: rank 0 raises, rank 1 dies without a word;
--manager: start a spawned multiprocessing Manager and keep it, as megatron-core's first checkpoint save
does; --keep-group: keep a gloo group referenced from a module, out of the pool's reach; --moe-tracker:
record a router loss with its group in megatron-core's MoE tracker, as every MoE layer's forward does)
"""

import argparse
import json
import os
import signal
from pathlib import Path


def main() -> None:  # guarded: a spawned child (--manager) imports this file as __mp_main__
    # imported here, not above: the spawned Manager process imports this file too, and torch +
    # megatron-core would cost it ~3 CPU-s for nothing (it serves a dict, it never trains)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.transformer.moe import moe_utils

    from internvl_mcore.config import ParallelConfig
    from internvl_mcore.parallel.state import init_distributed
    from tests.worldpool import gloo_threads

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--fail", action="store_true")
    p.add_argument("--manager", action="store_true")
    p.add_argument("--keep-group", action="store_true")
    p.add_argument("--moe-tracker", action="store_true")
    a = p.parse_args()

    found = {
        "pid": os.getpid(),
        "model_parallel": ps.model_parallel_is_initialized(),
        "groups": len(dist.distributed_c10d._world.pg_map),
        "rng_states": sorted(get_cuda_rng_tracker().get_states()),
        "default_dtype": str(torch.get_default_dtype()),
        "env": os.environ.get("WORLDPOOL_PROBE"),
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "threads": len(os.listdir("/proc/self/task")),
        "gloo_threads": gloo_threads(),
        "moe_tracker": sorted(moe_utils.get_moe_layer_wise_logging_tracker()),
    }  # gloo's threads of the groups jobs before made
    init_distributed(ParallelConfig(tensor_model_parallel_size=a.tp), seed=5)
    found["tp_after_init"] = ps.get_tensor_model_parallel_world_size()
    found["threads_after_init"] = len(os.listdir("/proc/self/task"))
    found["rng_after_init"] = sorted(get_cuda_rng_tracker().get_states())
    if a.fail and dist.get_rank() == 0:
        raise RuntimeError("probe failure on rank 0")
    if a.fail:
        os._exit(3)
    torch.set_default_dtype(torch.float64)  # what a careless job leaves behind
    os.environ["WORLDPOOL_PROBE"] = "left over"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if a.manager:  # kept by a module for later jobs, like megatron-core's filesystem_async._results_queue
        import multiprocessing

        multiprocessing.worldpool_probe_manager = multiprocessing.get_context("spawn").Manager()
        found["manager_pid"] = multiprocessing.worldpool_probe_manager._process.pid
    if a.moe_tracker:
        tp_group = ps.get_tensor_model_parallel_group()
        moe_utils.save_to_aux_losses_tracker("probe_loss", torch.ones(()), 1, 2, reduce_group=tp_group)
    if a.keep_group:  # as a module-level cache of a process group would
        json.worldpool_probe_group = dist.new_group(backend="gloo")
    Path(a.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(found))


if __name__ == "__main__":
    main()
