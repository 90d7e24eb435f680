"""tools/plan.py: the ranked search and the per-stage table."""

import importlib.util
import re

from internvl_mcore.config import get_preset
from internvl_mcore.plan import HARDWARE, Layout, Workload, plan
from tests.launch import REPO

spec = importlib.util.spec_from_file_location("plan_cli", REPO / "tools" / "plan.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def test_78b_on_32_gpus_lists_fitting_layouts_fastest_first(capsys):
    assert cli.main(["--model", "internvl3-78b", "--gpus", "32", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*\d+\s+(TP\d+ PP\d+ CP\d+ DP\d+.*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%", out, re.M)
    assert rows, out
    peaks = [float(r[1]) for r in rows]
    times = [float(r[2]) for r in rows]
    assert times == sorted(times)
    assert all(p <= 80 - 6 for p in peaks)
    for layout, *_ in rows:
        tp, pp, cp, dp = map(int, re.match(r"TP(\d+) PP(\d+) CP(\d+) DP(\d+)", layout).groups())
        assert tp * pp * cp * dp == 32


def test_explicit_layout_prints_every_stage(capsys):
    code = cli.main(
        [
            "--model",
            "internvl3-38b",
            "--gpus",
            "16",
            "--gpu-memory",
            "80",
            "--seq-length",
            "16384",
            "--tensor-model-parallel-size",
            "8",
            "--pipeline-model-parallel-size",
            "2",
            "--use-distributed-optimizer",
            "--recompute-granularity",
            "full",
            "--decoder-first-pipeline-num-layers",
            "24",
        ]
    )
    out = capsys.readouterr().out
    stage_rows = re.findall(r"^\s+(\d)\s+(\d+)\s+[\d.]+", out, re.M)
    assert [int(s) for s, _ in stage_rows] == [0, 1]
    assert [int(n) for _, n in stage_rows] == [24, 40]
    assert "estimated step time" in out and "MFU" in out
    assert code == (0 if "DOES NOT FIT" not in out else 1)


def test_bad_layout_is_refused_with_the_reason(capsys):
    assert cli.main(["--model", "internvl3-8b", "--gpus", "6", "--tensor-model-parallel-size", "3"]) == 2
    assert "--tensor-model-parallel-size 3" in capsys.readouterr().err


def test_memory_savers_save_memory():
    """Each switch the search may use lowers the largest rank's memory (and costs time or nothing)."""
    model, work, hw = get_preset("internvl3-14b"), Workload(seq_length=8192), HARDWARE["h100"]
    base = plan(model, Layout(4, 2, 1, 2, False, False, False), work, hw)
    for change in (dict(sequence_parallel=True), dict(distributed_optimizer=True), dict(recompute=True)):
        other = plan(model, Layout(**{**base.layout.__dict__, **change}), work, hw)
        assert other.peak_gib < base.peak_gib, change
    slower = plan(model, Layout(4, 2, 1, 2, False, False, True), work, hw)
    assert slower.step_time_s > base.step_time_s


def test_stage_presets_shrink_state():
    model, work, hw = get_preset("internvl3-8b"), Workload(seq_length=8192), HARDWARE["a100-80gb"]
    lay = Layout(2, 1, 1, 4, True, True, False)
    full = plan(model, lay, work, hw)
    frozen_vit = plan(model, lay, Workload(seq_length=8192, trainable=frozenset({"projector", "llm"})), hw)
    lora = plan(model, lay, Workload(seq_length=8192, trainable=frozenset({"projector", "lora"}), lora_rank=16), hw)
    assert lora.peak_gib < frozen_vit.peak_gib < full.peak_gib
    assert lora.stages[0].state.optimizer < 0.05 * full.stages[0].state.optimizer


def test_moe_30b_a3b_on_16_gpus_uses_expert_parallelism(capsys):
    """The MoE planning command of docs/moe.md: layouts with EP appear, MFU counts active parameters (3.7B of 30.8B)."""
    assert cli.main(["--model", "internvl3.5-30b-a3b", "--gpus", "16"]) == 0
    out = capsys.readouterr().out
    assert "30.85B parameters" in out and "3.67B parameters active per token" in out
    rows = re.findall(r"^\s*\d+\s+(TP\d+ PP\d+ CP\d+ DP\d+(?: EP\d+)?)", out, re.M)
    eps = [int(m.group(1)) for r in rows for m in [re.search(r"EP(\d+)", r)] if m]
    assert eps and all(128 % ep == 0 for ep in eps), out
    for layout in rows:
        tp, pp, cp, dp = map(int, re.match(r"TP(\d+) PP(\d+) CP(\d+) DP(\d+)", layout).groups())
        ep = int(re.search(r"EP(\d+)", layout).group(1)) if "EP" in layout else 1
        assert tp * pp * cp * dp == 16 and (dp * cp) % ep == 0


def test_moe_explicit_layout_shards_experts(capsys):
    """EP4 holds a quarter of the experts: less parameter memory than EP1 on the same layout."""
    base = [
        "--model",
        "internvl3.5-30b-a3b",
        "--gpus",
        "16",
        "--tensor-model-parallel-size",
        "2",
        "--pipeline-model-parallel-size",
        "2",
        "--use-distributed-optimizer",
        "--recompute-granularity",
        "full",
    ]
    cli.main(base + ["--expert-model-parallel-size", "4"])
    ep4 = capsys.readouterr().out
    cli.main(base)
    ep1 = capsys.readouterr().out
    params = [float(re.search(r"^\s+0\s+\d+\s+([\d.]+)", o, re.M).group(1)) for o in (ep4, ep1)]
    assert "EP4" in ep4 and params[0] < params[1] / 2


def test_what_pretrain_refuses_is_refused_with_its_line(capsys):
    """tools/plan.py runs config/problems.py's checks on the run config its flags make: a layout
    pretrain_internvl.py refuses is refused with pretrain's line (exit 2) before anything is printed;
    in search mode the flags every layout shares are checked (an EP on a dense model used to be ignored)."""
    import pretrain_internvl
    from internvl_mcore.cli_errors import one_line
    from internvl_mcore.config.problems import problems, refusal

    for flags, gpus in (
        (["--sequence-parallel", "--context-parallel-size", "2", "--seq-length", "90"], "2"),
        (["--expert-model-parallel-size", "2"], "4"),
    ):
        flags = ["--model", "debug", "--global-batch-size", "8", *flags]
        found = problems(pretrain_internvl.parse_run_config(["--mock-data", *flags]))
        assert found, flags
        assert cli.main([*flags, "--gpus", gpus]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err == f"plan: error: {one_line(Exception(refusal(found)))}\n", flags
    assert len(found) == 1 and "need an MoE model" in found[0]
