"""Start-up of the distributed world: process group, CPU compatibility, megatron-core parallel state."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from ..errors import ConfigError
from . import cpu_compat
from .ports import free_port  # the one helper; callers import it from here too
from ..config.device import resolve_device
from ..config.model import ParallelConfig


def init_distributed(
    par: ParallelConfig, seed: int, timeout_s: float = 600.0, device: str = "auto", virtual_stages: int | None = None
) -> ProcessGroupCollection:
    """Join the job (torchrun's env, or a 1-process world), build megatron-core's groups and return
    them; model construction, attention, sharding and checkpointing take them as an argument.

    gloo on CPU, nccl on GPU (`device`: --device, config/device.py). Seeds: megatron-core's tracker
    ("model-parallel-rng" differs per TP rank, default state equal within a model-parallel group).
    `virtual_stages`: model chunks per pipeline rank of the interleaved schedule
    (config/model.py: virtual_pipeline_size), None without one."""
    on_gpu = resolve_device(device) == "cuda"
    if not on_gpu:  # forced: a --device cpu run (a conversion) on a GPU host must not reach torch.cuda either
        cpu_compat.apply(force=True)
    cpu_compat.apply_everywhere()
    if not dist.is_initialized():
        _join(on_gpu, timeout_s)
    world = dist.get_world_size()
    mp = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    if world % mp:
        raise ConfigError(
            f"world size {world} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size x --context-parallel-size = {mp}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_stages,
            context_parallel_size=par.context_parallel_size,
            hierarchical_context_parallel_sizes=par.hierarchical_context_parallel_sizes,
            expert_model_parallel_size=par.expert_model_parallel_size,
            expert_tensor_parallel_size=par.expert_tensor_parallel_size,
            distributed_timeout_minutes=timeout_s / 60,  # megatron-core's groups get the same timeout
        )
    pg = process_groups()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, tp_rank=pg.tp.rank(), ep_rank=pg.ep.rank(), etp_rank=pg.expt_tp.rank()
    )
    return pg


def process_groups() -> ProcessGroupCollection:
    """The process groups `init_distributed` built (for code that did not keep its return value:
    scripts and tests; package code passes the collection along instead)."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("process groups asked for before init_distributed")
    return ProcessGroupCollection.use_mpu_process_groups()


def comm_device() -> torch.device:
    """Where a tensor handed to a collective must live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the process group (tests run several worlds)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _join(on_gpu: bool, timeout_s: float) -> None:
    """init_process_group from torchrun's env; a 1-process world outside torchrun (no MASTER_PORT) gets
    an in-process store: a port found free and bound later can be taken in between by another process
    (EADDRINUSE seen in the test suite), and one process has no one to meet over TCP."""
    alone = "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend, timeout = "nccl" if on_gpu else "gloo", timedelta(seconds=timeout_s)
    if alone:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # WORLD_SIZE > 1 without torchrun's rendezvous: the env's own rule
        os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group(backend, timeout=timeout)
