"""What the flags name that this machine lacks -- a writable --save, --log-jsonl and --tensorboard-dir,
the wandb package -- found before anything heavy runs.

pretrain_internvl.py checks them right after the flags (config/problems.py) and before torch is
imported, so a run that could never save or log is refused in a fraction of a second, not after the
~3 CPU-s of torch and megatron-core imports (or, without the check, at the first save after hours of
training); training/loop.py: validate checks them again in-process (tests and tools call train()).
Nothing here imports torch (tests/reliability/test_cli_errors.py asserts it of these refusals).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from ..config.training import LogConfig, RunConfig


def writable_problem(save: str) -> Optional[str]:
    """Why --save DIR cannot take checkpoints (checked at start-up, before any training), or None."""
    path = Path(save)
    probe = path / f".write_test_{os.uname().nodename}_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return f"--save {save}: cannot write there ({exc.strerror or exc})"
    return None


def output_problems(log: LogConfig) -> list[str]:
    """Why --log-jsonl FILE or --tensorboard-dir DIR cannot be written, one line each (empty: they can).
    Checked at start-up on every rank (training/loop.py: validate): the writer, the last rank, opens
    them only once its model is built. Creates nothing."""
    found = []
    if log.log_jsonl:
        path = Path(log.log_jsonl)
        if path.is_dir():
            found.append(f"--log-jsonl {path} is a directory; give a file (it is appended to)")
        elif not path.parent.is_dir():
            found.append(f"--log-jsonl {path}: the folder {path.parent} does not exist (or is not a directory)")
        elif not os.access(path if path.exists() else path.parent, os.W_OK):
            found.append(f"--log-jsonl {path}: not writable (permission denied)")
    if log.tensorboard_dir:
        path = Path(log.tensorboard_dir)
        existing = next(p for p in (path, *path.parents) if p.exists())  # what makedirs would start from
        if not existing.is_dir():
            found.append(f"--tensorboard-dir {path}: {existing} exists and is not a directory")
        elif not os.access(existing, os.W_OK | os.X_OK):
            found.append(f"--tensorboard-dir {path}: cannot write in {existing} (permission denied)")
    return found


def environment_problems(run: RunConfig) -> list[str]:
    """What the flags name that this machine lacks: a writable --save, --log-jsonl and --tensorboard-dir,
    the wandb package."""
    c, log = run.checkpoint, run.log
    found = []
    if c.save:  # found now, not at the first save after hours of training
        found += [p for p in [writable_problem(c.save)] if p]
    found += output_problems(log)  # --log-jsonl / --tensorboard-dir: before the model is built
    if log.wandb_project and importlib.util.find_spec("wandb") is None:
        found.append("--wandb-project needs the wandb package (pip install wandb; WANDB_MODE=offline needs no network)")
    return found
