"""The reused worlds of tests/worldpool.py: a job starts clean after another, a failing or hanging
job fails its test with the ranks' errors, and the next job gets a fresh world."""

import json
import os
import time

import pytest

from tests.conftest import pretrain
from tests.launch import REPO
from tests.worldpool import _WORLDS, RECYCLED, REPLACED, run_in_world

PROBE = REPO / "tests" / "parallel" / "worldpool_probe_worker.py"


def probe(tmp_path, name, *args, timeout=120.0):
    out = tmp_path / name
    out.mkdir()
    run_in_world(PROBE, 2, ["--out", str(out), *args], timeout=timeout, holders=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_job_finds_nothing_left_from_the_one_before(tmp_path):
    recycled = len(RECYCLED)
    first = probe(tmp_path, "first", "--tp", "2", "--moe-tracker")
    second = probe(tmp_path, "second", "--tp", "1")
    # megatron-core's MoE tracker held the TP group (every MoE job's world was replaced for it)
    assert [r["moe_tracker"] for r in second] == [[], []] and RECYCLED[recycled:] == [], (second, REPLACED)
    assert [r["pid"] for r in first] == [r["pid"] for r in second]  # the same processes: a reused world
    for rep in first + second:
        assert rep["model_parallel"] is False and rep["groups"] == 1 and rep["rng_states"] == [], rep
        assert rep["default_dtype"] == "torch.float32" and rep["env"] is None and rep["sigterm_default"], rep
        assert "model-parallel-rng" in rep["rng_after_init"], rep
    assert [r["tp_after_init"] for r in first] == [2, 2] and [r["tp_after_init"] for r in second] == [1, 1]
    for before, after in zip(first, second):  # the threads of the first job's gloo groups ended with them
        assert after["threads"] < before["threads_after_init"], (before, after)
    # only the default group's gloo thread polls: megatron-core forgets two groups in
    # destroy_model_parallel, which kept their threads waking every 10 ms for the rest of the session
    assert [r["gloo_threads"] for r in second] == [1, 1], second


def test_a_job_that_keeps_a_group_gets_its_world_replaced(tmp_path):
    """Also: a closed world leaves no process behind. A spawned Manager a job keeps (megatron-core's
    save-results queue does) ends with its rank: the ranks leave through os._exit, which skips
    multiprocessing's own exit hook. (The replacement closes the world with World.close, as the end of
    the session does; checked here, not in a test of its own that started and closed one more world.)"""
    first = probe(tmp_path, "first", "--manager")
    pids = [r["manager_pid"] for r in first]
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)  # kept by the world after its job
    recycled = len(RECYCLED)
    probe(tmp_path, "keeper", "--keep-group")
    assert RECYCLED[recycled:] == [2]
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids), pids
    # the summary names the test whose job it was and the reference that kept the group
    assert (
        REPLACED[-1]["test"]
        == "tests/parallel/test_worldpool.py::test_a_job_that_keeps_a_group_gets_its_world_replaced"
    )
    assert REPLACED[-1]["holders"] == ["json.worldpool_probe_group"] and REPLACED[-1]["threads"] == 1, REPLACED[-1]
    after = probe(tmp_path, "after")
    assert not {r["pid"] for r in first} & {r["pid"] for r in after}  # a fresh world, not one left polling
    assert [r["gloo_threads"] for r in after] == [1, 1], after


def test_an_moe_training_job_leaves_no_group_behind(tmp_path):
    """A debug-moe run at EP2 (megatron-core's all-to-all dispatcher kept the last forward's routing
    graph, which held the model, DDP and their groups: every MoE job's world was replaced)."""
    recycled = len(RECYCLED)
    moe = ["--model", "debug-moe", "--mock-data", "--seq-length", "64", "--train-iters", "1"]
    pretrain(2, [*moe, "--global-batch-size", "2", "--micro-batch-size", "1", "--expert-model-parallel-size", "2"])
    assert RECYCLED[recycled:] == [], REPLACED[recycled:]
    world = _WORLDS[2]
    after = probe(tmp_path, "after")
    assert _WORLDS[2] is world and after[0]["pid"] == world.procs[0].pid  # the same world served the next job
    assert [r["gloo_threads"] for r in after] == [1, 1], after


def test_a_failing_job_fails_with_every_rank_and_the_next_gets_a_fresh_world(tmp_path):
    before = probe(tmp_path, "before")
    with pytest.raises(AssertionError) as failed:
        probe(tmp_path, "failing", "--fail")
    assert "RuntimeError: probe failure on rank 0" in str(failed.value)
    assert "rank 1 died (exit code 3)" in str(failed.value)
    after = probe(tmp_path, "after", "--tp", "2")
    assert not {r["pid"] for r in before} & {r["pid"] for r in after}
    assert all(r["model_parallel"] is False and r["groups"] == 1 for r in after)


def test_a_job_past_its_deadline_fails(tmp_path):
    hang = REPO / "tests" / "parallel" / "worldpool_hang_worker.py"
    # rank 1 never replies, so the deadline is waited out: short, a core idles for its length
    with pytest.raises(AssertionError, match=r"no reply within 2s"):
        run_in_world(hang, 2, [], timeout=2.0)
