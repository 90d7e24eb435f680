#!/usr/bin/env python
"""Convert an HF InternVL checkpoint into a training checkpoint.

    python tools/convert_from_hf.py --hf-dir DIR --save CKPT \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P

DIR is either transformers' layout (config.json model_type "internvl", as
`InternVLForConditionalGeneration.save_pretrained` writes it) or InternVL's own (model_type
"internvl_chat"); the model (vision, projector, LLM family and sizes, special tokens) is inferred
from config.json and any tensor that does not fit it is refused, naming the key and shapes.

CKPT is a canonical, layout-independent checkpoint (internvl_mcore/convert/canonical.py): every
TP/PP layout loads its shards from it (`pretrain_internvl.py --pretrained CKPT`). With T x P > 1 the checkpoint is verified by loading it into
that layout in T x P spawned gloo processes and gathering it back bit for bit (--no-verify skips).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvl_mcore.convert.hf import parse_size  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, metavar="DIR", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--save", required=True, metavar="CKPT", help="output checkpoint directory")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="T")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="P")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--no-verify", action="store_true", help="do not load the result into the T x P layout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from internvl_mcore.config import ParallelConfig
    from internvl_mcore.convert import ConversionError, convert_hf_to_checkpoint, verify_layout

    layout = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                            pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    start = time.perf_counter()
    try:
        cfg = convert_hf_to_checkpoint(args.hf_dir, args.save, layout, args.max_shard_size, progress=True)
    except (ConversionError, FileNotFoundError, KeyError) as e:
        print(f"convert_from_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.save}: model {cfg.name} (vision {cfg.vision.num_layers}x{cfg.vision.hidden_size}, "
          f"LLM {cfg.llm.family} {cfg.llm.num_layers}x{cfg.llm.hidden_size}) in {time.perf_counter() - start:.1f}s")
    world = layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size
    if world > 1 and not args.no_verify:
        start = time.perf_counter()
        verify_layout([(args.save, None)], layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size)
        print(f"verified: loads into TP{layout.tensor_model_parallel_size} x PP{layout.pipeline_model_parallel_size} "
              f"and gathers back bit-exact ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
