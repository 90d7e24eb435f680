"""MPO runs of several layouts in one torchrun world, plus (world of 1) InternVL's formulas re-done in
plain PyTorch on the model's logits.

    python -m torch.distributed.run --nproc_per_node N tests/training/mpo_worker.py OUT SHARDS CKPT_DIR

World 1: the single-process run, then `formula_check`. World 2: CP2 with TE's per-sample 'thd' split
(its exact all-gather CPU attention), the single process's microbatches. World 4: TP2 (+ sequence parallel, distributed
optimizer), PP2, CP2 (each with DP2), a PP2 run from the PP2 run's checkpoint, the same stopped after 2
steps and resumed, and a LoRA run. Rank 0 writes OUT (JSON).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, ".")
from pretrain_internvl import parse_run_config  # noqa: E402
from internvl_mcore.training import mpo  # noqa: E402
from internvl_mcore.training.loop import setup, train, train_step  # noqa: E402

ITERS = 3  # tests/training/test_mpo.py ITERS: two updates show the layouts train alike


def base_flags(shards: str, mbs: int) -> list[str]:
    return [
        "--model",
        "debug",
        "--data-path",
        shards,
        "--stage",
        "mpo",
        "--drop-path-rate",
        "0",
        "--seq-length",
        "800",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        str(mbs),
        "--train-iters",
        str(ITERS),
        "--lr",
        "1e-3",
        "--seed",
        "7",
        "--peak-flops",
        "1",
        "--log-interval",
        "100",
        # the batches in-process: 7 runs would start 7 loader processes per rank (the loader is not the subject)
        "--num-workers",
        "0",
    ]


def run_layout(flags: list[str]) -> list[dict]:
    from megatron.core import parallel_state

    records = train(parse_run_config(flags))
    parallel_state.destroy_model_parallel()
    return records


def trl_reference(
    logits_pi: torch.Tensor,
    logits_ref: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    weights: tuple,
    running_mean: float,
    running_count: float,
) -> dict:
    """InternVL's MultimodalDPOTrainer (trl 0.10.1) on P pairs, one pair per data-parallel rank:
    logits (2P, L, V) chosen rows then rejected rows, unshifted labels (2P, L) with -100 off the
    response. Written from the formulas, independent of internvl_mcore."""

    def batch_logps(logits, lab):  # DPOTrainer.get_batch_logps
        lab = lab[:, 1:].clone()
        logits = logits[:, :-1, :]
        mask = lab != -100
        lab[lab == -100] = 0
        per_token = torch.gather(logits.log_softmax(-1), dim=2, index=lab.unsqueeze(2)).squeeze(2)
        return (per_token * mask).sum(-1)

    p = labels.shape[0] // 2
    pi, ref = batch_logps(logits_pi, labels), batch_logps(logits_ref, labels)
    pc, pr, rc, rr = pi[:p], pi[p:], ref[:p], ref[p:]
    # nll_loss per pair (per-device batch of one pair): CrossEntropyLoss mean over the chosen tokens
    nll = torch.stack([F.cross_entropy(logits_pi[i, :-1], labels[i, 1:], ignore_index=-100) for i in range(p)])
    sigmoid = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    # RunningMoments.update over P ranks: each rank's scalar cat(chosen, rejected).mean(), count P
    per_rank = torch.stack([chosen_rewards, rejected_rewards], 1).mean(1).double()
    xs_mean, xs_count = float(per_rank.mean()), float(p)
    tot = running_count + xs_count
    delta = running_mean + (xs_mean - running_mean) * xs_count / tot
    bco = -F.logsigmoid(beta * (pc - rc) - delta) - F.logsigmoid(-(beta * (pr - rr) - delta))
    w_s, w_b, alpha = weights
    return {
        "loss": w_s * sigmoid + w_b * bco + alpha * nll,
        "loss_preference": sigmoid,
        "loss_quality": bco,
        "loss_generation": nll,
        "delta": torch.tensor(delta),
    }


def formula_check(shards: str) -> dict:
    """After a few steps (policy != reference), one microbatch: our per-pair components against
    `trl_reference` on the same policy/reference logits."""
    trainer = setup(parse_run_config(base_flags(shards, 2) + ["--train-iters", "8"]))
    for _ in range(3):
        train_step(trainer)
    batch = next(trainer.batches)
    policy, ref, ctx = trainer.model[0].module, trainer.reference, trainer.mpo
    before = mpo.RunningMean(ctx.running.mean, ctx.running.count)
    with torch.no_grad():
        mpo.run_reference(ref, [batch], ctx, 800, 2)
        pixels = batch.images.pixel_values()
        per_token = policy(
            batch.tokens, batch.position_ids, pixel_values=pixels, labels=batch.labels, cu_seqlens=batch.cu_seqlens
        )
        split = policy.token_split(batch.cu_seqlens, batch.tokens.shape)  # one process: every token
        total, count, logged = mpo.mpo_loss_func(batch, split, ctx, per_token)
        logps, n_tok = mpo._pair_inputs(batch, split, per_token, None)
        c, r = batch.pairs[:, 0], batch.pairs[:, 1]
        ours = mpo.pair_losses(
            logps[c],
            logps[r],
            batch.ref_logps[c],
            batch.ref_logps[r],
            n_tok[c],
            ctx.beta,
            ctx.weights,
            ctx.running.mean,
        )
        # plain PyTorch: unpack each segment into its own row, InternVL-style unshifted labels
        lp = policy(batch.tokens, batch.position_ids, pixel_values=pixels, cu_seqlens=batch.cu_seqlens)
        lr = ref(batch.tokens, batch.position_ids, pixel_values=pixels, cu_seqlens=batch.cu_seqlens)
        flat_pi, flat_ref = lp.reshape(-1, lp.shape[-1]), lr.reshape(-1, lr.shape[-1])
        flat_lab = batch.labels.masked_fill(batch.loss_weight == 0, -100).reshape(-1)
        cu = batch.cu_seqlens.long()
        segs = [int(s) for s in torch.cat([c, r])]
        width = max(int(cu[s + 1] - cu[s]) for s in segs)
        rows_pi, rows_ref, rows_lab = [], [], []
        for s in segs:
            a, b = int(cu[s]), int(cu[s + 1])
            shifted = flat_lab[a:b]
            unshifted = torch.cat([torch.tensor([-100]), shifted[:-1]])  # label of token j is token j
            pad = width - (b - a)
            rows_pi.append(F.pad(flat_pi[a:b], (0, 0, 0, pad)))
            rows_ref.append(F.pad(flat_ref[a:b], (0, 0, 0, pad)))
            rows_lab.append(F.pad(unshifted, (0, pad), value=-100))
        plain = trl_reference(
            torch.stack(rows_pi),
            torch.stack(rows_ref),
            torch.stack(rows_lab),
            ctx.beta,
            ctx.weights,
            before.mean,
            before.count,
        )
    keys = ("loss", "loss_preference", "loss_quality", "loss_generation")
    return {
        "pairs": int(c.numel()),
        "delta_ours": ctx.running.mean,
        "delta_plain": float(plain["delta"]),
        "ours": {k: ours[k].tolist() for k in keys},
        "plain": {k: plain[k].tolist() for k in keys},
        "sum_ours": float(total),
        "count": int(count),
        "logged_n": float(logged["lm loss"][1]),
    }


def main() -> None:
    out, shards, ckpt = sys.argv[1], sys.argv[2], sys.argv[3]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result: dict = {}
    if world == 1:
        result["single"] = run_layout(base_flags(shards, 2))
        from megatron.core import parallel_state

        result["formula"] = formula_check(shards)
        parallel_state.destroy_model_parallel()
    elif world == 2:
        from internvl_mcore.parallel.context_parallel_thd import ThdSplit
        from tests.launch import recording_calls

        builds: list = []  # one split per forward step (reference and policy)
        with recording_calls(ThdSplit, "build", lambda *a, **k: builds.append(1)):
            thd = ["--context-parallel-size", "2", "--cp-split", "thd"]
            result["cp2-thd"] = run_layout(base_flags(shards, 2) + thd)
        result["thd_builds"] = len(builds)
    else:
        flags = base_flags(shards, 1)
        result["tp2-sp-distopt"] = run_layout(
            flags + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"]
        )
        pp = flags + ["--pipeline-model-parallel-size", "2"]
        result["pp2"] = run_layout(pp + ["--save", f"{ckpt}/a"])
        result["cp2"] = run_layout(flags + ["--context-parallel-size", "2"])
        # from the pp2 run's weights: uninterrupted, and stopped after 2 steps + resumed (the reference must
        # come back as those weights, the BCO running mean from the checkpoint)
        start = pp + ["--pretrained", f"{ckpt}/a", "--train-iters", "4"]
        result["pretrained"] = run_layout(start)
        result["resume-first"] = run_layout(start + ["--save", f"{ckpt}/b", "--exit-interval", "2"])
        result["resume-rest"] = run_layout(pp + ["--train-iters", "4", "--save", f"{ckpt}/b", "--load", f"{ckpt}/b"])
        result["lora-tp2"] = run_layout(
            flags + ["--tensor-model-parallel-size", "2", "--lora-rank", "4", "--lr", "1e-2"]
        )
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main()
