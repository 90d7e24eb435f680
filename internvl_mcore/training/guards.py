"""Guards of a long run: non-finite loss / gradient norm, loss spikes, lost ranks (the straggler report: metrics.py).

Every decision here is taken from numbers that are identical on all ranks (the all-reduced loss,
megatron-core's global gradient norm), so all ranks stop or skip together; the extra collectives
that say *which* rank went non-finite run only once the run is already stopping.
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections import deque
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ..faults import wait_for_signal
from ..parallel.state import comm_device
from .preemption import stop_requested

SPIKE_WINDOW = 20  # updated steps the running mean covers
SPIKE_WARMUP = 5  # updated steps seen before any step is skipped (the first losses fall fast)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN / Inf; the message names the iteration, the value and the ranks."""


class PeerLost(RuntimeError):
    """A collective failed or timed out: another rank died or stalled."""


def _local_nonfinite(losses: Iterable[dict], model: list) -> list[bool]:
    """[this rank's microbatch losses non-finite, this rank's gradients non-finite]."""
    bad_loss = any(not torch.isfinite(item["lm loss"].detach()).all() for item in losses)
    bad_grad = False
    for chunk in model:
        for p in chunk.parameters():
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            if grad is not None and not torch.isfinite(grad).all():
                bad_grad = True
                break
    return [bad_loss, bad_grad]


def _ranks_with(flags: list[bool]) -> tuple[list[int], list[int]]:
    """All-gather the per-rank flags (collective): (ranks with a non-finite loss, ... gradient)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    table = torch.zeros(world, 2, dtype=torch.int32, device=comm_device())
    table[rank] = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(table)
    table = table.cpu()
    return [r for r in range(world) if table[r, 0]], [r for r in range(world) if table[r, 1]]


def check_finite(iteration: int, loss: float, grad_norm: Optional[float], losses: list, model: list) -> None:
    """Raise TrainingDiverged (on every rank) when the step's loss or gradient norm is not finite.
    Collective when it raises: every rank reaches the same verdict from the same numbers."""
    bad = [f"loss {loss}"] if not math.isfinite(loss) else []
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"grad norm {grad_norm}")
    if not bad:
        return
    loss_ranks, grad_ranks = _ranks_with(_local_nonfinite(losses, model))
    where = []
    if loss_ranks:
        where.append(f"non-finite microbatch losses on rank(s) {', '.join(map(str, loss_ranks))}")
    if grad_ranks:
        where.append(f"non-finite gradients on rank(s) {', '.join(map(str, grad_ranks))}")
    raise TrainingDiverged(
        f"iteration {iteration}: {' and '.join(bad)} ({'; '.join(where) or 'no rank holds a non-finite value itself'}); "
        "stopping without saving: the latest checkpoint is the last good one (lower --lr, or resume from it)"
    )


class SpikeGuard:
    """--skip-spike-factor F: a step whose loss exceeds F x the mean loss of the last SPIKE_WINDOW
    updated steps is not applied (from the SPIKE_WARMUP+1-th update on). The state is a few floats
    saved in every checkpoint, so a resumed run skips exactly the steps the uninterrupted one does."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.skipped = 0

    def should_skip(self, loss: float) -> bool:
        """Decide for this step's (all-reduced) loss; remembers the loss of every updated step."""
        if len(self.history) >= SPIKE_WARMUP and loss > self.factor * self.mean():
            self.skipped += 1
            return True
        self.history.append(loss)
        return False

    def mean(self) -> float:
        return sum(self.history) / len(self.history)

    def state_dict(self) -> dict:
        return {"factor": self.factor, "history": list(self.history), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=SPIKE_WINDOW)
        self.skipped = int(state["skipped"])


def is_collective_failure(exc: BaseException) -> bool:
    """Does this exception come from a collective whose peer died or timed out (gloo / NCCL)?"""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text
        for s in (
            "gloo",
            "Gloo",
            "NCCL",
            "Timed out",
            "timed out",
            "Connection closed",
            "Connection reset",
            "Broken pipe",
        )
    )


def peer_lost(exc: BaseException, iteration: int, timeout_minutes: float) -> PeerLost:
    """The one-line message of a rank that gave up on its peers."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return PeerLost(
        f"rank {dist.get_rank()}: a collective failed during iteration {iteration + 1} ({first}): "
        f"another rank died or stalled (--distributed-timeout-minutes {timeout_minutes:g}); stopping"
    )


def fault_point(where: str, iteration: int, rank: Optional[int] = None) -> None:
    """Fault injection for the crash and signal tests: INTERNVL_MCORE_FAULT=WHERE:ITER:RANK[:ACTION]
    makes RANK, at WHERE ("save": tensors of ITER written, checkpoint not yet renamed, which under
    --async-save is in RANK's checkpoint writer process (`rank` given: it has no process group), so
    kill ends the writer and wait holds the write open; "step": before step ITER), SIGKILL itself
    (ACTION kill, the default), exit at once (exit), stop answering (hang),
    fail as a full disk does (enospc: OSError ENOSPC, as a write would raise it) or print
    `fault point WHERE ITER: waiting for a signal` and wait for one (wait), so a test sends its signal
    at a known point instead of after a sleep."""
    spec = os.environ.get("INTERNVL_MCORE_FAULT", "")
    if not spec:
        return
    kind, it, rank_, *action = spec.split(":")
    if kind != where or int(it) != iteration or int(rank_) != (dist.get_rank() if rank is None else rank):
        return
    action = action[0] if action else "kill"
    if action == "hang":
        while True:
            time.sleep(60)
    if action == "wait":
        wait_for_signal(f"fault point {where} {iteration}", recorded=stop_requested)
        return
    if action == "exit":
        os._exit(1)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), 9)


def agreed_stop() -> bool:
    """Whether any rank got SIGTERM under --exit-signal-handler (training/preemption.py; collective
    over every rank): all ranks get the same answer after the same step, so they save and stop together."""
    flag = torch.tensor([1 if stop_requested() else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
