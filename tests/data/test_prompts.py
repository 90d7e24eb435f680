"""Prompt shards (internvl_mcore/data/prompts.py): what is written reads back the same, and every
damaged or foreign file is one DataError naming it."""

from __future__ import annotations

import json
import os

import pytest

from internvl_mcore.data import prompts
from internvl_mcore.data.prompts import (
    PromptRecord,
    images_path,
    manifest_path,
    read_prompt_shards,
    records_path,
    write_prompt_shards,
)
from internvl_mcore.errors import DataError

RECORDS = [
    PromptRecord(
        "a",
        [{"from": "human", "value": "<image>\n<image>\nWhich? é"}],
        (b"\x89PNG1", b"JPEG22"),
        "7",
        {"k": 1},
        (1, 3, False),
    ),
    PromptRecord("b", [{"from": "system", "value": "s"}, {"from": "human", "value": "2+2?"}], (), "4", {}),
    PromptRecord("c", [{"from": "human", "value": "<image>\nq"}], (b"\x00\n\n",), "x", {"image": "c.png"}),
]


def _write(tmp_path, records=RECORDS) -> str:
    prefix = str(tmp_path / "sub" / "p")
    assert write_prompt_shards(iter(records), prefix, extra={"note": "n", "counts": {"rejects": 2}}) == len(records)
    return prefix


def test_round_trip_random_access_and_manifest(tmp_path, monkeypatch):
    prefix = _write(tmp_path)
    monkeypatch.setattr(prompts, "_SCAN_BYTES", 5)  # line ends found across many scan pieces
    shards = read_prompt_shards(prefix)
    assert len(shards) == 3
    assert [shards[i] for i in (2, 0, 1)] == [RECORDS[2], RECORDS[0], RECORDS[1]]
    assert shards[-1] == RECORDS[2] and shards[0:2] == RECORDS[:2] and list(shards) == RECORDS
    with pytest.raises(IndexError):
        shards[3]
    m = json.load(open(manifest_path(prefix)))
    assert m["counts"] == {"records": 3, "images": 3, "image_bytes": 14, "rejects": 2} and m["note"] == "n"
    assert sorted(m["files"]) == ["p.prompt_images.bin", "p.prompts.jsonl"]
    assert os.path.getsize(images_path(prefix)) == 14  # each image once
    assert shards.verify() == {}
    with open(images_path(prefix), "r+b") as f:  # same size, one byte changed: only the hash sees it
        f.seek(3)
        f.write(b"X")
    assert list(read_prompt_shards(prefix).verify()) == ["p.prompt_images.bin"]
    # an empty set is a valid set
    empty = str(tmp_path / "e")
    assert write_prompt_shards([], empty) == 0 and len(read_prompt_shards(empty)) == 0


def _damage(prefix: str, what: str) -> None:
    if what == "no manifest":
        os.remove(manifest_path(prefix))
    elif what == "packed manifest":
        json.dump({"format": "internvl-mcore-packed-v1"}, open(manifest_path(prefix), "w"))
    elif what == "truncated images":
        with open(images_path(prefix), "r+b") as f:
            f.truncate(5)
    elif what == "truncated records":
        data = open(records_path(prefix), "rb").read()
        open(records_path(prefix), "wb").write(data[:-10])
    elif what == "missing images":
        os.remove(images_path(prefix))


@pytest.mark.parametrize(
    "what,names",
    [
        ("no manifest", "p.manifest.json"),
        ("packed manifest", "p.manifest.json"),
        ("truncated images", "p.prompt_images.bin"),
        ("truncated records", "p.prompts.jsonl"),
        ("missing images", "p.prompt_images.bin"),
    ],
)
def test_damaged_sets_are_one_line_errors_naming_the_file(tmp_path, what, names):
    prefix = _write(tmp_path)
    _damage(prefix, what)
    with pytest.raises(DataError) as e:
        read_prompt_shards(prefix)
    assert names in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda r: r.update(answer=7), "answer"),
        (lambda r: r.update(images=[[0, 10**9]]), "past the end"),
        (lambda r: r.update(images=[[-1, 2]]), "images"),
        (lambda r: r.update(conversations=[{"from": "human", "value": 3}]), "conversations"),
        (lambda r: r.update(tiling=[2, 1, True]), "tiling"),
        (lambda r: r.update(tiling=[1, 6, 1]), "tiling"),
    ],
)
def test_a_tampered_record_is_refused_when_read(tmp_path, edit, field):
    prefix = _write(tmp_path)
    lines = open(records_path(prefix), encoding="utf-8").read().splitlines()
    rec = json.loads(lines[1])
    edit(rec)
    lines[1] = json.dumps(rec)
    open(records_path(prefix), "w", encoding="utf-8").write("\n".join(lines) + "\n")
    shards = read_prompt_shards(prefix)
    assert shards[0] == RECORDS[0]  # the others still read
    with pytest.raises(DataError, match=rf"p\.prompts\.jsonl:2: .*{field}"):
        shards[1]
