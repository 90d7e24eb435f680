#!/usr/bin/env python
"""Export a checkpoint to an HF checkpoint.

    python tools/convert_to_hf.py --load CKPT --save DIR --format {internvl,transformers} \
        [--hf-template-dir ORIGINAL_HF_DIR] [--dtype bf16]

CKPT is a training checkpoint written by pretrain_internvl.py --save (any TP/PP layout: it is loaded
in the layout it was saved with, in spawned gloo processes, and gathered) or a converted checkpoint
from tools/convert_from_hf.py.

--format internvl      InternVL's own layout (InternVLChatModel: vision_model.*, mlp1.*, language_model.*),
                       config.json with vision_config / llm_config, template, downsample_ratio, ps_version.
                       Its remote-code .py files and tokenizer files are copied from --hf-template-dir
                       (the checkpoint you started from); without them InternVL tooling cannot load it.
--format transformers  the layout transformers' InternVLForConditionalGeneration loads (the names its
                       save_pretrained writes). Tokenizer/processor files come from --hf-template-dir.

config.json keeps every key of the template's (or, for the format the checkpoint was imported from,
the original config.json kept in CKPT) that the model config does not determine. Tensors are
written in the dtype of the original checkpoint unless --dtype says otherwise, streamed into
safetensors shards of at most --max-shard-size with an index.
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
    p.add_argument("--load", required=True, metavar="CKPT",
                   help="training checkpoint (--save dir or one iter_ dir, any TP/PP layout) or converted checkpoint")
    p.add_argument("--save", required=True, metavar="DIR", help="output HF directory")
    p.add_argument("--format", required=True, choices=("internvl", "transformers"))
    p.add_argument("--hf-template-dir", metavar="DIR", help="the HF checkpoint the model started from")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="output dtype (default: the source's)")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB", help="largest safetensors shard (default 2GB)")
    # LoRA training checkpoints (internvl_mcore/convert/lora_export.py)
    p.add_argument("--merge-lora", action="store_true", help="LoRA checkpoint: write the full model with the "
                   "adapters merged into the weights (either --format)")
    p.add_argument("--lora-only", action="store_true", help="LoRA checkpoint: write only a PEFT adapter "
                   "(adapter_config.json + adapter_model.safetensors) for the base's transformers export")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from internvl_mcore.convert import ConversionError, convert_checkpoint_to_hf
    from internvl_mcore.convert.hf import parse_dtype

    start = time.perf_counter()
    try:
        from internvl_mcore.convert.lora_export import export_lora, is_lora_checkpoint

        if args.merge_lora or args.lora_only or is_lora_checkpoint(args.load):
            files = export_lora(args.load, args.save, args.format, args.merge_lora, args.lora_only,
                                args.hf_template_dir, parse_dtype(args.dtype) if args.dtype else None,
                                args.max_shard_size, progress=True)
        else:
            files = convert_checkpoint_to_hf(args.load, args.save, args.format, args.hf_template_dir,
                                             parse_dtype(args.dtype) if args.dtype else None, args.max_shard_size,
                                             progress=True)
    except (ConversionError, FileNotFoundError, KeyError) as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.save} ({args.format}, {len(files)} shard(s)) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
