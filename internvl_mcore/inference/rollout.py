"""The generation half of online RL (--stage gspo / grpo): prompt records -> model inputs with the
generation requests' template and tiling (prompts.py), then G responses per prompt sampled by this
rank's policy stage with decode.py's KV-cache decoding, in the training processes and layout.

It lives here, not in training/rl/, because training/ may not import inference/ (the package order,
README); pretrain_internvl.py hands a `RolloutSampler` to training/loop.py: train, and
training/rl/stage.py calls it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from ..config.model import ModelConfig
from ..data.image import cut_tiles, normalize_tiles, plan_tiling

from ..data.sources import RejectError, add_image_placeholders, read_image
from ..data.template import INTERNVL2_5
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import DataError
from .decode import Sampling, generate_tokens
from .prompts import Prompt, TilingOptions, _prompt_tokens
from .run import end_token_ids, prompt_batch


_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")
"""The module attributes megatron-core's set_model_to_sequence_parallel switches (transformer/utils.py)."""


@contextmanager
def sequence_parallel_off(model: torch.nn.Module) -> Iterator[None]:
    """Decode without sequence parallelism, as megatron-core's text generation controller does
    (`set_model_to_sequence_parallel(model, False)`): the KV-cache decoder feeds each step's whole
    positions to every layer. Every module's flags and every config's are switched, and restored
    after (megatron-core's helper needs a GPTModel-style root and keeps a global cache)."""
    changed = []
    for module in model.modules():
        for attr in _SP_ATTRS:
            if getattr(module, attr, None) is True:
                changed.append((module, attr))
                setattr(module, attr, False)
        config = getattr(module, "config", None)
        if getattr(config, "sequence_parallel", None) is True:
            changed.append((config, "sequence_parallel"))
            config.sequence_parallel = False
    try:
        yield
    finally:
        for owner, attr in changed:
            setattr(owner, attr, True)


class RolloutSampler:
    """Turns prompt records into prompts and samples responses (training/rl/stage.py's `sampler`)."""

    def __init__(self, tokenizer_dir: str, cfg: ModelConfig, opts: TilingOptions = TilingOptions(image_root="")):
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer_dir)
        self.cfg, self.opts = cfg, opts
        self.eos_ids = end_token_ids(self.tokenizer)
        # a sampled image placeholder would ask the training forward for an image feature it lacks
        self.suppress_ids = (cfg.img_context_token_id, cfg.img_start_token_id, cfg.img_end_token_id)

    def prompt(self, record, where: str) -> Prompt:
        """A `PromptRecord` (data/prompts.py: conversations ending with the human turn, encoded
        images) as prompt tokens and normalized tiles; problems are DataErrors naming `where`."""
        size = self.cfg.vision.image_size
        try:
            convs = [dict(t) for t in record.conversations]
            if record.images:
                add_image_placeholders(convs, len(record.images), len(record.images) > 1)
            tiles = []
            for k, blob in enumerate(record.images):
                image, _, _ = read_image(bytes(blob), f"image {k}")
                o = self.opts
                # the tiling preprocessing counted the prompt with (--prompts), else generation's
                low, high, thumb = record.tiling or (o.min_dynamic_patch, o.max_dynamic_patch, o.use_thumbnail)
                tiling = plan_tiling(*image.size, low, high, size, thumb)
                tiles.append(normalize_tiles(cut_tiles(image, tiling, size)))
            counts = [t.shape[0] * self.cfg.num_image_token for t in tiles]
            tokens = _prompt_tokens(convs, self.tokenizer, counts, self.opts, INTERNVL2_5)
        except RejectError as exc:
            raise DataError(f"{where}: {exc.reason}: {exc.detail}") from None
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        all_tiles = np.concatenate(tiles) if tiles else np.zeros((0, 3, size, size), np.float32)
        return Prompt(0, tokens, all_tiles)

    def decode(self, ids: Sequence[int]) -> str:
        """A response's text (without its end token), as the verifier reads it."""
        ids = list(ids)
        return self.tokenizer.decode(ids[:-1] if ids and ids[-1] in self.eos_ids else ids)

    def sample(
        self,
        model: torch.nn.Module,
        pg: ProcessGroupCollection,
        prompts: list[Prompt],
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[list[int]]:
        """`group_size` responses per prompt (prompt after prompt), each at most `max_new_tokens`
        ending at the first end token (kept); the same lists on every rank of the model's replica.
        `model`: this rank's stage (not DDP-wrapped); it is put in eval mode and back. The draws
        come from one CPU generator seeded with `seed` (decode.py: the same tokens on every rank)."""
        rows = [p for p in prompts for _ in range(group_size)]
        param = next(model.parameters())
        batch = prompt_batch(rows, self.cfg.pad_token_id, param.device, param.dtype)
        was_training = model.training
        model.eval()
        try:
            sampling = Sampling(temperature, top_p, seed, self.suppress_ids)
            with sequence_parallel_off(model):
                return generate_tokens(model, pg, batch, max_new_tokens, self.eos_ids, sampling)
        finally:
            model.train(was_training)
