"""`--data-path` as Megatron-LM reads it: a shard prefix, or a blend of prefixes with weights.

Apart from the loader (loader.py) so that what reads only the flag and the manifests (pretrain's checks
before training, training/shard_checks.py) imports neither torch nor the loader's decoding.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..cli_errors import read_json
from ..errors import DataError
from .shards import manifest_path


def parse_data_path(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """Megatron-style `--data-path` -> [(weight, prefix)] with weights summing to 1.

    Accepted forms (as Megatron-LM):
        ["A"]                      -> [(1.0, "A")]
        ["0.7", "A", "0.3", "B"]   -> [(0.7, "A"), (0.3, "B")]   (weights are normalized)
        ["A", "B"]                 -> weights proportional to each set's number of packs
                                      (Megatron concatenates unweighted sets)
    """
    items = [str(x) for x in data_path]
    if not items:
        raise DataError("--data-path is empty")

    def as_weight(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if len(items) == 1 and as_weight(items[0]) is None:
        return [(1.0, items[0])]
    if as_weight(items[0]) is None:
        # No weights at all: each entry must be a prefix.
        for s in items:
            if as_weight(s) is not None:
                raise DataError(f"--data-path mixes weights and prefixes: {items} (use 'W1 P1 W2 P2 ...')")
        sizes = []
        for p in items:
            mp = manifest_path(p)
            if not os.path.exists(mp):
                raise DataError(f"--data-path entry {p!r}: no shard manifest at {mp}")
            manifest = read_json(mp, DataError)
            try:
                sizes.append(int(manifest["counts"]["packs"]))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{mp}: not a shard manifest (no counts.packs)") from None
        total = sum(sizes)
        if total == 0:
            raise DataError(f"--data-path {items}: all shard sets are empty")
        return [(n / total, p) for n, p in zip(sizes, items)]
    if len(items) % 2:
        raise DataError(f"--data-path with weights needs 'W1 P1 W2 P2 ...' pairs, got {len(items)} entries: {items}")
    pairs = []
    for w_s, p in zip(items[0::2], items[1::2]):
        w = as_weight(w_s)
        if w is None:
            raise DataError(f"--data-path: expected a weight before {p!r}, got {w_s!r}")
        if as_weight(p) is not None:
            raise DataError(f"--data-path: expected a shard prefix after weight {w_s}, got another number {p!r}")
        if not (w >= 0 and np.isfinite(w)):
            raise DataError(f"--data-path: weight {w_s} of {p!r} must be a finite number >= 0")
        pairs.append((w, p))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise DataError(f"--data-path weights sum to {total}; at least one must be > 0")
    return [(w / total, p) for w, p in pairs]
