"""Preprocessing at scale: split across machines (--num-shards), a worker pool that survives dying workers."""

import json
import os
import sys

import pytest

from internvl_mcore.data import preprocess
from internvl_mcore.data.loader import PackedDataLoader
from internvl_mcore.data.shards import ShardReader
from tests.fixtures import make_dataset_fixture, make_tokenizer_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import inspect_shards  # noqa: E402
import preprocess_mm_data  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return make_dataset_fixture(str(root / "data")), make_tokenizer_dir(str(root / "tok")), root


def run(fx, tok, prefix, *extra) -> int:
    return preprocess_mm_data.main(
        [
            "--meta",
            fx.meta_path,
            "--tokenizer",
            tok,
            "--output-prefix",
            str(prefix),
            "--seq-length",
            str(fx.max_seq_length),
            "--image-size",
            str(fx.image_size),
            "--num-image-token",
            str(fx.num_image_token),
            "--min-num-frames",
            str(fx.min_num_frames),
            "--max-num-frames",
            str(fx.max_num_frames),
            "--no-progress",
            "--max-reject-ratio",
            "1",
            "--v2pe-random",
            "--tile-format",
            "source",
            *extra,
        ]
    )


def samples_by_source(prefix) -> dict:
    """(dataset, line) -> sorted [(tokens, position_ids, tiles)] of every sub-sample of a shard set
    (a list: a dataset with repeat_time 2 has each line twice)."""
    r = ShardReader(prefix)
    out = {}
    for i in range(len(r)):
        for s in r.encoded_samples(i):
            key = (r.datasets[s.dataset_index]["name"], s.line)
            out.setdefault(key, []).append((s.tokens.tolist(), s.position_ids.tolist(), [bytes(t) for t in s.tiles]))
    return {k: sorted(v) for k, v in out.items()}


def rejects(prefix) -> set:
    return {
        (os.path.basename(r["file"]), r["line"], r["reason"]) for r in map(json.loads, open(f"{prefix}.rejects.jsonl"))
    }


@pytest.fixture(scope="module")
def whole(data):
    fx, tok, root = data
    assert run(fx, tok, root / "whole" / "data", "--workers", "1") == 0
    return str(root / "whole" / "data")


def test_shards_cover_every_good_sample_exactly_once(data, whole, capsys):
    """3 shards: disjoint, together the unsharded run's samples (same tokens, V2PE positions, images) and
    rejects; training on the 3 prefixes together (weights by packs, as for any list of prefixes) sees
    every pack, hence every good sample, exactly once per epoch."""
    fx, tok, root = data
    prefixes = [str(root / f"part{i}" / "data") for i in range(3)]
    for i, p in enumerate(prefixes):
        assert run(fx, tok, p, "--num-shards", "3", "--shard-index", str(i), "--workers", "2") == 0
    parts = [samples_by_source(p) for p in prefixes]
    assert all(parts)  # every shard got something
    merged = {}
    for part in parts:
        for key, samples in part.items():
            merged[key] = sorted(merged.get(key, []) + samples)
    assert merged == samples_by_source(whole)  # nothing lost, nothing twice, nothing changed
    assert set().union(*(rejects(p) for p in prefixes)) == rejects(whole)
    assert sum(len(rejects(p)) for p in prefixes) == len(rejects(whole))
    # each dataset is sliced, not handed whole to one shard: 'single' has good samples in every shard
    assert all(any(k[0] == "single" for k in part) for part in parts)

    readers = [ShardReader(p) for p in prefixes]
    total = sum(len(r) for r in readers)
    draws = PackedDataLoader(prefixes, seed=3).peek_draws(total)
    assert sorted((d, p) for _, d, p in draws) == [(d, p) for d, r in enumerate(readers) for p in range(len(r))]

    capsys.readouterr()  # the preprocessing summaries
    assert inspect_shards.main(["--summary", *prefixes]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line, r, p in zip(lines, readers, prefixes):
        c = r.manifest["counts"]
        assert line.startswith(p) and f"samples {c['samples']}" in line and f"packs {c['packs']}" in line
        assert f"tiles {c['tiles']}" in line and f"rejects {c['rejects']}" in line
    assert inspect_shards.main(["--summary", prefixes[0], str(root / "nope")]) == 2


def test_dead_workers_are_retried_once_then_rejected(data, whole, monkeypatch):
    """A worker SIGKILLed on one record every time, another that os._exit()s on a record once and one that
    never finishes a record: the run finishes, the first and third records are rejected as worker_died
    with their file:line (the third after the pool's per-record deadline), the second is retried and
    kept, and every other sample is there, byte for byte."""
    from multiprocessing import forkserver

    fx, tok, root = data
    marker = root / "crashed_once"
    monkeypatch.setenv("CRASH_ONCE_MARKER", str(marker))
    monkeypatch.setattr(preprocess, "_RECORD_TIMEOUT_S", 4.0)  # a record takes milliseconds; the stall waits it twice
    monkeypatch.setattr(
        preprocess, "_WORKER_PRELOAD", (*preprocess._WORKER_PRELOAD, "tests.data.crashing_process_record")
    )
    out = root / "crash" / "data"
    forkserver._forkserver._stop()  # a fresh server preloads the crashes (private; the stdlib's tests use it)
    try:
        assert run(fx, tok, out, "--workers", "2") == 0
    finally:
        forkserver._forkserver._stop()  # no other test's workers crash
    assert marker.exists()
    got = samples_by_source(str(out))
    want = samples_by_source(whole)
    del want[("single", 2)], want[("single", 6)]
    assert got == want
    died = sorted(
        (r["location"], r["detail"])
        for r in map(json.loads, open(f"{out}.rejects.jsonl"))
        if r["reason"] == "worker_died"
    )
    assert len(died) == 2 and died[0][0].endswith("single.jsonl:2") and "SIGKILL" in died[0][1]
    assert died[1][0].endswith("single.jsonl:6") and "no result within 4 s" in died[1][1]
    assert rejects(str(out)) - rejects(whole) == {
        ("single.jsonl", 2, "worker_died"),
        ("single.jsonl", 6, "worker_died"),
    }
