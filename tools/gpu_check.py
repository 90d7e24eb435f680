#!/usr/bin/env python
"""The one-command GPU check (`bash scripts/gpu_check.sh`): does the GPU path train, and train right?

Prints one line per check, `PASS`, `FAIL` or `SKIP (reason)`, each naming the backends that ran
(`[local specs, SDPA]`, `[TE, flash-attn]`, ...), and exits 1 if any check FAILed (a SKIP is never a
PASS: the summary counts them apart). Every check runs in its own process with its own time limit
(CHECKS below), so a hang or a crash fails that check only.

  fp32_vs_cpu       the debug model from a CPU-written checkpoint, 3 steps on mock data, fp32 with TF32
                    off: losses and grad norms == the committed CPU numbers (tools/gpu_reference.json)
                    within 1e-4 relative
  bf16_vs_cpu       the same run in bf16: within 2e-2 of the same numbers
  resume            6 steps saving at 3, then --load at 3 (distributed optimizer off and on): steps 4-6
                    within 1e-4 of the uninterrupted run (not bit-exact: GPU kernels are not deterministic)
  device_tiling     --image-tiling device on the GPU == Pillow's tiles byte for byte
  moe_vs_cpu        debug-moe from a CPU-written checkpoint, 5 steps on the digits shards: CPU numbers, 1e-4
  mpo_vs_cpu        --stage mpo, 3 steps on the digits preference shards: CPU numbers, 1e-4
  export_logits     fp32_vs_cpu's checkpoint -> tools/convert_to_hf.py -> transformers: logits == ours
  speed             InternVL3-1B shape, bf16, mock data, 4k and 16k packs: tokens/s, MFU against the
                    card's dense bf16 spec peak and the measured matmul peak, peak memory / planner's
  te_bf16_train     (transformer-engine importable) TE specs, bf16, 20 steps: finite, decreasing loss
  flash_vs_sdpa     (flash-attn importable) flash-attn varlen == the per-sample SDPA path (bf16 tol.)
  cpu_ckpt_into_te  (transformer-engine importable) a CPU checkpoint in the TE model: the CPU's logits
  tp2, cp2          (2+ GPUs) TP2 and CP2 against the single-GPU losses (bf16 tol.)

The data (digits shards, CPU-written checkpoints) comes from `--data DIR` when given (made on a CPU
machine by `scripts/gpu_wheels.sh` and carried), else it is made here (needs scikit-learn). The
reference numbers are made on CPU by `--write-reference` and checked for drift by
tests/gpu_path/test_gpu_reference.py; the comparisons also run with `--device cpu` there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REFERENCE = REPO / "tools" / "gpu_reference.json"
FP32_RTOL, BF16_RTOL = 1e-4, 2e-2
MARK = "GPU_CHECK_RESULT "  # a child check's result line (JSON after it)
# No TF32 anywhere (cuBLAS and cuDNN honour it): fp32 on the GPU must be comparable with the CPU's fp32.
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}
# Spec sheets' dense bf16 tensor-core peaks (the "with sparsity" figure halved), SXM parts.
SPEC_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}

# The reference runs: the same flags on CPU (tools/gpu_reference.json) and on the GPU.
# --num-workers 0: packs decoded in the training process (no loader processes to wait on).
COMMON = [
    "--seed",
    "3",
    "--lr",
    "1e-3",
    "--peak-flops",
    "1",
    "--log-interval",
    "100",
    "--drop-path-rate",
    "0",
    "--num-workers",
    "0",
]
RUNS = {
    "dense": dict(
        model="debug", iters=3, data=None, flags=["--mock-data", "--seq-length", "256", "--global-batch-size", "4"]
    ),
    "moe": dict(model="debug-moe", iters=5, data="sft", flags=["--seq-length", "800", "--global-batch-size", "2"]),
    "mpo": dict(
        model="debug", iters=3, data="pref", flags=["--stage", "mpo", "--seq-length", "800", "--global-batch-size", "2"]
    ),
}


@dataclass
class Result:
    """One line of the report: status PASS, FAIL or SKIP (detail is then the reason)."""

    name: str
    status: str
    detail: str
    backends: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "PASS"

    def line(self) -> str:
        where = f" [{self.backends}]" if self.backends else ""
        if self.status == "SKIP":
            return f"SKIP {self.name} ({self.detail}){where}"
        return f"{self.status} {self.name}{where}: {self.detail}"


def verdict(name: str, ok: bool, detail: str, backends: str = "") -> Result:
    return Result(name, "PASS" if ok else "FAIL", detail, backends)


def skip(name: str, reason: str, backends: str = "") -> Result:
    return Result(name, "SKIP", reason, backends)


# ---------------------------------------------------------------------------------------------
# judging (pure Python: unit-tested on CPU)
def read_log(path: Path) -> dict[int, dict]:
    """--log-jsonl records by iteration."""
    return {r["iteration"]: r for r in map(json.loads, Path(path).read_text().splitlines()) if r}


def judge_reference(name: str, records: dict[int, dict], want: dict, rtol: float, backends: str = "") -> Result:
    """Losses and grad norms of iterations 1..n against reference numbers {"loss": [...], "grad_norm": [...]}
    within `rtol` relative; the detail names the worst quantity."""
    n = len(want["loss"])
    if sorted(records)[:n] != list(range(1, n + 1)):
        return verdict(name, False, f"logged iterations {sorted(records)}, expected 1..{n}", backends)
    worst, where = 0.0, ""
    for key in ("loss", "grad_norm"):
        for i, ref in enumerate(want[key]):
            got = records[i + 1][key]
            rel = abs(got - ref) / max(abs(ref), 1e-12) if math.isfinite(got) else math.inf
            if rel >= worst:
                worst, where = rel, f"{key} {i + 1}: {got:.6g} vs CPU {ref:.6g}"
    return verdict(
        name,
        worst <= rtol,
        f"{n} steps, largest relative difference {worst:.2e} (tolerance {rtol:g}) at {where}",
        backends,
    )


def judge_training(records: dict[int, dict], iters: int, backends: str, want_backend: str = "TE") -> Result:
    """All iterations logged, finite losses, mean of the last 5 below the mean of the first 5, and the
    backend asked for really ran (a local-spec run is not a TE pass)."""
    name = "te_bf16_train"
    if not backends.startswith(want_backend):
        return verdict(name, False, f"ran on [{backends}], not {want_backend}", backends)
    losses = [records[i]["loss"] for i in sorted(records)]
    if sorted(records) != list(range(1, iters + 1)):
        return verdict(name, False, f"logged iterations {sorted(records)}, expected 1..{iters}", backends)
    if not all(math.isfinite(x) for x in losses):
        return verdict(name, False, f"non-finite loss: {losses}", backends)
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    return verdict(
        name,
        last < first,
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of first 5 {first:.4f}, last 5 {last:.4f})",
        backends,
    )


def judge_same_losses(
    name: str, ref: dict[int, dict], other: dict[int, dict], steps: Sequence[int], rtol: float, backends: str = ""
) -> Result:
    """Losses of `steps` equal within `rtol` relative (never demanded bit-exact)."""
    missing = [s for s in steps if s not in ref or s not in other]
    if missing:
        return verdict(name, False, f"iterations {missing} not logged by both runs", backends)
    worst = max(abs(other[s]["loss"] - ref[s]["loss"]) / max(abs(ref[s]["loss"]), 1e-12) for s in steps)
    worst = worst if all(math.isfinite(other[s]["loss"]) for s in steps) else math.inf
    return verdict(
        name,
        worst <= rtol,
        f"steps {steps[0]}-{steps[-1]}: largest relative difference {worst:.2e} (tolerance {rtol:g})",
        backends,
    )


def speed_numbers(
    records: dict[int, dict], spec_peak: Optional[float], predicted_bytes: float, skip_steps: int = 3
) -> dict:
    """Medians of the steps after `skip_steps` warm-up steps: tokens/s, MFU against the measured peak
    (logged) and the spec peak, peak memory and its ratio to the planner's prediction."""
    steady = [records[i] for i in sorted(records) if i > skip_steps]
    if not steady or any("mfu" not in r for r in steady):
        raise ValueError(f"no steady-state steps with MFU logged (iterations {sorted(records)})")
    measured_peak = steady[-1]["peak_flops_per_rank"]
    mfu = statistics.median(r["mfu"] for r in steady)
    mem = max(r["peak_memory_bytes"] for r in steady)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu_measured": mfu,
        "measured_peak": measured_peak,
        "mfu_spec": mfu * measured_peak / spec_peak if spec_peak else None,
        "peak_memory_gib": mem / 2**30,
        "memory_ratio": mem / predicted_bytes,
    }


def describe_speed(seq: int, s: dict) -> str:
    spec = f"{100 * s['mfu_spec']:.1f}% of spec" if s["mfu_spec"] is not None else "spec peak unknown"
    return (
        f"{seq // 1024}k: {s['tokens_per_s']:.0f} tokens/s, MFU {spec}, {100 * s['mfu_measured']:.1f}% of "
        f"measured {s['measured_peak'] / 1e12:.0f} TFLOP/s, peak mem {s['peak_memory_gib']:.1f} GiB = "
        f"{s['memory_ratio']:.2f} x planner"
    )


def judge_close(name: str, got, want, atol: float, rtol: float, backends: str = "") -> Result:
    """Two tensors equal within tolerances; the detail gives the largest absolute difference."""
    import torch

    if got.shape != want.shape:
        return verdict(name, False, f"shapes {tuple(got.shape)} vs {tuple(want.shape)}", backends)
    diff = float((got.float() - want.float()).abs().max())
    ok = bool(torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol))
    return verdict(
        name, ok, f"max |difference| {diff:.2e} (atol {atol:g}, rtol {rtol:g}) over {tuple(got.shape)}", backends
    )


def backends(device: str, bf16: bool, cp_ring: bool = False) -> str:
    """What a run on `device` uses: layer specs (TE or local) and core attention (flash-attn varlen
    for bf16 on CUDA when importable, else torch SDPA; our ring for the row CP split)."""
    from internvl_mcore.parallel import attention
    from internvl_mcore.models.specs import default_backend

    linears = "TE" if default_backend(device) == "te" else "local specs"
    if cp_ring:
        return f"{linears}, ours (CP ring)"
    flash = device == "cuda" and bf16 and attention.flash_attn_varlen_func is not None
    return f"{linears}, {'flash-attn' if flash else 'SDPA'}"


# ---------------------------------------------------------------------------------------------
# running things
def run(cmd: list[str], timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run a command from the repo root; raises with its output tail if it fails. torch.distributed's
    variables of this process are not passed on (the child must not reuse this world's port)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**base, "PYTHONWARNINGS": "ignore", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def train_cmd(nproc: int, *args: str) -> list[str]:
    from internvl_mcore.parallel.state import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "pretrain_internvl.py"),
        *args,
    ]


def train(log: Path, flags: Sequence[str], timeout: float, nproc: int = 1) -> dict[int, dict]:
    """One pretrain_internvl.py run (TF32 off); its logged records. Retried once, on a new port, when
    the free port found was taken before torchrun bound it."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        try:
            run(
                train_cmd(nproc, *flags, "--log-jsonl", str(log)),
                timeout=timeout,
                env={**NO_TF32, "OMP_NUM_THREADS": "4"},
            )
            return read_log(log)
        except RuntimeError as exc:
            if attempt == 2 or "address already in use" not in str(exc).lower():
                raise
    raise AssertionError("unreachable")


def reference_flags(kind: str, data: Path, device: str, bf16: bool = False) -> list[str]:
    """The flags of reference run `kind` (RUNS) from the CPU-written checkpoint in `data`."""
    spec = RUNS[kind]
    flags = [
        "--model",
        spec["model"],
        *COMMON,
        *spec["flags"],
        "--train-iters",
        str(spec["iters"]),
        "--pretrained",
        str(data / f"ckpt_{spec['model']}"),
        "--device",
        device,
    ]
    if spec["data"]:
        flags += ["--data-path", str(data / "shards" / spec["data"])]
    return flags + (["--bf16"] if bf16 else [])


def write_cpu_checkpoint(out: Path, model_name: str) -> None:
    """(A CPU process, CUDA hidden.) A local-spec fp32 checkpoint of a seeded model, written by the
    training checkpoint code: the GPU runs start from the very weights the CPU references did."""
    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.models.weights import init_weights
    from internvl_mcore.parallel.state import init_distributed
    from internvl_mcore.training import checkpoint

    from internvl_mcore.config.training import ComputeConfig

    par = ParallelConfig()
    pg = init_distributed(par, seed=0, device="cpu")
    cfg = get_preset(model_name)
    model = build_model(cfg, par, pg, compute=ComputeConfig(device="cpu")).eval()
    init_weights(model, cfg, seed=21)
    checkpoint.save(out, 1, model, None, None, cfg, par)


def prepare_data(out: Path) -> None:
    """The digits shards (SFT and preference) and the CPU-written checkpoints the reference runs start
    from. Run on a CPU machine (scripts/gpu_wheels.sh) and carried, or here (needs scikit-learn)."""
    from internvl_mcore.data.digits import build_digits_dataset

    d = build_digits_dataset(str(out / "digits"), multi_image=4, text_only=4, max_single=20, preference_pairs=48)
    for name, meta, extra in (("sft", d.meta, []), ("pref", d.preference_meta, ["--preference"])):
        run(
            [
                sys.executable,
                "tools/preprocess_mm_data.py",
                "--meta",
                meta,
                "--tokenizer",
                d.tokenizer,
                "--output-prefix",
                str(out / "shards" / name),
                "--seq-length",
                "800",
                "--model",
                "debug",
                "--workers",
                "1",
                "--no-progress",
                *extra,
            ],
            timeout=300,
        )
    for model in sorted({r["model"] for r in RUNS.values()}):
        run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--write-cpu-checkpoint",
                str(out / f"ckpt_{model}"),
                "--model",
                model,
            ],
            timeout=300,
            env={"CUDA_VISIBLE_DEVICES": ""},
        )
    (out / "READY").write_text("ok\n")


def shard_hashes(data: Path, name: str) -> dict:
    """The sha256 of every file of shard set `name` (from its manifest): the data a reference ran on."""
    return json.loads((data / "shards" / f"{name}.manifest.json").read_text())["files"]


def reference_numbers(work: Path, data: Path, kind: str, device: str = "cpu", bf16: bool = False) -> dict:
    """Run reference run `kind` on `device`: {"loss": [...], "grad_norm": [...]}."""
    records = train(
        work / f"{kind}_{device}{'_bf16' if bf16 else ''}.jsonl", reference_flags(kind, data, device, bf16), timeout=300
    )
    return {k: [records[i][k] for i in sorted(records)] for k in ("loss", "grad_norm")}


def write_reference(work: Path, path: Path = REFERENCE) -> dict:
    """Make the data and the CPU reference numbers of every run in RUNS; write them to `path`."""
    prepare_data(work / "data")
    data = work / "data"
    runs = {k: {"flags": reference_flags(k, Path("DATA"), "cpu"), **reference_numbers(work, data, k)} for k in RUNS}
    for k, spec in RUNS.items():
        if spec["data"]:
            runs[k]["shards"] = shard_hashes(data, spec["data"])
    ref = {"made_by": "python tools/gpu_check.py --write-reference (CPU, fp32)", "runs": runs}
    path.write_text(json.dumps(ref, indent=1) + "\n")
    return ref


def load_reference(path: Path = REFERENCE) -> dict:
    return json.loads(Path(path).read_text())["runs"]


# ---------------------------------------------------------------------------------------------
# the checks: each takes the context and returns Results
@dataclass
class Ctx:
    work: Path
    data: Path
    device: str = "cuda"


def _ensure_data(ctx: Ctx) -> str:
    """The data in ctx.data when READY (carried, or made by an earlier check), else made here; says which."""
    if (ctx.data / "READY").exists():
        return "prepared data"
    prepare_data(ctx.data)
    return "data made here"


def check_vs_cpu(ctx: Ctx, name: str, kind: str, bf16: bool) -> Result:
    """Reference run `kind` on the device against the committed CPU numbers (fp32 or bf16 tolerance).
    The dense fp32 run also saves its checkpoint for export_logits."""
    where, want = _ensure_data(ctx), load_reference()[kind]
    used = backends(ctx.device, bf16)
    if RUNS[kind]["data"] and shard_hashes(ctx.data, RUNS[kind]["data"]) != want["shards"]:
        return verdict(name, False, f"the {where}'s shards differ from those the CPU reference ran on", used)
    flags = reference_flags(kind, ctx.data, ctx.device, bf16)
    if kind == "dense" and not bf16:
        flags += ["--save", str(ctx.work / "gpu_ckpt"), "--save-interval", str(RUNS[kind]["iters"])]
    records = train(ctx.work / f"{name}.jsonl", flags, timeout=300)
    r = judge_reference(name, records, want, BF16_RTOL if bf16 else FP32_RTOL, used)
    r.detail += f" ({RUNS[kind]['model']}, {where})"
    return r


def check_resume(ctx: Ctx) -> list[Result]:
    """6 fp32 steps saving at 3, then a resume at 3, with and without the distributed optimizer."""
    _ensure_data(ctx)
    out = []
    for dist_opt in (False, True):
        name = f"resume{'_distopt' if dist_opt else ''}"
        ckpt = ctx.work / f"{name}_ckpt"
        flags = _set_flag(reference_flags("dense", ctx.data, ctx.device), "--train-iters", "6")
        flags += ["--use-distributed-optimizer"] if dist_opt else []
        full = train(ctx.work / f"{name}_full.jsonl", flags + ["--save", str(ckpt), "--save-interval", "3"], 300)
        shutil.rmtree(ckpt / f"iter_{6:07d}")
        (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
        resumed = _set_flag(flags, "--pretrained", None) + ["--load", str(ckpt)]
        again = train(ctx.work / f"{name}_resumed.jsonl", resumed, 300)
        out.append(judge_same_losses(name, full, again, [4, 5, 6], FP32_RTOL, backends(ctx.device, False)))
    return out


def _set_flag(flags: list[str], flag: str, value: Optional[str]) -> list[str]:
    """`flags` with `flag`'s value replaced (None: the flag and its value removed)."""
    i = flags.index(flag)
    return flags[:i] + ([flag, value] if value is not None else []) + flags[i + 2 :]


SPEED_RUNS = ((4096, 4), (16384, 2))  # (--seq-length, --global-batch-size)


def speed_setup(seq: int, gbs: int, device: str, gpu_name: str) -> tuple[list[str], float]:
    """The speed run's flags (InternVL3-1B, bf16, mock packs of two samples, half of the tokens image
    tokens) and the planner's peak-memory prediction for that layout (TP1 PP1 CP1 DP1) in bytes."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.plan import HARDWARE, Layout, Workload, plan

    cfg = get_preset("internvl3-1b")
    tiles = seq // 2 // cfg.num_image_token // 2  # per sample
    flags = [
        "--model",
        "internvl3-1b",
        "--mock-data",
        "--mock-tiles-per-sample",
        str(tiles),
        "--bf16",
        "--seq-length",
        str(seq),
        "--global-batch-size",
        str(gbs),
        "--train-iters",
        "8",
        "--lr",
        "1e-5",
        "--device",
        device,
        "--log-interval",
        "100",
    ]
    work = Workload(seq_length=seq, global_batch_size=gbs, tiles_per_sequence=2 * tiles, sample_length=seq // 2)
    hw = HARDWARE["h200" if "H200" in gpu_name else "h100"]
    return flags, plan(cfg, Layout(1, 1, 1, 1, False, False, False), work, hw).stages[0].total


def check_speed(ctx: Ctx) -> Result:
    """SPEED_RUNS on the device: tokens/s, MFU (spec and measured peak), memory against the planner."""
    import torch

    name = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu"
    spec = next((v for k, v in SPEC_BF16_PEAK.items() if k in name), None)
    parts = []
    for seq, gbs in SPEED_RUNS:
        flags, predicted = speed_setup(seq, gbs, ctx.device, name)
        records = train(ctx.work / f"speed_{seq}.jsonl", flags, timeout=240)
        parts.append(describe_speed(seq, speed_numbers(records, spec, predicted)))
    return verdict("speed", True, f"{name}: " + "; ".join(parts), backends(ctx.device, True))


def check_te_train(ctx: Ctx) -> Result:
    """TE specs, bf16, 20 steps on mock data from the seeded init: finite and decreasing."""
    from internvl_mcore.models.specs import have_transformer_engine

    used = backends(ctx.device, True)
    if not have_transformer_engine():
        return skip("te_bf16_train", "transformer-engine not installed", used)
    flags = [
        "--model",
        "debug",
        *COMMON,
        "--mock-data",
        "--seq-length",
        "1024",
        "--global-batch-size",
        "4",
        "--train-iters",
        "20",
        "--bf16",
        "--device",
        ctx.device,
    ]
    return judge_training(train(ctx.work / "te_bf16.jsonl", flags, 300), 20, used)


def check_flash_vs_sdpa(ctx: Ctx, seed: int = 0) -> Result:
    """flash-attn's varlen kernel and the per-sample SDPA path on one packed bf16 batch."""
    import torch

    from internvl_mcore.parallel import attention as attn

    if attn.flash_attn_varlen_func is None:
        return skip("flash_vs_sdpa", "flash-attn not installed", backends(ctx.device, True))
    device = ctx.device
    g = torch.Generator(device=device).manual_seed(seed)
    s, b, hq, hkv, d = 1024, 2, 8, 2, 64
    q = torch.randn(s, b, hq, d, generator=g, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(s, b, hkv, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, 100, 612, 1024, 1500, 2048], dtype=torch.int32, device=device)
    packed = attn.packed_seq_params_from_cu_seqlens(cu)
    module = _core_attention(hq, hkv, d).to(device)
    flash = module(q, k, v, None, packed_seq_params=packed)
    saved, attn.flash_attn_varlen_func = attn.flash_attn_varlen_func, None
    try:
        sdpa = module(q, k, v, None, packed_seq_params=packed)
    finally:
        attn.flash_attn_varlen_func = saved
    return judge_close("flash_vs_sdpa", flash, sdpa, atol=2e-2, rtol=2e-2, backends="flash-attn vs SDPA")


def _core_attention(hq: int, hkv: int, d: int):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from internvl_mcore.parallel.attention import PackedSDPAttention

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=hq * d,
        num_attention_heads=hq,
        num_query_groups=hkv,
        kv_channels=d,
        use_cpu_initialization=True,
    )
    return PackedSDPAttention(cfg, 1, AttnMaskType.causal).eval()


def _probe(cfg):
    """One packed mock row (two samples, one tile each): ids, positions, tiles, cu_seqlens."""
    from internvl_mcore.training.batch import Batch
    from internvl_mcore.training.mock import mock_sample

    b = Batch.from_packs([mock_sample(0, seed=5, cfg=cfg, seq_length=256, tiles=1)], 256, cfg.pad_token_id)
    return b.tokens, b.position_ids, b.images.pixel_values(), b.cu_seqlens


def _model_on(ctx: Ctx, ckpt: Path):
    """The debug model built for ctx.device (its default specs), weights from `ckpt`, fp32, eval."""
    import torch

    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import init_distributed
    from internvl_mcore.training.checkpoint import load_weights

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    from internvl_mcore.config.training import ComputeConfig

    par = ParallelConfig()
    pg = init_distributed(par, seed=0, device=ctx.device)
    cfg = get_preset("debug")
    model = build_model(cfg, par, pg, compute=ComputeConfig(device=ctx.device)).to(ctx.device).eval()
    load_weights(ckpt, model, cfg)
    return model, cfg


def check_cpu_checkpoint_into_te(ctx: Ctx) -> Result:
    """The CPU-written checkpoint in the TE model on the GPU (the --pretrained code): the CPU's logits."""
    import torch

    from internvl_mcore.models.specs import have_transformer_engine

    used = backends(ctx.device, False)
    if not have_transformer_engine():
        return skip("cpu_ckpt_into_te", "transformer-engine not installed", used)
    _ensure_data(ctx)
    probe = ctx.work / "cpu_logits.pt"
    run(
        [sys.executable, str(Path(__file__).resolve()), "--write-cpu-logits", str(ctx.data / "ckpt_debug"), str(probe)],
        timeout=300,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    model, cfg = _model_on(ctx, ctx.data / "ckpt_debug")
    linear = type(model.language_model.decoder.layers[0].mlp.linear_fc1).__name__
    ids, pos, pixels, cu = (t.to(ctx.device) for t in _probe(cfg))
    with torch.no_grad():
        got = model(ids, pos, pixels, cu_seqlens=cu)
    r = judge_close(
        "cpu_ckpt_into_te", got.cpu(), torch.load(probe, weights_only=True), atol=1e-3, rtol=1e-3, backends=used
    )
    if not linear.startswith("TE"):
        return verdict(r.name, False, f"the model's linears are {linear}, not TE; {r.detail}", used)
    return r


def write_cpu_logits(ckpt: Path, out: Path) -> None:
    """(A CPU process.) The local-spec model's logits on the probe row from `ckpt`."""
    import torch

    model, cfg = _model_on(Ctx(out.parent, ckpt.parent, "cpu"), ckpt)
    ids, pos, pixels, cu = _probe(cfg)
    with torch.no_grad():
        torch.save(model(ids, pos, pixels, cu_seqlens=cu), out)


def check_export(ctx: Ctx) -> Result:
    """fp32_vs_cpu's checkpoint (trained on the device) exported to transformers' layout: same logits."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from internvl_mcore.training.batch import Batch
    from internvl_mcore.training.mock import mock_sample

    ckpt = ctx.work / "gpu_ckpt"
    if not ckpt.exists():
        return verdict("export_logits", False, "no checkpoint from fp32_vs_cpu", backends(ctx.device, False))
    run(
        [
            sys.executable,
            "tools/convert_to_hf.py",
            "--load",
            str(ckpt),
            "--save",
            str(ctx.work / "hf"),
            "--format",
            "transformers",
            "--dtype",
            "fp32",
        ],
        timeout=300,
    )
    ours, cfg = _model_on(ctx, ckpt)
    sample = Batch.from_packs([mock_sample(0, seed=5, cfg=cfg, seq_length=256, tiles=1)], 256, cfg.pad_token_id)
    n = int(sample.cu_seqlens[1])  # the first sample of the pack: transformers takes no packs
    ids = sample.tokens[:, :n].to(ctx.device)
    pixels = sample.images.pixel_values()[:1].to(ctx.device)
    pos = torch.arange(n, dtype=torch.float32, device=ctx.device)[None]
    hf = InternVLForConditionalGeneration.from_pretrained(str(ctx.work / "hf"), dtype=torch.float32)
    hf = hf.to(ctx.device).eval()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pos, pixels)[..., : want.shape[-1]]
    return judge_close(
        "export_logits", got, want, atol=1e-3, rtol=1e-3, backends=f"{backends(ctx.device, False)} vs transformers"
    )


def check_device_tiling(ctx: Ctx, image_size: int = 448, seed: int = 0) -> Result:
    """SourceImages.tiles() on the device against image.cut_tiles (Pillow) on random images of every grid."""
    import numpy as np
    import torch
    from PIL import Image

    from internvl_mcore.data.image import candidate_grids, cut_tiles, plan_tiling
    from internvl_mcore.data.sample import DecodedImages
    from internvl_mcore.data.source_images import SourceImages

    device = ctx.device
    rng = np.random.default_rng(seed)
    sizes = [
        (c * 37 + k, r * 53 + 2 * k) if k % 2 else (c * image_size * 6 // 5 + k, r * image_size * 4 // 3)
        for k, (c, r) in enumerate(candidate_grids(1, 12))
    ]
    sizes += [(1, 1), (9 * image_size, 7 * image_size), (3, 2 * image_size), (2 * image_size, 3)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    tilings = [plan_tiling(w, h, 1, 12, image_size, True) for w, h in sizes]
    want = np.concatenate([cut_tiles(Image.fromarray(a), t, image_size) for a, t in zip(images, tilings)])
    offsets = np.cumsum([0] + [a.size for a in images])
    table = np.array(
        [[a.shape[0], a.shape[1], t.cols, t.rows, int(t.thumbnail), o] for a, t, o in zip(images, tilings, offsets)],
        dtype=np.int64,
    )
    batch = SourceImages.from_numpy(
        DecodedImages(np.concatenate([a.reshape(-1) for a in images]), table), image_size
    ).to(device)
    got = batch.tiles().cpu().numpy()  # first call: coefficients made and cached
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        type(batch)(batch.pixels, batch.table, image_size).tiles()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    same = got.shape == want.shape and bool((got == want).all())
    bad = int((got != want).any(axis=(1, 2, 3)).sum()) if got.shape == want.shape else -1
    return verdict(
        "device_tiling",
        same,
        f"{len(want)} tiles of {len(images)} images "
        f"{'byte-identical to Pillow' if same else f'DIFFER from Pillow ({bad} tiles)'}; "
        f"{1e6 * min(seconds) / len(want):.0f} us per tile on {device} (wall, launches included)",
        backends=f"data/resample.py on {device} vs Pillow",
    )


def check_parallel(ctx: Ctx) -> list[Result]:
    """TP2 and CP2 on 2 GPUs against the single-GPU bf16 losses of the dense reference run."""
    import torch

    n = torch.cuda.device_count() if ctx.device == "cuda" else 1
    if n < 2:
        return [skip(name, f"{n} GPU, needs 2") for name in ("tp2", "cp2")]
    _ensure_data(ctx)
    flags = reference_flags("dense", ctx.data, ctx.device, bf16=True)
    one = train(ctx.work / "tp1.jsonl", flags, 300)
    out = []
    for name, extra in (("tp2", ["--tensor-model-parallel-size", "2"]), ("cp2", ["--context-parallel-size", "2"])):
        other = train(ctx.work / f"{name}.jsonl", flags + extra, 300, nproc=2)
        out.append(judge_same_losses(name, one, other, [1, 2, 3], BF16_RTOL, backends(ctx.device, True)))
    return out


# (name, time limit in seconds, function of the context, names of the lines it prints)
CHECKS: list[tuple[str, int, Callable[[Ctx], object], tuple[str, ...]]] = [
    ("fp32_vs_cpu", 120, lambda c: check_vs_cpu(c, "fp32_vs_cpu", "dense", False), ("fp32_vs_cpu",)),
    ("bf16_vs_cpu", 60, lambda c: check_vs_cpu(c, "bf16_vs_cpu", "dense", True), ("bf16_vs_cpu",)),
    ("resume", 180, check_resume, ("resume", "resume_distopt")),
    ("device_tiling", 60, check_device_tiling, ("device_tiling",)),
    ("moe_vs_cpu", 60, lambda c: check_vs_cpu(c, "moe_vs_cpu", "moe", False), ("moe_vs_cpu",)),
    ("mpo_vs_cpu", 60, lambda c: check_vs_cpu(c, "mpo_vs_cpu", "mpo", False), ("mpo_vs_cpu",)),
    ("export_logits", 90, check_export, ("export_logits",)),
    ("speed", 200, check_speed, ("speed",)),
    ("te_bf16_train", 90, check_te_train, ("te_bf16_train",)),
    ("flash_vs_sdpa", 30, check_flash_vs_sdpa, ("flash_vs_sdpa",)),
    ("cpu_ckpt_into_te", 60, check_cpu_checkpoint_into_te, ("cpu_ckpt_into_te",)),
    ("parallel", 120, check_parallel, ("tp2", "cp2")),
]


BF16_CHECKS = {"bf16_vs_cpu", "speed", "te_bf16_train", "flash_vs_sdpa", "parallel"}


def _check_backends(name: str, ctx: Ctx) -> str:
    """The backends check `name` would run on (for the lines of a check that crashed or timed out)."""
    return backends(ctx.device, name in BF16_CHECKS)


def _short(exc: BaseException) -> str:
    """One line: the exception's type and its last line that names an error (else its last line)."""
    text = [x.strip() for x in str(exc).strip().splitlines() if x.strip().strip("=")]
    named = [x for x in text if "error" in x.lower() or "exception" in x.lower()]
    return f"{type(exc).__name__}: {(named or text or [''])[-1][:300]}"


def run_check_here(name: str, ctx: Ctx) -> list[Result]:
    """One check in this process; an exception is that check's FAIL."""
    _, _, fn, lines = next(c for c in CHECKS if c[0] == name)
    try:
        out = fn(ctx)
        return out if isinstance(out, list) else [out]
    except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
        return [verdict(line, False, _short(exc), _check_backends(name, ctx)) for line in lines]


def run_check_child(name: str, limit: int, ctx: Ctx) -> list[Result]:
    """One check in a child process under its time limit: a hang or a crash is its FAIL."""
    _, _, _, lines = next(c for c in CHECKS if c[0] == name)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run-check",
        name,
        "--work",
        str(ctx.work),
        "--data",
        str(ctx.data),
        "--device",
        ctx.device,
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return [
            verdict(line, False, f"timed out after its limit of {limit} s", _check_backends(name, ctx))
            for line in lines
        ]
    found = [Result(**json.loads(x[len(MARK) :])) for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return [
            verdict(
                line, False, f"check process exited {proc.returncode}: {' | '.join(tail)}", _check_backends(name, ctx)
            )
            for line in lines
        ]
    return found


def summary(results: Sequence[Result]) -> tuple[str, int]:
    """The last line and the exit status: 1 when anything FAILed; SKIPs counted apart, never as PASS."""
    count = {s: [r.name for r in results if r.status == s] for s in ("PASS", "FAIL", "SKIP")}
    line = (
        f"gpu_check: {len(count['PASS'])} passed, {len(count['FAIL'])} failed {count['FAIL'] or ''}, "
        f"{len(count['SKIP'])} skipped {count['SKIP'] or ''}"
    )
    return line, 1 if count["FAIL"] else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="scratch directory (default: a fresh temporary one, removed)")
    p.add_argument("--data", default=None, help="carried data from scripts/gpu_wheels.sh (default: made here)")
    p.add_argument(
        "--budget",
        type=float,
        default=570.0,
        help="seconds for all checks (default 570, inside gpu_check.sh's 590): a check whose limit "
        "exceeds what is left is not started (SKIP)",
    )
    p.add_argument("--only", nargs="+", choices=[c[0] for c in CHECKS], help="run these checks only")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)  # cpu: tests
    p.add_argument("--time-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # tests: CPU is slower
    p.add_argument("--run-check", help=argparse.SUPPRESS)  # internal: one check, in a child process
    p.add_argument("--write-cpu-checkpoint", metavar="DIR", help=argparse.SUPPRESS)  # internal, CUDA hidden
    p.add_argument("--model", default="debug", help=argparse.SUPPRESS)
    p.add_argument("--write-cpu-logits", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--write-reference", action="store_true", help="remake tools/gpu_reference.json on CPU")
    p.add_argument("--prepare", metavar="DIR", help="make the data (shards, CPU checkpoints) in DIR on CPU, to carry")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(work, Path(args.data) if args.data else work / "data", args.device)
    if args.write_cpu_checkpoint:
        write_cpu_checkpoint(Path(args.write_cpu_checkpoint), args.model)
    elif args.write_cpu_logits:
        write_cpu_logits(Path(args.write_cpu_logits[0]), Path(args.write_cpu_logits[1]))
    elif args.prepare:
        prepare_data(Path(args.prepare))
    elif args.write_reference:
        write_reference(work)
    elif args.run_check:
        for r in run_check_here(args.run_check, ctx):
            print(MARK + json.dumps(asdict(r)), flush=True)
    else:
        return run_all(
            ctx,
            args.only or [c[0] for c in CHECKS],
            remove=args.work is None,
            time_scale=args.time_scale,
            budget_s=args.budget,
        )
    return 0


def run_all(ctx: Ctx, names: Sequence[str], remove: bool, time_scale: float = 1.0, budget_s: float = 570.0) -> int:
    """Every check named, each in its own process; one line each and the summary."""
    import torch

    if ctx.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU present (torch.cuda.is_available() is False); nothing checked")
        return 0
    gpu = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu"
    print(f"gpu_check: {gpu}, torch {torch.__version__}, Python {sys.version.split()[0]}", flush=True)
    results: list[Result] = []
    begin = time.perf_counter()
    for name, limit, _, lines in CHECKS:
        if name not in names:
            continue
        start, limit = time.perf_counter(), int(limit * time_scale)
        left = budget_s - (start - begin)
        # a check that could run past the whole budget is not started: better a SKIP than no lines at all
        new = (
            [skip(line, f"{left:.0f} s left of the {budget_s:.0f} s budget, its limit is {limit} s") for line in lines]
            if limit > left
            else run_check_child(name, limit, ctx)
        )
        for r in new:
            print(f"{r.line()} ({time.perf_counter() - start:.0f} s)", flush=True)
            results.append(r)
    if remove:
        shutil.rmtree(ctx.work, ignore_errors=True)
    line, status = summary(results)
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
