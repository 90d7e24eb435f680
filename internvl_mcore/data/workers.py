"""The loader's worker processes: never forked from the training process; one pipe each; every wait has
a deadline.

Why: by the time the first batch is drawn the training process runs torch's OpenMP thread pool (and has
initialized CUDA on a GPU node). A fork copies the pool's state but not its threads, and the child
deadlocks in its first parallel region: with OMP_NUM_THREADS unset, `Tensor.share_memory_` waited in
`gomp_team_barrier_wait_end` forever. Workers come from multiprocessing's forkserver: a fresh
interpreter (started by fork + exec, so it inherits no threads) that imports the modules the workers
need once (`preload`: for the loader, torch and megatron-core's indexed dataset), runs
nothing else, and forks each worker from that clean state in milliseconds. A worker rebuilds its state
from a small picklable argument (the loader reopens the shard mmaps itself: a few milliseconds). The
cost is the server's imports, once per process (seconds; the first `Process.start` waits for them).

Why not ProcessPoolExecutor: it cannot say which worker died or which input it held, and its
`BrokenProcessPool` is a traceback. Here input k of a worker is its k-th result (each worker answers
in order over its own pipe), so a wait knows the worker, its pid and the input it is waiting for:
a worker that dies or does not answer within `timeout_s` becomes a `WorkerError`, one line naming them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from .pool import describe_exit, exit_with_parent, start_ignoring_sigint

_READY = "ready"
STARTUP_MIN_S = 120.0  # a new worker (its fork server importing torch) takes seconds, more on a loaded node


class WorkerError(RuntimeError):
    """A worker died or stalled; the message is one line naming the worker, its pid and its input."""


def _worker_main(conn: Connection, initializer: Callable[[Any], None], initarg: Any, fn: Callable[[Any], Any]) -> None:
    """Initialize, say so, then one input in, one (ok, result or exception) out, until None arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    # A SIGKILLed training rank must not leave its workers behind: its fork server (this process's parent)
    # exits when the rank's end closes its pipe, and then this worker leaves.
    exit_with_parent(os.getppid())
    initializer(initarg)
    conn.send(_READY)
    while (item := conn.recv()) is not None:
        try:
            out = (True, fn(item))
        except Exception as exc:  # the caller re-raises it: a bad pack is reported as without workers
            out = (False, exc)
        try:
            conn.send(out)
        except Exception as exc:  # an unpicklable exception: its text travels instead
            conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


class _Worker:
    def __init__(self, ctx: Any, index: int, args: tuple) -> None:
        self.index = index
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, *args), daemon=True, name=f"loader-worker-{index}")
        start_ignoring_sigint(self.proc)
        child.close()
        self.ready = False
        self.pending: deque[str] = deque()  # what each input in flight is, in order


class WorkerPool:
    """`workers` processes (forked by the fork server) running `fn(item)` after `initializer(initarg)`.

    `submit(w, item, what)` queues an input on worker w; `result(w)` returns w's oldest unanswered
    result (or re-raises the exception `fn` raised on it). `what` describes the input for the errors
    ("pack 3 of shard set P"); `flag` names the setting that bounds the waits: `timeout_s` for each
    result, max(timeout_s, STARTUP_MIN_S) for a worker's start-up."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[[Any], None],
        initarg: Any,
        fn: Callable[[Any], Any],
        timeout_s: float,
        flag: str = "--data-worker-timeout",
        preload: tuple[str, ...] = (),
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"{flag} must be > 0 seconds, got {timeout_s}")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))  # (no effect once this process's fork server runs)
        self.timeout_s, self.flag = float(timeout_s), flag
        self._workers = [_Worker(ctx, i, (initializer, initarg, fn)) for i in range(workers)]

    def submit(self, w: int, item: Any, what: str) -> None:
        worker = self._workers[w]
        try:
            worker.conn.send(item)
        except (BrokenPipeError, OSError):
            pass  # it died: the wait for this input reports how
        worker.pending.append(what)

    def result(self, w: int) -> Any:
        worker = self._workers[w]
        if not worker.ready:
            if self._receive(worker, "start (importing its modules)", max(self.timeout_s, STARTUP_MIN_S)) != _READY:
                raise RuntimeError(f"loader worker {w}: unexpected first message")
            worker.ready = True
        what = worker.pending.popleft()
        ok, value = self._receive(worker, f"return {what}", self.timeout_s)
        if not ok:
            raise value
        return value

    def _receive(self, worker: _Worker, doing: str, timeout_s: float) -> Any:
        """The worker's next message within `timeout_s`, or a WorkerError (all workers stopped)."""
        who = f"loader worker {worker.index} (pid {worker.proc.pid})"
        ready = wait([worker.conn, worker.proc.sentinel], timeout=timeout_s)
        if worker.conn in ready:
            try:
                return worker.conn.recv()
            except (EOFError, OSError):
                pass
        if not ready:
            self.close(terminate=True)
            raise WorkerError(
                f"{self.flag} {self.timeout_s:g}: {who} did not {doing} within {timeout_s:g} s "
                f"and was stopped (stalled; raise {self.flag} if a pack really takes that long)"
            )
        why = describe_exit(worker.proc)
        self.close(terminate=True)
        raise WorkerError(
            f"--num-workers: {who} died ({why}) while the training process waited for it to {doing}; "
            f"if it was killed for memory, use fewer --num-workers or give the job more memory"
        )

    def close(self, terminate: bool = False) -> None:
        """Ask every worker to stop (kill them at once with `terminate`); kill those still alive after 10 s."""
        for w in self._workers:
            try:
                w.proc.kill() if terminate else w.conn.send(None)
            except (BrokenPipeError, OSError, ValueError):
                pass
        for w in self._workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=10)
            w.conn.close()
        self._workers = []
