"""Generation requests: InternVL-format JSONL records -> prompt tokens and image tiles, with the
training data's own code (data/template.py's chat template and turn-by-turn tokenization,
data/image.py's dynamic tiling and normalization, data/sources.py's placeholder and path rules).

A record is what the training JSONL holds: ``{"image": PATH | [PATHS] (optional), "conversations":
[{"from": "system"|"human"|"gpt", "value": ...}, ...]}``. A trailing gpt turn (a reference answer) is
dropped; the prompt is every turn rendered as in training, then the assistant prefix
("<|im_start|>assistant\\n"), from which the model continues.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..config.model import ModelConfig
from ..data.image import cut_tiles, normalize_tiles, plan_tiling
from ..data.sources import (
    DatasetSpec,
    RejectError,
    add_image_placeholders,
    copy_conversations,
    media_path,
    read_image,
)
from ..data.template import GPT_ROLES, INTERNVL2_5, ChatTemplate, render_turns
from ..data.tokenizer import Tokenizer
from ..errors import DataError


@dataclass(frozen=True)
class TilingOptions:
    """InternVL's dynamic tiling knobs (its chat() defaults) and where image paths are resolved."""

    image_root: str
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    system_prompt: str | None = None


@dataclass
class Prompt:
    """One request: its prompt tokens and (T, 3, S, S) float32 normalized tiles (T = 0: text only)."""

    line: int
    tokens: list[int]
    tiles: np.ndarray


def read_requests(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line; a line that is not a JSON object is a DataError."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"--input {path}: {exc.strerror or exc}") from None
    with f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, found {type(record).__name__}")
            yield n, record


def _image_paths(record: dict, where: str) -> list[str]:
    if "video" in record:
        raise DataError(f"{where}: 'video' records are not supported by generation yet (images only)")
    image = record.get("image")
    if image is None:
        return []
    paths = image if isinstance(image, list) else [image]
    if not all(isinstance(p, str) for p in paths):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    return paths


def _tiles(paths: list[str], cfg: ModelConfig, opts: TilingOptions) -> list[np.ndarray]:
    """Each image's (T, 3, S, S) normalized tiles, tiled as the training data is."""
    spec = DatasetSpec(name="--input", root=opts.image_root, annotation="")
    size = cfg.vision.image_size
    out = []
    for k, rel in enumerate(paths):
        image, _, _ = read_image(media_path(spec, rel, f"image {k}"), f"image {k}")
        tiling = plan_tiling(*image.size, opts.min_dynamic_patch, opts.max_dynamic_patch, size, opts.use_thumbnail)
        out.append(normalize_tiles(cut_tiles(image, tiling, size)))
    return out


def _prompt_tokens(
    convs: list[dict], tokenizer: Tokenizer, image_tokens: list[int], opts: TilingOptions, template: ChatTemplate
) -> list[int]:
    """The turns tokenized one by one as data/template.py: tokenize_conversation does, then the
    assistant prefix the answer continues."""
    if convs and convs[-1].get("from") in GPT_ROLES:
        convs = convs[:-1]  # the reference answer
    # render_turns wants an assistant turn; an empty one stands for the answer to come and is dropped
    turns = render_turns(convs + [{"from": "gpt", "value": ""}], image_tokens, opts.system_prompt, template)[:-1]
    if turns[-1][0] != "human":
        raise RejectError("bad_record", "the conversation must end with a user turn (the prompt to answer)")
    bos = tokenizer.bos_token if tokenizer.add_bos_token else None
    ids: list[int] = []
    for k, (_, text) in enumerate(turns):
        ids += tokenizer.encode(bos + text if (k == 0 and bos) else text)
    return ids + tokenizer.encode(template.assistant_prefix)


def build_prompt(
    record: dict[str, Any],
    where: str,
    line: int,
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    opts: TilingOptions,
    template: ChatTemplate = INTERNVL2_5,
) -> Prompt:
    """One record's prompt; problems are DataErrors naming `where` (file:line)."""
    try:
        paths = _image_paths(record, where)
        convs = copy_conversations(record)
        if paths:
            add_image_placeholders(convs, len(paths), isinstance(record.get("image"), list))
        tiles = _tiles(paths, cfg, opts)
        tokens = _prompt_tokens(convs, tokenizer, [t.shape[0] * cfg.num_image_token for t in tiles], opts, template)
    except RejectError as exc:
        raise DataError(f"{where}: {exc.reason}: {exc.detail}") from None
    except DataError as exc:  # a TemplateError names the reason, not the line
        if str(exc).startswith(where):
            raise
        raise DataError(f"{where}: {exc}") from None
    size = cfg.vision.image_size
    all_tiles = np.concatenate(tiles) if tiles else np.zeros((0, 3, size, size), np.float32)
    return Prompt(line, tokens, all_tiles)


def load_prompts(path: str, tokenizer: Tokenizer, cfg: ModelConfig, opts: TilingOptions) -> list[Prompt]:
    """Every request of the JSONL file `path`, in file order."""
    prompts = [build_prompt(r, f"{path}:{n}", n, tokenizer, cfg, opts) for n, r in read_requests(path)]
    if not prompts:
        raise DataError(f"--input {path}: no requests (the file has no JSON lines)")
    return prompts
