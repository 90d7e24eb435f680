"""--wandb-project with the real wandb package in offline mode (no network): the run writes a local
offline run directory, and the scalars it logged are the ones --log-jsonl recorded."""

import re

import wandb  # the dev extras install it; --wandb-project itself only needs it when given

from tests.reliability.common import MOCK, ok, one_rank, train_records


def test_real_wandb_offline_run(tmp_path):
    proc = ok(
        one_rank(
            MOCK
            + [
                "--global-batch-size",
                "1",
                "--train-iters",
                "3",
                "--log-jsonl",
                str(tmp_path / "a.jsonl"),
                "--wandb-project",
                "p17",
                "--wandb-exp-name",
                "r1",
                "--wandb-save-dir",
                str(tmp_path),
            ],
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "false"},
        )
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert [p.stat().st_size > 0 for p in runs[0].glob("run-*.wandb")] == [True]
    # wandb's own end-of-run summary (5 decimals) shows the last loss the jsonl has
    text = proc.stdout + proc.stderr
    summary = text[text.index("Run summary:") :]
    shown = float(re.search(r"train/loss\s+([0-9.]+)", summary).group(1))
    last = train_records(tmp_path / "a.jsonl")[3]["loss"]
    assert abs(shown - last) < 1e-5, (shown, last)
    assert wandb.__version__
