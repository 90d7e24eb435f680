"""Checkpoints and resume through pretrain_internvl.py: --keep-checkpoints, checksums
verified on --load (a corrupt latest checkpoint falls back, --no-fallback refuses naming the file),
a changed LR schedule is refused or applied as Megatron-LM's flags say, --save to a path that cannot
be written fails at start-up. User errors run as one plain process: stderr is one line, exit 2; so do
the runs that are killed or fail (their exit and helpers are the subject), the --async-save runs
among them with their writer process. The other runs (the shared checkpoints, resumes whose subject
is what was restored, an --async-save resume too: its writer is spawned from the world's rank) are
jobs of the session's reused 1-rank world (tests/conftest.py `pretrain`: no interpreter start or
imports; the same bits as a launch), whose output the checks read."""

import json
import shutil

import pytest

from tests.conftest import pretrain
from tests.reliability.common import MOCK, launch, one_line_error, plain, train_records

# a 6-step schedule stopped after step 4 (--exit-interval): the LR after step 4 is not yet 0
ARGS = MOCK + ["--global-batch-size", "2", "--train-iters", "6", "--exit-interval", "4"]


def _with(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 steps (of a 6-step schedule) saving every step, keeping the newest 2 checkpoints."""
    d = tmp_path_factory.mktemp("straight")
    save = ["--save", str(d / "ckpt"), "--save-interval", "1", "--keep-checkpoints", "2"]
    pretrain(1, ARGS + save + ["--log-jsonl", str(d / "log.jsonl")])
    return d


def test_keep_checkpoints_and_checksums(straight):
    ckpt = straight / "ckpt"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    table = json.loads((ckpt / "iter_0000004" / "checksums.json").read_text())
    files = {str(p.relative_to(ckpt / "iter_0000004")) for p in (ckpt / "iter_0000004").rglob("*") if p.is_file()}
    assert set(table) == files - {"checksums.json"} and "run.json" in table


def _distcp(path):
    return sorted(path.glob("*.distcp"))[0]


def test_corrupt_latest_checkpoint_falls_back(straight, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    bad = _distcp(ckpt / "iter_0000004")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum sees it
    bad.write_bytes(bytes(data))
    out = pretrain(1, ARGS + ["--load", str(ckpt), "--log-jsonl", str(tmp_path / "r.jsonl")])
    assert f"warning: {bad}: checksum mismatch" in out and "falling back" in out, out[-2000:]
    assert "resumed from" in out and "iter_0000003 at iteration 3" in out
    ref, resumed = train_records(straight / "log.jsonl"), train_records(tmp_path / "r.jsonl")
    assert sorted(resumed) == [4]
    assert resumed[4]["loss"] == ref[4]["loss"]  # the same step 4 as the uninterrupted run, bit-exact


def test_truncated_latest_checkpoint_with_no_fallback_is_refused(straight, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    bad = _distcp(ckpt / "iter_0000004")
    bad.write_bytes(bad.read_bytes()[:100])
    line = one_line_error(plain(ARGS + ["--load", str(ckpt), "--no-fallback"]))
    assert str(bad) in line and "truncated" in line and "--no-fallback" in line, line


def test_changed_schedule_is_refused_without_a_flag(straight):
    args = _with(_with(ARGS, "--lr", "2e-3"), "--train-iters", "8")
    line = one_line_error(plain(args + ["--load", str(straight / "ckpt")]))
    assert "--lr 0.002 (checkpoint: 0.001)" in line and "--train-iters 8 (checkpoint: 6)" in line, line
    assert "--override-opt_param-scheduler" in line and "--use-checkpoint-opt_param-scheduler" in line


@pytest.mark.parametrize("flag", ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"])
def test_changed_lr_follows_the_flag(straight, tmp_path, flag):
    """Resume at 3 with --lr doubled: override doubles step 4's LR (cosine to min-lr 0 scales with the
    peak), use-checkpoint reproduces the uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    log = tmp_path / "r.jsonl"
    out = pretrain(1, _with(ARGS, "--lr", "2e-3") + ["--load", str(ckpt), "--log-jsonl", str(log), flag])
    assert f"LR schedule: {flag}" in out and "--lr 0.002 (checkpoint: 0.001)" in out
    ref, got = train_records(straight / "log.jsonl"), train_records(log)
    assert sorted(got) == [4] and got[4]["loss"] == ref[4]["loss"]  # step 4 runs at the LR step 3 set
    if flag.startswith("--override"):
        assert ref[4]["lr"] > 0 and got[4]["lr"] == pytest.approx(2 * ref[4]["lr"], rel=1e-12)
    else:
        assert got[4]["lr"] == ref[4]["lr"]


def test_unwritable_save_fails_at_start_up(tmp_path):
    """Refused before torch is imported (training/preflight.py): run_light asserts the imports."""
    from tests.reliability.cli_helpers import NO_TORCH, run_light

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = one_line_error(run_light("pretrain", *ARGS, "--save", str(blocker / "ckpt"), heavy=NO_TORCH))
    assert line.startswith(f"error: refusing to start: --save {blocker / 'ckpt'}: cannot write there"), line


def _iters(ckpt):
    return sorted(p.name for p in ckpt.iterdir() if "iter_" in p.name)


def test_full_disk_during_save_fails_cleanly(straight, tmp_path):
    """ENOSPC inside a save (fault hook: after the tensors are written): one line naming --save and the
    reason, exit 2, the partial tmp_iter_ removed, the earlier checkpoints and tracker untouched; then
    the same directory resumes, and a failure on one rank of two stops both (no hang) the same way."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    args = _with(ARGS, "--exit-interval", "0") + ["--load", str(ckpt), "--save", str(ckpt), "--save-interval", "1"]
    line = one_line_error(plain(args, env={"INTERNVL_MCORE_FAULT": "save:5:0:enospc"}))
    assert line.startswith(
        f"error: --save {ckpt}: writing checkpoint iteration 5 failed (rank 0: No space left on device)"
    ), line
    assert "removed the partial tmp_iter_0000005" in line, line
    assert _iters(ckpt) == ["iter_0000003", "iter_0000004"] and tracker.read_text() == "4"

    # two ranks, rank 1 alone fails at iteration 6: the resume from 4 works, 5 is saved, both ranks stop
    proc = launch(2, args, timeout=300, env={"INTERNVL_MCORE_FAULT": "save:6:1:enospc"})
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "saved checkpoint at iteration 5" in proc.stdout, proc.stdout[-3000:]
    # both ranks stop with the same line (torchrun may end the second before it prints); a rank left
    # waiting would hold the job for --distributed-timeout-minutes (10), past launch's timeout
    errors = [s for s in proc.stderr.splitlines() if s.startswith("error: --save")]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert "iteration 6 failed (rank 1: No space left on device)" in errors[0], errors[0]
    assert _iters(ckpt) == ["iter_0000003", "iter_0000004", "iter_0000005"] and tracker.read_text() == "5"


def test_write_failure_reasons():
    """What counts as a failed write (its reason) and what is left to its own handling."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from internvl_mcore.training.checkpoint import write_failure

    disk = OSError(errno.ENOSPC, "No space left on device", "/ckpt/tmp_iter_0000001/__0_0.distcp")
    assert write_failure(disk) == "No space left on device: /ckpt/tmp_iter_0000001/__0_0.distcp"
    try:  # megatron-core's writer re-raises a worker's error from it; dist-checkpointing gathers it per rank
        raise RuntimeError("Worker failure: boom") from disk
    except RuntimeError as wrapped:
        assert write_failure(CheckpointException("save failed", {1: (wrapped, None)})).startswith("No space left")
    assert write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert write_failure(ConnectionResetError(errno.ECONNRESET, "reset")) is None  # a lost peer
    assert write_failure(RuntimeError("a bug")) is None


def test_changed_global_batch_size_is_named(straight):
    """The schedule counts samples: a resume with another --global-batch-size is refused naming it (not
    as a changed --train-iters, which is the same)."""
    line = one_line_error(plain(_with(ARGS, "--global-batch-size", "1") + ["--load", str(straight / "ckpt")]))
    assert "--global-batch-size 1 (checkpoint: 2)" in line and "--train-iters" not in line, line
    assert "--override-opt_param-scheduler" in line, line


def test_deleted_tracker_resumes_from_the_newest_complete_checkpoint(straight, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    (ckpt / "latest_checkpointed_iteration.txt").unlink()
    out = pretrain(1, _with(ARGS, "--exit-interval", "5") + ["--load", str(ckpt)])
    assert (
        f"warning: --load {ckpt}: no latest_checkpointed_iteration.txt; taking the newest complete checkpoint "
        "iter_0000004 (found: iter_0000004, iter_0000003)"
    ) in out, out[-2000:]
    assert f"resumed from {ckpt / 'iter_0000004'} at iteration 4" in out


def test_resume_with_other_data_flags_is_one_line(digits_shards, tmp_path):
    """The data position of a shard run fits only the same --data-path and --seed: another one is
    refused naming the flags (was a ValueError traceback from the loader)."""
    from tests.conftest import SEQ

    args = [
        "--model",
        "debug",
        "--data-path",
        digits_shards,
        "--seq-length",
        str(SEQ),
        "--train-iters",
        "1",
        "--global-batch-size",
        "1",
        "--seed",
        "5",
        "--num-workers",  # packs decoded in the rank: the loader's workers are not the subject
        "0",
    ]
    pretrain(1, args + ["--save", str(tmp_path / "ckpt")])
    line = one_line_error(plain(_with(args, "--seed", "6") + ["--load", str(tmp_path / "ckpt")]))
    assert "seed" in line and "--data-path" in line and "--seed" in line and str(tmp_path / "ckpt") in line, line


def test_save_holding_another_runs_checkpoints(straight, tmp_path):
    """A new run (no --load) into a --save with checkpoints 3 and 4 is refused before training, the
    directory untouched; --overwrite-checkpoints deletes them first, so the pointer never rewinds onto
    a mix of two runs. (A --save held by a running job: tests/reliability/test_preemption.py.)"""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    line = one_line_error(plain(ARGS + ["--save", str(ckpt)]))
    assert line == (
        f"error: --save {ckpt} holds another run's checkpoints (iter_0000003, iter_0000004, "
        f"latest_checkpointed_iteration.txt): resume with --load {ckpt}, give an empty --save, or "
        "pass --overwrite-checkpoints to delete them"
    ), line
    assert _iters(ckpt) == ["iter_0000003", "iter_0000004"]
    out = pretrain(1, _with(ARGS, "--exit-interval", "2") + ["--save", str(ckpt), "--overwrite-checkpoints"])
    assert f"--overwrite-checkpoints: deleted 3 checkpoint file(s) of an earlier run from {ckpt}" in out
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_same_load_and_save_starts_fresh_then_resumes(tmp_path):
    """The requeue pattern (Megatron-LM's): one command, `--load DIR --save DIR`, for the first start
    (DIR has no checkpoint yet: start from scratch, saying so) and every restart (resume)."""
    ckpt = tmp_path / "ckpt"
    args = _with(ARGS, "--exit-interval", "2") + ["--load", str(ckpt), "--save", str(ckpt), "--save-interval", "2"]
    first = pretrain(1, args)
    assert f"--load {ckpt}: no checkpoint there yet (it is also --save): starting from scratch" in first
    again = pretrain(1, _with(args, "--exit-interval", "4"))
    assert f"resumed from {ckpt / 'iter_0000002'} at iteration 2" in again, again[-2000:]
    # a --load elsewhere that holds nothing stays an error: a typo must not start from scratch
    line = one_line_error(plain(ARGS + ["--load", str(tmp_path / "nothing")]))
    assert str(tmp_path / "nothing") in line, line


# --async-save: the writer process of a rank waits at the fault point `save` (tensors of the
# iteration written, nothing finalized or renamed) so the trainer is killed during a write, not after a sleep
ASYNC = _with(ARGS, "--exit-interval", "4") + ["--save-interval", "1", "--keep-checkpoints", "2", "--async-save"]


def _kill_during_async_write(args, out, fault, markers, timeout=240, sig=9):
    """Start a plain run with INTERNVL_MCORE_FAULT=`fault` (None: no fault), send its rank `sig` (kill -9)
    once every marker is on its stdout; returns (its output, the helper processes it had left, its exit code)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.reliability.common import DIST_ENV, SCRIPT

    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    # one thread, as `launch` (and `straight`) runs: the losses compared below are bit-exact only so
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", INTERNVL_MCORE_FAULT=fault or "")
    with open(out, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=SCRIPT.parent,
        )
    try:
        deadline = time.monotonic() + timeout
        while not all(m in out.read_text() for m in markers):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-4000:]
            time.sleep(0.05)
        helpers = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, sig)  # the rank only: its writer must die with it (PDEATHSIG) or be ended by it
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    psutil.wait_procs(helpers, timeout=30)
    return out.read_text(), [p for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], code


def _same_checkpoint(a, b):
    """Two checkpoint directories hold the same tensors and state: every file byte for byte except
    .metadata (a fresh save_id per save: its tensor index is compared) and the rank files, of which
    the TP RNG tracker's states are compared: Python's and NumPy's are never seeded (they differ
    between any two runs) and torch's CPU state after a resume differs from the uninterrupted run's
    with synchronous saves too (seen while writing this test; the losses are bit-exact)."""
    from torch.distributed.checkpoint import FileSystemReader

    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), (names, sorted(p.name for p in b.iterdir()))
    for name in names:
        if name.startswith("rank_"):
            ra, rb = (json.loads((d / name).read_text())["rng"] for d in (a, b))
            assert ra["tracker"] == rb["tracker"], name
        elif name not in (".metadata", "checksums.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # checksums.json: the same entries (the async writer hashed its files itself)
    ca, cb = (json.loads((d / "checksums.json").read_text()) for d in (a, b))
    assert ca.keys() == cb.keys() and all(ca[n] == cb[n] for n in ca if n != ".metadata" and "rank_" not in n)
    ma, mb = FileSystemReader(str(a)).read_metadata(), FileSystemReader(str(b)).read_metadata()
    assert ma.state_dict_metadata == mb.state_dict_metadata and ma.storage_data == mb.storage_data


def test_async_save_killed_during_a_write_then_resumed(straight, tmp_path):
    """--async-save, the rank killed (-9) while its writer holds checkpoint 3 open and training has gone
    on to step 4: --load finds checkpoint 2 (checksums pass, no fallback), the half tmp_iter_0000003 is
    not tracked and no helper survives; the resumed --async-save run repeats steps 3-4 of the
    synchronous run bit for bit and writes the same checkpoints 3 and 4."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "killed.txt"
    text, left, code = _kill_during_async_write(
        ASYNC + ["--save", str(ckpt)],
        out,
        "save:3:0:wait",
        ["fault point save 3: waiting for a signal", "iteration      4/6"],
    )
    assert code == -9 and not left, (code, left)
    assert "checkpoint at iteration 3: writing to" in text and "saved checkpoint at iteration 2" in text, text[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert _iters(ckpt) == ["iter_0000001", "iter_0000002", "tmp_iter_0000003"]
    log = tmp_path / "resumed.jsonl"
    # the resume is a job of the reused 1-rank world (its writer is spawned from that rank): what it
    # restored and wrote is the subject, not the launch (the kill above is the real process)
    out = pretrain(1, ASYNC + ["--load", str(ckpt), "--save", str(ckpt), "--no-fallback", "--log-jsonl", str(log)])
    assert f"resumed from {ckpt / 'iter_0000002'} at iteration 2" in out and "falling back" not in out, out[-3000:]
    ref, got = train_records(straight / "log.jsonl"), train_records(log)
    assert sorted(got) == [3, 4] and all(got[i]["loss"] == ref[i]["loss"] for i in (3, 4))
    assert _iters(ckpt) == ["iter_0000003", "iter_0000004"]
    for it in ("iter_0000003", "iter_0000004"):
        _same_checkpoint(ckpt / it, straight / "ckpt" / it)


def test_async_write_failure_stops_every_rank(straight, tmp_path):
    """ENOSPC inside rank 1's writer (2 ranks): both ranks stop with the same line naming --save; the
    checkpoint before it is published, the failed one removed, the tracker not advanced."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "ckpt", ckpt)
    args = _with(ASYNC, "--exit-interval", "0") + ["--load", str(ckpt), "--save", str(ckpt)]
    proc = launch(2, args, timeout=300, env={"INTERNVL_MCORE_FAULT": "save:6:1:enospc"})
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "saved checkpoint at iteration 5" in proc.stdout, proc.stdout[-3000:]
    errors = [s for s in proc.stderr.splitlines() if s.startswith("error: --save")]
    # torchrun's own traceback about the failed child follows; the ranks print none ("[rankN]: Traceback")
    rank_tracebacks = [s for s in proc.stderr.splitlines() if s.startswith("[rank") and "Traceback" in s]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1 and not rank_tracebacks, proc.stderr[-3000:]
    assert (
        "iteration 6 failed (rank 1: in the checkpoint writer: No space left on device)" in errors[0]
        and "removed the partial tmp_iter_0000006" in errors[0]
    ), errors[0]
    assert _iters(ckpt) == ["iter_0000004", "iter_0000005"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "5"


def _checksums_pass(path):
    """Every file checksums.json lists has its size and sha256 (what --load verifies)."""
    import hashlib

    table = json.loads((path / "checksums.json").read_text())
    files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert table and set(table) == files - {"checksums.json"}
    for name, (size, sha) in table.items():
        data = (path / name).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha, name


def test_async_sigterm_abandons_the_write_in_flight(tmp_path):
    """SIGTERM (no --exit-signal-handler) while rank 0's writer holds checkpoint 3 open and training has
    gone on: the rank stops with its one line (exit 143), its writer is ended, the unfinished
    tmp_iter_0000003 is removed (abandoned, never published) and the tracker stays at checkpoint 2,
    whose checksums pass."""
    import signal

    ckpt = tmp_path / "ckpt"
    text, left, code = _kill_during_async_write(
        ASYNC + ["--save", str(ckpt)],
        tmp_path / "out.txt",
        "save:3:0:wait",
        ["fault point save 3: waiting for a signal", "iteration      4/6"],
        sig=signal.SIGTERM,
    )
    assert code == 143 and not left and "terminated (SIGTERM)" in text, (code, left, text[-3000:])
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert _iters(ckpt) == ["iter_0000001", "iter_0000002"]
    _checksums_pass(ckpt / "iter_0000002")


def test_async_sigterm_with_exit_signal_handler_finishes_the_write(tmp_path):
    """--exit-signal-handler, SIGTERM once checkpoint 3 was handed to the writer: the ranks stop after the
    step they agree on, the write in flight is finished and published first, then the final checkpoint;
    the tracker names the last one, nothing unfinished is left and every kept checkpoint's checksums pass."""
    import re
    import signal

    ckpt = tmp_path / "ckpt"
    args = _with(ASYNC, "--exit-interval", "0") + ["--save", str(ckpt), "--exit-signal-handler"]
    text, left, code = _kill_during_async_write(
        args, tmp_path / "out.txt", None, ["checkpoint at iteration 3: writing to"], sig=signal.SIGTERM
    )
    assert code == 0 and not left, (code, left, text[-3000:])
    stop = re.search(r"exiting on SIGTERM after iteration (\d+) \(--exit-signal-handler\): saved checkpoint", text)
    assert stop and "saved checkpoint at iteration 3 " in text, text[-3000:]
    last = int(stop.group(1))
    assert last >= 3 and (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(last)
    assert _iters(ckpt) == [f"iter_{i:07d}" for i in (last - 1, last)]
    for it in _iters(ckpt):
        _checksums_pass(ckpt / it)


def test_async_writer_deadline_is_one_line(tmp_path):
    """A writer that hangs (fault) past --distributed-timeout-minutes: the run stops with one line naming
    --save and the flag, the writer is ended, the unfinished checkpoint removed, nothing tracked."""
    ckpt = tmp_path / "ckpt"
    # 3 s: the deadline is waited out (the writer hangs), a core idle meanwhile; the writer's start-up
    # has its own floor (async_save._START_S), the snapshot copy of the debug model takes milliseconds
    args = _with(ASYNC, "--exit-interval", "0") + ["--save", str(ckpt), "--distributed-timeout-minutes", "0.05"]
    line = one_line_error(plain(args, timeout=240, env={"INTERNVL_MCORE_FAULT": "save:1:0:hang"}))
    assert (
        line.startswith(
            f"error: --save {ckpt}: writing checkpoint iteration 1 failed (rank 0: the checkpoint writer (pid "
        )
        and "did not finish within 3 s (--distributed-timeout-minutes)" in line
    ), line
    assert "removed the partial tmp_iter_0000001" in line, line
    assert sorted(p.name for p in ckpt.iterdir()) == []
