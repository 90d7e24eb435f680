"""Regenerate the tables in docs/usage.md that are derived from the code, so the docs match it.

    python tools/gen_flag_docs.py           # rewrite the generated blocks of docs/usage.md
    python tools/gen_flag_docs.py --check   # exit 1 (naming the block) when a block is out of date

Blocks sit between `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->`:

- flags:   every pretrain_internvl.py flag with its default and meaning, read from its parser, which
           internvl_mcore/config/cli.py builds from the config dataclasses (ParallelConfig,
           TrainConfig, DataConfig, LogConfig, CheckpointConfig, ...): defaults are the fields'
           defaults and meanings their docstrings;
- stages:  the --stage presets (STAGES in internvl_mcore/config/training.py);
- layouts: the example scripts' per-size layouts (examples/layouts.tsv, chosen by the planner).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from internvl_mcore.config.domains import Domain  # noqa: E402
from internvl_mcore.config.presets import PRESETS  # noqa: E402
from internvl_mcore.config.training import STAGES  # noqa: E402

USAGE_MD = os.path.join(REPO, "docs", "usage.md")


def _load(path: str, name: str):
    """Import a script that is not part of a package (pretrain_internvl.py, examples/gen_scripts.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if name in sys.modules:
        return sys.modules[name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value: object) -> str:
    """A flag's default as the docs show it."""
    if value is None:
        return "unset"
    if value is False:
        return "off"
    if value == []:
        return "none"
    if isinstance(value, list):
        return "`" + " ".join(map(str, value)) + "`"
    return f"`{value}`"


def pretrain_parser() -> argparse.ArgumentParser:
    """pretrain_internvl.py's parser: one flag group per config dataclass, help = field docstring."""
    return _load(os.path.join(REPO, "pretrain_internvl.py"), "pretrain_internvl").build_parser()


def parser_flags() -> set[str]:
    """Every option string pretrain_internvl.py's parser accepts."""
    return {s for action in pretrain_parser()._actions for s in action.option_strings}


def flags_table() -> str:
    """flag | default | meaning for every flag, grouped as --help groups them (one group per config
    dataclass: ParallelConfig, TrainConfig, DataConfig, LogConfig, CheckpointConfig, ...). The
    meaning is the field's docstring, which config/cli.py made the flag's help, and for a number the
    values its domain (config/domains.py) accepts."""
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for group in pretrain_parser()._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments"):
            lines.append(f"| **{group.title}** | | {_cell(group.description or '')} |")
        for a in actions:
            longs = [s for s in a.option_strings if s.startswith("--")]
            shown = " / ".join(f"`{s}`" for s in longs)
            text = " ".join((a.help or "").split())
            suffix = f" (default: {a.default})"  # what config/cli.py appends; the column shows it
            if text.endswith(suffix):
                text = text[: -len(suffix)]
            if longs[0].startswith("--") and text.startswith(longs[0] + ":"):
                text = text[len(longs[0]) + 1 :].strip()  # ParallelConfig's docstrings repeat the flag name
            if text and not text.endswith("."):
                text += "."
            if a.choices:
                text += f" One of {', '.join(f'`{c}`' for c in a.choices)}."
            if isinstance(a.type, Domain):  # config/domains.py: what the parser accepts
                text += f" Takes {a.type.describe()}."
            lines.append(f"| {shown} | {_default(a.default)} | {_cell(text)} |")
    return "\n".join(lines)


def stages_table() -> str:
    """The --stage presets: what trains, peak lr, schedule, drop path."""

    def mark(on: bool) -> str:
        return "trains" if on else "frozen"

    lines = [
        "| `--stage` | ViT | projector | LLM | `--lr` | `--lr-decay-style` | `--drop-path-rate` |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in STAGES.items():
        lines.append(
            f"| `{name}` | {mark(s.train_vit)} | {mark(s.train_projector)} | {mark(s.train_llm)} | "
            f"{s.lr:g} | {s.lr_decay_style} | {s.drop_path_rate:g} |"
        )
    return "\n".join(lines)


def layouts_table() -> str:
    """The example scripts' layouts, per model and stage, with the planner's estimates."""
    gen = _load(os.path.join(REPO, "examples", "gen_scripts.py"), "gen_scripts")
    from internvl_mcore.plan import count_params

    scripts = {s.stage: s for s in gen.STAGE_SCRIPTS}
    lines = [
        "| model | params | script | GPUs | layout | peak GiB | step s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in gen.read_tsv():
        params = count_params(PRESETS[r.model]).total / 1e9
        path = os.path.relpath(gen.script_path(r.model, scripts[r.stage]), REPO)
        lines.append(
            f"| {r.model} | {params:.2f}B | `{path}` | {r.gpus} | {r.describe()} | {r.peak_gib} | "
            f"{r.step_s} | {r.mfu:.0%} |"
        )
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {"flags": flags_table, "stages": stages_table, "layouts": layouts_table}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- BEGIN GENERATED: {name} -->\n)(.*?)(<!-- END GENERATED: {name} -->)", re.S)


def render(text: str, path: str = USAGE_MD) -> str:
    """`text` with every generated block replaced by its current content."""
    for name, make in BLOCKS.items():
        pattern = _pattern(name)
        if not pattern.search(text):
            raise ValueError(f"{path}: no '<!-- BEGIN GENERATED: {name} -->' ... END block")
        body = make()
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
    return text


def stale_blocks(text: str) -> list[str]:
    """Names of the blocks whose content differs from what the code generates."""
    return [name for name in BLOCKS if _pattern(name).search(text).group(2) != BLOCKS[name]() + "\n"]  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when docs/usage.md is out of date")
    p.add_argument("--path", default=USAGE_MD, help="the markdown file (default docs/usage.md)")
    a = p.parse_args(argv)
    with open(a.path, encoding="utf-8") as f:
        text = f.read()
    new = render(text, a.path)
    if a.check:
        stale = stale_blocks(text)
        for name in stale:
            print(f"{a.path}: generated block '{name}' is out of date (run python tools/gen_flag_docs.py)")
        return 1 if stale else 0
    if new != text:
        with open(a.path, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"updated {a.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
