"""tools/inspect_shards.py: --json agrees with the shards; the text view shows what it promises."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from internvl_mcore.data.shards import ShardReader
from tests.fixtures import make_dataset_fixture, make_tokenizer_dir
from internvl_mcore.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import inspect_shards  # noqa: E402
import preprocess_mm_data  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("insp")
    fx = make_dataset_fixture(str(root / "data"))
    tok = make_tokenizer_dir(str(root / "tok"))
    out = str(root / "out" / "data")
    args = [
        "--meta",
        fx.meta_path,
        "--tokenizer",
        tok,
        "--output-prefix",
        out,
        "--seq-length",
        "1024",
        "--image-size",
        str(fx.image_size),
        "--num-image-token",
        str(fx.num_image_token),
        "--min-num-frames",
        "2",
        "--max-num-frames",
        "4",
        "--max-reject-ratio",
        "1",
        "--v2pe-delta",
        "0.5",
        "--no-progress",
    ]
    assert preprocess_mm_data.main(args) == 0
    return out, tok, fx


def run_json(prefix, i, capsys):
    assert inspect_shards.main([prefix, "--sample", str(i), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one object, one line
    return json.loads(out)


def test_json_matches_shards(shards, capsys):
    prefix, tok, fx = shards
    r = ShardReader(prefix)
    for i in range(len(r)):
        j = run_json(prefix, i, capsys)
        p = r.read(i)
        assert j["tokens"] == p.tokens.tolist()
        assert j["loss_mask"] == p.loss_mask.tolist() and set(j["loss_mask"]) <= {0, 1}
        assert np.array_equal(np.array(j["position_ids"], dtype=np.float32), p.position_ids)
        assert j["cu_seqlens"][0] == 0 and j["cu_seqlens"][-1] == len(j["tokens"])
        assert j["cu_seqlens"] == p.cu_seqlens.tolist()
        assert j["num_tiles"] == p.num_tiles.tolist()
        assert len(j["num_tiles"]) == j["tokens"].count(r.manifest["tokenizer"]["img_start_id"])
        assert len(j["source"]) == len(j["cu_seqlens"]) - 1
        for (d, line), s in zip(p.source.tolist(), j["source"]):
            assert s["dataset"] == r.datasets[d]["name"] and s["line"] == line
            assert s["dataset"] in fx.repeat_datasets or fx.expected[(s["dataset"], line)] is None
        # positions restart at 0 at every boundary
        assert all(j["position_ids"][c] == 0 for c in j["cu_seqlens"][:-1])


def loss_spans(mask):
    return sum(1 for k, v in enumerate(mask) if v and (k == 0 or not mask[k - 1]))


def test_text_view(shards, capsys):
    prefix, tok, fx = shards
    tokenizer = load_tokenizer(tok)
    r = ShardReader(prefix)
    deltas = set()
    for i in range(len(r)):
        assert inspect_shards.main([prefix, "--sample", str(i)]) == 0
        text = capsys.readouterr().out
        deltas |= set(re.findall(r"δ=([0-9.]+)", text))
        j = run_json(prefix, i, capsys)
        # every image collapsed, with its tile count, in order; no raw placeholder tokens left
        assert [int(n) for n in re.findall(r"<img>×(\d+) tiles", text)] == j["num_tiles"]
        assert "<IMG_CONTEXT>" not in text
        # loss spans marked; loss spans never cross sub-samples here (each ends with <|im_end|>)
        body = text.split("carry loss\n", 1)[1]  # after the legend line
        assert body.count("[[") == body.count("]]") == loss_spans(j["loss_mask"])
        for s in j["source"]:
            assert f"dataset {s['dataset']!r}" in text and f":{s['line']}," in text
        # the marked text is the decoded answer text
        first = re.search(r"\[\[(.*?)\]\]", body, re.S)
        if first:
            k = j["loss_mask"].index(1)
            e = k
            while e < len(j["loss_mask"]) and j["loss_mask"][e]:
                e += 1
            assert first.group(1) == tokenizer.decode(j["tokens"][k:e])
    # V2PE step shown per image: --v2pe-delta 0.5 everywhere
    assert deltas == {"0.5"}


def test_errors(shards, tmp_path, capsys):
    prefix, _, _ = shards
    assert inspect_shards.main([prefix, "--sample", "9999"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert inspect_shards.main([str(tmp_path / "missing")]) == 2
    assert "manifest" in capsys.readouterr().err
    assert inspect_shards.main([prefix, "--verify"]) == 0


def test_runs_as_a_script(shards):
    prefix, _, _ = shards
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "inspect_shards.py"), prefix, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) >= {"tokens", "loss_mask", "position_ids", "cu_seqlens", "num_tiles", "source"}
