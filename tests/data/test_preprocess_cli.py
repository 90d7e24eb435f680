"""tools/preprocess_mm_data.py end to end on the front end's fixture (JSONL + images + parquet)."""

import filecmp
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from internvl_mcore.data.packing import v2pe_position_ids
from internvl_mcore.data.sample import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, Reject
from internvl_mcore.data.shards import ShardReader, manifest_path, shard_files
from internvl_mcore.data.sources import build_sample, iter_records, read_meta
from tests.fixtures import make_dataset_fixture, make_tokenizer_dir
from internvl_mcore.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_mm_data  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    fx = make_dataset_fixture(str(root / "data"))
    tok = make_tokenizer_dir(str(root / "tok"))
    return fx, tok, root


def small_args(fx, tok, out, *extra, seq_length=None):
    """CLI arguments sized for the fixture (56-px tiles, 4 tokens per tile, 2-4 frames)."""
    return [
        "--meta",
        fx.meta_path,
        "--tokenizer",
        tok,
        "--output-prefix",
        str(out),
        "--seq-length",
        str(seq_length or fx.max_seq_length),
        "--image-size",
        str(fx.image_size),
        "--num-image-token",
        str(fx.num_image_token),
        "--min-num-frames",
        str(fx.min_num_frames),
        "--max-num-frames",
        str(fx.max_num_frames),
        "--no-progress",
        *extra,
    ]


def all_sources(prefix):
    r = ShardReader(prefix)
    out = []
    for i in range(len(r)):
        for d, line in r.read(i, with_tiles=False).source.tolist():
            out.append((r.datasets[d]["name"], line))
    return out


@pytest.fixture(scope="module")
def run_w1(data):
    fx, tok, root = data
    out = root / "w1" / "data"
    code = preprocess_mm_data.main(
        small_args(fx, tok, out, "--workers", "1", "--max-reject-ratio", "1", "--v2pe-random")
    )
    assert code == 0
    return str(out)


def test_identical_bytes_for_1_and_2_workers(data, run_w1):
    fx, tok, root = data
    out2 = root / "w2" / "data"
    assert (
        preprocess_mm_data.main(small_args(fx, tok, out2, "--workers", "2", "--max-reject-ratio", "1", "--v2pe-random"))
        == 0
    )
    names = [os.path.basename(p) for p in shard_files(run_w1)] + ["data.manifest.json", "data.rejects.jsonl"]
    for name in names:
        a, b = os.path.join(os.path.dirname(run_w1), name), str(root / "w2" / name)
        assert filecmp.cmp(a, b, shallow=False), name


def test_every_bad_input_rejected_with_location_and_counted(data, run_w1, capsys):
    fx, tok, root = data
    rejects = [json.loads(line) for line in open(run_w1 + ".rejects.jsonl")]
    got = {(os.path.basename(r["file"]), r["line"]): r["reason"] for r in rejects}
    file_of = {s.name: os.path.basename(s.annotation) for s in read_meta(fx.meta_path)}
    want = {(file_of[d], line): reason for (d, line), reason in fx.expected.items() if reason is not None}
    assert got == want
    for r in rejects:
        assert r["location"] == f"{r['file']}:{r['line']}" and r["detail"]
    m = json.load(open(manifest_path(run_w1)))
    assert m["counts"]["rejects_by_reason"] == dict(Counter(want.values()))
    assert m["counts"]["rejects"] == len(want)

    # The printed summary has a line per reason with its count, and the default ratio fails the run.
    out = root / "strict" / "data"
    code = preprocess_mm_data.main(small_args(fx, tok, out))
    printed = capsys.readouterr()
    assert code == 1 and "max-reject-ratio" in printed.err
    for reason, n in Counter(want.values()).items():
        assert any(line.split() == ["reject", reason, str(n)] for line in printed.out.splitlines()), reason


def test_good_samples_all_present_none_lost_to_bad_neighbours(data, run_w1):
    fx, tok, root = data
    got = Counter(all_sources(run_w1))
    want = Counter({k: 1 for k, reason in fx.expected.items() if reason is None and k[0] not in fx.repeat_datasets})
    for name, r in fx.repeat_datasets.items():
        spec = next(s for s in read_meta(fx.meta_path) if s.name == name)
        n_lines = sum(1 for _ in open(spec.annotation))
        if r >= 1:
            want.update({(name, line): int(r) for line in range(1, n_lines + 1)})
    non_half = Counter({k: v for k, v in got.items() if k[0] != "half"})
    assert non_half == want
    assert sum(v for k, v in got.items() if k[0] == "half") == int(8 * fx.repeat_datasets["half"])


def test_shards_hold_exactly_what_the_front_end_built(data, tmp_path):
    """Tokens, loss mask, tiles per image of every sample equal build_sample's; positions follow V2PE."""
    fx, tok, root = data
    out = tmp_path / "d"
    assert preprocess_mm_data.main(small_args(fx, tok, out, "--max-reject-ratio", "1", "--v2pe-delta", "0.25")) == 0
    tokenizer = load_tokenizer(tok)
    ids = [tokenizer.token_to_id(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)]
    opts = fx.options()
    built = {}
    for spec in read_meta(fx.meta_path):
        if spec.name in fx.repeat_datasets:
            continue
        for rec in iter_records(spec, 0):
            if not isinstance(rec, Reject):
                s = build_sample(rec, tokenizer, opts)
                if not isinstance(s, Reject):
                    built[(spec.name, rec.line)] = s
    r = ShardReader(str(out))
    seen = 0
    kinds = Counter()
    for i in range(len(r)):
        p = r.read(i)
        tiles = r.tiles(p)
        tok_off = img_off = tile_off = 0
        for k, (d, line) in enumerate(p.source.tolist()):
            n, m = int(p.seq_lengths[k]), int(p.images_per_sample[k])
            nt = p.num_tiles[img_off : img_off + m]
            key = (r.datasets[d]["name"], line)
            sl = slice(tok_off, tok_off + n)
            if key in built:
                b = built[key]
                np.testing.assert_array_equal(p.tokens[sl], b.tokens)
                np.testing.assert_array_equal(p.loss_mask[sl], b.loss_mask)
                assert nt.tolist() == list(b.num_tiles)
                np.testing.assert_array_equal(
                    tiles[tile_off : tile_off + int(nt.sum())], b.tiles
                )  # default webp: lossless
                np.testing.assert_array_equal(p.position_ids[sl], v2pe_position_ids(b.tokens, *ids, 0.25))
                assert r.datasets[d]["data_augment"] == b.data_augment
                kinds[fx.kinds[key]] += 1
                seen += 1
            assert p.position_ids[tok_off] == 0  # restart per sub-sample
            tok_off, img_off, tile_off = tok_off + n, img_off + m, tile_off + int(nt.sum())
    assert seen == len(built)
    assert set(kinds) == {"text", "image", "multi_image", "video"}


def test_parquet_rows_through_the_cli(data, run_w1):
    fx, tok, root = data
    parquet = Counter(line for name, line in all_sources(run_w1) if name == "parquet")
    assert parquet == Counter(
        {line: 1 for (d, line), reason in fx.expected.items() if d == "parquet" and reason is None}
    )
    r = ShardReader(run_w1)
    for i in range(len(r)):
        p = r.read(i, with_tiles=False)
        img_off = 0
        for k, (d, line) in enumerate(p.source.tolist()):
            m = int(p.images_per_sample[k])
            if r.datasets[d]["name"] == "parquet":
                assert m == fx.n_images[("parquet", line)]
            img_off += m


def test_truncate_turns_overlong_into_sample(data, tmp_path):
    fx, tok, root = data
    out = tmp_path / "t"
    assert preprocess_mm_data.main(small_args(fx, tok, out, "--max-reject-ratio", "1", "--truncate")) == 0
    reasons = [json.loads(line)["reason"] for line in open(str(out) + ".rejects.jsonl")]
    assert "too_long" not in reasons
    assert ("text", 9) in all_sources(str(out))
    r = ShardReader(str(out))
    assert max(r.pack_lengths) <= fx.max_seq_length


def test_worker_exception_costs_one_sample(data, tmp_path, monkeypatch):
    """An unexpected crash inside one sample's processing is a reject; its neighbours survive. The
    workers' fork server preloads a module that makes the sample builder raise on one record; it is
    restarted around the run, so no other test's workers see that."""
    from multiprocessing import forkserver

    from internvl_mcore.data import preprocess

    fx, tok, root = data
    monkeypatch.setattr(preprocess, "_WORKER_PRELOAD", (*preprocess._WORKER_PRELOAD, "tests.data.flaky_build_sample"))
    out = tmp_path / "x"
    forkserver._forkserver._stop()  # (private, the standard library's own tests use it)
    try:
        assert preprocess_mm_data.main(small_args(fx, tok, out, "--max-reject-ratio", "1", "--workers", "2")) == 0
    finally:
        forkserver._forkserver._stop()
    rejects = [json.loads(line) for line in open(str(out) + ".rejects.jsonl")]
    boom = [r for r in rejects if r["reason"] == "internal_error"]
    assert len(boom) == 1 and boom[0]["line"] == 2 and "boom" in boom[0]["detail"]
    got = set(all_sources(str(out)))
    assert ("single", 1) in got and ("single", 6) in got and ("single", 2) not in got


def test_bad_arguments_are_clear(data, tmp_path, capsys):
    fx, tok, root = data
    assert preprocess_mm_data.main(small_args(fx, tok, tmp_path / "o", "--v2pe-delta", "1.5")) == 2
    assert "--v2pe-delta" in capsys.readouterr().err
    code = preprocess_mm_data.main(
        ["--meta", str(tmp_path / "none.json"), "--tokenizer", tok, "--output-prefix", str(tmp_path / "o")]
    )
    assert code == 2 and "none.json" in capsys.readouterr().err
    # exclusive flags: exit 2 with one line naming them (the flags are generated, so this is checked on the config)
    assert preprocess_mm_data.main(small_args(fx, tok, tmp_path / "o", "--v2pe-delta", "0.5", "--v2pe-random")) == 2
    assert "--v2pe-random" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a required flag missing: argparse's usage error
        preprocess_mm_data.main(["--tokenizer", tok, "--output-prefix", str(tmp_path / "o")])


def test_usage_command_at_16384(data, tmp_path):
    """The preprocessing command of docs/usage.md, as a separate process, at --seq-length 16384 with 2 workers; the loader
    and collate then read the result."""
    fx, tok, root = data
    out = tmp_path / "big" / "data"
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "preprocess_mm_data.py"),
        *small_args(fx, tok, out, "--workers", "2", "--max-reject-ratio", "1", seq_length=16384),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fill" in proc.stdout and "reject" in proc.stdout
    m = json.load(open(manifest_path(str(out))))
    assert m["seq_length"] == 16384 and m["counts"]["packs"] >= 1
    assert m["tokenizer"]["sha256"] == load_tokenizer(tok).sha256
    assert m["template"] == "internvl2_5"
    assert m["counts"]["samples"] + m["counts"]["rejects"] == m["counts"]["inputs"]
    r = ShardReader(str(out))
    assert r.verify() == {}
    assert m["fill_ratio"] == pytest.approx(r.pack_lengths.sum() / (len(r) * 16384), abs=1e-6)
    # The over-long text (too long at 2048) fits at 16384.
    assert ("text", 9) in all_sources(str(out))

    from internvl_mcore.data.loader import PackedDataLoader, collate

    ld = PackedDataLoader([str(out)], seed=0)
    batch = collate([next(ld) for _ in range(2)], seq_length=16384, pad_id=0)
    assert batch["tokens"].shape == (2, 16384)
    assert batch["images"].tiles.shape[1:] == (fx.image_size, fx.image_size, 3)  # uint8, normalized on the device
    assert batch["images"].tiles.dtype == torch.uint8
    assert int(batch["num_tiles"].sum()) == batch["images"].num_tiles


def test_model_preset_sets_image_geometry(data, tmp_path):
    """--model takes image size / patch / downsample ratio from the preset: 'debug' has 56-px
    tiles of 14-px patches and ratio 0.5 -> (56/14)^2 * 0.25 = 4 tokens per tile."""
    from internvl_mcore.config.presets import get_preset

    fx, tok, root = data
    preset = get_preset("debug")
    out = tmp_path / "m"
    args = [
        "--meta",
        fx.meta_path,
        "--tokenizer",
        tok,
        "--output-prefix",
        str(out),
        "--model",
        "debug",
        "--seq-length",
        "2048",
        "--min-num-frames",
        "2",
        "--max-num-frames",
        "4",
        "--max-reject-ratio",
        "1",
        "--no-progress",
    ]
    assert preprocess_mm_data.main(args) == 0
    m = json.load(open(manifest_path(str(out))))
    side = preset.vision.image_size // preset.vision.patch_size
    assert m["num_image_token"] == int(side * side * preset.downsample_ratio**2) == preset.num_image_token
    assert m["tile_shape"] == [preset.vision.image_size, preset.vision.image_size, 3]


def test_model_directory_chooses_the_template(data, tmp_path, capsys):
    """--model DIR reads the checkpoint's config: its image geometry and its chat template (InternVL's
    config.json `template`); a template the front end does not implement is refused by name."""
    from internvl_mcore.config.presets import get_preset
    from internvl_mcore.convert import hf_config_for

    fx, tok, root = data
    hf = tmp_path / "hf"
    hf.mkdir()
    config = hf_config_for(get_preset("debug"), "internvl", torch.float32)
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m"
    args = [
        "--meta",
        fx.meta_path,
        "--tokenizer",
        tok,
        "--output-prefix",
        str(out),
        "--model",
        str(hf),
        "--seq-length",
        "2048",
        "--min-num-frames",
        "2",
        "--max-num-frames",
        "4",
        "--max-reject-ratio",
        "1",
        "--no-progress",
    ]
    assert preprocess_mm_data.main(args) == 0
    m = json.load(open(manifest_path(str(out))))
    assert m["template"] == "internvl2_5" and m["num_image_token"] == get_preset("debug").num_image_token
    (hf / "config.json").write_text(json.dumps({**config, "template": "internvl3_5_gpt_oss"}))
    assert preprocess_mm_data.main(args[:5] + [str(tmp_path / "m2")] + args[6:]) == 2
    assert "'internvl3_5_gpt_oss'" in capsys.readouterr().err
