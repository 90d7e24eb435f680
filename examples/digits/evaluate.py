#!/usr/bin/env python
"""Answer the digits held-out questions with an exported model loaded in transformers.

    python examples/digits/evaluate.py --hf-dir HF_DIR --heldout digits_heldout.jsonl --tokenizer TOK_DIR \
        [--system-prompt TEXT] [--max-dynamic-patch 1] [--predictions OUT.jsonl]

The model is `transformers.InternVLForConditionalGeneration` read from the directory
`tools/convert_to_hf.py --format transformers` wrote (offline; nothing is downloaded). Its inputs are
built the way training saw them, with this repository's code rather than transformers' processor
(which needs torchvision):

- input ids: the `internvl2_5` template and tokenizer of `internvl_mcore.data` render the question as a
  one-turn conversation; the prompt is everything before the assistant's answer, i.e. it ends with
  "<|im_start|>assistant\\n", and each image is <img> + tiles x <IMG_CONTEXT> + </img>;
- pixel values: InternVL's tiling and ImageNet normalization from `internvl_mcore.data.image`.

Answers are greedy generations up to <|im_end|>, compared with the reference answer after stripping
whitespace. Prints the accuracy; the exit code is 0 whenever evaluation ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from internvl_mcore.data.image import dynamic_preprocess, normalize_tiles, tiles_to_array  # noqa: E402
from internvl_mcore.data.template import tokenize_conversation  # noqa: E402
from internvl_mcore.data.tokenizer import Tokenizer, load_tokenizer  # noqa: E402


@dataclass
class Question:
    """One held-out question: an image file, the question text and the reference answer."""

    image: str
    question: str
    answer: str


@dataclass
class EvalResult:
    """Outcome of `evaluate`: counts plus every prediction (in held-out file order)."""

    num_questions: int
    num_correct: int
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_questions if self.num_questions else 0.0


def load_questions(path: str) -> list[Question]:
    """Read a held-out JSONL of {"image", "question", "answer"} objects; errors name the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append(Question(str(rec["image"]), str(rec["question"]), str(rec["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with image, question, answer ({e})") from e
    if not out:
        raise ValueError(f"{path}: no held-out questions")
    return out


def prompt_ids(tokenizer: Tokenizer, question: str, image_tokens: list[int], system_prompt: str | None) -> list[int]:
    """Token ids of the generation prompt for `question` with one `<image>` per entry of `image_tokens`
    (its <IMG_CONTEXT> count).

    The conversation is templated exactly as in training with an empty answer; the answer's first
    loss-carrying token marks where the assistant starts to speak, so the prompt is everything before it.
    """
    placeholders = "<image>\n" * len(image_tokens)
    conversation = [{"from": "human", "value": placeholders + question}, {"from": "gpt", "value": ""}]
    tokens, loss_mask = tokenize_conversation(conversation, tokenizer, image_tokens, system_prompt=system_prompt)
    first_target = int(np.flatnonzero(loss_mask)[0])  # the empty answer's <|im_end|>
    return tokens[:first_target].tolist()


def image_pixels(path: str, image_size: int, max_dynamic_patch: int = 1, use_thumbnail: bool = True) -> np.ndarray:
    """(T, 3, image_size, image_size) float32 tiles of one image, as preprocessing tiles it."""
    from PIL import Image

    with Image.open(path) as im:
        image = im.convert("RGB")
    tiles = dynamic_preprocess(image, 1, max_dynamic_patch, image_size, use_thumbnail)
    return normalize_tiles(tiles_to_array(tiles))


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) ids and attention mask, left-padded so every prompt ends where generation starts."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def evaluate(
    hf_dir: str,
    heldout: str,
    tokenizer_dir: str,
    system_prompt: str | None = None,
    max_dynamic_patch: int = 1,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Greedy-answer every held-out question (or the first `limit`) with the transformers model in `hf_dir`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from tqdm import tqdm
    from transformers import InternVLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    start = time.perf_counter()
    questions = load_questions(heldout)[:limit]
    tokenizer = load_tokenizer(tokenizer_dir)
    model = InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    config = model.config
    image_size = config.vision_config.image_size
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else int(image_size)
    tokens_per_tile = int(config.image_seq_length)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if config.image_token_id != tokenizer.token_to_id("<IMG_CONTEXT>"):
        raise ValueError(
            f"{hf_dir}/config.json image_token_id {config.image_token_id} is not the tokenizer's "
            f"<IMG_CONTEXT> id {tokenizer.token_to_id('<IMG_CONTEXT>')} ({tokenizer_dir})"
        )

    result = EvalResult(num_questions=len(questions), num_correct=0)
    bar = tqdm(total=len(questions), desc="held-out questions", unit="q", disable=not progress)
    for lo in range(0, len(questions), batch_size):
        batch = questions[lo : lo + batch_size]
        pixels = [image_pixels(q.image, image_size, max_dynamic_patch) for q in batch]  # each (T, 3, H, W)
        rows = [
            prompt_ids(tokenizer, q.question, [tokens_per_tile * len(p)], system_prompt) for q, p in zip(batch, pixels)
        ]
        ids, mask = _left_pad(rows, pad)
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                pixel_values=torch.from_numpy(np.concatenate(pixels)),  # (sum T, 3, H, W)
                max_new_tokens=4,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for q, gen in zip(batch, out[:, ids.shape[1] :].tolist()):
            if eos in gen:
                gen = gen[: gen.index(eos)]
            text = tokenizer.decode(gen).strip()
            correct = text == q.answer.strip()
            result.num_correct += int(correct)
            result.predictions.append(
                {"image": q.image, "question": q.question, "answer": q.answer, "prediction": text, "correct": correct}
            )
        bar.update(len(batch))
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="directory written by convert_to_hf.py --format transformers")
    p.add_argument("--heldout", required=True, help="held-out JSONL ({image, question, answer} per line)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory the data was preprocessed with")
    p.add_argument(
        "--system-prompt",
        default=None,
        help="the --system-prompt given to preprocess_mm_data.py (default: the template's)",
    )
    p.add_argument("--max-dynamic-patch", type=int, default=1, help="tiles per image, as in the meta JSON")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--predictions", default=None, help="write every prediction to this JSONL")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    r = evaluate(
        args.hf_dir,
        args.heldout,
        args.tokenizer,
        args.system_prompt,
        args.max_dynamic_patch,
        args.batch_size,
        args.limit,
        not args.no_progress,
    )
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            for pred in r.predictions:
                f.write(json.dumps(pred) + "\n")
    print(f"held-out accuracy: {r.accuracy:.2%} ({r.num_correct}/{r.num_questions}) in {r.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
