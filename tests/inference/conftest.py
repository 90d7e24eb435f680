"""tests/inference: each module computes with one torch thread in this process (tests/threads.py)."""

from tests.threads import one_torch_thread  # noqa: F401 (autouse)
