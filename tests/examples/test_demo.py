"""The digits demo end to end, shortened: `examples/digits/run_demo.py --quick` is the code path of
`scripts/demo.sh` with a few training steps per stage. Every phase must leave its artifact, stage 2
must start from stage 1, and the transformers export must have answered every held-out question (the
accuracy of a few steps is meaningless, so it is not asserted). Also checks the evaluation prompt
against the InternVL template rule tokenized by transformers, and that held-out images never appear
in the training data.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO

DEMO = REPO / "examples" / "digits" / "run_demo.py"
PHASES = ["data", "preprocess", "stage 1", "stage 2", "export", "evaluate", "plot"]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_digits_{name}", REPO / "examples" / "digits" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tool(script: str):
    spec = importlib.util.spec_from_file_location(f"_test_demo_{Path(script).stem}", REPO / "tools" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, str]:
    """`run_demo.py --quick` in this process, its training runs jobs of the session's reused 2-rank
    world and its tools called in-process (one thread, as the script's child processes): the same
    phases and code path without starting 2 torchrun launches and 3 interpreters."""
    import torch

    from tests.conftest import pretrain

    demo = _module("run_demo")

    class PoolRunner(demo.Runner):
        def tool(self, script: str, args: list[str], log: str) -> None:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = _tool(script).main(args)
            Path(log).write_text(out.getvalue())
            assert code == 0, out.getvalue()[-4000:]

        def train(self, args: list[str], log: str) -> None:
            Path(log).write_text("$ pretrain_internvl.py " + " ".join(args) + "\n" + pretrain(2, args))

    out = tmp_path_factory.mktemp("demo") / "run"
    stdout, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout):
            code = demo.main(["--quick", "--out", str(out)], run=PoolRunner())
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stdout.getvalue()[-4000:]
    return out, stdout.getvalue()


def test_every_phase_ran_and_left_its_artifact(quick_demo):
    out, stdout = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    assert [p["name"] for p in summary["phases"]] == PHASES
    for p in summary["phases"]:
        assert Path(p["artifact"]).exists(), p
        assert p["seconds"] > 0 and p["cpu_seconds"] >= 0, p
    recipe = summary["recipe"]
    assert recipe["layout"] in ("tp2", "pp2")
    # preprocess wrote the shards with the recipe's packing and prompt (the evaluation reuses the prompt)
    manifest = json.loads((out / "shards" / "digits.manifest.json").read_text())
    assert manifest["seq_length"] == recipe["seq_length"]
    assert manifest["arguments"]["system_prompt"] == recipe["system_prompt"]
    assert manifest["counts"]["rejects"] == 0
    assert manifest["counts"]["samples"] == len(_jsonl(out / "data" / "digits_train.jsonl"))
    # both stages trained for their steps, checkpointed, and logged every step
    for stage, iters in (("1", recipe["stage1_iters"]), ("2", recipe["stage2_iters"])):
        assert (out / f"stage{stage}" / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
        records = _jsonl(out / "logs" / f"stage{stage}.jsonl")
        assert [r["iteration"] for r in records] == list(range(1, iters + 1))
        assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite, positive
    # stage 2 started from stage 1's weights
    stage2_log = (out / "logs" / "stage2.log").read_text()
    assert f"loaded weights from training checkpoint {out / 'stage1'}" in stage2_log
    assert "--stage 2" in stage2_log and "--pretrained" in stage2_log
    # the export is transformers' layout
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"]
    assert list((out / "hf").glob("*.safetensors"))
    # a real PNG with something drawn
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "held-out accuracy:" in stdout


def test_evaluation_answered_every_heldout_question(quick_demo):
    out, _ = quick_demo
    heldout = _jsonl(out / "data" / "digits_heldout.jsonl")
    predictions = _jsonl(out / "predictions.jsonl")
    assert len(heldout) > 300  # 20% of scikit-learn's 1,797 digits
    assert [(p["image"], p["question"], p["answer"]) for p in predictions] == [
        (h["image"], h["question"], h["answer"]) for h in heldout
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_heldout"] == len(heldout)
    assert summary["num_correct"] == sum(p["correct"] for p in predictions)
    assert summary["accuracy"] == pytest.approx(summary["num_correct"] / len(heldout))
    assert all(p["correct"] == (p["prediction"] == p["answer"]) for p in predictions)


def test_heldout_images_are_not_in_the_training_data(quick_demo):
    out, _ = quick_demo
    held = {os.path.basename(h["image"]) for h in _jsonl(out / "data" / "digits_heldout.jsonl")}
    train = set()
    for rec in _jsonl(out / "data" / "digits_train.jsonl"):
        image = rec.get("image")
        train.update([image] if isinstance(image, str) else image or [])
    assert train and not held & train


def test_eval_prompt_is_the_internvl_template_rule(quick_demo):
    """The generation prompt equals the InternVL chat rule rendered as one string and tokenized by
    transformers' AutoTokenizer (an independent tokenizer implementation)."""
    from transformers import AutoTokenizer

    from internvl_mcore.data.tokenizer import load_tokenizer

    out, _ = quick_demo
    evaluate = _module("evaluate")
    tok_dir = str(out / "data" / "tokenizer")
    system, question, n = "Be brief.", "What digit is shown?", 4
    ours = evaluate.prompt_ids(load_tokenizer(tok_dir), question, [n], system)
    text = (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n<img>{'<IMG_CONTEXT>' * n}</img>\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ours == AutoTokenizer.from_pretrained(tok_dir).encode(text, add_special_tokens=False)


def test_refuses_to_empty_a_directory_it_did_not_make(tmp_path):
    keep = tmp_path / "precious.txt"
    keep.write_text("not a demo output")
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "not a digits demo output" in proc.stderr
    assert keep.read_text() == "not a demo output"
