"""bench/checkpoint.py without running the bench: its commands' flags are the scripts' own (a renamed
flag fails here, not an hour into a bench run), and the save stall is computed from line stamps and
step times as docs/checkpoints.md says. No timings are asserted."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench_module():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_checkpoint", REPO / "bench" / "checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_commands_pass_the_scripts_parsers(tmp_path: Path, capsys) -> None:
    bench = _bench_module()  # in this process: the scripts' parsers are imported once, for both checks
    assert bench.main(["--sizes", "debug,1b,2b", "--dry-run", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for size in ("debug", "1b", "2b"):
        m = re.search(rf"\[{size}\] flags of (\d+) commands accepted by their scripts", out)
        assert m and int(m.group(1)) >= 9, out
    assert "--model internvl3-2b" in out and "--seq-length 704" in out
    # the 2b shape trains in bf16 with recomputation (its fp32 run does not fit a shared 24 GiB machine)
    trains = {
        size: [line for line in out.splitlines() if line.startswith(f"[{size}] save:")] for size in ("debug", "2b")
    }
    assert "--bf16 --recompute-granularity full" in trains["2b"][0] and "--bf16" not in trains["debug"][0], trains
    # 2b's checkpoint is saved with no training step (bench/_save_only.py, pretrain_internvl.py's flags:
    # a 2b step takes > 20 min on a shared 2-core machine); debug's by a 6-step training run
    assert "bench/_save_only.py --model internvl3-2b" in trains["2b"][0], trains
    assert "pretrain_internvl.py" in trains["debug"][0] and "--train-iters 6" in trains["debug"][0], trains
    # and is exported in the dtype the run stored (bf16): the export's default, so no --dtype is passed
    exports = [line for line in out.splitlines() if line.startswith("[2b] export_")]
    assert len(exports) == 2 and not any("--dtype" in line for line in exports), exports
    # the check is real: a flag no script knows is reported
    problems = bench.check_flags(
        {
            "bad": bench.Cmd("pretrain_internvl.py", ["--mock-data", "--no-such-flag"], 4),
            "good": bench.commands("debug", tmp_path, False, ["transformers"])["export_transformers"],
        }
    )
    assert len(problems) == 1 and problems[0].startswith("bad:"), problems


def test_save_stall_from_line_stamps_and_step_times(tmp_path: Path) -> None:
    bench = _bench_module()
    stamps = {1: 10.0, 2: 12.0, 3: 20.0, 4: 23.0, 5: 30.0, 6: 33.0}
    child = bench.Child([], 0, 33.0, 0, 0, [(t, f"iteration {k:6d}/6 | loss 1.0") for k, t in stamps.items()])
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text("".join(json.dumps({"iteration": k, "step_time_s": 1.4 + k / 10}) + "\n" for k in stamps))
    stalls = bench.save_stalls(child, jsonl)
    # each step j from the save to the next one: gap to j+1 less step j+1, less the same after
    # iteration 1 (12 - 10 - 1.6 = 0.4)
    assert stalls.keys() == {2, 4}
    assert abs(stalls[2] - ((20 - 12 - 1.7 - 0.4) + (23 - 20 - 1.8 - 0.4))) < 1e-9
    assert abs(stalls[4] - ((30 - 23 - 1.9 - 0.4) + (33 - 30 - 2.0 - 0.4))) < 1e-9
