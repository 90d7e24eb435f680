#!/usr/bin/env python
"""Export a checkpoint to an HF checkpoint.

    python tools/convert_to_hf.py --load CKPT --save DIR --format {internvl,transformers} \
        [--hf-template-dir ORIGINAL_HF_DIR] [--dtype bf16]

DIR must be new or empty (--overwrite replaces our files in it) and not inside CKPT; the export is
written beside DIR and moved in only when complete.

CKPT is a training checkpoint written by pretrain_internvl.py --save (any TP/PP/EP layout: its files
are read tensor by tensor, per layer and expert, without building the model or starting processes;
memory stays a few of the largest tensors) or a converted checkpoint from tools/convert_from_hf.py.

--format internvl      InternVL's own layout (InternVLChatModel: vision_model.*, mlp1.*, language_model.*),
                       config.json with vision_config / llm_config, template, downsample_ratio, ps_version.
                       Its remote-code .py files and tokenizer files are copied from --hf-template-dir
                       (the checkpoint you started from); without them InternVL tooling cannot load it.
--format transformers  the layout transformers' InternVLForConditionalGeneration loads (the names its
                       save_pretrained writes). Tokenizer/processor files come from --hf-template-dir.

config.json keeps every key of the template's (or, for the format the checkpoint was imported from,
the original config.json kept in CKPT) that the model config does not determine. Tensors are
written in the dtype the checkpoint stores its weights in (a --bf16 run's: bf16; a fp32 run from a
bf16/fp16 HF checkpoint: that checkpoint's dtype) unless --dtype says otherwise; the tool prints
which. They are streamed into safetensors shards of at most --max-shard-size with an index.
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
    p.add_argument(
        "--load",
        required=True,
        metavar="CKPT",
        help="training checkpoint (--save dir or one iter_ dir, any TP/PP layout) or converted checkpoint",
    )
    p.add_argument("--save", required=True, metavar="DIR", help="output HF directory")
    p.add_argument("--format", required=True, choices=("internvl", "transformers"))
    p.add_argument("--hf-template-dir", metavar="DIR", help="the HF checkpoint the model started from")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        help="output dtype (default: the dtype the checkpoint stores its weights in; "
        "fp32 weights of a run from a bf16/fp16 HF checkpoint: that checkpoint's dtype)",
    )
    p.add_argument(
        "--max-shard-size", type=parse_size, default=2 * 1024**3, help="largest safetensors shard (default 2GB)"
    )
    # LoRA training checkpoints (internvl_mcore/convert/lora_export.py)
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA checkpoint: write the full model with the adapters merged into the weights (either --format)",
    )
    p.add_argument(
        "--lora-only",
        action="store_true",
        help="LoRA checkpoint: write only a PEFT adapter "
        "(adapter_config.json + adapter_model.safetensors) for the base's transformers export",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --save directory: "
        "its weight shards, index and config.json are removed first, other files are kept",
    )
    return p


def check_paths(args: argparse.Namespace) -> None:
    """Refuse an export into the checkpoint itself, or over an existing export without --overwrite."""
    from internvl_mcore.errors import CheckpointError, ConfigError
    from internvl_mcore.staging import is_inside, non_empty_dir

    if not os.path.exists(args.load):
        raise CheckpointError(f"--load {args.load}: no such checkpoint directory")
    if is_inside(args.save, args.load):
        raise ConfigError(
            f"--save {args.save} is inside --load {args.load}: the export would write into the "
            "checkpoint; choose another directory"
        )
    if os.path.exists(args.save) and not os.path.isdir(args.save):
        raise ConfigError(f"--save {args.save} exists and is not a directory")
    if non_empty_dir(args.save) and not args.overwrite:
        raise ConfigError(
            f"--save {args.save} exists and is not empty; pass --overwrite to replace the export "
            "there (its *.safetensors, index and config.json are removed first)"
        )


def export(args: argparse.Namespace, save: str) -> list:
    from internvl_mcore.convert import convert_checkpoint_to_hf
    from internvl_mcore.checkpoint.safetensors_io import parse_dtype
    from internvl_mcore.convert.lora_export import export_lora, is_lora_checkpoint

    dtype = parse_dtype(args.dtype) if args.dtype else None
    if args.merge_lora or args.lora_only or is_lora_checkpoint(args.load):
        return export_lora(
            args.load,
            save,
            args.format,
            args.merge_lora,
            args.lora_only,
            args.hf_template_dir,
            dtype,
            args.max_shard_size,
            progress=True,
        )
    return convert_checkpoint_to_hf(
        args.load, save, args.format, args.hf_template_dir, dtype, args.max_shard_size, progress=True
    )


def main(argv: list[str] | None = None) -> int:
    from internvl_mcore.cli_errors import disk_full_names, run_cli
    from internvl_mcore.staging import HF_EXPORT_FILES, staged_dir

    args = build_parser().parse_args(argv)

    def run() -> int:
        start = time.perf_counter()
        check_paths(args)
        # written beside --save and moved in only when complete: a failure leaves --save as it was
        with disk_full_names("--save", args.save), staged_dir(args.save, clear=HF_EXPORT_FILES) as stage:
            files = export(args, str(stage))
        print(f"wrote {args.save} ({args.format}, {len(files)} shard(s)) in {time.perf_counter() - start:.1f}s")
        return 0

    return run_cli(run, "convert_to_hf", interrupted=f"{args.save} left as it was")


if __name__ == "__main__":
    sys.exit(main())
