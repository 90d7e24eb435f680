"""SIGTERM and SIGKILL through pretrain_internvl.py: --exit-signal-handler
saves after the step every rank agrees on and exits 0, and the resumed run continues the uninterrupted
run's losses; without it SIGTERM exits 143 with one line; a --save held by a running job is refused
naming it; no helper process (megatron-core's checkpoint writer and Manager, loader workers, the
resource tracker) outlives its rank, even after kill -9.

Every signal is sent at a known point: the rank waits at a fault point (training/guards.py) and says
so on stdout (`fault point step N: waiting for a signal`) before the test sends it. The runs that
signals and kills are sent to are real launches; the runs after them (resume, reference, lock
takeover) are jobs of the session's reused worlds (tests/conftest.py `pretrain`): their subject is
the checkpoint and the lock, not the launch, and their losses are a launch's bit for bit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import pretrain
from tests.launch import free_port
from tests.reliability.cli_helpers import SEQ
from tests.reliability.common import DIST_ENV, MOCK, SCRIPT, one_line_error, plain, train_records

pytestmark = pytest.mark.timeout(420)
ITERS, STOP_AT = 5, 3
ARGS = MOCK + ["--global-batch-size", "2", "--train-iters", str(ITERS)]
MARKER = f"fault point step {STOP_AT}: waiting for a signal"


class Job:
    """A run started in its own session, its stdout read line by line (so a test can wait for a marker)."""

    def __init__(self, cmd: list[str], env: dict, out: Path) -> None:
        self.out = out
        self.log = open(out, "w")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            cwd=SCRIPT.parent,
        )

    def wait_for(self, marker: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.out.read_text():
            assert self.proc.poll() is None, f"ended (exit {self.proc.returncode}) before {marker!r}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {marker!r} after {timeout}s:\n{self.text()}"
            time.sleep(0.05)

    def helpers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.log.close()

    def text(self) -> str:
        return self.out.read_text()[-6000:]


def _env(fault: str | None) -> dict:
    # without PYTHONWARNINGS (scripts/test.sh sets ignore): the output checked is what a user sees
    env = {k: v for k, v in os.environ.items() if k not in (*DIST_ENV, "PYTHONWARNINGS")}
    env.update(OMP_NUM_THREADS="1")
    if fault:
        env["INTERNVL_MCORE_FAULT"] = fault
    return env


def _assert_all_gone(procs: list[psutil.Process], session: int) -> None:
    """None of `procs` runs any more (a zombie awaiting its parent counts as gone), and nothing is
    left in the job's session (a helper re-parented to init keeps its session id)."""
    deadline = time.monotonic() + 30  # the kernel delivers PDEATHSIG at once; the exits may lag a little
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        left = [p for p in psutil.process_iter() if _sid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE]
        if not alive and not left:
            return
        time.sleep(0.2)
    names = [(p.pid, " ".join(p.cmdline())[:120]) for p in alive + left]
    for p in alive + left:  # not into the next test
        p.kill()
    raise AssertionError(f"left behind: {names}")


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def test_sigterm_with_exit_signal_handler_saves_and_resumes_exactly(tmp_path):
    """torchrun, 2 ranks: SIGTERM to rank 0 while it waits before step 3; a second run into the same
    --save meanwhile is refused naming rank 0's host and pid. Both ranks finish step 3, save it, exit
    0, no helper survives; resuming from it reproduces the uninterrupted run's steps 4 and 5."""
    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        *ARGS,
        "--save",
        str(ckpt),
        "--save-interval",
        "2",
        "--exit-signal-handler",
        "--log-jsonl",
        str(tmp_path / "a.jsonl"),
    ]
    job = Job(cmd, _env(f"step:{STOP_AT}:0:wait"), tmp_path / "job.txt")
    try:
        job.wait_for(MARKER)
        ranks = [p for p in psutil.Process(job.proc.pid).children() if "pretrain_internvl" in " ".join(p.cmdline())]
        rank0 = next(p for p in ranks if p.environ().get("RANK") == "0")
        line = one_line_error(plain(ARGS + ["--save", str(ckpt)]))
        assert f"--save {ckpt} is in use by another run: pid {rank0.pid} on host {socket.gethostname()} since" in line
        helpers = job.helpers()
        assert len(helpers) > 2, helpers  # the ranks and megatron-core's helpers (its Manager since the first save)
        rank0.send_signal(signal.SIGTERM)
        code = job.finish()
    finally:
        job.finish()
    out = job.text()
    assert code == 0, out
    assert (
        f"exiting on SIGTERM after iteration {STOP_AT} (--exit-signal-handler): saved checkpoint at iteration "
        f"{STOP_AT} to {ckpt}"
    ) in out, out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STOP_AT)
    assert "Traceback" not in out, out
    _assert_all_gone(helpers, job.proc.pid)
    assert not (ckpt / ".internvl_mcore.lock").exists()

    # no --save: what is checked is the resume (its two steps), and two more saves of 2 ranks cost ~2 CPU-s
    pretrain(2, ARGS + ["--load", str(ckpt), "--log-jsonl", str(tmp_path / "b.jsonl")])
    pretrain(2, ARGS + ["--log-jsonl", str(tmp_path / "ref.jsonl")])
    ref, first, resumed = (train_records(tmp_path / n) for n in ("ref.jsonl", "a.jsonl", "b.jsonl"))
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5]
    for it in range(1, ITERS + 1):
        assert (first if it <= STOP_AT else resumed)[it]["loss"] == ref[it]["loss"], it  # bit-exact in fp32


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_sigterm_or_kill_without_the_flag_leaves_no_process(good_prefix, tmp_path, sig):
    """One process on shards with 2 loader workers and --save (megatron-core's helpers exist after its
    first save): SIGTERM ends it with one line and exit 143, SIGKILL at once; either way every helper
    dies with it, and a kill -9's lock is taken over by the next run with a warning naming the dead pid."""
    ckpt = tmp_path / "ckpt"
    args = [
        "--model",
        "debug",
        "--data-path",
        good_prefix,
        "--seq-length",
        str(SEQ),
        "--num-workers",
        "2",
        "--global-batch-size",
        "2",
        "--train-iters",
        str(ITERS),
        "--seed",
        "5",
    ]
    # one save, at STOP_AT - 1 (the latest when the signal comes; megatron-core's Manager starts there)
    cmd = [sys.executable, str(SCRIPT), *args, "--save", str(ckpt), "--save-interval", str(STOP_AT - 1)]
    job = Job(cmd, _env(f"step:{STOP_AT}:0:wait"), tmp_path / "job.txt")
    try:
        job.wait_for(MARKER)
        helpers = job.helpers()
        kinds = [" ".join(p.cmdline()) for p in helpers]
        # the loader's fork server and its 2 workers (data/workers.py: forked from the server, not the rank)
        assert sum("multiprocessing.forkserver" in k for k in kinds) >= 3, kinds
        assert any("spawn_main" in k for k in kinds), kinds  # megatron-core's Manager (spawned at the first save)
        job.proc.send_signal(sig)
        code = job.finish()
    finally:
        job.finish()
    _assert_all_gone(helpers, job.proc.pid)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STOP_AT - 1)
    if sig == signal.SIGTERM:
        out = job.text()
        assert code == 143 and "Traceback" not in out, out
        assert out.splitlines()[-1] == (
            "terminated (SIGTERM); checkpoints already saved are complete (--exit-signal-handler saves one first)"
        ), out
        return
    assert code == -signal.SIGKILL
    # the run that takes the lock over decodes in the rank (no fork server): its workers are not the subject
    args[args.index("--num-workers") + 1] = "0"
    out = pretrain(1, args + ["--load", str(ckpt), "--save", str(ckpt), "--exit-interval", str(STOP_AT)])
    assert (
        f"warning: --save {ckpt}: taking over the lock of pid {job.proc.pid} on host {socket.gethostname()}" in out
    ), out[-3000:]
