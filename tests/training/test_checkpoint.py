"""Checkpoints: exact resume, crashes (SIGKILL of a rank, death during a save), errors. Other layouts:
tests/reliability/test_reshard_resume.py. The runs whose subject is a crash or an error are real
launches (torchrun, a plain process); the others are jobs of the session's reused 2-rank world
(tests/conftest.py `pretrain`)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.launch import REPO, free_port, torchrun
from tests.conftest import DIST_ENV, SEQ, pretrain

SCRIPT = REPO / "pretrain_internvl.py"
ITERS, EVERY = 10, 5


def _args(shards, log, *extra):
    return [
        "--model",
        "debug",
        "--data-path",
        shards,
        "--global-batch-size",
        "4",
        "--train-iters",
        str(ITERS),
        "--seq-length",
        str(SEQ),
        "--lr",
        "2e-3",
        "--seed",
        "9",
        "--log-jsonl",
        str(log),
        *extra,
    ]


def _losses(log):
    return {r["iteration"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(digits_shards, tmp_path_factory):
    """10 iterations on 2 data-parallel ranks, checkpoints at 5 and 10."""
    d = tmp_path_factory.mktemp("ref")
    pretrain(2, _args(digits_shards, d / "log.jsonl", "--save", str(d / "ckpt"), "--save-interval", str(EVERY)))
    return d


def _checkpoint_at(src, dst, iteration):
    shutil.copytree(src, dst)
    for p in dst.glob("iter_*"):
        if int(p.name.split("_")[1]) > iteration:
            shutil.rmtree(p)
    (dst / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def test_resume_is_bit_exact(digits_shards, uninterrupted, tmp_path):
    ref = _losses(uninterrupted / "log.jsonl")
    _checkpoint_at(uninterrupted / "ckpt", tmp_path / "ckpt", EVERY)
    pretrain(2, _args(digits_shards, tmp_path / "log.jsonl", "--load", str(tmp_path / "ckpt")))
    resumed = _losses(tmp_path / "log.jsonl")
    assert sorted(resumed) == list(range(EVERY + 1, ITERS + 1))
    for it, loss in resumed.items():
        assert loss == ref[it], (it, loss, ref[it])  # bit-exact in fp32


def test_sigkill_of_one_rank_ends_the_job_and_restart_continues(digits_shards, uninterrupted, tmp_path):
    """SIGKILL to rank 1 while it waits at the fault point before step 3 (after the checkpoint of step 2:
    never a kill racing the run's end) and rank 0 goes on into step 3's collectives: the whole job ends
    within 60 s, not hung, and a restart continues the uninterrupted losses (steps 3 and 4 of the same
    10-step schedule: the kill and the restart need no more steps than that)."""
    ref = _losses(uninterrupted / "log.jsonl")
    log, ckpt, out = tmp_path / "log.jsonl", tmp_path / "ckpt", tmp_path / "out.txt"
    every = 2
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        # no loader workers: the subject is the kill (the loader's fork server would double the interpreters)
        *_args(digits_shards, log, "--save", str(ckpt), "--save-interval", str(every), "--num-workers", "0"),
    ]
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "INTERNVL_MCORE_FAULT": f"step:{every + 1}:1:wait",
    }
    with open(out, "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while f"fault point step {every + 1}: waiting for a signal" not in out.read_text():
            assert proc.poll() is None, f"training ended before it could be killed:\n{out.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"rank 1 never reached the fault point before step {every + 1}"
            time.sleep(0.1)
        # the ranks are torchrun's own children (their loader workers, forked deeper, share the cmdline)
        ranks = [c for c in psutil.Process(proc.pid).children() if "pretrain_internvl" in " ".join(c.cmdline())]
        next(c for c in ranks if c.environ().get("RANK") == "1").send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        rc = proc.wait(timeout=60)  # the whole job must end, not hang in a collective
        assert rc != 0 and time.monotonic() - killed_at <= 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(_losses(log)) == list(range(1, every + 1))  # no step after the kill
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(every)
    restart = tmp_path / "restart.jsonl"
    pretrain(2, _args(digits_shards, restart, "--load", str(ckpt), "--exit-interval", str(every + 2)))
    assert sorted(_losses(restart)) == [every + 1, every + 2]
    for it, loss in _losses(restart).items():
        assert loss == ref[it], (it, loss, ref[it])


def test_death_during_a_save_leaves_the_previous_checkpoint(digits_shards, uninterrupted, tmp_path):
    """Rank 1 SIGKILLs itself while writing checkpoint 4 (of one saved every 2 steps): checkpoint 2 stays
    the latest, nothing of 4 is published, and a resume from it repeats the uninterrupted step 3."""
    ref = _losses(uninterrupted / "log.jsonl")
    ckpt, every = tmp_path / "ckpt", 2
    with pytest.raises(AssertionError):
        torchrun(
            SCRIPT,
            2,
            # no loader workers: the subject is the death in a save (the fork servers would double the interpreters)
            _args(digits_shards, tmp_path / "a.jsonl", "--save", str(ckpt), "--save-interval", str(every))
            + ["--num-workers", "0"],
            timeout=400,
            env={"INTERNVL_MCORE_FAULT": f"save:{2 * every}:1"},
        )
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(every)
    assert not (ckpt / f"iter_{2 * every:07d}").exists()
    # one more step of the same 10-step schedule (a changed --train-iters would change the LR schedule)
    args = _args(digits_shards, tmp_path / "b.jsonl", "--load", str(ckpt), "--exit-interval", str(every + 1))
    pretrain(2, args)
    assert _losses(tmp_path / "b.jsonl") == {every + 1: ref[every + 1]}


@pytest.mark.parametrize("case", ["bad-data-path", "missing-checkpoint", "other-model"])
def test_clear_errors(digits_shards, uninterrupted, tmp_path, case):
    args = _args(digits_shards, tmp_path / "log.jsonl")
    expect = {"bad-data-path": "no-such-prefix", "missing-checkpoint": "no such directory", "other-model": "debug-6b"}[
        case
    ]
    if case == "bad-data-path":
        args[args.index("--data-path") + 1] = str(tmp_path / "no-such-prefix")
    elif case == "missing-checkpoint":
        args += ["--load", str(tmp_path / "nothing-here")]
    else:
        args[args.index("--model") + 1] = "debug-6b"
        args += ["--load", str(uninterrupted / "ckpt")]
    # one plain process (no torchrun agent: one interpreter fewer), without this pytest process's
    # leftover rendezvous variables
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode != 0
    assert expect in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def test_distributed_optimizer_resume_is_bit_exact(tmp_path):
    """The distributed optimizer's state (fully_reshardable format, Adam step included) round trips."""
    base = [
        "--model",
        "debug",
        "--mock-data",
        "--global-batch-size",
        "4",
        "--train-iters",
        "4",
        "--seq-length",
        "128",
        "--lr",
        "1e-3",
        "--use-distributed-optimizer",
    ]
    ckpt = tmp_path / "ckpt"
    pretrain(2, base + ["--save", str(ckpt), "--save-interval", "2", "--log-jsonl", str(tmp_path / "a.jsonl")])
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    pretrain(2, base + ["--load", str(ckpt), "--log-jsonl", str(tmp_path / "b.jsonl")])
    straight, resumed = _losses(tmp_path / "a.jsonl"), _losses(tmp_path / "b.jsonl")
    assert sorted(resumed) == [3, 4]
    assert all(resumed[i] == straight[i] for i in (3, 4)), (straight, resumed)


def test_saved_adam_step_is_found_in_every_optimizer_layout():
    """The Adam step a resume puts back: the distributed optimizer's param groups (not the zero its
    dp_reshardable buffer state holds), a plain optimizer's common_step, a chained optimizer's parts
    (synchronized: one value); this run's fresh plain state dicts get it as common_step."""
    import torch

    from internvl_mcore.training.checkpoint import _put_common_step, _saved_steps

    legacy_distributed = {
        "optimizer": {"param_groups": [{"step": 4, "lr": 1e-3}, {"step": 4}]},
        "param_state": {0: {"step": torch.tensor(0.0), "exp_avg": torch.zeros(2)}},
        "param_state_sharding_type": "dp_reshardable",
    }
    chained_plain = {
        0: {"state": {"common_step": torch.tensor(4.0)}, "param_groups": [{"lr": 1e-3}]},
        1: {"state": {"common_step": torch.tensor(4.0)}, "param_groups": [{"lr": 1e-3}]},
    }
    assert _saved_steps(legacy_distributed) == {4.0}
    assert _saved_steps(chained_plain) == {4.0}
    assert _saved_steps({"optimizer": {"param_groups": [{"lr": 1e-3}]}}) == set()  # before the first step
    fresh = {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    _put_common_step(fresh, {4.0})
    assert float(fresh["state"]["common_step"]) == 4.0 and "common_step" not in fresh["state"][0]
