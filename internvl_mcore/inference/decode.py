"""Batched decoding over megatron-core's model with its static inference context (KV cache).

megatron-core's `Attention` keeps the keys and values of every layer in the
`StaticInferenceContext` it is given (`_adjust_key_value_for_inference`: one (S_max, B, groups, d)
buffer per layer, written at `sequence_len_offset`, read back up to the current position) and turns
the causal mask off once the offset is past the prompt, so a step costs one token per row. Its text
generation controller and model wrappers are not used: they move tensors with
``torch.cuda.current_device()`` and ``torch.cuda.synchronize()`` throughout (45 places in its
text_generation_controller module; its pipeline helpers in communication_utils assert ``is_cuda``),
and take a GPTModel-style forward with an attention mask our InternVL model does not have; the loop
below is the controller's static-batching algorithm, stated over our model's parts.

Prompts of different lengths (the controller's scheme): rows are right-padded; the prefill runs
the first `min(lengths)` positions of every row, then each step feeds one position per row -- the
row's own prompt token while it is still inside its prompt, else the token sampled at the step
before. Every row sees exactly its own tokens at positions 0, 1, ... (no padding inside any row's
attention, no position offsets), so the answers are those of each prompt run alone.

Pipeline stages pass the step's hidden states on with point-to-point sends on the PP group; the
last stage picks the tokens (from the logits gathered over TP) and broadcasts them to all stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; else softmax(logits / temperature) cut to the top-p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    suppress_ids: tuple[int, ...] = ()
    """Tokens never chosen (online RL: the image placeholders, whose count must match the tiles)."""


@dataclass
class PromptBatch:
    """Right-padded prompt tokens (B, L) int64, each row's length, and the normalized tiles
    (T, 3, H, W) of all the batch's images in row order (None: text only)."""

    tokens: torch.Tensor
    lengths: list[int]
    pixel_values: Optional[torch.Tensor] = None


def choose_tokens(logits: torch.Tensor, sampling: Sampling, gen: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids."""
    if sampling.suppress_ids:
        logits = logits.clone()
        logits[:, list(sampling.suppress_ids)] = float("-inf")
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # drawn on the CPU from one seeded generator: the same tokens on every rank, layout and device
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


class _Stage:
    """This rank's pipeline stage of the model, run one step at a time over a shared KV cache."""

    def __init__(self, model: torch.nn.Module, pg: ProcessGroupCollection, batch: PromptBatch, total: int) -> None:
        self.model, self.pg = model, pg
        self.lm = model.language_model
        self.first, self.last = pg.pp.rank() == 0, pg.pp.rank() == pg.pp.size() - 1
        b = batch.tokens.shape[0]
        self.ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=total)
        # (total, 1, 1, D): every row has positions 0, 1, ...; megatron-core slices it per step and
        # re-rotates the cached (unrotated) keys up to the current position, so one row of angles
        # (broadcast over the batch) makes that cos / sin B times cheaper
        self.rotary = self.lm.rope(torch.arange(total, dtype=torch.float32, device=batch.tokens.device)[None])
        self.prompt_emb = self._prompt_embeddings(batch) if self.first else None
        self.hidden_size = self.lm.config.hidden_size
        self.dtype = self.lm.config.params_dtype

    def _prompt_embeddings(self, batch: PromptBatch) -> torch.Tensor:
        """(L, B, H) embeddings of the padded prompts with the image features spliced in."""
        emb = self.lm.embed(batch.tokens)
        if batch.pixel_values is not None and batch.pixel_values.shape[0] > 0:
            emb = self.model._splice(emb, batch.tokens, self.model.image_features(batch.pixel_values))
        return emb

    def step_input(self, seq: torch.Tensor, start: int, end: int, lengths: torch.Tensor) -> torch.Tensor:
        """(end - start, B, H) decoder input: prompt embeddings inside each row's prompt, else the
        embedding of the token chosen before."""
        emb = self.lm.embed(seq[:, start:end])
        in_prompt = torch.arange(start, end, device=seq.device)[:, None] < lengths[None, :]  # (s, B)
        width = min(end, self.prompt_emb.shape[0]) - start
        if width > 0:
            keep = in_prompt[:width, :, None]
            emb[:width] = torch.where(keep, self.prompt_emb[start : start + width], emb[:width])
        return emb

    def forward(self, x: Optional[torch.Tensor], start: int, end: int, batch_size: int) -> Optional[torch.Tensor]:
        """One step through this stage: (B, V) full-vocabulary fp32 logits of the last position on
        the last stage, None elsewhere (the hidden states go to the next stage)."""
        pp = self.pg.pp
        if not self.first:
            x = torch.empty(end - start, batch_size, self.hidden_size, dtype=self.dtype, device=self.rotary.device)
            dist.recv(x, group=pp, group_src=pp.rank() - 1)
            self.lm.set_input_tensor(x)
        self.ctx.sequence_len_offset = start
        hidden = self.lm.decoder(
            hidden_states=x, attention_mask=None, rotary_pos_emb=self.rotary, inference_context=self.ctx
        )
        if not self.last:
            dist.send(hidden.contiguous(), group=pp, group_dst=pp.rank() + 1)
            return None
        weight = self.lm.shared_embedding_or_output_weight() if self.lm.share_embeddings_and_output_weights else None
        logits, _ = self.lm.output_layer(hidden[-1:], weight=weight)  # (1, B, V/tp)
        logits = gather_from_tensor_model_parallel_region(logits, group=self.pg.tp)
        return logits[0, :, : self.lm.vocab_size].float()


def _share_tokens(tokens: torch.Tensor, pg: ProcessGroupCollection) -> torch.Tensor:
    """The last stage's chosen tokens on every stage."""
    pp = pg.pp
    if pp.size() > 1:
        dist.broadcast(tokens, group=pp, group_src=pp.size() - 1)
    return tokens


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    pg: ProcessGroupCollection,
    batch: PromptBatch,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
) -> list[list[int]]:
    """Each row's new tokens (at most `max_new_tokens`, ending at the first of `eos_ids`, which is
    kept), the same list on every rank. `model`: this rank's stage (models/internvl.py), eval mode."""
    tokens, lengths_list = batch.tokens, batch.lengths
    b = tokens.shape[0]
    total = max(lengths_list) + max_new_tokens
    lengths = torch.tensor(lengths_list, device=tokens.device)
    seq = torch.zeros(b, total, dtype=torch.long, device=tokens.device)
    seq[:, : tokens.shape[1]] = tokens
    stage = _Stage(model, pg, batch, total)
    gen = torch.Generator(device="cpu").manual_seed(sampling.seed) if sampling.temperature > 0 else None
    eos = torch.tensor(list(eos_ids) or [-1], device=tokens.device)
    done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
    start, end = 0, min(lengths_list)
    while True:
        x = stage.step_input(seq, start, end, lengths) if stage.first else None
        logits = stage.forward(x, start, end, b)
        chosen = torch.zeros(b, dtype=torch.long, device=tokens.device)
        if logits is not None:
            chosen = choose_tokens(logits, sampling, gen).to(tokens.device)
        chosen = _share_tokens(chosen, pg)
        generating = end >= lengths  # rows past their prompt: `end` is one of their answer positions
        seq[:, end] = torch.where(generating & ~done, chosen, seq[:, end])
        done |= generating & (torch.isin(seq[:, end], eos) | (end + 1 - lengths >= max_new_tokens))
        if bool(done.all()) or end + 1 >= total:
            break
        start, end = end, end + 1
    return [_answer(seq[i], lengths_list[i], max_new_tokens, eos) for i in range(b)]


def _answer(row: torch.Tensor, length: int, max_new_tokens: int, eos: torch.Tensor) -> list[int]:
    out = row[length : length + max_new_tokens].tolist()
    for i, t in enumerate(out):
        if t in eos.tolist():
            return out[: i + 1]
    return out
