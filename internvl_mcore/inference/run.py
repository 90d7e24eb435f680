"""tools/generate.py's work: load the model at the requested layout, decode the requests in batches,
write the answers (rank 0), report tokens per second."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..config.model import ModelConfig, ParallelConfig
from ..convert.source import model_config_from_path, resolve_model
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import ConfigError, DataError
from ..models.internvl import build_model
from ..parallel.state import init_distributed
from ..training.checkpoint import load_weights
from .decode import PromptBatch, Sampling, generate_tokens
from .prompts import Prompt, TilingOptions, load_prompts

END_TOKENS = ("<|im_end|>",)
"""Besides the tokenizer's eos: the template's end of turn ends an answer (as InternVL's chat())."""


def end_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's eos and the template's end-of-turn token."""
    ids = {tokenizer.eos_token_id} | {tokenizer.token_to_id(t) for t in END_TOKENS if _has(tokenizer, t)}
    return sorted(i for i in ids if i is not None)


def _has(tokenizer: Tokenizer, token: str) -> bool:
    try:
        tokenizer.token_to_id(token)
    except Exception:  # noqa: BLE001 - a tokenizer without the token: it just does not end answers
        return False
    return True


def batches(prompts: list[Prompt], size: int) -> list[list[int]]:
    """Indices of `prompts` in groups of at most `size`, similar lengths together (fewer positions
    fed one at a time: decode.py feeds each row's prompt tail per step)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].tokens))
    return [order[k : k + size] for k in range(0, len(order), size)]


def prompt_batch(prompts: list[Prompt], pad_id: int, device: torch.device, dtype: torch.dtype) -> PromptBatch:
    """Right-padded tokens and the batch's tiles in row order."""
    lengths = [len(p.tokens) for p in prompts]
    tokens = torch.full((len(prompts), max(lengths)), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : lengths[i]] = torch.tensor(p.tokens, dtype=torch.long)
    tiles = torch.from_numpy(np.concatenate([p.tiles for p in prompts]))
    pixels = tiles.to(device=device, dtype=dtype) if tiles.shape[0] else None
    return PromptBatch(tokens.to(device), lengths, pixels)


def _tokenizer(args: argparse.Namespace) -> Tokenizer:
    """--tokenizer, else the one --load ships (an HF directory has it; a training checkpoint does not)."""
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    try:
        return load_tokenizer(args.load)
    except DataError:
        raise ConfigError(f"--load {args.load} holds no tokenizer files: give --tokenizer DIR") from None


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return resolve_model(args.model) if args.model else model_config_from_path(args.load)


def _build(args: argparse.Namespace, cfg: ModelConfig):
    """This rank's stage with the checkpoint's weights, and its process groups."""
    par = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    pg = init_distributed(par, seed=args.seed, device=args.device)
    if torch.distributed.get_world_size() != par.tensor_model_parallel_size * par.pipeline_model_parallel_size:
        raise ConfigError(
            f"--tensor-model-parallel-size x --pipeline-model-parallel-size = "
            f"{par.tensor_model_parallel_size * par.pipeline_model_parallel_size} but the job has "
            f"{torch.distributed.get_world_size()} ranks (generation has no data parallelism)"
        )
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build_model(cfg, par, pg, dtype=dtype)
    if args.device != "cpu" and torch.cuda.is_available():
        model = model.cuda()
    load_weights(args.load, model, cfg)
    return model.eval(), pg, dtype


def _write(
    path: str, prompts: list[Prompt], answers: dict[int, list[int]], tokenizer: Tokenizer, ends: list[int]
) -> None:
    tmp = Path(path + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            ids = answers[i]
            text = tokenizer.decode(ids[:-1] if ids and ids[-1] in ends else ids)
            f.write(json.dumps({"line": p.line, "answer": text, "tokens": ids}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def generate_file(args: argparse.Namespace) -> str | None:
    """Answer every request of --input into --output; returns the summary line on rank 0."""
    cfg = _model_config(args)
    tokenizer = _tokenizer(args)
    root = args.image_root or os.path.dirname(os.path.abspath(args.input))
    opts = TilingOptions(image_root=root, max_dynamic_patch=args.max_dynamic_patch)
    prompts = load_prompts(args.input, tokenizer, cfg, opts)
    model, pg, dtype = _build(args, cfg)
    device = next(model.parameters()).device
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    ends = end_token_ids(tokenizer)
    answers: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for group in batches(prompts, args.inference_max_requests):
        batch = prompt_batch([prompts[i] for i in group], cfg.pad_token_id, device, dtype)
        out = generate_tokens(model, pg, batch, args.max_new_tokens, ends, sampling)
        answers.update(zip(group, out))
    seconds = time.perf_counter() - t0
    if torch.distributed.get_rank() != 0:
        return None
    _write(args.output, prompts, answers, tokenizer, ends)
    n = sum(len(a) for a in answers.values())
    return f"{len(prompts)} answers, {n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s decoding"
