"""Context-parallel attention equals full attention; the load-balanced split follows megatron-core.

Multi-process part: one job per CP size (tests/worldpool.py) runs every comm type and case of cp_attention_worker.py
(packs with sample boundaries inside chunks, across chunks and exactly on chunk borders, an empty
sample, unpacked rows, GQA, B=2, bidirectional) and compares against `PackedSDPAttention` on the
unsplit tensors."""

import json

import pytest
import torch

from internvl_mcore.parallel.context_parallel import (
    PackedRows,
    cp_chunk_starts,
    cp_token_indices,
    gather_from_cp,
    split_for_cp,
)
from tests.launch import REPO
from tests.worldpool import run_in_world

WORKER = REPO / "tests" / "parallel" / "cp_attention_worker.py"
TOL = 1e-5
EXPECTED_CASES = {
    "inside",
    "inside-tiled",
    "across",
    "borders",
    "borders-tiled",
    "empty-sample",
    "unpacked-b2",
    "gqa-b2",
    "gqa-b2-tiled",
    "no-mask",
}

# one job per CP size runs every comm type
WORLDS = {  # C: (comm types, megatron's hierarchical CP sizes A P for a2a+p2p)
    2: (("p2p", "a2a", "a2a+p2p"), (2, 1)),  # a2a+p2p with P = 1: the ring code without a ring
    4: (("p2p", "a2a", "a2a+p2p"), (2, 2)),
}
CASES = [(c, comm) for c, (comms, _) in WORLDS.items() for comm in comms]


@pytest.fixture(scope="module")
def cp_reports(tmp_path_factory):
    """C -> every rank's report, each world started on first use."""
    cache = {}

    def get(cp):
        if cp not in cache:
            out = tmp_path_factory.mktemp(f"cp{cp}")
            comms, hcp = WORLDS[cp]
            run_in_world(
                WORKER,
                cp,
                ["--cp", str(cp), "--comms", *comms, "--hcp", *map(str, hcp), "--out", str(out)],
                timeout=300,
            )
            cache[cp] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(cp)]
        return cache[cp]

    return get


@pytest.mark.parametrize("cp,comm", CASES, ids=[f"cp{c}-{m}" for c, m in CASES])
def test_cp_attention_matches_full_attention(cp_reports, cp, comm):
    reports = cp_reports(cp)
    assert sorted(r["rank"] for r in reports) == list(range(cp))
    for rep in reports:
        got = rep[comm]
        names = {key.split("/")[0] for key in got["cases"]}
        assert EXPECTED_CASES <= names, names
        assert len(got["cases"]) == len(names)
        assert "pg_collection" in got["no_groups"], got["no_groups"]  # no silent global fallback
        if comm == "a2a+p2p":
            assert "hierarchical" in got["no_hcp"], got["no_hcp"]
        for key, errs in got["cases"].items():
            assert errs["ref_grad_scale"] > 1e-2, (key, errs)  # the gradients compared are not trivially 0
            for what in ("out", "dq", "dk", "dv", "gathered"):
                assert errs[what] < TOL, (rep["rank"], key, what, errs)
        if comm != "p2p":
            assert got["refused"] and "divisible" in got["refused"], got.get("refused")


@pytest.mark.parametrize("cp", sorted(WORLDS))
def test_split_matches_megatron_get_batch_on_this_cp_rank(cp_reports, cp):
    assert all(rep["megatron_split_equal"] for rep in cp_reports(cp))


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


def test_whole_row_split_never_selects_te_attention():
    # TE's CP expects per-sample 'thd' splitting; split_for_cp's whole-row layout needs the local module
    from internvl_mcore.parallel.context_parallel import ContextParallelAttention, cp_core_attention

    assert cp_core_attention("local") is ContextParallelAttention
    assert cp_core_attention("te", "sbhd") is ContextParallelAttention
