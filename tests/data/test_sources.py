"""Meta JSON, JSONL/parquet records and build_sample on every data kind and every bad-input kind."""

import copy
import json
import os
import pickle

import numpy as np
import pytest

from tests import fixtures
from internvl_mcore.data.image import find_closest_aspect_ratio
from internvl_mcore.data.sample import Reject, TokenizedSample
from internvl_mcore.data.sources import (
    REJECT_REASONS,
    DatasetSpec,
    PreprocessOptions,
    RawRecord,
    build_sample,
    iter_records,
    messages_to_conversations,
    read_meta,
)
from internvl_mcore.data.template import INTERNVL2_5_SYSTEM_PROMPT, tokenize_conversation
from internvl_mcore.data.tokenizer import load_tokenizer
from internvl_mcore.errors import DataError


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return fixtures.make_dataset_fixture(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(fixtures.make_tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def specs(fx):
    return {s.name: s for s in read_meta(fx.meta_path)}


@pytest.fixture(scope="module")
def outcomes(fx, tok, specs):
    """(dataset, line) -> TokenizedSample | Reject for every record of the non-repeated datasets."""
    out = {}
    for name, spec in specs.items():
        if name in fx.repeat_datasets:
            continue
        for rec in iter_records(spec, seed=0):
            out[(name, rec.line)] = rec if isinstance(rec, Reject) else build_sample(rec, tok, fx.options())
    return out


def record(specs, name, line):
    return next(r for r in iter_records(specs[name], 0) if r.line == line)


# ------------------------------------------------------------------------------------------------
# meta JSON
# ------------------------------------------------------------------------------------------------


def test_read_meta(fx, specs):
    assert list(specs) == ["text", "single", "multi", "video", "parquet", "half", "twice"]
    s = specs["single"]
    assert s.data_augment is True and s.max_dynamic_patch == 12 and s.length == 9
    assert specs["multi"].max_dynamic_patch == 6 and specs["multi"].data_augment is False
    assert specs["half"].repeat_time == 0.5 and specs["parquet"].format == "parquet"
    assert all(os.path.isabs(s.annotation) for s in specs.values())


def _write_meta(tmp_path, meta):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return str(path)


def test_read_meta_errors_name_file_and_key(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    ann = str(tmp_path / "a.jsonl")
    cases = [
        ({"ds": {"root": ""}}, "'annotation'"),
        ({"ds": {"annotation": ann, "repeat_time": "2"}}, "'repeat_time'"),
        ({"ds": {"annotation": ann, "max_dynamic_patch": 0}}, "'max_dynamic_patch'"),
        ({"ds": {"annotation": ann, "max_dynamic_patch": 2.5}}, "'max_dynamic_patch'"),
        ({"ds": {"annotation": str(tmp_path / "missing.jsonl")}}, "'annotation'"),
        ({"ds": {"annotation": ann, "repeat_time": 0}}, "'repeat_time'"),
        ({"ds": "not an object"}, "'ds'"),
        ({}, "non-empty"),
    ]
    for meta, key in cases:
        path = _write_meta(tmp_path, meta)
        with pytest.raises(DataError) as e:
            read_meta(path)
        assert path in str(e.value) and key in str(e.value), (meta, str(e.value))
    path = _write_meta(tmp_path, '{"ds": {"annotation": "a.jsonl",\n "root": }}')
    with pytest.raises(DataError, match=r"meta.json:2:"):
        read_meta(path)


def test_read_meta_relative_paths_fall_back_to_meta_folder(tmp_path, monkeypatch):
    sub = tmp_path / "metas"
    sub.mkdir()
    (sub / "a.jsonl").write_text("{}\n")
    (sub / "imgs").mkdir()
    path = _write_meta(sub, {"ds": {"root": "imgs", "annotation": "a.jsonl"}})
    monkeypatch.chdir(tmp_path)  # not found relative to the working directory ...
    (spec,) = read_meta(path)
    assert spec.annotation == str(sub / "a.jsonl") and spec.root == str(sub / "imgs")  # ... found beside the meta
    (tmp_path / "a.jsonl").write_text("{}\n")  # cwd-relative wins when it exists, as in InternVL
    (spec,) = read_meta(path)
    assert spec.annotation == str(tmp_path / "a.jsonl")


# ------------------------------------------------------------------------------------------------
# iter_records
# ------------------------------------------------------------------------------------------------


def test_jsonl_records_and_line_numbers(fx, specs):
    items = list(iter_records(specs["text"], 0))
    lines = [r.line for r in items]
    assert lines == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]  # line 11 is blank: not a record
    by_line = {r.line: r for r in items}
    for line, reason in [(5, "bad_json"), (6, "undecodable_text"), (8, "bad_record")]:
        r = by_line[line]
        assert isinstance(r, Reject) and r.reason == reason and r.source_file == specs["text"].annotation
    assert isinstance(by_line[1], RawRecord) and by_line[1].payload["conversations"][0]["value"] == "What is a cat?"
    assert specs["text"].expected_records == 11


def test_parquet_records(specs):
    items = list(iter_records(specs["parquet"], 0))
    assert [r.line for r in items] == [1, 2, 3, 4, 5] and all(isinstance(r, RawRecord) for r in items)
    row = items[0].payload
    assert set(row) == {"messages", "images"} and isinstance(row["images"][0]["bytes"], bytes)
    assert pickle.loads(pickle.dumps(items[0])).payload == row  # crosses process boundaries


def _spec_with_lines(tmp_path, n, repeat_time, name="ds"):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"conversations": [], "k": k}) + "\n" for k in range(n)))
    return DatasetSpec(name=name, root="", annotation=str(path), repeat_time=repeat_time)


def test_repeat_time_fraction_is_seeded_subsample(tmp_path):
    spec = _spec_with_lines(tmp_path, 40, 0.3)
    a = [r.payload["k"] for r in iter_records(spec, seed=1)]
    assert len(a) == int(40 * 0.3) == len(set(a)) and a == sorted(a)  # InternVL's count, file order
    assert a == [r.payload["k"] for r in iter_records(spec, seed=1)]
    others = {tuple(r.payload["k"] for r in iter_records(spec, seed=s)) for s in range(2, 8)}
    assert len(others) > 1  # the seed picks the subset
    assert spec.expected_records == 12


@pytest.mark.parametrize("repeat_time,passes", [(1.0, 1), (2.0, 2), (2.5, 2), (3, 3)])
def test_repeat_time_above_one_repeats_whole_file(tmp_path, repeat_time, passes):
    spec = _spec_with_lines(tmp_path, 5, repeat_time)
    items = list(iter_records(spec, 0))
    assert [r.payload["k"] for r in items] == list(range(5)) * passes  # int(r) passes, as InternVL
    assert [r.repeat for r in items] == [p for p in range(passes) for _ in range(5)]
    assert spec.expected_records == 5 * passes


def test_fixture_repeat_datasets(fx, specs):
    assert len(list(iter_records(specs["half"], 0))) == 4
    assert len(list(iter_records(specs["twice"], 0))) == 6


# ------------------------------------------------------------------------------------------------
# build_sample
# ------------------------------------------------------------------------------------------------


def test_every_record_meets_expectation(fx, outcomes):
    assert set(outcomes) == set(fx.expected)
    for key, want in fx.expected.items():
        got = outcomes[key]
        if want is None:
            assert isinstance(got, TokenizedSample), (key, got)
        else:
            assert isinstance(got, Reject) and got.reason == want, (key, want, got)
            assert got.reason in REJECT_REASONS and got.line == key[1]


def test_every_reject_reason_is_covered(fx):
    covered = {r for r in fx.expected.values() if r}
    assert covered | {"video_decoder_missing", "corrupt_image"} == set(REJECT_REASONS)


def _image_runs(tok, tokens):
    s = np.flatnonzero(tokens == tok.token_to_id("<img>"))
    e = np.flatnonzero(tokens == tok.token_to_id("</img>"))
    return [int(b - a - 1) for a, b in zip(s, e)]


def _grid_tiles(w, h, max_num):
    grids = sorted(
        {(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if c * r <= max_num},
        key=lambda g: g[0] * g[1],
    )
    c, r = find_closest_aspect_ratio(w / h, grids, w, h, 56)
    return c * r + (1 if c * r > 1 else 0)


def test_good_samples_are_consistent(fx, tok, outcomes):
    opts = fx.options()
    for key, kind in fx.kinds.items():
        s = outcomes[key]
        assert s.tokens.dtype == np.int32 and s.loss_mask.dtype == np.uint8 and len(s.tokens) == len(s.loss_mask)
        assert s.dataset == key[0] and s.line == key[1] and s.loss_mask.sum() > 0
        assert s.tiles.dtype == np.uint8 and s.tiles.shape == (sum(s.num_tiles), 56, 56, 3)
        assert _image_runs(tok, s.tokens) == [opts.num_image_token * t for t in s.num_tiles]
        if kind == "text":
            assert s.num_tiles == []
        elif kind in ("image", "multi_image"):
            assert len(s.num_tiles) == fx.n_images[key]
        else:
            assert opts.min_num_frames <= len(s.num_tiles) <= opts.max_num_frames and set(s.num_tiles) == {1}
    assert outcomes[("single", 1)].data_augment is True and outcomes[("text", 1)].data_augment is False


def test_tile_limits(outcomes):
    # single: max_dynamic_patch 12; multi: max(1, 6 // n) per image (InternVL's multi-image rule)
    assert outcomes[("single", 1)].num_tiles == [_grid_tiles(64, 48, 12)]
    assert outcomes[("single", 7)].num_tiles == [_grid_tiles(300, 60, 12)]
    assert outcomes[("multi", 1)].num_tiles == [_grid_tiles(64, 48, 3), _grid_tiles(30, 90, 3)]
    assert outcomes[("multi", 2)].num_tiles == [
        _grid_tiles(64, 48, 2),
        _grid_tiles(30, 90, 2),
        _grid_tiles(100, 100, 2),
    ]
    assert outcomes[("parquet", 3)].num_tiles == [_grid_tiles(48, 64, 6), _grid_tiles(90, 30, 6)]


def test_tiles_are_the_image_tiles(fx, specs, outcomes):
    from PIL import Image

    from internvl_mcore.data.image import dynamic_preprocess, tiles_to_array

    img = Image.open(os.path.join(specs["single"].root, "wide.png")).convert("RGB")
    np.testing.assert_array_equal(outcomes[("single", 7)].tiles, tiles_to_array(dynamic_preprocess(img, 1, 12, 56)))


def test_placeholders_and_templates(fx, tok, specs, outcomes):
    def text(key):
        return tok.decode(outcomes[key].tokens)

    # missing placeholder is prepended to the first user turn
    assert "<|im_start|>user\n<img>" in text(("single", 2)) and text(("single", 2)).count("<img>") == 1
    assert text(("multi", 2)).count("</img>\n<img>") == 2  # "<image>\n" x 3 prepended
    # a system turn keeps its prompt and the image still lands in the first user turn
    t6 = text(("single", 6))
    assert t6.startswith("<|im_start|>system\nLook carefully.<|im_end|>\n<|im_start|>user\n<img>")
    assert INTERNVL2_5_SYSTEM_PROMPT not in t6
    assert INTERNVL2_5_SYSTEM_PROMPT in text(("single", 1))
    # placeholder in a later turn is used where it is, nothing is prepended
    assert "<|im_start|>user\nHello<|im_end|>" in text(("single", 9)) and "Now look: <img>" in text(("single", 9))
    # video: Frame-k lines, one image block each
    v = text(("video", 1))
    n = len(outcomes[("video", 1)].num_tiles)
    assert all(f"Frame-{k}: <img>" in v for k in range(1, n + 1)) and f"Frame-{n + 1}:" not in v
    assert "<video>" not in v and "<|im_start|>user\nFrame-1: <img>" in v
    assert "<|im_start|>user\nFrame-1: <img>" in text(("video", 2))  # '<video>\n' prepended
    assert "Watch Frame-1: <img>" in text(("video", 5))
    # parquet messages: image part -> "<image>\n"
    assert "<|im_start|>user\n<img>" in text(("parquet", 1)) and "</img>\nWhat digit?<|im_end|>" in text(("parquet", 1))
    assert text(("parquet", 2)).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_sample_equals_template_on_expected_conversation(fx, tok, specs, outcomes):
    """build_sample = tokenize_conversation on the record with InternVL's placeholder added."""
    rec = record(specs, "single", 2)
    convs = copy.deepcopy(rec.payload["conversations"])
    convs[0]["value"] = "<image>\n" + convs[0]["value"]
    s = outcomes[("single", 2)]
    tokens, mask = tokenize_conversation(convs, tok, [fx.num_image_token * s.num_tiles[0]])
    np.testing.assert_array_equal(s.tokens, tokens)
    np.testing.assert_array_equal(s.loss_mask, mask)


def test_deterministic_and_worker_independent(fx, tok, specs):
    opts = fx.options()
    for name in ("video", "single", "parquet"):
        for rec in iter_records(specs[name], 0):
            if isinstance(rec, Reject):
                continue
            a = build_sample(rec, tok, opts)
            b = build_sample(pickle.loads(pickle.dumps(rec)), pickle.loads(pickle.dumps(tok)), opts)
            assert type(a) is type(b)
            if isinstance(a, TokenizedSample):
                assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.tiles, b.tiles)
                assert a.num_tiles == b.num_tiles
    # the payload is not modified (repeats reuse it)
    rec = record(specs, "single", 2)
    before = copy.deepcopy(rec.payload)
    build_sample(rec, tok, opts)
    assert rec.payload == before


def test_frame_sampling_depends_on_seed_line_and_repeat(fx, tok, specs):
    rec = record(specs, "video", 1)  # 10 frames, 2..4 kept
    opts = fx.options()

    def frames(r, seed):
        s = build_sample(r, tok, PreprocessOptions(**{**opts.__dict__, "seed": seed}))
        return s.tiles.tobytes()

    seen = {frames(rec, seed) for seed in range(12)}
    assert len(seen) > 1
    again = RawRecord(rec.dataset, rec.source_file, rec.line, rec.payload, repeat=1)
    assert {frames(again, seed) for seed in range(12)} != seen or len(seen) == 1


def test_too_long_and_truncate(fx, tok, specs, outcomes):
    assert outcomes[("text", 9)].reason == "too_long"
    rec = record(specs, "text", 9)
    s = build_sample(rec, tok, fx.options(truncate=True))
    assert isinstance(s, TokenizedSample) and len(s) == fx.max_seq_length and s.loss_mask.sum() > 0
    # truncation never splits an image: cut before the block, drop its tiles
    rec = record(specs, "multi", 1)
    full = outcomes[("multi", 1)]
    second_img = int(np.flatnonzero(full.tokens == tok.token_to_id("<img>"))[1])
    limit = second_img + 3
    s = build_sample(rec, tok, fx.options(max_seq_length=limit, truncate=True))
    assert isinstance(s, TokenizedSample)
    assert len(s) == second_img and s.num_tiles == full.num_tiles[:1] and len(s.tiles) == full.num_tiles[0]
    assert _image_runs(tok, s.tokens) == [fx.num_image_token * full.num_tiles[0]]
    r = build_sample(rec, tok, fx.options(max_seq_length=limit))
    assert isinstance(r, Reject) and r.reason == "too_long"


def test_messages_to_conversations():
    msgs = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "That."}]},
        {"role": "user", "content": "Plain string"},
        {"role": "assistant", "content": None},
    ]
    assert messages_to_conversations(msgs) == [
        {"from": "system", "value": "Sys."},
        {"from": "human", "value": "<image>\nWhat?"},
        {"from": "gpt", "value": "That."},
        {"from": "human", "value": "Plain string"},
        {"from": "gpt", "value": ""},
    ]


def test_jsonl_messages_style_and_parquet_paths(tmp_path, tok, fx):
    fixtures.write_image(str(tmp_path / "x.png"), (40, 40), seed=3)
    spec = DatasetSpec(name="m", root=str(tmp_path), annotation=str(tmp_path / "m.jsonl"))
    payload = {
        "image": "x.png",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "A"},
        ],
    }
    s = build_sample(RawRecord(spec, spec.annotation, 1, payload), tok, fx.options())
    assert isinstance(s, TokenizedSample) and tok.decode(s.tokens).count("<img>") == 1
    # parquet-style images given by path relative to root
    payload = {"messages": payload["messages"], "images": [{"bytes": None, "path": "x.png"}]}
    s = build_sample(RawRecord(spec, spec.annotation, 2, payload), tok, fx.options())
    assert isinstance(s, TokenizedSample) and len(s.num_tiles) == 1


@pytest.mark.parametrize(
    "payload,reason",
    [
        ({}, "bad_record"),
        ({"conversations": "text"}, "bad_record"),
        ({"conversations": [1, 2]}, "bad_record"),
        ({"conversations": None}, "bad_record"),
        ({"image": 5, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "bad_record"),
        (
            {"image": [None], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "bad_record",
        ),
        ({"video": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "bad_record"),
        ({"images": "x", "messages": [{"role": "user", "content": "q"}]}, "bad_record"),
        ({"images": [{"bytes": None, "path": None}], "messages": [{"role": "user", "content": "q"}]}, "bad_record"),
        ({"messages": [{"role": "alien", "content": "q"}]}, "bad_record"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "bad_record"),
        ({"image": "a.png", "conversations": [{"from": "gpt", "value": "answer only"}]}, "image_count_mismatch"),
        (
            {
                "video": "videos/anim.gif",
                "conversations": [{"from": "human", "value": "<video> <video>"}, {"from": "gpt", "value": "a"}],
            },
            "image_count_mismatch",
        ),
    ],
)
def test_bad_payloads_never_raise(fx, tok, specs, payload, reason):
    spec = specs["video"] if "video" in payload else specs["single"]
    out = build_sample(RawRecord(spec, spec.annotation, 99, payload), tok, fx.options())
    assert isinstance(out, Reject) and out.reason == reason and out.line == 99, out


def test_tokenizer_without_image_tokens_rejects_image_samples(tmp_path, fx, specs):
    from internvl_mcore.data.synthetic import train_tiny_tokenizer

    d = train_tiny_tokenizer(fixtures.tiny_corpus(300), str(tmp_path / "plain"), vocab_size=300)
    # Rename <IMG_CONTEXT> (same id) so the tokenizer has no such token and would split the text.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = os.path.join(d, name)
        with open(path) as f:
            content = f.read()
        with open(path, "w") as f:
            f.write(content.replace("<IMG_CONTEXT>", "<IMG_CTX>"))
    plain = load_tokenizer(d)
    out = build_sample(record(specs, "single", 1), plain, fx.options())
    assert isinstance(out, Reject) and out.reason == "bad_record" and "<IMG_CONTEXT>" in out.detail


def test_pretrain_image_record_gets_its_placeholder_and_plain_text(fx, tok, specs):
    """InternVL3.5: an image record whose only turn is from "pretrain" gets '<image>\\n' prepended to that
    turn and is tokenized as plain text (no chat template), loss on everything but the image block."""
    rec = record(specs, "single", 2)
    payload = {k: v for k, v in rec.payload.items() if k != "conversations"}
    payload["conversations"] = [{"from": "pretrain", "value": "A handwritten digit on paper."}]
    s = build_sample(RawRecord(rec.dataset, rec.source_file, rec.line, payload, rec.repeat), tok, fx.options())
    assert isinstance(s, TokenizedSample), s
    text = tok.decode(s.tokens)
    assert text.startswith("<img>") and text.endswith("</img>\nA handwritten digit on paper.")
    assert "<|im_start|>" not in text
    n_image = fx.num_image_token * s.num_tiles[0] + 2
    assert int(s.loss_mask.sum()) == len(s.tokens) - n_image and not s.loss_mask[:n_image].any()
