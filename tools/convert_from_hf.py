#!/usr/bin/env python
"""Convert an HF InternVL checkpoint into a training checkpoint.

    python tools/convert_from_hf.py --hf-dir DIR --save CKPT \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P

DIR is either transformers' layout (config.json model_type "internvl", as
`InternVLForConditionalGeneration.save_pretrained` writes it) or InternVL's own (model_type
"internvl_chat"); the model (vision, projector, LLM family and sizes, special tokens) is inferred
from config.json and any tensor that does not fit it is refused, naming the key and shapes.

CKPT must be new or empty (--overwrite replaces our files in it); it is written beside CKPT and moved
in only when complete, so a failed conversion leaves no CKPT. It is a canonical, layout-independent
checkpoint (internvl_mcore/checkpoint/canonical.py): every TP/PP layout loads its shards from it
(`pretrain_internvl.py --pretrained CKPT`, each rank reading only its own slices).

The conversion streams: the output shards are laid out first from the safetensors headers, then
each canonical tensor is copied to its place from the byte ranges of the HF files it is made of (the
key maps only move whole rows; the copy runs in the kernel, as `cp` copies), so no tensor is read into
memory and no process group or model is built. T x P is checked against the model before
anything is converted (TP divides the heads and widths, PP the decoder layers; --no-verify skips
the check) and recorded in model_config.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_size(text: str) -> int:
    """--max-shard-size; safetensors_io (and so torch) is imported only when the flag is given, so that
    --help and the path checks answer without torch's import."""
    from internvl_mcore.checkpoint.safetensors_io import parse_size as parse

    return parse(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, metavar="DIR", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--save", required=True, metavar="CKPT", help="output checkpoint directory")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="T")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="P")
    p.add_argument(
        "--max-shard-size", type=parse_size, default=2 * 1024**3, help="largest safetensors shard (default 2GB)"
    )
    p.add_argument("--no-verify", action="store_true", help="do not check that T x P divides the model")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --save directory "
        "(its *.safetensors, index and model_config.json are removed first, other files are kept)",
    )
    return p


def check_paths(args: argparse.Namespace) -> None:
    from internvl_mcore.errors import ConfigError
    from internvl_mcore.staging import is_inside, non_empty_dir

    if os.path.isfile(args.hf_dir):
        raise ConfigError(
            f"--hf-dir {args.hf_dir} is a file; give the checkpoint directory (config.json + safetensors)"
        )
    if os.path.exists(args.hf_dir) and is_inside(args.save, args.hf_dir):
        raise ConfigError(f"--save {args.save} is inside --hf-dir {args.hf_dir}; choose another directory")
    if os.path.exists(args.save) and not os.path.isdir(args.save):
        raise ConfigError(f"--save {args.save} exists and is not a directory")
    if non_empty_dir(args.save) and not args.overwrite:
        raise ConfigError(
            f"--save {args.save} exists and is not empty; pass --overwrite to replace the checkpoint there"
        )


def main(argv: list[str] | None = None) -> int:
    from internvl_mcore.cli_errors import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: convert(args), "convert_from_hf", interrupted=f"{args.save} left as it was")


def convert(args: argparse.Namespace) -> int:
    from internvl_mcore.cli_errors import disk_full_names
    from internvl_mcore.config import ParallelConfig
    from internvl_mcore.plan.params import stage_params
    from internvl_mcore.staging import CANONICAL_FILES, staged_dir

    layout = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    check_paths(args)
    from internvl_mcore.convert import convert_hf_to_checkpoint, model_config_from_hf, read_hf_config  # torch

    if not args.no_verify and os.path.isdir(args.hf_dir):
        cfg, _ = model_config_from_hf(read_hf_config(args.hf_dir), args.hf_dir)
        for stage in range(layout.pipeline_model_parallel_size):  # every rank's parameters exist in this layout
            stage_params(cfg, layout, stage)
    # written beside --save and moved in only when converted: a failure leaves no --save
    with disk_full_names("--save", args.save), staged_dir(args.save, clear=CANONICAL_FILES) as stage_dir:
        start = time.perf_counter()
        cfg = convert_hf_to_checkpoint(args.hf_dir, str(stage_dir), layout, args.max_shard_size, progress=True)
        print(
            f"converted {args.hf_dir}: model {cfg.name} (vision {cfg.vision.num_layers}x{cfg.vision.hidden_size}, "
            f"LLM {cfg.llm.family} {cfg.llm.num_layers}x{cfg.llm.hidden_size}) in {time.perf_counter() - start:.1f}s"
        )
    print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
