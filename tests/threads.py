"""One torch thread for the computations a test runs in the pytest process.

torch's default intra-op pool has one thread per core (2 on CI). The tensors tests compute on in this
process are small (debug models, tiles of 56-448 px), and the pool's threads spin at every barrier:
on a loaded 2-core machine `tests/data/test_resample.py -k "every_grid or photos"` took 42-44 CPU-s
(275-307 s wall) with 2 threads and 10.6-11.8 CPU-s (47-81 s wall) with one, the same minutes
(docs/testing.md). Ranks and tools already run with OMP_NUM_THREADS=1 (tests/launch.py,
tests/worldpool.py), so this also makes in-process references use the kernels the ranks use.

tests/conftest.py imports `one_torch_thread`, which makes it autouse in every test module; session
fixtures that compute in this process wrap their work in `torch_threads(1)`. Nothing here imports torch: a module
whose tests never import it is left alone (the torch-free CLI checks stay torch-free).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import pytest


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Inside, torch (if this process imported it) computes with `n` intra-op threads; restored after."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Each test module (and its module fixtures): one thread (tests/conftest.py imports this)."""
    with torch_threads(1):
        yield
