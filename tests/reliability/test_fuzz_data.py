"""Fuzzing the data path: generated JSONL lines, conversations and image bytes -> a sample or a reject.

Each generated input is written as an annotation line (JSONL) or a parquet-style row with image bytes,
read back by the real reader (`iter_records`) and run through the preprocessing worker's function
(`process_record`: template, tokenize, tile, V2PE positions, tile encoding), as SFT or as an MMPR
preference record. Every resulting item must be either
  - a sample whose arrays agree (tokens / loss mask / positions of one length, one tile per counted
    tile, one <IMG_CONTEXT> run of num_image_token x tiles per image), or
  - a Reject with a documented reason, its file and line, and never `internal_error` (the label of
    an exception we did not foresee, i.e. a bug).
2,000 inputs per CI run (derandomized; hypothesis also mixes in constants it finds in the source, so the
exact inputs move with the code); FUZZ_EXAMPLES=10000 for a longer run. The count is printed.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_mcore.data.preprocess import _WorkerContext, _Ok, process_record
from internvl_mcore.data.sample import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, Reject
from internvl_mcore.data.sources import REJECT_REASONS, DatasetSpec, PreprocessOptions, iter_records

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
SIZE, TOKENS_PER_TILE, SEQ = 28, 1, 1024
# worker-side and preference reasons (data/preprocess.py, data/preference.py) besides the front end's
REASONS = set(REJECT_REASONS) | {
    "empty_sample",
    "too_long",
    "bad_image_tokens",
    "bad_tiles",
    "missing_response",
    "identical_pair",
    "prompt_mismatch",
}

# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------

# every character but surrogates: text()'s default alphabet (codec="utf-8") without the table of the
# codec's characters that hypothesis computes at its first use in a fresh clone (~1.3 CPU-s)
CHARS = st.characters(exclude_categories=("Cs",))
SPECIAL = ["<image>", "<video>", "<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "\n", "Frame-1:"]
text = st.one_of(
    st.text(CHARS, max_size=40),
    st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(CHARS, max_size=8)), max_size=6).map("".join),
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(CHARS, max_size=6), inner, max_size=3),
    max_leaves=8,
)
role = st.sampled_from(["human", "gpt", "system", "user", "assistant", "robot", ""]) | json_value
turn = st.one_of(st.fixed_dictionaries({"from": role, "value": text | json_value}), json_value)
conversations = st.one_of(st.lists(turn, max_size=5), json_value)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": role,
            "content": text
            | st.lists(
                st.one_of(
                    st.fixed_dictionaries(
                        {"type": st.sampled_from(["text", "image", "video", "audio"]), "text": text | st.none()}
                    ),
                    json_value,
                ),
                max_size=3,
            )
            | json_value,
        }
    )
    | json_value,
    max_size=4,
)


@st.composite
def image_bytes(draw) -> bytes:
    """A real image of any mode / size / format, possibly cut short, or bytes that are not an image."""
    kind = draw(st.sampled_from(["image", "image", "image", "truncated", "garbage", "empty"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "empty":
        return b""
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "LA"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]))
    # tiny, ordinary and extreme aspect ratios (a 2000x1 strip is cut into the widest grid)
    w, h = draw(
        st.sampled_from(
            [(1, 1), (2, 3), (7, 28), (33, 64), (300, 28), (64, 300), (300, 300), (2000, 1), (1, 2000), (2000, 3)]
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    # random 8x8-pixel blocks, not per-pixel noise: noise is the encoders' worst case (a 300x300 GIF's
    # palette quantization ~175 ms, PNG ~25 ms, ~10x less in blocks) and the data path sees the same modes
    # and sizes either way
    blocks = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((w, h), Image.NEAREST).convert(mode)
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode: store it as PNG
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    return data[: draw(st.integers(0, len(data) - 1))] if kind == "truncated" else data


plain = st.text(CHARS, max_size=30)


@st.composite
def good_conversations(draw, n_images: int) -> list[dict]:
    """Alternating user / assistant turns (optional system turn), placeholders for `n_images` or none
    (then the front end prepends them, as InternVL)."""
    turns = [{"from": "system", "value": draw(plain)}] if draw(st.booleans()) else []
    rounds = draw(st.integers(1, 3))
    where = draw(st.integers(0, rounds - 1))
    for r in range(rounds):
        question = draw(plain)
        if r == where and n_images and draw(st.booleans()):
            question = "<image>\n" * n_images + question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": draw(plain.filter(str.strip))}]
    return turns


@st.composite
def sft_record(draw, images: list[str]) -> dict:
    """An InternVL chat record: well-formed with 0, 1 or several images, or with any field wrong."""
    kind = draw(st.sampled_from(["text", "image", "multi", "messages", "video", "junk"]))
    chaotic = draw(st.integers(0, 2)) == 0
    n = {"image": 1, "multi": len(images)}.get(kind, 0) if images else 0
    record: dict = {"conversations": draw(conversations if chaotic else good_conversations(n))}
    if kind == "messages":
        record = {"messages": draw(messages)}
    elif kind == "image":
        choices = images if images and not chaotic else images + ["missing.png", "", "sub/"]
        record["image"] = draw(st.sampled_from(choices) | json_value) if chaotic else draw(st.sampled_from(choices))
    elif kind == "multi":
        record["image"] = (
            list(images) if not chaotic else draw(st.lists(st.sampled_from(images + ["x.png"]), max_size=3))
        )
    elif kind == "video":
        record["video"] = draw(st.sampled_from(["missing.mp4", "", "frames/"]) | json_value)
    elif kind == "junk":
        record.update(
            draw(
                st.dictionaries(
                    st.sampled_from(["image", "images", "video", "conversations", "id"]), json_value, max_size=3
                )
            )
        )
    return record


@st.composite
def preference_record(draw, images: list[str]) -> dict:
    chaotic = draw(st.integers(0, 2)) == 0
    record = {
        key: draw(text | json_value if chaotic else plain.filter(str.strip))
        for key in ("question", "chosen", "rejected")
    }
    if images and draw(st.booleans()):
        names = st.sampled_from(images + (["missing.png"] if chaotic else []))
        record["image"] = draw(names | st.lists(names, max_size=2))
    if draw(st.booleans()):
        record["system_prompt"] = draw(text)
    return record


@st.composite
def jsonl_input(draw):
    """(line bytes, n_images, preference?): raw lines (binary, JSON of any shape) or structured records."""
    n_images = draw(st.integers(0, 3))
    names = [f"img{k}.png" for k in range(n_images)]
    preference = draw(st.integers(0, 4)) == 0
    shape = draw(st.sampled_from(["record", "record", "record", "json", "bytes"]))
    if shape == "bytes":
        line = draw(st.binary(max_size=80))
    elif shape == "json":
        line = json.dumps(draw(json_value)).encode()
    else:
        rec = draw(preference_record(names) if preference else sft_record(names))
        line = json.dumps(rec, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return line, [draw(image_bytes()) for _ in range(n_images)], preference


@st.composite
def parquet_input(draw):
    """A parquet-style row (HF datasets): messages + image bytes structs, read without a file."""
    images = draw(st.lists(st.one_of(image_bytes().map(lambda b: {"bytes": b, "path": None}), json_value), max_size=3))
    return {"messages": draw(messages), "images": images}


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    from internvl_mcore.data.synthetic import train_tiny_tokenizer
    from internvl_mcore.data.tokenizer import load_tokenizer

    corpus = [f"Question {i}: what is {i} plus {i}? Answer: {2 * i}." for i in range(200)]
    tokenizer = load_tokenizer(train_tiny_tokenizer(corpus, str(tmp_path_factory.mktemp("tok")), vocab_size=300))
    ids = tuple(tokenizer.token_to_id(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))
    options = PreprocessOptions(
        image_size=SIZE, num_image_token=TOKENS_PER_TILE, max_seq_length=SEQ, min_num_frames=2, max_num_frames=3
    )

    def make(preference: bool) -> _WorkerContext:
        return _WorkerContext(
            tokenizer=tokenizer,
            options=options,
            seq_length=SEQ,
            seed=0,
            v2pe_delta=0.5,
            v2pe_random=False,
            tile_format="raw",
            num_image_token=TOKENS_PER_TILE,
            image_size=SIZE,
            img_ids=ids,
            preference=preference,
        )  # type: ignore[arg-type]

    return {False: make(False), True: make(True)}


def check_result(result, ctx: _WorkerContext, counts: Counter) -> None:
    """A sample with consistent arrays, or a documented reject with a location."""
    if isinstance(result, Reject):
        assert result.reason in REASONS and result.reason != "internal_error", (result.reason, result.detail)
        assert result.line >= 1 and result.source_file, result
        counts[f"reject:{result.reason}"] += 1
        return
    items = result if isinstance(result, list) else [result]
    assert len(items) == (2 if ctx.preference else 1)
    tiles = items[0].sample.num_tiles  # a preference pair stores its tiles once, with the chosen half
    for item in items:
        assert isinstance(item, _Ok), type(item)
        s = item.sample
        n = len(s)
        assert 0 < n <= ctx.seq_length
        assert s.loss_mask.shape == s.position_ids.shape == (n,) and s.loss_mask.any()
        assert int(s.num_tiles.sum()) == len(s.tiles)
        assert all(len(t) == SIZE * SIZE * 3 for t in s.tiles)
        assert np.all(np.diff(s.position_ids) >= 0)
        start, end, context_id = ctx.img_ids
        assert int(np.count_nonzero(s.tokens == context_id)) == TOKENS_PER_TILE * int(tiles.sum())
        assert int(np.count_nonzero(s.tokens == start)) == int(np.count_nonzero(s.tokens == end)) == len(tiles)
    counts["sample"] += 1


def test_fuzz_records_conversations_and_images(context, tmp_path, capsys):
    counts: Counter = Counter()
    root = tmp_path / "data"
    root.mkdir()

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=st.one_of(jsonl_input(), parquet_input()))
    def one(case) -> None:
        counts["inputs"] += 1
        if isinstance(case, dict):  # a parquet row: no file, the reader yields the row as the payload
            from internvl_mcore.data.sources import RawRecord

            spec = DatasetSpec(name="pq", root=str(root), annotation=str(root / "rows.parquet"), max_dynamic_patch=4)
            records, ctx = [RawRecord(spec, spec.annotation, 1, case)], context[False]
        else:
            line, images, preference = case
            for k, data in enumerate(images):
                (root / f"img{k}.png").write_bytes(data)
            (root / "a.jsonl").write_bytes(line + b"\n")
            spec = DatasetSpec(name="fz", root=str(root), annotation=str(root / "a.jsonl"), max_dynamic_patch=4)
            records, ctx = list(iter_records(spec, seed=0)), context[preference]
        for ordinal, record in enumerate(records):
            check_result(process_record(ctx, ordinal, record), ctx, counts)

    one()
    samples = counts["sample"]
    rejects = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("reject:")}
    with capsys.disabled():
        print(
            f"\nfuzz: {counts['inputs']} generated inputs -> {samples} samples, {sum(rejects.values())} rejects "
            f"{rejects}, 0 crashes"
        )
    assert counts["inputs"] >= min(EXAMPLES, 1000)  # hypothesis ran (it may stop early only if it ran out of inputs)
    assert samples > 0.02 * counts["inputs"] and len(rejects) >= 8  # the generators reach both outcomes
