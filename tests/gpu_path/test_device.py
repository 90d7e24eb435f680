"""CPU tests for bugs that only a GPU run would otherwise show (one section each), and --device.

All names contain 'device' so `pytest -k device` selects them. They run in one in-process 1-rank
gloo world (tiny debug model, fp32)."""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

import pytest
import torch


def _debug():
    """The debug preset (the in-process tests run it in the 1-rank `world` of tests/conftest.py)."""
    from internvl_mcore.config import get_preset

    return get_preset("debug")


def _tensors_held(module: torch.nn.Module):
    """(path, tensor) of every tensor a module holds: parameters, buffers and plain attributes,
    also inside lists, tuples and dicts."""
    for mod_name, mod in module.named_modules():
        stack = [
            (f"{mod_name}.{k}", v) for k, v in vars(mod).items() if k not in ("_modules", "_parameters", "_buffers")
        ]
        stack += [(f"{mod_name}.{k}", v) for k, v in mod._parameters.items()]
        stack += [(f"{mod_name}.{k}", v) for k, v in mod._buffers.items()]
        while stack:
            path, value = stack.pop()
            if isinstance(value, torch.Tensor):
                yield path, value
            elif isinstance(value, (list, tuple)):
                stack += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
            elif isinstance(value, dict):
                stack += [(f"{path}[{k!r}]", v) for k, v in value.items()]


# --------------------------------------------- every tensor on the model's device after model.to()
def test_foreign_device_every_tensor_follows_model_to(world):
    """`model.to(device)` must move every tensor the model uses (a plain-attribute tensor such as
    megatron-core's RotaryEmbedding.inv_freq stays behind and crashes the first GPU forward)."""
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.models.weights import init_weights

    cfg, par = _debug(), world
    model = build_model(cfg, par, process_groups())
    init_weights(model, cfg, seed=0)
    held = dict(_tensors_held(model))
    assert any(p.endswith("rotary_pos_emb.inv_freq") for p in held)  # the sweep sees attributes
    model.to("meta")
    left = sorted(p for p, t in _tensors_held(model) if t.device.type != "meta")
    assert not left, f"tensors that did not follow model.to('meta'): {left}"


def test_foreign_device_rope_angles_on_the_positions_device(world):
    """The V2PE angles are computed on the device of the rotary buffer and the positions."""
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups

    cfg, par = _debug(), world
    lm = build_model(cfg, par, process_groups()).language_model.to("meta")
    rot = lm.rope(torch.zeros(2, 8, device="meta"))
    assert rot.device.type == "meta" and tuple(rot.shape) == (8, 2, 1, cfg.llm.head_dim)


# ------------------------------------------------------ loss reductions on the communication device
class _Checked(Exception):
    pass


def test_loop_reductions_run_on_the_comm_device_not_the_loss_device(world, monkeypatch):
    """Under NCCL every collective's tensor must be on the GPU while the losses may be elsewhere;
    here the 'GPU' is the meta device and the losses are on the CPU."""
    import torch.distributed as dist

    from internvl_mcore.training import loop

    seen = []

    def fake_all_reduce(t, group=None):
        seen.append(t.device.type)

    monkeypatch.setattr(loop, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    losses = [{"lm loss": torch.tensor([3.0, 2.0])}, {"lm loss": torch.tensor([1.0, 4.0])}]
    totals = loop.reduce_loss_totals(losses, last_stage=True, dp_cp_group=None, pp_group=None)
    assert totals.device.type == "meta" and seen == ["meta"]

    # the --loss-reduction sample|square path reduces its weight totals the same way
    def checking_all_reduce(t, group=None):
        assert t.device.type == "meta", t.device
        raise _Checked

    monkeypatch.setattr(dist, "all_reduce", checking_all_reduce)
    from internvl_mcore.training.batch import Batch, Images

    batch = Batch(
        tokens=torch.zeros(1, 8, dtype=torch.long),
        labels=torch.zeros(1, 8, dtype=torch.long),
        loss_weight=torch.ones(1, 8),
        position_ids=torch.zeros(1, 8),
        cu_seqlens=torch.tensor([0, 3, 8]),
        images=Images(normalized=torch.zeros(0, 3, 4, 4)),
    )
    trainer = SimpleNamespace(
        batches=iter([batch]),
        num_microbatches=1,
        pg=SimpleNamespace(dp=None),
        run=SimpleNamespace(train=SimpleNamespace(loss_reduction="sample")),
    )
    monkeypatch.setattr(loop, "loss_weights", lambda b, reduction: torch.full_like(b.loss_weight, 0.5))
    with pytest.raises(_Checked):
        loop._step_batches(trainer)


def test_loop_reduction_values_on_device_cpu(world):
    """The same reduction in the real 1-rank gloo world: sums over microbatches."""
    from internvl_mcore.training import loop

    losses = [{"lm loss": torch.tensor([3.0, 2.0])}, {"lm loss": torch.tensor([1.0, 4.0])}]
    totals = loop.reduce_loss_totals(losses, True, None, None)
    assert totals.tolist() == [4.0, 6.0] and totals.dtype == torch.float64


# -------------------------------------------- optimizer-state pre-fill with a FusedAdam-like optimizer
class FusedAdamLike(torch.optim.Optimizer):
    """TE's FusedAdam's state layout: state_dict() unscales every state entry through a dtype map
    that has no 'step' (a per-parameter 'step' -> KeyError)."""

    name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master_param": torch.float32}

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})

    def state_dict(self):
        sd = super().state_dict()
        for v in sd["state"].values():
            for name in v:
                self.name_to_dtype_map[name]
        return sd


def test_optimizer_state_prefill_on_device_optimizers_without_step():
    from internvl_mcore.training.checkpoint import _init_optimizer_state

    p = torch.nn.Parameter(torch.zeros(3))
    fused = FusedAdamLike([p])
    fused.state[p]["exp_avg"] = torch.zeros(3)  # FusedAdam's own (megatron's init_state_fn) layout
    _init_optimizer_state(SimpleNamespace(optimizer=fused))
    fused.state_dict()  # raised KeyError('step') when the torch-Adam pre-fill touched it
    assert "step" not in fused.state[p]
    empty = FusedAdamLike([torch.nn.Parameter(torch.zeros(2))])
    _init_optimizer_state(SimpleNamespace(optimizer=empty))
    empty.state_dict()
    assert all(len(s) == 0 for s in empty.state.values())

    q = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.AdamW([q])
    _init_optimizer_state(SimpleNamespace(optimizer=adam))
    assert float(adam.state[q]["step"]) == 0.0 and adam.state[q]["exp_avg"].shape == (3,)


# ------------------------------------------------- checkpoints across the local and TE layer specs
class _TEExtraState:
    """What transformer-engine modules add to a state dict: `<module>._extra_state`, a uint8 tensor
    (pickled FP8 metadata; megatron-core's checkpoint helpers turn it into a ShardedObject)."""

    def get_extra_state(self) -> torch.Tensor:
        data = pickle.dumps({"double_of": type(self).__name__, "seen": getattr(self, "_extra_seen", 0)})
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if isinstance(state, io.BytesIO):
            state = torch.frombuffer(bytearray(state.getvalue()), dtype=torch.uint8)
        self._extra_loaded = pickle.loads(bytes(state.numpy())) if state is not None and state.numel() else None


def _te_doubles():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    class TEColumnDouble(_TEExtraState, ColumnParallelLinear):
        pass

    class TERowDouble(_TEExtraState, RowParallelLinear):
        pass

    class TENormDouble:
        def __new__(cls, *args, **kwargs):
            norm = WrappedTorchNorm(*args, **kwargs)
            norm.__class__ = type(f"TE{type(norm).__name__}Double", (_TEExtraState, type(norm)), {})
            return norm

    return TEColumnDouble, TERowDouble, TENormDouble


def _build(world, backend, seed, monkeypatch):
    from internvl_mcore.models import specs
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.models.weights import init_weights

    monkeypatch.setattr(specs, "_te_modules", _te_doubles)
    cfg, par = _debug(), world
    model = build_model(cfg, par, process_groups(), backend=backend)
    init_weights(model, cfg, seed=seed)
    return model


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_checkpoint_moves_between_layer_spec_backends_on_device_change(world, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from internvl_mcore.training import checkpoint

    cfg, par = _debug(), world
    local = _build(world, "local", 1, monkeypatch)
    te = _build(world, "te", 2, monkeypatch)
    # megatron-core's local linears carry an (empty) `_extra_state` too; TE's norms add theirs
    te_keys = {k for k in te.state_dict() if k.endswith("_extra_state")}
    local_keys = {k for k in local.state_dict() if k.endswith("_extra_state")}
    assert local_keys < te_keys and any("layernorm" in k for k in te_keys - local_keys)
    # the final norm is the backend's too (megatron-core alone would pick TENorm whenever TE imports)
    assert "language_model.decoder.final_layernorm._extra_state" in te_keys - local_keys

    # local (CPU-written) -> TE
    checkpoint.save(tmp_path / "local", 1, local, None, None, cfg, par)
    with pytest.raises(BaseException) as plain:  # a plain strict load (the defect); torch DCP raises a BaseException
        path = tmp_path / "local" / "iter_0000001"
        dist_checkpointing.load({"model": te.sharded_state_dict()}, str(path))
    assert "layernorm._extra_state" in str(plain.getrepr())
    checkpoint.load(tmp_path / "local", te, None, None, cfg, par)
    want, got = _params(local), _params(te)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # TE -> local, and TE -> TE keeps the extra state
    te2 = _build(world, "te", 3, monkeypatch)
    for m in te2.modules():
        m._extra_seen = 7
    checkpoint.save(tmp_path / "te", 1, te2, None, None, cfg, par)
    local2 = _build(world, "local", 4, monkeypatch)
    checkpoint.load(tmp_path / "te", local2, None, None, cfg, par)
    want, got = _params(te2), _params(local2)
    assert all(torch.equal(want[k], got[k]) for k in want)
    te3 = _build(world, "te", 5, monkeypatch)
    checkpoint.load_weights(tmp_path / "te", te3, cfg)
    loaded = [getattr(m, "_extra_loaded", None) for m in te3.modules() if isinstance(m, _TEExtraState)]
    assert loaded and all(x is not None and x["seen"] == 7 for x in loaded)


def test_checkpoint_missing_weights_still_an_error_on_device_change(world, tmp_path, monkeypatch):
    """Only `_extra_state` may be absent: a checkpoint without some weight stays an error."""
    import shutil

    from internvl_mcore.training import checkpoint

    cfg, par = _debug(), world
    model = _build(world, "local", 1, monkeypatch)
    checkpoint.save(tmp_path / "c", 1, model, None, None, cfg, par)
    # another model whose sharded state asks for one tensor the checkpoint lacks
    other = _build(world, "local", 2, monkeypatch)
    other.register_buffer("extra_weight_not_saved", torch.zeros(2))
    orig = other.sharded_state_dict

    def with_extra(*a, **k):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        sd = orig(*a, **k)
        sd["extra_weight_not_saved"] = ShardedTensor.from_rank_offsets(
            "extra_weight_not_saved", other.extra_weight_not_saved
        )
        return sd

    other.sharded_state_dict = with_extra
    with pytest.raises(checkpoint.CheckpointError, match="extra_weight_not_saved"):
        checkpoint.load(tmp_path / "c", other, None, None, cfg, par)
    shutil.rmtree(tmp_path / "c")


# ---------------------------------------------------------------------------------------- --device
def test_device_flag_semantics(monkeypatch):
    from internvl_mcore.config import device
    from internvl_mcore.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(device, "gpu_expected", lambda: None)
    assert device.resolve_device("auto") == "cpu" and device.resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device cuda"):
        device.resolve_device("cuda")
    monkeypatch.undo()
    # a container started without --gpus: NVIDIA's images set NVIDIA_VISIBLE_DEVICES
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    assert "NVIDIA_VISIBLE_DEVICES" in device.gpu_expected()
    with pytest.raises(ConfigError, match="--device cpu"):
        device.resolve_device("auto")
    assert device.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.resolve_device("auto") == "cuda"
    with pytest.raises(ConfigError, match="--device 'gpu'"):
        device.resolve_device("gpu")


def test_device_decides_fusions_and_init_placement(monkeypatch):
    """Fusions and GPU-side parameter allocation only on CUDA with TE/apex; all off on CPU."""
    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.config import megatron as mc
    from internvl_mcore.config.training import DEFAULT_COMPUTE, ComputeConfig

    cfg = get_preset("debug")
    cpu = mc.llm_transformer_config(cfg, ParallelConfig(), compute=ComputeConfig(device="cpu"))
    assert cpu.use_cpu_initialization and not (
        cpu.bias_activation_fusion or cpu.bias_dropout_fusion or cpu.gradient_accumulation_fusion
    )
    monkeypatch.setattr(mc, "resolve_device", lambda requested: "cuda")
    monkeypatch.setattr(mc, "have_fusion_kernels", lambda: True)
    monkeypatch.setattr(mc, "have_apex_wgrad_fusion", lambda: True)
    kw = mc._common(ParallelConfig(), torch.bfloat16, DEFAULT_COMPUTE)
    assert not kw["use_cpu_initialization"] and kw["bias_dropout_fusion"] and kw["gradient_accumulation_fusion"]
    assert not kw["apply_rope_fusion"]  # V2PE's per-row float positions: RoPE stays unfused
    vit = mc.vision_transformer_config(cfg, ParallelConfig(), torch.bfloat16)
    assert not vit.bias_activation_fusion  # megatron's bias-GELU fusion is the tanh approximation


def test_bf16_model_is_bf16_throughout_on_every_device(world):
    """megatron-core's torch norm wrapper ignores params_dtype; fp32 norm weights in a bf16 model made
    the mixed-precision optimizer's checkpoint fail (--bf16 --save), on CPU and on GPU without TE."""
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups

    cfg, par = _debug(), world
    model = build_model(cfg, par, process_groups(), dtype=torch.bfloat16)
    assert {n for n, p in model.named_parameters() if p.dtype != torch.bfloat16} == set()
    assert model.language_model.rotary_pos_emb.inv_freq.dtype == torch.float32
