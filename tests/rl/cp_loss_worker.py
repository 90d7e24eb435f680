"""The GSPO / GRPO loss function at context-parallel size 2 vs the single process (a job of
tests/worldpool.py, or under torchrun --nproc-per-node 2): each rank holds half of every row's tokens
(the "row" split); the loss, this rank's gradients and the reduced metrics must equal the
single-process ones (1e-12, fp64). Prints 'cp-loss ok RANK' at the end."""

import torch
import torch.distributed as dist

from internvl_mcore.parallel.context_parallel import TokenSplit
from internvl_mcore.training.rl.losses import GRPO_CLIP, GSPO_CLIP
from internvl_mcore.training.rl.step import reduce_metrics
from tests.rl.test_losses import _inputs, _ours, _rl_call

if not dist.is_initialized():  # a reused world (tests/worldpool.py) has its default group already
    dist.init_process_group("gloo")
rank, group = dist.get_rank(), dist.group.WORLD
assert dist.get_world_size() == 2
CASES = [("sequence", *GSPO_CLIP, 0.05, 2e-3, 1e-3), ("token", *GRPO_CLIP, 0.05, 0.1, 0.3)]

for level, lo, hi, beta, seq_scale, tok_scale in CASES:
    _, mask, _, logp, old, ref, rewards = _inputs(torch.float64, seq_scale, tok_scale)
    full_loss, full_grad, full_metrics, _, _ = _ours(level, logp, old, ref, rewards, lo, hi, beta)
    split = TokenSplit("row", rank, 2)
    loss, count, logged, grad = _rl_call(level, logp, old, ref, rewards, lo, hi, beta, split, group)
    total = count.clone()
    dist.all_reduce(total, group=group)  # megatron-core divides by the count summed over DP x CP
    (loss / total).backward()
    torch.testing.assert_close((loss / total).detach(), full_loss.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(-grad.grad, split.split(full_grad), rtol=0, atol=1e-12)
    metrics = reduce_metrics([logged], True, group, None)
    for k, v in full_metrics.items():
        assert abs(metrics[k] - v) <= 1e-12, (level, k, metrics[k], v)
    assert 0 < metrics["clip_fraction"] < 1
print(f"cp-loss ok {rank}", flush=True)
