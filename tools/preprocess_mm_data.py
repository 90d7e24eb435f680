#!/usr/bin/env python
r"""Build packed, indexed training shards from InternVL meta JSON (JSONL / parquet + images).

    python tools/preprocess_mm_data.py --meta META.json --tokenizer DIR --output-prefix OUT \
        --seq-length 16384 --workers 2

Writes OUT_{tokens,loss_mask,position_ids,num_tiles,source,tiles}.{bin,idx}, OUT.manifest.json and
OUT.rejects.jsonl and prints a summary. Everything is written beside OUT first and renamed into place
only when the run succeeds: a failed, interrupted (Ctrl-C, exit 130) or killed run leaves an existing
OUT as it was. When the share of rejected inputs exceeds --max-reject-ratio the run exits 1, OUT is
left as it was and the rejects are kept in OUT.failed.rejects.jsonl for inspection. Bad flags or
files: one line naming them, exit 2 (docs/errors.md).
See internvl_mcore/data/preprocess.py for what happens in between.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from internvl_mcore.data.shards import DEFAULT_TILE_FORMAT, TILE_FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input / output")
    g.add_argument("--meta", nargs="+", required=True, metavar="META.json",
                   help="InternVL meta JSON file(s); annotations may be .jsonl or .parquet")
    g.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory shipped with the checkpoint")
    g.add_argument("--output-prefix", required=True, metavar="OUT")
    g.add_argument("--workers", type=int, default=1, help="worker processes (output is identical for any value)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--preference", action="store_true",
                   help="MMPR preference JSONL (image(s), question, chosen, rejected) for --stage mpo: each record "
                        "becomes a chosen + rejected pair packed together, tiles stored once")
    g.add_argument("--precompute-reference", action="store_true",
                   help="not supported (refused with the reason): MPO's reference log-probs come from a frozen "
                        "reference model in the same training step")

    g = p.add_argument_group("samples")
    g.add_argument("--seq-length", type=int, default=16384, help="tokens per pack (Megatron-LM name)")
    g.add_argument("--seed", type=int, default=0, help="drives subsampling, frame sampling, V2PE draws and pack order")
    g.add_argument("--truncate", action="store_true", help="cut over-long samples instead of rejecting them")
    g.add_argument("--max-reject-ratio", type=float, default=0.01)
    g.add_argument("--system-prompt", default=None, help="replace the template's default system prompt")
    g.add_argument("--min-num-frames", type=int, default=8)
    g.add_argument("--max-num-frames", type=int, default=32)

    g = p.add_argument_group("images (from --model when given)")
    g.add_argument("--model", default=None, metavar="PRESET|DIR",
                   help="model preset or checkpoint directory (HF, converted or training) to take image size / "
                   "patch / downsample ratio and the chat template from")
    g.add_argument("--image-size", type=int, default=None, help="tile side in pixels (default 448)")
    g.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default 14)")
    g.add_argument("--downsample-ratio", type=float, default=None, help="pixel-shuffle ratio (default 0.5)")
    g.add_argument("--num-image-token", type=int, default=None,
                   help="<IMG_CONTEXT> tokens per tile (default (image_size/patch_size)^2 * downsample_ratio^2)")
    g.add_argument("--no-thumbnail", action="store_true", help="do not append the thumbnail tile")
    g.add_argument("--tile-format", choices=TILE_FORMATS, default=DEFAULT_TILE_FORMAT,
                   help="how tiles are stored (see bench/data_pipeline.py for size / speed)")

    g = p.add_argument_group("positions and packing")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--v2pe-delta", type=float, default=1.0, help="V2PE step per <IMG_CONTEXT> (1.0: plain positions)")
    v.add_argument("--v2pe-random", action="store_true", help="draw each image's delta from {1, 1/2, ..., 1/256}")
    g.add_argument("--pack-buffer", type=int, default=4096, help="samples sorted together by the best-fit packer")
    return p


def config_from_args(args: argparse.Namespace):
    from internvl_mcore.data.preprocess import PreprocessConfig

    image_size, patch_size, downsample, template = 448, 14, 0.5, "internvl2_5"
    if args.model:
        from internvl_mcore.convert.source import resolve_model

        model = resolve_model(args.model)
        image_size, patch_size = model.vision.image_size, model.vision.patch_size
        downsample, template = model.downsample_ratio, model.template
    return PreprocessConfig(
        meta=list(args.meta),
        tokenizer=args.tokenizer,
        output_prefix=args.output_prefix,
        seq_length=args.seq_length,
        seed=args.seed,
        v2pe_delta=args.v2pe_delta,
        v2pe_random=args.v2pe_random,
        min_num_frames=args.min_num_frames,
        max_num_frames=args.max_num_frames,
        max_reject_ratio=args.max_reject_ratio,
        truncate=args.truncate,
        image_size=args.image_size if args.image_size is not None else image_size,
        patch_size=args.patch_size if args.patch_size is not None else patch_size,
        downsample_ratio=args.downsample_ratio if args.downsample_ratio is not None else downsample,
        num_image_token=args.num_image_token,
        use_thumbnail=not args.no_thumbnail,
        system_prompt=args.system_prompt,
        tile_format=args.tile_format,
        pack_buffer=args.pack_buffer,
        template=template,
        preference=args.preference,
        workers=args.workers,
        progress=not args.no_progress,
    )


def check_output_prefix(prefix: str) -> None:
    """A prefix names files (OUT_tokens.bin ...), not a folder: 'out/' would write hidden '_tokens.bin'."""
    from internvl_mcore.staging import check_writable_dir

    if prefix.endswith(("/", os.sep)) or os.path.basename(prefix) in ("", ".", ".."):
        raise ValueError(f"--output-prefix {prefix!r} names a folder; give DIR/NAME (the files are "
                         "DIR/NAME_tokens.bin ..., DIR/NAME.manifest.json)")
    check_writable_dir(os.path.dirname(os.path.abspath(prefix)), "--output-prefix")


def preprocess(args: argparse.Namespace) -> int:
    """Build the shards under a staging name; install them only if the reject ratio is within limits."""
    from internvl_mcore.data.preprocess import exit_code, format_summary, run_preprocess
    from internvl_mcore.staging import staged_prefix

    check_output_prefix(args.output_prefix)
    cfg = config_from_args(args)
    kept = cfg.output_prefix + ".failed.rejects.jsonl"
    with staged_prefix(cfg.output_prefix) as stage:
        result = run_preprocess(dataclasses.replace(cfg, output_prefix=str(stage)))
        code = exit_code(cfg, result)
        if code:  # keep the rejects for inspection, not the shards: OUT stays as it was
            os.replace(str(stage) + ".rejects.jsonl", kept)
            stage.abort()
        elif os.path.exists(kept):  # from an earlier failed run: stale now
            os.remove(kept)
    summary = format_summary(cfg, result)
    print(summary.rsplit("\n", 1)[0] if code else summary)
    if code:
        print(
            f"preprocess_mm_data: error: {100 * result.reject_ratio:.2f}% of inputs rejected, above --max-reject-ratio "
            f"{100 * cfg.max_reject_ratio:.2f}%: {cfg.output_prefix} left as it was; rejects in {kept}",
            file=sys.stderr,
        )
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.precompute_reference:
        print("error: --precompute-reference is not supported: --stage mpo computes the reference log-probs in "
              "the same step with a frozen copy of the policy sharded like it (its memory is in tools/plan.py "
              "--stage mpo). Precomputed values would tie the shards to one set of starting weights, one "
              "tokenization and one pack order, and a second model pass at preprocessing time would need the "
              "training layout here.", file=sys.stderr)
        return 2
    # megatron-core warns at import about optional GPU libraries; irrelevant to preprocessing.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from internvl_mcore.cli_errors import run_cli

    return run_cli(lambda: preprocess(args), "preprocess_mm_data",
                   interrupted=f"{args.output_prefix} left as it was")


if __name__ == "__main__":
    sys.exit(main())
