"""The CPU compatibility module patches real megatron-core symbols and fails loudly when they move."""

import importlib

import pytest
import torch

from internvl_mcore.parallel import cpu_compat


def test_every_patched_symbol_exists():
    cpu_compat.check_symbols()  # raises CompatError naming each missing symbol


def test_missing_symbol_fails_loudly(monkeypatch):
    module = importlib.import_module("megatron.core.optimizer.clip_grads")
    monkeypatch.delattr(module, "clip_grad_by_total_norm_fp32")
    with pytest.raises(cpu_compat.CompatError, match="clip_grad_by_total_norm_fp32"):
        cpu_compat.check_symbols()


def test_missing_module_global_torch_fails_loudly(monkeypatch):
    module = importlib.import_module("megatron.core.transformer.utils")
    monkeypatch.setattr(module, "torch", None)
    with pytest.raises(cpu_compat.CompatError, match="megatron.core.transformer.utils"):
        cpu_compat.check_symbols()


def test_patched_modules_answer_for_the_cpu():
    cpu_compat.apply()
    utils = importlib.import_module("megatron.core.transformer.utils")
    mask = utils.get_default_causal_mask(4)  # body uses device="cuda"
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    assert layers.torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.current_device is not layers.torch.cuda.current_device  # real torch untouched


def test_rng_tracker_forks_cpu_state():
    cpu_compat.apply()
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("a", 123)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is restored
    torch.manual_seed(123)
    assert torch.equal(inside, torch.rand(3))  # the fork drew from the tracked seed


def test_tensor_methods_restored_after_wrapped_call():
    cpu_compat.apply()
    t = torch.zeros(2)
    assert t.type() == "torch.FloatTensor"
    with cpu_compat._cuda_tensor_methods_on_cpu():
        assert t.type() == "torch.cuda.FloatTensor" and t.cuda() is t
    assert t.type() == "torch.FloatTensor"


def test_the_routers_expert_bias_update_runs_uncompiled_and_counts():
    """megatron-core torch.compiles TopKRouter._apply_expert_bias; on CPU its plain body runs (the
    compile's first call costs ~2.5 CPU-s per rank for a count update) and still counts the tokens."""
    from types import SimpleNamespace

    cpu_compat.apply()
    from megatron.core.transformer.moe.router import TopKRouter

    fn = TopKRouter.__dict__["_apply_expert_bias"]
    assert not any(hasattr(fn, a) for a in ("_torchdynamo_inline", "_torchdynamo_orig_callable"))
    assert fn.__code__.co_filename.endswith("moe/router.py")
    router = SimpleNamespace(enable_expert_bias=True, local_tokens_per_expert=torch.zeros(3))
    routing = torch.tensor([[True, False, True], [True, True, False]])
    fn(router, routing, padding_mask=torch.tensor([[False], [True]]))
    assert router.local_tokens_per_expert.tolist() == [1.0, 0.0, 1.0]  # the padded token is not counted
