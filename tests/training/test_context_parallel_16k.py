"""Context parallelism at length: a CP2 run of the debug model on 16k packs logs the CP1 loss and
gradient norm (both jobs of the session's reused worlds: tests/conftest.py `pretrain`). One step: the
forward's loss and the backward's gradient norm are what the length changes (a step is ~9 CPU-s at 16k);
the optimizer's update after it is the same for any CP size (CP shards no parameter) and
tests/training/test_layouts_on_shards.py checks CP2 over several steps."""

import json

from tests.conftest import pretrain

ARGS = [
    "--model",
    "debug",
    "--mock-data",
    "--global-batch-size",
    "1",
    "--train-iters",
    "1",
    "--seq-length",
    "16384",
    "--mock-tiles-per-sample",
    "8",
    "--lr",
    "1e-3",
]


def test_cp2_on_16k_packs_matches_cp1(tmp_path):
    runs = {}
    for cp in (1, 2):
        log = tmp_path / f"cp{cp}.jsonl"
        args = ARGS + ["--context-parallel-size", str(cp), "--log-jsonl", str(log)]
        output = pretrain(cp, args)  # every rank's output
        lines = [x for x in output.splitlines() if x.startswith("context parallelism:")]
        # said once, at start-up, with the reason --cp-split auto did not take TE's 'thd' path (none at CP1)
        assert lines == (
            []
            if cp == 1
            else [
                "context parallelism: whole-row split, our fp32 ring attention (--cp-comm-type p2p; --cp-split auto fell "
                "back from TE's 'thd' path because of no transformer-engine layer specs (local backend: --device cpu, "
                "or TE not installed))"
            ]
        ), output[-2000:]
        runs[cp] = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(runs[1]) == len(runs[2]) == 1
    for a, b in zip(runs[2], runs[1]):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, runs)
