"""training/async_save.py in-process: the snapshot a rank hands to its writer, and the deadline and
death of a writer (the CLI runs: tests/reliability/test_checkpoints.py, `async`)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from internvl_mcore.training.async_save import AsyncWriter, Pending, _snapshot, _views
from internvl_mcore.training.checkpoint import write_failure


def test_snapshot_is_a_copy_in_shared_memory():
    """Every tensor (dtypes, a scalar, an empty one, a non-contiguous view) comes back equal, aligned,
    from one shared buffer, and unchanged when the training step then changes the originals."""
    w = torch.randn(5, 3)
    tensors = [w, torch.tensor(7, dtype=torch.int64), torch.zeros(0), w.t(), torch.ones(3, dtype=torch.bfloat16)]
    buckets = [
        ("f0", "k", ([("bytes", b"x")], [(f"i{i}", t) for i, t in enumerate(tensors[:3])])),
        ("f1", "k", ([], [(f"i{i}", t) for i, t in enumerate(tensors[3:], 3)])),
    ]
    expected = [t.clone() for t in tensors]
    flat, layout, stripped = _snapshot(buckets)
    w.add_(1.0)  # the next optimizer step
    assert flat.is_shared() and all(offset % 64 == 0 for offset, _, _ in layout)
    got = _views(flat, layout)
    assert all(g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e) for g, e in zip(got, expected))
    assert [t for _, _, (_, data) in stripped for _, t in data] == list(range(5))
    assert stripped[0][2][0] == [("bytes", b"x")]


def _writer(proc, started: float) -> AsyncWriter:
    writer = AsyncWriter(timeout_s=5.0)
    writer.proc = proc
    writer.conn = SimpleNamespace(poll=lambda: False)
    writer.pending = Pending(3, finish=None, abandon=None, remove=None, started=started)
    return writer


def test_writer_deadline_and_death_are_failures():
    """A write still running past the deadline, or a writer that died, is a failure with its reason;
    a running one within the deadline is None (still running); an answered one is ''."""
    alive = SimpleNamespace(is_alive=lambda: True, pid=11)
    assert _writer(alive, time.monotonic()).status() is None
    late = _writer(alive, time.monotonic() - 6).status()
    assert late == "the checkpoint writer (pid 11) did not finish within 5 s (--distributed-timeout-minutes)"
    dead = SimpleNamespace(is_alive=lambda: False, pid=12, exitcode=-9, join=lambda timeout=None: None)
    assert (
        _writer(dead, time.monotonic()).status()
        == "the checkpoint writer (pid 12) died (killed by SIGKILL, e.g. the out-of-memory killer)"
    )
    done = _writer(dead, time.monotonic())
    done.pending.reply = (True, {"results": {0: []}, "checksums": {}})
    assert done.status() == "" and done.results()["results"] == {0: []}
    failed = _writer(alive, time.monotonic())
    failed.pending.reply = (False, OSError(28, "No space left on device"))
    assert failed.status(write_failure) == "in the checkpoint writer: No space left on device"
    assert failed.status() == "in the checkpoint writer: OSError: [Errno 28] No space left on device"


def test_snapshot_reuses_a_large_enough_buffer():
    """The next save copies into the previous save's shared memory (no new pages), a larger one gets a new buffer."""
    first, _, _ = _snapshot([("f", "k", ([], [("a", torch.ones(100))]))])
    again, layout, _ = _snapshot([("f", "k", ([], [("a", torch.full((50,), 2.0))]))], first)
    assert again is first and torch.equal(_views(again, layout)[0], torch.full((50,), 2.0))
    larger, _, _ = _snapshot([("f", "k", ([], [("a", torch.ones(200))]))], first)
    assert larger is not first and larger.is_shared()


def test_abandon_stops_the_writer_and_removes_the_partial_checkpoint():
    """An error or a signal with a save in flight: the writer is killed, this rank's tmp_iter_ part removed."""
    removed, killed = [], []
    proc = SimpleNamespace(is_alive=lambda: not killed, kill=lambda: killed.append(1), join=lambda timeout=None: None)
    writer = _writer(proc, time.monotonic())
    writer.conn = SimpleNamespace(close=lambda: None)
    writer.pending.remove = lambda: removed.append(1)
    writer.abandon()
    assert killed == [1] and removed == [1] and writer.pending is None and writer.proc is None


def test_snapshot_copy_in_a_thread_and_its_failure():
    """submit returns before the copy (a thread that then hands the snapshot over); join_snapshot waits
    for it, and a failed hand-over is this rank's write failure, with its reason (status)."""
    import pickle
    import threading

    sent, gate = [], threading.Event()

    def send(message):
        gate.wait(timeout=30)  # the copy is held until the test has seen `submit` return
        if sent:
            raise BrokenPipeError(32, "Broken pipe")
        sent.append(pickle.loads(message))  # what the writer's conn.recv() does

    alive = SimpleNamespace(is_alive=lambda: True, pid=11)
    writer = AsyncWriter(timeout_s=30.0)
    writer.proc, writer.conn = alive, SimpleNamespace(send_bytes=send, poll=lambda: False)
    w = torch.randn(4, 4)
    bucket = ("f0", "k", ([], [("i0", w)]))
    request = SimpleNamespace(async_fn=SimpleNamespace(args=(None, False)), async_fn_args=(None, [bucket], None))
    writer.submit(request, 2, Pending(2, finish=None, abandon=None, remove=None), rank=0)
    assert writer.copier.is_alive() and writer.status() is None and not sent
    gate.set()
    writer.join_snapshot()
    ((iteration, _, _, flat, layout, _),) = sent
    assert iteration == 2 and torch.equal(_views(flat, layout)[0], w) and writer.status() is None
    writer.pending = Pending(3, finish=None, abandon=None, remove=None)
    writer.submit(request, 3, writer.pending, rank=0)
    writer.join_snapshot()
    assert writer.status() == "copying the tensors for the checkpoint writer: BrokenPipeError: [Errno 32] Broken pipe"


def test_prepare_freezes_the_heap_once():
    """AsyncWriter.prepare (set-up or first save): the objects existing then leave the collections
    (megatron-core's gc.collect() at each distributed-optimizer save walks only newer ones); later
    calls freeze nothing more, so what a run makes afterwards stays collectable."""
    import gc

    writer = AsyncWriter(timeout_s=5)
    gc.unfreeze()
    try:
        writer.prepare()
        frozen = gc.get_freeze_count()
        assert frozen > 0 and writer.frozen
        later = [[] for _ in range(1000)]
        writer.prepare()
        assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen, len(later))
    finally:
        gc.unfreeze()


def test_async_save_with_the_distributed_optimizer_at_dp2_equals_a_sync_save(tmp_path):
    """--async-save with --use-distributed-optimizer at DP2 (the optimizer state gathered over DP,
    megatron-core's fully_reshardable format, on a heap frozen at the first save: AsyncWriter.prepare):
    the second save (the cached save plan) is the synchronous run's, byte for byte (so it resumes at
    another DP size as a synchronous save does: tests/reliability/test_reshard_resume.py, dp1-to-dp2),
    the losses are unchanged and the tracker names the last save. Both runs are jobs of the reused 2-rank
    world (tests/conftest.py `pretrain`; the CLI's --async-save launches: tests/reliability/test_checkpoints.py)."""
    from tests.conftest import pretrain
    from tests.reliability.common import MOCK, train_records
    from tests.reliability.test_checkpoints import _same_checkpoint

    args = MOCK + [
        "--global-batch-size",
        "2",
        "--train-iters",
        "3",
        "--save-interval",
        "1",
        "--use-distributed-optimizer",
    ]
    runs = {}
    for name, extra in (("sync", []), ("async", ["--async-save"])):
        d = tmp_path / name
        pretrain(2, args + ["--save", str(d / "ckpt"), "--log-jsonl", str(d / "log.jsonl"), *extra])
        runs[name] = d
    _same_checkpoint(runs["sync"] / "ckpt" / "iter_0000002", runs["async"] / "ckpt" / "iter_0000002")
    losses = [{it: r["loss"] for it, r in train_records(d / "log.jsonl").items()} for d in runs.values()]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3], losses
    assert (runs["async"] / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_views_reach_the_snapshot_uncopied_and_the_writer_saves_each_tensor_alone():
    """No copy of a view in the step (megatron-core's `_clone_if_needed`, skipped by `_WriterKeepingViews`):
    its buckets are megatron-core's writer's with the view itself where that clones it; the writer then
    saves every snapshot tensor over exactly its own bytes (`_own_storages`), as `torch.save` of a clone."""
    import io

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from torch.distributed.checkpoint.filesystem import _StoragePrefix
    from torch.distributed.checkpoint.planner import SavePlan
    from torch.distributed.checkpoint.planner_helpers import _create_write_items

    from internvl_mcore.training.async_save import _in_process_results_queue, _own_storages, _WriterKeepingViews

    _in_process_results_queue()  # megatron-core's writer would spawn a Manager for its results queue
    fc1 = torch.randn(6, 3)
    data = {"whole": torch.ones(5, dtype=torch.bfloat16), "gate": fc1[:3], "up": fc1[3:], "empty": torch.zeros(0)}
    plan = SavePlan(
        [i for fqn, t in data.items() for i in _create_write_items(fqn, t)], storage_data=_StoragePrefix("__0_")
    )
    planner = SimpleNamespace(resolve_data=lambda item: data[item.index.fqn])
    buckets = []
    for cls in (FileSystemWriterAsync, _WriterKeepingViews):
        w = cls("/nonexistent", thread_count=2)
        w.prepare_write_data(plan, planner)
        buckets.append(w.write_buckets)
    theirs, ours = ([(b[0], b[1], [(i.index.fqn, t) for i, t in b[2][1]]) for b in bs] for bs in buckets)
    assert [(n, k, [f for f, _ in d]) for n, k, d in theirs] == [(n, k, [f for f, _ in d]) for n, k, d in ours]
    pairs = [(f, a, b) for (_, _, da), (_, _, db) in zip(theirs, ours) for (f, a), (_, b) in zip(da, db)]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for _, a, b in pairs)
    ptrs = {f: (a.data_ptr(), b.data_ptr()) for f, a, b in pairs}
    assert ptrs["gate"][1] == fc1.data_ptr() != ptrs["gate"][0] and ptrs["whole"][0] == ptrs["whole"][1]
    flat, layout, _ = _snapshot(buckets[1])
    saved = _own_storages(flat, layout)
    originals = [t for _, _, (_, d) in buckets[1] for _, t in d]
    for got, want in zip(saved, originals):
        assert got.untyped_storage().nbytes() == got.nbytes and torch.equal(got, want)
        a, b = io.BytesIO(), io.BytesIO()
        torch.save(got, a)
        torch.save(want.clone(), b)
        assert a.getvalue() == b.getvalue()
    assert (
        any(t.numel() == 0 for t in saved) and flat.data_ptr() <= saved[0].data_ptr() < flat.data_ptr() + flat.numel()
    )


def test_a_new_snapshot_buffer_is_mapped_in_the_copy_thread():
    """The first save's buffer (a new shared-memory mapping: page faults, ~0.1 CPU-s per GB) is made by
    the copy thread, not in the step; the next save reuses it from the step (views and message only);
    /dev/shm too small is this rank's write failure in its own line (docs/errors.md)."""
    import threading
    from unittest import mock

    gate, sent = threading.Event(), []

    def send(message):
        gate.wait(timeout=30)
        sent.append(message)

    writer = AsyncWriter(timeout_s=30.0)
    writer.proc, writer.conn = SimpleNamespace(is_alive=lambda: True, pid=11), SimpleNamespace(send_bytes=send)
    bucket = ("f0", "k", ([], [("i0", torch.randn(8))]))
    request = SimpleNamespace(async_fn=SimpleNamespace(args=(None, False)), async_fn_args=(None, [bucket], None))
    mapped_by, new_shared = [], torch.UntypedStorage._new_shared

    def record(size):
        mapped_by.append(threading.current_thread().name)
        return new_shared(size)

    with mock.patch.object(torch.UntypedStorage, "_new_shared", side_effect=record):
        writer.submit(request, 2, Pending(2, finish=None, abandon=None, remove=None), rank=0)
        assert writer.copier.is_alive() and not sent
        gate.set()
        writer.join_snapshot()
    first = writer.buffer
    assert mapped_by == ["checkpoint-snapshot"], mapped_by
    assert first is not None and first.is_shared() and writer.copy_failure is None and len(sent) == 1
    writer.submit(request, 3, Pending(3, finish=None, abandon=None, remove=None), rank=0)
    writer.join_snapshot()
    assert writer.buffer is first and len(sent) == 2
    writer.buffer = None
    with mock.patch.object(torch.UntypedStorage, "_new_shared", side_effect=RuntimeError("unable to mmap 64 bytes")):
        writer.submit(request, 4, Pending(4, finish=None, abandon=None, remove=None), rank=0)
        writer.join_snapshot()
    assert writer.copy_failure.startswith(
        "--async-save: cannot hold the checkpoint tensors (32 bytes) in shared memory"
    )


def test_a_writer_whose_rank_is_gone_ends_quietly(capfd):
    """A rank that stops on an error may leave its writer's reply unread: closing its end then resets
    the pipe, and the writer's next receive fails (ECONNRESET, not EOF). It ends with exit 0 and no
    traceback: the rank's stderr, which the writer shares, has said why the run stopped."""
    import multiprocessing as mp

    from internvl_mcore.training.async_save import _writer_main

    def writer(rank_end, writer_end):
        rank_end.close()  # a forked child holds both ends: the rank's must be the rank's alone
        _writer_main(writer_end)

    ctx = mp.get_context("fork")  # the writer's code, without a spawned interpreter's imports
    rank_end, writer_end = ctx.Pipe()
    proc = ctx.Process(target=writer, args=(rank_end, writer_end), daemon=True)
    proc.start()
    writer_end.close()
    assert rank_end.poll(30)  # its "ready" is waiting, unread
    rank_end.close()
    proc.join(30)
    assert proc.exitcode == 0 and "Traceback" not in capfd.readouterr().err
