"""The online-RL digits demo at a tiny budget: `examples/digits/run_rl.py --quick`'s phases (SFT,
evaluate, GSPO, evaluate, the time-matched SFT control, evaluate) with the training runs as jobs of the
session's reused 2-rank world and the tools in this process. Every phase must have run and left its
checkpoint / log, and summary.json must have every field; a few steps say nothing about accuracy, so
none is asserted."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

from tests.conftest import pretrain
from tests.launch import REPO

PHASES = ["data", "preprocess", "sft", "eval_sft", "gspo", "eval_gspo", "control", "eval_control"]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_test_rl_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_rl_demo_runs_every_phase(tmp_path) -> None:
    demo = _module(REPO / "examples" / "digits" / "run_rl.py")

    class PoolRunner(demo.Runner):
        def tool(self, script: str, args: list[str], log: str) -> None:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = _module(REPO / "tools" / script).main(args)
            Path(log).write_text(out.getvalue())
            assert code == 0, out.getvalue()[-4000:]

        def train(self, args: list[str], log: str) -> None:
            Path(log).write_text(pretrain(2, args))

    out = tmp_path / "rl"
    assert demo.main(["--quick", "--out", str(out)], run=PoolRunner()) == 0
    s = json.loads((out / "summary.json").read_text())
    assert list(s["phases"]) == PHASES
    assert all(p["seconds"] > 0 and p["cpu_seconds"] >= 0 for p in s["phases"].values()), s["phases"]
    args = s["args"]
    for name in ("sft", "gspo", "control"):
        assert s[f"heldout_{name}"]["questions"] == args["heldout_limit"], s
        assert 0 <= s[f"heldout_{name}"]["accuracy"] <= 1
        assert (out / f"hf_{name}" / "config.json").exists()
    iters = {"sft": args["sft_iters"], "gspo": args["gspo_iters"], "control": s["control_iters"]}
    for name, n in iters.items():
        assert (out / name / "latest_checkpointed_iteration.txt").read_text().strip() == str(n)
        assert len((out / "logs" / f"{name}.jsonl").read_text().splitlines()) == n
    # GSPO and the control both started from the SFT checkpoint
    for name in ("gspo", "control"):
        assert f"loaded weights from training checkpoint {out / 'sft'}" in (out / "logs" / f"{name}.log").read_text()
    assert isinstance(s["gspo_within_10_minutes"], bool)
    assert [r["iteration"] for r in s["gspo_log"]] == list(range(1, args["gspo_iters"] + 1))
    for key in ("gspo_first", "gspo_last"):
        assert set(s[key]) == set(demo.RL_FIELDS) and s[key]["rl_response_length"] > 0, s[key]
    group = args["prompts_per_step"] * args["rollouts_per_prompt"]
    assert all(0 <= r["reward_accuracy"] <= 1 for r in s["gspo_log"]) and group == 4
    # the prompts carry the SFT data's empty system prompt, so GSPO samples from the prompts SFT saw
    first = json.loads((out / "shards" / "prompts.prompts.jsonl").read_text().splitlines()[0])
    assert first["conversations"][0] == {"from": "system", "value": ""}
    assert s["rl_prompts"] == args["max_single"]
