"""TE's 'thd' context-parallel split (parallel/context_parallel_thd.py): the rule, and CP2 training exactness on
CPU through the reference attention (the GPU swaps in TE's kernel only)."""

import json

import pytest
import torch

from internvl_mcore.config.problems import thd_problems
from internvl_mcore.parallel.context_parallel_thd import ThdSplit, apply_rope, thd_padded_index
from tests.launch import REPO
from tests.worldpool import run_in_world

WORKER = REPO / "tests" / "gpu_path" / "thd_worker.py"


def test_thd_split_rule_pads_each_sample_to_2c_and_keeps_chunks_r_and_2c_1_r():
    # two rows of 10 tokens: samples of 5, 5 | 3, 7 (global batch-major boundaries)
    cu = torch.tensor([0, 5, 10, 13, 20], dtype=torch.int32)
    splits = [ThdSplit.build(cu, 2, 10, r, 2) for r in range(2)]
    assert splits[0].cu_seqlens_padded.tolist() == [0, 8, 16, 20, 28] and splits[0].max_seqlen == 8
    # padded sample of 8 -> chunks of 2: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
    assert thd_padded_index(splits[0].cu_seqlens_padded.long(), 0, 2)[:4].tolist() == [0, 1, 6, 7]
    assert splits[0].source.tolist() == [0, 1, -1, -1, 5, 6, -1, -1, 10, -1, 13, 14, 19, -1]
    assert splits[1].source.tolist() == [2, 3, 4, -1, 7, 8, 9, -1, 11, 12, 15, 16, 17, 18]
    # every real token exactly once over the ranks
    got = sorted(i for s in splits for i in s.source.tolist() if i >= 0)
    assert got == list(range(20))
    x = torch.arange(20.0).view(2, 10)
    assert splits[1].split(x, 1).tolist() == [[2, 3, 4, 0, 7, 8, 9, 0, 11, 12, 15, 16, 17, 18]]
    emb = torch.arange(40.0).view(2, 10, 2).transpose(0, 1)  # (S, B, H): token i holds [2i, 2i+1]
    local = splits[1].split(emb, 0)  # (T, 1, H)
    assert local.shape == (14, 1, 2) and local[3].tolist() == [[0.0, 0.0]] and local[4].tolist() == [[14.0, 15.0]]
    params = splits[0].packed_seq_params(torch.device("cpu"))
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == cu.tolist()


def test_thd_rope_is_megatrons_rotate_half():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    t, f = torch.randn(6, 3, 8), torch.randn(6, 1, 8) * 3
    torch.testing.assert_close(apply_rope(t, f), _apply_rotary_pos_emb_bshd(t[:, None], f[:, None])[:, 0])


def test_thd_refuses_layouts_it_cannot_carry():
    assert not thd_problems(1, False, "p2p")
    msgs = thd_problems(2, True, "a2a")
    assert len(msgs) == 3 and all("--cp-split" in m for m in msgs)


@pytest.mark.parametrize(
    "backend,pp,sp,comm,cause",
    [
        ("local", 1, False, "p2p", "no transformer-engine layer specs"),
        ("te", 2, False, "p2p", "--pipeline-model-parallel-size 2 > 1"),
        ("te", 1, True, "p2p", "--sequence-parallel"),
        ("te", 1, False, "a2a", "--cp-comm-type a2a"),
    ],
)
def test_cp_split_auto_says_which_path_runs_and_why(backend, pp, sp, comm, cause):
    """--cp-split auto's fallback to our ring / all-to-all is named with its cause in the start-up line."""
    from internvl_mcore.parallel.context_parallel import cp_path_line, cp_split_choice

    split, why = cp_split_choice("auto", backend, pp, sp, comm)
    line = cp_path_line(split, why, backend, comm)
    assert split == "row" and cause in line and "fell back from TE's 'thd' path" in line, line
    assert ("fp32 ring" if comm == "p2p" else "all-to-all") in line, line
    split, why = cp_split_choice("auto", "te", 1, False, "p2p")
    assert split == "thd" and "TE's attention" in cp_path_line(split, why, "te", "p2p")
    assert cp_split_choice("row", "te") == ("row", "--cp-split row given")


@pytest.fixture(scope="module")
def thd_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("thd")
    run_in_world(WORKER, 1, ["--cp", "1", "--out", str(out)], timeout=240)
    run_in_world(WORKER, 2, ["--cp", "2", "--out", str(out)], timeout=240)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_cp2_thd_split_on_device_cpu_matches_single_process(thd_reports):
    """Loss and every gradient of a CP2 'thd' step (odd sample lengths, 2 rows per microbatch,
    fractional V2PE positions) equal the single-process step."""
    for r in thd_reports:
        assert r["params_checked"] > 0 and r["grad_scale"] > 1e-3
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
        assert r["max_rel_grad_err"] < 1e-5, r
        assert r["thd_builds"] == r["microbatches"] == 2, r  # the split is built once per microbatch
