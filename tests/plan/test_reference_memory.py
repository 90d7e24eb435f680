"""--stage mpo in the planner: the frozen reference model's weights on every stage, and its forward."""

import dataclasses

from internvl_mcore.config import get_preset
from internvl_mcore.plan import HARDWARE, Layout, Workload, plan
from internvl_mcore.plan.params import stage_params


def test_reference_model_adds_its_stage_weights_and_a_forward():
    model, hw = get_preset("internvl3-8b"), HARDWARE["a100-80gb"]
    lay = Layout(2, 2, 1, 2, sequence_parallel=True, distributed_optimizer=True, recompute=False)
    work = Workload(seq_length=8192, global_batch_size=16)
    base, mpo = plan(model, lay, work, hw), plan(model, lay, dataclasses.replace(work, reference_model=True), hw)
    par = lay.parallel()
    for r, (a, b) in enumerate(zip(base.stages, mpo.stages)):
        weights = sum(s.numel for s in stage_params(model, par, r)) * 2  # bf16, this rank's shard
        assert b.state.params - a.state.params == weights
        assert (b.state.grads, b.state.optimizer, b.activations.total) == (
            a.state.grads,
            a.state.optimizer,
            a.activations.total,
        )
    assert mpo.compute_s > base.compute_s * 1.2  # one more forward per microbatch (backward ~ 2 forwards)
