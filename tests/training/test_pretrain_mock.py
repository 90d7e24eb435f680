"""pretrain_internvl.py on mock data: TP2 x PP2 logs the single-process losses."""

import json
import subprocess
import sys

from tests.conftest import one_process
from tests.launch import REPO, torchrun

SCRIPT = REPO / "pretrain_internvl.py"
COMMON = [
    "--model",
    "debug",
    "--mock-data",
    "--global-batch-size",
    "4",
    "--train-iters",
    "3",
    "--seq-length",
    "128",
    "--lr",
    "1e-3",
]


def _losses(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tp2_pp2_matches_single_process(tmp_path):
    one, four = tmp_path / "one.jsonl", tmp_path / "four.jsonl"
    one_process(SCRIPT, COMMON + ["--log-jsonl", str(one)], timeout=300)  # no torchrun agent for one rank
    torchrun(
        SCRIPT,
        4,
        COMMON + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--log-jsonl", str(four)],
        timeout=300,
    )
    a, b = _losses(one), _losses(four)
    assert [r["iteration"] for r in a] == [1, 2, 3] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * abs(ra["grad_norm"]), (ra, rb)
        for key in ("lr", "tokens_per_s", "grad_norm"):
            assert key in ra
    assert a[-1]["loss"] < a[0]["loss"]  # lr 1e-3 on repeated-structure mock data: it learns


def test_help_lists_megatron_flags():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    ).stdout
    for flag in (
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
        "--micro-batch-size",
        "--global-batch-size",
        "--train-iters",
        "--seed",
        "--log-jsonl",
        "--mock-data",
        "--decoder-first-pipeline-num-layers",
        "--sequence-parallel",
    ):
        assert flag in out, flag


def test_contradictory_flags_refused():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "debug"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode != 0 and "--data-path" in proc.stderr
