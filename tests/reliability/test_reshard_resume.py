"""Resuming a training checkpoint in another layout through the CLI: weights, optimizer state (plain
and distributed) and data position carry over, so the losses after the resume equal an uninterrupted
run's (fp32, 1e-5). Cases: TP2 x PP2 -> TP1, TP1 -> TP2, DP1 -> DP2 with the distributed optimizer
(the real shard loader splits the same global batches over the new ranks), CP2 -> CP1 with the
distributed optimizer (its state was sharded over the two context-parallel ranks), EP2 -> EP1 (debug-moe);
and the change it cannot carry (--use-distributed-optimizer switched) refused naming --no-load-optim.
The shard runs decode packs in the rank (--num-workers 0): the loader's workers are not the subject.
The training runs are jobs of the session's reused worlds (tests/conftest.py `pretrain`: the same
script and flags, the launch's losses bit for bit): what is checked is the checkpoint's resharding,
not the launch; the refusal is a real process (its subject is the one-line error).

One single-process run is the reference of the dense cases and the checkpoint of two of them (every
layout trains like one process within 1e-5: tests/reliability/test_validation.py, tests/moe), and
the EP2 run is both reference and checkpoint of the MoE case. ITERS steps, resumed after SAVE_AT.
"""

from __future__ import annotations

import pytest

from tests.conftest import pretrain
from tests.reliability.cli_helpers import SEQ, assert_user_error, run
from tests.reliability.common import train_records

ITERS, SAVE_AT = 4, 2
DISTOPT = ["--use-distributed-optimizer"]
RESTORED = "restored model weights, schedule, data position and optimizer state"


def _args(data: list[str], log, *extra: str) -> list[str]:
    return [
        "--global-batch-size",
        "4",
        "--train-iters",
        str(ITERS),
        "--lr",
        "2e-3",
        "--seed",
        "9",
        "--log-jsonl",
        str(log),
        *data,
        *extra,
    ]


def _shards(prefix: str) -> list[str]:
    # --num-workers 0: the packs are decoded in the rank (the same loader and data position, no fork
    # server per rank: ~3 CPU-s and seconds to step 1 each); the workers' paths are the subject of
    # test_cli_loader.py and test_preemption.py
    return ["--model", "debug", "--data-path", prefix, "--seq-length", str(SEQ), "--num-workers", "0"]


def _launch(nproc: int, args: list[str]) -> str:
    """pretrain_internvl.py on `nproc` ranks as a job of the reused world of that size (no interpreter
    start, no imports: ~3.5 CPU-s per rank and torchrun's agent saved per run); returns the output,
    raises with it if the run fails."""
    return pretrain(nproc, args, timeout=300)


def _losses(log) -> dict[int, float]:
    return {it: r["loss"] for it, r in train_records(log).items()}


def _assert_continues(log, reference: dict[int, float]) -> None:
    resumed = _losses(log)
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1)), resumed
    for it, loss in resumed.items():
        assert abs(loss - reference[it]) <= 1e-5, (it, loss, reference[it])


@pytest.fixture(scope="module")
def reference(good_prefix, tmp_path_factory):
    """ITERS steps on one process with the distributed optimizer (a TP1 DP1 checkpoint at SAVE_AT)."""
    d = tmp_path_factory.mktemp("reference")
    _launch(
        1,
        _args(
            _shards(good_prefix),
            d / "log.jsonl",
            *DISTOPT,
            "--save",
            str(d / "ckpt"),
            "--save-interval",
            str(SAVE_AT),
        ),
    )
    return _losses(d / "log.jsonl"), d / "ckpt" / f"iter_{SAVE_AT:07d}"


CASES = {  # name: (ranks and flags of the run that resumes, where its checkpoint comes from)
    "tp2pp2-to-tp1": (1, [], "tp2pp2"),
    "tp1-to-tp2": (2, ["--tensor-model-parallel-size", "2", *DISTOPT], "reference"),
    "dp1-to-dp2": (2, DISTOPT, "reference"),
    "cp2-to-cp1": (1, DISTOPT, "cp2"),
}
SOURCES = {  # ranks and flags of the run that writes the checkpoint, where it is not the reference
    "tp2pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),  # plain optimizer
    "cp2": (2, ["--context-parallel-size", "2", *DISTOPT]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_another_layout(good_prefix, reference, tmp_path, case):
    losses, ref_ckpt = reference
    nproc, flags, source = CASES[case]
    ckpt = ref_ckpt
    if source in SOURCES:  # a run of SAVE_AT steps in the source layout writes the checkpoint
        ckpt, (ranks, layout) = tmp_path / "ckpt", SOURCES[source]
        _launch(
            ranks,
            _args(
                _shards(good_prefix),
                tmp_path / "a.jsonl",
                *layout,
                "--save",
                str(ckpt),
                "--save-interval",
                str(SAVE_AT),
                "--exit-interval",
                str(SAVE_AT),
            ),
        )
    out = _launch(nproc, _args(_shards(good_prefix), tmp_path / "b.jsonl", "--load", str(ckpt), *flags))
    assert RESTORED in out, out[-3000:]
    _assert_continues(tmp_path / "b.jsonl", losses)


def test_ep2_checkpoint_resumes_at_ep1(tmp_path):
    """debug-moe: EP2 has a dense and an expert-parallel optimizer, EP1 one for all parameters."""
    moe = ["--model", "debug-moe", "--mock-data", "--seq-length", "128"]
    _launch(
        2,
        _args(
            moe,
            tmp_path / "ep2.jsonl",
            "--expert-model-parallel-size",
            "2",
            "--save",
            str(tmp_path / "ckpt"),
            "--save-interval",
            str(SAVE_AT),
        ),
    )
    out = _launch(1, _args(moe, tmp_path / "ep1.jsonl", "--load", str(tmp_path / "ckpt" / f"iter_{SAVE_AT:07d}")))
    assert RESTORED in out, out[-3000:]
    _assert_continues(tmp_path / "ep1.jsonl", _losses(tmp_path / "ep2.jsonl"))


def test_switching_the_distributed_optimizer_is_refused(good_prefix, reference, tmp_path):
    proc = run(
        "pretrain", *_args(_shards(good_prefix), tmp_path / "log.jsonl", "--load", str(reference[1])), timeout=300
    )
    assert_user_error(proc, "--no-load-optim", "--use-distributed-optimizer", str(reference[1]))
