"""Tokenizer loader: ids must equal transformers' AutoTokenizer (add_special_tokens=False) on every format."""

import json
import os
import pickle
import shutil
import unicodedata

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests import fixtures
from internvl_mcore.data.synthetic import train_tiny_tokenizer
from internvl_mcore.data.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer, load_tokenizer
from internvl_mcore.errors import DataError

CHAT = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT>"
    "<IMG_CONTEXT></img>\nWhat's in the <ref>cat</ref> <box>[[1, 2, 3, 4]]</box>?<|im_end|>\n"
    "<|im_start|>assistant\nA cat 😺  \t sitting.<|im_end|>\n"
)
EDGE = [
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "\n\nnewlines first",
    "tabs\tand\r\nCRLF",
    "a   b    c",
    "digits 1234567890 and 3.14159",
    "你好世界，这是一只猫。",
    "emoji 🚀🚀 😺",
    "combining e\u0301 vs é, ligature ﬁ, fullwidth Ａ",
    "<|im_start|><|im_start|>x<|im_end|>",
    "no space<img>between</img>tokens",
    "<s>bos text</s> eos text <unk>",
    "almost special <|im_start| and <IMG_CONTEXT",
    CHAT,
]


def texts():
    return fixtures.tiny_corpus(300, seed=7) + EDGE


def hf_ids(hf, text):
    return list(hf(text, add_special_tokens=False).input_ids)


def assert_same_ids(ours, hf, items):
    bad = [(t, ours.encode(t), hf_ids(hf, t)) for t in items if ours.encode(t) != hf_ids(hf, t)]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return fixtures.make_tokenizer_dir(str(tmp_path_factory.mktemp("qwen_tok")))


def test_tokenizer_json_matches_autotokenizer(qwen_dir):
    ours = load_tokenizer(qwen_dir)
    hf = AutoTokenizer.from_pretrained(qwen_dir)
    assert ours.kind == "tokenizer.json"
    assert_same_ids(ours, hf, texts())
    assert ours.vocab_size == len(hf)
    for tok in CHAT_SPECIAL_TOKENS:
        assert ours.token_to_id(tok) == hf.convert_tokens_to_ids(tok)
        assert ours.encode(tok * 3) == [ours.token_to_id(tok)] * 3
    # Qwen2 adds no BOS; InternVL's template then prepends nothing.
    assert ours.add_bos_token is False and ours.bos_token_id is None
    assert ours.eos_token_id == hf.eos_token_id


def test_vocab_merges_matches_autotokenizer(qwen_dir, tmp_path):
    d = fixtures.make_vocab_merges_dir(qwen_dir, str(tmp_path / "vm"))
    assert not os.path.exists(os.path.join(d, "tokenizer.json"))
    ours = load_tokenizer(d)
    hf = AutoTokenizer.from_pretrained(d)
    assert ours.kind == "vocab+merges"
    assert_same_ids(ours, hf, texts())
    assert ours.vocab_size == len(hf)
    # Same tokenizer, other serialization: same ids as the tokenizer.json form.
    ref = load_tokenizer(qwen_dir)
    assert all(ours.encode(t) == ref.encode(t) for t in texts())


@pytest.mark.parametrize(
    "add_dummy_prefix,normalization,add_prefix_space,legacy",
    [
        (False, "identity", None, None),  # InternLM-like: no dummy prefix
        (True, "identity", True, True),  # Llama-2 legacy: prefix on every chunk
        (True, "nmt_nfkc", True, False),  # non-legacy: prefix on the first chunk only
        (True, "nmt_nfkc", False, None),  # prefix switched off in the config
    ],
)
def test_sentencepiece_matches_autotokenizer(tmp_path, add_dummy_prefix, normalization, add_prefix_space, legacy):
    d = fixtures.make_sentencepiece_dir(
        str(tmp_path / "sp"),
        add_dummy_prefix=add_dummy_prefix,
        normalization=normalization,
        add_prefix_space=add_prefix_space,
        legacy=legacy,
    )
    ours = load_tokenizer(d)
    hf = AutoTokenizer.from_pretrained(d)
    assert ours.kind == "sentencepiece"
    assert_same_ids(ours, hf, texts())
    assert ours.vocab_size == len(hf)
    assert ours.add_bos_token is True and ours.bos_token_id == hf.bos_token_id == 1
    for tok in CHAT_SPECIAL_TOKENS + ("<s>", "</s>", "<unk>"):
        assert ours.token_to_id(tok) == hf.convert_tokens_to_ids(tok)


def _slow_reference(sp, added: dict, text: str) -> list:
    """InternLM's slow tokenizer, written out: scan for the leftmost (longest) added token, sentencepiece-
    encode the text before it, emit the token's id, continue after it."""
    ids, rest = [], text
    while rest:
        hits = [(rest.find(t), -len(t), t) for t in added if rest.find(t) >= 0]
        if not hits:
            ids += sp.encode(rest)
            break
        pos, _, tok = min(hits)
        if pos:
            ids += sp.encode(rest[:pos])
        ids.append(added[tok])
        rest = rest[pos + len(tok) :]
    return ids


@pytest.mark.parametrize("add_dummy_prefix,normalization", [(False, "identity"), (True, "nmt_nfkc")])
def test_sentencepiece_internlm_class_runs_sentencepiece_per_chunk(tmp_path, add_dummy_prefix, normalization):
    import sentencepiece as spm

    d = fixtures.make_sentencepiece_dir(
        str(tmp_path / "internlm"),
        add_dummy_prefix=add_dummy_prefix,
        normalization=normalization,
        tokenizer_class="InternLM2Tokenizer",
    )
    ours = load_tokenizer(d)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        added = {v["content"]: int(k) for k, v in json.load(f)["added_tokens_decoder"].items()}
    for t in texts():
        assert ours.encode(t) == _slow_reference(sp, added, t), t
    if not add_dummy_prefix and normalization == "identity":
        # In this configuration transformers' LlamaTokenizer is the same tokenizer: check against it too.
        llama = str(tmp_path / "as_llama")
        shutil.copytree(d, llama)
        cfg_path = os.path.join(llama, "tokenizer_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.update(tokenizer_class="LlamaTokenizer", add_prefix_space=False)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        assert_same_ids(ours, AutoTokenizer.from_pretrained(llama), texts())


@pytest.mark.parametrize("filename", ["tokenizer.model", "tiktoken.model"])
def test_tiktoken_matches_autotokenizer(qwen_dir, tmp_path, filename):
    d = fixtures.make_tiktoken_dir(qwen_dir, str(tmp_path / "tik"), filename=filename)
    ours = load_tokenizer(d)
    hf = AutoTokenizer.from_pretrained(d)
    assert ours.kind == "tiktoken"
    assert_same_ids(ours, hf, texts())
    assert ours.vocab_size == len(hf)
    for tok in CHAT_SPECIAL_TOKENS:
        assert ours.token_to_id(tok) == hf.convert_tokens_to_ids(tok)


def test_tiktoken_named_file_loads(qwen_dir, tmp_path):
    """`*.tiktoken` files (Qwen-1 style) load too; same ranks -> same ids as the tokenizer.model form."""
    a = load_tokenizer(fixtures.make_tiktoken_dir(qwen_dir, str(tmp_path / "a"), filename="tokenizer.model"))
    b = load_tokenizer(fixtures.make_tiktoken_dir(qwen_dir, str(tmp_path / "b"), filename="qwen.tiktoken"))
    assert all(a.encode(t) == b.encode(t) for t in texts())


def test_decode_round_trip(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    for t in texts():
        # Qwen2 NFC-normalizes before byte-level BPE, so decode gives back the NFC form exactly.
        assert tok.decode(tok.encode(t)) == unicodedata.normalize("NFC", t)


def test_decode_keeps_special_tokens_sentencepiece(tmp_path):
    tok = load_tokenizer(fixtures.make_sentencepiece_dir(str(tmp_path / "sp")))
    text = "<|im_start|>user\nhello world<|im_end|>\n"
    assert tok.decode(tok.encode(text)) == text


def test_pickle_round_trip_rebuilds_backend(qwen_dir, tmp_path):
    for d in (
        qwen_dir,
        fixtures.make_sentencepiece_dir(str(tmp_path / "sp")),
        fixtures.make_tiktoken_dir(qwen_dir, str(tmp_path / "tik")),
    ):
        tok = load_tokenizer(d)
        tok.encode("warm up the backend")
        blob = pickle.dumps(tok)
        clone = pickle.loads(blob)
        assert clone._backend is None  # rebuilt lazily in the worker
        assert [clone.encode(t) for t in texts()] == [tok.encode(t) for t in texts()]
        assert clone.sha256 == tok.sha256


def test_sha256_identifies_files(qwen_dir, tmp_path):
    a = load_tokenizer(qwen_dir).sha256
    assert a == load_tokenizer(qwen_dir).sha256
    copy = str(tmp_path / "copy")
    shutil.copytree(qwen_dir, copy)
    assert load_tokenizer(copy).sha256 == a  # content, not location
    cfg_path = os.path.join(copy, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = 123
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert load_tokenizer(copy).sha256 != a


def test_train_tiny_tokenizer_layout(tmp_path):
    d = train_tiny_tokenizer(fixtures.tiny_corpus(500), str(tmp_path / "t"), vocab_size=300)
    assert sorted(os.listdir(d)) == ["tokenizer.json", "tokenizer_config.json"]
    hf = AutoTokenizer.from_pretrained(d)
    base = len(hf) - len(CHAT_SPECIAL_TOKENS)
    assert base <= 300
    # Special tokens come after the BPE vocab, in CHAT_SPECIAL_TOKENS order, and are single tokens.
    assert [hf.convert_tokens_to_ids(t) for t in CHAT_SPECIAL_TOKENS] == list(range(base, len(hf)))
    ours = load_tokenizer(d)
    for t in CHAT_SPECIAL_TOKENS:
        ids = hf(f"x {t} y", add_special_tokens=False).input_ids
        assert ids.count(hf.convert_tokens_to_ids(t)) == 1 and ours.encode(f"x {t} y") == ids
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(["x"], str(tmp_path / "u"), vocab_size=100)


def test_missing_and_broken_dirs(tmp_path, qwen_dir):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="tokenizer.json, vocab.json"):
        load_tokenizer(str(empty))
    # An added token whose stated id is taken by a vocab entry must fail loudly, not shift ids.
    bad = str(tmp_path / "bad")
    fixtures.make_vocab_merges_dir(qwen_dir, bad)
    cfg_path = os.path.join(bad, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["added_tokens_decoder"]["5"] = {"content": "<extra>", "special": True}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(DataError, match="<extra>"):
        load_tokenizer(bad)
    with pytest.raises(KeyError, match="<nope>"):
        load_tokenizer(qwen_dir).token_to_id("<nope>")


def test_tokenizer_json_gets_config_only_added_tokens(qwen_dir, tmp_path):
    """A token listed only in tokenizer_config.json (as HF merges it) is added with its stated id."""
    d = str(tmp_path / "extra")
    shutil.copytree(qwen_dir, d)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    new_id = max(int(k) for k in cfg["added_tokens_decoder"]) + 1
    cfg["added_tokens_decoder"][str(new_id)] = {"content": "<video_pad>", "special": True, "normalized": False}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    ours = load_tokenizer(d)
    hf = AutoTokenizer.from_pretrained(d)
    assert ours.token_to_id("<video_pad>") == new_id == hf.convert_tokens_to_ids("<video_pad>")
    assert_same_ids(ours, hf, ["a<video_pad>b", CHAT])
    assert isinstance(ours, Tokenizer) and np.int64(ours.vocab_size) == len(hf)
