"""Start a small gloo world with torchrun from a test, with a hard timeout so a hang fails.

torchrun is for tests whose subject is the CLI or process start-up; worker scripts that only need a
world run as jobs in the session's reused worlds (tests/worldpool.py `run_in_world`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

# the one helper (parallel/ports.py, torch-free): importing this module must not import torch and
# megatron-core (every test session imports it through tests/conftest.py), nor may asking for a port
from internvl_mcore.parallel.ports import PORTS_ENV, free_port

REPO = Path(__file__).resolve().parents[1]


def worker_ports(worker: str | None) -> str:
    """The rendezvous ports of one pytest-xdist worker ("gw0", "gw1", ...; None: no xdist): a block of
    1000 below the kernel's ephemeral range (32768+), disjoint per worker, so a world's gloo connections
    (ephemeral local ports) and the other worker's worlds never take a port free_port just handed out."""
    index = int(worker[2:]) + 1 if worker and worker.startswith("gw") and worker[2:].isdigit() else 0
    lo = 20000 + 1000 * (index % 12)
    return f"{lo}-{lo + 1000}"


# every test session imports this module (tests/conftest.py); the processes it starts inherit the block
os.environ.setdefault(PORTS_ENV, worker_ports(os.environ.get("PYTEST_XDIST_WORKER")))


def torchrun(
    script: str | Path, nproc: int, args: list[str], timeout: float = 300.0, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` local CPU processes; raise with the output if it fails or hangs."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = run_ending_group(cmd, env=full_env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def run_ending_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd)` in its own session, output captured; past `timeout` the whole session is
    killed (torchrun's agent and its ranks, their loader workers) and AssertionError carries the
    output: killing only the agent left its ranks running, and burning CPU, for the rest of the suite."""
    with subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(cmd)} hung for {timeout}s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def recording_calls(owner: object, name: str, record: Callable[..., None]) -> Iterator[None]:
    """While inside, `owner.name(...)` first hands its arguments to `record`, then runs as before
    (workers use it to see which code path a training run took)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        record(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, original)
