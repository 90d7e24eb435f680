#!/usr/bin/env python
"""Converter speed against `cp` of the same bytes, each way.

    python bench/convert.py                 # --size small: InternVL3-1B widths, fewer layers (< 1 min)
    python bench/convert.py --size 1b       # InternVL3-1B's full shape (~0.9B params, ~1.9 GB bf16)

Writes a random-weight checkpoint in InternVL's own layout (bf16), then times, as subprocesses:
  cp -r HF            vs  tools/convert_from_hf.py --hf-dir HF --save CKPT
  cp -r CKPT          vs  tools/convert_to_hf.py --load CKPT --save OUT --format internvl
and prints each conversion's time as a ratio to its `cp`, plus each child's peak RSS (the converters
stream, so their peak should stay near one shard plus one tensor, not the model size). The files
were just written, so every step reads from a warm page cache.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This process only orchestrates and stays small (no torch): see bench/_common.py.
from _common import dir_bytes, make_random_hf_dir, run_child  # noqa: E402


def make_hf_dir(size: str, out: str, max_shard_size: str) -> None:
    """Write a random-weight bf16 checkpoint in InternVL's layout (runs in a child process):
    InternVL3-1B, or for "small" the same widths with 4 ViT blocks, 4 decoder layers, 32k vocab."""
    import dataclasses

    from internvl_mcore.config import get_preset

    cfg = get_preset("internvl3-1b")
    if size == "small":
        cfg = cfg.replace(
            name="internvl3-1b-small",
            vision=dataclasses.replace(cfg.vision, num_layers=4),
            llm=dataclasses.replace(cfg.llm, num_layers=4, vocab_size=32768),
        )
    n = make_random_hf_dir(cfg, out, "internvl", "bf16", max_shard_size)
    print(f"{cfg.name}: {n / 1e6:.0f}M params")


def timed(cmd: list[str]) -> tuple[float, float, float | None]:
    """Run `cmd`; (wall seconds, child's peak RSS in MiB, the seconds the tool itself reports
    for the conversion without interpreter start-up and imports, if it prints "in N.Ns")."""
    child = run_child(cmd, heartbeat_s=0)
    if child.failure():
        raise RuntimeError(f"{' '.join(cmd)} failed: {child.failure()}")
    inner = re.search(r" in (\d+\.\d+)s", child.text())
    return child.wall, child.peak_rss / 2**20, float(inner.group(1)) if inner else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("small", "1b"), default="small")
    p.add_argument("--max-shard-size", default="100MB", help="shard size for every written checkpoint")
    p.add_argument("--workdir", help="where to write (default: a temporary directory, removed after)")
    p.add_argument("--make-hf", metavar="DIR", help=argparse.SUPPRESS)  # internal: the generator child
    args = p.parse_args()
    if args.make_hf:
        make_hf_dir(args.size, args.make_hf, args.max_shard_size)
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    hf, ckpt, out = work / "hf", work / "ckpt", work / "out"
    for d in (hf, ckpt, out, work / "hf_cp", work / "ckpt_cp"):
        shutil.rmtree(d, ignore_errors=True)
    try:
        start = time.perf_counter()
        made = subprocess.run(
            [
                sys.executable,
                __file__,
                "--make-hf",
                str(hf),
                "--size",
                args.size,
                "--max-shard-size",
                args.max_shard_size,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        size = dir_bytes(hf)
        print(
            f"{made.stdout.strip()}, {size / 2**20:.0f} MiB bf16 in {work} (made in {time.perf_counter() - start:.1f}s)"
        )

        py = sys.executable
        cp_hf, cp_rss, _ = timed(["cp", "-r", str(hf), str(work / "hf_cp")])
        t_from, rss_from, in_from = timed(
            [
                py,
                "tools/convert_from_hf.py",
                "--hf-dir",
                str(hf),
                "--save",
                str(ckpt),
                "--max-shard-size",
                args.max_shard_size,
            ]
        )
        cp_ck, _, _ = timed(["cp", "-r", str(ckpt), str(work / "ckpt_cp")])
        t_to, rss_to, in_to = timed(
            [
                py,
                "tools/convert_to_hf.py",
                "--load",
                str(ckpt),
                "--save",
                str(out),
                "--format",
                "internvl",
                "--max-shard-size",
                args.max_shard_size,
            ]
        )
        print(f"{'step':<28}{'wall s':>8}{'x cp':>7}{'convert s':>11}{'x cp':>7}{'peak RSS MiB':>14}")
        print(f"{'cp -r HF':<28}{cp_hf:>8.2f}{1.0:>7.1f}{'':>18}{cp_rss:>14.0f}")
        print(
            f"{'convert_from_hf (HF->ckpt)':<28}{t_from:>8.2f}{t_from / cp_hf:>7.1f}"
            f"{in_from or float('nan'):>11.2f}{(in_from or float('nan')) / cp_hf:>7.1f}{rss_from:>14.0f}"
        )
        print(f"{'cp -r CKPT':<28}{cp_ck:>8.2f}{1.0:>7.1f}")
        print(
            f"{'convert_to_hf (ckpt->HF)':<28}{t_to:>8.2f}{t_to / cp_ck:>7.1f}"
            f"{in_to or float('nan'):>11.2f}{(in_to or float('nan')) / cp_ck:>7.1f}{rss_to:>14.0f}"
        )
        print(
            f"wall = whole tool run incl. Python start-up and imports; convert = the conversion as the tool "
            f"reports it. Shards of {args.max_shard_size}; peak RSS ~ interpreter + torch + one shard, "
            f"not the {size / 2**20:.0f} MiB model."
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
