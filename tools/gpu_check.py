#!/usr/bin/env python
"""The one-command GPU check (`bash scripts/gpu_check.sh`): does the GPU path train, and train right?

Prints one `PASS name: detail` / `FAIL name: detail` line per check and exits 1 if any failed:

  te_bf16_train     TE layer specs, bf16, 20 steps on 4k packs of the digits set with V2PE delta 0.25:
                    no NaN, loss decreasing (mean of the last 5 < mean of the first 5)
  flash_vs_sdpa     flash-attn varlen over a packed bf16 batch == the per-sample SDPA path (bf16 tol.)
  resume            save at step 10, --load, steps 11-20 give the logged losses of the run above
  cpu_ckpt_into_te  a checkpoint written on the CPU (local specs, fp32, CUDA hidden) loads into the TE
                    model on the GPU (the --pretrained code) and gives the CPU's logits (TF32 off)
  export_logits     the GPU run's checkpoint -> tools/convert_to_hf.py -> transformers on the GPU:
                    logits equal ours (fp32, TF32 off)
  speed             measured step time (median of steps 6-20) and bf16 MFU against the measured peak
  device_tiling     --image-tiling device: tiles cut on the GPU (data/resample.py) == Pillow's tiles
                    byte for byte (every grid of max_dynamic_patch 12, thumbnails, 1 px to 4032 px
                    images), and the GPU time per tile
  tp2 / cp2         with 2+ GPUs: TP2, and CP2 (TE 'thd' context parallelism), vs TP1 losses (bf16 tol.)

Run it on a CUDA machine with the Dockerfile's image; it needs no network (the data is generated).
The judging functions (`judge_*`) are plain Python and unit-tested on CPU (tests/gpu_path).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ITERS, SAVE_AT = 20, 10


@dataclass
class Result:
    """One line of the report."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


# ---------------------------------------------------------------------------------------------
# judging (pure Python: unit-tested on CPU)
def read_log(path: Path) -> dict[int, dict]:
    """--log-jsonl records by iteration."""
    return {r["iteration"]: r for r in map(json.loads, Path(path).read_text().splitlines()) if r}


def judge_training(records: dict[int, dict], iters: int = ITERS) -> Result:
    """All iterations logged, finite losses, mean of the last 5 below the mean of the first 5."""
    losses = [records[i]["loss"] for i in sorted(records)]
    if sorted(records) != list(range(1, iters + 1)):
        return Result("te_bf16_train", False, f"logged iterations {sorted(records)}, expected 1..{iters}")
    if not all(math.isfinite(x) for x in losses):
        return Result("te_bf16_train", False, f"non-finite loss: {losses}")
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    return Result("te_bf16_train", last < first, f"loss {losses[0]:.4f} -> {losses[-1]:.4f} "
                  f"(mean of first 5 {first:.4f}, last 5 {last:.4f})")


def judge_same_losses(name: str, ref: dict[int, dict], other: dict[int, dict], steps: Sequence[int],
                      rtol: float) -> Result:
    """Losses of `steps` equal within `rtol` (0: bit-identical); the detail gives the largest gap."""
    missing = [s for s in steps if s not in ref or s not in other]
    if missing:
        return Result(name, False, f"iterations {missing} not logged by both runs")
    gaps = [abs(other[s]["loss"] - ref[s]["loss"]) / max(abs(ref[s]["loss"]), 1e-12) for s in steps]
    worst = max(gaps)
    exact = all(other[s]["loss"] == ref[s]["loss"] for s in steps)
    what = "bit-identical" if exact else f"largest relative difference {worst:.2e} (tolerance {rtol:g})"
    return Result(name, exact or worst <= rtol, f"steps {steps[0]}-{steps[-1]}: {what}")


def judge_speed(records: dict[int, dict], skip: int = 5) -> Result:
    """Median step time and MFU of the steps after `skip` warm-up steps."""
    steady = [records[i] for i in sorted(records) if i > skip]
    if not steady:
        return Result("speed", False, "no steady-state steps logged")
    step = statistics.median(r["step_time_s"] for r in steady)
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    peak = steady[-1].get("peak_flops_per_rank")
    detail = f"median step {step:.3f} s, {statistics.median(r['tokens_per_s'] for r in steady):.0f} tokens/s"
    if mfu and peak:
        detail += f", bf16 MFU {100 * statistics.median(mfu):.1f}% of a measured peak of {peak / 1e12:.0f} TFLOP/s"
    return Result("speed", bool(mfu) and math.isfinite(step), detail)


def judge_close(name: str, got, want, atol: float, rtol: float) -> Result:
    """Two tensors equal within tolerances; the detail gives the largest absolute difference."""
    import torch

    diff = float((got.float() - want.float()).abs().max())
    ok = bool(torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol))
    return Result(name, ok, f"max |difference| {diff:.2e} (atol {atol:g}, rtol {rtol:g}) over {tuple(got.shape)}")


# ---------------------------------------------------------------------------------------------
# running things
def run(cmd: list[str], timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run a command from the repo root; raises with its output tail if it fails. The child starts its
    own process group: this process's torch.distributed variables (set once it joined a world) are
    not passed on, so the child does not reuse this world's port."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=REPO, env={**base, "PYTHONWARNINGS": "ignore", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), str(REPO / "pretrain_internvl.py"),
            "--model", "debug", "--seed", "3", "--lr", "1e-3", *args]


def make_data(work: Path, seq_length: int, delta: float) -> str:
    """The digits set (generated, no network) preprocessed into packs with V2PE delta `delta`."""
    from internvl_mcore.data.digits import build_digits_dataset

    d = build_digits_dataset(str(work / "digits"), multi_image=200, text_only=100, max_single=800)
    prefix = work / "shards" / "digits"
    run([sys.executable, "tools/preprocess_mm_data.py", "--meta", d.meta, "--tokenizer", d.tokenizer,
         "--output-prefix", str(prefix), "--seq-length", str(seq_length), "--model", "debug",
         "--v2pe-delta", str(delta), "--workers", "4", "--no-progress"], timeout=300)
    return str(prefix)


def check_train_and_resume(work: Path, data: str, seq_length: int, gbs: int) -> tuple[list[Result], dict]:
    """20 TE bf16 steps with checkpoints at 10 and 20, then a resume from 10."""
    common = ["--data-path", data, "--seq-length", str(seq_length), "--global-batch-size", str(gbs),
              "--train-iters", str(ITERS), "--bf16", "--device", "cuda"]
    ref_log, ckpt = work / "train.jsonl", work / "ckpt"
    run(train_cmd(1, *common, "--save", str(ckpt), "--save-interval", str(SAVE_AT),
                  "--log-jsonl", str(ref_log)), timeout=300)
    ref = read_log(ref_log)
    results = [judge_training(ref), judge_speed(ref)]
    resumed_ckpt = work / "ckpt_at_10"
    shutil.copytree(ckpt, resumed_ckpt)
    shutil.rmtree(resumed_ckpt / f"iter_{ITERS:07d}")
    (resumed_ckpt / "latest_checkpointed_iteration.txt").write_text(str(SAVE_AT))
    run(train_cmd(1, *common, "--load", str(resumed_ckpt), "--log-jsonl", str(work / "resume.jsonl")), timeout=300)
    results.append(judge_same_losses("resume", ref, read_log(work / "resume.jsonl"),
                                     list(range(SAVE_AT + 1, ITERS + 1)), rtol=0.0))
    return results, ref


def check_flash_vs_sdpa(device: str = "cuda", seed: int = 0) -> Result:
    """flash-attn's varlen kernel and the per-sample SDPA path on one packed bf16 batch."""
    import torch

    from internvl_mcore.models import attention as attn

    if attn.flash_attn_varlen_func is None:
        return Result("flash_vs_sdpa", False, "flash-attn is not importable")
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
    return judge_close("flash_vs_sdpa", flash, sdpa, atol=2e-2, rtol=2e-2)


def _core_attention(hq: int, hkv: int, d: int):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from internvl_mcore.models.attention import PackedSDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=hq * d, num_attention_heads=hq, num_query_groups=hkv,
                            kv_channels=d, use_cpu_initialization=True)
    return PackedSDPAttention(cfg, 1, AttnMaskType.causal).eval()


def _probe(cfg):
    """One packed mock row (two samples, one tile each): ids, V2PE-free positions, tiles, cu_seqlens."""
    from internvl_mcore.training.mock import mock_sample

    s = mock_sample(0, seed=5, cfg=cfg, seq_length=256, tiles=1)
    return s["tokens"][None], s["position_ids"][None], s["pixel_values"], s["cu_seqlens"]


def write_cpu_reference(out: Path) -> None:
    """(Run with --device cpu, CUDA hidden.) A local-spec fp32 checkpoint of the debug model, written
    by the training checkpoint code, and its logits on the probe row."""
    import torch

    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.models.weights import init_weights
    from internvl_mcore.parallel.state import init_distributed
    from internvl_mcore.training import checkpoint

    par = ParallelConfig(device="cpu")
    init_distributed(par, seed=0)
    cfg = get_preset("debug")
    model = build_model(cfg, par, process_groups()).eval()
    init_weights(model, cfg, seed=21)
    checkpoint.save(out / "ckpt", 1, model, None, None, cfg, par)
    ids, pos, pixels, cu = _probe(cfg)
    with torch.no_grad():
        torch.save(model(ids, pos, pixels, cu_seqlens=cu), out / "logits.pt")


def check_cpu_checkpoint_into_te(work: Path) -> Result:
    """A checkpoint written on the CPU (local specs) loads into the TE model on the GPU (the
    --pretrained code path) and gives the CPU's logits (fp32, TF32 off)."""
    import torch

    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.parallel.state import init_distributed
    from internvl_mcore.training.checkpoint import load_weights

    ref = work / "cpu_ref"
    run([sys.executable, str(Path(__file__).resolve()), "--write-cpu-reference", str(ref)], timeout=300,
        env={"CUDA_VISIBLE_DEVICES": ""})
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    par = ParallelConfig(device="cuda")
    init_distributed(par, seed=0)
    cfg = get_preset("debug")
    model = build_model(cfg, par, process_groups()).cuda().eval()
    backend = type(model.language_model.decoder.layers[0].mlp.linear_fc1).__name__
    load_weights(ref / "ckpt", model, cfg)
    ids, pos, pixels, cu = (t.cuda() for t in _probe(cfg))
    with torch.no_grad():
        got = model(ids, pos, pixels, cu_seqlens=cu)
    r = judge_close("cpu_ckpt_into_te", got.cpu(), torch.load(ref / "logits.pt"), atol=1e-3, rtol=1e-3)
    return Result(r.name, r.ok and backend.startswith("TE"), f"{r.detail}; GPU model's linears: {backend}")


def check_export(work: Path, ckpt: Path) -> Result:
    """The GPU run's last checkpoint exported to transformers' layout: same logits as ours on the GPU."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.parallel.state import init_distributed
    from internvl_mcore.training.checkpoint import load_weights
    from internvl_mcore.training.mock import mock_sample

    run([sys.executable, "tools/convert_to_hf.py", "--load", str(ckpt), "--save", str(work / "hf"),
         "--format", "transformers", "--dtype", "fp32"], timeout=300)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    par = ParallelConfig(device="cuda")
    init_distributed(par, seed=0)
    cfg = get_preset("debug")
    ours = build_model(cfg, par, process_groups()).cuda().eval()
    load_weights(ckpt, ours, cfg)
    sample = mock_sample(0, seed=5, cfg=cfg, seq_length=256, tiles=1)
    n = int(sample["cu_seqlens"][1])  # the first sample of the pack: transformers takes no packs
    ids = sample["tokens"][None, :n].cuda()
    pixels = sample["pixel_values"][:1].cuda()
    pos = torch.arange(n, dtype=torch.float32, device="cuda")[None]
    hf = InternVLForConditionalGeneration.from_pretrained(str(work / "hf"), torch_dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pos, pixels)[..., :want.shape[-1]]
    return judge_close("export_logits", got, want, atol=1e-3, rtol=1e-3)


def check_parallel(work: Path, data: str, seq_length: int, gbs: int, ref: dict) -> list[Result]:
    """TP2 and CP2 (TE 'thd' context parallelism) on 2 GPUs vs the single-GPU run's first 5 losses."""
    common = ["--data-path", data, "--seq-length", str(seq_length), "--global-batch-size", str(gbs),
              "--train-iters", "5", "--bf16", "--device", "cuda"]
    out = []
    for name, flags in (("tp2", ["--tensor-model-parallel-size", "2"]), ("cp2", ["--context-parallel-size", "2"])):
        try:
            run(train_cmd(2, *common, *flags, "--log-jsonl", str(work / f"{name}.jsonl")), timeout=300)
            out.append(judge_same_losses(name, ref, read_log(work / f"{name}.jsonl"), [1, 2, 3, 4, 5], rtol=2e-2))
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            out.append(Result(name, False, _short(exc)))
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''} ... {text[-1] if len(text) > 1 else ''}"


def check_device_tiling(device: str = "cuda", image_size: int = 448, seed: int = 0) -> Result:
    """SourceImages.tiles() on `device` against image.cut_tiles (Pillow) on random images of every grid."""
    import numpy as np
    import torch
    from PIL import Image

    from internvl_mcore.data.image import candidate_grids, cut_tiles, plan_tiling
    from internvl_mcore.data.sample import DecodedImages
    from internvl_mcore.data.source_images import SourceImages

    rng = np.random.default_rng(seed)
    sizes = [(c * 37 + k, r * 53 + 2 * k) if k % 2 else (c * image_size * 6 // 5 + k, r * image_size * 4 // 3)
             for k, (c, r) in enumerate(candidate_grids(1, 12))]
    sizes += [(1, 1), (9 * image_size, 7 * image_size), (3, 2 * image_size), (2 * image_size, 3)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    tilings = [plan_tiling(w, h, 1, 12, image_size, True) for w, h in sizes]
    want = np.concatenate([cut_tiles(Image.fromarray(a), t, image_size) for a, t in zip(images, tilings)])
    offsets = np.cumsum([0] + [a.size for a in images])
    table = np.array([[a.shape[0], a.shape[1], t.cols, t.rows, int(t.thumbnail), o]
                      for a, t, o in zip(images, tilings, offsets)], dtype=np.int64)
    batch = SourceImages.from_numpy(DecodedImages(np.concatenate([a.reshape(-1) for a in images]), table),
                                    image_size).to(device)
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
    return Result("device_tiling", same, f"{len(want)} tiles of {len(images)} images "
                  f"{'byte-identical to Pillow' if same else f'DIFFER from Pillow ({bad} tiles)'}; "
                  f"{1e6 * min(seconds) / len(want):.0f} us per tile on {device} (wall, launches included)")


def _guarded(name: str, fn, *args) -> list[Result]:
    try:
        out = fn(*args)
        return out if isinstance(out, list) else [out]
    except Exception as exc:  # noqa: BLE001
        return [Result(name, False, _short(exc))]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="scratch directory (default: a fresh temporary one, removed)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--v2pe-delta", type=float, default=0.25)
    p.add_argument("--write-cpu-reference", metavar="DIR", help=argparse.SUPPRESS)  # internal (a CPU subprocess)
    args = p.parse_args(argv)
    import torch

    if args.write_cpu_reference:
        write_cpu_reference(Path(args.write_cpu_reference))
        return 0

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU present (torch.cuda.is_available() is False); nothing checked")
        return 0
    ngpu = torch.cuda.device_count()
    print(f"gpu_check: {ngpu} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    results: list[Result] = []

    def report(new: list[Result]) -> None:
        for r in new:
            print(r.line(), flush=True)
        results.extend(new)

    data = make_data(work, args.seq_length, args.v2pe_delta)
    ref: dict = {}
    try:
        new, ref = check_train_and_resume(work, data, args.seq_length, args.global_batch_size)
        report(new)
    except Exception as exc:  # noqa: BLE001
        report([Result("te_bf16_train", False, _short(exc))])
    report(_guarded("flash_vs_sdpa", check_flash_vs_sdpa))
    report(_guarded("device_tiling", check_device_tiling))
    report(_guarded("cpu_ckpt_into_te", check_cpu_checkpoint_into_te, work))
    if ref:
        report(_guarded("export_logits", check_export, work, work / "ckpt"))
        if ngpu >= 2:
            report(check_parallel(work, data, args.seq_length, args.global_batch_size, ref))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r.name for r in results if not r.ok]
    print(f"gpu_check: {len(results) - len(failed)} passed, {len(failed)} failed {failed if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
