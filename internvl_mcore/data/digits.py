"""A small real dataset that ships with scikit-learn: 1,797 handwritten 8x8 digits, as InternVL data.

`build_digits_dataset` writes PNG images (upscaled), InternVL-format JSONL (single-image "What digit
is shown?", multi-image "Which of these images shows a 3?", and text-only arithmetic), a meta JSON,
a fixed held-out split, and a tokenizer for the debug models (`train_tiny_tokenizer`, vocab 500:
its chat-token ids are the `debug` preset's). Used by the demo, the examples and the tests.

`build_digits_rl_prompts` writes the online-RL prompt sets (--stage gspo / grpo): the same question
over the same split's images, with the digit as the reference answer and no gpt turn, as InternVL
JSONL plus an "answer" field for `tools/preprocess_mm_data.py --prompts`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .synthetic import tiny_corpus, train_tiny_tokenizer
from .tokenizer import load_tokenizer

QUESTION = "What digit is shown?"
TOKENIZER_VOCAB = 500  # BPE vocab; the chat tokens follow at 500.. (see config/presets.py: debug)


@dataclass
class DigitsDataset:
    """Paths of a built dataset."""

    root: str
    meta: str
    """InternVL meta JSON of the training split."""
    heldout: str
    """JSONL of held-out single-image questions ({"image", "question", "answer"})."""
    tokenizer: str
    """Tokenizer directory."""
    num_train: int
    num_heldout: int
    preference_meta: str | None = None
    """InternVL MPO meta JSON of MMPR preference pairs (built when `preference_pairs` > 0)."""


def _digit_png(pixels: np.ndarray, path: str, size: int) -> None:
    img = Image.fromarray((pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8), mode="L")
    img.resize((size, size), Image.BILINEAR).convert("RGB").save(path)


def build_digits_dataset(
    root: str,
    image_size: int = 56,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    multi_image: int = 300,
    text_only: int = 200,
    max_single: int | None = None,
    preference_pairs: int = 0,
) -> DigitsDataset:
    """Write the dataset under `root` (idempotent for the same arguments). `max_single` caps the
    single-image training questions (tests use a small set). `preference_pairs` > 0 also writes an MMPR
    preference set of that many training-split images (chosen = the right digit, rejected = a wrong one)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target
    held, train = _split(len(labels), heldout_fraction, seed)
    img_dir = _write_images(root, digits.images, image_size)

    # one generator, drawn in this order (multi-image picks, then arithmetic, then the shuffle): the
    # same arguments give the same files
    rng = random.Random(seed)
    lines = _single_image_records(train[:max_single], labels)
    lines += _multi_image_records(train, labels, multi_image, rng)
    lines += _text_records(text_only, rng)
    rng.shuffle(lines)
    train_jsonl = os.path.join(root, "digits_train.jsonl")
    _write_jsonl(train_jsonl, lines)
    heldout = os.path.join(root, "digits_heldout.jsonl")
    _write_jsonl(heldout, _heldout_records(held, labels, img_dir))
    meta = os.path.join(root, "meta.json")
    _write_meta(meta, "digits", img_dir, train_jsonl, len(lines))
    tok_dir = _train_tokenizer(os.path.join(root, "tokenizer"), lines, seed)
    pref_meta = _write_preference(root, img_dir, train, labels, preference_pairs, seed) if preference_pairs else None
    return DigitsDataset(root, meta, heldout, tok_dir, len(lines), len(held), pref_meta)


def _split(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) image indices: one seeded permutation, the first share held out."""
    order = np.random.RandomState(seed).permutation(n)
    n_held = int(round(n * heldout_fraction))
    return order[:n_held], order[n_held:]


@dataclass
class DigitsRLPrompts:
    """Paths of the online-RL prompt sets (InternVL JSONL + "answer"; meta JSONs for --prompts)."""

    train_meta: str
    heldout_meta: str
    train: str
    heldout: str
    num_train: int
    num_heldout: int


def build_digits_rl_prompts(
    root: str,
    image_size: int = 56,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    num_train: int | None = None,
    num_heldout: int | None = None,
) -> DigitsRLPrompts:
    """ "What digit is shown?" prompts with the digit as "answer": the training split's images (at most
    `num_train`, in the seed's order) and the held-out split's (at most `num_heldout`). The split and
    the images are build_digits_dataset's for the same `seed`, `heldout_fraction` and `image_size`,
    so the held-out prompts are the images evaluate.py scores and no training image is among them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target
    held, train = _split(len(labels), heldout_fraction, seed)
    img_dir = _write_images(root, digits.images, image_size)
    paths = {}
    for split, indices in (("train", train[:num_train]), ("heldout", held[:num_heldout])):
        records = [
            {
                "id": f"rl-{split}-{i}",
                "image": f"{i:04d}.png",
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}],
                "answer": str(int(labels[i])),
            }
            for i in indices
        ]
        paths[split] = os.path.join(root, f"digits_rl_{split}.jsonl")
        _write_jsonl(paths[split], records)
        paths[split + "_meta"] = os.path.join(root, f"meta_rl_{split}.json")
        _write_meta(paths[split + "_meta"], f"digits_rl_{split}", img_dir, paths[split], len(records))
    return DigitsRLPrompts(
        paths["train_meta"],
        paths["heldout_meta"],
        paths["train"],
        paths["heldout"],
        len(train[:num_train]),
        len(held[:num_heldout]),
    )


def _write_images(root: str, images: np.ndarray, size: int) -> str:
    """Every digit as root/images/NNNN.png (kept where it exists already); returns the folder."""
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    for i in range(len(images)):
        path = os.path.join(img_dir, f"{i:04d}.png")
        if not os.path.exists(path):
            _digit_png(images[i], path, size)
    return img_dir


def _single_image_records(indices: np.ndarray, labels: np.ndarray) -> list[dict]:
    """'What digit is shown?' for each image."""
    return [
        {
            "id": f"single-{i}",
            "image": f"{i:04d}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": str(int(labels[i]))},
            ],
        }
        for i in indices
    ]


def _multi_image_records(train: np.ndarray, labels: np.ndarray, count: int, rng: random.Random) -> list[dict]:
    """'Which of these images shows a D?' over three training images, answered 'Image-K'."""
    records = []
    for k in range(count):
        pick = rng.sample(list(train), 3)
        target = int(labels[pick[rng.randrange(3)]])
        answer = next(j + 1 for j, i in enumerate(pick) if labels[i] == target)
        question = "".join(f"Image-{j + 1}: <image>\n" for j in range(3)) + f"Which of these images shows a {target}?"
        records.append(
            {
                "id": f"multi-{k}",
                "image": [f"{i:04d}.png" for i in pick],
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"Image-{answer}"}],
            }
        )
    return records


def _text_records(count: int, rng: random.Random) -> list[dict]:
    """Text-only 'What is A + B?' questions (no image)."""
    records = []
    for k in range(count):
        a, b = rng.randrange(5), rng.randrange(5)
        records.append(
            {
                "id": f"text-{k}",
                "conversations": [
                    {"from": "human", "value": f"What is {a} + {b}?"},
                    {"from": "gpt", "value": str(a + b)},
                ],
            }
        )
    return records


def _heldout_records(held: np.ndarray, labels: np.ndarray, img_dir: str) -> list[dict]:
    """{"image" (absolute path), "question", "answer"} for each held-out image."""
    return [
        {"image": os.path.join(img_dir, f"{i:04d}.png"), "question": QUESTION, "answer": str(int(labels[i]))}
        for i in held
    ]


def _write_meta(path: str, name: str, img_dir: str, annotation: str, length: int) -> None:
    """An InternVL meta JSON of one dataset."""
    with open(path, "w") as f:
        json.dump(
            {
                name: {
                    "root": img_dir,
                    "annotation": annotation,
                    "data_augment": False,
                    "max_dynamic_patch": 1,
                    "repeat_time": 1,
                    "length": length,
                }
            },
            f,
            indent=2,
        )


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _train_tokenizer(tok_dir: str, lines: list[dict], seed: int) -> str:
    """The debug models' tokenizer, trained on a tiny corpus and the samples' chat texts."""
    # Retrained every time (about a second, deterministic) so it always matches the samples written.
    train_tiny_tokenizer(tiny_corpus(2000, seed) + list(_chat_texts(lines)), tok_dir, vocab_size=TOKENIZER_VOCAB)
    base = load_tokenizer(tok_dir).token_to_id("<|endoftext|>")
    if base != TOKENIZER_VOCAB:
        raise RuntimeError(f"{tok_dir}: tiny tokenizer learned {base} BPE tokens, expected {TOKENIZER_VOCAB}")
    return tok_dir


def _write_preference(root: str, img_dir: str, train: np.ndarray, labels: np.ndarray, n: int, seed: int) -> str:
    """MMPR lines {"image", "question", "chosen", "rejected"} over the first n training images, and
    their meta JSON; the wrong digit is drawn with a seeded generator."""
    rng = random.Random(seed + 1)
    path = os.path.join(root, "digits_preference.jsonl")
    with open(path, "w") as f:
        for i in train[:n]:
            right = int(labels[i])
            wrong = rng.choice([d for d in range(10) if d != right])
            f.write(
                json.dumps(
                    {"image": f"{i:04d}.png", "question": QUESTION, "chosen": str(right), "rejected": str(wrong)}
                )
                + "\n"
            )
    meta = os.path.join(root, "meta_preference.json")
    with open(meta, "w") as f:
        json.dump(
            {
                "digits_mpo": {
                    "root": img_dir,
                    "annotation": path,
                    "data_augment": False,
                    "max_dynamic_patch": 1,
                    "repeat_time": 1,
                    "length": int(min(n, len(train))),
                }
            },
            f,
            indent=2,
        )
    return meta


def _chat_texts(lines: list[dict]) -> list[str]:
    """The samples' turns as the chat template renders them, minus special tokens and placeholders.

    Training the BPE on these (rather than on the JSON records) makes the template's role names single
    tokens ("assistant" was 8 tokens), which shortens every sample by about a dozen tokens.
    """
    texts = []
    for line in lines:
        texts.append("system\n")
        for turn in line["conversations"]:
            role = "user" if turn["from"] == "human" else "assistant"
            texts.append(f"{role}\n" + turn["value"].replace("<image>", ""))
    return texts
