#!/usr/bin/env python
"""Data pipeline benchmark: pack fill, tile storage formats, loader vs on-the-fly decoding.

    python bench/data_pipeline.py            # default run, well under 2 minutes on 2 cores
    python bench/data_pipeline.py --quick    # smaller sizes, a few seconds of work

Prints three sections, all measured in this run:
1. pack fill of `pack_lengths` on an InternVL-SFT-like length mix at --seq-length (goal >= 98%);
2. per tile format (webp / png / raw / jpeg): bytes per 448x448 tile of real photos, encode time, and
   load time (read from the shard + decode + ImageNet-normalize), from a real shard round trip;
3. samples/s of PackedDataLoader over preprocessed shards against building the same samples on
   the fly from JSONL + JPEG files (parse, decode, tile, template, tokenize, normalize), as a ratio.

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
    out[m] = img(rng.choice([1, 3, 4, 5, 6, 7, 9, 10, 13], size=m.sum(), p=[0.2, 0.15, 0.1, 0.1, 0.15, 0.1, 0.1, 0.05, 0.05])) + text(m.sum())
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
    return {"samples": n, "packs": len(packs), "min_possible_packs": lower, "fill": fill, "seconds": dt,
            "mean_len": float(lengths.mean())}


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
# 2. tile formats
# ------------------------------------------------------------------------------------------------


def bench_tile_formats(workdir: str, n_images: int) -> tuple[list[dict], str]:
    from PIL import Image

    from internvl_mcore.data.image import dynamic_preprocess, tiles_to_array
    from internvl_mcore.data.loader import normalize_tiles_lut as normalize_tiles
    from internvl_mcore.data.shards import TILE_FORMATS, EncodedSample, ShardReader, ShardWriter, encode_tiles

    paths = make_photo_files(os.path.join(workdir, "fmt_photos"), n_images, seed=1)
    per_image = []
    for p in paths:
        with Image.open(p) as im:
            per_image.append(tiles_to_array(dynamic_preprocess(im.convert("RGB"), 1, 12, 448, True)))
    n_tiles = sum(len(t) for t in per_image)
    _, source = base_photos()
    rows = []
    for fmt in TILE_FORMATS:
        prefix = os.path.join(workdir, f"fmt_{fmt}")
        t = time.process_time()
        encoded = [encode_tiles(tiles, fmt) for tiles in per_image]
        enc_s = time.process_time() - t
        w = ShardWriter(prefix, tile_format=fmt, tile_shape=(448, 448, 3))
        for tiles, payloads in zip(per_image, encoded):
            w.add_pack([EncodedSample(np.zeros(4, np.int32), np.zeros(4, np.uint8), np.zeros(4, np.float32),
                                      np.array([len(tiles)], np.int32), payloads, 0, 1)])
        w.finalize()
        size = os.path.getsize(prefix + "_tiles.bin")
        r = ShardReader(prefix)
        # Load = what the loader does per pack: read, decode, normalize. Two passes; the second
        # (page cache warm, as in steady-state training) is reported.
        for _ in range(2):
            t = time.process_time()
            err = 0.0
            for i in range(len(r)):
                tiles = r.tiles(r.read(i))
                normalize_tiles(tiles)
                if fmt == "jpeg":
                    err = max(err, float(np.abs(tiles.astype(np.int16) - per_image[i]).mean()))
            load_s = time.process_time() - t
        rows.append({
            "format": fmt, "tiles": n_tiles, "bytes_per_tile": size / n_tiles, "ratio_vs_raw": size / (n_tiles * 448 * 448 * 3),
            "encode_ms_per_tile": 1e3 * enc_s / n_tiles, "load_ms_per_tile": 1e3 * load_s / n_tiles,
            "lossless": fmt != "jpeg", "mean_abs_err": err,
        })
    return rows, source


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
        json.dump({"photos": {"root": img_dir, "annotation": ann, "data_augment": False, "max_dynamic_patch": 12, "repeat_time": 1}}, f)
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


def on_the_fly_rate(meta: str, tok_dir: str, max_seconds: float) -> dict:
    """Samples per second of building each sample from the JSONL + JPEG at load time."""
    # the loader's (faster, bit-identical) normalization, so the ratio compares decoding, not that
    from internvl_mcore.data.loader import normalize_tiles_lut as normalize_tiles
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
            normalize_tiles(s.tiles)
            n += 1
            if clock.wall > max_seconds:
                break
    return {"samples": n, "per_cpu_s": n / clock.cpu, "per_wall_s": n / clock.wall}


def loader_rate(prefix: str, max_seconds: float, threads: int = 0) -> dict:
    """Samples and packs per second of PackedDataLoader over one shard set, one epoch at most."""
    from internvl_mcore.data.loader import PackedDataLoader

    ld = PackedDataLoader([prefix], seed=0, num_threads=threads)
    samples = packs = 0
    clock = _Clock()
    for _ in range(len(ld.readers[0])):
        s = next(ld)
        samples += len(s.cu_seqlens) - 1
        packs += 1
        if clock.wall > max_seconds:
            break
    cpu, wall = clock.cpu, clock.wall
    ld.close()
    return {"samples": samples, "packs": packs, "per_cpu_s": samples / cpu, "per_wall_s": samples / wall,
            "packs_per_cpu_s": packs / cpu, "packs_per_wall_s": packs / wall}


def bench_loader(workdir: str, n_records: int, seq_length: int, formats: list[str], max_seconds: float) -> tuple[dict, list[dict]]:
    from internvl_mcore.data.preprocess import PreprocessConfig, run_preprocess

    meta, tok = make_jsonl_dataset(workdir, n_records)
    fly = on_the_fly_rate(meta, tok, max_seconds)
    rows = []
    for fmt in formats:
        prefix = os.path.join(workdir, f"shards_{fmt}", "data")
        clock = _Clock()
        res = run_preprocess(PreprocessConfig(meta=[meta], tokenizer=tok, output_prefix=prefix, seq_length=seq_length,
                                              tile_format=fmt, workers=1, progress=False))
        prep_cpu = clock.cpu
        for threads in ([0, 2] if fmt == formats[0] else [0]):
            r = loader_rate(prefix, max_seconds, threads)
            r.update({"format": fmt, "threads": threads, "preprocess_cpu_s": prep_cpu, "total_samples": res.samples,
                      "total_packs": res.packs, "fill": res.fill,
                      "ratio": (r["per_wall_s"] / fly["per_wall_s"]) if threads else (r["per_cpu_s"] / fly["per_cpu_s"])})
            rows.append(r)
    return fly, rows


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    p.add_argument("--seq-length", type=int, default=16384)
    p.add_argument("--json", action="store_true", help="also print all numbers as one JSON object")
    args = p.parse_args(argv)
    quick = args.quick
    t_all = time.perf_counter()
    out: dict = {}

    fill = bench_fill(5_000 if quick else 50_000, args.seq_length)
    out["fill"] = fill
    print(f"== 1. pack fill (seq_length {args.seq_length}, InternVL-SFT-like mix, mean {fill['mean_len']:.0f} tokens/sample)")
    print(f"   {fill['samples']} samples -> {fill['packs']} packs (lower bound {fill['min_possible_packs']}), "
          f"fill {100 * fill['fill']:.2f}% in {fill['seconds']:.2f}s   [{'OK' if fill['fill'] >= 0.98 else 'BELOW'} goal >= 98%]")

    with tempfile.TemporaryDirectory() as work:
        rows, source = bench_tile_formats(work, 4 if quick else 12)
        out["tile_formats"] = rows
        print(f"\n== 2. tile formats ({rows[0]['tiles']} tiles of 448x448 from {source})")
        print(f"   {'format':<6} {'KiB/tile':>9} {'vs raw':>7} {'encode ms':>10} {'load ms':>8}  lossless")
        for r in rows:
            print(f"   {r['format']:<6} {r['bytes_per_tile'] / 1024:>9.1f} {r['ratio_vs_raw']:>7.3f} {r['encode_ms_per_tile']:>10.2f} "
                  f"{r['load_ms_per_tile']:>8.2f}  {'yes' if r['lossless'] else 'no (mean |err| %.2f)' % r['mean_abs_err']}")
        print("   ms are process CPU time; load = read from shard + decode + ImageNet-normalize, warm page cache")

        fly, lrows = bench_loader(work, 24 if quick else 80, args.seq_length, ["webp", "png", "raw", "jpeg"], 10 if quick else 20)
        out["on_the_fly"], out["loader"] = fly, lrows
        first = lrows[0]
        print(f"\n== 3. loader vs on-the-fly ({first['total_samples']} samples of JSONL + JPEG photos, 75% with an image, "
              f"seq_length {args.seq_length}, {first['total_packs']} packs, fill {100 * first['fill']:.1f}%)")
        print(f"   on the fly (parse + decode + tile + tokenize + normalize): {fly['per_cpu_s']:.1f} samples per CPU-s "
              f"({fly['per_wall_s']:.1f}/s wall)")
        for r in lrows:
            if r["threads"]:
                print(f"   loader, {r['format']:<4} tiles, {r['threads']} threads: {r['per_wall_s']:6.1f} samples/s wall "
                      f"({r['packs_per_wall_s']:.2f} packs/s) -> {r['ratio']:.2f}x on-the-fly wall (meaningful on an idle machine only)")
            else:
                print(f"   loader, {r['format']:<4} tiles, 1 thread : {r['per_cpu_s']:6.1f} samples per CPU-s "
                      f"({r['packs_per_cpu_s']:.2f} packs) -> {r['ratio']:.2f}x on-the-fly   "
                      f"[preprocessing: {r['preprocess_cpu_s']:.1f} CPU-s]")
    print(f"\ntotal {time.perf_counter() - t_all:.1f}s")
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
