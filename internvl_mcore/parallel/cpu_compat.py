"""Make megatron-core run on CPU with the gloo backend, and fix two of its layout bugs -- the one
place that touches its internals.

Six mechanisms. `apply()` runs 1-3, only on CPU (megatron-core assumes CUDA in these three ways);
`apply_everywhere()` runs 4 and 5 on every device, CUDA included (they are not about CUDA);
`fuse_cpu_adam()` is 6. `init_distributed` (parallel/state.py) calls the first two at start-up.

1. Module-level calls to ``torch.cuda.*`` (``current_device()`` as a tensor device, ``synchronize``,
   the CUDA RNG state, ``empty_cache``) and ``device="cuda"`` literals in tensor factories. Why:
   on CPU they raise or allocate nowhere. For every module in `TORCH_PROXY_MODULES`, the module's
   global name ``torch`` is replaced by `_TorchOnCpu`, a proxy that forwards everything to the real
   torch except ``torch.cuda`` (answered for the CPU) and tensor factories (``device="cuda"`` becomes
   CPU). The real ``torch`` module is never modified, so our code and torch itself are unaffected.
2. Tensor *methods* that assume CUDA (``t.cuda()``, ``t.type() == "torch.cuda.FloatTensor"``) inside
   a few functions. Why: a module proxy cannot reach methods of tensors. Each function in
   `CUDA_TENSOR_METHOD_FUNCTIONS` is wrapped so that, while it runs, ``Tensor.cuda`` returns the
   tensor itself and ``Tensor.type()`` reports the CUDA type name.
3. Single functions replaced outright (`_REPLACEMENTS`), where the CUDA assumption is the function's
   logic, not a call in it: the CUDA RNG state getters/setters of the tensor-parallel RNG tracker
   (the CPU generator instead; the tracker's "CPU RNG state changed" warning, which then fires on
   every fork and means nothing, is filtered: `_DropRngNoise`); ``WrappedTorchNorm``, which refuses
   sequence parallelism although a replicated torch norm is exactly right under it on CPU (see
   `_WrappedTorchNormSP`); the MoE all-to-all dispatcher's ``maybe_move_tensor_to_cpu``, which turns
   split sizes into numpy arrays only for CUDA tensors, while gloo's ``all_to_all_single`` needs
   them as a sequence of ints (`_to_host_cpu`); and the uneven (split-size) variants of
   ``_gather_along_first_dim`` / ``_reduce_scatter_along_first_dim``, which the MoE dispatcher uses
   over the expert-tensor-parallel group: gloo's all_gather needs equal sizes and it has no
   reduce_scatter, so pieces are zero-padded to the largest and gathered, and the reduce-scatter
   is an all-reduce of the whole tensor followed by this rank's slice (`_uneven_gather`,
   `_uneven_reduce_scatter`). The even cases run megatron-core's own code. Also the router's
   ``TopKRouter._apply_expert_bias``, which megatron-core decorates with torch.compile whatever the
   config: its plain body instead (`_plain_body`). Why: the first call in a process imports and runs
   dynamo + inductor (~2.5 CPU-s per rank, measured) to fuse an in-place count update that is a no-op
   without an expert bias and a single add with one; on CPU that buys nothing.
4. Module globals that megatron-core defines only when transformer-engine imports but reads
   unconditionally (`TE_ONLY_GLOBALS`: `moe_utils.te_general_gemm`, read by the router's gating
   linear). Why: without TE the read raises NameError, on a GPU as on a CPU. They are set to None,
   which selects megatron-core's own torch fallback (`fill_te_only_globals()`).
5. Two bugs of megatron-core 0.16.1 that make a layout differ from the single process
   (`LAYOUT_FIXES`), fixed on every device because they give wrong numbers on GPUs too. The aux
   loss: with ``calculate_per_token_loss``, the router scales the aux loss it attaches by the number
   of tokens *this rank* routes, then finalize_model_grads divides all gradients by the global
   target-token count. Under sequence or context parallelism a rank routes 1/(TP x CP) of the
   sequence while its aux loss is already its share of the whole sequence's loss, so the aux-loss
   gradient came out TP x CP times smaller than on one process (measured: router-weight gradients at
   TP2+SP off by 57%). `_aux_loss_token_scale` multiplies the token count by the size of the
   tensor+context group the aux loss is reduced over, which makes every layout's gradient equal the
   single-process one (tests/moe). The resharding: loading the distributed optimizer's
   `fully_reshardable` checkpoint format (the one that reshards across layouts,
   training/checkpoint.py) copies every state entry of torch's Adam (used without TE and apex) from
   the loaded tensors, which have no per-parameter 'step' (megatron-core sets it from the param
   groups first), so it raised KeyError 'step'; `_keep_adam_step` copies the param and the moments
   and leaves the step as set.
6. Not a patch but a setting (`fuse_cpu_adam`, called by `training.loop.setup` after any optimizer
   checkpoint is loaded: torch's load_state_dict restores the saved group flags). Why: megatron-core builds torch's AdamW without `fused` /
   `foreach` when TE and apex are absent, which on CPU tensors is torch's per-tensor Python loop;
   the already-built optimizer's param groups are switched to the fused CPU kernel (same update up
   to fp32 reordering, several times faster).

Every entry names the megatron-core function(s) it covers; `check_symbols()` raises `CompatError`
naming each one that is missing, so a megatron-core upgrade that moves code fails loudly instead of
silently running CUDA paths. On CUDA, `apply()` does nothing (unless forced: a `--device cpu` run
on a GPU host), so the GPU path is megatron-core with only mechanisms 4 and 5.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
import types
from typing import Any, Callable, Iterator

import torch

# module -> the functions/methods in it whose bodies use torch.cuda.* or device="cuda"
TORCH_PROXY_MODULES: dict[str, tuple[str, ...]] = {
    "megatron.core.tensor_parallel.layers": (
        "VocabParallelEmbedding.__init__",
        "ColumnParallelLinear.__init__",
        "RowParallelLinear.__init__",
        "LinearWithGradAccumulationAndAsyncCommunication.backward",
    ),
    "megatron.core.tensor_parallel.mappings": ("_gather_along_first_dim", "_reduce_scatter_along_first_dim"),
    "megatron.core.tensor_parallel.random": ("CudaRNGStatesTracker.add", "model_parallel_cuda_manual_seed"),
    "megatron.core.tensor_parallel.utils": ("split_tensor_into_1d_equal_chunks", "gather_split_1d_tensor"),
    "megatron.core.tensor_parallel.cross_entropy": ("VocabParallelCrossEntropy",),
    "megatron.core.transformer.utils": ("get_default_causal_mask", "get_sliding_window_causal_mask"),
    "megatron.core.transformer.module": ("Float16Module",),
    "megatron.core.transformer.transformer_layer": ("TransformerLayer",),
    "megatron.core.transformer.attention": ("Attention",),
    "megatron.core.transformer.dot_product_attention": ("DotProductAttention.__init__",),
    "megatron.core.models.common.embeddings.rotary_pos_embedding": ("RotaryEmbedding.__init__",),
    "megatron.core.models.gpt.gpt_model": ("GPTModel",),
    "megatron.core.pipeline_parallel.schedules": (
        "forward_backward_no_pipelining",
        "forward_backward_pipelining_without_interleaving",
        "forward_backward_pipelining_with_interleaving",
        "forward_step",
    ),
    "megatron.core.pipeline_parallel.p2p_communication": ("P2PCommunicator._communicate",),
    "megatron.core.distributed.distributed_data_parallel": ("DistributedDataParallel.__init__",),
    "megatron.core.distributed.param_and_grad_buffer": ("_ParamAndGradBuffer.__init__",),
    "megatron.core.distributed.finalize_model_grads": ("finalize_model_grads",),
    "megatron.core.optimizer.optimizer": ("MegatronOptimizer", "FP32Optimizer.__init__"),
    # get_parameter_state_dp_zero: the fully_reshardable checkpoint format gathers the DP shards
    "megatron.core.optimizer.distrib_optimizer": (
        "DistributedOptimizer.__init__",
        "DistributedOptimizer.get_parameter_state_dp_zero",
    ),
    "megatron.core.optimizer.clip_grads": ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"),
    "megatron.core.optimizer.grad_scaler": ("ConstantGradScaler", "DynamicGradScaler"),
    "megatron.core.utils": ("get_model_config",),
    "megatron.core.parallel_state": ("initialize_model_parallel",),
    "megatron.core.rerun_state_machine": ("RerunStateMachine",),
    "megatron.core.dist_checkpointing.strategies.async_utils": ("AsyncCaller",),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": ("save_state_dict_async_plan",),
    "megatron.core.dist_checkpointing.exchange_utils": ("exchange_by_distribution",),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": ("FileSystemWriterAsync.preload_tensors",),
    "megatron.core.dist_checkpointing.strategies.fully_parallel": ("FullyParallelSaveStrategyWrapper",),
    "megatron.core.dist_checkpointing.strategies.torch": ("_unwrap_pyt_sharded_tensor",),
    # MoE: expert / router weights are moved to torch.cuda.current_device() after CPU init, and the
    # all-to-all dispatcher copies its split sizes to the host on a side CUDA stream (streams are
    # no-ops on CPU: `_NoStream`)
    "megatron.core.transformer.moe.router": ("Router.__init__", "Router.reset_parameters"),
    "megatron.core.transformer.moe.experts": ("SequentialMLP",),
    "megatron.core.transformer.moe.token_dispatcher": (
        "MoEAlltoAllTokenDispatcher.__init__",
        "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
    ),
}

# functions whose bodies call Tensor.cuda() or compare Tensor.type() with CUDA type names
CUDA_TENSOR_METHOD_FUNCTIONS: tuple[tuple[str, str], ...] = (
    ("megatron.core.models.common.language_module.language_module", "LanguageModule.setup_embeddings_and_output_layer"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer._unscale_main_grads_and_check_for_nan"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler.load_state_dict"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_gather_object"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast"),
)


class CompatError(RuntimeError):
    """megatron-core no longer has a symbol this module patches (version drift)."""


def _resolve(module_name: str, dotted: str) -> tuple[Any, str, Any]:
    """Return (owner, attribute name, value) for `module.dotted`, raising CompatError if absent."""
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CompatError(f"cpu_compat: megatron-core module {module_name} is missing: {exc}") from exc
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not hasattr(owner, part):
            raise CompatError(f"cpu_compat: {module_name}.{dotted} is missing (no {part})")
        owner = getattr(owner, part)
    if not hasattr(owner, parts[-1]):
        raise CompatError(f"cpu_compat: {module_name}.{dotted} is missing")
    value = getattr(owner, parts[-1])
    if isinstance(owner, type):  # the plain function behind a static/class method
        value = inspect.getattr_static(owner, parts[-1])
        value = getattr(value, "__func__", value)
    return owner, parts[-1], value


def check_symbols() -> None:
    """Raise CompatError listing every patched megatron-core symbol that does not exist."""
    missing = []
    entries = [(m, f) for m, fs in TORCH_PROXY_MODULES.items() for f in fs]
    entries += list(CUDA_TENSOR_METHOD_FUNCTIONS) + [(m, f) for m, f, _ in _REPLACEMENTS + LAYOUT_FIXES]
    for module_name, dotted in entries:
        try:
            _resolve(module_name, dotted)
        except CompatError as exc:
            missing.append(str(exc))
    for module_name in TORCH_PROXY_MODULES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is None:
            missing.append(f"cpu_compat: {module_name} no longer imports torch as a module global")
    if missing:
        raise CompatError(
            "megatron-core changed; update internvl_mcore/parallel/cpu_compat.py:\n  " + "\n  ".join(missing)
        )


# ----------------------------------------------------------------------------------------------
# 1. torch proxy
def _cpu_device(device: Any) -> Any:
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _NoStream:
    """A CUDA stream / event on CPU: work is synchronous, so waiting and recording do nothing.
    One instance stands for every stream, so `current_stream() != side_stream` is False and
    megatron-core never calls `Tensor.record_stream` (CUDA-only)."""

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        return None

    def record_event(self, *args: Any, **kwargs: Any) -> "_NoStream":
        return self

    def synchronize(self) -> None:
        return None


_NO_STREAM = _NoStream()


class _CudaOnCpu(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside proxied megatron-core modules."""

    def __getattr__(self, name: str) -> Any:  # everything not overridden: the real torch.cuda
        return getattr(torch.cuda, name)


_CUDA_ON_CPU = _CudaOnCpu(
    current_device=lambda: torch.device("cpu"),
    synchronize=lambda *a, **k: None,
    empty_cache=lambda: None,
    manual_seed=torch.manual_seed,
    get_rng_state=lambda *a, **k: torch.get_rng_state(),
    set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
    max_memory_allocated=lambda *a, **k: 0,
    memory_allocated=lambda *a, **k: 0,
    device_count=lambda: 0,
    Stream=lambda *a, **k: _NO_STREAM,
    current_stream=lambda *a, **k: _NO_STREAM,
    stream=lambda *a, **k: contextlib.nullcontext(),
    random=types.SimpleNamespace(get_rng_state=lambda *a, **k: torch.get_rng_state()),
    # megatron-core type-checks CUDA tensor classes; on CPU the CPU classes are the right answer.
    FloatTensor=torch.FloatTensor,
    HalfTensor=torch.HalfTensor,
    BFloat16Tensor=torch.BFloat16Tensor,
)

_FACTORIES = (
    "tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "randn",
    "rand",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "as_tensor",
    "randperm",
    "linspace",
)


def _factory_on_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _TorchOnCpu(types.ModuleType):
    """A stand-in for the ``torch`` module: forwards everything, answers ``cuda`` for the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CUDA_ON_CPU
        for name in _FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# ----------------------------------------------------------------------------------------------
# 2. tensor methods inside named functions
@contextlib.contextmanager
def _cuda_tensor_methods_on_cpu() -> Iterator[None]:
    orig_cuda, orig_type = torch.Tensor.cuda, torch.Tensor.type

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    def type_(self: torch.Tensor, dtype: Any = None, *args: Any, **kwargs: Any) -> Any:
        if dtype is None and self.device.type == "cpu":
            return orig_type(self).replace("torch.", "torch.cuda.", 1)
        return orig_type(self, dtype, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.type = cuda, type_
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.type = orig_cuda, orig_type


def _wrap_cuda_tensor_methods(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_tensor_methods_on_cpu():
            return fn(*args, **kwargs)

    wrapper.__cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapper


# ----------------------------------------------------------------------------------------------
# 3. replaced functions
def _get_rng_state_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU stand-in for tensor_parallel.random._get_cuda_rng_state: the CPU generator's state."""
    return torch.get_rng_state()


def _set_rng_state_cpu(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """CPU stand-in for tensor_parallel.random._set_cuda_rng_state."""
    torch.set_rng_state(new_state)


def _wrapped_torch_norm_sp(original_new: Callable) -> Callable:
    """WrappedTorchNorm.__new__ asserts `not config.sequence_parallel`. Under sequence parallelism a
    norm's weights are replicated and each rank normalizes its own tokens, which a plain torch norm
    does exactly; megatron-core only needs the weights tagged so their grads are all-reduced over
    the TP group (`sequence_parallel` attribute, read by finalize_model_grads)."""

    def __new__(cls: type, config: Any, hidden_size: int, *args: Any, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        sp_off = _copy_config(config, sequence_parallel=False)
        norm = original_new(cls, sp_off, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", True)
        return norm

    return __new__


def _to_host_cpu(original: Callable) -> Callable:
    """moe_utils.maybe_move_tensor_to_cpu for CPU tensors: the same result a CUDA tensor gets (a CPU
    tensor, or a numpy array with `as_numpy`), without streams."""

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


def _uneven_gather(original: Callable) -> Callable:
    """mappings._gather_along_first_dim with output_split_sizes on gloo (see the module docstring)."""

    def _gather_along_first_dim(
        input_: torch.Tensor, group: Any, output_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> torch.Tensor:
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    return _gather_along_first_dim


def _uneven_reduce_scatter(original: Callable) -> Callable:
    """mappings._reduce_scatter_along_first_dim with input_split_sizes on gloo."""

    def _reduce_scatter_along_first_dim(
        input_: torch.Tensor, group: Any, input_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> torch.Tensor:
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        return list(torch.split(total, [int(n) for n in input_split_sizes], dim=0))[group.rank()].contiguous()

    return _reduce_scatter_along_first_dim


def _copy_config(config: Any, **changes: Any) -> Any:
    import copy

    new = copy.copy(config)
    for key, value in changes.items():
        object.__setattr__(new, key, value)
    return new


def _plain_body(compiled: Callable) -> Callable:
    """The function a torch.compile wrapper (or startup.py's deferred one) holds, uncompiled."""
    for attr in ("_torchdynamo_inline", "_torchdynamo_orig_callable"):
        plain = getattr(compiled, attr, None)
        if plain is not None:
            return plain
    return compiled


_REPLACEMENTS: tuple[tuple[str, str, Callable], ...] = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", lambda orig: _get_rng_state_cpu),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", lambda orig: _set_rng_state_cpu),
    ("megatron.core.transformer.torch_norm", "WrappedTorchNorm.__new__", _wrapped_torch_norm_sp),
    ("megatron.core.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu", _to_host_cpu),
    ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim", _uneven_gather),
    ("megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim", _uneven_reduce_scatter),
    ("megatron.core.transformer.moe.router", "TopKRouter._apply_expert_bias", _plain_body),
)

_APPLIED = False

# module -> globals it only defines inside `try: import transformer_engine` (mechanism 4)
TE_ONLY_GLOBALS: dict[str, tuple[str, ...]] = {
    "megatron.core.transformer.moe.moe_utils": ("te_general_gemm",),
}


def _aux_loss_token_scale(original: Callable) -> Callable:
    """TopKRouter.attach_and_log_load_balancing_loss with the token count of the whole tensor+context
    group (mechanism 5 in the module docstring)."""

    @functools.wraps(original)
    def attach_and_log_load_balancing_loss(
        self: Any,
        activation: torch.Tensor,
        aux_loss_coeff: float,
        aux_loss: torch.Tensor,
        aux_loss_name: str,
        reduce_group: Any,
        reduce_group_has_dp: bool = False,
        valid_token_count: Any = None,
    ) -> Any:
        if self.calculate_per_token_loss and not reduce_group_has_dp and reduce_group.size() > 1:
            local = valid_token_count if valid_token_count is not None else activation.shape[0]
            valid_token_count = local * reduce_group.size()
        return original(
            self,
            activation,
            aux_loss_coeff,
            aux_loss,
            aux_loss_name,
            reduce_group,
            reduce_group_has_dp=reduce_group_has_dp,
            valid_token_count=valid_token_count,
        )

    attach_and_log_load_balancing_loss.__cpu_compat__ = True  # type: ignore[attr-defined]
    return attach_and_log_load_balancing_loss


def _keep_adam_step(original: Callable) -> Callable:
    """DistributedOptimizer._set_main_param_and_optimizer_states without copying torch Adam's 'step'
    (mechanism 5 in the module docstring)."""

    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> Any:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 or "step" not in state or "step" in tensors:
            return original(self, model_param, tensors)
        main_param.detach().copy_(tensors["param"])
        for key, value in state.items():
            if key != "step":  # already set from the checkpoint's param groups by load_state_dict
                value.copy_(tensors[key])
        return None

    _set_main_param_and_optimizer_states.__cpu_compat__ = True  # type: ignore[attr-defined]
    return _set_main_param_and_optimizer_states


LAYOUT_FIXES: tuple[tuple[str, str, Callable], ...] = (
    ("megatron.core.transformer.moe.router", "TopKRouter.attach_and_log_load_balancing_loss", _aux_loss_token_scale),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        _keep_adam_step,
    ),
)


def apply_everywhere() -> None:
    """Mechanisms 4 and 5: needed on CPU and GPU alike; idempotent."""
    fill_te_only_globals()
    for module_name, dotted, make in LAYOUT_FIXES:
        owner, attr, fn = _resolve(module_name, dotted)
        if not getattr(fn, "__cpu_compat__", False):
            _set_everywhere(owner, attr, fn, make(fn))


def fill_te_only_globals() -> None:
    """Set each `TE_ONLY_GLOBALS` name that transformer-engine did not define to None."""
    for module_name, names in TE_ONLY_GLOBALS.items():
        module = importlib.import_module(module_name)
        for name in names:
            if not hasattr(module, name):
                setattr(module, name, None)


def _set_everywhere(owner: Any, attr: str, old: Any, new: Any) -> None:
    """Set owner.attr = new; for a module-level function also rebind every megatron module that
    imported it by name (``from .clip_grads import clip_grad_by_total_norm_fp32``). A static or
    class method stays one."""
    if isinstance(owner, type):
        kind = type(inspect.getattr_static(owner, attr))
        if kind in (staticmethod, classmethod) and not isinstance(new, kind):
            new = kind(new)
    setattr(owner, attr, new)
    if isinstance(owner, types.ModuleType):
        for name, module in list(sys.modules.items()):
            if name.startswith("megatron.") and module is not None and module is not owner:
                if getattr(module, attr, None) is old:
                    setattr(module, attr, new)


class _DropRngNoise(logging.Filter):
    """On CPU the tracker's "CUDA" state *is* the CPU generator, so CudaRNGStatesTracker.fork's
    'CPU RNG state changed within GPU RNG context' warning fires on every fork and means nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def apply(force: bool = False) -> bool:
    """Patch megatron-core for CPU execution once; no-op (returns False) when CUDA is available.

    `force=True` patches even with CUDA present: a `--device cpu` run on a GPU host (init_distributed;
    conversions always run so), where megatron-core must not place tensors on the GPU."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_symbols()
    apply_everywhere()
    proxy = _TorchOnCpu()
    for module_name in TORCH_PROXY_MODULES:
        importlib.import_module(module_name).torch = proxy
    for module_name, dotted in CUDA_TENSOR_METHOD_FUNCTIONS:
        owner, attr, fn = _resolve(module_name, dotted)
        if not getattr(fn, "__cpu_compat__", False):
            _set_everywhere(owner, attr, fn, _wrap_cuda_tensor_methods(fn))
    for module_name, dotted, make in _REPLACEMENTS:
        owner, attr, fn = _resolve(module_name, dotted)
        new = make(fn)
        _set_everywhere(owner, attr, fn, new)
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropRngNoise())
    _APPLIED = True
    return True


def fuse_cpu_adam(optimizer: Any) -> int:
    """Mechanism 6: switch the torch Adam/AdamW that megatron-core's `get_megatron_optimizer` builds
    (without TE/apex it passes neither `foreach` nor `fused`, and torch then defaults CPU tensors to
    the per-tensor Python loop) to torch's fused CPU kernel, for every param group whose tensors
    all live on the CPU. Same update up to fp32 reordering (tests/training/test_step_kernels.py);
    ~7-10x faster on debug-m (docs/performance.md).

    `optimizer`: a megatron-core optimizer (chained or not). Call it again after loading an
    optimizer checkpoint: torch's `load_state_dict` restores the saved param-group flags.
    Returns the number of param groups switched."""
    switched = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue  # TE / apex FusedAdam, SGD, or no parameters on this rank
        for group in inner.param_groups:
            if group.get("differentiable") or any(p.device.type != "cpu" for p in group["params"]):
                continue
            group["foreach"], group["fused"] = False, True
            switched += 1
        if switched:
            inner._step_supports_amp_scaling = True  # as torch's constructor sets it for fused=True
    return switched
