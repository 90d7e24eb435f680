"""megatron-core's pipeline schedules, run in the process groups init_distributed returned.

Called without them, `get_forward_backward_func()` picks the schedule from megatron-core's global
parallel_state and the schedule builds its groups (and the pipeline's P2P communicator) from there
too; here the caller's collection decides both, and the schedule hands it on to
`finalize_model_grads`.
"""

from __future__ import annotations

from typing import Any

from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config


def forward_backward(pg: ProcessGroupCollection, **kwargs: Any) -> list:
    """megatron-core's forward_backward_func (no pipelining, or 1F1B over `pg.pp`) for this run's
    model chunks (`model=`), with megatron-core's keyword arguments; returns its per-microbatch losses."""
    pp = pg.pp.size()
    # the 1F1B schedule takes the communicator and the groups together; without pipelining it needs none
    p2p = P2PCommunicator(pp_group=pg.pp, config=get_model_config(kwargs["model"][0])) if pp > 1 else None
    return get_forward_backward_func(pp_size=pp, vp_size=None)(pg_collection=pg, p2p_communicator=p2p, **kwargs)
