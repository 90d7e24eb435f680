"""Generated training batches that depend only on (seed, sample index), never on the layout.

Each mock sequence packs two samples; each sample is `<img>` + tiles x num_image_token
`<IMG_CONTEXT>` + `</img>` followed by random text, with loss on the text. That exercises the image
splice, packed attention (cu_seqlens) and per-sample positions exactly like real packs do.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..errors import ConfigError
from ..config.model import ModelConfig
from ..data.sample import PackedSample
from .batch import Batch


def mock_sample(index: int, seed: int, cfg: ModelConfig, seq_length: int, tiles: int) -> PackedSample:
    """One packed sequence of two samples, as the loader returns packs (tiles: normalized floats)."""
    g = torch.Generator().manual_seed(seed * 7_919 + index)
    n_img = tiles * cfg.num_image_token
    first = seq_length // 2 + int(torch.randint(-seq_length // 8, seq_length // 8 + 1, (1,), generator=g))
    lengths = [first, seq_length - first]
    reserved = {cfg.img_context_token_id, cfg.img_start_token_id, cfg.img_end_token_id, cfg.pad_token_id}
    tokens, loss_mask, positions = [], [], []
    for length in lengths:
        if length < n_img + 4:
            raise ConfigError(f"--seq-length {seq_length} too short for {tiles} mock tiles per sample")
        text = torch.randint(1, min(cfg.llm.vocab_size, 500), (length - n_img - 2,), generator=g)
        text = torch.where(torch.isin(text, torch.tensor(sorted(reserved))), torch.ones_like(text), text)
        ids = torch.cat(
            [
                torch.tensor([cfg.img_start_token_id]),
                torch.full((n_img,), cfg.img_context_token_id),
                torch.tensor([cfg.img_end_token_id]),
                text,
            ]
        )
        mask = torch.zeros(length)
        mask[n_img + 3 :] = 1.0  # the text after its first token is predicted (the collate shifts)
        tokens.append(ids)
        loss_mask.append(mask)
        positions.append(torch.arange(length, dtype=torch.float32))
    image_size = cfg.vision.image_size
    return PackedSample(
        tokens=torch.cat(tokens).numpy(),
        loss_mask=torch.cat(loss_mask).numpy(),
        position_ids=torch.cat(positions).numpy(),
        cu_seqlens=np.array([0, lengths[0], seq_length], dtype=np.int32),
        tiles=torch.randn(2 * tiles, 3, image_size, image_size, generator=g),
        num_tiles=np.array([tiles, tiles], dtype=np.int32),
    )


def mock_batches(
    cfg: ModelConfig,
    seed: int,
    seq_length: int,
    tiles: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    start_iteration: int = 0,
) -> Iterator[Batch]:
    """Microbatches for this data-parallel rank, forever: iteration `it`, microbatch `m` holds global
    samples it*G + (m*dp + dp_rank)*mbs + j, so every layout trains on the same samples per step."""
    per_step = global_batch_size // (micro_batch_size * dp_size)
    it = start_iteration
    while True:
        for m in range(per_step):
            first = it * global_batch_size + (m * dp_size + dp_rank) * micro_batch_size
            samples = [mock_sample(first + j, seed, cfg, seq_length, tiles) for j in range(micro_batch_size)]
            yield Batch.from_packs(samples, seq_length, cfg.pad_token_id)
        it += 1
