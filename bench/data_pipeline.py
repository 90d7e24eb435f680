#!/usr/bin/env python
"""Data pipeline benchmark: pack fill, bytes on disk per tile format, loader vs on-the-fly decoding.

    python bench/data_pipeline.py            # default run, a few minutes on 2 cores
    python bench/data_pipeline.py --quick    # smaller sizes, well under a minute

Prints four sections, all measured in this run on the same photos:
1. pack fill of `pack_lengths` on an InternVL-SFT-like length mix at --seq-length (goal >= 98%);
2. per tile format: bytes on disk per source image and per sample against the source JPEG files
   (goal for "source": <= 1.1x the source bytes plus the token arrays), and preprocessing CPU;
3. samples per CPU-second of PackedDataLoader (main process + its workers) against building the same
   samples on the fly from JSONL + JPEG files (parse, decode, tile, template, tokenize, normalize),
   as a ratio (goal >= 3x for the default format with 1 worker), with 0, 1 and 2 workers, tiling in
   the loader (Pillow) or decoding only (--image-tiling device); then what the device tiling costs:
   measured with torch on this CPU (a stand-in, no GPU runs here) and estimated on paper for an H200;
4. CPU cores per GPU the loader needs for InternVL3-8B at 16k-token packs, from the measured CPU per
   tile and the planner's step time (goal < 0.5 core), for both tilings.

Photos: scikit-learn's two bundled sample photos (china.jpg, flower.jpg), cropped and resized to
typical SFT image sizes and saved as JPEG like source data usually is. Falls back to synthetic
smooth images when scikit-learn is missing (the numbers are then less representative).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


# ------------------------------------------------------------------------------------------------
# 1. pack fill
# ------------------------------------------------------------------------------------------------


def sft_length_mix(n: int, seed: int, seq_length: int, num_image_token: int = 256) -> np.ndarray:
    """Token counts of an InternVL-style SFT mix.

    30% text-only (log-normal around 250 tokens, long tail to 6k), 45% single image (1-12 tiles by
    InternVL's grid choice + thumbnail, plus text), 15% multi-image (2-6 images of 12//n tiles),
    10% video (8-32 frames of one tile each, 'Frame-i: ' text per frame).
    """
    rng = np.random.default_rng(seed)

    def text(k):
        return np.clip(rng.lognormal(5.5, 0.9, k).astype(np.int64), 20, 6000)

    def img(tiles):
        return tiles * num_image_token + 2  # <img> ... </img>

    kind = rng.choice(4, size=n, p=[0.30, 0.45, 0.15, 0.10])
    out = np.empty(n, dtype=np.int64)
    m = kind == 0
    out[m] = text(m.sum())
    m = kind == 1
    out[m] = img(
        rng.choice([1, 3, 4, 5, 6, 7, 9, 10, 13], size=m.sum(), p=[0.2, 0.15, 0.1, 0.1, 0.15, 0.1, 0.1, 0.05, 0.05])
    ) + text(m.sum())
    m = kind == 2
    n_img = rng.integers(2, 7, m.sum())
    out[m] = n_img * img(np.maximum(1, 12 // n_img) + 1) + text(m.sum())
    m = kind == 3
    frames = rng.integers(8, 33, m.sum())
    out[m] = frames * (img(1) + 6) + text(m.sum())
    return np.minimum(out, seq_length)  # over-long samples are rejected before packing; clip here


def bench_fill(n: int, seq_length: int) -> dict:
    from internvl_mcore.data.packing import pack_fill, pack_lengths

    lengths = sft_length_mix(n, seed=0, seq_length=seq_length)
    t = time.perf_counter()
    packs = pack_lengths(lengths, seq_length, seed=0)
    dt = time.perf_counter() - t
    fill = pack_fill(lengths, packs, seq_length)
    lower = int(np.ceil(lengths.sum() / seq_length))
    return {
        "samples": n,
        "packs": len(packs),
        "min_possible_packs": lower,
        "fill": fill,
        "seconds": dt,
        "mean_len": float(lengths.mean()),
    }


# ------------------------------------------------------------------------------------------------
# photos
# ------------------------------------------------------------------------------------------------


def base_photos():
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images

        return [Image.fromarray(a) for a in load_sample_images().images], "scikit-learn sample photos"
    except Exception:  # pragma: no cover - sklearn is a dev dependency
        y, x = np.mgrid[0:427, 0:640]
        imgs = []
        for k in range(2):
            a = np.stack([np.sin(x / (37 + k * 5)), np.cos(y / 23), np.sin((x + y) / 51)], -1)
            imgs.append(Image.fromarray(np.clip(127 + 110 * a, 0, 255).astype(np.uint8)))
        return imgs, "synthetic smooth images (scikit-learn missing)"


def make_photo_files(folder: str, n: int, seed: int) -> list[str]:
    """n JPEG files (quality 90) of random crops of the base photos at typical SFT sizes."""
    from PIL import Image

    photos, _ = base_photos()
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(n):
        src = photos[k % len(photos)]
        w, h = src.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        scale = float(rng.uniform(1.0, 2.5))  # 320..1600 px on the long side
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((int(cw * scale), int(ch * scale)), Image.BICUBIC)
        p = os.path.join(folder, f"img_{k:04d}.jpg")
        img.save(p, quality=90)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------
# 2. bytes on disk
# ------------------------------------------------------------------------------------------------


def disk_usage(prefix: str, photo_dir: str) -> dict:
    """Bytes of a shard set against the source images its samples use."""
    from internvl_mcore.data.shards import ShardReader, field_prefix, shard_files

    r = ShardReader(prefix)
    c = r.manifest["counts"]
    total = sum(os.path.getsize(p) for p in shard_files(prefix))
    tiles = sum(os.path.getsize(field_prefix(prefix, "tiles") + ext) for ext in (".bin", ".idx"))
    source = sum(os.path.getsize(os.path.join(photo_dir, f)) for f in os.listdir(photo_dir))
    n_images = len(os.listdir(photo_dir))  # every photo is used by exactly one record
    return {
        "images": c["images"],
        "samples": c["samples"],
        "tiles_bytes_per_image": tiles / c["images"],
        "source_bytes_per_image": source / n_images,
        "bytes_per_sample": total / c["samples"],
        "token_bytes_per_sample": (total - tiles) / c["samples"],
        "ratio_vs_source_plus_tokens": total / (source + total - tiles),
    }


_LUT: list[np.ndarray] = []  # (3, 256) float32, built on first use


def normalize_tiles_lut(tiles: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32 ImageNet-normalized through a 256-entry table per channel:
    the fastest CPU normalization we had, so the on-the-fly baseline is not slowed by a naive one."""
    from internvl_mcore.data.image import IMAGENET_MEAN, IMAGENET_STD

    if not _LUT:
        v = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
        _LUT.append(
            ((v - np.asarray(IMAGENET_MEAN, np.float32)[:, None]) / np.asarray(IMAGENET_STD, np.float32)[:, None])
        )
    t, h, w, _ = tiles.shape
    out = np.empty((t, 3, h, w), dtype=np.float32)
    for c in range(3):
        np.take(_LUT[0][c], tiles[..., c], out=out[:, c])
    return out


# ------------------------------------------------------------------------------------------------
# 3. loader vs on the fly
# ------------------------------------------------------------------------------------------------


def make_jsonl_dataset(workdir: str, n_records: int) -> tuple[str, str]:
    """meta.json + a JSONL of single-image / text records over JPEG photos, and a tokenizer dir."""
    from internvl_mcore.data.synthetic import make_tokenizer_dir, tiny_corpus

    img_dir = os.path.join(workdir, "photos")
    n_img = max(1, int(n_records * 0.75))
    paths = make_photo_files(img_dir, n_img, seed=2)
    rng = np.random.default_rng(3)
    words = tiny_corpus(400, seed=5)
    ann = os.path.join(workdir, "train.jsonl")
    with open(ann, "w") as f:
        for k in range(n_records):
            q = " ".join(rng.choice(words, int(rng.integers(1, 4))))
            a = " ".join(rng.choice(words, int(rng.integers(3, 40))))
            rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            if k < n_img:  # 75% with an image
                rec["image"] = os.path.basename(paths[k])
                rec["conversations"][0]["value"] = "<image>\n" + q
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    order = rng.permutation(n_records)  # mix image and text records
    lines = open(ann).read().splitlines()
    with open(ann, "w") as f:
        f.write("\n".join(lines[i] for i in order) + "\n")
    meta = os.path.join(workdir, "meta.json")
    with open(meta, "w") as f:
        json.dump(
            {
                "photos": {
                    "root": img_dir,
                    "annotation": ann,
                    "data_augment": False,
                    "max_dynamic_patch": 12,
                    "repeat_time": 1,
                }
            },
            f,
        )
    tok = make_tokenizer_dir(os.path.join(workdir, "tok"))
    return meta, tok


class _Clock:
    """Wall and process-CPU seconds since construction. Single-threaded work is compared on CPU
    seconds, which other jobs on a busy machine do not inflate (wall time is printed alongside)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu(self) -> float:
        return time.process_time() - self.cpu0


def on_the_fly_rate(meta: str, tok_dir: str, max_seconds: float, normalize=None) -> dict:
    """Samples per second of building each sample from the JSONL + JPEG at load time, normalized on the
    CPU with `normalize` (default: the 256-entry table, the fastest we have)."""
    from internvl_mcore.data.sample import Reject
    from internvl_mcore.data.sources import PreprocessOptions, build_sample, iter_records, read_meta
    from internvl_mcore.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    opts = PreprocessOptions(max_seq_length=16384)
    n = 0
    clock = _Clock()
    for spec in read_meta(meta):
        for rec in iter_records(spec, 0):
            s = build_sample(rec, tok, opts)
            if isinstance(s, Reject):
                continue
            (normalize or normalize_tiles_lut)(s.tiles)  # InternVL normalizes on the CPU
            n += 1
            if clock.wall > max_seconds:
                break
    return {"samples": n, "per_cpu_s": n / clock.cpu, "per_wall_s": n / clock.wall}


def loader_rate(
    prefix: str, max_seconds: float, seq_length: int, workers: int = 0, image_tiling: str = "loader"
) -> dict:
    """Samples, packs and tiles per second of PackedDataLoader over one shard set: epochs over the set
    until `max_seconds` (the page cache is warm after the first, as in steady-state training). CPU time
    counts the loader's worker processes too (they are joined before it is read). With
    image_tiling="device" the loader only decodes; the tiling is measured apart (`device_tiling_cost`)."""
    import resource

    from internvl_mcore.data.loader import PackedDataLoader, collate

    ld = PackedDataLoader([prefix], seed=0, num_workers=workers, image_tiling=image_tiling)
    samples = packs = tiles = 0
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    clock = _Clock()
    while clock.wall < max_seconds:
        s = next(ld)
        collate([s], seq_length, 0)  # the batch as training gets it (touches every pixel)
        samples, packs, tiles = samples + len(s.cu_seqlens) - 1, packs + 1, tiles + int(s.num_tiles.sum())
    wall = clock.wall
    ld.close()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = clock.cpu + (children.ru_utime - children0.ru_utime) + (children.ru_stime - children0.ru_stime)
    return {
        "samples": samples,
        "packs": packs,
        "tiles": tiles,
        "cpu_s": cpu,
        "per_cpu_s": samples / cpu,
        "per_wall_s": samples / wall,
        "packs_per_cpu_s": packs / cpu,
        "cpu_ms_per_tile": 1e3 * cpu / max(tiles, 1),
    }


def bench_loader(
    workdir: str, n_records: int, seq_length: int, formats: list[str], max_seconds: float
) -> tuple[dict, list[dict]]:
    from internvl_mcore.data.image import normalize_tiles
    from internvl_mcore.data.preprocess import PreprocessConfig, run_preprocess

    meta, tok = make_jsonl_dataset(workdir, n_records)
    fly = on_the_fly_rate(meta, tok, max_seconds)
    fly["float_normalize"] = on_the_fly_rate(meta, tok, max_seconds, normalize_tiles)
    rows = []
    for fmt in formats:
        prefix = os.path.join(workdir, f"shards_{fmt}", "data")
        clock = _Clock()
        res = run_preprocess(
            PreprocessConfig(
                meta=[meta],
                tokenizer=tok,
                output_prefix=prefix,
                seq_length=seq_length,
                tile_format=fmt,
                workers=1,
                progress=False,
            )
        )
        prep_cpu = clock.cpu
        disk = disk_usage(prefix, os.path.join(workdir, "photos"))
        runs = [(w, t) for t in ("loader", "device") for w in (0, 1, 2)] if fmt == formats[0] else [(0, "loader")]
        for workers, tiling in runs:
            r = loader_rate(prefix, max_seconds, seq_length, workers, tiling)
            r.update(disk)
            r.update(
                {
                    "format": fmt,
                    "workers": workers,
                    "image_tiling": tiling,
                    "preprocess_cpu_s": prep_cpu,
                    "total_samples": res.samples,
                    "total_packs": res.packs,
                    "fill": res.fill,
                    "ratio": r["per_cpu_s"] / fly["per_cpu_s"],
                    "wall_ratio": r["per_wall_s"] / fly["per_wall_s"],
                }
            )
            rows.append(r)
        if fmt == formats[0]:
            fly["device_tiling"] = device_tiling_cost(prefix, seq_length, max_seconds)
    return fly, rows


# H200 SXM (GH100: 132 SMs, 1.98 GHz boost), vendor figures: HBM3e bandwidth, and INT32 lanes x clock
H200_BYTES_PER_S = 4.8e12
H200_INT32_OPS_PER_S = 132 * 64 * 1.98e9  # 16.7 T int32 multiply-adds per second
LAUNCH_S = 5e-6  # host time to launch one CUDA kernel (order of magnitude)
_VIEWS = {
    "view",
    "_unsafe_view",
    "reshape",
    "slice",
    "select",
    "permute",
    "alias",
    "as_strided",
    "expand",
    "detach",
    "t",
    "lift_fresh",
    "_to_copy_view",
}


def _count_kernels(fn) -> tuple[object, int]:
    """fn()'s result and the number of aten operators it ran that compute (views excluded): on CUDA each
    is one kernel launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _VIEWS:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, Count.n


def resize_work(in_w: int, in_h: int, out_w: int, out_h: int) -> tuple[int, int]:
    """(int32 multiply-adds, bytes read + written) of resample.resize_rgb for one RGB image: per tap a
    gather (uint8 read + write) and an addcmul (int32 accumulator read + write, the uint8 read again)."""
    from internvl_mcore.data.resample import coefficients, read_span

    if (in_w, in_h) == (out_w, out_h):
        return 0, 2 * in_w * in_h * 3
    macs = nbytes = 0
    rows = read_span(in_h, out_h)[1] - read_span(in_h, out_h)[0] if out_h != in_h else in_h
    if out_w != in_w:  # the horizontal pass first, as Pillow mostly does (the order changes little)
        k = coefficients(in_w, out_w)[2].shape[1]
        n = out_w * rows * 3
        macs, nbytes = macs + k * n, nbytes + k * n * (1 + 1 + 1 + 8) + n * 25
    if out_h != in_h:
        k = coefficients(in_h, out_h)[2].shape[1]
        n = out_w * out_h * 3
        macs, nbytes = macs + k * n, nbytes + k * n * (1 + 1 + 1 + 8) + n * 25  # init, shift, clamp, to uint8
    return macs, nbytes


def device_tiling_cost(prefix: str, seq_length: int, max_seconds: float) -> dict:
    """What `SourceImages.tiles()` costs: measured with torch on this CPU (1 thread, a stand-in: no GPU
    ran), and estimated on paper for an H200 from the work it does (multiply-adds, bytes, kernels)."""
    import torch

    from internvl_mcore.data.loader import PackedDataLoader, collate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ld = PackedDataLoader([prefix], seed=0, image_tiling="device")
    tiles = packs = macs = nbytes = kernels = 0
    clock = _Clock()
    cpu = 0.0
    while clock.wall < max_seconds or packs == 0:
        pv = collate([next(ld)], seq_length, 0)["images"].source
        c0 = time.process_time()
        pv.tiles()
        cpu += time.process_time() - c0
        _, n = _count_kernels(lambda: type(pv)(pv.pixels, pv.table, pv.tile_size).tiles())
        kernels += n
        for h, w, cols, rows, thumb, _ in pv.table.tolist():
            for out in [(cols * pv.tile_size, rows * pv.tile_size)] + ([(pv.tile_size,) * 2] if thumb else []):
                m, b = resize_work(w, h, *out)
                macs, nbytes = macs + m, nbytes + b
        tiles, packs = tiles + pv.shape[0], packs + 1
        nbytes += pv.shape[0] * pv.tile_size**2 * 3 * 2  # the grid's crops copied into the tiles
    torch.set_num_threads(threads)
    per_tile = {"macs": macs / tiles, "bytes": nbytes / tiles, "kernels": kernels / tiles}
    gpu_s = max(per_tile["bytes"] / H200_BYTES_PER_S, per_tile["macs"] / H200_INT32_OPS_PER_S)
    return {
        "packs": packs,
        "tiles": tiles,
        "torch_cpu_ms_per_tile": 1e3 * cpu / tiles,
        **{f"{k}_per_tile": v for k, v in per_tile.items()},
        "h200_us_per_tile_at_peak": 1e6 * gpu_s,
        "launch_host_us_per_tile": 1e6 * LAUNCH_S * per_tile["kernels"],
    }


# ------------------------------------------------------------------------------------------------
# 4. CPU cores per GPU
# ------------------------------------------------------------------------------------------------


def cores_per_gpu(cpu_ms_per_tile: float, gpus: int = 64, hardware: str = "h100") -> dict:
    """Loader cores per GPU for InternVL3-8B at 16k packs: CPU per pack (measured per tile x the
    planner's tiles per pack) x packs per GPU-second (global batch / (planner step time x GPUs)).
    `per_gpu`: each data-parallel replica decodes its packs once (the work the job needs);
    `per_rank`: every rank decodes its data-parallel rank's packs (what the training loop does now)."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.plan import HARDWARE, Workload, search

    model, work = get_preset("internvl3-8b"), Workload(seq_length=16384)
    best = search(model, gpus, work, HARDWARE[hardware])[0]
    cpu_per_pack = cpu_ms_per_tile / 1e3 * work.tiles(model)
    packs_per_s = work.global_batch_size / best.step_time_s
    return {
        "model": "internvl3-8b",
        "gpus": gpus,
        "hardware": hardware,
        "layout": best.layout.describe(),
        "step_time_s": best.step_time_s,
        "tiles_per_pack": work.tiles(model),
        "cpu_s_per_pack": cpu_per_pack,
        "per_gpu": cpu_per_pack * packs_per_s / gpus,
        "per_rank": cpu_per_pack * packs_per_s / best.layout.dp,
    }


# ------------------------------------------------------------------------------------------------


def print_storage_and_speed(fly: dict, rows: list[dict], seq_length: int) -> None:
    first = rows[0]
    print(
        f"\n== 2. bytes on disk ({first['images']} JPEG photos, {first['source_bytes_per_image'] / 1024:.0f} KiB each on "
        f"average, {first['total_samples']} samples)"
    )
    print(
        f"   {'format':<6} {'KiB/image':>10} {'KiB/sample':>11} {'tokens KiB':>11} {'vs source+tokens':>17} {'preprocess CPU-s':>17}"
    )
    for r in rows:
        if r["workers"] == 0 and r["image_tiling"] == "loader":
            print(
                f"   {r['format']:<6} {r['tiles_bytes_per_image'] / 1024:>10.1f} {r['bytes_per_sample'] / 1024:>11.1f} "
                f"{r['token_bytes_per_sample'] / 1024:>11.2f} {r['ratio_vs_source_plus_tokens']:>16.2f}x {r['preprocess_cpu_s']:>17.1f}"
            )
    print(
        f"\n== 3. loader vs on-the-fly ({first['total_samples']} samples of JSONL + JPEG photos, 75% with an image, "
        f"seq_length {seq_length}, {first['total_packs']} packs, fill {100 * first['fill']:.1f}%)"
    )
    print(
        f"   on the fly (parse + decode + tile + tokenize + normalize): {fly['per_cpu_s']:.1f} samples per CPU-s "
        f"({fly['per_wall_s']:.1f}/s wall); {fly['float_normalize']['per_cpu_s']:.1f} per CPU-s with InternVL's float "
        f"normalization (ToTensor + Normalize arithmetic) instead of the table"
    )
    for r in rows:
        tiling = "decode only (--image-tiling device)" if r["image_tiling"] == "device" else ""
        print(
            f"   loader, {r['format']:<6} {r['workers']} worker(s) {tiling}: {r['per_cpu_s']:6.1f} samples per CPU-s -> {r['ratio']:.2f}x "
            f"on-the-fly ({r['per_cpu_s'] / fly['float_normalize']['per_cpu_s']:.2f}x the float one); "
            f"{r['per_wall_s']:6.1f}/s wall -> {r['wall_ratio']:.2f}x; {r['cpu_ms_per_tile']:.2f} CPU-ms per tile"
        )
    print("   CPU-s: the loader process plus its workers; wall ratios depend on what else runs on the machine")
    d = fly["device_tiling"]
    print(
        f"   device tiling (SourceImages.tiles(), {d['tiles']} tiles of {d['packs']} packs): no GPU ran here; with torch "
        f"on this CPU (1 thread, a stand-in) {d['torch_cpu_ms_per_tile']:.2f} CPU-ms per tile"
    )
    print(
        f"   on paper for an H200: {d['macs_per_tile'] / 1e6:.1f} M int32 multiply-adds and {d['bytes_per_tile'] / 1e6:.1f} MB "
        f"of memory traffic per tile -> {d['h200_us_per_tile_at_peak']:.1f} us per tile at peak "
        f"({H200_BYTES_PER_S / 1e12:.1f} TB/s, {H200_INT32_OPS_PER_S / 1e12:.1f} T int32 ops/s); "
        f"{d['kernels_per_tile']:.0f} kernels per tile, ~{d['launch_host_us_per_tile']:.0f} us of host launch time "
        f"at {LAUNCH_S * 1e6:.0f} us each (an estimate, not a measurement)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    p.add_argument("--seq-length", type=int, default=16384)
    p.add_argument("--json", action="store_true", help="also print all numbers as one JSON object")
    args = p.parse_args(argv)
    quick = args.quick
    t_all = time.perf_counter()
    load0 = os.getloadavg()[0]
    out: dict = {}

    fill = bench_fill(5_000 if quick else 50_000, args.seq_length)
    out["fill"] = fill
    print(
        f"== 1. pack fill (seq_length {args.seq_length}, InternVL-SFT-like mix, mean {fill['mean_len']:.0f} tokens/sample)"
    )
    print(
        f"   {fill['samples']} samples -> {fill['packs']} packs (lower bound {fill['min_possible_packs']}), "
        f"fill {100 * fill['fill']:.2f}% in {fill['seconds']:.2f}s   [{'OK' if fill['fill'] >= 0.98 else 'BELOW'} goal >= 98%]"
    )

    with tempfile.TemporaryDirectory() as work:
        formats = ["source", "webp", "raw"] if quick else ["source", "webp", "png", "raw", "jpeg"]
        fly, rows = bench_loader(work, 24 if quick else 80, args.seq_length, formats, 5 if quick else 20)
    out["on_the_fly"], out["loader"] = fly, rows
    print_storage_and_speed(fly, rows, args.seq_length)
    out["cores_per_gpu"] = {}
    for tiling in ("loader", "device"):
        best = next(
            r for r in rows if r["format"] == rows[0]["format"] and r["workers"] == 1 and r["image_tiling"] == tiling
        )
        ms = best["cpu_ms_per_tile"] + (
            1e-3 * fly["device_tiling"]["launch_host_us_per_tile"] if tiling == "device" else 0
        )
        cores = out["cores_per_gpu"][tiling] = cores_per_gpu(ms)
        if tiling == "loader":
            print(
                f"\n== 4. loader CPU for {cores['model']} at 16k packs ({cores['tiles_per_pack']:.0f} tiles per pack), "
                f"{cores['gpus']} {cores['hardware']}, planner's fastest layout {cores['layout']}: step {cores['step_time_s']:.2f}s"
            )
        what = (
            "tiles in the loader"
            if tiling == "loader"
            else "decode only + the estimated kernel-launch time of the device tiling"
        )
        print(
            f"   {best['format']}, 1 worker, {what}: {ms:.2f} CPU-ms per tile -> {cores['cpu_s_per_pack']:.3f} CPU-s per pack: "
            f"{cores['per_gpu']:.3f} cores per GPU   [{'OK' if cores['per_gpu'] < 0.5 else 'ABOVE'} goal < 0.5]; "
            f"{cores['per_rank']:.3f} while every rank of a data-parallel group decodes its packs itself"
        )
    print(
        f"\ntotal {time.perf_counter() - t_all:.1f}s; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"on {os.cpu_count()} cores"
    )
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
