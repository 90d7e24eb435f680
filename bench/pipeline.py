#!/usr/bin/env python
"""Throughput at scale, measured on this machine: data-parallel ranks and pipeline stages waiting for each other.

    python bench/pipeline.py --part pp  # PP2 with 1 and 2 virtual stages at 2, 4, 8 microbatches (~4 min idle)
    python bench/pipeline.py --part pp-sim  # the same settings simulated, no runs (seconds)
    python bench/pipeline.py --part dp  # DP2, 12 steps with and without --balance-dp-compute
    python bench/pipeline.py --part dp --quick    # 6 steps
    python bench/pipeline.py --part dp --model debug-m --seq-length 2048 --global-batch-size 4 --samples 120 --steps 6
    python bench/pipeline.py            # both parts

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

PP2 (this part): megatron-core's 1F1B schedule (1 virtual stage) and its interleaved schedule (2
virtual stages per rank, the ViT and projector in the first model chunk of rank 0) on 2 ranks, the
debug-m model on mock data (uniform microbatches: every pack two samples of --pp-tiles tiles each),
one pack per microbatch, each microbatch count a run of --pp-steps steps with --log-straggler. The
split is the planner's (--pp-split planner): VPP1 its fastest --decoder-first-pipeline-num-layers,
VPP2 its per-chunk placement as --pipeline-model-parallel-layout (plan/stages.py: balanced_chunks);
--pp-split even runs megatron-core's even split. Printed per VPP setting: the split and the FLOP
share of each chunk; per run:
  - the planner's predicted bubble for the same split (plan/stages.py: megatron-core's schedule
    replayed on the planner's per-chunk times; (PP - 1) / (V m + PP - 1) when the chunks are equal);
  - each rank's measured idle fraction: 1 - its compute / the pipeline's span (the longest schedule
    time less gradient reduction, compute + pipeline wait, of the ranks; --log-straggler's split, per
    rank in --log-jsonl), means over the steps after the first 2, and the mean over the ranks against
    the planner's figure;
  - the same schedule simulation (simulate_schedule) with each rank's measured compute split over its
    model chunks by the planner's FLOP count, and with the FLOPs alone;
  - compute per microbatch per rank (wall and process CPU seconds), the step, the load average.
Then the goals: VPP2's idle within 20% (relative) of the planner's, and below 1 virtual stage's.
--part pp-sim prints the planner's bubble and the FLOP simulation of every setting without runs.
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
from typing import Callable

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


PP_MODEL = "debug-m"  # --pp-model: a ViT and an output layer that weigh as InternVL's


def pp_args(
    virtual: int, microbatches: int, args: argparse.Namespace, log: str, chunks: list[list[int]] | None = None
) -> list[str]:
    """pretrain_internvl.py's flags of one PP2 run (1F1B, or interleaved with `virtual` chunks per
    rank) on mock data, one pack per microbatch, --log-straggler's per-rank times into `log`; with
    `chunks` (decoder layers per [rank][chunk], `pp_chunks`) its split: the first stage's count at
    VPP1, megatron-core's --pipeline-model-parallel-layout with more chunks."""
    flags = ["--model", args.pp_model, "--mock-data", "--mock-tiles-per-sample", str(args.pp_tiles)]
    flags += ["--seq-length", str(args.pp_seq_length), "--micro-batch-size", "1"]
    flags += ["--global-batch-size", str(microbatches), "--pipeline-model-parallel-size", "2"]
    flags += split_args(virtual, chunks)
    flags += ["--train-iters", str(args.pp_steps), "--lr", "1e-4", "--seed", "1", "--log-straggler"]
    return flags + ["--log-interval", "1", "--log-jsonl", log]


def split_args(virtual: int, chunks: list[list[int]] | None) -> list[str]:
    """pretrain_internvl.py's flags of a PP2 split: none for the even one (`chunks` None)."""
    if chunks is not None and virtual > 1:
        return ["--pipeline-model-parallel-layout", layout_string(chunks)]
    flags = ["--num-virtual-stages-per-pipeline-rank", str(virtual)] if virtual > 1 else []
    return flags + (["--decoder-first-pipeline-num-layers", str(chunks[0][0])] if chunks is not None else [])


def layout_string(chunks: list[list[int]]) -> str:
    from internvl_mcore.plan.stages import layout_string as spell

    return spell(chunks)


def straggler_records(log: str) -> list[dict]:
    """The --log-jsonl train records that carry every rank's straggler times."""
    with open(log) as f:
        return [r for r in map(json.loads, f) if "straggler" in r]


def pp_train(
    virtual: int, microbatches: int, args: argparse.Namespace, out_dir: str, chunks: list[list[int]] | None = None
) -> list[dict]:
    """One PP2 run under torchrun (2 ranks, one thread each); its straggler records."""
    log = os.path.join(out_dir, f"pp_v{virtual}_m{microbatches}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(REPO, "pretrain_internvl.py"), *pp_args(virtual, microbatches, args, log, chunks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return straggler_records(log)


def planner_costs(microbatches: int, args: argparse.Namespace):
    """The capacity planner's per-piece costs (plan/stages.py: piece_costs) of the bench's PP2 layout and workload."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.plan.layouts import HARDWARE, Layout, Workload
    from internvl_mcore.plan.stages import piece_costs

    layout = Layout(1, 2, 1, 1, sequence_parallel=False, distributed_optimizer=False, recompute=False)
    seq = args.pp_seq_length
    work = Workload(seq, microbatches, 1, tiles_per_sequence=2 * args.pp_tiles, sample_length=seq // 2, bf16=False)
    # the bubble is a share of the step, the same on any hardware; the planner wants one
    return piece_costs(get_preset(args.pp_model), layout, work, HARDWARE["h100"], 0.7)


def pp_chunks(virtual: int, args: argparse.Namespace) -> list[list[int]]:
    """Decoder layers per [rank][chunk] of a run: with --pp-split planner, the planner's proposal (VPP1:
    its fastest first-stage count, stages.rank_splits; more chunks: its per-chunk placement,
    stages.balanced_chunks); with --pp-split even, megatron-core's even split."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.plan.stages import balanced_chunks, even_chunks, rank_splits

    layers = get_preset(args.pp_model).llm.num_layers
    if args.pp_split == "even":
        return even_chunks([layers // 2] * 2, virtual)
    costs = planner_costs(max(args.pp_microbatches), args)
    if virtual == 1:
        return [[n] for n in rank_splits(costs, layers, 2, max(args.pp_microbatches))[0][1].counts]
    return balanced_chunks(costs, layers, 2, virtual)


def planner_bubble(chunks: list[list[int]], microbatches: int, args: argparse.Namespace) -> float:
    """The capacity planner's pipeline bubble (share of the step) for the bench's layout and
    workload: megatron-core's schedule replayed on its per-chunk times (plan/stages.py)."""
    from internvl_mcore.plan.stages import pipeline_bubble

    return pipeline_bubble(planner_costs(microbatches, args).chunk_times(chunks), microbatches)


def chunk_flops(args: argparse.Namespace, chunks: list[list[int]]) -> list[list[float]]:
    """Forward FLOPs of one microbatch per [rank][model chunk] (plan/flops.py): each chunk's decoder
    layers, the ViT and projector on rank 0's first chunk, the output layer (at the loss tokens)
    on the last rank's last chunk."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.plan.flops import forward_flops
    from internvl_mcore.training.mock import mock_sample

    cfg, seq = get_preset(args.pp_model), args.pp_seq_length
    pack = mock_sample(0, 1, cfg, seq, args.pp_tiles)
    lengths = np.diff(pack.cu_seqlens).tolist()
    f = forward_flops(cfg, seq, int(pack.num_tiles.sum()), lengths, lm_head_tokens=int(pack.loss_mask.sum()))
    layer = (f.llm_linear + f.llm_attention) / cfg.llm.num_layers
    out = [[layer * n for n in row] for row in chunks]
    out[0][0] += f.vit_linear + f.vit_attention + f.vit_patch_embed + f.projector
    out[-1][-1] += f.lm_head
    return out


def simulate_schedule(chunk_s: list[list[float]], microbatches: int) -> list[float]:
    """Each rank's idle share of the pipeline span with megatron-core's order run on these per-chunk
    times: the planner's own simulation (plan/stages.py), which its bubble comes from."""
    from internvl_mcore.plan.stages import simulate_schedule as simulate

    return simulate(chunk_s, microbatches)


def pp_summary(records: list[dict], chunks: list[list[float]], microbatches: int, warmup: int = 2) -> dict:
    """Per-rank idle fraction and compute, means over the steps after `warmup`; the schedule
    simulated with the measured per-rank compute split over the rank's chunks by `chunks` FLOPs, and
    with the FLOPs alone. A rank's idle: 1 - its compute / the pipeline's span (the longest schedule
    time, compute + pipeline wait, of any rank), as the planner's bubble is a share of the step."""
    rows = records[warmup:] or records
    ranks = len(rows[0]["straggler"]["step"])

    def mean(col: str, r: int) -> float:
        return float(np.mean([x["straggler"][col][r] for x in rows]))

    def idle(x: dict, r: int) -> float:
        t = x["straggler"]
        span = max(t["compute"][q] + t["pipeline wait"][q] for q in range(ranks))
        return 1 - t["compute"][r] / span

    compute = [mean("compute", r) for r in range(ranks)]
    measured = [[c * f / sum(chunks[r]) / microbatches for f in chunks[r]] for r, c in enumerate(compute)]
    sim = simulate_schedule(measured, microbatches)
    out = {
        "idle": [float(np.mean([idle(x, r) for x in rows])) for r in range(ranks)],
        "compute_s": compute,
        "compute_cpu_s": [mean("compute cpu", r) for r in range(ranks)],
        "pipeline_wait_s": [mean("pipeline wait", r) for r in range(ranks)],
        "gradient_wait_s": [mean("gradient wait", r) for r in range(ranks)],
        "other_s": [mean("other", r) for r in range(ranks)],
        "step_s": max(mean("step", r) for r in range(ranks)),
        "simulated_measured_stages": float(np.mean(sim)),
        "simulated_flops": float(np.mean(simulate_schedule(chunks, microbatches))),
    }
    return dict(out, idle_mean=float(np.mean(out["idle"])))


def pp_split_line(virtual: int, args: argparse.Namespace) -> tuple[list[list[int]], list[list[float]]]:
    """Print a VPP setting's split (its flags) and the FLOP share of each rank's chunks; (layers,
    FLOPs) per [rank][chunk]."""
    layers = pp_chunks(virtual, args)
    flops = chunk_flops(args, layers)
    share = " / ".join("+".join(f"{100 * f / sum(map(sum, flops)):.0f}" for f in r) for r in flops)
    split = " ".join(split_args(virtual, None if args.pp_split == "even" else layers)) or "(even)"
    print(f"  VPP{virtual}: split {split}; FLOP share of each rank's chunks (planner's count): {share} %")
    return layers, flops


def pp_simulated(args: argparse.Namespace) -> dict:
    """No runs: each VPP setting's planner bubble and megatron-core's schedule simulated on the
    chunks' FLOPs, at every microbatch count (what the runs' goals compare, offline)."""
    print(f"PP2 simulated (no runs), --model {args.pp_model}, seq {args.pp_seq_length}, --pp-split {args.pp_split}")
    out = {}
    for virtual in args.pp_virtual:
        layers, flops = pp_split_line(virtual, args)
        for m in args.pp_microbatches:
            sim = float(np.mean(simulate_schedule(flops, m)))
            out[f"v{virtual}_m{m}"] = {"planner_bubble": planner_bubble(layers, m, args), "simulated_flops": sim}
            print(
                f"  VPP{virtual} m={m}: planner bubble {100 * out[f'v{virtual}_m{m}']['planner_bubble']:.1f}%, "
                f"simulated on the FLOPs {100 * sim:.1f}%"
            )
    return out


def pp_part(args: argparse.Namespace, tmp: str, train: Callable = pp_train) -> dict:
    """The PP2 table: every (virtual stages, microbatches) run against the planner, then the goals.
    `train(virtual, microbatches, args, tmp, chunks)` runs one and returns its straggler records."""
    print(
        f"PP2 on mock data, --model {args.pp_model}, seq {args.pp_seq_length}, {args.pp_tiles} tiles per sample "
        f"(2 samples a pack), micro-batch 1, {args.pp_steps} steps per run (means over steps 3-)"
    )
    results = {}
    for virtual in args.pp_virtual:
        layers, chunks = pp_split_line(virtual, args)
        for m in args.pp_microbatches:
            load0 = os.getloadavg()[0]
            records = train(virtual, m, args, tmp, None if args.pp_split == "even" else layers)
            s = dict(pp_summary(records, chunks, m), planner_bubble=planner_bubble(layers, m, args))
            s.update(load=(load0, os.getloadavg()[0]), records=records)
            results[f"v{virtual}_m{m}"] = s
            rel = s["idle_mean"] / s["planner_bubble"] - 1
            print(
                f"  VPP{virtual} m={m}: planner bubble {100 * s['planner_bubble']:.1f}% | measured idle "
                + ", ".join(f"rank {r} {100 * x:.1f}%" for r, x in enumerate(s["idle"]))
                + f", mean {100 * s['idle_mean']:.1f}% ({100 * rel:+.0f}% vs planner) | simulated: measured "
                f"stages {100 * s['simulated_measured_stages']:.1f}%, FLOPs {100 * s['simulated_flops']:.1f}% | "
                "compute per microbatch "
                + " / ".join(f"{c / m:.3f}" for c in s["compute_s"])
                + " s (CPU "
                + " / ".join(f"{c / m:.3f}" for c in s["compute_cpu_s"])
                + f") | step {s['step_s']:.2f} s | load average {s['load'][0]:.1f} -> {s['load'][1]:.1f}"
            )
    for m in args.pp_microbatches:
        one, two = results.get(f"v1_m{m}"), results.get(f"v2_m{m}")
        if two is None:
            continue
        near = abs(two["idle_mean"] / two["planner_bubble"] - 1) <= 0.2
        below = "n/a" if one is None else two["idle_mean"] < one["idle_mean"]
        print(f"  goals at m={m}: VPP2 idle within 20% of the planner's: {near}; below VPP1's: {below}")
    return results


def dp_part(args: argparse.Namespace, tmp: str) -> dict:
    """The DP2 table: stream order against --balance-dp-compute on the mixed set."""
    steps = args.steps or (6 if args.quick else 12)
    prefix = write_mixed_set(os.path.join(tmp, "mixed"), n_samples=args.samples)
    print(f"DP2 on a mixed set (image 6-12 tiles / text / video 8-16 frames), --model {MODEL}, seq {SEQ}, GBS {GBS}")
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
    return {"balanced" if k else "stream": v for k, v in results.items()}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "dp", "pp", "pp-sim"), default="all")
    ap.add_argument("--json", help="write every figure (and the PP runs' records) to this file")
    ap.add_argument("--quick", action="store_true", help="DP: 6 steps instead of 12")
    ap.add_argument("--steps", type=int, default=None, help="DP: steps per run")
    ap.add_argument("--model", default=MODEL, help="DP: a preset (debug-m: a ViT that weighs as InternVL's)")
    ap.add_argument("--seq-length", type=int, default=SEQ, help="DP")
    ap.add_argument("--global-batch-size", type=int, default=GBS, help="DP")
    ap.add_argument("--samples", type=int, default=600, help="DP: samples in the mixed set")
    ap.add_argument("--pp-model", default=PP_MODEL)
    ap.add_argument("--pp-seq-length", type=int, default=512)
    ap.add_argument("--pp-tiles", type=int, default=1, help="mock tiles per sample (2 samples a pack)")
    ap.add_argument("--pp-steps", type=int, default=5, help="steps per PP run (the first 2 are not counted)")
    ap.add_argument("--pp-microbatches", type=_ints, default=[2, 4, 8], help="comma-separated")
    ap.add_argument("--pp-virtual", type=_ints, default=[1, 2], help="virtual stages per rank, comma-separated")
    ap.add_argument(
        "--pp-split",
        choices=("planner", "even"),
        default="planner",
        help="the planner's proposed split (VPP1: first-stage count; more chunks: --pipeline-model-parallel-layout)"
        " or megatron-core's even one",
    )
    return ap


def main() -> None:
    global MODEL, SEQ, GBS
    args = parser().parse_args()
    MODEL, SEQ, GBS = args.model, args.seq_length, args.global_batch_size
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "dp"):
            out["dp"] = dp_part(args, tmp)
        if args.part in ("all", "pp"):
            out["pp"] = pp_part(args, tmp)
        if args.part == "pp-sim":
            out["pp"] = pp_simulated(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
