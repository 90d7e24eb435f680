"""Helpers of the reliability suite: pretrain_internvl.py through torchrun or as one plain process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.launch import REPO, free_port

SCRIPT = REPO / "pretrain_internvl.py"
MOCK = ["--model", "debug", "--mock-data", "--seq-length", "128", "--lr", "1e-3", "--seed", "5"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def train_records(path: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in records(path) if "loss" in r}


def valid_records(path: Path) -> list[dict]:
    return [r for r in records(path) if "valid_loss" in r]


def launch(nproc: int, args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun with `nproc` CPU ranks; returns the finished process whatever its exit code. These are
    compute-heavy mock-data runs: OMP_NUM_THREADS=1 keeps ranks from oversubscribing the cores (torchrun
    sets it too when nproc > 1); the runs with a user's unset OMP_NUM_THREADS are `plain` and
    tests/reliability/test_cli_loader.py."""
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
        str(SCRIPT),
        *args,
    ]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def plain(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """One process without torchrun: its stderr is exactly what the user sees."""
    # a user's shell, not this pytest process's: in-process tests of init_distributed leave
    # MASTER_PORT / RANK / WORLD_SIZE behind, with that port still held by this process; and no
    # OMP_NUM_THREADS, which a user's shell does not set either
    clean = {k: v for k, v in os.environ.items() if k not in (*DIST_ENV, "OMP_NUM_THREADS")}
    full_env = {**clean, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def one_rank(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """A 1-rank run where torchrun is not the subject: one plain process (no agent: one interpreter
    fewer, ~2 CPU-s) with torchrun's OMP_NUM_THREADS=1, so the same kernels and bits as `launch(1, ...)`."""
    return plain(args, timeout=timeout, env={"OMP_NUM_THREADS": "1", **(env or {})})


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process failed with `code` and printed exactly one line, no traceback; returns it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (
        proc.returncode,
        proc.stderr[-4000:],
    )
    return lines[0]
