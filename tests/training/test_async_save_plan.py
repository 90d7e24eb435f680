"""What keeps an --async-save's later saves out of the training step (issue 24, docs/checkpoints.md
"Async-save stall"): the first save's plan reused while the state keeps its structure
(training/async_save.py: AsyncWriter.plan_for / planned) and checksums.json written by rank 0 alone
from the checksums the writers computed (checkpoint/checksums.py: write_checksums_here). The CLI
runs: tests/training/test_async_save.py (DP2, the second save byte for byte a synchronous one's)
and tests/reliability/test_checkpoints.py (`async`)."""

from __future__ import annotations

import hashlib
import json

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from internvl_mcore.checkpoint.checksums import write_checksums_here
from internvl_mcore.training.async_save import AsyncWriter


def _state(shape, value=0.0):
    w = ShardedTensor.from_rank_offsets("w", torch.full(shape, value), replica_id=0)
    return {"model": {"w": w}, "step": 3}


def test_the_first_plan_is_reused_while_the_structure_stays():
    """megatron-core would plan the second save again (a gather of every rank's plan) to compare it with
    the first; here the first plan counts as checked for every save whose state has the same keys,
    shapes, offsets and dtypes (other values), and a state of another structure is planned afresh."""
    writer = AsyncWriter(timeout_s=5)
    s = writer.strategy
    writer.plan_for(_state((4, 2)))
    assert not s.validated_cache_reuse and s.cached_central_plan is None
    # what megatron-core's first save leaves behind: its plans cached, not validated; `last` its plan
    s.cached_central_plan, s.cached_local_plan, s.last = "central", "local", ("writer", "metadata", "wrapper")
    writer.planned()
    assert s.validated_cache_reuse and s.cached_global_metadata == "metadata"
    writer.plan_for(_state((4, 2), 1.0))
    assert s.validated_cache_reuse and s.cached_central_plan == "central" and s.cached_global_metadata == "metadata"
    writer.plan_for(_state((4, 3)))
    assert not s.validated_cache_reuse
    assert s.cached_central_plan is None and s.cached_local_plan is None and s.cached_global_metadata is None
    s.cached_central_plan, s.last = "central 2", ("writer", "metadata 2", "wrapper")
    writer.planned()
    assert s.validated_cache_reuse and s.cached_global_metadata == "metadata 2"


def test_checksums_written_by_one_rank_from_the_writers_checksums(tmp_path):
    """Every file but checksums.json listed with its size and sha256: the ones the writers hashed as
    they gave them, the others (the small files) hashed here; the same layout as write_checksums."""
    (tmp_path / "__0_0.distcp").write_bytes(b"tensor bytes")
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / ".metadata").write_bytes(b"meta")
    (tmp_path / "checksums.json").write_text("stale")
    write_checksums_here(tmp_path, {"__0_0.distcp": [12, "from the writer"], "gone.distcp": [1, "x"]})
    table = json.loads((tmp_path / "checksums.json").read_text())
    assert list(table) == [".metadata", "__0_0.distcp", "run.json"]
    assert table["__0_0.distcp"] == [12, "from the writer"]
    assert table["run.json"] == [2, hashlib.sha256(b"{}").hexdigest()]
    assert table[".metadata"] == [4, hashlib.sha256(b"meta").hexdigest()]
