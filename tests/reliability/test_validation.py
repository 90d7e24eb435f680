"""Validation during training through pretrain_internvl.py: the validation loss is the
same number in every layout (TP2 x PP2, CP2 x DP2 vs one process), evaluation changes no training
result, it reaches --log-jsonl and tensorboard, and --valid-data-path reads shards. The training runs
are jobs of the session's reused worlds (tests/conftest.py `pretrain`: the same script and flags, a
launch's losses bit for bit): the numbers are the subject, not the launch; the refusal is a real
process (its one-line error is the subject)."""

import pytest

from tests.reliability.common import MOCK, train_records, valid_records
from tests.conftest import SEQ, pretrain

ITERS = 4
EVAL = ["--mock-valid-data", "--eval-interval", "2", "--eval-iters", "2"]
BASE = MOCK + ["--global-batch-size", "4", "--train-iters", str(ITERS)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with validation (and tensorboard), and the same run without validation."""
    d = tmp_path_factory.mktemp("valid_single")
    pretrain(1, BASE + EVAL + ["--log-jsonl", str(d / "eval.jsonl"), "--tensorboard-dir", str(d / "tb")])
    pretrain(1, BASE + ["--log-jsonl", str(d / "plain.jsonl")])
    return d


def test_evaluation_changes_no_training_result(single):
    with_eval, without = train_records(single / "eval.jsonl"), train_records(single / "plain.jsonl")
    assert sorted(with_eval) == list(range(1, ITERS + 1))
    for it in with_eval:  # bit-exact in fp32: eval ran in between, nothing it touched leaked
        assert (with_eval[it]["loss"], with_eval[it]["grad_norm"]) == (without[it]["loss"], without[it]["grad_norm"])
    valid = valid_records(single / "eval.jsonl")
    # every --eval-interval (2) before the end, then the held-out evaluation at the end
    assert [(r["iteration"], r["final"]) for r in valid] == [(2, False), (ITERS, True)]
    assert valid[0]["valid_loss"] != valid[1]["valid_loss"]  # the weights moved in between


def test_validation_reaches_tensorboard(single):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(single / "tb"))
    acc.Reload()
    events = acc.Scalars("valid/valid_loss")
    jsonl = valid_records(single / "eval.jsonl")
    assert [e.step for e in events] == [r["iteration"] for r in jsonl]
    assert [e.value for e in events] == pytest.approx([r["valid_loss"] for r in jsonl], rel=1e-6)


@pytest.mark.parametrize(
    "layout",
    [["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], ["--context-parallel-size", "2"]],
    ids=["tp2-pp2", "cp2-dp2"],
)
def test_validation_loss_matches_single_process(single, tmp_path, layout):
    log = tmp_path / "log.jsonl"
    pretrain(4, BASE + EVAL + layout + ["--log-jsonl", str(log)])
    ref, got = valid_records(single / "eval.jsonl"), valid_records(log)
    assert [r["iteration"] for r in got] == [r["iteration"] for r in ref]
    for a, b in zip(ref, got):
        assert abs(a["valid_loss"] - b["valid_loss"]) <= 1e-5 * abs(a["valid_loss"]), (a, b)


def test_valid_data_path_reads_shards(digits_shards, tmp_path):
    """--valid-data-path with the training shards, lr 0: the first training batch and the (one-batch)
    validation are the same packs through the same weights, so the two losses agree; on 2
    data-parallel ranks, so the sum over ranks is part of what agrees. The default --num-workers stays:
    this is the one run of a validation loader beside the training one with loader workers."""
    log = tmp_path / "log.jsonl"
    pretrain(
        2,
        [
            "--model",
            "debug",
            "--data-path",
            digits_shards,
            "--valid-data-path",
            digits_shards,
            "--eval-iters",
            "1",
            "--global-batch-size",
            "2",
            "--train-iters",
            "1",
            "--seq-length",
            str(SEQ),
            "--lr",
            "0",
            "--log-jsonl",
            str(log),
        ],
    )
    train, valid = train_records(log)[1], valid_records(log)
    assert [(r["iteration"], r["final"]) for r in valid] == [(1, True)]
    assert abs(valid[0]["valid_loss"] - train["loss"]) <= 1e-6 * train["loss"], (valid, train)


def test_eval_flags_without_validation_data_are_refused():
    """--eval-interval / --eval-iters given without validation data would evaluate nothing, silently:
    refused by name (one line, exit 2) before anything starts; --eval-iters 0 (no validation) is fine."""
    from tests.reliability.common import plain

    proc = plain(MOCK + ["--eval-interval", "5", "--eval-iters", "3"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [s for s in proc.stderr.splitlines() if s.strip()]
    assert len(lines) == 1 and "--eval-interval does nothing without validation data (--valid-data-path" in lines[0]
    assert "--eval-iters does nothing without validation data" in lines[0], lines[0]
