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

With --prompts (records with a reference answer, `--answer-key`, for --stage gspo / grpo) it writes a
prompt set instead: OUT.prompts.jsonl, OUT.prompt_images.bin (each image's bytes once),
OUT.manifest.json and OUT.rejects.jsonl, staged and limited the same way (internvl_mcore/data/prompts.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Fields that are not flags of their own: the two negated switches below, and the template (--model's).
SPECIAL_FIELDS = ("use_thumbnail", "progress", "template")
FROM_MODEL = ("image_size", "patch_size", "downsample_ratio")


def build_parser() -> argparse.ArgumentParser:
    """One flag per PreprocessConfig field (its docstring is the help, as for the training flags),
    plus --model, --no-thumbnail, --no-progress and the refused --precompute-reference."""
    from internvl_mcore.config.cli import add_dataclass_flags
    from internvl_mcore.data.preprocess import PreprocessConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, PreprocessConfig, "preprocessing", skip=SPECIAL_FIELDS)
    p.set_defaults(**{name: None for name in FROM_MODEL})  # None: from --model, else the field's default
    g = p.add_argument_group("switches and the model")
    g.add_argument(
        "--model",
        default=None,
        metavar="PRESET|DIR",
        help="model preset or checkpoint directory (HF, converted or training) to take image size / "
        "patch / downsample ratio and the chat template from",
    )
    g.add_argument("--no-thumbnail", action="store_true", help="do not append the thumbnail tile")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--precompute-reference",
        action="store_true",
        help="not supported (refused with the reason): MPO's reference log-probs come from a frozen "
        "reference model in the same training step",
    )
    return p


def config_from_args(args: argparse.Namespace):
    from internvl_mcore.config.cli import build_dataclass
    from internvl_mcore.data.preprocess import PreprocessConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PreprocessConfig)}
    model_values = {name: defaults[name] for name in (*FROM_MODEL, "template")}
    if args.model:
        from internvl_mcore.config.presets import PRESETS

        model = PRESETS.get(args.model)
        if model is None:  # a checkpoint directory: its readers (convert/) import torch, which a preset need not
            from internvl_mcore.convert.source import resolve_model

            model = resolve_model(args.model)
        model_values = {
            "image_size": model.vision.image_size,
            "patch_size": model.vision.patch_size,
            "downsample_ratio": model.downsample_ratio,
            "template": model.template,
        }
    given = {name: getattr(args, name) for name in FROM_MODEL if getattr(args, name) is not None}
    return build_dataclass(
        PreprocessConfig,
        args,
        **{**model_values, **given},
        use_thumbnail=not args.no_thumbnail,
        progress=not args.no_progress,
    )


def check_output_prefix(prefix: str) -> None:
    """A prefix names files (OUT_tokens.bin ...), not a folder: 'out/' would write hidden '_tokens.bin'."""
    from internvl_mcore.errors import ConfigError
    from internvl_mcore.staging import check_writable_dir

    if prefix.endswith(("/", os.sep)) or os.path.basename(prefix) in ("", ".", ".."):
        raise ConfigError(
            f"--output-prefix {prefix!r} names a folder; give DIR/NAME (the files are "
            "DIR/NAME_tokens.bin ..., DIR/NAME.manifest.json)"
        )
    check_writable_dir(os.path.dirname(os.path.abspath(prefix)), "--output-prefix")


def preprocess(args: argparse.Namespace) -> int:
    """Build the shards under a staging name; install them only if the reject ratio is within limits."""
    from internvl_mcore.cli_errors import disk_full_names
    from internvl_mcore.data.preprocess import exit_code, format_summary, run_preprocess
    from internvl_mcore.staging import staged_prefix

    check_output_prefix(args.output_prefix)
    cfg = config_from_args(args)
    kept = cfg.output_prefix + ".failed.rejects.jsonl"
    with disk_full_names("--output-prefix", cfg.output_prefix), staged_prefix(cfg.output_prefix) as stage:
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
        print(
            "error: --precompute-reference is not supported: --stage mpo computes the reference log-probs in "
            "the same step with a frozen copy of the policy sharded like it (its memory is in tools/plan.py "
            "--stage mpo). Precomputed values would tie the shards to one set of starting weights, one "
            "tokenization and one pack order, and a second model pass at preprocessing time would need the "
            "training layout here.",
            file=sys.stderr,
        )
        return 2
    # megatron-core warns at import about optional GPU libraries; irrelevant to preprocessing.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from internvl_mcore.cli_errors import run_cli

    return run_cli(lambda: preprocess(args), "preprocess_mm_data", interrupted=f"{args.output_prefix} left as it was")


if __name__ == "__main__":
    sys.exit(main())
