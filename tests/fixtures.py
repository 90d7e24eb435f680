"""Small, deterministic fixtures for the tests (no hub, no downloads).

The demo's tokenizer trainer and corpus live in internvl_mcore/data/synthetic.py (re-exported here).

Tokenizers
    tiny_corpus(n, seed)                          -> list[str]   English/Chinese/emoji/digit/whitespace mix
    make_tokenizer_dir(out_dir)                   -> dir         Qwen2-style tokenizer.json (train_tiny_tokenizer)
    make_vocab_merges_dir(src_dir, out_dir)       -> dir         same tokenizer as vocab.json + merges.txt
    make_sentencepiece_dir(out_dir, ...)          -> dir         sentencepiece BPE tokenizer.model (InternLM/Llama style)
    make_tiktoken_dir(src_dir, out_dir, filename) -> dir         same BPE as a tiktoken ranks file

Images and videos
    digit_image(index, size, seed)                -> PIL RGB     an sklearn digit, scaled and colored
    write_image(path, size, seed, fmt)            -> path        PNG/JPEG of digit_image
    write_corrupt_image(path)                     -> path        bytes that are not an image
    write_gif(path, n_frames, size)               -> path
    write_frame_folder(folder, n_frames, size)    -> folder      frame_1.jpg ... frame_N.jpg
    write_video(path, n_frames, size)             -> path        MPEG-4 file (needs the optional PyAV)

Datasets
    make_dataset_fixture(root)                    -> DataFixture meta JSON + JSONL + parquet covering every data
                                                                 kind and every bad-input kind, with the expected
                                                                 outcome of each record in `DataFixture.expected`.

Everything is a pure function of its arguments (fixed seeds), so outputs are byte-stable across runs.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from internvl_mcore.data.sources import PreprocessOptions
from internvl_mcore.data.synthetic import make_tokenizer_dir, tiny_corpus, train_tiny_tokenizer  # noqa: F401 (re-exported)
from internvl_mcore.data.tokenizer import CHAT_SPECIAL_TOKENS

# --------------------------------------------------------------------------------------------------
# Text and tokenizers
# --------------------------------------------------------------------------------------------------


def make_vocab_merges_dir(src_dir: str, out_dir: str) -> str:
    """Rewrite a tokenizer.json dir (byte-level BPE) as vocab.json + merges.txt + tokenizer_config.json."""
    with open(os.path.join(src_dir, "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(data["model"]["vocab"], f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for merge in data["model"]["merges"]:
            f.write((merge if isinstance(merge, str) else " ".join(merge)) + "\n")
    with open(os.path.join(src_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return out_dir


def _added_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def make_sentencepiece_dir(
    out_dir: str,
    vocab_size: int = 400,
    add_dummy_prefix: bool = False,
    normalization: str = "identity",
    tokenizer_class: str = "LlamaTokenizer",
    add_prefix_space: bool | None = None,
    legacy: bool | None = None,
    seed: int = 0,
) -> str:
    """A sentencepiece BPE `tokenizer.model` dir like InternLM's: <unk>=0, <s>=1, </s>=2, byte fallback,
    add_bos_token true, chat special tokens appended after the pieces in `added_tokens_decoder`.

    The default (no dummy prefix, identity normalization, class LlamaTokenizer with add_prefix_space
    false) is the configuration in which transformers' LlamaTokenizer and InternLM's slow sentencepiece
    tokenizer agree. `tokenizer_class='InternLM2Tokenizer'` writes the InternLM class name instead (which
    AutoTokenizer cannot load offline without the remote code).
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(3000, seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name=normalization,
        remove_extra_whitespaces=normalization != "identity",
        add_dummy_prefix=add_dummy_prefix,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    model = buf.getvalue()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    n = sp.GetPieceSize()
    added = {str(i): _added_entry(sp.IdToPiece(i)) for i in range(3)}
    for k, tok in enumerate(CHAT_SPECIAL_TOKENS):
        added[str(n + k)] = _added_entry(tok)
    config = {
        "tokenizer_class": tokenizer_class,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": add_dummy_prefix if add_prefix_space is None else add_prefix_space,
    }
    if legacy is not None:
        config["legacy"] = legacy
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return out_dir


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def make_tiktoken_dir(src_dir: str, out_dir: str, filename: str = "tokenizer.model") -> str:
    """The byte-level BPE of a tokenizer.json dir as a tiktoken ranks file (rank = token id), with the chat
    special tokens after the ranks in tokenizer_config.json (class TokenizersBackend, as AutoTokenizer
    converts a non-sentencepiece `tokenizer.model` with its tiktoken converter)."""
    with open(os.path.join(src_dir, "tokenizer.json"), encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    dec = _byte_decoder()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, filename), "w", encoding="ascii") as f:
        for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(bytes(dec[c] for c in tok)).decode("ascii") + f" {idx}\n")
    base = len(vocab)
    config = {
        "tokenizer_class": "TokenizersBackend",
        "added_tokens_decoder": {str(base + k): _added_entry(t) for k, t in enumerate(CHAT_SPECIAL_TOKENS)},
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Images and videos
# --------------------------------------------------------------------------------------------------

_DIGITS = None


def _digits() -> np.ndarray:
    """sklearn's bundled 8x8 digit images (1797, 8, 8), values 0..16 (read from the package, no download)."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        _DIGITS = load_digits().images.astype(np.float32)
    return _DIGITS


def digit_image(index: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """Digit `index` of sklearn's set, upscaled to `size` (w, h), colored by `seed`, with mild noise."""
    digit = _digits()[index % len(_digits())] / 16.0  # (8, 8) in [0, 1]
    rng = np.random.default_rng([seed, index])
    fg = rng.integers(0, 256, size=3).astype(np.float32)
    bg = 255.0 - fg
    small = digit[..., None] * fg + (1.0 - digit[..., None]) * bg  # (8, 8, 3)
    img = Image.fromarray(small.astype(np.uint8), "RGB").resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_image(path: str, size: tuple[int, int] = (64, 64), seed: int = 0, fmt: str | None = None) -> str:
    """Write digit_image(seed, size) to `path` (format from the extension unless `fmt`)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img = digit_image(seed, size, seed)
    fmt = fmt or ("JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG")
    img.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def write_corrupt_image(path: str) -> str:
    """A file with an image extension whose bytes are a truncated PNG header plus junk."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"this is not an image" * 4)
    return path


def write_gif(path: str, n_frames: int = 6, size: tuple[int, int] = (40, 30)) -> str:
    """An animated GIF whose frame k shows digit k."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    frames = [digit_image(k, size, seed=100 + k) for k in range(n_frames)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return path


def write_frame_folder(folder: str, n_frames: int = 10, size: tuple[int, int] = (40, 30)) -> str:
    """frame_1.jpg ... frame_N.jpg (numbered so that name order != frame order past 9)."""
    os.makedirs(folder, exist_ok=True)
    for k in range(n_frames):
        write_image(os.path.join(folder, f"frame_{k + 1}.jpg"), size, seed=200 + k)
    return folder


def write_video(path: str, n_frames: int = 12, size: tuple[int, int] = (48, 32), fps: int = 8) -> str:
    """An MPEG-4 video whose frame k shows digit k (needs PyAV, the optional video decoder)."""
    import av

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(n_frames):
            frame = av.VideoFrame.from_image(digit_image(k, size, seed=300 + k))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def image_bytes(size: tuple[int, int] = (64, 64), seed: int = 0, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    digit_image(seed, size, seed).save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# A dataset covering every kind of input
# --------------------------------------------------------------------------------------------------


@dataclass
class DataFixture:
    """Paths of a generated dataset and what each record must become.

    `expected[(dataset_name, line)]` is None for a good record or the Reject reason key for a bad one
    (for datasets with repeat_time 1; `repeat_datasets` lists the ones with repeat_time != 1).
    `kinds[(dataset_name, line)]` is 'text' | 'image' | 'multi_image' | 'video' for good records.
    Use `options()` for preprocessing options the fixture is sized for (small tiles, few frames).
    """

    root: str
    meta_path: str
    expected: dict[tuple[str, int], str | None] = field(default_factory=dict)
    kinds: dict[tuple[str, int], str] = field(default_factory=dict)
    n_images: dict[tuple[str, int], int] = field(default_factory=dict)
    repeat_datasets: dict[str, float] = field(default_factory=dict)
    image_size: int = 56
    num_image_token: int = 4
    max_seq_length: int = 2048
    min_num_frames: int = 2
    max_num_frames: int = 4

    def options(self, **overrides):
        kw = dict(
            image_size=self.image_size,
            num_image_token=self.num_image_token,
            max_seq_length=self.max_seq_length,
            min_num_frames=self.min_num_frames,
            max_num_frames=self.max_num_frames,
        )
        kw.update(overrides)
        return PreprocessOptions(**kw)


def _turns(*pairs: str) -> list[dict]:
    roles = ("human", "gpt")
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(pairs)]


def _write_jsonl(path: str, lines: list) -> None:
    """Each item: a dict (dumped as JSON) or raw bytes written as the line."""
    with open(path, "wb") as f:
        for item in lines:
            raw = item if isinstance(item, bytes) else json.dumps(item, ensure_ascii=False).encode("utf-8")
            f.write(raw + b"\n")


def _video_decoder_available() -> bool:
    for mod in ("av", "decord"):
        try:
            __import__(mod)
            return True
        except ImportError:
            pass
    return False


def make_dataset_fixture(root: str) -> DataFixture:
    """Write images, videos, JSONL files, a parquet file and meta.json under `root`.

    Datasets (meta keys) and their records, line by line:
      text     1 one turn, 2 system turn + two rounds, 3 empty conversations, 4 no assistant turn,
               5 malformed JSON, 6 not UTF-8, 7 '<image>' without an image, 8 a JSON list,
               9 an over-long answer (> max_seq_length tokens), 10 unknown role,
               (a blank line after 10 is not a record), 12 conversation ending on a user turn
      single   1 placeholder, 2 no placeholder (prepended), 3 missing file, 4 corrupt file,
               5 two placeholders for one image, 6 system turn + no placeholder, 7 wide image (many
               tiles), 8 JPEG image, 9 placeholder in the second user turn
      multi    (max_dynamic_patch 6) 1 two images in two turns, 2 three images without placeholders,
               3 two images one placeholder, 4 one image missing, 5 an image '../outside.png' and
               6 a symlink in the root to it (both 'outside_root': neither file is read)
      video    1 frame folder + '<video>', 2 GIF without placeholder, 3 video file (no decoder ->
               'video_decoder_missing'; with one, the fake file is 'corrupt_image'), 4 missing folder,
               5 GIF with the placeholder mid-sentence, 6 a real MPEG-4 file (written and decoded with
               PyAV when installed, else a stand-in and 'video_decoder_missing')
      parquet  rows 1 image+text, 2 text only, 3 two images, 4 corrupt image bytes, 5 one image part
               for two images
      half     (repeat_time 0.5) 8 text records;  twice (repeat_time 2.0) 3 text records
    """
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    img_dir = os.path.join(root, "images")
    fx = DataFixture(root=root, meta_path=os.path.join(root, "meta.json"))

    write_image(os.path.join(img_dir, "a.png"), (64, 48), seed=1)
    write_image(os.path.join(img_dir, "b.png"), (30, 90), seed=2)
    write_image(os.path.join(img_dir, "wide.png"), (300, 60), seed=3)
    write_image(os.path.join(img_dir, "c.jpg"), (100, 100), seed=4)
    write_corrupt_image(os.path.join(img_dir, "corrupt.png"))
    write_frame_folder(os.path.join(root, "videos", "clip_frames"), n_frames=10)
    write_gif(os.path.join(root, "videos", "anim.gif"), n_frames=6)
    with open(os.path.join(root, "videos", "clip.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42 not really a video")
    decoder = _video_decoder_available()
    if decoder:
        write_video(os.path.join(root, "videos", "real.mp4"), n_frames=12)
    else:  # cannot encode without PyAV; any bytes do, the missing decoder is reported first
        with open(os.path.join(root, "videos", "real.mp4"), "wb") as f:
            f.write(b"\x00\x00\x00\x18ftypmp42 stand-in for a real video")

    def put(name: str, line: int, reason: str | None, kind: str = "text", n_images: int = 0) -> None:
        fx.expected[(name, line)] = reason
        if reason is None:
            fx.kinds[(name, line)] = kind
            fx.n_images[(name, line)] = n_images

    # -- text --------------------------------------------------------------------------------------
    long_answer = " ".join(["seven eight nine"] * 1500)
    text_lines = [
        {"conversations": _turns("What is a cat?", "A small animal.")},
        {
            "conversations": [{"from": "system", "value": "You are terse."}]
            + _turns("Hi", "Hello.", "Count to 3", "1 2 3")
        },
        {"conversations": []},
        {"conversations": _turns("Anyone there?")},
        b'{"conversations": [{"from": "human", "value": "oops"',
        b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}',
        {"conversations": _turns("<image>\nWhat is this?", "Nothing.")},
        b'[1, 2, 3]',
        {"conversations": _turns("Say many numbers", long_answer)},
        {"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "boop"}]},
        b"",
        {"conversations": _turns("Q1", "A1", "Q2 with no answer")},
    ]
    _write_jsonl(os.path.join(root, "text.jsonl"), text_lines)
    for line, reason in enumerate(
        [
            None,
            None,
            "empty_conversation",
            "no_assistant_turn",
            "bad_json",
            "undecodable_text",
            "image_count_mismatch",
            "bad_record",
            "too_long",
            "bad_record",
            "blank",
            None,
        ],
        1,
    ):
        if reason != "blank":
            put("text", line, reason, "text")

    # -- single image ------------------------------------------------------------------------------
    single_lines = [
        {"image": "a.png", "conversations": _turns("<image>\nWhat digit is this?", "A one.")},
        {"image": "b.png", "conversations": _turns("Describe the picture.", "Tall and thin.")},
        {"image": "nope.png", "conversations": _turns("<image>\nWhat?", "Missing.")},
        {"image": "corrupt.png", "conversations": _turns("<image>\nWhat?", "Corrupt.")},
        {"image": "a.png", "conversations": _turns("<image> and <image>?", "Only one.")},
        {
            "image": "a.png",
            "conversations": [{"from": "system", "value": "Look carefully."}] + _turns("Which digit?", "One."),
        },
        {"image": "wide.png", "conversations": _turns("<image>\nWide?", "Very wide.")},
        {"image": "c.jpg", "conversations": _turns("<image>\nJPEG?", "Yes.")},
        {"image": "a.png", "conversations": _turns("Hello", "Hi.", "Now look: <image>", "A digit.")},
    ]
    _write_jsonl(os.path.join(root, "single.jsonl"), single_lines)
    for line, reason in enumerate(
        [None, None, "missing_image", "corrupt_image", "image_count_mismatch", None, None, None, None], 1
    ):
        put("single", line, reason, "image", 1)

    # -- multi image -------------------------------------------------------------------------------
    multi_lines = [
        {"image": ["a.png", "b.png"], "conversations": _turns("First <image>", "Got it.", "Second <image>", "Also.")},
        {"image": ["a.png", "b.png", "c.jpg"], "conversations": _turns("Compare the three.", "They differ.")},
        {"image": ["a.png", "b.png"], "conversations": _turns("Only <image> here", "Hmm.")},
        {"image": ["a.png", "missing.png"], "conversations": _turns("<image><image>", "One is missing.")},
        {"image": ["a.png", "../outside.png"], "conversations": _turns("<image><image>", "Left the root.")},
        {"image": ["link.png"], "conversations": _turns("<image>", "A link out of the root.")},
    ]
    write_image(os.path.join(root, "outside.png"), (32, 32), seed=5)  # beside images/, not in it
    os.symlink(os.path.join(root, "outside.png"), os.path.join(img_dir, "link.png"))
    _write_jsonl(os.path.join(root, "multi.jsonl"), multi_lines)
    put("multi", 1, None, "multi_image", 2)
    put("multi", 2, None, "multi_image", 3)
    put("multi", 3, "image_count_mismatch")
    put("multi", 4, "missing_image")
    put("multi", 5, "outside_root")
    put("multi", 6, "outside_root")

    # -- video -------------------------------------------------------------------------------------
    video_lines = [
        {"video": "videos/clip_frames/", "conversations": _turns("<video>\nWhat happens?", "Digits change.")},
        {"video": "videos/anim.gif", "conversations": _turns("Describe the animation.", "Counting.")},
        {"video": "videos/clip.mp4", "conversations": _turns("<video>\nAnd this?", "A clip.")},
        {"video": "videos/none/", "conversations": _turns("<video>\nGone?", "Gone.")},
        {"video": "videos/anim.gif", "conversations": _turns("Watch <video> closely", "Done.")},
        {"video": "videos/real.mp4", "conversations": _turns("<video>\nA real clip?", "Yes.")},
    ]
    _write_jsonl(os.path.join(root, "video.jsonl"), video_lines)
    put("video", 1, None, "video")
    put("video", 2, None, "video")
    put("video", 3, "corrupt_image" if decoder else "video_decoder_missing")
    put("video", 4, "missing_image")
    put("video", 5, None, "video")
    if decoder:
        put("video", 6, None, "video")
    else:
        put("video", 6, "video_decoder_missing")

    # -- parquet (HF datasets / TRL VLM style) ------------------------------------------------------
    import pyarrow as pa
    import pyarrow.parquet as pq

    def msg(role, *parts):
        content = []
        for p in parts:
            content.append({"type": "image", "text": None} if p is None else {"type": "text", "text": p})
        return {"role": role, "content": content}

    def img(seed, size=(48, 64)):
        return {"bytes": image_bytes(size, seed), "path": None}

    rows = [
        ([msg("user", None, "What digit?"), msg("assistant", "Seven.")], [img(7)]),
        ([msg("system", "Be brief."), msg("user", "Say hi"), msg("assistant", "Hi.")], []),
        ([msg("user", None, None, "Same digit?"), msg("assistant", "No.")], [img(1), img(2, (90, 30))]),
        ([msg("user", None, "Broken?"), msg("assistant", "Yes.")], [{"bytes": b"not a png", "path": None}]),
        ([msg("user", None, "Two images, one part"), msg("assistant", "Mismatch.")], [img(3), img(4)]),
    ]
    table = pa.table({"messages": [r[0] for r in rows], "images": [r[1] for r in rows]})
    pq.write_table(table, os.path.join(root, "data.parquet"))
    put("parquet", 1, None, "multi_image", 1)
    put("parquet", 2, None, "text")
    put("parquet", 3, None, "multi_image", 2)
    put("parquet", 4, "corrupt_image")
    put("parquet", 5, "image_count_mismatch")

    # -- repeat_time -------------------------------------------------------------------------------
    _write_jsonl(
        os.path.join(root, "half.jsonl"), [{"conversations": _turns(f"Question {k}", f"Answer {k}")} for k in range(8)]
    )
    _write_jsonl(
        os.path.join(root, "twice.jsonl"), [{"conversations": _turns(f"Again {k}", f"Yes {k}")} for k in range(3)]
    )
    fx.repeat_datasets = {"half": 0.5, "twice": 2.0}

    def at(rel: str) -> str:
        return os.path.join(root, rel)

    # Absolute paths: relative ones would be resolved against the working directory first (as InternVL).
    meta = {
        "text": {"root": "", "annotation": at("text.jsonl"), "data_augment": False, "repeat_time": 1, "length": 11},
        "single": {
            "root": img_dir,
            "annotation": at("single.jsonl"),
            "data_augment": True,
            "max_dynamic_patch": 12,
            "repeat_time": 1,
            "length": 9,
        },
        "multi": {"root": img_dir, "annotation": at("multi.jsonl"), "max_dynamic_patch": 6, "repeat_time": 1},
        "video": {"root": root, "annotation": at("video.jsonl"), "repeat_time": 1},
        "parquet": {"root": img_dir, "annotation": at("data.parquet"), "repeat_time": 1},
        "half": {"root": "", "annotation": at("half.jsonl"), "repeat_time": 0.5},
        "twice": {"root": "", "annotation": at("twice.jsonl"), "repeat_time": 2.0},
    }
    with open(fx.meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return fx


def new_tensor_bytes() -> int:
    """Bytes of the distinct storages of the CPU tensors created since the garbage collector last ran
    (with the collector off, every object made since stays in generation 0; freed ones leave it at
    once): the exporters' memory-bound tests sample it while the HF writer receives tensors."""
    import gc

    seen: dict[int, int] = {}
    for obj in gc.get_objects(generation=0):
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
