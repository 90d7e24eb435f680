"""GSPO / GRPO losses, advantages and the megatron-core loss function (internvl_mcore/training/rl/)
against plain per-response PyTorch written from the papers' formulas (fp64 and fp32, 1e-6)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from internvl_mcore.errors import ConfigError
from internvl_mcore.parallel.context_parallel import TokenSplit
from internvl_mcore.training.batch import Batch
from internvl_mcore.training.rl.advantages import EPS, group_advantages
from internvl_mcore.training.rl.losses import GRPO_CLIP, GSPO_CLIP, PolicyLossConfig
from internvl_mcore.training.rl.step import Rollouts, RLContext, reduce_metrics, rl_loss_func
from tests.launch import REPO
from tests.worldpool import run_in_world

# two packed rows of 48 tokens; each row: (prompt, response) segments, then a padding segment
ROWS = [[(5, 7), (3, 12), (4, 1), (2, 9)], [(6, 10), (3, 4), (5, 8), (2, 3)]]
S = 48
G = 4  # 8 responses = 2 prompts x 4


def _layout():
    """cu_seqlens, the response mask and each response's token positions (flat index lists)."""
    cu, mask, responses = [0], torch.zeros(len(ROWS), S), []
    for b, row in enumerate(ROWS):
        pos = 0
        for prompt, resp in row:
            mask[b, pos + prompt : pos + prompt + resp] = 1
            responses.append([b * S + pos + prompt + t for t in range(resp)])
            pos += prompt + resp
            cu.append(b * S + pos)
        cu.append((b + 1) * S)  # the row's padding: a segment without response tokens
    return torch.tensor(cu, dtype=torch.int32), mask, responses


def _segment_of_response(cu):
    """Segment index of each response (the padding segments hold none)."""
    out, seg = [], 0
    for row in ROWS:
        out += list(range(seg, seg + len(row)))
        seg += len(row) + 1
    return out


def _inputs(dtype, seq_scale, tok_scale, seed=0):
    """Per-token log-probs (policy, old, reference) and per-response rewards."""
    g = torch.Generator().manual_seed(seed)
    cu, mask, responses = _layout()
    old = -torch.rand(len(ROWS), S, generator=g, dtype=torch.float64) * 3 - 0.05
    per_resp = torch.zeros(len(ROWS), S, dtype=torch.float64)
    for idx in responses:  # a per-response shift, so some sequence ratios leave the clip range
        per_resp.view(-1)[idx] = (torch.rand((), generator=g, dtype=torch.float64) * 2 - 1) * seq_scale
    logp = old + per_resp + torch.randn(len(ROWS), S, generator=g, dtype=torch.float64) * tok_scale
    ref = old + torch.randn(len(ROWS), S, generator=g, dtype=torch.float64) * 0.1
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.5, 0.7], dtype=torch.float64)
    return cu, mask, responses, logp.to(dtype), old.to(dtype), ref.to(dtype), rewards


# --- the papers' formulas, one response at a time ----------------------------------------------


def _ref_advantages(rewards):
    out = []
    for p in range(0, len(rewards), G):
        r = [float(x) for x in rewards[p : p + G]]
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        out += [0.0 if std == 0 else (x - mean) / (std + EPS) for x in r]
    return torch.tensor(out, dtype=torch.float64)


def _reference_loss(level, logp, old, ref, responses, adv, lo, hi, beta):
    """-J (mean over responses) and the clipped-token fraction, straight from the formulas."""
    flat, old_f, ref_f = logp.reshape(-1), old.reshape(-1), ref.reshape(-1)
    total, clipped, tokens = 0.0, 0, 0
    for i, idx in enumerate(responses):
        lp, lo_p, rp, a, n = flat[idx], old_f[idx], ref_f[idx], float(adv[i]), len(idx)
        if level == "sequence":  # GSPO eq. 5/7: s = (pi(y|x) / pi_old(y|x)) ** (1/|y|)
            s = torch.exp(lp.sum() - lo_p.sum()) ** (1.0 / n)
            term = torch.min(s * a, torch.clamp(s, 1 - lo, 1 + hi) * a)
            clipped += n * int((s > 1 + hi and a > 0) or (s < 1 - lo and a < 0))
        else:  # GRPO (DeepSeekMath eq. 3): 1/|o| sum_t min(w A, clip(w) A)
            w = torch.exp(lp - lo_p)
            term = torch.stack([torch.min(wt * a, torch.clamp(wt, 1 - lo, 1 + hi) * a) for wt in w]).sum() / n
            clipped += sum(int((wt > 1 + hi and a > 0) or (wt < 1 - lo and a < 0)) for wt in w)
        r = torch.exp(rp - lp)  # DeepSeekMath eq. 4: pi_ref/pi - log(pi_ref/pi) - 1
        kl = (r - torch.log(r) - 1).sum() / n
        total = total + (-term + beta * kl)
        tokens += n
    return total / len(responses), clipped / tokens


# --- our path: the loss function megatron-core's schedule calls ---------------------------------


def _rl_call(level, logp, old, ref, rewards, lo, hi, beta, split, cp_group=None):
    """rl_loss_func on this rank's tokens (`split`): (loss sum, count, logged, the per-token-loss leaf)."""
    cu, mask, responses = _layout()
    adv = torch.zeros(len(cu) - 1, dtype=torch.float64)
    adv[_segment_of_response(cu)] = group_advantages(rewards, G).values
    tokens = torch.zeros(len(ROWS), S, dtype=torch.long)
    batch = Batch(tokens, tokens, mask, torch.zeros(len(ROWS), S), cu, None)
    first = cp_group is None or cp_group.rank() == 0
    ctx = RLContext(PolicyLossConfig(level, lo, hi, beta), cp_group=cp_group, first_cp_rank=first)
    per_token_loss = split.split(-logp).detach().requires_grad_(True)
    rollouts = Rollouts(old_logps=old, advantages=adv, ref_logps=ref if beta > 0 else None)
    loss, count, logged = rl_loss_func(batch, split, rollouts, ctx, per_token_loss)
    return loss, count, logged, per_token_loss


def _ours(level, logp, old, ref, rewards, lo, hi, beta):
    """Single process: mean loss, d loss / d logp, the reduced metrics, the response count."""
    loss, count, logged, leaf = _rl_call(level, logp, old, ref, rewards, lo, hi, beta, TokenSplit("none", 0, 1))
    (loss / count).backward()  # what megatron-core's gradient division by the response count does
    metrics = reduce_metrics([logged], True, None, None)
    return loss / count, -leaf.grad, metrics, int(count), _layout()[2]


CASES = [
    ("sequence", *GSPO_CLIP, 0.0, 2e-3, 1e-3),
    ("sequence", *GSPO_CLIP, 0.05, 2e-3, 1e-3),
    ("token", *GRPO_CLIP, 0.0, 0.1, 0.3),
    ("token", *GRPO_CLIP, 0.05, 0.1, 0.3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("level,lo,hi,beta,seq_scale,tok_scale", CASES)
def test_loss_and_gradient_equal_the_papers_formulas(level, lo, hi, beta, seq_scale, tok_scale, dtype):
    cu, mask, responses, logp, old, ref, rewards = _inputs(dtype, seq_scale, tok_scale)
    loss, grad, metrics, count, _ = _ours(level, logp, old, ref, rewards, lo, hi, beta)
    assert count == len(responses)  # padding segments are no responses
    leaf = logp.detach().to(torch.float64).requires_grad_(True)
    adv = _ref_advantages(rewards)
    want, clip_frac = _reference_loss(level, leaf, old.double(), ref.double(), responses, adv, lo, hi, beta)
    want.backward()
    tol = dict(rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    torch.testing.assert_close(grad.double(), leaf.grad, **tol)
    assert grad[mask == 0].abs().max() == 0  # prompts and padding get no gradient
    assert 0 < clip_frac < 1, "the case must clip some tokens and not all"
    assert metrics["clip_fraction"] == pytest.approx(clip_frac, abs=1e-12)
    assert metrics["response_length"] == pytest.approx(sum(map(len, responses)) / len(responses))
    assert metrics["loss"] == pytest.approx(float(want), abs=1e-6)
    assert (metrics["kl"] > 0) == (beta > 0)


@pytest.mark.parametrize("level,lo,hi", [("sequence", *GSPO_CLIP), ("token", *GRPO_CLIP)])
def test_on_policy_ratio_is_exactly_one(level, lo, hi):
    """First step: pi == pi_old (and == ref): ratios exactly 1, nothing clipped, KL exactly 0, and the
    gradient d loss / d logp is -A_i / (|y_i| N) on each response token."""
    cu, mask, responses, logp, _, _, rewards = _inputs(torch.float32, 0.0, 0.0)
    loss, grad, metrics, count, _ = _ours(level, logp, logp.clone(), logp.clone(), rewards, lo, hi, 0.1)
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_fraction"] == 0.0 and metrics["kl"] == 0.0
    adv = group_advantages(rewards, G).values
    want = torch.zeros(len(ROWS) * S, dtype=torch.float64)
    for i, idx in enumerate(responses):
        want[idx] = -float(adv[i]) / (len(idx) * count)  # d loss / d logp
    torch.testing.assert_close(grad.reshape(-1).double(), want, rtol=0, atol=1e-7)
    assert float(loss) == pytest.approx(-float(adv.mean()), abs=1e-7)  # ratio 1: -mean(A)


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0]), 4)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    want = [0.5 / (s + EPS), -0.5 / (s + EPS), -0.5 / (s + EPS), 0.5 / (s + EPS), 0, 0, 0, 0]
    torch.testing.assert_close(adv.values, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert adv.zero_groups == 1 and adv.reward_mean == 1.75
    # rewards whose mean rounds (0.1 * 3 / 3 != 0.1) still give exactly 0 in an all-equal group
    assert group_advantages(torch.tensor([0.1, 0.1, 0.1]), 3).values.abs().max() == 0
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4).values, adv.values[:4])
    with pytest.raises(ConfigError, match="--rollouts-per-prompt 1"):
        group_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(RuntimeError, match="whole groups"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)


def test_context_parallel_2_equals_single_process():
    """CP2 (each rank half of every row): loss, gradients and metrics equal the single process'
    (tests/rl/cp_loss_worker.py asserts them on each rank, 1e-12 in fp64)."""
    out = run_in_world(REPO / "tests" / "rl" / "cp_loss_worker.py", 2, [], timeout=300)
    assert "cp-loss ok 0" in out and "cp-loss ok 1" in out


@pytest.fixture(scope="module")
def debug_model(world):
    """The debug model (layout-independent init, seed 1), a mock microbatch of 2 x 128 tokens and the
    model's log-probs of its targets from a forward-only pass (built once for the tests below)."""
    from internvl_mcore.config import PRESETS
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.models.weights import init_weights
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.training.mock import mock_batches
    from internvl_mcore.training.step import run_model

    cfg = PRESETS["debug"]
    model = build_model(cfg, world, process_groups())
    init_weights(model, cfg, seed=1)
    batch = next(mock_batches(cfg, 3, 128, 1, 2, 2, 0, 1))
    with torch.no_grad():
        logp = -run_model(model, batch)[0].double()
    return model, batch, logp


def test_first_step_through_the_model_is_on_policy(debug_model):
    """The debug model: old (and reference) log-probs from a forward-only pass, then the policy's
    forward step with gradients (rl_forward_step): every ratio is exactly 1, nothing clipped, KL 0."""
    from internvl_mcore.training.mpo import segment_ids
    from internvl_mcore.training.rl.step import rl_forward_step

    model, batch, old = debug_model
    mask = batch.targets()
    n = batch.cu_seqlens.numel() - 1
    seg = segment_ids(batch.cu_seqlens, mask.shape)
    has = torch.zeros(n).scatter_add(0, seg.reshape(-1), mask.reshape(-1)) > 0
    assert int(has.sum()) >= 2, "the mock microbatch needs responses"
    adv = torch.linspace(-1, 1, n)
    for level, lo, hi in (("sequence", *GSPO_CLIP), ("token", *GRPO_CLIP)):
        ctx = RLContext(PolicyLossConfig(level, lo, hi, kl_coeff=0.1))
        rollouts = Rollouts(old_logps=old, advantages=adv, ref_logps=old)
        output, loss_func = rl_forward_step(iter([(batch, rollouts)]), model, ctx)
        loss, count, logged = loss_func(output)
        metrics = reduce_metrics([logged], True, None, None)
        assert metrics["ratio_mean"] == 1.0 and metrics["clip_fraction"] == 0.0 and metrics["kl"] == 0.0, metrics
        assert int(count) == int(has.sum())
        # ratio 1: the loss is -A_i per response, and the gradient reaches the weights
        assert float(loss) == pytest.approx(-float(adv[has].sum()), abs=1e-5)
        model.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_megatron_core_schedule_runs_the_loss(debug_model):
    """rl_forward_step under megatron-core's schedule (parallel/schedules.py: forward_backward, per-token
    loss mode) gives the gradients of the summed loss that a direct call gives, off-policy (ratios
    clipped on both sides), and hands back the logged sums."""
    from internvl_mcore.parallel.schedules import forward_backward
    from internvl_mcore.training.rl.step import rl_forward_step

    model, batch, logp = debug_model
    shift = torch.randn(logp.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.3
    n = batch.cu_seqlens.numel() - 1
    rollouts = Rollouts(old_logps=logp + shift, advantages=torch.linspace(-1, 1, n), ref_logps=logp - shift)
    ctx = RLContext(PolicyLossConfig("token", *GRPO_CLIP, kl_coeff=0.1))
    output, loss_func = rl_forward_step(iter([(batch, rollouts)]), model, ctx)
    loss, count, logged = loss_func(output)
    model.zero_grad()
    loss.backward()
    direct = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    losses = forward_backward(
        model.pg_collection,
        forward_step_func=functools.partial(rl_forward_step, ctx=ctx),
        data_iterator=iter([(batch, rollouts)]),
        model=[model],
        num_microbatches=1,
        seq_length=128,
        micro_batch_size=2,
        forward_only=False,
    )
    scheduled = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert direct.keys() == scheduled.keys() and len(direct) > 10
    for k in direct:
        torch.testing.assert_close(scheduled[k], direct[k], rtol=1e-6, atol=1e-7, msg=k)
    metrics = reduce_metrics(losses, True, None, None)
    assert metrics == reduce_metrics([logged], True, None, None)
    assert 0 < metrics["clip_fraction"] < 1 and metrics["kl"] > 0
