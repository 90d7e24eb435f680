"""pretrain_internvl.py's loader workers through the real CLI, in a user's environment.

Packs of 1024 tokens from the digits set, the default --num-workers, OMP_NUM_THREADS unset or 2: with
these, the forked loader worker deadlocked in `Tensor.share_memory_` (6 of 6 runs hung; never with
OMP_NUM_THREADS=1, which the suite used to set). Every run has a hard timeout. A worker that dies or
stalls is made to do so deterministically by the loader's test hook (INTERNVL_MCORE_LOADER_FAULT=G:ACTION
acts on the pack of global index G) and must end the run with one line naming the worker and the pack.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launch import free_port
from tests.reliability.cli_helpers import (
    REPO,
    assert_user_error,
    cli,
    env,
    in_process,
    preprocess_args,
)
from tests.reliability.common import train_records

pytestmark = pytest.mark.timeout(600)
LONG = 1024
RUN_TIMEOUT_S = 300  # a run takes ~10-20 s on 2 idle cores, 120-150 s under 8 users' load; the hang was forever


@pytest.fixture(scope="module")
def long_prefix(digits, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("long") / "dg"
    args = preprocess_args(digits.meta, digits.tokenizer, out)
    args[args.index("--seq-length") + 1] = str(LONG)
    assert in_process("preprocess_mm_data", *args) == 0  # an input: made without a launch (--workers 1)
    return str(out)


def pretrain(prefix: str, launcher: str, omp: str | None, *extra: str, fault: str | None = None):
    args = [
        "--model",
        "debug",
        "--data-path",
        prefix,
        "--seq-length",
        str(LONG),
        "--train-iters",
        "3",
        "--global-batch-size",
        "1",
        *extra,
    ]
    torchrun = (
        ()
        if launcher == "plain"
        else (
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
        )
    )
    cmd = [*torchrun, *(cli("pretrain", *args)[1:] if torchrun else cli("pretrain", *args))]
    variables = {
        **({"OMP_NUM_THREADS": omp} if omp else {}),
        **({"INTERNVL_MCORE_LOADER_FAULT": fault} if fault else {}),
    }
    try:
        return subprocess.run(
            cmd, cwd=REPO, env=env(**variables), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"OMP_NUM_THREADS={omp} {' '.join(cmd)} hung for {RUN_TIMEOUT_S}s") from exc


@pytest.mark.parametrize("launcher, omp", [("torchrun", None), ("plain", "2")])
def test_training_from_shards_in_a_users_shell(long_prefix, tmp_path, launcher, omp):
    log = tmp_path / "log.jsonl"
    proc = pretrain(long_prefix, launcher, omp, "--log-jsonl", str(log))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(train_records(log)) == [1, 2, 3]


def test_a_killed_worker_is_one_line(long_prefix):
    """Worker 1 of 2 is SIGKILLed (as by the out-of-memory killer) on its first pack, global index 1,
    after iteration 1 trained on worker 0's pack: plain process, OMP_NUM_THREADS unset."""
    proc = pretrain(long_prefix, "plain", None, "--num-workers", "2", fault="1:kill")
    assert "iteration      1/3" in proc.stdout, proc.stdout[-2000:]
    assert_user_error(
        proc, "--num-workers", "loader worker 1 (pid ", "killed by SIGKILL", long_prefix, "(global index 1)"
    )


def test_a_stalled_worker_meets_the_deadline(long_prefix):
    """Worker 1 of 2 never answers for global index 1: the deadline names it (torchrun, OMP_NUM_THREADS=2;
    torchrun adds its own report of the failed rank after the rank's line)."""
    # 5 s, not less: worker 0's packs must each come within the same deadline while the other xdist
    # worker's runs load both cores (a start-up has its own floor, data/workers.py STARTUP_MIN_S)
    proc = pretrain(long_prefix, "torchrun", "2", "--num-workers", "2", "--data-worker-timeout", "5", fault="1:hang")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-4000:]
    for needle in ("--data-worker-timeout 5", "loader worker 1 (pid ", long_prefix, "(global index 1)", "within 5 s"):
        assert needle in lines[0], (needle, lines[0])
    assert "exitcode  : 2" in proc.stderr


def test_bad_worker_timeout_is_refused(long_prefix):
    assert_user_error(
        pretrain(long_prefix, "plain", None, "--data-worker-timeout", "0"), "--data-worker-timeout", "> 0"
    )
