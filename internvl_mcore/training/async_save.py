"""--async-save: megatron-core's async torch_dist save, written by one spawned process per rank.

`dist_checkpointing.save(..., async_sharded_save=True)` plans the save (collective) and returns an
`AsyncRequest`: write buckets (file, tensors, bytes) and finalize functions that must run on every
rank once the writes are done (gather the write results, write `.metadata` and metadata.json). The
rank copies the bucket tensors into one shared-memory buffer (the snapshot: a device-to-host copy on
a GPU, a memcpy on the CPU, where megatron-core's preload is a no-op and would hand the live
parameters to the writer while the next steps change them), sends it to its writer process and goes
on training; training/checkpoint.py `finish_pending` agrees over all ranks that every writer is done
and only then finalizes, checksums and publishes (renames tmp_iter_, advances the tracker).

Why not megatron-core's callers (strategies/async_utils.py): `TemporalAsyncCaller` forks the training
process (`mp.get_context('fork')`), which deadlocks once torch's OpenMP pool or CUDA runs (data/workers.py),
and so does `FileSystemWriterAsync.write_preloaded_data_multiproc`, which forks one process per bucket
even from a spawned worker; `PersistentAsyncCaller` (spawn) waits forever when its worker dies (its
blocking poll loops on an empty queue) and its worker dies at the first exception. Here the writer is
spawned (fork + exec: no thread or lock of the rank is copied), writes the buckets itself with
megatron-core's `FileSystemWriterAsync.write_preloaded_data` (the same bytes as a synchronous save),
sends back the write results or the exception, and every wait on it has a deadline.
"""
from __future__ import annotations

import os
import queue
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from ..data.pool import describe_exit, start_ignoring_sigint
from ..data.shards import sha256_file
from .guards import fault_point
from .preemption import child_of_run

_ALIGN = 64  # bytes: every tensor of the snapshot starts aligned, so its dtype view is valid


@dataclass
class Pending:
    """A checkpoint whose tensors are being written: what `checkpoint.finish_pending` needs to finish it."""

    iteration: int
    finish: Callable[[], None]  # collective: finalize, checksums, publish, retention
    abandon: Callable[[list[str]], None]  # collective: remove the partial checkpoint, raise one line
    remove: Callable[[], None]  # this rank alone: remove the partial checkpoint (the run is ending)
    results_queue: Any = None  # megatron-core's queue its finalize reads the write results from
    finalize_fns: list = field(default_factory=list)  # megatron-core's, run on every rank after the writes
    started: float = field(default_factory=time.monotonic)
    reply: Optional[tuple] = None  # (ok, write results | exception) once the writer answered


def _snapshot(buckets: list, buffer: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list, list]:
    """The buckets' tensors copied into one shared-memory buffer (`buffer` when it is large enough:
    the previous save's, whose pages are already mapped, so a save costs a memcpy and no page
    faults); the buckets with each tensor replaced by its index into the layout [(offset, dtype, shape)]."""
    tensors = [t for _, _, (_, tensor_data) in buckets for _, t in tensor_data]
    layout, total = [], 0
    for t in tensors:
        total = -(-total // _ALIGN) * _ALIGN
        layout.append((total, t.dtype, tuple(t.shape)))
        total += t.numel() * t.element_size()
    try:
        flat = buffer if buffer is not None and buffer.numel() >= total else \
            torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, 1)))
    except RuntimeError as exc:  # /dev/shm too small: a write failure with its reason (one line)
        raise OSError(f"--async-save: cannot hold the checkpoint tensors ({total} bytes) in shared memory "
                      f"(/dev/shm): {' '.join(str(exc).split())[:200]}") from None
    for t, view in zip(tensors, _views(flat, layout)):
        view.copy_(t.detach())
    index = iter(range(len(tensors)))
    stripped = [(name, key, (bytes_data, [(item, next(index)) for item, _ in tensor_data]))
                for name, key, (bytes_data, tensor_data) in buckets]
    return flat, layout, stripped


def _views(flat: torch.Tensor, layout: list) -> list[torch.Tensor]:
    out = []
    for offset, dtype, shape in layout:
        numel = 1
        for n in shape:
            numel *= n
        size = numel * torch.empty(0, dtype=dtype).element_size()
        out.append(flat[offset:offset + size].view(dtype).reshape(shape))
    return out


def _write(message: tuple) -> dict:
    """Write one checkpoint's buckets (in the writer process): {"results": {bucket index: its write
    results}, "checksums": {file: [size, sha256]}}. The files are hashed here, while still in the
    page cache, so publishing the checkpoint later hashes only the small files in the training process."""
    iteration, rank, transforms, flat, layout, buckets = message
    tensors = _views(flat, layout)
    results, checksums = {}, {}
    for i, (name, key, (bytes_data, tensor_data)) in enumerate(buckets):
        # each tensor in a storage of its own, as megatron-core's `_clone_if_needed` makes them: torch.save
        # writes a view's whole storage, here the whole snapshot
        bucket = (name, key, (bytes_data, [(item, tensors[k].clone()) for item, k in tensor_data]))
        # the queues megatron-core's per-bucket worker talks to, here in this process (no further workers)
        results_q, count_q = queue.Queue(), queue.Queue()
        count_q.put(i)
        FileSystemWriterAsync.write_preloaded_data(transforms, i, bucket, results_q, count_q, use_fsync=True)
        _, out = results_q.get_nowait()
        if isinstance(out, Exception):
            raise out
        results[i] = out
        del bucket  # its clones
        checksums[key] = [os.path.getsize(name), sha256_file(name)]
    fault_point("save", iteration, rank=rank)  # tensors written, checkpoint not yet finalized or renamed
    return {"results": results, "checksums": checksums}


def _writer_main(conn: Any) -> None:
    """The writer process: one checkpoint in, (True, write results) or (False, exception) out."""
    child_of_run()  # dies with its rank, even a kill -9 of it: no half-written save outlives the run
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the rank handles it
    while (message := conn.recv()) is not None:
        try:
            out = (True, _write(message))
        except Exception as exc:  # reported, not fatal: the rank decides (all ranks together)
            out = (False, exc)
        del message
        try:
            conn.send(out)
        except Exception as exc:  # an exception that does not pickle: its text travels instead
            conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


class AsyncWriter:
    """This rank's writer process and the one checkpoint it may be writing (`pending`).

    `timeout_s` bounds the wait for a write, from the moment it was handed over; past it the save
    fails on every rank with one line (checkpoint.finish_pending)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.proc: Any = None
        self.conn: Any = None
        self.pending: Optional[Pending] = None
        self.buffer: Optional[torch.Tensor] = None  # the snapshot's shared memory, kept for the next save

    def start(self) -> None:
        """Start the writer process now (its imports take seconds; they overlap the first steps)."""
        if self.proc is not None:
            return
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_writer_main, args=(child,), daemon=True, name="checkpoint-writer")
        start_ignoring_sigint(self.proc)
        child.close()

    def submit(self, request: Any, iteration: int, pending: Pending, rank: int) -> None:
        """Hand megatron-core's AsyncRequest to the writer (after a snapshot of its tensors). A rank
        with nothing to write (its tensors are other ranks' replicas) sends an empty one: its writer
        still answers, so every rank's save passes the same points."""
        self.pending = pending
        transforms, buckets = None, []
        if request.async_fn is not None:
            transforms, use_msc = request.async_fn.args
            assert not use_msc, "--async-save writes to a file system, not through multi-storage-client"
            _, buckets, pending.results_queue = request.async_fn_args
        if self.proc is not None and not self.proc.is_alive():  # died while idle (killed for memory?): a new one
            self.stop(abort=True)
        # the buffer is free again: the previous write finished (or its writer was stopped) before this save
        flat, layout, stripped = _snapshot(buckets, self.buffer)
        self.buffer = flat
        self.start()
        self.conn.send((iteration, rank, transforms, flat, layout, stripped))

    def status(self, describe: Callable[[BaseException], Optional[str]] = lambda exc: None) -> Optional[str]:
        """This rank's part of the pending write: None while it runs, '' when done, else why it failed
        (`describe`: the reason of a failed write, checkpoint.write_failure; None: its type and text)."""
        pending = self.pending
        if pending.reply is None and self.conn.poll():
            try:
                pending.reply = self.conn.recv()
            except (EOFError, OSError):
                pass
        if pending.reply is not None:
            ok, out = pending.reply
            return "" if ok else _reason(out, describe)
        if not self.proc.is_alive():
            return f"the checkpoint writer (pid {self.proc.pid}) died ({describe_exit(self.proc)})"
        if time.monotonic() - pending.started > self.timeout_s:
            return (f"the checkpoint writer (pid {self.proc.pid}) did not finish within {self.timeout_s:g} s "
                    "(--distributed-timeout-minutes)")
        return None

    def results(self) -> dict:
        """The pending write's answer (after `status` said done): {"results": ..., "checksums": ...}."""
        return self.pending.reply[1]

    def stop(self, abort: bool = False) -> None:
        """End the writer process: at once (`abort`: its write is abandoned), else after its current write."""
        if self.proc is None:
            return
        if not abort and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=30)
        self.conn.close()
        self.proc = self.conn = self.buffer = None

    def abandon(self) -> None:
        """The run is ending with a save in flight (an error, SIGTERM without --exit-signal-handler):
        stop the writer and remove this rank's part of the unfinished checkpoint; nothing was published."""
        pending, self.pending = self.pending, None
        self.stop(abort=True)
        if pending is not None:
            pending.remove()


def _reason(exc: BaseException, describe: Callable[[BaseException], Optional[str]]) -> str:
    """Why the writer failed, in one line."""
    reason = describe(exc)
    if reason is None:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return f"in the checkpoint writer: {reason}"
