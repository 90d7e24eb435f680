"""Print what the suite checks: the number of tests per file and every parallel layout a test id names.

Issue #27 asks that a faster suite keep every test and every layout check; this is the list compared
before and after (docs/testing.md). Layouts are read from the collected test ids (parametrize ids such
as `tp2pp2`, `cp2-tp2`, `tp2-sp-distopt`, `debug-tp2-pp1-w2`) and, with `--save FILE`, written as
plain text so two commits' lists can be diffed:

    .venv/bin/python scripts/test_inventory.py --save /tmp/before.txt
    .venv/bin/python scripts/test_inventory.py --compare /tmp/before.txt

Layout cases that a worker loops over inside one test (a `--cases` table) are not test ids and are
not listed; their tables live in the worker scripts.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = re.compile(r"(?:(?:v?pp|tp|cp|dp|ep|etp)\d+)+")


def collect() -> list[str]:
    """Every test id pytest collects under tests/ (no test runs)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    if not ids:
        raise SystemExit(f"pytest collected nothing:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return ids


def layouts(ids: list[str]) -> list[str]:
    """`file::test[id]` for every collected id whose parameters name a parallel layout."""
    return sorted(
        i
        for i in ids
        if "[" in i and any(LAYOUT.fullmatch(token) for token in re.split(r"[-_+\[\]\s]", i.split("[", 1)[1].lower()))
    )


def inventory(ids: list[str]) -> str:
    per_file = collections.Counter(i.split("::", 1)[0] for i in ids)
    lines = [f"tests: {len(ids)}", f"files: {len(per_file)}"]
    lines += [f"file {n:4d} {f}" for f, n in sorted(per_file.items())]
    lay = layouts(ids)
    lines.append(f"layout ids: {len(lay)}")
    lines += [f"layout {i}" for i in lay]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save", help="write the inventory to this file")
    ap.add_argument("--compare", help="an earlier --save: print what is missing now and what is new")
    args = ap.parse_args()
    text = inventory(collect())
    if args.save:
        Path(args.save).write_text(text)
    if not args.compare:
        print(text, end="")
        return
    before = Path(args.compare).read_text().splitlines()
    now = text.splitlines()
    print("\n".join(line for line in now[:2]))
    b_lay = {line for line in before if line.startswith("layout tests/")}
    n_lay = {line for line in now if line.startswith("layout tests/")}
    print(f"layout ids before {len(b_lay)}, now {len(n_lay)}")
    for line in sorted(b_lay - n_lay):
        print(f"missing {line}")
    for line in sorted(n_lay - b_lay):
        print(f"new     {line}")


if __name__ == "__main__":
    main()
