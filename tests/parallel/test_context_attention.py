"""Context-parallel attention equals full attention; the load-balanced split follows megatron-core.

Multi-process part: one torchrun world per (C, comm type) runs every case of cp_attention_worker.py
(packs with sample boundaries inside chunks, across chunks and exactly on chunk borders, an empty
sample, unpacked rows, GQA, B=2, bidirectional) and compares against `PackedSDPAttention` on the
unsplit tensors."""
import json

import pytest
import torch

from internvl_mcore.parallel.context import (PackedRows, cp_chunk_starts, cp_token_indices, gather_from_cp,
                                             split_for_cp)
from tests.launch import REPO, torchrun

WORKER = REPO / "tests" / "parallel" / "cp_attention_worker.py"
TOL = 1e-5
EXPECTED_CASES = {"inside", "inside-tiled", "across", "borders", "borders-tiled", "empty-sample",
                  "unpacked-b2", "gqa-b2", "gqa-b2-tiled", "no-mask"}

WORLDS = [  # (C, comm type, hierarchical sizes)
    (2, "p2p", None),
    (2, "a2a", None),
    (4, "p2p", None),
    (4, "a2a", None),
    (4, "a2a+p2p", (2, 2)),
]


@pytest.mark.parametrize("cp,comm,hcp", WORLDS, ids=[f"cp{c}-{m}" for c, m, _ in WORLDS])
def test_cp_attention_matches_full_attention(tmp_path, cp, comm, hcp):
    args = ["--cp", str(cp), "--comm", comm, "--out", str(tmp_path)]
    if hcp:
        args += ["--hcp", *map(str, hcp)]
    torchrun(WORKER, cp, args, timeout=240)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(cp)]
    assert sorted(r["rank"] for r in reports) == list(range(cp))
    for rep in reports:
        names = {key.split("/")[0] for key in rep["cases"]}
        assert EXPECTED_CASES <= names, names
        assert len(rep["cases"]) == 2 * len(names)  # pg_collection=None and megatron's tp/cp collection
        for key, errs in rep["cases"].items():
            assert errs["ref_grad_scale"] > 1e-2, (key, errs)  # the gradients compared are not trivially 0
            for what in ("out", "dq", "dk", "dv", "gathered"):
                assert errs[what] < TOL, (rep["rank"], key, what, errs)
        assert rep["megatron_split_equal"], rep["rank"]
        if comm != "p2p":
            assert rep["refused"] and "divisible" in rep["refused"], rep.get("refused")


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_split_rule_and_inverse(cp):
    seq = 8 * cp * 2
    L = seq // (2 * cp)
    full = torch.randn(3, seq, 5)
    parts = [split_for_cp(full, 1, r, cp) for r in range(cp)]
    for r, part in enumerate(parts):
        idx = cp_token_indices(seq, r, cp)
        # the rule: global token p belongs to rank r iff its chunk p // L is r or 2C-1-r, in order
        expect = [p_ for p_ in range(seq) if p_ // L in (r, 2 * cp - 1 - r)]
        assert idx.tolist() == expect
        assert cp_chunk_starts(seq, r, cp) == [r * L, (2 * cp - 1 - r) * L]
        assert torch.equal(part, full[:, expect])
    assert torch.equal(gather_from_cp(parts, 1), full)
    assert torch.equal(gather_from_cp([split_for_cp(full, -2, r, cp) for r in range(cp)], -2), full)


def test_split_refuses_indivisible_length():
    with pytest.raises(ValueError, match="not divisible by 2 x --context-parallel-size = 4"):
        split_for_cp(torch.zeros(1, 10), 1, 0, 2)


def test_packed_rows_follow_cu_seqlens():
    cu = torch.tensor([0, 3, 3, 8, 12, 16], dtype=torch.int32)  # B=2, S=8, one empty sample
    rows = PackedRows.from_cu_seqlens(cu, 2, 8)
    assert rows.seg.tolist() == [[0, 0, 0, 2, 2, 2, 2, 2], [3, 3, 3, 3, 4, 4, 4, 4]]
    assert rows.seg_start.tolist() == [[0, 0, 0, 3, 3, 3, 3, 3], [0, 0, 0, 0, 4, 4, 4, 4]]
    assert rows.seg_end.tolist() == [[3, 3, 3, 8, 8, 8, 8, 8], [4, 4, 4, 4, 8, 8, 8, 8]]
    with pytest.raises(ValueError, match="span two rows"):
        PackedRows.from_cu_seqlens(torch.tensor([0, 5, 10, 16]), 2, 8)
    with pytest.raises(ValueError, match="GLOBAL"):
        PackedRows.from_cu_seqlens(torch.tensor([0, 4, 8]), 2, 8)
