"""SIGTERM (a scheduler's preemption or time limit) and the helper processes a rank starts.

Without --exit-signal-handler, SIGTERM ends a rank at once, as Ctrl-C does: `Terminated` is raised
where the rank is, and pretrain_internvl.py prints one line and exits 143 after ending the rank's
helper processes. With --exit-signal-handler (Megatron-LM's flag) the signal only sets a flag; at
the end of every step the ranks all-reduce their flags (guards.py `agreed_stop`: one tiny
collective), so all of them stop after the same step: they save a checkpoint (with --save) and exit 0 with one line naming it.

A rank's helpers (megatron-core's checkpoint writer processes and its multiprocessing Manager, the
data loader's workers) die with the rank however it dies: every child multiprocessing forks or
spawns asks the kernel for SIGKILL when its parent ends (prctl PR_SET_PDEATHSIG), so not even a
kill -9 of the rank leaves one behind. Under --exit-signal-handler they ignore SIGTERM, so a signal
sent to the whole process group (as schedulers do) does not kill the workers the last step and the
save still need; megatron's --exit-signal-handler-for-dataloader, which does that for its
DataLoader, is therefore not needed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ENV = "INTERNVL_MCORE_EXIT_SIGNAL_HANDLER"  # inherited by spawned helpers: how they treat SIGTERM
_PR_SET_PDEATHSIG = 1
_state = {"requested": False, "installed_fork_hook": False}


class Terminated(BaseException):
    """SIGTERM without --exit-signal-handler: a BaseException, like KeyboardInterrupt, so no
    `except Exception` on the way up swallows it."""


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


# looked up now: a child forked from a multi-threaded rank must not dlopen (another thread may have
# held the loader's lock at the fork)
_PRCTL = _find_prctl()


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the thread that started it) ends."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def end_helpers(timeout_s: float = 10.0) -> None:
    """End this process's multiprocessing children (megatron-core's spawned save-results Manager,
    checkpoint writers) before an `os._exit`, which skips multiprocessing's own exit hook: orphaned,
    a Manager waits on its socket forever and a helper keeps the job's output pipes open. SIGKILL,
    not SIGTERM: under --exit-signal-handler (or an inherited SIG_IGN) helpers ignore SIGTERM."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=timeout_s)


def child_of_run() -> None:
    """In a helper process of a rank (forked, or spawned: it imports pretrain_internvl.py as
    __mp_main__): die with the rank, and under --exit-signal-handler ignore SIGTERM."""
    die_with_parent()
    keep_running = os.environ.get(ENV) == "1"
    signal.signal(signal.SIGTERM, signal.SIG_IGN if keep_running else signal.SIG_DFL)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _request_stop(signum: int, frame: object) -> None:
    if not _state["requested"]:
        print(
            f"received SIGTERM (pid {os.getpid()}): saving and stopping after this step (--exit-signal-handler)",
            flush=True,
        )
    _state["requested"] = True


def install(exit_signal_handler: bool) -> None:
    """Route SIGTERM of this (rank) process, and make the helpers it will start die with it."""
    os.environ[ENV] = "1" if exit_signal_handler else "0"
    signal.signal(signal.SIGTERM, _request_stop if exit_signal_handler else _terminate)
    if not _state["installed_fork_hook"]:
        os.register_at_fork(after_in_child=child_of_run)
        _state["installed_fork_hook"] = True


def stop_requested() -> bool:
    """Whether this process got SIGTERM under --exit-signal-handler."""
    return _state["requested"]
