"""Conversions run on the CPU with gloo wherever they run: on a host where CUDA is available (here
simulated by patching the probe), the conversion workers still build a CPU layout and a gloo world,
so a TP x PP larger than the visible GPUs converts. Run in any process: one that holds a gloo world
(the `world` fixture keeps one per pytest worker) looks world-less to the code under test, and that
world is never touched (the worker's tear-down is recorded instead)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from internvl_mcore.convert import distributed as conv
from internvl_mcore.config.device import resolve_device


class _Stop(Exception):
    pass


@pytest.fixture
def cuda_host(monkeypatch):
    """A "CUDA available" host without a world; records the backend a world would start with and stops
    there, and the worker's tear-down (which would otherwise end this process's `world` fixture)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    seen: dict = {}
    monkeypatch.setattr(conv, "destroy_distributed", lambda: seen.setdefault("destroyed", True))

    def record(backend=None, **kw):
        seen["backend"] = backend
        raise _Stop

    monkeypatch.setattr(dist, "init_process_group", record)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: seen.setdefault("set_device", a))
    return seen


def test_conversion_layout_is_cpu_even_with_cuda(cuda_host) -> None:
    assert resolve_device("auto") == "cuda"  # the probe says GPU ...
    par = conv.conversion_layout(4, 2)
    assert resolve_device(conv.CONVERSION_COMPUTE.device) == "cpu"  # ... a conversion does not follow it
    assert (par.tensor_model_parallel_size, par.pipeline_model_parallel_size) == (4, 2)


def test_conversion_workers_start_a_gloo_world_on_a_cuda_host(cuda_host, tmp_path, monkeypatch) -> None:
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the worker sets them:
        monkeypatch.setenv(var, "0")  # restored afterwards, so no later test inherits port 29999
    with pytest.raises(_Stop):
        conv._layout_worker(0, 1, 29999, 1, 1, [], str(tmp_path))
    assert cuda_host.pop("destroyed", False)  # the worker ends its world even when the start fails
    assert cuda_host == {"backend": "gloo"}  # no NCCL, no torch.cuda.set_device(rank)
