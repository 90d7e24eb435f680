"""Which checkpoint of a --save root is there to take: the finished iter_ directories, the one --load
resumes from (`select`: the latest that verifies, falling back to older ones), whether a root holds
any checkpoint, and --keep-checkpoints' deletion of the older ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from .checksums import verify
from ..errors import CheckpointError
from .format import RUN_INFO, TRACKER, iter_dir, tracked_iteration


def _complete_iterations(root: Path) -> list[int]:
    """Iterations of the finished checkpoints under `root` (run.json present), newest first."""
    its = [int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and (p / RUN_INFO).exists()]
    return sorted(its, reverse=True)


def select(root: str | Path, no_fallback: bool = False) -> Path:
    """The checkpoint directory --load resumes from (collective): the latest if it verifies, else the
    newest older one that does, with a warning naming what failed; with `no_fallback` a failing
    latest checkpoint is an error naming the file."""
    root = Path(root)
    if (root / RUN_INFO).exists():  # one iter_ directory given: exactly that one
        candidates = [root]
    elif root.is_dir() and not (root / TRACKER).exists() and _complete_iterations(root):
        candidates = _untracked(root)
    else:
        latest = tracked_iteration(root)
        candidates = [iter_dir(root, latest)] + [iter_dir(root, i) for i in _complete_iterations(root) if i < latest]
    failed = []
    for path in candidates:
        problem = verify(path) if path.is_dir() else f"{path}: missing"
        if problem is None:
            if failed and dist.get_rank() == 0:
                print(f"warning: {failed[0]}; falling back to the previous complete checkpoint {path}", flush=True)
            return path
        if no_fallback:
            raise CheckpointError(f"{problem} (--no-fallback: not trying an older checkpoint)")
        failed.append(problem)
    raise CheckpointError(f"--load {root}: no usable checkpoint: " + "; ".join(failed))


def _untracked(root: Path) -> list[Path]:
    """A --save root whose tracker is gone (deleted by hand, a copy without it): its complete checkpoints,
    newest first. They are safe to take: an iter_ directory exists only once its save finished (a save
    writes tmp_iter_ and renames it last), and `select` still verifies their checksums."""
    found = [iter_dir(root, i) for i in _complete_iterations(root)]
    if dist.get_rank() == 0:
        print(
            f"warning: --load {root}: no {TRACKER}; taking the newest complete checkpoint {found[0].name} "
            f"(found: {', '.join(p.name for p in found)})",
            flush=True,
        )
    return found


def holds_checkpoint(root: str | Path) -> bool:
    """Whether `root` (a --save root or one iter_ directory) holds any checkpoint, complete or not:
    a tracker, a finished iter_ directory or run.json itself."""
    root = Path(root)
    return (root / RUN_INFO).exists() or (root / TRACKER).exists() or bool(_complete_iterations(root))


def remove_old_checkpoints(root: Path, keep: int) -> None:
    """--keep-checkpoints: delete all but the newest `keep` complete checkpoints (rank 0, after a save)."""
    for iteration in _complete_iterations(root)[keep:]:
        shutil.rmtree(iter_dir(root, iteration), ignore_errors=True)
