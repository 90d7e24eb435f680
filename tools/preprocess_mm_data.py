#!/usr/bin/env python
r"""Build packed, indexed training shards from InternVL meta JSON (JSONL / parquet + images).

    python tools/preprocess_mm_data.py --meta META.json --tokenizer DIR --output-prefix OUT \
        --seq-length 16384 --workers 2

Writes OUT_{tokens,loss_mask,position_ids,num_tiles,source,tiles}.{bin,idx}, OUT.manifest.json and
OUT.rejects.jsonl, prints a summary, and exits 1 when the share of rejected inputs exceeds
--max-reject-ratio (the shards are still written, so the rejects can be inspected).
See internvl_mcore/data/preprocess.py for what happens in between.
"""
from __future__ import annotations

import argparse
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
    g.add_argument("--num-shards", type=int, default=1,
                   help="split the input across this many runs (machines): each keeps a deterministic slice of "
                        "every dataset; train on all the resulting prefixes together")
    g.add_argument("--shard-index", type=int, default=0, help="which slice this run keeps, in [0, --num-shards)")
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
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        workers=args.workers,
        progress=not args.no_progress,
    )


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
    from internvl_mcore.data.preprocess import exit_code, format_summary, run_preprocess

    try:
        cfg = config_from_args(args)
        result = run_preprocess(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(cfg, result))
    code = exit_code(cfg, result)
    if code:
        print(
            f"error: {100 * result.reject_ratio:.2f}% of inputs rejected, above --max-reject-ratio "
            f"{100 * cfg.max_reject_ratio:.2f}% (see {cfg.output_prefix}.rejects.jsonl)",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
