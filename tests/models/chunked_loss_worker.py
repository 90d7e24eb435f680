"""Chunked output layer + cross entropy (models/chunked_loss.py) in one world of 2.

    python -m torch.distributed.run --nproc_per_node 2 tests/models/chunked_loss_worker.py OUT PREF_SHARDS

1. The function against a single-process full-logit reference (torch's cross entropy over the whole
   vocabulary, padded entries masked) and against megatron-core's `vocab_parallel_cross_entropy` at
   TP2: per-token losses and the gradients of hidden states and output weight, with TP padding of
   the vocabulary, at TP1 (a group of one), TP2 and TP2 with sequence parallelism.
2. Training with --cross-entropy-chunk-size against megatron-core's loss: pretraining on mock data
   at TP2 + sequence parallelism, and MPO (per-sequence log-probs from the per-token losses) at TP2.
Rank 0 writes OUT (JSON).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, ".")
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # noqa: E402

from pretrain_internvl import parse_run_config  # noqa: E402
from internvl_mcore.config.model import ParallelConfig  # noqa: E402
from internvl_mcore.models import language  # noqa: E402
from internvl_mcore.models.chunked_loss import chunked_output_cross_entropy  # noqa: E402
from internvl_mcore.parallel.state import init_distributed  # noqa: E402
from internvl_mcore.training.loop import train  # noqa: E402
from tests.launch import recording_calls  # noqa: E402

S, B, H, VOCAB, SHARD, CHUNK = 38, 2, 16, 49, 26, 16  # 2 x 26 = 52 padded entries: 3 of them padding


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def function_checks() -> dict:
    pg = init_distributed(ParallelConfig(tensor_model_parallel_size=2), seed=0)
    rank, tp = pg.tp.rank(), pg.tp
    singles = [dist.new_group([r]) for r in range(2)]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, B, H, generator=g)
    weight = torch.randn(2 * SHARD, H, generator=g) * 0.5
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels[0, :3] = VOCAB - 1  # the last real entry, next to the padding
    grad_out = torch.rand(B, S, generator=g)

    def grads(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(h, w)
        (loss * grad_out).sum().backward()
        return loss.detach(), h.grad, w.grad

    def reference(h, w):  # full logits, padded entries masked, torch's cross entropy
        logits = (h @ w.t())[..., :VOCAB]  # (S, B, V)
        return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")  # (B, S)

    def megatron_tp2(h, w):
        logits = h @ w.t()  # (S, B, V/2)
        if rank == 1:
            logits = logits.masked_fill(torch.arange(SHARD) >= VOCAB - SHARD, float("-inf"))
        return vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()

    shard = slice(rank * SHARD, (rank + 1) * SHARD)
    half = slice(rank * S // 2, (rank + 1) * S // 2)
    ref_loss, ref_h, ref_w = grads(reference, hidden, weight)
    meg_loss, meg_h, meg_w = grads(megatron_tp2, hidden, weight[shard])
    dist.all_reduce(meg_h, group=tp)  # what ColumnParallelLinear's input mapping does in the backward
    runs = {
        "tp1": grads(
            lambda h, w: chunked_output_cross_entropy(h, w, labels, CHUNK, VOCAB, singles[rank], False), hidden, weight
        ),
        "tp2": grads(
            lambda h, w: chunked_output_cross_entropy(h, w, labels, CHUNK, VOCAB, tp, False), hidden, weight[shard]
        ),
        "tp2_sp": grads(
            lambda h, w: chunked_output_cross_entropy(h, w, labels, CHUNK, VOCAB, tp, True), hidden[half], weight[shard]
        ),
    }
    out = {
        "megatron_vs_reference": [max_diff(meg_loss, ref_loss), max_diff(meg_h, ref_h), max_diff(meg_w, ref_w[shard])]
    }
    for name, (loss, gh, gw) in runs.items():
        w_ref = ref_w if name == "tp1" else ref_w[shard]
        h_ref = ref_h[half] if name == "tp2_sp" else ref_h
        out[name] = [max_diff(loss, ref_loss), max_diff(gh, h_ref), max_diff(gw, w_ref)]
        if name != "tp1":
            out[name + "_vs_megatron"] = [
                max_diff(loss, meg_loss),
                max_diff(gh, meg_h[half] if name == "tp2_sp" else meg_h),
                max_diff(gw, meg_w),
            ]
    out["scale"] = [float(ref_loss.abs().max()), float(ref_h.abs().max()), float(ref_w.abs().max())]
    parallel_state.destroy_model_parallel()
    return out


def run_layout(flags: list[str]) -> dict:
    """The run's records, and how many forward passes took the chunked path."""
    calls = []
    # the model's default path (logits only at loss tokens) calls the chunked loss through this name
    with recording_calls(language, "chunked_cross_entropy", lambda *args, **kwargs: calls.append(1)):
        records = train(parse_run_config(flags))
    parallel_state.destroy_model_parallel()
    return {"records": records, "chunked_calls": len(calls)}


def training_checks(pref_shards: str) -> dict:
    mock = [
        "--model",
        "debug",
        "--mock-data",
        "--seq-length",
        "128",
        "--global-batch-size",
        "2",
        "--train-iters",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--peak-flops",
        "1",
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
    ]
    mpo = [
        "--model",
        "debug",
        "--data-path",
        pref_shards,
        "--stage",
        "mpo",
        "--drop-path-rate",
        "0",
        "--seq-length",
        "800",
        "--global-batch-size",
        "2",
        "--micro-batch-size",
        "1",
        "--train-iters",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "7",
        "--peak-flops",
        "1",
        "--tensor-model-parallel-size",
        "2",
    ]
    chunk = ["--cross-entropy-chunk-size", "100"]
    return {name: [run_layout(flags), run_layout(flags + chunk)] for name, flags in (("pretrain", mock), ("mpo", mpo))}


def main() -> None:
    out = {"function": function_checks(), "training": training_checks(sys.argv[2])}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, default=float)


if __name__ == "__main__":
    main()
