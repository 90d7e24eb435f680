"""The LLM decoder on megatron-core: embedding (first stage), decoder layers (this stage's share),
final norm + output layer + loss (last stage), RoPE from per-token float positions (V2PE).

It is a megatron-core `LanguageModule`, which brings tied embeddings across pipeline stages
(embedding group all-reduce), the vocab-parallel loss and checkpoint sharding for free.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config.model import padded_vocab_size
from .chunked_loss import chunked_cross_entropy, chunked_output_cross_entropy, output_layer_input


class LanguageModel(LanguageModule):
    """Decoder-only LLM for one pipeline stage."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec | TransformerBlockSubmodules,
        vocab_size: int,
        max_sequence_length: int,
        rope_theta: float,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        *,
        pg_collection: ProcessGroupCollection,
        cross_entropy_chunk_size: int = 0,
        all_token_logits: bool = False,
        vp_stage: Optional[int] = None,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.model_type = ModelType.encoder_or_decoder
        self.vp_stage = vp_stage  # the model chunk (virtual stage) on this rank: which chunk ties embeddings
        self.vocab_size = vocab_size
        self.cross_entropy_chunk_size = cross_entropy_chunk_size  # 0: megatron-core's full-logit loss
        self.all_token_logits = all_token_logits  # False: logits only where a loss weight says the loss is used
        tp = self.pg_collection.tp.size()
        self.padded_vocab_size = padded_vocab_size(vocab_size, tp)
        if pre_process:
            self.embedding = self._embedding(config, max_sequence_length)
        self.rotary_pos_emb = self._rotary_embedding(config, rope_theta)
        self.decoder = TransformerBlock(
            config=config,
            spec=layer_spec,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_layer = self._output_layer(config, pre_process and share_embeddings_and_output_weights)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def _embedding(self, config: TransformerConfig, max_sequence_length: int) -> LanguageModelEmbedding:
        """The first stage's token embedding (vocab-parallel over TP)."""
        # not scattered here: image features are spliced into the full sequence first
        return LanguageModelEmbedding(
            config=config,
            vocab_size=self.padded_vocab_size,
            max_sequence_length=max_sequence_length,
            position_embedding_type="rope",
            scatter_to_sequence_parallel=False,
            tp_group=self.pg_collection.tp,
        )

    def _output_layer(self, config: TransformerConfig, tied_here: bool) -> ColumnParallelLinear:
        """The last stage's output layer; without a weight of its own where it uses the embedding's
        (`tied_here`: tied embeddings, and the embedding on this stage)."""
        return ColumnParallelLinear(
            config.hidden_size,
            self.padded_vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
            skip_weight_param_allocation=tied_here,
            tp_group=self.pg_collection.tp,
        )

    def _rotary_embedding(self, config: TransformerConfig, rope_theta: float) -> RotaryEmbedding:
        """megatron-core's RotaryEmbedding with its inverse frequencies in a buffer."""
        rotary = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=rope_theta,
            use_cpu_initialization=True,
            cp_group=self.pg_collection.cp,
        )
        # megatron-core keeps inv_freq as a plain attribute, which `model.cuda()` / `.to()` would
        # leave behind on the CPU; a (non-persistent) buffer follows the module to its device.
        inv_freq = rotary.inv_freq
        del rotary.inv_freq
        rotary.register_buffer("inv_freq", inv_freq, persistent=False)
        return rotary

    def set_input_tensor(self, input_tensor: torch.Tensor | list) -> None:
        """Pipeline stages > 0 receive their input from the previous stage (set by the schedule)."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids -> (S, B, H) embeddings, whole sequence on every TP rank."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def rope(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) float positions -> (S, B, 1, head_dim) rotary angles, [freqs, freqs] as HF/Qwen2."""
        inv_freq = self.rotary_pos_emb.inv_freq.to(torch.float32)
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, S, D/2)
        return torch.cat([freqs, freqs], dim=-1).transpose(0, 1)[:, :, None, :].contiguous()

    def forward(
        self,
        decoder_input: Optional[torch.Tensor],
        position_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        loss_weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """decoder_input (S, B, H) on the first stage (None later: it comes from `set_input_tensor`).

        Returns the hidden states (S, B, H) on non-last stages; on the last stage the per-token
        losses (B, S) if `labels` is given, else this rank's vocab shard of the logits (B, S, V/tp).
        With `loss_weight` (B, S) (and not --all-token-logits) the losses are computed only where it is
        nonzero and are 0 elsewhere."""
        # one tensor, not a (q, k) tuple: megatron-core's recompute saves it with save_for_backward
        rotary = self.rope(position_ids)
        if hasattr(packed_seq_params, "rotary_freqs"):
            # 'thd' context parallelism (parallel/context_parallel_thd.py): megatron-core would re-derive
            # integer positions per sample; the core attention applies these V2PE angles instead
            packed_seq_params = dataclasses.replace(packed_seq_params, rotary_freqs=rotary[:, 0])  # (T, 1, D)
            rotary = None
        hidden = self.decoder(
            hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=packed_seq_params
        )
        if not self.post_process:
            return hidden
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if labels is not None and loss_weight is not None and not self.all_token_logits:
            return self._target_token_loss(
                hidden, self.output_layer.weight if weight is None else weight, labels, loss_weight
            )  # (B, S)
        if labels is not None and self.cross_entropy_chunk_size:  # models/chunked_loss.py
            return chunked_output_cross_entropy(
                hidden,
                self.output_layer.weight if weight is None else weight,
                labels,
                self.cross_entropy_chunk_size,
                self.vocab_size,
                self.pg_collection.tp,
                self.config.sequence_parallel,
            )  # (B, S)
        logits, _ = self.output_layer(hidden, weight=weight)  # (S, B, V/tp)
        logits = self._mask_padded_vocab(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)  # (B, S)

    def _target_token_loss(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_weight: torch.Tensor
    ) -> torch.Tensor:
        """Per-token losses (B, S), computed only at the tokens `loss_weight` keeps (nonzero; 0 elsewhere).

        In SFT data most tokens (image tokens, prompts) carry no loss, and their logits -- a GEMM
        with the whole vocabulary and an fp32 (tokens x V/tp) tensor kept for the backward -- are
        never used. The hidden states go through the same megatron-core mappings as the output
        layer's (ColumnParallelLinear: copy with all-reduced gradient, or the sequence-parallel
        all-gather with reduce-scattered gradient), so every TP rank picks the same rows, then
        megatron-core's vocab-parallel loss runs on those rows only."""
        tp = self.pg_collection.tp
        hidden = output_layer_input(hidden, tp, self.config.sequence_parallel)
        keep = (loss_weight != 0).transpose(0, 1)  # (S, B), the hidden states' order
        picked = hidden[keep]  # (N, H)
        targets = labels.transpose(0, 1)[keep]  # (N,)
        if self.cross_entropy_chunk_size:
            loss = chunked_cross_entropy(
                picked[:, None], weight, targets[None], self.cross_entropy_chunk_size, self.vocab_size, tp
            )  # (1, N)
        else:
            logits = self._mask_padded_vocab(torch.matmul(picked, weight.t()))  # (N, V/tp)
            loss = self.compute_language_model_loss(targets[None], logits[:, None])  # (1, N)
        out = torch.zeros(keep.shape, dtype=loss.dtype, device=loss.device).masked_scatter(keep, loss.reshape(-1))
        return out.transpose(0, 1).contiguous()  # (B, S)

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if self.padded_vocab_size == self.vocab_size:
            return logits
        per_rank = logits.shape[-1]
        start = self.pg_collection.tp.rank() * per_rank
        ids = torch.arange(start, start + per_rank, device=logits.device)
        return logits.masked_fill(ids >= self.vocab_size, float("-inf"))
