#!/usr/bin/env python
"""Draw the training-loss curve of one or more consecutive runs from their --log-jsonl files.

    python examples/digits/plot_loss.py --log "stage 1=runs/demo/logs/stage1.jsonl" \
        --log "stage 2=runs/demo/logs/stage2.jsonl" --out runs/demo/loss.png

Runs are drawn one after the other on a common step axis (stage 2's step 1 follows stage 1's last),
each in its own colour, with the raw per-step loss faint and a moving average on top.
"""

from __future__ import annotations

import argparse
import json
import sys


def read_losses(path: str) -> list[tuple[int, float]]:
    """(iteration, loss) sorted by iteration from a --log-jsonl file; errors name the file and line.

    The file is appended to, so a resumed or repeated run logs some iterations again: the last record
    of an iteration wins.
    """
    by_iteration: dict[int, float] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                by_iteration[int(rec["iteration"])] = float(rec["loss"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a training log record with iteration and loss ({e})") from e
    if not by_iteration:
        raise ValueError(f"{path}: no log records")
    return sorted(by_iteration.items())


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start), same length as `values`."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss(runs: list[tuple[str, str]], out_png: str, title: str = "training loss") -> str:
    """Plot the (label, log path) runs consecutively into `out_png` (headless, Agg); returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    offset = 0
    for k, (label, path) in enumerate(runs):
        points = read_losses(path)
        steps = [offset + it for it, _ in points]
        losses = [loss for _, loss in points]
        color = f"C{k}"
        ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8)
        window = max(1, len(losses) // 25)
        ax.plot(
            steps,
            moving_average(losses, window),
            color=color,
            linewidth=1.8,
            label=f"{label} ({len(points)} steps, last {losses[-1]:.3f})",
        )
        if k:
            ax.axvline(offset + 0.5, color="grey", linestyle=":", linewidth=1)
        offset = steps[-1]
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _run_arg(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    return (label, path) if sep else (text, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--log",
        action="append",
        required=True,
        type=_run_arg,
        metavar="[LABEL=]LOG.jsonl",
        help="a --log-jsonl file; repeat for consecutive runs",
    )
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="training loss")
    args = p.parse_args(argv)
    print(f"wrote {plot_loss(args.log, args.out, args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
