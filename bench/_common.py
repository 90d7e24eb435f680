"""Helpers shared by the checkpoint benches (bench/convert.py, bench/checkpoint.py): a timed child
process with its peak memory, `cp -r` baselines, and a random-weight HF checkpoint writer.

The orchestrating process imports no torch and stays small: wait4's peak RSS of a child counts what
the child inherited at fork time, and the parent's memory would blur a converter's measured peak.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@dataclass
class Child:
    """One finished child command: its wall time, memory and output lines."""

    cmd: list[str]
    rc: int
    wall: float
    peak_rss: int
    """Bytes: the largest resident set of any one process of the command (wait4's ru_maxrss: the
    child and every descendant it waited for, e.g. each torchrun rank)."""
    tree_rss: int
    """Bytes: the largest sum of the proportional set sizes (resident memory, shared pages counted
    once) of it and all its descendants, sampled every 0.5 s (a short spike between samples is missed)."""
    lines: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since the start, line) of stdout and stderr, stamped as they arrived."""
    killed: Optional[str] = None
    """Why the bench stopped it (memory guard, deadline), or None."""
    cpu_s: float = 0.0
    """CPU seconds (user + system) of it and every descendant it waited for (wait4's rusage): on a
    shared machine a steadier figure than the wall time."""
    load: float = 0.0
    """The 1-minute load average when it started."""

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def failure(self, last: int = 6) -> Optional[str]:
        """None when it succeeded, else a short reason with its last lines of output."""
        if self.rc == 0 and self.killed is None:
            return None
        said = [line for _, line in self.lines if line.strip() and not line.startswith(("W1", "I1"))]
        # a rank's own error line, not the launcher's summary that follows it
        errors = [
            line
            for line in said
            if re.search(r"^error:|Error\b|Exception\b|^Killed", line)
            and "ChildFailedError" not in line
            and "elastic" not in line
        ]
        return f"{self.killed or f'exit {self.rc}'}: " + " | ".join((errors or said)[-last:])

    def stamps(self, pattern: str) -> dict[int, float]:
        """{the number the pattern's first group matched: seconds when that line arrived}."""
        found = {}
        for t, line in self.lines:
            m = re.search(pattern, line)
            if m:
                found.setdefault(int(m.group(1)), t)
        return found


def _tree(root: int, page: int = os.sysconf("SC_PAGE_SIZE")) -> dict[int, int]:
    """{pid: resident bytes (PSS)} of process `root` and all its descendants (by parent links: torchrun
    starts each rank in a session of its own, so a process group or session would miss them)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                after = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        children.setdefault(int(after[1]), []).append(int(pid))  # fields 4 (ppid) and 24 (rss, pages) of proc(5)
        rss[int(pid)] = int(after[21]) * page
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = _pss(pid, rss.get(pid, 0))
        todo += children.get(pid, [])
    return tree


def _pss(pid: int, rss: int) -> int:
    """Proportional set size of `pid` (its private pages plus its share of pages shared with other
    processes, such as torch's libraries), so that a sum over processes counts each page once;
    its RSS where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss


def run_child(
    cmd: list[str],
    label: str = "",
    env: Optional[dict] = None,
    mem_limit: Optional[int] = None,
    deadline_s: float = 3600.0,
    heartbeat_s: float = 30.0,
    cwd: Path = REPO,
) -> Child:
    """Run `cmd` to completion, measuring it; every `heartbeat_s` a progress line (the last line the
    child printed) goes to stdout. A child whose processes together exceed `mem_limit` bytes, or that
    runs past `deadline_s`, is killed (it and every process it started) and reported as such."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    child = Child(cmd, -1, 0.0, 0, 0, load=os.getloadavg()[0])

    def read() -> None:
        for raw in proc.stdout:
            child.lines.append((time.perf_counter() - start, raw.decode(errors="replace").rstrip()))

    def watch(done: threading.Event) -> None:
        beat = start
        while not done.wait(0.5):
            tree = _tree(proc.pid)
            child.tree_rss = max(child.tree_rss, sum(tree.values()))
            now = time.perf_counter()
            reason = None
            if mem_limit is not None and child.tree_rss > mem_limit:
                reason = (
                    f"killed by the bench: its processes held {child.tree_rss / GIB:.1f} GiB > {mem_limit / GIB:.1f}"
                )
            elif now - start > deadline_s:
                reason = f"killed by the bench: still running after {deadline_s:.0f}s"
            if reason and child.killed is None:
                child.killed = reason
                for pid in tree:  # our child and the processes it started, by id
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if heartbeat_s and now - beat >= heartbeat_s:
                beat = now
                last = next((line for _, line in reversed(child.lines) if line.strip()), "")
                print(
                    f"    ... {label or cmd[0]}: {now - start:.0f}s, {child.tree_rss / GIB:.1f} GiB; {last[:100]}",
                    flush=True,
                )

    done = threading.Event()
    reader, watcher = (
        threading.Thread(target=read, daemon=True),
        threading.Thread(target=watch, args=(done,), daemon=True),
    )
    reader.start()
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = child.rc = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    child.wall = time.perf_counter() - start
    done.set()
    reader.join(timeout=30)
    watcher.join(timeout=30)
    child.peak_rss = usage.ru_maxrss * 1024
    child.cpu_s = usage.ru_utime + usage.ru_stime
    return child


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def cp_time(src: Path, dst: Path) -> float:
    """Seconds `cp -r src dst` takes (the copy is removed afterwards): the floor any tool that reads
    and writes the same bytes is measured against."""
    return cp_run(src, dst).wall


def cp_run(src: Path, dst: Path) -> Child:
    """`cp -r src dst`, measured (wall, CPU seconds, load average); the copy is removed afterwards."""
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    child = run_child(["cp", "-r", str(src), str(dst)], heartbeat_s=0)
    shutil.rmtree(dst, ignore_errors=True)
    if child.failure():
        raise RuntimeError(f"cp -r {src}: {child.failure()}")
    return child


def make_random_hf_dir(cfg, out: str, fmt: str, dtype_name: str, max_shard_size: str) -> int:
    """Write a random-weight HF checkpoint of model `cfg` in layout `fmt` (run it in a child process:
    it imports torch). Tensors are made one at a time, seeded by name. Returns the parameter count."""
    import torch

    from internvl_mcore.checkpoint.safetensors_io import parse_size, write_hf_dir
    from internvl_mcore.convert.hf import canonical_to_hf, hf_plan
    from internvl_mcore.convert.hf_config import hf_config_for
    from internvl_mcore.convert.keymaps import canonical_names, canonical_shapes

    shapes = canonical_shapes(cfg)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]

    class RandomCanonical(Mapping):
        """Random canonical tensors made on access (never all in memory at once)."""

        def __getitem__(self, name: str) -> torch.Tensor:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            return torch.empty(shapes[name], dtype=dtype).uniform_(-0.03, 0.03, generator=g)

        def __iter__(self) -> Iterator[str]:
            return iter(canonical_names(cfg))

        def __len__(self) -> int:
            return len(canonical_names(cfg))

        def shape(self, name: str) -> tuple[int, ...]:  # the shapes without making the tensors
            return tuple(shapes[name])

    src = RandomCanonical()
    write_hf_dir(
        out,
        canonical_to_hf(src, cfg, fmt, dtype),
        hf_config_for(cfg, fmt, dtype),
        hf_plan(src, cfg, fmt, dtype),
        parse_size(max_shard_size),
    )
    return sum(
        math.prod(s)
        for k, s in shapes.items()
        if not (cfg.llm.tie_word_embeddings and k == "language_model.output_layer.weight")
    )
