"""Running the real command-line tools on careless input and checking how they fail.

`run(tool, *args)` starts `python TOOL ARGS` in a subprocess (hard timeout) and `assert_user_error`
checks the contract of docs/errors.md: exit code 2, exactly one line on stderr that names the file or
flag, no Python traceback. The session-scoped fixtures of the inputs the tests share (a tokenizer +
digits meta, a good shard set) are in tests/reliability/conftest.py.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.reliability.common import DIST_ENV

REPO = Path(__file__).resolve().parents[2]
TOOLS = {
    name: REPO / "tools" / f"{name}.py"
    for name in ("preprocess_mm_data", "convert_to_hf", "convert_from_hf", "plan", "inspect_shards")
}
TOOLS["pretrain"] = REPO / "pretrain_internvl.py"
SEQ = 256  # tokens per pack of the shared shard set (debug model, 56-px tiles, 4 tokens per tile)


def cli(tool: str, *args: str) -> list[str]:
    return [sys.executable, str(TOOLS[tool]), *map(str, args)]


def env(**overrides: str) -> dict:
    """A user's shell: without the distributed variables in-process tests leave in this process
    (their MASTER_PORT is still held by it), without OMP_NUM_THREADS, which a user's shell does not set
    (scripts/test.sh sets it for the compute-heavy tests): a run with torch's default thread pool once
    hung here where OMP_NUM_THREADS=1 hid it; and without PYTHONWARNINGS (scripts/test.sh sets it to
    ignore): the tools' stderr is checked with the warnings a user sees. `overrides` add or replace variables."""
    drop = (*DIST_ENV, "OMP_NUM_THREADS", "PYTHONWARNINGS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **overrides}


def run(
    tool: str, *args: str, timeout: float = 180, prefix: tuple[str, ...] = (), environ: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a tool to completion (stdout/stderr captured) in `environ` (default `env()`); a hang fails the test."""
    cmd = [*prefix, *cli(tool, *args)]
    try:
        return subprocess.run(
            cmd, cwd=REPO, env=env() if environ is None else environ, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout}s") from exc


def in_process(tool: str, *args: str) -> int:
    """tools/TOOL.py's `main(args)` in this process (the same code as `run`, without an interpreter start
    and its imports: ~3 CPU-s): for runs that only make a test's input, where the launch is not the
    subject. Returns the exit code."""
    import importlib

    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module(tool).main([str(a) for a in args])


HEAVY = ("torch", "megatron", "transformers", "numpy")
# what a data tool's checks of its inputs need not import (they read manifests, meta files and tokens
# with numpy): pretrain's --data-path checks, preprocess_mm_data's meta, annotation and tokenizer checks
NO_TORCH = ("torch", "megatron", "transformers")


def run_light(
    tool: str, *args: str, timeout: float = 120, heavy: tuple[str, ...] = HEAVY
) -> subprocess.CompletedProcess:
    """`run` with Python's import-time report on (PYTHONPROFILEIMPORTTIME): asserts the tool imported
    none of `heavy` (a flag error costs an interpreter start, ~0.1 CPU-s, not torch's ~2-3), and returns
    the process with that report taken out of its stderr, so the stderr checked is what the user sees."""
    proc = run(tool, *args, timeout=timeout, environ=env(PYTHONPROFILEIMPORTTIME="1"))
    report = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in report[1:]}  # [0]: the header
    assert report and not imported & set(heavy), (tool, args, sorted(imported & set(heavy)))
    proc.stderr = "".join(line + "\n" for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code`, one stderr line containing every needle (file names, flags, line numbers), no
    traceback. Returns the line."""
    lines = error_lines(proc)
    detail = f"exit {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == code, detail
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, detail
    assert len(lines) == 1, detail
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def interrupt_when(
    tool: str, *args: str, fault: str, sig: int = signal.SIGINT, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Start a tool with INTERNVL_MCORE_FAULT=`fault` (a known point where it prints `...: waiting for
    a signal` and waits: internvl_mcore/faults.py), send `sig` to its process group once that line is
    on its stdout, and wait for it. No sleep decides when the signal comes."""
    with tempfile.TemporaryFile("w+") as out_file:
        # SIGINT at its default, as a terminal starts a program: a suite run in the background of a
        # non-interactive shell (`.ci/run &`) ignores SIGINT, and an ignored SIGINT is inherited
        proc = subprocess.Popen(
            cli(tool, *args),
            cwd=REPO,
            env={**env(), "INTERNVL_MCORE_FAULT": fault},
            stdout=out_file,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                out_file.seek(0)
                if "waiting for a signal" in out_file.read():
                    break
                assert proc.poll() is None, f"{tool} ended (exit {proc.returncode}) before it reached {fault}"
                assert time.monotonic() < deadline, f"{tool} did not reach {fault} in {timeout}s"
                time.sleep(0.05)
            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: the whole process group (workers too)
            _, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out_file.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out_file.read(), err)


def snapshot(prefix: str | Path) -> Path:
    """Copy every file of an output prefix aside (to compare after a failed run)."""
    prefix = Path(prefix)
    keep = prefix.parent.parent / f"{prefix.parent.name}-snapshot"
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir()
    for p in prefix.parent.iterdir():
        if p.is_file() and p.name.startswith(prefix.name):
            shutil.copy2(p, keep / p.name)
    return keep


def assert_unchanged(prefix: str | Path, snap: Path) -> None:
    """The prefix's files are exactly the snapshot's (same names, same bytes) and nothing was staged."""
    prefix = Path(prefix)
    now = sorted(p.name for p in prefix.parent.iterdir() if p.name.startswith(prefix.name))
    assert now == sorted(p.name for p in snap.iterdir()), now
    for name in now:
        assert filecmp.cmp(prefix.parent / name, snap / name, shallow=False), name
    staged = [p.name for p in prefix.parent.iterdir() if ".staging-" in p.name]
    assert not staged, staged


def preprocess_args(meta: str, tokenizer: str, out: str | Path, *extra: str) -> list[str]:
    return [
        "--meta",
        meta,
        "--tokenizer",
        tokenizer,
        "--output-prefix",
        str(out),
        "--seq-length",
        str(SEQ),
        "--model",
        "debug",
        "--workers",
        "1",
        "--no-progress",
        *extra,
    ]


def copy_prefix(prefix: str, dst_dir: Path, name: str = "x") -> str:
    """The shard set's files under another folder and prefix name (manifest names stay the original)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    src = Path(prefix)
    for p in src.parent.iterdir():
        if p.is_file() and p.name.startswith(src.name):
            shutil.copy2(p, dst_dir / (name + p.name[len(src.name) :]))
    return str(dst_dir / name)
