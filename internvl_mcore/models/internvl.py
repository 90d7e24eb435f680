"""The composed InternVL model for one pipeline stage (or one model chunk of it), and its builders.

stage 0:  tiles -> InternViT -> drop CLS -> pixel shuffle -> projector --+
          tokens -> embedding -> splice features at <IMG_CONTEXT> -------+-> decoder layers
stage k:  hidden -> decoder layers
last:     -> final norm -> output layer -> per-token loss (or logits)

With the interleaved (virtual) pipeline schedule each rank holds several model chunks
(`build_model_chunks`, as Megatron-LM's get_model builds them with `vp_stage`): "stage 0" above is
the first chunk of the first rank, "last" the last chunk of the last rank, and chunk c of rank r
holds the decoder layers of virtual stage c x PP + r (megatron-core numbers them globally). With
--pipeline-model-parallel-layout megatron-core reads each chunk's layer count and first layer number
from the layout (config/megatron.py passes it); a chunk may hold no decoder layer ("E": the ViT,
projector and embedding alone; "L": the final norm and output layer alone), and the checks
(config/pipeline_layout.py: check) keep E in the first chunk and L in the last, where pre_process /
post_process put them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel.utils import (
    is_pp_first_stage,
    is_pp_last_stage,
    is_vp_first_stage,
    is_vp_last_stage,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from ..config.device import resolve_device
from ..config.megatron import llm_transformer_config, projector_transformer_config, vision_transformer_config
from ..config.model import ModelConfig, ParallelConfig, virtual_pipeline_size
from ..config.training import DEFAULT_COMPUTE, ComputeConfig
from ..parallel.attention import PackedSDPAttention, packed_seq_params_from_cu_seqlens
from ..parallel.context_parallel import TokenSplit, cp_core_attention, cp_path_line, cp_split_choice
from . import rope
from .language import LanguageModel
from .projector import Projector, pixel_shuffle_v2
from .qk_norm import PerHeadRMSNorm
from .specs import (
    Backend,
    decoder_block_spec,
    default_backend,
    llm_layer_spec,
    projector_mlp_submodules,
    vision_layer_spec,
)
from .vision import InternViT
from .weights import mark_tensor_parallel_params


class InternVLModel(MegatronModule):
    """InternViT + projector (first stage only) + this stage's share of the LLM."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        par: ParallelConfig,
        pg_collection: ProcessGroupCollection,
        pre_process: bool,
        post_process: bool,
        dtype: torch.dtype = torch.float32,
        backend: Optional[Backend] = None,
        compute: ComputeConfig = DEFAULT_COMPUTE,
        vp_stage: Optional[int] = None,
    ) -> None:
        llm_config = llm_transformer_config(model_cfg, par, dtype, compute)
        # RoPE without megatron-core's concatenations (models/rope.py) where TE's kernel is absent
        llm_config.apply_rope_fusion = rope.install()
        super().__init__(config=llm_config)
        backend = backend or default_backend(resolve_device(compute.device))
        pg = self.pg_collection = pg_collection  # every group this stage uses (also read by weights.ShardPlacement)
        self.model_cfg = model_cfg
        self.model_type = ModelType.encoder_or_decoder
        self.vp_stage = vp_stage  # this chunk's virtual stage on its rank (None: one chunk per rank)
        self.pre_process = pre_process
        self.post_process = post_process
        self.add_encoder = pre_process  # ViT and projector live with the embedding on stage 0 (its chunk 0)
        self.share_embeddings_and_output_weights = model_cfg.llm.tie_word_embeddings
        if self.add_encoder:  # built before the LLM: the seeded initialisation draws in this order
            self._build_encoder(par, dtype, compute, backend)
        self.cp_group, self.tp_group = pg.cp, pg.tp  # tp_group: megatron-core's sharded_state_dict reads it
        core_attention = self._choose_cp_attention(par, backend)
        qk_norm = (
            ModuleSpec(module=PerHeadRMSNorm, params={"tp_group": pg.tp}) if model_cfg.llm.qk_layernorm else IdentityOp
        )
        layer_spec = llm_layer_spec(backend, core_attention, qk_norm, moe=model_cfg.llm.is_moe)
        self.language_model = LanguageModel(
            llm_config,
            decoder_block_spec(layer_spec, backend, llm_config, pg.pp.rank(), vp_stage),
            vocab_size=model_cfg.llm.vocab_size,
            max_sequence_length=model_cfg.llm.max_position_embeddings,
            rope_theta=model_cfg.llm.rope_theta,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            pg_collection=pg,
            cross_entropy_chunk_size=compute.cross_entropy_chunk_size,
            all_token_logits=compute.all_token_logits,
            vp_stage=vp_stage,
        )

    def _build_encoder(self, par: ParallelConfig, dtype: torch.dtype, compute: ComputeConfig, backend: Backend) -> None:
        """The first stage's InternViT and projector."""
        model_cfg, pg = self.model_cfg, self.pg_collection
        vit_config = vision_transformer_config(model_cfg, par, dtype, compute)
        self.vision_model = InternViT(
            vit_config,
            model_cfg.vision,
            vision_layer_spec(model_cfg.vision.qk_normalization, model_cfg.vision.qkv_bias, backend, pg.tp),
            pg,
        )
        self.projector = Projector(
            projector_transformer_config(model_cfg, par, dtype, compute),
            projector_mlp_submodules(backend),
            model_cfg.projector_input_size,
            eps=model_cfg.projector_layernorm_epsilon,
            pg_collection=pg,
        )

    def _choose_cp_attention(self, par: ParallelConfig, backend: Backend) -> type:
        """The LLM's core attention; sets how a CP rank's tokens are cut (`cp_layout`) and the line
        saying which attention runs (`cp_path`)."""
        # how a CP rank's tokens are cut from the batch: whole rows or TE's per-sample 'thd' split
        self.cp_layout, why = (
            cp_split_choice(
                par.cp_split, backend, par.pipeline_model_parallel_size, par.sequence_parallel, par.cp_comm_type
            )
            if par.context_parallel_size > 1
            else ("none", "")
        )
        # which context-parallel attention runs and why: training/loop.py prints it once (None without CP)
        self.cp_path = cp_path_line(self.cp_layout, why, backend, par.cp_comm_type) if why else None
        return cp_core_attention(self.cp_layout, backend) if par.context_parallel_size > 1 else PackedSDPAttention

    # --- hooks megatron-core's schedules and finalize_model_grads look for -------------------
    def set_input_tensor(self, input_tensor: torch.Tensor | list) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict:
        """megatron-core's, with this stage's DP x CP group in `metadata` (every submodule reads it from
        there; without it megatron-core would take its global one)."""
        metadata = {"dp_cp_group": self.pg_collection.dp_cp, **(metadata or {})}
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    # --- forward -------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles -> (T * num_image_token, H_llm) LLM-space features. `pixel_values`: (T, 3, H, W)
        normalized float tiles (a batch's `Images.pixel_values()`, data/source_images.py)."""
        feats = self.vision_model(pixel_values)[:, 1:]  # (T, N, C), CLS dropped
        t, n, c = feats.shape
        side = int(n**0.5)
        feats = pixel_shuffle_v2(feats.reshape(t, side, side, c), self.model_cfg.downsample_ratio)
        feats = self.projector(feats.reshape(t, -1, feats.shape[-1]))  # (T, N', H)
        return feats.reshape(-1, feats.shape[-1])

    def token_split(self, cu_seqlens: Optional[torch.Tensor], shape: Sequence[int]) -> TokenSplit:
        """Which tokens of a (B, S) microbatch this context-parallel rank holds (identity without CP);
        the forward step builds it once per microbatch and passes it to `forward` and the loss."""
        return TokenSplit.build(self.cp_layout, cu_seqlens, shape, self.cp_group)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        loss_weight: Optional[torch.Tensor] = None,
        split: Optional[TokenSplit] = None,
    ) -> torch.Tensor:
        """input_ids (B, S) int of the whole microbatch (the image features are spliced into the full
        sequence, then the embeddings are split); pixel_values (T, 3, H, W) normalized float tiles of
        all images in batch order (see image_features); cu_seqlens: global sample boundaries over the
        batch-major flattened B*S tokens (None: one sample per row); split: the microbatch's `token_split` (may be omitted
        without CP). This CP rank's tokens (`split.split(t)`; the whole (B, S) tensors without CP):
        position_ids float (V2PE); labels next-token targets; loss_weight: the tokens whose loss is used
        (nonzero), the only ones the last stage computes logits for (others' losses are 0).

        Returns per-token losses (B, S) on the last stage when labels are given, logits (B, S, V/tp)
        without labels, and hidden states (S, B, H) on other stages ('thd': B = 1, S = local tokens)."""
        if split is None:
            if self.cp_group.size() > 1:
                raise ValueError(
                    "InternVLModel.forward under context parallelism needs split=model.token_split(...) "
                    "and this rank's position ids, labels and loss weights"
                )
            split = TokenSplit("none", 0, 1)
        if split.thd is not None:  # boundaries for TE's 'thd' attention (global, real and padded)
            packed = split.thd.packed_seq_params(input_ids.device)
        else:  # cu_seqlens stay global: the context-parallel attention maps local tokens to their samples
            packed = packed_seq_params_from_cu_seqlens(cu_seqlens) if cu_seqlens is not None else None
        decoder_input = None
        if self.pre_process:
            emb = self.language_model.embed(input_ids)  # (S, B, H)
            if pixel_values is not None and pixel_values.shape[0] > 0:
                emb = self._splice(emb, input_ids, self.image_features(pixel_values))
            emb = split.split(emb, 0)  # (S/C, B, H) this CP rank's two chunks ('thd': (T, 1, H))
            if self.config.sequence_parallel:
                emb = tensor_parallel.scatter_to_sequence_parallel_region(emb, group=self.tp_group)
            decoder_input = emb
        return self.language_model(
            decoder_input, position_ids, labels=labels, packed_seq_params=packed, loss_weight=loss_weight
        )

    def _splice(self, emb: torch.Tensor, input_ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Replace the embeddings at <IMG_CONTEXT> positions with image features, in batch-major order."""
        mask = input_ids == self.model_cfg.img_context_token_id  # (B, S)
        n = int(mask.sum())
        if n != feats.shape[0]:
            raise ValueError(
                f"{n} <IMG_CONTEXT> tokens in the batch but {feats.shape[0]} image feature "
                f"vectors ({feats.shape[0] // self.model_cfg.num_image_token} tiles)"
            )
        bsh = emb.transpose(0, 1)  # (B, S, H)
        bsh = bsh.masked_scatter(mask.unsqueeze(-1), feats.to(bsh.dtype))
        return bsh.transpose(0, 1).contiguous()


def build_model_chunks(
    model_cfg: ModelConfig,
    par: ParallelConfig,
    pg_collection: ProcessGroupCollection,
    dtype: torch.dtype = torch.float32,
    backend: Optional[Backend] = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
) -> list[InternVLModel]:
    """This rank's model chunks in the order of their virtual stages: one (`build_model`) without the
    interleaved schedule, else one per virtual stage (--num-virtual-stages-per-pipeline-rank /
    --num-layers-per-virtual-pipeline-stage / --pipeline-model-parallel-layout; config/model.py:
    virtual_pipeline_size)."""
    chunks = virtual_pipeline_size(par, model_cfg.llm.num_layers)
    if chunks is None:
        return [build_model(model_cfg, par, pg_collection, dtype, backend, compute)]
    return [build_model(model_cfg, par, pg_collection, dtype, backend, compute, vp_stage=c) for c in range(chunks)]


def build_model(
    model_cfg: ModelConfig,
    par: ParallelConfig,
    pg_collection: ProcessGroupCollection,
    dtype: torch.dtype = torch.float32,
    backend: Optional[Backend] = None,
    compute: ComputeConfig = DEFAULT_COMPUTE,
    vp_stage: Optional[int] = None,
) -> InternVLModel:
    """This rank's stage of the model (with `vp_stage`: that model chunk of it), in the process groups
    `pg_collection` (what parallel/state.py: init_distributed returns); the pipeline stage is this rank's
    in `pg_collection.pp`; `compute`: the device, kernels and loss chunking (--device, --torch-compile, ...).

    Weights are uninitialized: call `weights.init_weights` or load a checkpoint."""
    pp_group, vp_size = pg_collection.pp, virtual_pipeline_size(par, model_cfg.llm.num_layers)
    model = InternVLModel(
        model_cfg,
        par,
        pg_collection,
        pre_process=is_pp_first_stage(pp_group) and is_vp_first_stage(vp_stage, vp_size),
        post_process=is_pp_last_stage(pp_group) and is_vp_last_stage(vp_stage, vp_size),
        dtype=dtype,
        backend=backend,
        compute=compute,
        vp_stage=vp_stage,
    )
    if dtype != torch.float32:
        # megatron-core's WrappedTorchNorm ignores params_dtype (TE's norms honour it); fp32 norm
        # weights in a bf16 model break the mixed-precision optimizer's checkpoint (it maps only the
        # float16 groups' parameters to the model's sharded tensors)
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                module.to(dtype)
    mark_tensor_parallel_params(model)
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.register_forward_hook(_drop_dispatch_graph)
    return model


def _drop_dispatch_graph(layer: MoELayer, inputs: object, output: object) -> None:
    """Forget the autograd graph megatron-core's token dispatcher keeps after an MoE forward.

    The all-to-all dispatcher stores the routing probabilities it was given (`self.probs`, with
    their grad_fn) and reads them only inside the same forward. Kept, the last step's graph leads
    through C++ autograd nodes to DDP's gradient hooks, which the garbage collector cannot follow:
    the model, its optimizer and their process groups outlived every MoE training run of a process
    (each MoE job left its reused test world's gloo groups polling). Backward does not read the
    attribute (autograd holds what it needs), so dropping it after the forward changes no number."""
    dispatcher = getattr(layer, "token_dispatcher", None)
    for name, value in list(vars(dispatcher).items()) if dispatcher is not None else ():
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            setattr(dispatcher, name, None)
