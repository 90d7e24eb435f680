"""Stage splits from per-piece cost (plan/stages.py, plan/layouts.py: propose_split) and the
InternVL3-78B on 64 GPUs example of docs/planner.md."""

import importlib.util
import re
import types

import pytest

from internvl_mcore.config import get_preset
from internvl_mcore.config.model import ParallelConfig
from internvl_mcore.config.problems import virtual_pipeline_problems
from internvl_mcore.plan import HARDWARE, Layout, Workload, plan
from internvl_mcore.plan.layouts import propose_split
from internvl_mcore.plan.params import decoder_layers_per_stage
from internvl_mcore.plan.stages import (
    PieceCosts,
    balanced_chunks,
    even_chunks,
    interleaved_in_flight,
    layout_string,
    piece_costs,
    pipeline_bubble,
    rank_splits,
    split_options,
)
from tests.launch import REPO

spec = importlib.util.spec_from_file_location("plan_cli", REPO / "tools" / "plan.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


@pytest.mark.parametrize("layers,pp,v", [(80, 4, 1), (80, 4, 2), (64, 2, 2), (28, 3, 1), (24, 4, 3)])
def test_every_split_is_one_megatron_core_builds(layers, pp, v):
    """Each split's flags give its counts by megatron-core's rule and pass pretrain's VPP checks;
    no two spellings of one split."""
    splits = split_options(layers, pp, v)
    assert splits and len({s.counts for s in splits}) == len(splits)
    for s in splits:
        par = ParallelConfig(
            pipeline_model_parallel_size=pp,
            decoder_first_pipeline_num_layers=s.first,
            decoder_last_pipeline_num_layers=s.last,
            num_virtual_stages_per_pipeline_rank=v if v > 1 else None,
        )
        assert decoder_layers_per_stage(layers, par) == list(s.counts)
        assert virtual_pipeline_problems(layers, par) == []
        assert min(s.counts) >= v and sum(s.counts) == layers
    if pp == 2:  # one flag says it all
        assert all(s.last is None for s in splits)


def test_in_flight_replays_megatron_cores_schedule():
    """The warm-up count and the chunk order are megatron-core's (schedules.py); 1F1B holds PP - rank."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    for pp, v, m in ((2, 2, 8), (4, 2, 8), (4, 3, 12), (2, 2, 3)):
        table = get_schedule_table(m, v, pp)
        for rank in range(pp):
            group = types.SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r)
            comm = types.SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=v)
            _, _, warmup, _ = get_pp_rank_microbatches(m, v, pp, p2p_communicator=comm)
            held, peak = [0] * v, set()  # the same replay from megatron-core's own table and count
            for k in range(warmup):
                held[table[k][1]] += 1
                peak.add(tuple(held))
            for k in range(m * v - warmup):
                held[table[warmup + k][1]] += 1
                peak.add(tuple(held))
                held[v - 1 - table[k][1]] -= 1
            assert interleaved_in_flight(pp, v, m, rank) == tuple(sorted(peak))
    assert [max(interleaved_in_flight(4, 1, 8, r))[0] for r in range(4)] == [4, 3, 2, 1]
    # InternVL at PP4 V2: stage 0's first chunk (the ViT's) holds 8 microbatches, 1F1B's stage 0 holds 4
    assert max(held[0] for held in interleaved_in_flight(4, 2, 32, 0)) == 8


def test_split_follows_the_vision_cost():
    """More tiles per pack: fewer decoder layers on stage 0; text only: the output layer makes the
    last stage the short one. The proposal's slowest stage is faster than the even split's."""
    model, hw = get_preset("internvl3-78b"), HARDWARE["a100-80gb"]
    lay = Layout(8, 4, 1, 2, True, True, True)
    firsts = []
    for tiles in (0, 16, 32, 48):
        w = Workload(tiles_per_sequence=tiles)
        p = propose_split(model, lay, w, hw, budget_gib=1000, virtual_stages=(1,))
        counts = [s.decoder_layers for s in p.stages]
        firsts.append(counts[0])
        times = p.breakdown["stage_times_s"]
        even = plan(model, lay, w, hw, budget_gib=1000).breakdown["stage_times_s"]
        assert max(times) < max(even) if tiles else max(times) <= max(even)
        if tiles == 0:
            assert counts[-1] <= counts[0]
    assert firsts == sorted(firsts, reverse=True) and firsts[0] > firsts[-1]
    c = piece_costs(model, lay, Workload(), hw, 0.7)
    assert c.vision > 10 * c.layer > 0 and c.output > 0 and c.send > 0


def test_78b_on_64_gpus_example_in_the_docs(capsys):
    """docs/planner.md's example lines are what tools/plan.py prints, and what they say holds."""
    assert cli.main(["--model", "internvl3-78b", "--gpus", "64", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    doc = (REPO / "docs" / "planner.md").read_text()
    section = doc[doc.index("## Stage splits from per-piece cost") :]
    block = section[section.index("```text\n") + 8 : section.index("```\n", section.index("```text\n") + 8)]
    lines = set(out.splitlines())
    for line in block.splitlines():
        assert line in lines, f"docs/planner.md's line is not printed any more:\n{line}\n--- output:\n{out}"
    flags = re.search(r"#1's stage split: (.*)", out).group(1)
    assert "--decoder-first-pipeline-num-layers" in flags
    times = [float(t) for t in re.findall(r"stage \d \(\d+ layers\) ([\d.]+) s", out)]
    assert len(times) == 4 and max(times) / min(times) <= 1.05
    bubble = float(re.search(r"predicted bubble ([\d.]+)%", out).group(1))
    assert bubble > 100 * 3 / (32 + 3)  # stage 0 is lighter: it idles beyond the equal-stage bubble
    assert f"equal chunks: {100 * 3 / (32 + 3):.1f}%" in out


@pytest.mark.parametrize("pp,v,m", [(2, 1, 4), (2, 2, 8), (4, 1, 8), (4, 2, 8), (2, 4, 4)])
def test_bubble_replays_the_schedule_on_the_chunk_times(pp, v, m):
    """Equal chunks: the replayed schedule's bubble is (PP-1)/(V m + PP-1) exactly; a heavier first
    chunk (the ViT) or last (the output layer) makes it larger; plan() reports the replay."""
    equal = PieceCosts(vision=0.0, layer=1.0, output=0.0, send=0.0)
    chunks = equal.chunk_times(even_chunks([2 * v] * pp, v))
    assert pipeline_bubble(chunks, m) == pytest.approx((pp - 1) / (v * m + pp - 1), rel=1e-12)
    for heavy in (PieceCosts(3.0, 1.0, 0.0, 0.0), PieceCosts(0.0, 1.0, 3.0, 0.0)):
        assert pipeline_bubble(heavy.chunk_times(even_chunks([2 * v] * pp, v)), m) > (pp - 1) / (v * m + pp - 1)
    model = get_preset("debug-m")
    w = Workload(512, m, 1, tiles_per_sequence=2, sample_length=256, bf16=False)
    p = plan(model, Layout(1, pp, 1, 1, False, False, False, virtual_stages=v), w, HARDWARE["h100"])
    assert p.breakdown["bubble"] == pipeline_bubble(p.breakdown["chunk_times_s"], m)
    assert p.breakdown["bubble"] > (pp - 1) / (v * m + pp - 1)  # debug-m's ViT and output layer weigh


def test_balanced_layout_evens_the_chunks_of_debug_m():
    """The proposed per-chunk placement (megatron-core's layout string) of debug-m at PP2 V2: no
    chunk slower than the even split's slowest, the layers all placed, and its replayed bubble below
    V = 1's best first/last split at 2, 4 and 8 microbatches (bench/pipeline.py's goal)."""
    model, hw = get_preset("debug-m"), HARDWARE["h100"]
    w = Workload(512, 8, 1, tiles_per_sequence=2, sample_length=256, bf16=False)
    costs = piece_costs(model, Layout(1, 2, 1, 1, False, False, False, virtual_stages=2), w, hw, 0.7)
    chunks = balanced_chunks(costs, model.llm.num_layers, 2, 2)
    assert sum(map(sum, chunks)) == model.llm.num_layers
    layout = layout_string(chunks)
    assert layout.startswith("E") and layout.endswith("L") and layout.count("|") == 3
    for r in range(2):
        assert [layout.split("|")[c * 2 + r].count("t") for c in range(2)] == chunks[r]
    assert max(map(max, costs.chunk_times(chunks))) <= max(map(max, costs.chunk_times(even_chunks([4, 4], 2))))
    one = costs.chunk_times([[n] for n in rank_splits(costs, model.llm.num_layers, 2, 8)[0][1].counts])
    for m in (2, 4, 8):
        assert pipeline_bubble(costs.chunk_times(chunks), m) < pipeline_bubble(one, m), m


def test_cli_plans_a_pipeline_layout_and_proposes_one(capsys):
    """tools/plan.py with --pipeline-model-parallel-layout: the chunks per rank and layers from the
    string, its chunk times and replayed bubble; under the even VPP2 split the evener placement is
    proposed as the flag; a layout of the wrong layer count is refused in one line naming the flag."""
    base = ["--model", "debug-m", "--gpus", "2", "--pipeline-model-parallel-size", "2", "--seq-length", "512"]
    base += ["--global-batch-size", "8", "--tiles-per-sequence", "2", "--sample-length", "256", "--fp32"]
    assert cli.main([*base, "--pipeline-model-parallel-layout", "Et|tttt|ttt|L"]) == 0
    out = capsys.readouterr().out
    assert "layout TP1 PP2 CP1 DP1 VPP2 (layout Et|tttt|ttt|L)" in out, out
    assert "stage split: --pipeline-model-parallel-layout Et|tttt|ttt|L" in out
    assert "stage 0 (4 layers)" in out and re.search(r"chunk times: [\d.e+-]+\+[\d.e+-]+ / [\d.e+-]+\+[\d.e+-]+ s", out)
    laid = float(re.search(r"predicted bubble ([\d.]+)%", out).group(1))
    assert cli.main([*base, "--num-virtual-stages-per-pipeline-rank", "2"]) == 0
    out = capsys.readouterr().out
    even = float(re.search(r"predicted bubble ([\d.]+)%", out).group(1))
    assert "evener per-chunk placement: --pipeline-model-parallel-layout Et|tttt|ttt|L: chunk times" in out, out
    assert f"predicted bubble {laid}% (its memory is not planned)" in out and laid < even
    assert cli.main([*base, "--pipeline-model-parallel-layout", "Et|tttt|tt|L"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pipeline-model-parallel-layout" in err[0] and "8" in err[0], err
