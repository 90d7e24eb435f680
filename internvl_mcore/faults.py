"""Known points at which the signal tests interrupt a tool (INTERNVL_MCORE_FAULT, see
training/guards.py `fault_point` and data/preprocess.py): the tool says it is there, and waits."""

from __future__ import annotations

import os
import time
from typing import Callable


def wait_for_signal(marker: str, recorded: Callable[[], bool] = lambda: False, deadline_s: float = 120.0) -> None:
    """Print `MARKER: waiting for a signal` and wait until one arrives: a signal whose handler raises
    (Ctrl-C, SIGTERM) ends the wait with its exception, one whose handler only records it ends the
    wait once `recorded()` says so, SIGKILL ends the process. No signal within `deadline_s`: exit 1."""
    print(f"{marker}: waiting for a signal", flush=True)
    start = time.monotonic()
    while not recorded():
        if time.monotonic() - start > deadline_s:
            print(f"{marker}: no signal within {deadline_s:g} s", flush=True)
            os._exit(1)
        time.sleep(0.02)  # a raising handler runs here, at the latest when the sleep returns
