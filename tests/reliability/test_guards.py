"""Guards of a long run through pretrain_internvl.py: a diverging run stops naming the
iteration, the value and the ranks and keeps the last good checkpoint; --skip-spike-factor skips
and resumes exactly; a rank that stops answering ends the job within --distributed-timeout-minutes;
--log-straggler and --wandb-project report (here through a stand-in module that records every call;
test_wandb_offline.py runs the real package offline). The resume of the spike state is a job of the
session's reused 1-rank world (tests/conftest.py `pretrain`: a launch's bits, no interpreter start);
the runs that fail, hang or need their own environment (the wandb stand-in) are real launches."""

import json
import time
from pathlib import Path

import pytest

from tests.conftest import pretrain
from tests.reliability.common import MOCK, launch, ok, one_rank, records, train_records

HERE = Path(__file__).resolve().parent


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = MOCK + [
        "--global-batch-size",
        "2",
        "--train-iters",
        "6",
        "--pipeline-model-parallel-size",
        "2",
        "--save",
        str(ckpt),
        "--save-interval",
        "1",
        "--log-jsonl",
        str(tmp_path / "log.jsonl"),
    ]
    args[args.index("--lr") + 1] = "1e6"
    proc = launch(2, args)
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: "))
    assert "iteration 2: loss nan" in line and "rank(s) 1" in line, line  # PP2: the loss lives on rank 1
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001"]  # no NaN checkpoint
    assert list(train_records(tmp_path / "log.jsonl")) == [1]


SPIKE = MOCK + ["--global-batch-size", "2", "--skip-spike-factor", "1.0", "--lr", "3e-3", "--train-iters", "10"]


@pytest.fixture(scope="module")
def spiky(tmp_path_factory):
    """--skip-spike-factor 1.0 (every loss above the running mean is skipped) for 10 steps, saving at 6,
    with --log-straggler, a validation and --wandb-project through the stand-in module."""
    d = tmp_path_factory.mktemp("spike")
    proc = ok(
        one_rank(
            SPIKE
            + [
                "--save",
                str(d / "ckpt"),
                "--save-interval",
                "6",
                "--log-jsonl",
                str(d / "a.jsonl"),
                "--log-straggler",
                "--mock-valid-data",
                "--eval-interval",
                "5",
                "--eval-iters",
                "1",
                "--wandb-project",
                "p17",
                "--wandb-exp-name",
                "run1",
            ],
            env={
                "PYTHONPATH": str(HERE / "fake_wandb"),
                "FAKE_WANDB_LOG": str(d / "wandb.jsonl"),
                "WANDB_MODE": "offline",
            },
        )
    )
    return d, proc


def test_spike_skips_are_logged_and_leave_the_schedule(spiky):
    d, proc = spiky
    recs = train_records(d / "a.jsonl")
    skipped = [it for it, r in recs.items() if r["skipped"]]
    assert skipped and all(it > 5 for it in skipped), skipped  # never during the first 5 updates
    assert len(skipped) < len(recs) - 5
    for it in skipped:  # no optimizer or schedule step: the LR stays where the previous step left it
        assert recs[it]["lr"] == recs[it - 1]["lr"]
        assert f"iteration {it}: loss" in proc.stdout and "update skipped" in proc.stdout


def test_spike_state_resumes_exactly(spiky, tmp_path):
    d, _ = spiky
    # an iter_ directory given to --load is exactly that checkpoint (the latest is iteration 10)
    pretrain(1, SPIKE + ["--load", str(d / "ckpt" / "iter_0000006"), "--log-jsonl", str(tmp_path / "b.jsonl")])
    straight, resumed = train_records(d / "a.jsonl"), train_records(tmp_path / "b.jsonl")
    assert sorted(resumed) == [7, 8, 9, 10]
    for it, r in resumed.items():
        assert (r["loss"], r["skipped"], r["lr"]) == (straight[it]["loss"], straight[it]["skipped"], straight[it]["lr"])


def test_straggler_report_and_wandb(spiky):
    d, proc = spiky
    lines = [x for x in proc.stdout.splitlines() if x.startswith("straggler iteration")]
    assert len(lines) == 10 and "step min" in lines[0] and "(rank 0)" in lines[0] and "data min" in lines[0]
    calls = [json.loads(x) for x in (d / "wandb.jsonl").read_text().splitlines()]
    assert calls[0] == {
        "call": "init",
        "project": "p17",
        "name": "run1",
        "dir": None,
        "mode": "offline",
        "has_config": True,
    }
    logged = [c for c in calls if c["call"] == "log"]
    jsonl = records(d / "a.jsonl")
    assert [c["step"] for c in logged] == [r["iteration"] for r in jsonl]
    assert [c["data"].get("train/loss", c["data"].get("valid/valid_loss")) for c in logged] == [
        r.get("loss", r.get("valid_loss")) for r in jsonl
    ]
    assert calls[-1] == {"call": "finish"}


def test_a_rank_that_stops_answering_ends_the_job(tmp_path):
    """Rank 1 hangs before step 2 (fault injection); rank 0 gives up after the 6 s timeout with one
    clear line and torchrun ends the rest, instead of the job waiting forever."""
    start = time.time()
    proc = launch(
        2,
        MOCK + ["--global-batch-size", "2", "--train-iters", "4", "--distributed-timeout-minutes", "0.1"],
        timeout=240,
        env={"INTERNVL_MCORE_FAULT": "step:2:1:hang"},
    )
    assert proc.returncode != 0
    assert time.time() - start < 180
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: "))
    assert line.startswith("error: rank 0: a collective failed during iteration 2") and "Timed out" in line, line
    assert "--distributed-timeout-minutes 0.1" in line
