"""--async-save: megatron-core's async torch_dist save, written by one spawned process per rank.

`dist_checkpointing.save(..., async_sharded_save=True)` plans the save (collective) and returns an
`AsyncRequest`: write buckets (file, tensors, bytes) and finalize functions that must run on every
rank once the writes are done (gather the write results, write `.metadata` and metadata.json). The
bucket tensors are copied into one shared-memory buffer (the snapshot: a device-to-host copy on a
GPU, a memcpy on the CPU, where megatron-core's preload is a no-op and would hand the live
parameters to the writer while the next steps change them) and sent to the rank's writer process;
training/checkpoint.py `finish_pending` agrees over all ranks that every writer is done and only
then finalizes, checksums and publishes (renames tmp_iter_, advances the tracker).

What a save stalls training for is kept small (issue 24; docs/checkpoints.md, "async-save stall"):
- the writer process is started with the run, not at the first save, and megatron-core's results
  queue is an in-process one (`_in_process_results_queue`: no Manager process spawned mid-save);
- the snapshot buffer and megatron-core's save strategy live as long as the run: the buffer's pages
  are mapped once, the strategy caches the save plan and global metadata (Megatron-LM's
  --ckpt-assume-constant-structure: the structure never changes within a run), and the sharding is
  validated at the first save only;
- the snapshot copy runs in a thread while the next step's forward and backward compute, which
  only read the parameters and optimizer state; the loop joins it (with the save's deadline) before
  the optimizer step, the first thing that changes them.
- the snapshot is the only copy: megatron-core's in-step clone of every CPU view (`_WriterKeepingViews`)
  and the writer's clone of every tensor before `torch.save` (`_own_storages`) are not made, and the
  first save's buffer is mapped by the copy thread (docs/checkpoints.md, "Async-save at 1b").
- the first save's plan serves every later save of the same structure (`AsyncWriter.plan_for`;
  megatron-core plans the second save again to validate its cache), and a finished save is published
  with one gather to rank 0 and one agreement (checkpoint.finish_pending), not megatron-core's
  finalize functions (a gather, a broadcast, a barrier) followed by our phases: every round trip of
  all ranks is time in a training step (docs/checkpoints.md, "the round trips of every rank").

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

import gc
import math
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

from ..errors import CheckpointError
from ..data.pool import describe_exit, start_ignoring_sigint
from ..data.shards import sha256_file
from .guards import fault_point
from .preemption import child_of_run

_ALIGN = 64  # bytes: every tensor of the snapshot starts aligned, so its dtype view is valid
_READY = "ready"  # the writer's first message: started and imported
_START_S = 300.0  # at least this long for the writer's start (imports; slow on a loaded node) at start-up


@dataclass
class Pending:
    """A checkpoint whose tensors are being written: what `checkpoint.finish_pending` needs to finish it."""

    iteration: int
    finish: Callable[[], None]  # collective: finalize, checksums, publish, retention
    abandon: Callable[[list[str]], None]  # collective: remove the partial checkpoint, raise one line
    remove: Callable[[], None]  # this rank alone: remove the partial checkpoint (the run is ending)
    results_queue: Any = None  # megatron-core's queue the storage writer reads the write results from
    plan: Any = None  # megatron-core's (storage writer, global metadata, dist wrapper) of this save
    config: Any = None  # megatron-core's CheckpointingConfig (metadata.json) of this save
    started: float = field(default_factory=time.monotonic)
    reply: Optional[tuple] = None  # (ok, write results | exception) once the writer answered


def _snapshot(buckets: list, buffer: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list, list]:
    """The buckets' tensors copied into one shared-memory buffer (`buffer` when it is large enough:
    the previous save's, whose pages are already mapped, so a save costs a memcpy and no page
    faults); the buckets with each tensor replaced by its index into the layout [(offset, dtype, shape)]."""
    layout, total, stripped, tensors = _layout(buckets)
    flat = buffer if _fits(buffer, total) else _shared(total)
    _copy(tensors, flat, layout)
    return flat, layout, stripped


def _fits(buffer: Optional[torch.Tensor], total: int) -> bool:
    """The previous save's buffer can hold this one's `total` bytes (its pages are mapped already)."""
    return buffer is not None and buffer.numel() >= total


def _layout(buckets: list) -> tuple[list, int, list, list]:
    """Where each bucket tensor goes in the snapshot: the layout [(offset, dtype, shape)], its bytes,
    the buckets with each tensor replaced by its index into the layout, and the tensors."""
    tensors = [t for _, _, (_, tensor_data) in buckets for _, t in tensor_data]
    layout, total = [], 0
    for t in tensors:
        total = -(-total // _ALIGN) * _ALIGN
        layout.append((total, t.dtype, tuple(t.shape)))
        total += t.numel() * t.element_size()
    index = iter(range(len(tensors)))
    stripped = [
        (name, key, (bytes_data, [(item, next(index)) for item, _ in tensor_data]))
        for name, key, (bytes_data, tensor_data) in buckets
    ]
    return layout, total, stripped, tensors


def _shared(total: int) -> torch.Tensor:
    """A new shared-memory buffer of `total` bytes; /dev/shm too small is an OSError whose text is the
    reason (one line)."""
    try:
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, 1)))
    except RuntimeError as exc:
        raise OSError(
            f"--async-save: cannot hold the checkpoint tensors ({total} bytes) in shared memory "
            f"(/dev/shm): {' '.join(str(exc).split())[:200]}"
        ) from None


def _copy(tensors: list, flat: torch.Tensor, layout: list) -> None:
    _copy_views([t.detach() for t in tensors], _views(flat, layout))


def _copy_views(sources: list, views: list) -> None:
    """One foreach call, not one per tensor: in the snapshot thread each Python-level op waits for the
    GIL the training step holds (up to its 5 ms switch interval), which for a model of many small
    tensors made the copy, and the optimizer step waiting for it, hundreds of ms slower."""
    if views:
        with torch.no_grad():
            torch._foreach_copy_(views, sources)


def _views(flat: torch.Tensor, layout: list) -> list[torch.Tensor]:
    out = []
    for offset, dtype, shape in layout:
        numel = 1
        for n in shape:
            numel *= n
        size = numel * torch.empty(0, dtype=dtype).element_size()
        out.append(flat[offset : offset + size].view(dtype).reshape(shape))
    return out


def _own_storages(flat: torch.Tensor, layout: list) -> list[torch.Tensor]:
    """The snapshot's tensors, each over exactly its own bytes of the shared memory: a storage of its
    own, since `torch.save` writes a tensor's whole storage (here it would be the whole snapshot), with
    no copy (a clone per tensor was a second copy of the rank's shard, competing with the step)."""
    memory, out = flat.numpy(), []
    for offset, dtype, shape in layout:
        numel = math.prod(shape)
        if numel == 0:
            out.append(torch.empty(shape, dtype=dtype))
        else:
            out.append(torch.frombuffer(memory, dtype=dtype, count=numel, offset=offset).reshape(shape))
    return out


def _write(message: tuple) -> dict:
    """Write one checkpoint's buckets (in the writer process): {"results": {bucket index: its write
    results}, "checksums": {file: [size, sha256]}}. The files are hashed here, while still in the
    page cache, so publishing the checkpoint later hashes only the small files in the training process."""
    iteration, rank, transforms, flat, layout, buckets = message
    tensors = _own_storages(flat, layout)
    results, checksums = {}, {}
    for i, (name, key, (bytes_data, tensor_data)) in enumerate(buckets):
        bucket = (name, key, (bytes_data, [(item, tensors[k]) for item, k in tensor_data]))
        # the queues megatron-core's per-bucket worker talks to, here in this process (no further workers)
        results_q, count_q = queue.Queue(), queue.Queue()
        count_q.put(i)
        FileSystemWriterAsync.write_preloaded_data(transforms, i, bucket, results_q, count_q, use_fsync=True)
        _, out = results_q.get_nowait()
        if isinstance(out, Exception):
            raise out
        results[i] = out
        checksums[key] = [os.path.getsize(name), sha256_file(name)]
    fault_point("save", iteration, rank=rank)  # tensors written, checkpoint not yet finalized or renamed
    return {"results": results, "checksums": checksums}


def _writer_main(conn: Any) -> None:
    """The writer process: one checkpoint in, (True, write results) or (False, exception) out."""
    child_of_run()  # dies with its rank, even a kill -9 of it: no half-written save outlives the run
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the rank handles it
    try:
        conn.send(_READY)  # imports done: the rank's first save does not wait for them
        while (message := conn.recv()) is not None:
            try:
                out = (True, _write(message))
            except Exception as exc:  # reported, not fatal: the rank decides (all ranks together)
                out = (False, exc)
            del message
            try:
                conn.send(out)
            except (EOFError, OSError):
                raise
            except Exception as exc:  # an exception that does not pickle: its text travels instead
                conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
    except (EOFError, OSError):
        # the rank is gone (it stopped on an error with a reply unread: the pipe is reset, not closed):
        # nothing is left to write for, and the rank's stderr, which this process shares, already
        # says why; a traceback here would be a second, misleading report
        return


def _in_process_results_queue() -> None:
    """megatron-core's FileSystemWriterAsync hands each save a queue for its write results, made at the
    first save as `mp.get_context("spawn").Manager().Queue()`: a manager server process spawned (it
    re-imports the training script: torch, megatron-core) in the middle of the first save, which was
    most of that save's stall (seconds; 30 s on a loaded machine), and one more resident process per
    rank. Here the write results come back over the writer's pipe and megatron-core's finalize reads
    them in the rank's own process (`Pending.results_queue`), so an in-process queue serves. Only
    the first call's queue is kept by megatron-core: set before the first save."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _is_cpu_view(t: Any) -> bool:
    """What megatron-core's `_clone_if_needed` clones: a CPU tensor that does not own its whole storage."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes() != t.nbytes


class _ResolveViewsAsMeta:
    """A save planner seen through `prepare_write_data`: a CPU view resolves to a meta tensor of its
    shape (which `_clone_if_needed` passes through, as it does a GPU tensor), the view kept by item."""

    def __init__(self, planner: Any) -> None:
        self.planner, self.views = planner, {}

    def resolve_data(self, item: Any) -> Any:
        data = self.planner.resolve_data(item)
        if not _is_cpu_view(data):
            return data
        self.views[id(item)] = data.detach()
        return torch.empty(data.shape, dtype=data.dtype, device="meta")


class _WriterKeepingViews(FileSystemWriterAsync):
    """megatron-core's async storage writer without the copy it makes, in the step, of every CPU tensor
    that is a view (`prepare_write_data`'s `_clone_if_needed`, so that `torch.save` does not write the
    whole storage): here every tensor is copied into the snapshot anyway, in a thread during the next
    step's forward and backward, and the writer saves each from a storage of its own (`_tensor_at`).
    At the 1b shape these views are the SwiGLU `linear_fc1` halves (megatron-core's `torch.chunk`):
    0.2 GB per LLM rank copied, into freshly faulted pages, at every save."""

    def prepare_write_data(self, plan: Any, planner: Any) -> None:
        resolver = _ResolveViewsAsMeta(planner)
        super().prepare_write_data(plan, resolver)
        views = resolver.views
        self.write_buckets = [
            (name, key, (bytes_data, [(item, views.get(id(item), t)) for item, t in tensor_data]))
            for name, key, (bytes_data, tensor_data) in self.write_buckets or []
        ]


class _SaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist save strategy that keeps the plan of its last save (`last`: the
    storage writer, global metadata and dist wrapper its finalize function would take), so that the
    finalize runs as part of our own publishing (checkpoint.finish_pending): one gather to rank 0
    and one agreement, where megatron-core's finalize functions cost a gather, a broadcast and a
    barrier of their own before ours (each a round trip of every rank at the next step)."""

    last: Any = None

    def async_save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> Any:
        """megatron-core's async_save with `_WriterKeepingViews` as its storage writer (it names the
        class in its body: set for this call only; this thread's saves are the only ones)."""
        mcore_torch.FileSystemWriterAsync = _WriterKeepingViews
        try:
            return super().async_save(sharded_state_dict, checkpoint_dir)
        finally:
            mcore_torch.FileSystemWriterAsync = FileSystemWriterAsync

    def _get_save_and_finalize_callbacks(self, writer: Any, save_state_dict_ret: Any) -> Any:
        self.last = save_state_dict_ret
        return super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)


_SHAPE_FIELDS = ("dtype", "local_shape", "global_shape", "global_offset", "axis_fragmentations", "flattened_range")


def _structure(state: dict) -> list:
    """What megatron-core's save plan is made from: every sharded entry's key, replica, dtype, shapes
    and offsets (a factory's by its tensor's shape), in order; not the values. Compared with `==`
    (slices and tuples compare by value), once per save: a few ms at the debug-m shape."""
    out = []
    for v in nested_values(state):
        if isinstance(v, ShardedBase):
            data = getattr(v, "data", None)
            shape = tuple(data.shape) if isinstance(data, torch.Tensor) else None
            fields = tuple(getattr(v, name, None) for name in _SHAPE_FIELDS)
            out.append((type(v).__name__, v.key, v.replica_id, shape, fields))
    return out


class AsyncWriter:
    """This rank's writer process, the one checkpoint it may be writing (`pending`) and what each
    save reuses: the snapshot's shared memory and megatron-core's save strategy, whose cached plan
    and metadata skip the planning collectives from the second save on (the structure of the model
    and optimizer state never changes within a run: Megatron-LM's --ckpt-assume-constant-structure).

    The snapshot copy runs in a thread while the next step's forward and backward compute (they
    only read the parameters and optimizer state; `join_snapshot` makes the optimizer step wait for
    it). `timeout_s` bounds the copy and the write, from the moment the save was handed over; past
    it the save fails on every rank with one line (checkpoint.finish_pending)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.proc: Any = None
        self.conn: Any = None
        self.pending: Optional[Pending] = None
        self.buffer: Optional[torch.Tensor] = None  # the snapshot's shared memory, kept for the next save
        self.strategy = _SaveStrategy("torch_dist", 1, cached_metadata=True)
        self.saves = 0  # handed over so far: the first one validates the sharding (collective)
        self.copier: Optional[threading.Thread] = None  # the snapshot copy of `pending`
        self.copy_failure: Optional[str] = None
        self.ready = False  # the writer process sent _READY
        self.frozen = False  # the heap, at the first save (`prepare`)
        self.structure: Optional[list] = None  # `_structure` of the state the cached save plan was made for

    def prepare(self) -> None:
        """Freeze the heap, once: at `wait_ready` (set-up, before the first step), else before the first
        save. megatron-core's fully_reshardable `sharded_state_dict` of the distributed optimizer runs
        `gc.collect()` at every save: a full collection over every object of the process (torch's,
        megatron-core's, the model's), 0.21 of its 0.22 CPU-s per save of the debug model at DP2
        (cProfile; docs/checkpoints.md), far more than its DP gather. Frozen (`gc.freeze`, after one
        collection, so no garbage is frozen), the objects that exist once the run is set up are left
        out of every later collection, which then walks only what was made since."""
        if not self.frozen:
            gc.collect()
            gc.freeze()
            self.frozen = True

    def plan_for(self, state: dict) -> None:
        """Before a save of `state`: megatron-core's strategy reuses its cached save plan only from the
        third save on (it plans the second one again, a gather of every rank's plan, to compare the
        two); here the first save's plan counts as checked (`planned`) as long as the state has the
        same structure (`_structure`: local, no collective), which within a run it has. A state of
        another structure drops the cached plan: megatron-core plans it afresh (collective)."""
        structure = _structure(state)
        if structure != self.structure:
            strategy = self.strategy
            strategy.cached_central_plan = strategy.cached_local_plan = strategy.cached_global_metadata = None
            strategy.validated_cache_reuse = False
        self.structure = structure

    def planned(self) -> None:
        """After a save's planning: its plan (and, on the coordinator, its global metadata) is the one
        the next saves reuse without planning again (`plan_for`)."""
        strategy = self.strategy
        if not strategy.validated_cache_reuse:
            strategy.validated_cache_reuse = True
            strategy.cached_global_metadata = strategy.last[1]

    def start(self) -> None:
        """Start the writer process now (its imports take seconds; they overlap the first steps)."""
        _in_process_results_queue()
        if self.proc is not None:
            return
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_writer_main, args=(child,), daemon=True, name="checkpoint-writer")
        start_ignoring_sigint(self.proc)
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        """Wait until the writer process has started (its imports: seconds), at most `timeout_s` (and
        no less than _START_S: a short write deadline need not fit a loaded node's imports); one that
        does not start is a CheckpointError naming --async-save."""
        limit = max(self.timeout_s, _START_S)
        deadline = time.monotonic() + limit
        while not self.ready and self.proc.is_alive() and time.monotonic() < deadline:
            if self.conn.poll(0.1):
                try:
                    self.ready = self.conn.recv() == _READY
                except (EOFError, OSError):  # the writer died: said below, with its exit
                    break
        if not self.ready:
            why = (
                f"died ({describe_exit(self.proc)})"
                if not self.proc.is_alive()
                else f"did not start within {limit:g} s (--distributed-timeout-minutes)"
            )
            raise CheckpointError(f"--async-save: the checkpoint writer process (pid {self.proc.pid}) {why}")
        self.prepare()  # the model and optimizer are built: the set-up's heap, frozen outside any step

    def submit(self, request: Any, iteration: int, pending: Pending, rank: int) -> None:
        """Hand megatron-core's AsyncRequest to the writer: the copy into the snapshot buffer and the
        hand-over run in a thread (`join_snapshot`). A rank with nothing to write (its tensors are
        other ranks' replicas) sends an empty one: its writer still answers, so every rank's save
        passes the same points."""
        self.pending = pending
        self.saves += 1
        transforms, buckets = None, []
        if request.async_fn is not None:
            transforms, use_msc = request.async_fn.args
            assert not use_msc, "--async-save writes to a file system, not through multi-storage-client"
            _, buckets, pending.results_queue = request.async_fn_args
        if self.proc is not None and not self.proc.is_alive():  # died while idle (killed for memory?): a new one
            self.stop(abort=True)
        # the buffer is free again: the previous write finished (or its writer was stopped) before this save
        layout, total, stripped, tensors = _layout(buckets)
        self.start()
        self.copy_failure = None
        head, sources = (iteration, rank, transforms), [t.detach() for t in tensors]
        if _fits(self.buffer, total):
            # the Python work here (it is cheap; in the thread it would wait for the GIL): the views and
            # the pickled message, which holds a handle of the shared memory, not its bytes
            work = self._hand_over(self.buffer, head, layout, stripped)
        else:  # a new buffer (the first save): mapping its pages (~0.1 CPU-s per GB) is the thread's too
            self.buffer, work = None, (total, head, layout, stripped)
        self.copier = threading.Thread(
            target=self._copy_and_send, args=(sources, work), daemon=True, name="checkpoint-snapshot"
        )
        self.copier.start()

    @staticmethod
    def _hand_over(flat: torch.Tensor, head: tuple, layout: list, stripped: list) -> tuple[list, bytes]:
        """The views the copy fills and the writer's message (a handle of the shared memory, not its bytes)."""
        return _views(flat, layout), ForkingPickler.dumps((*head, flat, layout, stripped))

    def _copy_and_send(self, sources: list, work: tuple) -> None:
        try:
            if len(work) == 4:  # (total, head, layout, stripped): no buffer large enough yet
                total, head, layout, stripped = work
                try:
                    self.buffer = _shared(total)
                except OSError as exc:  # /dev/shm: its own one line (docs/errors.md)
                    self.copy_failure = str(exc)
                    return
                work = self._hand_over(self.buffer, head, layout, stripped)
            views, message = work
            _copy_views(sources, views)
            self.conn.send_bytes(message)  # what the writer's conn.recv() unpickles
        except Exception as exc:  # reported by `status` on this rank, agreed on by all (finish_pending)
            self.copy_failure = f"copying the tensors for the checkpoint writer: {type(exc).__name__}: {exc}"

    def join_snapshot(self) -> None:
        """Wait until the snapshot of the save in flight is copied (before the optimizer step changes
        what it copies), at most until the save's deadline; a copy still running then makes the save
        fail (`status`), whose tensors are then never published."""
        copier = self.copier
        if copier is None:
            return
        left = self.timeout_s - (time.monotonic() - self.pending.started) if self.pending is not None else 0.0
        copier.join(timeout=max(left, 0.0))
        if copier.is_alive():
            self.copy_failure = (
                f"copying the tensors for the checkpoint writer did not finish within "
                f"{self.timeout_s:g} s (--distributed-timeout-minutes)"
            )
            return
        self.copier = None

    def status(self, describe: Callable[[BaseException], Optional[str]] = lambda exc: None) -> Optional[str]:
        """This rank's part of the pending write: None while it runs, '' when done, else why it failed
        (`describe`: the reason of a failed write, checkpoint.write_failure; None: its type and text)."""
        pending = self.pending
        if self.copier is not None and self.copy_failure is None:
            if self.copier.is_alive() and time.monotonic() - pending.started <= self.timeout_s:
                return None  # the pipe is the copier's until it is done
            self.join_snapshot()
        if self.copy_failure is not None:
            return self.copy_failure
        if pending.reply is None and self.conn.poll():
            try:
                reply = self.conn.recv()
            except (EOFError, OSError):
                reply = None
            if reply == _READY:  # a writer restarted by `submit`: its answer comes next
                self.ready = True
            elif reply is not None:
                pending.reply = reply
        if pending.reply is not None:
            ok, out = pending.reply
            return "" if ok else _reason(out, describe)
        if not self.proc.is_alive():
            return f"the checkpoint writer (pid {self.proc.pid}) died ({describe_exit(self.proc)})"
        if time.monotonic() - pending.started > self.timeout_s:
            return (
                f"the checkpoint writer (pid {self.proc.pid}) did not finish within {self.timeout_s:g} s "
                "(--distributed-timeout-minutes)"
            )
        return None

    def results(self) -> dict:
        """The pending write's answer (after `status` said done): {"results": ..., "checksums": ...}."""
        return self.pending.reply[1]

    def stop(self, abort: bool = False) -> None:
        """End the writer process: at once (`abort`: its write is abandoned), else after its current write."""
        if self.proc is None:
            return
        self.join_snapshot()  # the copier sends on the pipe: done (or past its deadline) before it closes
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
        self.proc = self.conn = self.buffer = self.copier = None

    def abandon(self) -> None:
        """The run is ending with a save in flight (an error, SIGTERM without --exit-signal-handler):
        stop the writer and remove this rank's part of the unfinished checkpoint; nothing was published."""
        self.stop(abort=True)
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.remove()


def _reason(exc: BaseException, describe: Callable[[BaseException], Optional[str]]) -> str:
    """Why the writer failed, in one line."""
    reason = describe(exc)
    if reason is None:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return f"in the checkpoint writer: {reason}"
