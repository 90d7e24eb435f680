"""Reused gloo worlds: long-lived rank processes per world size that run worker scripts as jobs.

A worker-script test used to start `torchrun` per check: the agent plus N ranks, each importing
torch and megatron-core (~4.6 s of CPU apiece) before the first check ran. Here each world size gets
N plain rank processes once per pytest session (lazily, on the first job of that size), with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; OMP_NUM_THREADS=1) and the default gloo
group initialised once. `run_in_world(script, nproc, args)` hands every rank the script and its argv;
each runs it as `__main__` (runpy, like `python script args`), then the world is torn down to the
default group (`reset_job_state`) and each rank reports success or its traceback over a pipe.
pretrain_internvl.py itself runs so (tests/conftest.py `pretrain`): its `main` returns on success; a
run that fails exits the rank (`os._exit`), which ends the world like any dead rank.

Scripts join the world through `init_distributed` (internvl_mcore/parallel/state.py), which keeps an
initialised default group, so a script runs unchanged under torchrun and here.

Failure handling: every job has a deadline. A rank that dies, a job past its deadline, a rank that
raised (its peers may be blocked in a collective with it) or a job that destroyed the default group
ends the whole world (SIGKILL to each rank's process group); the test fails with every rank's
traceback and the tail of its output, and the next job of that size starts a fresh world.

Run as a script, this file is one rank's job loop (`serve`).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300.0  # a world's ranks importing torch + megatron-core on a loaded 2-core machine
FAILED_PEER_GRACE = 30.0  # after one rank raised: how long its peers get to report before the world ends
_WORLDS: dict[int, "World"] = {}
RECYCLED: list[int] = []  # the sizes of worlds ended because a job left gloo groups polling
REPLACED: list[dict] = []  # the same, one record per world: the test, the job, what held its groups
_BASE_GLOO_THREADS = 0  # a rank's gloo threads with only the default group (set by `serve`)


class World:
    """`size` rank processes with a default gloo group; jobs run on all of them."""

    def __init__(self, size: int) -> None:
        from tests.launch import free_port

        self.size, self.jobs = size, 0
        env = {
            **os.environ,
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(size),
            "LOCAL_WORLD_SIZE": str(size),
            "GROUP_RANK": "0",
        }
        self.procs, self.results, self.logs = [], [], []
        for rank in range(size):
            log = tempfile.NamedTemporaryFile(prefix=f"worldpool{size}.rank{rank}.", suffix=".log", delete=False)
            read_fd, write_fd = os.pipe()
            proc = subprocess.Popen(
                [sys.executable, __file__],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLDPOOL_RESULT_FD": str(write_fd)},
                pass_fds=(write_fd,),
                start_new_session=True,
                text=True,
            )
            os.close(write_fd)
            log.close()
            self.procs.append(proc)
            self.results.append(os.fdopen(read_fd, "r"))
            self.logs.append(Path(log.name))
        replies = self._collect(START_TIMEOUT, "start")
        if any(not r.get("ready") for r in replies):
            self.fail("did not start", replies)

    def run(self, script: str | Path, args: list[str], timeout: float, holders: bool = False) -> str:
        """Run `script args` on every rank; return the ranks' output, or raise AssertionError with it."""
        self.jobs += 1
        offsets = [log.stat().st_size for log in self.logs]
        job = {"script": str(script), "argv": [str(a) for a in args], "n": self.jobs, "holders": holders}
        job = json.dumps(job) + "\n"
        for proc in self.procs:
            try:
                proc.stdin.write(job)
                proc.stdin.flush()
            except OSError:
                pass  # a dead rank: _collect reports it
        try:
            replies = self._collect(timeout, f"{Path(script).name} {' '.join(map(str, args))}"[:300])
        except BaseException:  # Ctrl-C in pytest: the ranks are mid-job, only killing them ends it
            self.close(kill=True)
            raise
        output = self._output(offsets)
        if any("error" in r for r in replies) or len(replies) < self.size:
            self.fail(f"job {self.jobs} failed", replies, output)
        if not all(r.get("world_intact") for r in replies):
            self.close(kill=True)  # the job destroyed the default group: the next job needs a fresh world
        elif any(r.get("recycle") for r in replies):
            RECYCLED.append(self.size)
            REPLACED.append(_replacement(self.size, script, args, replies))
            self.close()  # groups left polling (reset_job_state could not reach them): a fresh world is cheaper
        return output

    def _collect(self, timeout: float, what: str) -> list[dict]:
        """One reply line per rank, until the deadline (shortened once a rank has raised) or a rank dies."""
        deadline = time.monotonic() + timeout
        replies: dict[int, dict] = {}
        while len(replies) < self.size:
            left = deadline - time.monotonic()
            waiting = {self.results[r].fileno(): r for r in range(self.size) if r not in replies}
            # a rank's forked helpers may hold its pipe open after it died: look at the ranks each second
            ready = select.select(list(waiting), [], [], min(left, 1.0))[0] if left > 0 else []
            for r in waiting.values():
                if r not in replies and not ready and self.procs[r].poll() is not None:
                    replies[r] = {"error": f"rank {r} died (exit code {self.procs[r].returncode})"}
                    deadline = min(deadline, time.monotonic() + FAILED_PEER_GRACE)
            if left <= 0:
                for r in waiting.values():
                    replies.setdefault(r, {"error": f"no reply within {timeout:.0f}s ({what})"})
                break
            for fd in ready:
                r = waiting[fd]
                line = self.results[r].readline()
                replies[r] = json.loads(line) if line else {"error": f"rank {r} died (exit code {self._exit_code(r)})"}
                if "error" in replies[r]:
                    deadline = min(deadline, time.monotonic() + FAILED_PEER_GRACE)
        return [replies[r] for r in range(self.size)]

    def _exit_code(self, rank: int) -> int | None:
        """A rank whose pipe closed: its exit status (the pipe closes just before the process is reaped)."""
        try:
            return self.procs[rank].wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None

    def _output(self, offsets: list[int]) -> str:
        parts = []
        for rank, (log, start) in enumerate(zip(self.logs, offsets)):
            with open(log, errors="replace") as f:
                f.seek(start)
                parts.append(f"--- rank {rank} ---\n{f.read()}")
        return "\n".join(parts)

    def fail(self, why: str, replies: list[dict], output: str | None = None) -> None:
        """End this world and raise with every rank's error and the tail of its output."""
        output = output if output is not None else self._output([0] * self.size)
        self.close(kill=True)  # removes the logs
        errors = "\n".join(f"--- rank {r}: {rep.get('error', 'ok')}" for r, rep in enumerate(replies))
        raise AssertionError(f"world of {self.size}: {why}\n{errors}\n{output[-12000:]}")

    def close(self, kill: bool = False) -> None:
        """Stop the ranks (asked to finish, or killed with their children) and remove their logs."""
        if _WORLDS.get(self.size) is self:
            del _WORLDS[self.size]
        for proc in self.procs:
            if kill:
                _kill_group(proc)
            elif proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()  # end of jobs: the rank destroys its groups and exits
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait(timeout=60)
        for stream in self.results:
            stream.close()
        for log in self.logs:
            log.unlink(missing_ok=True)


def _replacement(size: int, script: str | Path, args: list[str], replies: list[dict]) -> dict:
    """Which test's job left groups polling, and where they are referenced from (each rank's finding)."""
    holders = sorted({h for r in replies for h in r.get("holders", ())})
    return {
        "size": size,
        "test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0],  # "nodeid (call)"
        "job": f"{Path(script).name} {' '.join(map(str, args))}"[:200],
        "threads": max(r.get("recycle", 0) for r in replies),
        "holders": holders,
    }


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the rank and what it started (data workers, writers)
    except ProcessLookupError:
        pass


def run_in_world(script: str | Path, nproc: int, args: list[str], timeout: float = 300.0, holders: bool = False) -> str:
    """`torchrun(script, nproc, args)` on this session's world of `nproc` ranks (started on first use);
    returns the ranks' output; raises AssertionError with it if the job fails or passes `timeout`.
    `holders`: if the job leaves groups alive, find what references them (`group_holders`: a walk of
    the heap's referrers, minutes for a job that built a model; also on for every job with
    WORLDPOOL_HOLDERS=1 in the environment)."""
    world = _WORLDS.get(nproc)
    if world is None:
        world = _WORLDS[nproc] = World(nproc)
    return world.run(script, args, timeout, holders or os.environ.get("WORLDPOOL_HOLDERS") == "1")


@atexit.register
def close_all() -> None:
    """End every world (pytest's exit; each rank also dies with this process: `_die_with_parent`)."""
    for world in list(_WORLDS.values()):
        world.close()


# ------------------------------------------------------------------------------------------------
# the rank side


def _die_with_parent() -> None:
    """SIGKILL this rank when pytest ends abruptly (Linux prctl PR_SET_PDEATHSIG; elsewhere the
    closed stdin ends the job loop once the current job is done)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def reset_job_state() -> None:
    """What one job leaves behind, torn down so the next starts like a fresh torchrun rank: megatron-core's
    parallel state (groups, global memory buffer), the RNG tracker, the microbatch calculator, the MoE
    router losses' tracker, and every process group but the default one (megatron-core's
    destroy_model_parallel drops most of its groups without destroying them; their gloo threads would
    pile up)."""
    import gc

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from megatron.core.transformer.moe import moe_utils

    parallel_state.destroy_model_parallel()
    _drop_group_globals(parallel_state)
    initialize_rng_tracker(force_reset=True)  # a new tracker without states, as before the first seeding
    destroy_num_microbatches_calculator()
    # megatron-core's routers record their load-balancing loss in a module-level dict with the group it
    # is reduced over (moe_utils.save_to_aux_losses_tracker): every MoE job kept its TP x CP group's
    # gloo thread polling, and a later MoE job would add to the first one's per-layer sums
    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    # an --async-save run froze its heap (training/async_save.py AsyncWriter.prepare): the job's model and
    # optimizer would never be collected, and the next job's collections would differ from a fresh rank's
    gc.unfreeze()
    gc.collect()  # the job's models and optimizers hold groups too
    if dist.is_initialized():
        world = dist.GroupMember.WORLD
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not world:
                dist.destroy_process_group(group)


def _drop_group_globals(module) -> None:
    """None every process group a module's globals still hold: megatron-core 0.16.1's
    destroy_model_parallel forgets `_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP` and its gloo twin, and a
    referenced gloo group keeps its I/O thread polling every 10 ms after destroy_process_group: an idle
    world burned ~0.5 core for the rest of the session (docs/testing.md, "Per-test CPU profile")."""
    import torch.distributed as dist

    def holds_group(value) -> bool:
        if isinstance(value, dist.ProcessGroup):
            return True
        if isinstance(value, (list, tuple)):
            return any(holds_group(v) for v in value)
        if isinstance(value, dict):
            return any(holds_group(v) for v in value.values())
        return False

    for name, value in list(vars(module).items()):
        if name.isupper() or name.startswith("_"):
            if holds_group(value):
                setattr(module, name, None)


def _settled_polling(deadline_s: float = 2.0) -> int:
    """Gloo threads above the default group's once they stop ending: a destroyed group's I/O thread
    can still be exiting when the job returns (CI21 counted 2 after a job that kept one group)."""
    end = time.monotonic() + deadline_s
    polling = gloo_threads() - _BASE_GLOO_THREADS
    while polling > 0 and time.monotonic() < end:
        time.sleep(0.05)
        polling = gloo_threads() - _BASE_GLOO_THREADS
    return polling


def gloo_threads() -> int:
    """This process's gloo I/O threads: one per live gloo group (polling, so never free when idle)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "gloo_tcp_loop"
        except OSError:
            pass
    return count


def group_holders(limit: int = 8) -> list[str]:
    """Where the process groups that outlived a job's teardown are referenced from: a path from a module
    global (`pkg.mod.NAME.attr[key]`), else the type of an object holding one (`limit` groups looked at)."""
    import gc

    import torch.distributed as dist
    from torch._C._distributed_c10d import Backend, ProcessGroup

    world = dist.GroupMember.WORLD
    keep = {id(world), *(id(world._get_backend(d)) for d in world._device_types)}
    gc.collect()
    groups: dict[int, object] = {}
    for obj in gc.get_objects():
        for ref in gc.get_referents(obj):
            if isinstance(ref, (ProcessGroup, Backend)) and id(ref) not in keep:
                groups.setdefault(id(ref), ref)
    found = list(groups.values())[:limit]
    groups.clear()
    return sorted({_path_to(group, ignore={id(found)}) for group in found})


def _path_to(target: object, ignore: set[int], depth: int = 8, width: int = 64) -> str:
    """`target`'s name from a module's globals, searching `depth` referrer steps up (at most `width`
    objects a step; not through the objects in `ignore`); else the chain of types the search went up."""
    import gc

    modules = {id(vars(m)): name for name, m in list(sys.modules.items()) if hasattr(m, "__dict__")}
    objs, paths, chains, seen = [target], [""], [""], {id(target), *ignore}
    last = ""
    for _ in range(depth):
        up, up_paths, up_chains = [], [], []
        for i in range(len(objs)):  # not zip: its tuples would be referrers of the objects
            obj, path, chain = objs[i], paths[i], chains[i]
            for parent in gc.get_referrers(obj):
                if id(parent) in seen or parent is objs or parent is up or type(parent).__name__ == "frame":
                    continue
                seen.add(id(parent))
                edge = _edge(parent, obj)
                if id(parent) in modules:
                    return f"{modules[id(parent)]}.{edge.lstrip('.')}{path}"
                up.append(parent)
                up_paths.append(edge + path)
                up_chains.append(f"{chain} in a {type(parent).__module__}.{type(parent).__qualname__}")
        objs, paths, chains = up[:width], up_paths[:width], up_chains[:width]
        last = chains[0] if chains else last
    return f"no module global:{last}" if last else "nothing in Python"


def _edge(parent: object, child: object) -> str:
    """How `parent` refers to `child`: `.attr`, `[key]`, `[i]`, nothing (its __dict__), else `<type>`."""
    attrs = getattr(parent, "__dict__", None) if not isinstance(parent, dict) else None
    if attrs is child:
        return ""
    for items in (parent, attrs):
        if isinstance(items, dict):
            for key, value in items.items():
                if value is child:
                    return f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]"
    if isinstance(parent, (list, tuple)):
        for i, value in enumerate(parent):
            if value is child:
                return f"[{i}]"
    return f"<{type(parent).__qualname__}>"


def job_leftovers() -> list[str]:
    """What a job start would find left over from the one before (empty: nothing)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random
    from megatron.core.transformer.moe import moe_utils

    found = []
    if parallel_state.model_parallel_is_initialized() or parallel_state._GLOBAL_MEMORY_BUFFER is not None:
        found.append("megatron-core parallel state")
    if random.get_cuda_rng_tracker().get_states():
        found.append("RNG tracker states")
    if moe_utils.get_moe_layer_wise_logging_tracker():
        found.append("MoE aux-loss tracker entries")
    if dist.is_initialized() and len(dist.distributed_c10d._world.pg_map) != 1:
        found.append(f"{len(dist.distributed_c10d._world.pg_map) - 1} process groups besides the default")
    return found


def _run_job(job: dict) -> dict:
    """Run one job as `__main__` with its argv, then restore what a script may change in-process."""
    import random
    import runpy
    import traceback
    import warnings

    import numpy as np
    import torch
    import torch.distributed as dist

    saved = (
        list(sys.argv),
        list(sys.path),
        dict(os.environ),
        os.getcwd(),
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
        torch.get_num_threads(),
    )
    print(f"=== worldpool job {job['n']}: {job['script']} {' '.join(job['argv'])}"[:2000], flush=True)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    reply: dict = {}
    try:
        sys.argv = [job["script"], *job["argv"]]
        sys.path.insert(0, str(Path(job["script"]).parent))  # as `python script` puts it first
        with warnings.catch_warnings():
            runpy.run_path(job["script"], run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            reply["error"] = f"exit {exc.code}\n{traceback.format_exc()}"
    except BaseException:  # noqa: BLE001 - the rank's traceback goes to the test
        reply["error"] = traceback.format_exc()
    finally:
        sys.argv[:], sys.path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        os.chdir(saved[3])
        for sig, handler in saved[4].items():
            signal.signal(sig, handler)
        torch.set_default_dtype(saved[5])
        torch.set_grad_enabled(saved[6])
        torch.set_num_threads(saved[7])
        sys.stdout.flush()
        sys.stderr.flush()
    reply["world_intact"] = dist.is_initialized()
    if reply["world_intact"]:
        try:
            reset_job_state()
            left = job_leftovers()
        except Exception:  # noqa: BLE001 - reported: the world is ended and restarted
            left = [traceback.format_exc()]
        polling = _settled_polling()
        if left:
            reply["error"] = reply.get("error", "") + f"teardown left: {', '.join(left)}"
        elif polling > 0:
            # groups something still references (not in torch's map, so not the job's to destroy): they
            # would poll for the rest of the session, so this world ends after the job and the next job
            # of its size starts a fresh one
            reply["recycle"] = polling
            # a heap walk (every gc.get_referrers call scans the whole heap): 90-190 s after an MoE job
            reply["holders"] = group_holders() if job.get("holders") else []
    return reply


def serve() -> None:
    """One rank: join the default gloo group, then run jobs (JSON lines on stdin) until stdin ends."""
    from datetime import timedelta

    _die_with_parent()
    results = os.fdopen(int(os.environ["WORLDPOOL_RESULT_FD"]), "w")
    sys.path[0] = str(REPO)  # not tests/, where `python tests/worldpool.py` starts it
    import torch.distributed as dist

    import internvl_mcore.parallel.state  # noqa: F401 - torch + megatron-core, imported once per rank

    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    global _BASE_GLOO_THREADS
    _BASE_GLOO_THREADS = gloo_threads()
    results.write(json.dumps({"ready": True}) + "\n")
    results.flush()
    for line in sys.stdin:
        reply = _run_job(json.loads(line))
        results.write(json.dumps(reply) + "\n")
        results.flush()
        if not reply["world_intact"]:
            break
    # the groups end while the interpreter is whole: gloo threads left to interpreter finalization can
    # abort the process ("terminate called without an active exception", tests/plan/test_state_bytes.py)
    if dist.is_initialized():
        reset_job_state()
        dist.destroy_process_group()
    _stop_children()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop_children() -> None:
    """End the processes jobs left running under this rank (megatron-core's save-results Manager,
    spawned at a job's first checkpoint save and kept by its module for the later jobs): the same
    hand-off as pretrain_internvl.py's exit (each session left one ~300 MB process per rank behind)."""
    from internvl_mcore.training.preemption import end_helpers

    end_helpers()


if __name__ == "__main__":
    serve()
