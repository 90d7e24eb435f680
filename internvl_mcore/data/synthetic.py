"""Synthetic text and a tiny trained tokenizer for the demo (examples/digits, data/digits.py) and the
README's examples: there is no model hub here, so the debug models get a tokenizer trained on the spot.

Not production code: nothing in the training or data pipeline imports it; tests build their other
fixtures in tests/fixtures.py.

    tiny_corpus(n, seed)                       -> list[str]  English/Chinese/emoji/digit/whitespace mix
    train_tiny_tokenizer(texts, out_dir, size) -> dir        Qwen2-style byte-level BPE + chat special tokens
    make_tokenizer_dir(out_dir, size, seed)    -> dir        train_tiny_tokenizer on tiny_corpus

Everything is a pure function of its arguments (fixed seeds), so outputs are byte-stable across runs.
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterable

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from .tokenizer import CHAT_SPECIAL_TOKENS, QWEN2_PRETOKENIZE_REGEX

_WORDS = (
    "the a an cat dog bird image picture photo shows red blue green yellow what is in this describe "
    "color number digit zero one two three four five six seven eight nine answer question left right "
    "top bottom frame video first second how many are there it's don't I'll we've "
    "你好 世界 图片 中的 是什么 这是 一只 猫 naïve café über déjà résumé 😺 🚀 ½ №"
).split()
_ENDINGS = (".", "?", "!", "\n", "\n\n", "  ", " 123", " 4567.", ":\n- item", "\t", "")


def tiny_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` short pseudo-sentences covering ASCII, accents, CJK, emoji, digits and whitespace runs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 14))]
        out.append(" ".join(words) + rng.choice(_ENDINGS))
    return out


def make_tokenizer_dir(out_dir: str, vocab_size: int = 600, seed: int = 0) -> str:
    """A Qwen2-style HF tokenizer dir (tokenizer.json + tokenizer_config.json) with the chat special tokens."""
    return train_tiny_tokenizer(tiny_corpus(3000, seed), out_dir, vocab_size=vocab_size)


def train_tiny_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 600) -> str:
    """Train a Qwen2-style byte-level BPE on `texts` and write an HF tokenizer dir that AutoTokenizer loads.

    Writes `tokenizer.json` and `tokenizer_config.json` (tokenizer_class Qwen2Tokenizer, chat special tokens
    of `CHAT_SPECIAL_TOKENS` appended after the BPE vocab as added special tokens, like Qwen2.5 + InternVL).
    `vocab_size` counts the BPE vocab (>= 256 byte symbols) without the special tokens. Returns `out_dir`.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    tok = HFTokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    base = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL_TOKENS])

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {
        str(base + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(CHAT_SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": list(CHAT_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 32768,
        "split_special_tokens": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return out_dir
