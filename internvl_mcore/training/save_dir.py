"""Who may write checkpoints into --save: one run at a time, and not over another run's checkpoints.

    SAVE/.internvl_mcore.lock     {"host", "pid", "since"} of the run that holds SAVE, flock'ed while it runs

Rank 0 of a run takes the lock at start-up, before any training, and holds it until the run ends
(the kernel drops the flock when the process dies, whatever kills it). A second run into the same
--save is refused with one line naming the holder (host, pid, since when). A lock file left by a
run that was killed (kill -9: the file stays, the flock is gone) names a pid that no longer runs on
this host: it is taken over with a warning. One written on another host whose flock is free cannot
be checked from here and is refused (the line says to delete the file once that run is over).

A --save that already holds checkpoints (iter_* directories or the `latest` pointer) is refused
unless the run resumes from it (--load is that directory or a checkpoint inside it) or
--overwrite-checkpoints is given, which deletes the old checkpoints first: without the refusal a new
run would replace the old run's iteration 2 and rewind the pointer from its iteration 4 to 2.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from ..checkpoint.format import TRACKER
from ..errors import SaveDirRefused

LOCK_NAME = ".internvl_mcore.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read_holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw) if raw.strip() else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process (no details in the lock file)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"


class SaveLock:
    """The flock'ed lock file of one --save directory, held by this process until `release`."""

    def __init__(self, save: str) -> None:
        self.path = Path(save) / LOCK_NAME
        self.fd: Optional[int] = None
        self.warning: Optional[str] = None  # set when a dead run's lock was taken over

    def acquire(self) -> None:
        """Take the lock or raise SaveDirRefused naming its holder."""
        for _ in range(10):  # the holder may unlink the file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise SaveDirRefused(
                    f"--save {self.path.parent} is in use by another run: {_describe(holder)} "
                    f"(lock {self.path}); give another --save or wait for that run"
                ) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        else:
            raise SaveDirRefused(f"--save {self.path.parent}: could not take the lock {self.path}")
        self.fd = fd
        try:
            self._check_left_over(_read_holder(fd))
        except SaveDirRefused:
            self.release(unlink=False)
            raise
        stamp = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(stamp).encode())
        os.fsync(fd)

    def _check_left_over(self, holder: Optional[dict]) -> None:
        """The flock is free, but a lock file that names a process means its run ended without
        releasing it (killed), or the flock does not reach across hosts on this file system."""
        if not holder:
            return
        if holder.get("host") != socket.gethostname():
            raise SaveDirRefused(
                f"--save {self.path.parent} is locked by {_describe(holder)}, which cannot be "
                f"checked from this host; if that run is over, delete {self.path}"
            )
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            raise SaveDirRefused(
                f"--save {self.path.parent} is locked by {_describe(holder)}, which is still "
                f"running; if it is no training run (a reused pid), delete {self.path}"
            )
        self.warning = (
            f"warning: --save {self.path.parent}: taking over the lock of {_describe(holder)}, "
            "which is no longer running (killed?)"
        )

    def release(self, unlink: bool = True) -> None:
        """Give the lock up (the file goes first, so a waiting run never takes a stale inode)."""
        if self.fd is None:
            return
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = None


def old_checkpoints(save: str) -> list[str]:
    """Names of the checkpoints (and the `latest` pointer) already under --save."""
    root = Path(save)
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("iter_") and p.is_dir())
    return names + ([TRACKER] if (root / TRACKER).exists() else [])


def _resumes_from(save: str, load: Optional[str]) -> bool:
    """--load is --save or a checkpoint inside it: the run continues the checkpoints there."""
    if not load:
        return False
    root, chosen = Path(save).resolve(), Path(load).resolve()
    return chosen == root or root in chosen.parents


_HELD: list[SaveLock] = []  # the locks this process holds (one per --save it trains into)


def _held(save: str) -> Optional[SaveLock]:
    """The lock this process already holds on `save` (a second trainer set up in the same process)."""
    return next((lock for lock in _HELD if lock.path.parent.resolve() == Path(save).resolve()), None)


def release_all() -> None:
    """Give up every lock this process holds (a run's end, however it ends)."""
    while _HELD:
        _HELD.pop().release()


def claim(save: str, load: Optional[str], overwrite: bool) -> list[str]:
    """Lock --save for this process (rank 0, at start-up; kept until `release_all`) and check what it
    holds. Returns the lines to print (a taken-over lock, deleted checkpoints); raises SaveDirRefused."""
    lock = _held(save)
    if lock is None:
        lock = SaveLock(save)
        lock.acquire()
        if not _HELD:  # a process that set a trainer up without train() (tests, tools) lets go at exit too
            atexit.register(release_all)
        _HELD.append(lock)
    notes = [lock.warning] if lock.warning else []
    lock.warning = None
    old = [] if _resumes_from(save, load) else old_checkpoints(save)
    if old and not overwrite:
        _HELD.remove(lock)
        lock.release()
        shown = ", ".join(old[:4]) + (f", ... ({len(old)} in all)" if len(old) > 4 else "")
        raise SaveDirRefused(
            f"--save {save} holds another run's checkpoints ({shown}): resume with --load {save}, "
            "give an empty --save, or pass --overwrite-checkpoints to delete them"
        )
    if old:
        for name in old:
            path = Path(save) / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        notes.append(
            f"--overwrite-checkpoints: deleted {len(old)} checkpoint file(s) of an earlier run from {save} "
            f"({', '.join(old)})"
        )
    return notes
