"""Preloaded by the preprocessing pool's fork server in test_dead_workers_are_retried_once_then_rejected:
the workers it forks SIGKILL themselves on one record every time, os._exit() on another once (marker
file: $CRASH_ONCE_MARKER) and never finish a third (as a decoder stuck on a file). (Workers are not
forked from the test process, so a monkeypatch there does not reach them.)"""

import os
import signal
import time

from internvl_mcore.data import preprocess

_real = preprocess.process_record


def _crashing(ctx, ordinal, record):
    name, line = getattr(getattr(record, "dataset", None), "name", None), getattr(record, "line", None)
    if (name, line) == ("single", 2):
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
    if (name, line) == ("single", 6):
        while True:
            time.sleep(1)
    marker = os.environ["CRASH_ONCE_MARKER"]
    if (name, line) == ("multi", 1) and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # as a segfault in a decoder would, once
    return _real(ctx, ordinal, record)


preprocess.process_record = _crashing
