"""Logits only at the tokens that carry loss (the default) against megatron-core's all-token output
layer and loss (--all-token-logits), in one world of 2.

    python -m torch.distributed.run --nproc_per_node 2 tests/models/target_logits_worker.py OUT PREF_SHARDS

Each layout trains two iterations both ways from the same seed; rank 0 writes OUT (JSON) with the
records and, per run, the row counts the output layer computed logits for (recorded by wrapping
`LanguageModel._mask_padded_vocab`, which every logit tensor passes through).
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

sys.path.insert(0, ".")
from megatron.core import parallel_state  # noqa: E402

from pretrain_internvl import parse_run_config  # noqa: E402
from internvl_mcore.models.language import LanguageModel  # noqa: E402
from internvl_mcore.training.loop import train  # noqa: E402
from tests.launch import recording_calls  # noqa: E402

MOCK = [
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
]
LAYOUTS = {
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "tp2_sp_chunked": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--cross-entropy-chunk-size", "50"],
    "pp2": ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1"],
    "cp2": ["--context-parallel-size", "2"],
}


def run(flags: list[str]) -> dict:
    rows = []
    with recording_calls(
        LanguageModel, "_mask_padded_vocab", lambda self, logits: rows.append(int(logits.shape[:-1].numel()))
    ):
        records = train(parse_run_config(flags))
    parallel_state.destroy_model_parallel()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, rows)  # under PP only the last stage's rank computes logits
    return {"records": records, "logit_rows": max(every, key=len)}


def main() -> None:
    mpo = [
        "--model",
        "debug",
        "--data-path",
        sys.argv[2],
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
    cases = {name: MOCK + flags for name, flags in LAYOUTS.items()}
    cases["mpo_tp2"] = mpo
    out = {name: [run(flags + ["--all-token-logits"]), run(flags)] for name, flags in cases.items()}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, default=float)


if __name__ == "__main__":
    main()
