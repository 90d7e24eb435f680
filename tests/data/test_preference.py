"""Preference (MMPR) preprocessing: pairs, rejects, packing, data-parallel split, workers 1 = 2."""

import filecmp
import json
import os
import sys

import numpy as np
import pytest

from internvl_mcore.data.loader import PackedDataLoader, collate
from internvl_mcore.data.preference import prompt_length
from internvl_mcore.data.shards import ShardReader, shard_files
from tests.fixtures import make_tokenizer_dir, write_image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_mm_data  # noqa: E402

GOOD = 14
# line -> expected reject reason for the bad records appended after the GOOD ones
BAD = {
    GOOD + 1: "missing_response",
    GOOD + 2: "missing_response",
    GOOD + 3: "identical_pair",
    GOOD + 4: "image_count_mismatch",
    GOOD + 5: "bad_json",
    GOOD + 6: "missing_image",
}


def _lines(n_good: int) -> list:
    lines = []
    for i in range(n_good):
        kind = i % 3
        rec = {
            "question": f"What is shown in picture {i}?",
            "chosen": "a cat " * (1 + i % 4),
            "rejected": "a dog " * (1 + (i * 7) % 5),
        }
        if kind == 0:
            rec["image"] = f"img{i % 4}.png"
        elif kind == 1:
            rec.update(image=["img0.png", "img1.png"], question="<image>\n<image>\nWhich one is brighter?")
        if i == 4:
            rec["system_prompt"] = "You are careful."
        lines.append(json.dumps(rec))
    lines += [
        json.dumps({"image": "img0.png", "question": "q", "rejected": "no"}),
        json.dumps({"image": "img0.png", "question": "q", "chosen": "yes", "rejected": "  "}),
        json.dumps({"image": "img0.png", "question": "q", "chosen": "same", "rejected": "same"}),
        json.dumps({"image": "img0.png", "question": "<image>\n<image>\nq", "chosen": "a", "rejected": "b"}),
        '{"image": "img0.png", "question": ',
        json.dumps({"image": "missing.png", "question": "q", "chosen": "a", "rejected": "b"}),
    ]
    return lines


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    for k in range(4):
        write_image(str(root / f"img{k}.png"), size=(64 + 16 * k, 64), seed=k)
    ann = root / "mmpr.jsonl"
    ann.write_text("\n".join(_lines(GOOD)) + "\n")
    meta = root / "meta.json"
    meta.write_text(json.dumps({"mmpr": {"root": str(root), "annotation": str(ann), "max_dynamic_patch": 4}}))
    tok = make_tokenizer_dir(str(root / "tok"))
    outs = {}
    for workers in (1, 2):
        out = root / f"w{workers}" / "pref"
        code = preprocess_mm_data.main(
            [
                "--meta",
                str(meta),
                "--tokenizer",
                tok,
                "--output-prefix",
                str(out),
                "--seq-length",
                "1200",
                "--image-size",
                "56",
                "--num-image-token",
                "4",
                "--preference",
                "--v2pe-random",
                "--max-reject-ratio",
                "1",
                "--workers",
                str(workers),
                "--no-progress",
            ]
        )
        assert code == 0
        outs[workers] = str(out)
    return root, ann, outs


def test_workers_1_and_2_identical_bytes(pref):
    _, _, outs = pref
    files = shard_files(outs[1]) + [outs[1] + ".manifest.json", outs[1] + ".rejects.jsonl"]
    for f in files:
        other = f.replace(os.path.dirname(outs[1]), os.path.dirname(outs[2]))
        assert filecmp.cmp(f, other, shallow=False), f"{os.path.basename(f)} differs between --workers 1 and 2"


def test_bad_records_rejected_with_file_and_line(pref):
    _, ann, outs = pref
    rejects = [json.loads(x) for x in open(outs[1] + ".rejects.jsonl")]
    assert {r["line"]: r["reason"] for r in rejects} == BAD
    assert all(r["location"] == f"{ann}:{r['line']}" for r in rejects)
    manifest = json.load(open(outs[1] + ".manifest.json"))
    assert manifest["preference"] is True and manifest["counts"]["rejects"] == len(BAD)


def test_pairs_stay_together_with_shared_prompt_and_tiles_once(pref):
    _, _, outs = pref
    r = ShardReader(outs[1])
    lines, packs_with_several = [], 0
    for i in range(len(r)):
        p = r.read(i)
        n = p.seq_lengths.shape[0]
        assert n % 2 == 0
        packs_with_several += n > 2
        cu = p.cu_seqlens
        for k in range(0, n, 2):
            (dc, lc), (dr, lr) = p.source[k], p.source[k + 1]
            assert (dc, lc) == (dr, lr)  # chosen and rejected of the same record, adjacent
            lines.append(int(lc))
            assert p.images_per_sample[k + 1] == 0  # tiles stored once, with the chosen sample
            c = slice(cu[k], cu[k + 1])
            rj = slice(cu[k + 1], cu[k + 2])
            n_prompt = prompt_length(p.loss_mask[c])
            assert n_prompt == prompt_length(p.loss_mask[rj]) > 0
            assert np.array_equal(p.tokens[c][:n_prompt], p.tokens[rj][:n_prompt])
            assert np.array_equal(p.position_ids[c][:n_prompt], p.position_ids[rj][:n_prompt])  # V2PE alike
            for half in (c, rj):  # loss on the response only: one run from the prompt's end (the template's
                idx = np.flatnonzero(p.loss_mask[half])  # trailing newline after <|im_end|> carries none)
                assert idx[0] == n_prompt and (np.diff(idx) == 1).all() and len(p.loss_mask[half]) - idx[-1] <= 2
            assert not np.array_equal(p.tokens[c], p.tokens[rj])
    assert sorted(lines) == list(range(1, GOOD + 1))  # every good record once
    assert packs_with_several > 0  # packing put several pairs into one pack


def test_data_parallel_ranks_get_whole_pairs(pref):
    _, _, outs = pref
    r = ShardReader(outs[1])
    seen = []
    for rank in range(2):
        loader = PackedDataLoader([outs[1]], dp_rank=rank, dp_size=2, seed=3)
        packs = [next(loader) for _ in range(len(r) // 2)]
        d = collate(packs, 1200, pad_id=0)
        pairs, cu, targets = d["pairs"].numpy(), d["cu_seqlens"].numpy(), d["loss_weight"].numpy().reshape(-1) > 0
        tokens = d["tokens"].numpy().reshape(-1)
        assert pairs.shape[0] == sum(p.pairs for p in packs) == sum(len(p.source) for p in packs) // 2
        for c, rj in pairs:
            assert rj == c + 1 and targets[cu[c] : cu[c + 1]].any() and targets[cu[rj] : cu[rj + 1]].any()
            n = int(np.flatnonzero(targets[cu[c] : cu[c + 1]])[0])
            assert np.array_equal(tokens[cu[c] : cu[c] + n], tokens[cu[rj] : cu[rj] + n])
        # the rejected sequences get their pair's tiles again: one image per <img> block in the tokens
        assert d["images"].num_tiles == int(d["num_tiles"].sum())
        for p in packs:
            seen += [(s["dataset"], s["line"]) for s in p.source[::2]]
    assert len(seen) == len(set(seen))  # ranks read disjoint packs, no pair split between them


def test_precompute_reference_is_refused_with_a_reason(capsys):
    code = preprocess_mm_data.main(
        ["--meta", "m.json", "--tokenizer", "t", "--output-prefix", "o", "--preference", "--precompute-reference"]
    )
    assert code == 2 and "frozen copy of the policy" in capsys.readouterr().err
