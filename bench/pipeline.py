#!/usr/bin/env python
"""Throughput at scale, measured on this machine: data-parallel ranks waiting for each other.

    python bench/pipeline.py            # DP2, 12 steps with and without --balance-dp-compute
    python bench/pipeline.py --quick    # 6 steps
    python bench/pipeline.py --model debug-m --seq-length 2048 --global-batch-size 4 --samples 120 --steps 6

DP2 (this part): a mixed shard set for the debug model (a third of the samples an image of 6-12 tiles,
a third text, a third video of 8-16 one-tile frames; packed to --seq-length 512 by the preprocessor's
best-fit packing) trained on 2 ranks with --log-straggler, once in stream order and once with
--balance-dp-compute. Printed per run:
  - estimated: max/mean per-rank cost per step (the planner's FLOP model, training/balance.py) of
    the deal the loader makes, mean and worst over the steps (goal <= 1.05 balanced);
  - measured: each rank's compute (megatron-core's forward/backward regions) and the time it waits
    at the gradient reduction, from --log-straggler, as max/mean compute and the wait's share of the
    step (goal <= 5%), means over the steps after the first 2 (warm-up);
  - the load average before and after (other processes on the machine skew every measured figure).
The PP/VPP part (pipeline idle fraction against the planner's bubble) is to come (issue #29).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

MODEL = "debug"  # --model; the debug presets share their special-token ids
SEQ = 512  # --seq-length
GBS = 8  # --global-batch-size
IMG_START, IMG_END, IMG_CONTEXT = 503, 504, 505  # the debug preset's special tokens
TEXT_IDS = (10, 500)  # ordinary token ids of the debug vocabulary


def _sample(kind: int, rng: np.random.Generator, tokens_per_tile: int, line: int):
    """One EncodedSample: image (6-12 tiles), text, or video (8-16 frames of one tile)."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.data.shards import EncodedSample

    def text(n: int) -> list[int]:
        return rng.integers(*TEXT_IDS, n).tolist()

    tiles_per_image = {0: [int(rng.integers(6, 13))], 1: [], 2: [1] * int(rng.integers(8, 17))}[kind]
    prompt: list[int] = text(int(rng.integers(8, 24)))
    for t in tiles_per_image:
        prompt += text(3) + [IMG_START] + [IMG_CONTEXT] * (t * tokens_per_tile) + [IMG_END]
    answer = text(int(np.clip(rng.lognormal(4.6 if kind == 1 else 3.5, 0.5), 8, 400)))
    tokens = np.array(prompt + answer, np.int32)
    loss = np.r_[np.zeros(len(prompt)), np.ones(len(answer))].astype(np.uint8)
    n_tiles = sum(tiles_per_image)
    side = get_preset(MODEL).vision.image_size
    tiles = [rng.integers(0, 256, side * side * 3, dtype=np.uint8).tobytes() for _ in range(n_tiles)]
    num_tiles = np.array(tiles_per_image, np.int32)
    return EncodedSample(tokens, loss, np.arange(len(tokens), dtype=np.float32), num_tiles, tiles, 0, line)


def write_mixed_set(prefix: str, n_samples: int, seed: int = 0) -> str:
    """The mixed shard set, packed as tools/preprocess_mm_data.py packs (data/packing.py)."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.data.packing import pack_lengths
    from internvl_mcore.data.shards import ShardWriter

    cfg = get_preset(MODEL)
    rng = np.random.default_rng(seed)
    samples = [_sample(k % 3, rng, cfg.num_image_token, k + 1) for k in range(n_samples)]
    side = cfg.vision.image_size
    writer = ShardWriter(prefix, tile_format="raw", tile_shape=(side, side, 3))
    for pack in pack_lengths([len(s) for s in samples], SEQ, seed, buffer_size=64):
        writer.add_pack([samples[i] for i in pack])
    tokenizer = {"img_start_id": IMG_START, "img_end_id": IMG_END, "img_context_id": IMG_CONTEXT, "vocab_size": 512}
    extra = {
        "tokenizer": tokenizer,
        "template": cfg.template,
        "num_image_token": cfg.num_image_token,
        "seq_length": SEQ,
        "datasets": [{"name": "mixed", "source_file": "bench", "data_augment": False}],
    }
    writer.finalize(extra=extra)
    return prefix


def estimated_ratios(prefix: str, steps: int, balanced: bool) -> list[float]:
    """max/mean per-rank cost (planner FLOPs) of each step's deal over 2 ranks."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.data.loader import Balance, PackedDataLoader
    from internvl_mcore.training.balance import pack_cost

    cfg = get_preset(MODEL)

    def cost(shape):
        return pack_cost(cfg, shape, SEQ)

    balance = Balance(cost, GBS // 2, 1) if balanced else None
    ranks = [PackedDataLoader([prefix], seed=1, dp_rank=r, dp_size=2, balance=balance) for r in range(2)]
    draws = [ld.peek_draws(steps * GBS // 2) for ld in ranks]
    out = []
    for s in range(steps):
        loads = [
            sum(cost(ranks[0].pack_shape(d, p)) for _, d, p in mine[s * GBS // 2 : (s + 1) * GBS // 2])
            for mine in draws
        ]
        out.append(max(loads) / (sum(loads) / 2))
    return out


LINE = re.compile(r"straggler iteration (\d+): (.*)")
FIELD = re.compile(
    r"(step|data|compute|compute cpu|pipeline wait|gradient wait) min ([\d.]+) s \(rank \d+\) max ([\d.]+) s"
)


def train(prefix: str, steps: int, balanced: bool, out_dir: str) -> list[dict]:
    """2-rank run with --log-straggler; per iteration {column: (min, max)} and the wait fraction."""
    log = os.path.join(out_dir, f"log{int(balanced)}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(REPO, "pretrain_internvl.py"), "--model", MODEL, "--data-path", prefix]
    cmd += ["--seq-length", str(SEQ), "--global-batch-size", str(GBS), "--train-iters", str(steps)]
    cmd += ["--lr", "1e-3", "--seed", "1", "--log-straggler", "--log-interval", "1", "--num-workers", "1"]
    cmd += ["--image-tiling", "loader", "--log-jsonl", log, *(["--balance-dp-compute"] if balanced else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = []
    for m in LINE.finditer(proc.stdout):
        row = {name: (float(lo), float(hi)) for name, lo, hi in FIELD.findall(m.group(2))}
        row["wait_max"] = float(re.search(r"wait fraction max ([\d.]+)", m.group(2)).group(1))
        rows.append(row)
    losses = [json.loads(x)["loss"] for x in open(log)]
    return [dict(r, loss=loss) for r, loss in zip(rows, losses)]


def summary(rows: list[dict], warmup: int = 2) -> dict:
    rows = rows[warmup:]
    compute = [r["compute"][1] / ((r["compute"][0] + r["compute"][1]) / 2) for r in rows]
    cpu = [r["compute cpu"][1] / ((r["compute cpu"][0] + r["compute cpu"][1]) / 2) for r in rows]
    grad_share = [r["gradient wait"][1] / r["step"][1] for r in rows]
    return {
        "compute_max_over_mean": float(np.mean(compute)),
        "compute_cpu_max_over_mean": float(np.mean(cpu)),
        "gradient_wait_share_max_rank": float(np.mean(grad_share)),
        "wait_fraction_max_rank": float(np.mean([r["wait_max"] for r in rows])),
        "step_s_max": float(np.mean([r["step"][1] for r in rows])),
    }


def main() -> None:
    global MODEL, SEQ, GBS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 steps instead of 12")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--model", default=MODEL, help="a preset (debug-m: a ViT that weighs as InternVL's)")
    ap.add_argument("--seq-length", type=int, default=SEQ)
    ap.add_argument("--global-batch-size", type=int, default=GBS)
    ap.add_argument("--samples", type=int, default=600)
    args = ap.parse_args()
    MODEL, SEQ, GBS = args.model, args.seq_length, args.global_batch_size
    steps = args.steps or (6 if args.quick else 12)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = write_mixed_set(os.path.join(tmp, "mixed"), n_samples=args.samples)
        print(
            f"DP2 on a mixed set (image 6-12 tiles / text / video 8-16 frames), --model {MODEL}, seq {SEQ}, GBS {GBS}"
        )
        results = {}
        for balanced in (False, True):
            est = estimated_ratios(prefix, steps, balanced)
            load0 = os.getloadavg()[0]
            rows = train(prefix, steps, balanced, tmp)
            load1 = os.getloadavg()[0]
            s = summary(rows)
            results[balanced] = rows
            name = "--balance-dp-compute" if balanced else "stream order       "
            print(
                f"  {name}: estimated max/mean cost per step mean {np.mean(est):.3f} worst {max(est):.3f} | "
                f"measured compute max/mean {s['compute_max_over_mean']:.3f} (CPU time "
                f"{s['compute_cpu_max_over_mean']:.3f}), gradient wait "
                f"{100 * s['gradient_wait_share_max_rank']:.1f}% of the step (most waiting rank), "
                f"step {s['step_s_max']:.3f} s | load average {load0:.1f} -> {load1:.1f}"
            )
        same = all(abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) for a, b in zip(results[True], results[False]))
        print(f"  losses equal with and without (1e-5): {same}")
    print("PP2 / VPP idle fraction against the planner's bubble: not measured yet (issue #29)")


if __name__ == "__main__":
    main()
