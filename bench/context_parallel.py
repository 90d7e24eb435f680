#!/usr/bin/env python
"""Context-parallel attention benchmark: forward+backward time and memory per rank vs sequence length.

    python bench/context_parallel.py                 # quick (default): 512/1k/2k tokens, ~1 min on 2 idle cores
    python bench/context_parallel.py --full          # 4k/8k/16k tokens (many minutes; see --help)
    python bench/context_parallel.py --cp-comm-type all --seq-lengths 2048 4096

One gloo world per CP size is started with torchrun (1 thread per rank); it measures every
implementation at every length, and the parent prints them all with ratios against CP1 in this run:

- CP1 `sdpa`: `parallel.attention.PackedSDPAttention` on the whole row -- what the model runs without
  CP (torch SDPA per packed sample; the CPU flash kernel). The ratio baseline.
- CP1 `ring-kernel`: this repo's blockwise ring kernel on one rank (no communication), to separate
  "CP" from "different kernel" in the ratios.
- CP C `p2p` / `a2a` / `a2a+p2p`: `ContextParallelAttention` on the rank's load-balanced 2 chunks.

Time: median over --reps of the slowest rank's wall time for one forward+backward (ranks wait for
each other inside the ring/all-to-all, so this is the step time). With more ranks than cores, or
other jobs on the machine, ranks share cores and wall ratios are pessimistic; the header says
when CP exceeds the cores. `cpu s` is the largest rank's process CPU time for the same step
(compute + gloo threads, without waiting): the work per rank, robust to a shared machine.

Memory (CPU has no allocator peak counter like torch.cuda.max_memory_allocated), two honest proxies,
both per rank and the largest rank reported:
- `peak`: the highest (allocated - freed) bytes of the CPU allocator during one forward+backward,
  replayed from the torch profiler's per-allocation memory events (profile_memory=True):
  temporaries, score tiles, receive buffers, saved activations and input gradients; tensors
  that existed before the step (the inputs) are not included.
- `saved`: bytes of distinct tensor storages autograd keeps for the backward (inputs included),
  recorded with torch.autograd.graph.saved_tensors_hooks -- the activation memory of attention
  that stays alive between the forward and the backward of a layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

QUICK_LENGTHS = [512, 1024, 2048]
FULL_LENGTHS = [4096, 8192, 16384]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help=f"sequence lengths {FULL_LENGTHS} (default: {QUICK_LENGTHS})")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=None, help="override the lengths")
    p.add_argument("--context-parallel-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--cp-comm-type",
        nargs="+",
        default=["p2p"],
        help="p2p, a2a, a2a+p2p or all (a2a+p2p only where --hierarchical-context-parallel-sizes fit)",
    )
    p.add_argument(
        "--hierarchical-context-parallel-sizes",
        type=int,
        nargs=2,
        default=[2, 2],
        help="A P of the a2a+p2p scheme (used for CP size A*P)",
    )
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--kv-channels", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument(
        "--samples-per-pack",
        type=int,
        default=1,
        help="packed samples per row (1: one causal sequence, the case load balancing is for)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 2 quick, 3 full)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per torchrun world")
    # worker side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impls", nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.seq_lengths is None:
        a.seq_lengths = FULL_LENGTHS if a.full else QUICK_LENGTHS
    if a.reps is None:
        a.reps = 3 if a.full else 2
    return a


# ------------------------------------------------------------------------------------------------
# worker: one CP world, every length
# ------------------------------------------------------------------------------------------------
def _pack_bounds(seq: int, batch: int, samples: int) -> list[int]:
    """Global batch-major boundaries of `samples` near-equal samples per row (offset so they do not
    fall on chunk borders)."""
    cu = [0]
    for row in range(batch):
        inner = sorted({min(seq - 1, max(1, round(seq * i / samples) + 7)) for i in range(1, samples)})
        cu += [row * seq + x for x in inner] + [(row + 1) * seq]
    return cu


def _saved_bytes(fn) -> tuple[object, int]:
    """Run fn(); return its result and the bytes of distinct storages autograd saved meanwhile."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _profiled_peak(step) -> int:
    """Peak of (allocated - freed) CPU-allocator bytes during step(), from the torch profiler's
    per-allocation "[memory]" events (profile_memory=True), replayed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def worker(a: argparse.Namespace) -> None:
    import math

    import torch
    import torch.distributed as dist

    from internvl_mcore.parallel import cpu_compat

    torch.set_num_threads(1)
    cpu_compat.apply()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from internvl_mcore.parallel.attention import PackedSDPAttention, packed_seq_params_from_cu_seqlens
    from internvl_mcore.parallel import context_parallel as cx

    world = dist.get_world_size()
    A, P = a.hierarchical_context_parallel_sizes
    hcp = [A, P] if "a2a+p2p" in a.impls else None
    ps.initialize_model_parallel(context_parallel_size=world, hierarchical_context_parallel_sizes=hcp)
    rank = ps.get_context_parallel_rank()
    pgc = ProcessGroupCollection.use_mpu_process_groups()  # the groups are passed explicitly
    hq, hkv, d, b = a.num_attention_heads, a.num_query_groups, a.kv_channels, a.micro_batch_size
    scale = 1.0 / math.sqrt(d)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=hq * d,
        num_attention_heads=hq,
        num_query_groups=hkv,
        kv_channels=d,
        attention_dropout=0.0,
        context_parallel_size=world,
    )

    def make(impl: str, seq: int, cu: torch.Tensor, psp):
        """forward(q, k, v) -> (S_local, B, hq*d) of one implementation."""
        if impl == "sdpa":
            mod = PackedSDPAttention(cfg, 1, AttnMaskType.causal)
            return lambda q, k, v: mod(q, k, v, None, packed_seq_params=psp)
        if impl == "ring-kernel":  # one ring member holding both chunks: no communication
            rows = cx.PackedRows.from_cu_seqlens(cu, b, seq)
            plan = cx._RingPlan(
                None,
                0,
                1,
                [cx.cp_chunk_starts(seq, 0, 1)],
                seq // 2,
                rows,
                True,
                scale,
                tiles.query_tile,
                tiles.key_tile,
            )

            def ring(q, k, v):
                qb = q.permute(1, 2, 0, 3).reshape(b, hkv, hq // hkv, seq, d)
                out = cx._RingAttention.apply(qb, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), plan)
                return out.reshape(b, hq, seq, d).permute(2, 0, 1, 3).reshape(seq, b, hq * d)

            return ring
        mod = cx.ContextParallelAttention(cfg, 1, AttnMaskType.causal, cp_comm_type=impl, pg_collection=pgc)
        return lambda q, k, v: mod(q, k, v, None, packed_seq_params=psp)

    tiles = cx.ContextParallelAttention(cfg, 1, AttnMaskType.causal, pg_collection=pgc)  # default tile sizes
    results = []
    for seq in a.seq_lengths:
        g = torch.Generator().manual_seed(seq)
        full = [torch.randn(seq, b, h, d, generator=g) for h in (hq, hkv, hkv)]
        w = torch.randn(seq, b, hq * d, generator=g)
        cu = torch.tensor(_pack_bounds(seq, b, a.samples_per_pack), dtype=torch.int32)
        psp = packed_seq_params_from_cu_seqlens(cu)
        local = [cx.split_for_cp(t, 0, rank, world).contiguous() for t in full]
        w_local = cx.split_for_cp(w, 0, rank, world).contiguous()
        del full, w
        for impl in a.impls:
            forward = make(impl, seq, cu, psp)

            def step(measure_saved: bool = False) -> int:
                q, k, v = (t.detach().requires_grad_() for t in local)
                if measure_saved:
                    out, saved = _saved_bytes(lambda: forward(q, k, v))
                else:
                    out, saved = forward(q, k, v), 0
                (out * w_local).sum().backward()
                return saved

            step()  # warm-up
            times, cpu_times = [], []
            for _ in range(a.reps):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                times.append(float(dt[0]))
                cpu_times.append(float(dt[1]))
            dist.barrier()
            saved = torch.tensor([step(measure_saved=True)], dtype=torch.float64)
            dist.barrier()
            peak = torch.tensor([_profiled_peak(step)], dtype=torch.float64)
            for t in (saved, peak):
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            results.append(
                {
                    "seq": seq,
                    "cp": world,
                    "impl": impl,
                    "time_s": statistics.median(times),
                    "cpu_s": statistics.median(cpu_times),
                    "peak_bytes": int(peak),
                    "saved_bytes": int(saved),
                }
            )
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(results, f)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# parent: launch the worlds, print the ratios
# ------------------------------------------------------------------------------------------------
def _worlds(a: argparse.Namespace) -> list[tuple[int, list[str]]]:
    """(CP size, implementations measured in that world)."""
    comms = ["p2p", "a2a", "a2a+p2p"] if "all" in a.cp_comm_type else a.cp_comm_type
    A, P = a.hierarchical_context_parallel_sizes
    worlds = []
    for c in a.context_parallel_sizes:
        if c == 1:
            worlds.append((1, ["sdpa", "ring-kernel"]))
            continue
        impls = []
        for comm in comms:
            if comm == "a2a+p2p" and A * P != c:
                continue
            size = {"p2p": 1, "a2a": c, "a2a+p2p": A}[comm]
            if a.num_attention_heads % size or a.num_query_groups % size:
                print(
                    f"skipping cp{c} {comm}: {a.num_attention_heads} q / {a.num_query_groups} kv heads "
                    f"are not divisible by {size}"
                )
                continue
            impls.append(comm)
        if impls:
            worlds.append((c, impls))
    return worlds


def _launch(a: argparse.Namespace, c: int, impls: list[str], out: str) -> None:
    from internvl_mcore.parallel.state import free_port

    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(c),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        os.path.abspath(__file__),
        "--worker",
        "--impls",
        *impls,
        "--out",
        out,
        "--seq-lengths",
        *map(str, a.seq_lengths),
        "--reps",
        str(a.reps),
        "--hierarchical-context-parallel-sizes",
        *map(str, a.hierarchical_context_parallel_sizes),
        "--num-attention-heads",
        str(a.num_attention_heads),
        "--num-query-groups",
        str(a.num_query_groups),
        "--kv-channels",
        str(a.kv_channels),
        "--micro-batch-size",
        str(a.micro_batch_size),
        "--samples-per-pack",
        str(a.samples_per_pack),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"bench/context_parallel.py: cp{c} {impls} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )


def main(a: argparse.Namespace) -> None:
    from tqdm import tqdm

    cores = os.cpu_count() or 1
    worlds = _worlds(a)
    print(
        f"attention fwd+bwd, fp32, B={a.micro_batch_size}, {a.num_attention_heads} q heads / "
        f"{a.num_query_groups} kv heads x {a.kv_channels}, {a.samples_per_pack} causal sample(s) per row; "
        f"{cores} cores, 1 thread per rank"
    )
    if max(c for c, _ in worlds) > cores:
        print(f"note: CP sizes above {cores} share cores: their times include waiting for a core")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for c, impls in tqdm(worlds, desc="CP worlds", unit="world"):
            out = os.path.join(d, f"cp{c}.json")
            _launch(a, c, impls, out)
            with open(out) as f:
                rows += json.load(f)
    base = {r["seq"]: r for r in rows if r["cp"] == 1 and r["impl"] == "sdpa"}
    mib = 1 << 20
    print(
        f"\n{'seq':>6} {'cp':>3} {'impl':<12} {'time s':>8} {'x cp1':>6} {'cpu s':>7} {'x cp1':>6} "
        f"{'peak MiB':>9} {'x cp1':>6} {'saved MiB':>9} {'x cp1':>6}"
    )

    def ratio(x: float, b: Optional[float]) -> str:
        return f"{x / b:>6.2f}" if b else f"{'-':>6}"

    for r in sorted(rows, key=lambda r: (r["seq"], r["cp"], r["impl"])):
        b = base.get(r["seq"], {})
        print(
            f"{r['seq']:>6} {r['cp']:>3} {r['impl']:<12} {r['time_s']:>8.3f} {ratio(r['time_s'], b.get('time_s'))} "
            f"{r['cpu_s']:>7.3f} {ratio(r['cpu_s'], b.get('cpu_s'))} "
            f"{r['peak_bytes'] / mib:>9.1f} {ratio(r['peak_bytes'], b.get('peak_bytes'))} "
            f"{r['saved_bytes'] / mib:>9.1f} {ratio(r['saved_bytes'], b.get('saved_bytes'))}"
        )
    print("\nx cp1 = ratio to cp1 sdpa at the same length; time/cpu = slowest rank, memory = largest rank")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:
        print(
            f"note: load average {load:.1f} on {cores} cores during this run: wall times are unreliable, "
            "compare the cpu column"
        )


if __name__ == "__main__":
    args = parse_args()
    if args.worker:
        worker(args)
    else:
        main(args)
