"""megatron-core's pipeline schedules, run in the process groups init_distributed returned.

Called without them, `get_forward_backward_func()` picks the schedule from megatron-core's global
parallel_state and the schedule builds its groups (and the pipeline's P2P communicator) from there
too; here the caller's collection decides both, and the schedule hands it on to
`finalize_model_grads`. Several model chunks per rank (models/internvl.py: build_model_chunks) run
megatron-core's interleaved (virtual pipeline) schedule.
"""

from __future__ import annotations

import itertools
from typing import Any

from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config


def forward_backward(pg: ProcessGroupCollection, **kwargs: Any) -> list:
    """megatron-core's forward_backward_func (no pipelining, 1F1B over `pg.pp`, or the interleaved
    1F1B when `model=` holds several chunks) for this run's model chunks, with megatron-core's
    keyword arguments; returns its per-microbatch losses.

    `data_iterator`: one iterator over the step's microbatches; the interleaved schedule reads every
    microbatch once per chunk, so each chunk gets its own copy of the iterator (itertools.tee: the
    microbatches themselves are shared, not copied)."""
    pp, chunks = pg.pp.size(), len(kwargs["model"])
    config = get_model_config(kwargs["model"][0])
    if chunks > 1 and not isinstance(kwargs.get("data_iterator"), list):
        kwargs["data_iterator"] = list(itertools.tee(kwargs["data_iterator"], chunks))
    # the 1F1B schedules take the communicator and the groups together; without pipelining it needs none
    p2p = P2PCommunicator(pp_group=pg.pp, config=config) if pp > 1 else None
    vp = chunks if chunks > 1 else None
    return get_forward_backward_func(pp_size=pp, vp_size=vp)(pg_collection=pg, p2p_communicator=p2p, **kwargs)
