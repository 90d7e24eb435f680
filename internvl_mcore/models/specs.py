"""Every layer spec of the model, for the two backends.

- "local": megatron-core's own tensor-parallel linears and torch norms; runs on CPU (and GPU).
- "te": transformer-engine linears and norms, picked when transformer-engine is importable.

Both backends use the same parameter names (norms are separate modules, never fused into the
linear), so checkpoints and converter key maps do not depend on the backend. Core attention is
`PackedSDPAttention` in both (flash-attn varlen on GPU when importable); a context-parallel core
attention plugs in through the `core_attention` argument.
"""

from __future__ import annotations

from typing import Any, Literal

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ..parallel.attention import PackedSDPAttention
from .vision import FullWidthQKNorm, InternViTLayer

Backend = Literal["local", "te"]


def have_transformer_engine() -> bool:
    """transformer-engine's PyTorch modules importable (GPU machines with the [gpu] extra).

    The same test as megatron-core's own HAVE_TE: `transformer_engine.pytorch`, not the bare
    package, which also exists without the PyTorch bindings (e.g. a JAX or core-only install)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device: str = "cuda") -> Backend:
    """'te' for a CUDA run where transformer-engine is importable, else 'local' (TE modules have no
    CPU kernels, so `--device cpu` on a TE machine -- e.g. writing a checkpoint on the CPU -- builds
    the local specs; checkpoints move between the two, checkpoint/weights.py)."""
    return "te" if device == "cuda" and have_transformer_engine() else "local"


def _modules(backend: Backend) -> tuple[type, type, type]:
    """(column-parallel linear, row-parallel linear, norm) of a backend."""
    if backend == "te":
        return _te_modules()
    return ColumnParallelLinear, RowParallelLinear, WrappedTorchNorm


def _te_modules() -> tuple[type, type, type]:
    """megatron-core's TE wrappers (tests stand them in with doubles carrying TE's state-dict keys)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear

    return TEColumnParallelLinear, TERowParallelLinear, TENorm


def llm_layer_spec(
    backend: Backend = "local",
    core_attention: type = PackedSDPAttention,
    qk_norm: ModuleSpec | type = IdentityOp,
    moe: bool = False,
) -> ModuleSpec:
    """A pre-norm decoder layer: RMSNorm -> causal GQA attention (RoPE) -> RMSNorm -> SwiGLU (or, with
    `moe`, megatron-core's MoE layer: router -> dispatch -> SwiGLU experts -> combine).

    `qk_norm`: what fills megatron-core's q_layernorm / k_layernorm slots (per-head QK-norm of Qwen3,
    models/qk_norm.py; IdentityOp: none)."""
    column, row, norm = _modules(backend)
    mlp = (
        moe_mlp_spec(backend)
        if moe
        else ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def moe_mlp_spec(backend: Backend = "local") -> ModuleSpec:
    """megatron-core's MoELayer with SequentialMLP experts (one SwiGLU MLP per local expert).

    SequentialMLP on both backends: it runs without grouped_gemm / TE and keeps the parameter names
    (`experts.local_experts.{j}.linear_fc1.weight`) independent of the backend, which the canonical
    layout (models/weights.py) and the converter key maps rely on. The linears are built with
    is_expert=True, so they split over the expert-tensor-parallel group."""
    column, row, _ = _modules(backend)
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            shared_experts=None,
        ),
    )


def decoder_block_spec(
    layer_spec: ModuleSpec, backend: Backend, config: TransformerConfig, pp_rank: int, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """This pipeline stage's (model chunk's, with `vp_stage`) decoder layers plus the final norm of the
    same backend.

    Given a bare layer spec, megatron-core's TransformerBlock picks the final norm itself: TENorm
    whenever transformer-engine is importable, even for a CPU run (`--device cpu`) on a TE machine."""
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * n, layer_norm=_modules(backend)[2])


def _without_bias(column: type) -> type:
    """The column-parallel linear with no bias whatever it is asked for: megatron-core gives linear_qkv
    a bias whenever `add_bias_linear` is set, but InternViT-6B has biases on proj/fc1/fc2 and none on
    qkv."""

    class NoBias(column):  # type: ignore[misc, valid-type]
        def __init__(self, *args, bias: bool = False, **kwargs):
            super().__init__(*args, bias=False, **kwargs)

    NoBias.__name__ = NoBias.__qualname__ = f"{column.__name__}NoBias"
    return NoBias


def vision_layer_spec(
    qk_normalization: bool, qkv_bias: bool = True, backend: Backend = "local", tp_group: Any = None
) -> ModuleSpec:
    """An InternViT block: norm -> bidirectional attention -> layer scale + drop path, twice.
    `tp_group`: the tensor-parallel group the full-width QK-norm reduces over (needed when TP > 1)."""
    column, row, norm = _modules(backend)
    qk_norm = ModuleSpec(module=FullWidthQKNorm, params={"tp_group": tp_group}) if qk_normalization else IdentityOp
    return ModuleSpec(
        module=InternViTLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column if qkv_bias else _without_bias(column),
                    core_attention=PackedSDPAttention,
                    linear_proj=row,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def projector_mlp_submodules(backend: Backend = "local") -> MLPSubmodules:
    """The projector's Linear -> GELU -> Linear, column- then row-parallel."""
    column, row, _ = _modules(backend)
    return MLPSubmodules(linear_fc1=column, linear_fc2=row)
