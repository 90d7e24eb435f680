"""Packing samples into fixed-budget sequences, and V2PE position ids.

Pure numpy functions: the preprocessing CLI calls them once over all sample lengths (packing) and
once per sample inside worker processes (positions), so both must be deterministic functions of
their arguments and a seed, never of worker count or call order.

Packing: shuffled-buffer best-fit-decreasing. The sample order is shuffled with the seed (so packs
mix datasets), cut into buffers, and each buffer's samples are placed longest first into the open
pack with the *least* room that still fits them (best fit). Packs stay open across buffers, so the
small samples of later buffers top up the gaps left earlier; this reaches >99% fill on a realistic
SFT length mix (see bench/data_pipeline.py). A sample is never split; one longer than the budget
is an error here (the caller rejects or truncates it before packing).

Balance (--balance-dp-compute): the packs of one global batch dealt to data-parallel ranks and
microbatches so that each rank's estimated compute is about equal (`balanced_assignment`); the
cost of a pack is the caller's (training/balance.py: the planner's FLOP model of its `PackShape`).

V2PE (Variable Visual Position Encoding, InternVL 2.5/3): text tokens advance the position by 1,
each `<IMG_CONTEXT>` token by a per-image delta <= 1, and `</img>` lands at ceil(last visual
position) + 1. With delta = 1 this is the plain 0, 1, 2, ... of a text model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# The V2PE deltas InternVL's `v2pe_rnd` draws from: stride/num_image_token with stride in
# {1, 2, ..., 256} and 256 tokens per tile, i.e. 1/256 ... 1.
V2PE_RANDOM_DELTAS = tuple(1.0 / 2**k for k in range(9))  # 1, 1/2, ..., 1/256

# Tolerance for ceil() of the last visual position: k*delta in float64 for a non-dyadic delta
# (say 0.1) can land a hair above an integer; that must not push </img> one position further.
_CEIL_EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def pack_lengths(
    lengths: Sequence[int] | np.ndarray,
    seq_length: int,
    seed: int,
    buffer_size: int = 4096,
) -> list[np.ndarray]:
    """Group sample indices into packs of total length <= seq_length.

    Args:
        lengths: (N,) token count of each sample, in input order.
        seq_length: token budget of one pack.
        seed: shuffles the sample order and the pack order; same seed -> same packs.
        buffer_size: samples sorted together for best-fit-decreasing. Larger fills better but
            correlates more samples of similar length within a pack; 4096 is past the point where
            fill stops improving on realistic mixes.

    Returns:
        One int64 array of sample indices per pack. Within a pack the samples keep their shuffled
        order (not length order), and the packs themselves are in a seeded random order so a
        trainer reading them sequentially does not see all the long samples first.

    Raises:
        ValueError: a length is < 1 or > seq_length (callers reject those before packing).
    """
    lengths = _checked_lengths(lengths, seq_length)
    rng = np.random.default_rng(seed)
    order = rng.permutation(lengths.size)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)  # position of each sample in the shuffled order
    members = _best_fit_decreasing(order, lengths, seq_length, buffer_size)
    packs = [np.array(sorted(m, key=lambda i: rank[i]), dtype=np.int64) for m in members]
    return [packs[i] for i in rng.permutation(len(packs))]


def _checked_lengths(lengths: Sequence[int] | np.ndarray, seq_length: int) -> np.ndarray:
    """(N,) int64 lengths, each in [1, seq_length], or ValueError naming the first bad sample."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if lengths.size and (lengths.min() < 1 or lengths.max() > seq_length):
        bad = int(np.flatnonzero((lengths < 1) | (lengths > seq_length))[0])
        raise ValueError(
            f"sample {bad} has length {int(lengths[bad])}, outside [1, seq_length={seq_length}]; "
            "reject or truncate over-long samples before packing"
        )
    return lengths


def _best_fit_decreasing(order: np.ndarray, lengths: np.ndarray, seq_length: int, buffer_size: int) -> list[list[int]]:
    """Sample indices of each pack: every buffer of `order`, longest first, goes into the open pack
    with the least room that still fits it (a new pack when none does)."""
    # Open packs bucketed by remaining room, so "smallest room >= L" is one argmax over a bool
    # array of seq_length+1 entries (numpy stops at the first True) instead of a scan over packs.
    has_room = np.zeros(seq_length + 1, dtype=bool)
    by_room: dict[int, list[int]] = {}
    members: list[list[int]] = []
    for start in range(0, order.size, buffer_size):
        chunk = order[start : start + buffer_size]
        # Longest first; ties keep shuffled order (stable sort) so the result is seed-determined.
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        for idx in chunk.tolist():
            need = int(lengths[idx])
            room = need + int(np.argmax(has_room[need:]))
            if has_room[room]:
                bucket = by_room[room]
                pack = bucket.pop()
                if not bucket:
                    has_room[room] = False
            else:  # nothing fits: open a new pack
                pack = len(members)
                members.append([])
                room = seq_length
            members[pack].append(idx)
            left = room - need
            if left > 0:
                by_room.setdefault(left, []).append(pack)
                has_room[left] = True
    return members


def pack_fill(lengths: Sequence[int] | np.ndarray, packs: Sequence[np.ndarray], seq_length: int) -> float:
    """Fraction of the packs' token slots (n_packs * seq_length) holding sample tokens."""
    if not packs:
        return 0.0
    lengths = np.asarray(lengths, dtype=np.int64)
    used = sum(int(lengths[p].sum()) for p in packs)
    return used / (len(packs) * seq_length)


def cu_seqlens_from_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """(n+1,) int32 boundaries 0, l0, l0+l1, ... of sub-samples laid end to end."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    if out[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"pack of {out[-1]} tokens does not fit int32 cu_seqlens")
    return out.astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Compute balance over data-parallel ranks and microbatches
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackShape:
    """What a pack's compute depends on, read from the shard index without its image bytes."""

    segment_lengths: tuple[int, ...]  # tokens of each packed sub-sample, in order
    tiles: int  # image tiles the vision model encodes (both sequences' of a preference pair)
    loss_tokens: int  # positions whose next token carries loss (the ones the output layer computes)

    @property
    def tokens(self) -> int:
        return sum(self.segment_lengths)


def balanced_assignment(costs: Sequence[float], groups: int) -> list[list[int]]:
    """Indices of `costs` dealt into `groups` groups of len(costs) / groups each, with the groups'
    cost sums about equal; deterministic (ties go to the lower index / group).

    Greedy largest-first into the least-loaded group with room, then pairwise swaps between the
    heaviest and the lightest group while a swap lowers the heaviest; never worse than the plain deal
    (index i to group i % groups: how the stream deals packs to data-parallel ranks), which it falls
    back to. Each
    group lists its indices in increasing order."""
    n = len(costs)
    if groups < 1 or n % groups:
        raise ValueError(f"{n} packs do not split into {groups} equal groups")
    size = n // groups
    c = [float(x) for x in costs]
    order = sorted(range(n), key=lambda i: (-c[i], i))
    members: list[list[int]] = [[] for _ in range(groups)]
    load = [0.0] * groups
    for i in order:
        g = min((g for g in range(groups) if len(members[g]) < size), key=lambda g: (load[g], g))
        members[g].append(i)
        load[g] += c[i]
    _improve_by_swaps(members, load, c)
    plain = [list(range(g, n, groups)) for g in range(groups)]
    if max(sum(c[i] for i in m) for m in plain) <= max(load):
        return plain
    return [sorted(m) for m in members]


def _improve_by_swaps(members: list[list[int]], load: list[float], c: list[float]) -> None:
    """Swap one index of the heaviest group with one of the lightest while that lowers the heaviest
    group's load (bounded: each swap strictly lowers the sum of squared loads)."""
    for _ in range(4 * sum(len(m) for m in members)):
        hi = max(range(len(load)), key=lambda g: (load[g], -g))
        lo = min(range(len(load)), key=lambda g: (load[g], g))
        gap = load[hi] - load[lo]
        hi_c = np.array([c[i] for i in members[hi]])
        lo_c = np.array([c[i] for i in members[lo]])
        d = hi_c[:, None] - lo_c[None, :]
        # how far the pair's swap brings both groups below the old maximum (<= 0: no gain)
        gain = np.where((d > 0) & (d < gap), np.minimum(d, gap - d), 0.0)
        if gain.size == 0 or gain.max() <= 0:
            return
        pick = divmod(int(np.argmax(gain)), lo_c.size)  # the first best pair: deterministic
        a, b = pick
        d = c[members[hi][a]] - c[members[lo][b]]
        members[hi][a], members[lo][b] = members[lo][b], members[hi][a]
        load[hi] -= d
        load[lo] += d


def balanced_layout(costs: Sequence[float], dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """A global batch's packs (their costs, in global-index order) laid out for training: for each
    data-parallel rank, its packs in the order it reads them, microbatch by microbatch. Ranks are
    balanced first (they wait for each other at the gradient reduction), then each rank's
    microbatches (pipeline stages wait for the slowest microbatch)."""
    layout = []
    for rank_packs in balanced_assignment(costs, dp_size):
        micro = balanced_assignment([costs[i] for i in rank_packs], len(rank_packs) // micro_batch_size)
        layout.append([rank_packs[i] for mb in micro for i in mb])
    return layout


# ------------------------------------------------------------------------------------------------
# V2PE position ids
# ------------------------------------------------------------------------------------------------


def v2pe_random_deltas(n_images: int, seed: int, key: int) -> np.ndarray:
    """(n_images,) float64 deltas drawn uniformly from {1, 1/2, ..., 1/256}.

    The generator is keyed by (seed, key) where key identifies the sample (its ordinal in the
    input stream), so the draw is the same whichever worker process handles the sample.
    """
    if seed < 0 or key < 0:
        raise ValueError(f"seed and key must be >= 0, got seed={seed} key={key}")
    rng = np.random.default_rng([seed, key])
    choices = np.asarray(V2PE_RANDOM_DELTAS)
    return choices[rng.integers(0, len(choices), size=n_images)]


def image_spans(tokens: np.ndarray, img_start_id: int, img_end_id: int, img_context_id: int) -> list[tuple[int, int]]:
    """(start, end) indices of each `<img>` ... `</img>` block, validated.

    Every `<img>` must be followed by one or more `<IMG_CONTEXT>` and then `</img>`, and no
    `<IMG_CONTEXT>` may appear outside such a block: positions of a malformed sample would be
    silently wrong otherwise.
    """
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == img_start_id)
    ends = np.flatnonzero(tokens == img_end_id)
    if starts.size != ends.size:
        raise ValueError(f"{starts.size} <img> tokens but {ends.size} </img> tokens")
    spans = []
    prev_end = -1
    for s, e in zip(starts.tolist(), ends.tolist()):
        if not prev_end < s < e:
            raise ValueError(f"<img> at {s} and </img> at {e} are not properly nested/ordered")
        if e - s < 2 or not np.all(tokens[s + 1 : e] == img_context_id):
            raise ValueError(f"image block [{s}, {e}] must contain only <IMG_CONTEXT> tokens (at least one)")
        spans.append((s, e))
        prev_end = e
    n_context = int(np.count_nonzero(tokens == img_context_id))
    if n_context != sum(e - s - 1 for s, e in spans):
        raise ValueError("<IMG_CONTEXT> tokens found outside an <img> ... </img> block")
    return spans


def v2pe_position_ids(
    tokens: np.ndarray,
    img_start_id: int,
    img_end_id: int,
    img_context_id: int,
    deltas_per_image: float | Sequence[float] = 1.0,
) -> np.ndarray:
    """V2PE positions of one sample, float32 (S,), starting at 0.

    Args:
        tokens: (S,) token ids of one sample (not a pack: positions restart per sample).
        img_start_id, img_end_id, img_context_id: ids of `<img>`, `</img>`, `<IMG_CONTEXT>`.
        deltas_per_image: one delta for all images, or one per image in order of appearance.

    Rule (as InternVL's V2PE): text tokens, including `<img>` and `</img>`, advance by 1; the k-th
    `<IMG_CONTEXT>` of an image whose `<img>` sits at p gets p + k*delta; `</img>` gets
    ceil(last visual position) + 1.

    Computed in float64 and returned as float32 (the dtype stored and fed to RoPE): exact for the
    dyadic deltas 1 ... 1/256 while positions stay below 2**15 (any pack of <= 32k tokens).
    """
    tokens = np.asarray(tokens)
    spans = image_spans(tokens, img_start_id, img_end_id, img_context_id)
    if np.ndim(deltas_per_image) == 0:
        deltas = [float(deltas_per_image)] * len(spans)
    else:
        deltas = [float(d) for d in deltas_per_image]
        if len(deltas) != len(spans):
            raise ValueError(f"{len(deltas)} deltas given for {len(spans)} images")
    if any(not (0.0 < d <= 1.0) for d in deltas):
        raise ValueError(f"V2PE deltas must be in (0, 1], got {deltas}")

    pos = np.empty(tokens.shape[0], dtype=np.float64)
    last = -1.0  # position of the previous token
    text_from = 0  # first index of the current text run
    for (s, e), delta in zip(spans, deltas):
        n_text = s + 1 - text_from  # text run up to and including <img>
        pos[text_from : s + 1] = last + 1.0 + np.arange(n_text)
        last += n_text
        # k*delta rather than a running sum: exact for dyadic deltas, no drift for others.
        pos[s + 1 : e] = last + delta * np.arange(1, e - s)
        last = float(math.ceil(pos[e - 1] - _CEIL_EPS))
        text_from = e  # </img> starts the next text run
    pos[text_from:] = last + 1.0 + np.arange(tokens.shape[0] - text_from)
    return pos.astype(np.float32)
