"""tools/preprocess_mm_data.py --prompts on the digits RL prompts plus a dataset of bad records: what
is kept, what is rejected and why, the reject limit, and the flags --prompts refuses (one line each);
the digits RL prompt sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import importlib.util

import pytest

from internvl_mcore.data.digits import QUESTION, build_digits_rl_prompts
from internvl_mcore.data.prompts import read_prompt_shards
from tests.reliability.cli_helpers import REPO, assert_user_error, preprocess_args, run

_spec = importlib.util.spec_from_file_location("preprocess_cli", REPO / "tools" / "preprocess_mm_data.py")
CLI = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(CLI)

BAD = [  # (record, the reject reason or None when kept)
    ({"image": "0001.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}, "missing_answer"),
    ({"image": "../escape.png", "conversations": [{"from": "human", "value": "q"}], "answer": "1"}, "outside_root"),
    ({"conversations": [{"from": "human", "value": "<image>\nq"}], "answer": "1"}, "image_count_mismatch"),
    ({"conversations": [{"from": "gpt", "value": "a"}], "answer": "1"}, "bad_record"),
    ({"image": "missing.png", "conversations": [{"from": "human", "value": "q"}], "answer": "1"}, "missing_image"),
    ({"conversations": [{"from": "human", "value": "seven " * 400}], "answer": "1"}, "too_long"),
    ({"video": "v.mp4", "conversations": [{"from": "human", "value": "q"}], "answer": "1"}, "bad_record"),
    (
        {
            "id": 7,
            "image": ["0001.png", "0002.png"],
            "conversations": [{"from": "human", "value": "Which?"}, {"from": "gpt", "value": "Image-1"}],
            "answer": 1,
            "source": "x",
        },
        None,
    ),
]


@pytest.fixture(scope="module")
def data(digits_shards, tmp_path_factory):
    root = Path(digits_shards).parents[1]  # the session's digits dataset: its images and tokenizer
    rl = build_digits_rl_prompts(str(root), num_train=40, num_heldout=12)
    tmp = tmp_path_factory.mktemp("prompts")
    bad = tmp / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r, _ in BAD))
    meta = tmp / "meta_bad.json"
    meta.write_text(json.dumps({"bad": {"root": str(root / "images"), "annotation": str(bad)}}))
    return root, rl, str(meta), str(bad), tmp


def test_prompts_are_kept_checked_and_rejected_with_reasons(data):
    root, rl, bad_meta, bad, tmp = data
    out = tmp / "ok" / "rl"
    args = preprocess_args(rl.train_meta, str(root / "tokenizer"), out, "--prompts", "--max-reject-ratio", "0.2")
    proc = run("preprocess_mm_data", *args[:2], bad_meta, *args[2:])
    assert proc.returncode == 0, proc.stderr
    assert f"inputs {40 + len(BAD)}: 41 prompts, 7 rejected" in proc.stdout
    shards = read_prompt_shards(out)
    assert len(shards) == 41
    first = json.loads(open(rl.train).readline())
    rec = shards[0]
    assert rec.id == first["id"] and rec.answer == first["answer"] and rec.answer.isdigit()
    assert rec.conversations == [{"from": "human", "value": f"<image>\n{QUESTION}"}]
    assert rec.images == ((root / "images" / first["image"]).read_bytes(),)  # the PNG's bytes, as given
    assert rec.meta == {"id": first["id"], "image": first["image"]}
    multi = shards[-1]  # placeholders added, the gpt turn dropped, a number answer as text, user keys kept
    assert (
        multi.id == "7"
        and multi.answer == "1"
        and multi.meta == {"id": 7, "image": ["0001.png", "0002.png"], "source": "x"}
    )
    assert multi.conversations == [{"from": "human", "value": "<image>\n<image>\nWhich?"}]
    assert multi.images == tuple((root / "images" / f).read_bytes() for f in ("0001.png", "0002.png"))
    rejects = [json.loads(line) for line in open(f"{out}.rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(k + 1, why) for k, (_, why) in enumerate(BAD) if why]
    assert all(r["file"] == bad for r in rejects)
    manifest = json.load(open(f"{out}.manifest.json"))
    c = manifest["counts"]
    assert (c["records"], c["images"], c["inputs"], c["rejects"]) == (41, 42, 48, 7)
    assert c["image_bytes"] == sum(len(b) for r in shards for b in r.images)
    assert manifest["arguments"]["prompts"] is True and manifest["arguments"]["answer_key"] == "answer"
    assert manifest["datasets"] == [
        {"name": "digits_rl_train", "max_dynamic_patch": 1, "min_dynamic_patch": 1},
        {"name": "bad", "max_dynamic_patch": 12, "min_dynamic_patch": 1},
    ]
    # worker processes change no byte (the records travel back through the supervised pool)
    out2 = tmp / "two" / "rl"
    args2 = [*args[:2], bad_meta, *args[2:]]
    args2[args2.index(str(out))], args2[args2.index("--workers") + 1] = str(out2), "2"
    assert run("preprocess_mm_data", *args2).returncode == 0
    for ext in (".prompts.jsonl", ".prompt_images.bin", ".rejects.jsonl", ".manifest.json"):
        assert Path(f"{out2}{ext}").read_bytes() == Path(f"{out}{ext}").read_bytes(), ext


def test_over_the_reject_limit_is_one_line_and_installs_nothing(data):
    root, rl, bad_meta, _, tmp = data
    out = tmp / "over" / "rl"
    proc = run("preprocess_mm_data", *preprocess_args(bad_meta, str(root / "tokenizer"), out, "--prompts"))
    line = assert_user_error(proc, "87.50% of inputs rejected", str(out), code=1)
    assert "--max-reject-ratio" in line and not Path(f"{out}.manifest.json").exists()
    assert len(open(f"{out}.failed.rejects.jsonl").readlines()) == 7


@pytest.mark.parametrize("extra", [("--preference",), ("--truncate",), ("--tile-format", "webp")])
def test_flags_prompts_refuse_are_one_line(data, extra, capsys, tmp_path):
    """In this process (the CLI's main; the flag check is the subject, not the process start)."""
    root, rl, *_ = data
    args = preprocess_args(rl.heldout_meta, str(root / "tokenizer"), tmp_path / "x", "--prompts", *extra)
    assert CLI.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and " ".join(extra) in err[0] and "--prompts" in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written, no staging left


def test_digits_rl_prompts_are_deterministic_and_split_like_the_sft_data(data):
    """The same seed gives the same files, another seed other ones; the held-out prompts are the
    images evaluate.py scores (build_digits_dataset's held-out split), disjoint from the training
    prompts; every answer is the image's digit."""
    from sklearn.datasets import load_digits

    root, rl, _, _, tmp = data
    other = tmp / "again"
    other.mkdir()
    (other / "images").symlink_to(root / "images")  # the images do not depend on the seed
    again = build_digits_rl_prompts(str(other), num_train=40, num_heldout=12)
    first = {k: Path(getattr(again, k)).read_bytes() for k in ("train", "heldout")}
    assert first == {k: Path(getattr(rl, k)).read_bytes() for k in ("train", "heldout")}
    reseeded = build_digits_rl_prompts(str(other), seed=1, num_train=40, num_heldout=12)
    assert Path(reseeded.train).read_bytes() != first["train"]
    full = build_digits_rl_prompts(str(other))
    train = [json.loads(x) for x in open(full.train)]
    held = [json.loads(x) for x in open(full.heldout)]
    sft_held = {os.path.basename(json.loads(x)["image"]) for x in open(root / "digits_heldout.jsonl")}
    assert {r["image"] for r in held} == sft_held and not sft_held & {r["image"] for r in train}
    assert len(train) + len(held) == 1797 and (full.num_train, full.num_heldout) == (len(train), len(held))
    labels = load_digits().target
    assert all(r["answer"] == str(labels[int(r["image"][:4])]) for r in train + held)
    assert all(r["conversations"] == [{"from": "human", "value": f"<image>\n{QUESTION}"}] for r in train + held)


def test_a_given_system_prompt_is_stored_and_the_stage_renders_what_was_checked(data):
    """--prompts with --system-prompt: the record keeps it as its own system turn (a record's own one
    wins), so the RL stage's rendering (RolloutSampler.prompt, the template's default otherwise) gives
    the tokens preprocessing checked against --seq-length; without the flag nothing is added."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.data.prompts import build_prompt_record
    from internvl_mcore.data.sources import DatasetSpec, PreprocessOptions, RawRecord
    from internvl_mcore.data.template import TEMPLATES, tokenize_conversation
    from internvl_mcore.data.tokenizer import load_tokenizer
    from internvl_mcore.inference.rollout import RolloutSampler

    root, rl, *_ = data
    cfg = get_preset("debug")
    spec = DatasetSpec("digits", str(root / "images"), rl.train, max_dynamic_patch=1)
    payload = json.loads(open(rl.train).readline())
    tok = load_tokenizer(str(root / "tokenizer"))
    sampler = RolloutSampler(str(root / "tokenizer"), cfg)
    own = {**payload, "conversations": [{"from": "system", "value": "mine"}, *payload["conversations"]]}
    for system, record, first in (("", payload, ""), (None, payload, None), ("", own, "mine")):
        opts = PreprocessOptions(cfg.vision.image_size, cfg.num_image_token, system_prompt=system)
        rec = build_prompt_record(RawRecord(spec, rl.train, 1, record), tok, opts)
        turns = rec.conversations
        stored = turns[0] if turns[0]["from"] == "system" else None
        assert stored == (None if first is None else {"from": "system", "value": first})
        assert sum(t["from"] == "system" for t in turns) == (first is not None)
        checked, _ = tokenize_conversation(
            [*turns, {"from": "gpt", "value": ""}], tok, [cfg.num_image_token], system, TEMPLATES[opts.template]
        )
        checked = [int(t) for t in checked]
        rendered = sampler.prompt(rec, "x").tokens
        # the check's tokens: the rendered prompt, then the empty answer's end of turn
        assert checked[: len(rendered)] == rendered, (system, first)
        template = TEMPLATES[opts.template]
        assert checked[len(rendered) :] == tok.encode(
            template.assistant_turn.format("")[len(template.assistant_prefix) :]
        )


def test_the_stage_tiles_a_prompt_as_preprocessing_counted_it(data):
    """A wide image in a dataset whose max_dynamic_patch is 1: preprocessing counts one tile, the
    stored record says so, and the stage's sampler cuts one tile (generation's default cap would cut
    two and a thumbnail); a multi-image record's cap is divided as training divides it."""
    from PIL import Image

    from internvl_mcore.config import get_preset
    from internvl_mcore.data.prompts import build_prompt_record
    from internvl_mcore.data.sources import DatasetSpec, PreprocessOptions, RawRecord
    from internvl_mcore.data.tokenizer import load_tokenizer
    from internvl_mcore.inference.rollout import RolloutSampler

    root, _, _, _, tmp = data
    cfg = get_preset("debug")
    side = cfg.vision.image_size
    folder = tmp / "wide"
    folder.mkdir()
    Image.new("RGB", (2 * side, side), (9, 99, 199)).save(folder / "w.png")
    tok = load_tokenizer(str(root / "tokenizer"))
    sampler = RolloutSampler(str(root / "tokenizer"), cfg)
    opts = PreprocessOptions(cfg.vision.image_size, cfg.num_image_token)
    one = {"image": "w.png", "conversations": [{"from": "human", "value": "q"}], "answer": "1"}
    two = {**one, "image": ["w.png", "w.png"]}
    for record, cap, tiles in ((one, 1, 1), (one, 12, 3), (two, 6, 6)):
        spec = DatasetSpec("wide", str(folder), str(folder / "a.jsonl"), max_dynamic_patch=cap)
        rec = build_prompt_record(RawRecord(spec, spec.annotation, 1, record), tok, opts)
        assert rec.tiling == (1, cap // len(rec.images), True), rec
        assert sampler.prompt(rec, "x").tiles.shape[0] == tiles
