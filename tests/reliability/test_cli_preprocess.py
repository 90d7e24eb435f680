"""tools/preprocess_mm_data.py on careless input (docs/errors.md).

Every case runs the real CLI in a subprocess: bad flags and files end with one line naming them and
exit 2; a failed, interrupted or killed re-run leaves the existing prefix byte for byte as it was.
The errors in the meta file, the annotation files, the output prefix and the tokenizer are found
before torch, megatron-core or transformers is imported (`light`: an interpreter start, ~0.4 CPU-s,
not ~2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reliability.cli_helpers import (
    assert_unchanged,
    assert_user_error,
    copy_prefix,
    error_lines,
    NO_TORCH,
    interrupt_when,
    preprocess_args,
    run,
    run_light,
    snapshot,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def own_prefix(good_prefix, tmp_path) -> str:
    """A copy of the shared good shard set (same file names) for the tests that re-run preprocessing over
    it: the set is shared by the session's reliability files (tests/reliability/conftest.py), so nothing
    may change it, not even a test that fails half-way."""
    return copy_prefix(good_prefix, tmp_path / "own", name=Path(good_prefix).name)


def light(*args: str):
    """The tool on `args`, asserting it imported no torch, megatron-core or transformers (cli_helpers.run_light)."""
    return run_light("preprocess_mm_data", *args, timeout=180, heavy=NO_TORCH)


def _meta(path: Path, annotation: str, root: str = "") -> str:
    path.write_text(json.dumps({"ds": {"root": root, "annotation": annotation}}))
    return str(path)


def test_missing_and_wrong_meta_files(digits, tmp_path):
    out = tmp_path / "o" / "x"
    cases = {  # file -> what the one line must say
        tmp_path / "none.json": "not found",
        tmp_path: "is a directory",
    }
    (tmp_path / "latin1.json").write_bytes(b'{"ds": {"annotation": "caf\xe9"}}')
    cases[tmp_path / "latin1.json"] = "not UTF-8"
    (tmp_path / "list.json").write_text("[1, 2]")
    cases[tmp_path / "list.json"] = "expected a non-empty JSON object"
    (tmp_path / "lines.json").write_text('{"a": 1}\n{"b": 2}\n')
    cases[tmp_path / "lines.json"] = "invalid JSON"
    for meta, says in cases.items():
        assert_user_error(light(*preprocess_args(str(meta), digits.tokenizer, out)), str(meta), says)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_missing_and_wrong_annotation_files(digits, tmp_path):
    out = tmp_path / "o" / "x"
    (tmp_path / "fake.parquet").write_text("not a parquet file")
    (tmp_path / "array.jsonl").write_text(json.dumps([{"conversations": []}], indent=1))
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.jsonl").write_text("\n \n")  # as repeat_time 0: a dataset that gives nothing is refused
    cases = {
        "empty.jsonl": ("empty.jsonl", "has no records"),
        "missing.jsonl": ("missing.jsonl", "not found"),
        "folder": ("folder", "is a directory"),
        "fake.parquet": ("fake.parquet", "not a readable parquet file"),
        "array.jsonl": ("array.jsonl:1", "JSON array, not JSON Lines"),
    }
    for name, needles in cases.items():
        meta = _meta(tmp_path / f"meta_{name}.json", str(tmp_path / name))
        assert_user_error(light(*preprocess_args(meta, digits.tokenizer, out)), *needles)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_output_prefix_that_is_a_folder_or_unwritable(digits, tmp_path):
    args = lambda out: preprocess_args(digits.meta, digits.tokenizer, out)  # noqa: E731
    (tmp_path / "out").mkdir()
    assert_user_error(light(*args(f"{tmp_path / 'out'}/")), "--output-prefix", "names a folder")
    assert list((tmp_path / "out").iterdir()) == []  # no hidden '_tokens.bin' files
    (tmp_path / "file").write_text("x")
    assert_user_error(light(*args(tmp_path / "file" / "x")), "--output-prefix", "is not a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    # root ignores permission bits: drop the capability that lets it (util-linux's setpriv)
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory cannot be made")
    proc = run("preprocess_mm_data", *args(ro / "x"), prefix=prefix)
    assert_user_error(proc, "--output-prefix", str(ro), "not writable")
    assert list(ro.iterdir()) == []


def test_failed_reject_ratio_leaves_the_old_prefix(digits, own_prefix, tmp_path):
    """A re-run over a good prefix whose inputs are now mostly bad: exit 1, old prefix intact, the
    rejects kept aside in OUT.failed.rejects.jsonl."""
    snap = snapshot(own_prefix)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"conversations": []}\nnot json\n\xff\xfe\n')
    meta = _meta(tmp_path / "meta.json", str(bad))
    proc = run("preprocess_mm_data", *preprocess_args(meta, digits.tokenizer, own_prefix))
    line = assert_user_error(proc, "--max-reject-ratio", own_prefix, "left as it was", code=1)
    failed = Path(own_prefix + ".failed.rejects.jsonl")
    assert str(failed) in line and "wrote" not in proc.stdout
    rejects = [json.loads(x) for x in failed.read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (1, "empty_conversation"),
        (2, "bad_json"),
        (3, "undecodable_text"),
    ]
    failed.unlink()
    assert_unchanged(own_prefix, snap)
    # the same for --preference (MMPR records, here all without a 'rejected' answer)
    mmpr = tmp_path / "mmpr.jsonl"
    mmpr.write_text("".join(json.dumps({"question": f"Q{i}", "chosen": "A"}) + "\n" for i in range(3)))
    proc = run(
        "preprocess_mm_data",
        *preprocess_args(_meta(tmp_path / "mmpr.json", str(mmpr)), digits.tokenizer, own_prefix, "--preference"),
    )
    assert_user_error(proc, "--max-reject-ratio", "left as it was", code=1)
    assert [json.loads(x)["reason"] for x in failed.read_text().splitlines()] == ["missing_response"] * 3
    failed.unlink()
    assert_unchanged(own_prefix, snap)


def test_ctrl_c_and_kill_leave_the_old_prefix(digits, own_prefix, tmp_path):
    """Ctrl-C during a re-run (2 workers): one line, exit 130, the old prefix byte for byte; a kill -9
    leaves only a hidden staging folder, which the next run removes."""
    snap = snapshot(own_prefix)
    staging = lambda: [p for p in Path(own_prefix).parent.iterdir() if ".staging-" in p.name]  # noqa: E731
    # the signal comes while pass 1 waits after its 2nd record (a fault point the tool offers)
    big = tmp_path / "big.jsonl"
    rec = {"image": "", "conversations": [{"from": "human", "value": "Say it"}, {"from": "gpt", "value": "It."}]}
    big.write_text("".join(json.dumps(rec) + "\n" for _ in range(200)))
    meta = _meta(tmp_path / "meta.json", str(big))
    args = preprocess_args(meta, digits.tokenizer, own_prefix, "--workers", "2")
    proc = interrupt_when("preprocess_mm_data", *args, fault="preprocess:2:wait")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error_lines(proc) == [f"preprocess_mm_data: interrupted (Ctrl-C); {own_prefix} left as it was"]
    assert_unchanged(own_prefix, snap)

    proc = interrupt_when("preprocess_mm_data", *args, fault="preprocess:2:wait", sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    left = staging()
    assert len(left) == 1 and left[0].name.startswith(f".{Path(own_prefix).name}.staging-")
    assert_user_error(
        light(*preprocess_args(str(tmp_path / "missing.json"), digits.tokenizer, own_prefix)), "missing.json"
    )
    assert not staging()  # the dead run's staging folder is gone
    assert_unchanged(own_prefix, snap)


def test_bad_records_are_rejected_with_file_and_line(digits, tmp_path):
    """Per-record problems (one line each in OUT.rejects.jsonl with file:line), and the images that are
    odd but valid (1x1, 20000x20, 20x20000): tiled as InternVL's dynamic_preprocess tiles them."""
    img = tmp_path / "img"
    (img / "folder.png").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {
        "ok.png": (64, 64),
        "one.png": (1, 1),
        "wide.png": (20000, 20),
        "tall.png": (20, 20000),
    }.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img / name)
    (img / "empty.png").write_bytes(b"")
    ok = (img / "ok.png").read_bytes()
    (img / "cut.png").write_bytes(ok[: len(ok) // 2])
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "That."}]
    lines = [
        json.dumps({"image": n, "conversations": turns}).encode()
        for n in ("ok.png", "folder.png", "empty.png", "cut.png", "one.png", "wide.png", "tall.png")
    ]
    lines.append(b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}')
    # paths that leave the root (relative, absolute, a symlink, a video folder) are refused
    # unread; a line longer than any record of --seq-length tokens is refused unparsed; an MMPR record
    # without --preference says so
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "outside.png")
    (img / "link.png").symlink_to(tmp_path / "outside.png")
    (tmp_path / "frames").mkdir()
    shutil.copy(tmp_path / "outside.png", tmp_path / "frames" / "0.png")
    lines += [
        json.dumps({"image": n, "conversations": turns}).encode()
        for n in ("../outside.png", str(tmp_path / "outside.png"), "/etc/shadow", "link.png")
    ]
    lines.append(json.dumps({"video": "../frames/", "conversations": turns}).encode())
    lines.append(json.dumps({"conversations": turns, "pad": "x" * 5_000_000}).encode())
    lines.append(json.dumps({"image": "ok.png", "question": "Which?", "chosen": "A.", "rejected": "B."}).encode())
    lines.append(b"[" * 30000 + b"]" * 30000)  # within the line bound, too deep for json: bad_json, no traceback
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"image": "../outside.png", "conversations": turns}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"messages": [1, 2], "images": ["x", "y"]}), tmp_path / "types.parquet")
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps(
            {
                "a": {"root": str(img), "annotation": str(tmp_path / "a.jsonl"), "max_dynamic_patch": 6},
                "p": {"root": str(img), "annotation": str(tmp_path / "types.parquet")},
                "b": {"root": str(img), "annotation": str(tmp_path / "b.jsonl"), "allow_outside_root": True},
            }
        )
    )
    out = tmp_path / "out" / "x"
    proc = run("preprocess_mm_data", *preprocess_args(str(meta), digits.tokenizer, out, "--max-reject-ratio", "1"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rejects = [json.loads(x) for x in open(f"{out}.rejects.jsonl")]
    got = {(Path(r["file"]).name, r["line"]): r["reason"] for r in rejects}
    assert "is a directory" in rejects[0]["detail"]
    assert got == {
        ("a.jsonl", 2): "missing_image",
        ("a.jsonl", 3): "corrupt_image",
        ("a.jsonl", 4): "corrupt_image",
        ("a.jsonl", 8): "undecodable_text",
        ("types.parquet", 1): "bad_record",
        ("types.parquet", 2): "bad_record",
        **{("a.jsonl", k): "outside_root" for k in range(9, 14)},
        ("a.jsonl", 14): "too_long",
        ("a.jsonl", 15): "bad_record",
        ("a.jsonl", 16): "bad_json",
    }  # b.jsonl's ../ is allowed
    detail = {r["line"]: r["detail"] for r in rejects if r["file"].endswith("a.jsonl")}
    assert "outside the dataset root" in detail[11] and "allow_outside_root" in detail[11]
    assert "not parsed" in detail[14] and "--preference" in detail[15]
    from internvl_mcore.data.shards import ShardReader

    reader = ShardReader(str(out))
    tiles = {}
    names = [d["name"] for d in reader.manifest["datasets"]]
    for i in range(len(reader)):
        p = reader.read(i, with_tiles=False)
        for (d, line), n in zip(p.source.tolist(), np.split(p.num_tiles, np.cumsum(p.images_per_sample)[:-1])):
            tiles[names[d], line] = n.tolist()
    # InternVL: 1x1 -> one tile (no thumbnail for a single tile); 1000:1 -> the widest grid (6x1) + thumbnail
    assert tiles == {("a", 1): [1], ("a", 5): [1], ("a", 6): [7], ("a", 7): [7], ("b", 1): [1]}


def test_tokenizer_that_is_a_file_or_empty(digits, tmp_path):
    out = tmp_path / "o" / "x"
    assert_user_error(
        light(*preprocess_args(digits.meta, digits.meta, out)),
        f"tokenizer directory {digits.meta!r} is a file",
    )
    (tmp_path / "empty").mkdir()
    assert_user_error(
        light(*preprocess_args(digits.meta, str(tmp_path / "empty"), out)),
        str(tmp_path / "empty"),
        "no tokenizer found",
    )
