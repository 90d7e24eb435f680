"""pretrain_internvl.py on mock data: TP2 x PP2 logs the single-process losses, and a job of the
session's reused world (tests/conftest.py `pretrain`, which most training tests use) logs a torchrun
launch's losses bit for bit."""

import json
import subprocess
import sys

from tests.conftest import pretrain
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
    """The TP2 x PP2 run is a real torchrun launch, then the same flags run as a job of the reused
    4-rank world: the same records bit for bit (the timings and throughput aside), so the worlds' runs
    elsewhere stand for launches. The single process is a job of the reused 1-rank world."""
    one, four, pooled = tmp_path / "one.jsonl", tmp_path / "four.jsonl", tmp_path / "pooled.jsonl"
    pretrain(1, COMMON + ["--log-jsonl", str(one)], timeout=300)
    tp2pp2 = COMMON + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    torchrun(SCRIPT, 4, tp2pp2 + ["--log-jsonl", str(four)], timeout=300)
    pretrain(4, tp2pp2 + ["--log-jsonl", str(pooled)], timeout=300)
    exact = ("iteration", "loss", "lr", "grad_norm")  # the rest are timings, throughput and memory
    launched, pooled_records = _losses(four), _losses(pooled)
    assert len(launched) == 3 and [set(r) for r in pooled_records] == [set(r) for r in launched]
    assert [[r[k] for k in exact] for r in pooled_records] == [[r[k] for k in exact] for r in launched]
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
