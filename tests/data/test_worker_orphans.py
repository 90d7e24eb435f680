"""Worker processes (the loader's and the preprocessing pool's) leave when their parent is SIGKILLed:
workers hold copies of the job's output pipes and would otherwise wait for work forever, keeping a killed
job's output open (a torchrun job whose rank was killed then never ends)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import time
    from internvl_mcore.data.workers import WorkerPool

    pool = WorkerPool(1, len, "", abs, timeout_s=60)  # the loader's pool, with trivial work
    pool.submit(0, -1, "a number")
    assert pool.result(0) == 1
    print(pool._workers[0].proc.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_loader_worker_exits_when_its_rank_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert _alive(worker)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the loader worker outlived its SIGKILLed parent"
    assert parent.stdout.read() == ""  # and the pipe it shared reached EOF
