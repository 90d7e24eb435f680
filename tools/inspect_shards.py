#!/usr/bin/env python
"""Show what a packed training sample became.

    python tools/inspect_shards.py OUT [--sample I] [--json] [--tokenizer DIR] [--verify]
    python tools/inspect_shards.py --summary PREFIX [PREFIX ...]

Prints the decoded text of pack I with loss-carrying tokens in [[ ]], image blocks collapsed to
`<img>×N tiles{...positions...}`, and for each sub-sample its dataset, input file:line and
position range. --json prints one JSON object instead: tokens, loss_mask, position_ids,
cu_seqlens, num_tiles, source (plus prefix, sample, num_samples, images_per_sample).
The tokenizer is the one recorded in the manifest unless --tokenizer is given.
--summary prints one line per shard set instead (e.g. the parts of a --num-shards run): samples,
packs, fill, images, tiles, bytes on disk, rejects.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", metavar="PREFIX", nargs="?", help="output prefix given to preprocess_mm_data.py")
    p.add_argument("--summary", nargs="+", metavar="PREFIX", help="one line per shard set instead of a pack")
    p.add_argument("--sample", type=int, default=0, metavar="I", help="pack index (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer dir (default: the manifest's)")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 against the manifest")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from internvl_mcore.data.shards import ShardReader, describe_pack, pack_json
    from internvl_mcore.errors import DataError

    if args.summary:
        return print_summaries(args.summary)
    if args.prefix is None:
        print("error: give a PREFIX (or --summary PREFIX ...)", file=sys.stderr)
        return 2
    try:
        reader = ShardReader(args.prefix)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not 0 <= args.sample < len(reader):
        print(f"error: --sample {args.sample} out of range: {args.prefix} has {len(reader)} packs", file=sys.stderr)
        return 2
    if args.verify:
        bad = reader.verify()
        for name, why in bad.items():
            print(f"checksum mismatch: {name}: {why}", file=sys.stderr)
        if bad:
            return 1
    if args.json:
        print(json.dumps(pack_json(reader, args.sample)))
        return 0

    decode = None
    tok_info = reader.manifest.get("tokenizer", {})
    tok_dir = args.tokenizer or tok_info.get("path")
    if tok_dir:
        from internvl_mcore.data.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(tok_dir)
            decode = tok.decode
            if tok_info.get("sha256") and tok.sha256 != tok_info["sha256"]:
                print(
                    f"warning: tokenizer at {tok_dir} differs from the one the shards were built with", file=sys.stderr
                )
        except (OSError, DataError) as e:
            print(f"warning: cannot load tokenizer ({e}); showing token ids", file=sys.stderr)
    print(describe_pack(reader, args.sample, decode))
    return 0


def print_summaries(prefixes: list[str]) -> int:
    """One line per prefix; a prefix that is not a shard set is reported and the others still printed."""
    from internvl_mcore.data.shards import ShardReader, summary_line
    from internvl_mcore.errors import DataError

    code = 0
    for prefix in prefixes:
        try:
            print(summary_line(ShardReader(prefix)))
        except (DataError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
    return code


if __name__ == "__main__":
    from internvl_mcore.cli_errors import run_cli

    sys.exit(run_cli(main, "inspect_shards"))
