"""Worker processes (the loader's and the preprocessing pool's) leave when their parent is SIGKILLed:
forked workers hold copies of every pipe and would otherwise wait for work forever, keeping a killed
job's output open (a torchrun job whose rank was killed then never ends)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import multiprocessing as mp, os, time
    from concurrent.futures import ProcessPoolExecutor
    from internvl_mcore.data import loader

    def pid(_):
        return os.getpid()

    ex = ProcessPoolExecutor(1, mp_context=mp.get_context("fork"), initializer=loader._set_worker_loader,
                             initargs=(None, os.getpid()))
    print(ex.submit(pid, 0).result(), flush=True)
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
