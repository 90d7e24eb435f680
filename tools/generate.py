#!/usr/bin/env python
"""Generate answers with a model from a training, converted or HF checkpoint (docs/generate.md).

    python tools/generate.py --load CKPT|HF_DIR --input REQUESTS.jsonl --output ANSWERS.jsonl \
        --max-new-tokens N [--temperature T --top-p P --seed S] [--tokenizer DIR] \
        [--tensor-model-parallel-size TP --pipeline-model-parallel-size PP]   # under torchrun

REQUESTS.jsonl holds InternVL-format records (`image` path(s) relative to --image-root, which
defaults to the file's folder; `conversations` ending with a user turn, or with a reference answer
that is ignored). The prompt is built by the training data's template and image tiling. ANSWERS.jsonl
gets one line per request, in input order: {"line": N, "answer": TEXT, "tokens": [IDS]} (the answer
without its end token, the ids with it). Decoding is batched (--inference-max-requests prompts at a
time, grouped by length) over megatron-core's static inference context (a KV cache per layer).
Greedy by default (--temperature 0); sampling uses --seed and gives the same tokens at every layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, metavar="CKPT", help="training / converted / HF checkpoint directory")
    p.add_argument("--model", help="preset or checkpoint directory whose model config to use (default: --load's)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: --load, if it has one)")
    p.add_argument("--input", required=True, metavar="JSONL", help="requests, InternVL format")
    p.add_argument("--output", required=True, metavar="JSONL", help="answers, one line per request")
    p.add_argument("--image-root", metavar="DIR", help="folder image paths are relative to (default: --input's)")
    p.add_argument("--max-new-tokens", type=int, required=True, help="most tokens generated per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (the same tokens at every layout)")
    p.add_argument("--inference-max-requests", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-dynamic-patch", type=int, default=12, help="most tiles per image (InternVL's chat default)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (default fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The flag errors that need no torch: one ConfigError naming the flag."""
    from internvl_mcore.errors import ConfigError

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.inference_max_requests < 1:
        raise ConfigError(f"--inference-max-requests {args.inference_max_requests}: must be at least 1")
    if args.max_dynamic_patch < 1:
        raise ConfigError(f"--max-dynamic-patch {args.max_dynamic_patch}: must be at least 1")
    if not os.path.isdir(args.load):
        raise ConfigError(f"--load {args.load}: no such directory")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"--output {args.output}: folder {out_dir} does not exist")
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise ConfigError(f"--output {args.output}: is the --input file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from internvl_mcore.inference.run import generate_file

    t0 = time.perf_counter()
    summary = generate_file(args)
    if summary:
        print(f"generate: {summary} in {time.perf_counter() - t0:.1f} s -> {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    from internvl_mcore.cli_errors import run_cli

    sys.exit(run_cli(main, "generate.py", interrupted="no answers were written"))
