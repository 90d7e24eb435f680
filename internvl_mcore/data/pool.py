"""A process pool that survives workers that die (segfault, out-of-memory kill), for preprocessing.

multiprocessing.Pool loses the task of a worker that dies and waits for its result forever. Here each
worker gets one input at a time over its own pipe, so the parent always knows which input a worker
holds: a dead worker is replaced, its input retried in a fresh worker, and after `retries` retries the
caller's `on_death(item, attempts, why)` result stands in for it. A worker that holds one input longer
than `timeout_s` counts as dead (it is killed: a decoder stuck on one file must not stall the run
forever). Results come back in input order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter, deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator

RECORD_TIMEOUT_S = 600.0  # one record's processing; minutes even for a long video
_SIGNALS = {9: "SIGKILL, e.g. the out-of-memory killer", 11: "SIGSEGV, a segmentation fault", 6: "SIGABRT"}


def exit_with_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    """In a worker process: leave as soon as `parent_pid` is gone. A parent killed by SIGKILL (the
    out-of-memory killer, torchrun ending a job) runs no clean-up, and its forked workers, which hold
    copies of the job's output pipes, would otherwise wait for work forever, keeping the job's output open.
    Workers forked by a fork server pass its pid: the server leaves when the process that started it is
    gone, and the worker follows."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def describe_exit(proc: Any) -> str:
    """How a (dead) multiprocessing.Process ended, in words."""
    proc.join(timeout=5)
    code = proc.exitcode
    if code is not None and code < 0:
        return f"killed by {_SIGNALS.get(-code, f'signal {-code}')}"
    return f"exit code {code}"


def _worker_main(conn: Connection, initializer: Callable[[Any], None], initarg: Any, fn: Callable[[Any], Any]) -> None:
    """One input in, one result out, until None arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent handles it
    exit_with_parent(os.getppid())  # the fork server, which leaves when the pool's process is gone
    initializer(initarg)
    while (item := conn.recv()) is not None:
        conn.send(fn(item))


def start_ignoring_sigint(proc: Any) -> None:
    """Start worker process `proc` with SIGINT ignored. Ctrl-C reaches the whole process group: the
    parent handles it (and stops its workers); a worker that inherits SIG_IGN (also across the fork
    server's fork) prints no traceback of its own."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # only the main thread may
    try:
        proc.start()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


class _Worker:
    def __init__(self, pool: "SupervisedPool"):
        self.conn, child = pool._mp.Pipe()
        self.proc = pool._mp.Process(target=_worker_main, args=(child, *pool._worker_args), daemon=True)
        start_ignoring_sigint(self.proc)
        child.close()
        self.seq: int | None = None  # the input this worker holds
        self.since = 0.0  # when it got it (time.monotonic)
        self.stalled: str | None = None  # why it was killed, when for holding its input too long

    def death(self) -> str:
        """How the worker ended, in words."""
        return self.stalled or describe_exit(self.proc)


class SupervisedPool:
    """`workers` processes running `fn` on inputs after `initializer(initarg)`; see the module docstring.

    Workers come from multiprocessing's fork server, never from a fork of the calling process: that
    process may run threads (torch's OpenMP pool, a tokenizer's) whose locks a fork copies without
    their owners, and the child then deadlocks (data/workers.py). The server imports `preload`
    once (megatron-core's import alone takes seconds), so a worker, also a replacement, starts in
    milliseconds; `initarg` is pickled to each worker."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[[Any], None],
        initarg: Any,
        fn: Callable[[Any], Any],
        on_death: Callable[[Any, int, str], Any],
        retries: int = 1,
        preload: tuple[str, ...] = (),
        timeout_s: float = RECORD_TIMEOUT_S,
    ):
        self._mp = mp.get_context("forkserver")
        self._mp.set_forkserver_preload(list(preload))  # (no effect once this process's fork server runs)
        self._worker_args = (initializer, initarg, fn)
        self._on_death, self._retries, self._timeout_s = on_death, retries, timeout_s
        self._workers = [_Worker(self) for _ in range(workers)]
        self._items: dict[int, Any] = {}
        self._attempts: Counter[int] = Counter()
        self._todo: deque[int] = deque()
        self._done: dict[int, Any] = {}

    def imap(self, items: Iterator, window: int) -> Iterator:
        """`fn(item)` for every item, in input order, with at most `window` inputs in flight (a parquet
        row carries its image bytes: reading ahead of the workers must not pull the dataset into memory)."""
        items, seq_in, seq_out, exhausted = iter(items), 0, 0, False
        while not (exhausted and seq_out == seq_in):
            while not exhausted and seq_in - seq_out < window:
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                self._items[seq_in] = item
                self._todo.append(seq_in)
                seq_in += 1
            if seq_out in self._done:
                self._items.pop(seq_out)
                yield self._done.pop(seq_out)
                seq_out += 1
            elif seq_out < seq_in:
                self._dispatch()
                self._collect()

    def _dispatch(self) -> None:
        for i, w in enumerate(self._workers):
            if w.seq is None and self._todo:
                seq = self._todo.popleft()
                try:
                    w.conn.send(self._items[seq])
                    w.seq, w.since = seq, time.monotonic()
                except (BrokenPipeError, OSError):  # died while idle: the input was never its own
                    self._todo.appendleft(seq)
                    w.proc.join(timeout=5)
                    w.conn.close()
                    self._workers[i] = _Worker(self)

    def _collect(self) -> None:
        """Wait until some busy worker answers or dies; take its result or replace it."""
        busy = [w for w in self._workers if w.seq is not None]
        if not busy:
            return
        left = min(w.since for w in busy) + self._timeout_s - time.monotonic()
        ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=max(left, 0.0)))
        for w in busy:
            if w.conn not in ready and w.proc.sentinel not in ready:
                if time.monotonic() - w.since >= self._timeout_s:  # stalled: counts as dead
                    w.stalled = f"no result within {self._timeout_s:g} s, killed"
                    w.proc.kill()
                    w.proc.join(timeout=5)
                    self._replace(w)
                continue
            try:
                if w.conn.poll():
                    self._done[w.seq] = w.conn.recv()  # type: ignore[index]
                    w.seq = None
                    continue
            except (EOFError, OSError):
                pass
            if not w.proc.is_alive():
                self._replace(w)

    def _replace(self, w: _Worker) -> None:
        seq, why = w.seq, w.death()
        assert seq is not None
        self._attempts[seq] += 1
        if self._attempts[seq] > self._retries:
            self._done[seq] = self._on_death(self._items[seq], self._attempts[seq], why)
        else:
            self._todo.appendleft(seq)
        self._workers[self._workers.index(w)] = _Worker(self)
        w.conn.close()

    def close(self, terminate: bool = False) -> None:
        """Ask every worker to stop; kill those that do not within 10 s. `terminate` (after an error or
        Ctrl-C): kill them at once, dropping the inputs they hold."""
        for w in self._workers:
            try:
                w.conn.send(None) if not terminate else w.proc.terminate()
            except (BrokenPipeError, OSError):
                pass
        for w in self._workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
            w.conn.close()
