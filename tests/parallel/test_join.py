"""How a process joins its world (parallel/state.py: _join): a 1-process world outside torchrun takes
no TCP port, so nothing can take it between choosing and binding it (the EADDRINUSE the suite saw)."""

import os

import pytest
import torch.distributed as dist

from internvl_mcore.parallel import state


@pytest.fixture
def joins(monkeypatch):
    """init_process_group's arguments, with nothing joined; torchrun's variables removed."""
    calls = []
    monkeypatch.setattr(state.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_one_process_outside_torchrun_uses_an_in_process_store(joins, monkeypatch):
    state._join(on_gpu=False, timeout_s=5)
    ((args, kwargs),) = joins
    assert args == ("gloo",) and isinstance(kwargs["store"], dist.HashStore)
    assert (kwargs["rank"], kwargs["world_size"]) == (0, 1)
    assert "MASTER_PORT" not in os.environ  # no port chosen at all


def test_torchrun_env_is_used_as_given(joins, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    state._join(on_gpu=False, timeout_s=5)
    ((args, kwargs),) = joins
    assert args == ("gloo",) and "store" not in kwargs  # the env:// rendezvous torchrun set up
    assert os.environ["MASTER_PORT"] == "29555"
