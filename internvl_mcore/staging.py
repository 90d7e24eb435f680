"""Outputs that appear complete or not at all: write beside the target, rename into place on success.

    with staged_prefix("out/data") as stage:    # str(stage) = "out/.data.staging-<pid>/data"
        write_shards(str(stage))                # every file named str(stage) + suffix
    # out/data_*.bin, out/data.manifest.json ... replaced only now; on an exception or Ctrl-C
    # nothing under out/data* was touched and the staging folder is gone.

    with staged_dir("export", clear=HF_EXPORT_FILES) as stage:   # str(stage) = ".export.staging-<pid>"
        write_checkpoint(str(stage))
    # export/ holds the new files; with `clear`, our stale files from an older export are removed
    # first (a stale `model.safetensors.index.json` beside a new single `model.safetensors` would
    # be read instead of it).

The staging folder is a sibling of the target, so every rename stays on one file system (atomic
per file). A prefix's manifest is removed first and renamed in last: while the files are being
swapped (microseconds) a reader finds no manifest and refuses the prefix instead of reading a mix.
A run killed with SIGKILL leaves its `.NAME.staging-PID` folder behind (never a target file); the
next run into the same target removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .cli_errors import user_path
from .errors import ConfigError

# What tools/convert_to_hf.py writes (weights, index, config, PEFT adapter): removed from an existing
# export directory under --overwrite before the new files move in. Anything else there is kept.
HF_EXPORT_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "adapter_config.json")
# What tools/convert_from_hf.py writes (internvl_mcore/checkpoint/canonical.py: save_canonical).
CANONICAL_FILES = ("*.safetensors", "*.safetensors.index.json", "model_config.json")

_STAGING = ".staging-"


def _staging_path(target: Path) -> Path:
    return target.parent / f".{target.name}{_STAGING}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(target: str | os.PathLike) -> list[str]:
    """Delete `.NAME.staging-PID` folders beside `target` left by runs that no longer exist."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.glob(f".{glob_escape(target.name)}{_STAGING}*"):
        pid = p.name.rsplit(_STAGING, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Refuse early, naming the flag, when `path` (a folder to create files in) cannot be written.

    Creates the folder (and parents) if needed; probes with a real file because os.access says yes
    to root on read-only mounts and to everyone on some network file systems."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what}: {path} exists and is not a directory") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot create directory {path} ({e.strerror})") from None
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what}: directory {path} is not writable ({e.strerror})") from None


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Stage:
    """What a `staged_*` context yields: the temporary location and an explicit commit/abort."""

    def __init__(self, path: Path, target: Path, commit_fn) -> None:
        self.path, self.target, self._commit_fn = path, target, commit_fn
        self.done = False

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def commit(self) -> None:
        """Move the staged files into place (idempotent). Ctrl-C is held off for the few renames:
        the run is complete by then, and an interrupt between two renames would mix the sets."""
        if not self.done:
            with _no_sigint():
                self._commit_fn()
            self.done = True

    def abort(self) -> None:
        """Drop the staged files; the target stays as it was."""
        self.done = True


def _prefix_files(stage_dir: Path, name: str) -> list[Path]:
    return sorted(p for p in stage_dir.iterdir() if p.name.startswith(name) and p.is_file())


def _commit_prefix(stage_dir: Path, target: Path) -> None:
    files = _prefix_files(stage_dir, target.name)
    manifests = [p for p in files if p.name.endswith(".manifest.json")]
    for m in manifests:  # the old set stops looking complete before any of its files changes
        with contextlib.suppress(FileNotFoundError):
            os.remove(target.parent / m.name)
    for p in files:
        if p not in manifests:
            os.replace(p, target.parent / p.name)
    for m in manifests:
        os.replace(m, target.parent / m.name)


@contextlib.contextmanager
def staged_prefix(prefix: str | os.PathLike, commit_on_exit: bool = True) -> Iterator[_Stage]:
    """Write the files of output prefix DIR/NAME under a staging folder; rename them to DIR/NAME*
    on a clean exit (or `stage.commit()`), delete them on any exception, Ctrl-C included.

    `stage.abort()` keeps the target as it was even on a clean exit (e.g. a run over its reject
    limit); files the caller wants to keep must be moved out of `stage.path`'s folder first."""
    target = Path(os.path.abspath(prefix))
    remove_stale_staging(target)
    stage_dir = _staging_path(target)
    shutil.rmtree(stage_dir, ignore_errors=True)
    with user_path(ConfigError):  # beside the output the user named: a read-only or missing parent
        stage_dir.mkdir(parents=True)
    stage = _Stage(stage_dir / target.name, target, lambda: _commit_prefix(stage_dir, target))
    try:
        yield stage
        if commit_on_exit:
            stage.commit()
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)


def clear_files(directory: Path, patterns: Iterable[str]) -> list[str]:
    """Remove the top-level files of `directory` that match `patterns` (never folders)."""
    removed = []
    for p in sorted(directory.iterdir()):
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns):
            p.unlink()
            removed.append(p.name)
    return removed


def _commit_dir(stage_dir: Path, target: Path, clear: Iterable[str]) -> None:
    if not target.exists():
        os.replace(stage_dir, target)
        return
    clear_files(target, clear)
    for p in sorted(stage_dir.iterdir()):
        dst = target / p.name
        if p.is_dir() and dst.is_dir():
            shutil.rmtree(dst)
        os.replace(p, dst)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, clear: Iterable[str] = ()) -> Iterator[_Stage]:
    """Write an output directory under a sibling staging folder, move it into place on a clean exit.

    A new target is one rename. An existing one first loses its files matching `clear` (our own
    file kinds from an older run), then receives the new files; other files in it are kept."""
    target = Path(os.path.abspath(target))
    remove_stale_staging(target)
    stage_dir = _staging_path(target)
    shutil.rmtree(stage_dir, ignore_errors=True)
    with user_path(ConfigError):  # beside the output the user named: a read-only or missing parent
        stage_dir.mkdir(parents=True)
    stage = _Stage(stage_dir, target, lambda: _commit_dir(stage_dir, target, tuple(clear)))
    try:
        yield stage
        stage.commit()
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)


def is_inside(path: str | os.PathLike, other: str | os.PathLike) -> bool:
    """Whether `path` is `other` or somewhere below it (symlinks resolved)."""
    a, b = Path(path).resolve(), Path(other).resolve()
    return a == b or b in a.parents


def non_empty_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.iterdir())
