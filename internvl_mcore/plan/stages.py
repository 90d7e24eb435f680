"""Per-piece cost of one microbatch, pipeline stage times, and the stage splits that balance them.

A pipeline stage's microbatch time is the sum of its pieces (forward + backward, compute and the
TP / CP / EP communication each piece does, as layouts.py's module docstring models them):

    stage 0:      ViT + projector (the data's tiles per microbatch) + its decoder layers
    middle:       its decoder layers
    last stage:   its decoder layers + final norm, output layer and loss
    every stage:  one PP send / receive of the microbatch's activations per model chunk (PP > 1)

The split is what megatron-core 0.16.1 can build: --decoder-first-pipeline-num-layers and
--decoder-last-pipeline-num-layers set stage 0's and the last stage's counts, the other stages
share the rest equally; with V model chunks per rank (--num-virtual-stages-per-pipeline-rank) every
chunk of a rank holds the same count (config/problems.py: virtual_pipeline_problems), so each of
those counts divides by V. `split_options` lists every such split, `rank_splits` orders them by the
step's pipeline time; layouts.py's search keeps the fastest that fits in memory.

The interleaved schedule holds more microbatches at once than 1F1B: `interleaved_in_flight`
replays megatron-core's order (schedules.py: get_pp_rank_microbatches, get_schedule_table) for the
per-chunk counts a rank holds at any time, so memory.py can weigh stage 0's first chunk (the ViT)
apart from the rest.
"""

from __future__ import annotations

import functools
import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..config.model import ModelConfig
from .flops import forward_flops, pass_multipliers
from .params import padded_vision_heads

if TYPE_CHECKING:  # layouts.py imports this module
    from .layouts import Hardware, Layout, Workload


@dataclass(frozen=True)
class PieceCosts:
    """Seconds of one microbatch's forward + backward by piece; `*_compute` is the compute part."""

    vision: float
    """ViT + projector (stage 0's first chunk); 0 without tiles."""
    layer: float
    """One decoder layer."""
    output: float
    """Final norm, output layer and loss (last stage's last chunk): the output layer at the text
    tokens only (logits are computed where a loss is); the loss's softmax is not a matmul."""
    send: float
    """One PP send + receive of the microbatch's activations per stage (0 at PP 1)."""
    vision_compute: float = 0.0
    layer_compute: float = 0.0
    output_compute: float = 0.0

    def stage_times(self, counts: list[int], virtual_stages: int = 1) -> tuple[list[float], list[float]]:
        """(total, compute) seconds of each pipeline stage holding `counts` decoder layers; with V
        model chunks per rank each chunk sends and receives its activations (V sends)."""
        last = len(counts) - 1
        sends = self.send * virtual_stages
        total = [
            n * self.layer + self.vision * (r == 0) + self.output * (r == last) + sends for r, n in enumerate(counts)
        ]
        compute = [
            n * self.layer_compute + self.vision_compute * (r == 0) + self.output_compute * (r == last)
            for r, n in enumerate(counts)
        ]
        return total, compute

    def chunk_times(self, chunk_counts: list[list[int]]) -> list[list[float]]:
        """Seconds of one microbatch's forward + backward per [pp_rank][model chunk] holding
        `chunk_counts` decoder layers: the ViT + projector in rank 0's first chunk, the output layer
        and loss in the last rank's last chunk, one PP send per chunk."""
        last = len(chunk_counts) - 1
        return [
            [
                n * self.layer
                + self.vision * (r == 0 and c == 0)
                + self.output * (r == last and c == len(row) - 1)
                + self.send
                for c, n in enumerate(row)
            ]
            for r, row in enumerate(chunk_counts)
        ]


def even_chunks(counts: list[int] | tuple[int, ...], virtual_stages: int) -> list[list[int]]:
    """[pp_rank][chunk] decoder layers of a first/last split: megatron-core gives every chunk of a
    rank the same count (config/problems.py: virtual_pipeline_problems)."""
    return [[n // virtual_stages] * virtual_stages for n in counts]


def _link(hw: Hardware, stride: int, size: int) -> float:
    """NVLink when the group (ranks stride apart) lies in one node, else the network."""
    return hw.nvlink_bytes_per_s if stride * size <= hw.gpus_per_node else hw.network_bytes_per_s


def _ring(n: int, all_reduce: bool) -> float:
    return 0.0 if n <= 1 else (2.0 if all_reduce else 1.0) * (n - 1) / n


def piece_costs(model: ModelConfig, layout: Layout, w: Workload, hw: Hardware, compute_efficiency: float) -> PieceCosts:
    """The model's pieces priced for one microbatch of `w` in `layout` on `hw`."""
    tp, cp, pp, dp = layout.tp, layout.cp, layout.pp, layout.dp
    e = 2 if w.bf16 else 4
    trainable = set(w.trainable)
    tiles_mb = w.tiles(model) * w.micro_batch_size
    eff = hw.peak_flops * compute_efficiency
    tokens = w.seq_length * w.micro_batch_size
    # the training step computes logits only where a loss is (training/loop.py: logit_tokens), never at
    # image tokens: the text tokens bound them (a CPU run of debug-m PP2 measured the output layer at
    # ~1.4 decoder layers where all tokens' logits would be 4.8)
    text = max(0, tokens - int(round(tiles_mb)) * model.num_image_token)
    fwd = forward_flops(
        model, tokens, int(round(tiles_mb)), w.sample_lengths() * w.micro_batch_size, lm_head_tokens=text
    )
    m = model.llm
    tokens_rank = w.seq_length * w.micro_batch_size / cp
    act_bytes = tokens_rank * m.hidden_size * e
    k = pass_multipliers(trainable, layout.recompute)
    extra = 1 if w.reference_model else 0  # + the reference model's forward of every microbatch
    llm_mult = k["llm"] + extra
    ar_per_layer = 6 if layout.recompute else 4
    layer_flops = (fwd.llm_linear + fwd.llm_attention) / m.num_layers * llm_mult / (tp * cp)
    layer_comm = ar_per_layer * _ring(tp, True) * act_bytes / _link(hw, 1, tp)
    kv_bytes = tokens_rank * 2 * m.num_query_groups * m.head_dim * e / tp
    layer_comm += 3 * (cp - 1) * kv_bytes / _link(hw, tp, cp) if cp > 1 else 0.0
    layer_comm += expert_all_to_all_s(model, layout, hw, tokens_rank, e, ar_per_layer)
    vision_flops = vision_comm = 0.0
    if tiles_mb:
        vit_pad = padded_vision_heads(model.vision.num_attention_heads, tp) / model.vision.num_attention_heads
        vit = (fwd.vit_linear + fwd.vit_attention) * vit_pad + fwd.vit_patch_embed
        vision_flops = (vit * (k["vision"] + extra) + fwd.projector * (k["projector"] + extra)) / tp
        vit_ar = ar_per_layer if "vision" in trainable else 2
        vit_bytes = tiles_mb * (model.vision.num_patches + 1) * model.vision.hidden_size * e
        vision_comm = model.vision.num_layers * vit_ar * _ring(tp, True) * vit_bytes / _link(hw, 1, tp)
    output_flops = fwd.lm_head * llm_mult / (tp * cp)
    pp_bw = hw.nvlink_bytes_per_s if tp * cp * dp < hw.gpus_per_node else hw.network_bytes_per_s
    send = 2 * act_bytes / (tp if layout.sequence_parallel else 1) / pp_bw if pp > 1 else 0.0
    return PieceCosts(
        vision=vision_flops / eff + vision_comm,
        layer=layer_flops / eff + layer_comm,
        output=output_flops / eff,
        send=send,
        vision_compute=vision_flops / eff,
        layer_compute=layer_flops / eff,
        output_compute=output_flops / eff,
    )


def expert_all_to_all_s(
    model: ModelConfig, layout: Layout, hw: Hardware, tokens_rank: float, e: int, passes: int
) -> float:
    """Seconds one MoE layer spends in the dispatcher's all-to-alls per microbatch: each of the
    token's top-k copies (hidden_size x e bytes) leaves the rank with probability (EP-1)/EP, once
    to dispatch and once to combine, in the forward and again in the backward (`passes` / 2 times
    each: 4 per layer, 6 with recompute); the EP group spans ranks TP apart."""
    m = model.llm
    if not m.is_moe or layout.ep == 1:
        return 0.0
    hw_bytes = tokens_rank / layout.tp * m.moe_router_topk * m.hidden_size * e * (layout.ep - 1) / layout.ep
    return passes * hw_bytes / _link(hw, layout.tp, layout.ep)


def pipeline_seconds(stage_times: list[float], microbatches: int, virtual_stages: int) -> float:
    """The step's pipeline part: (m + (PP - 1) / V) x the slowest stage's microbatch time (1F1B's
    fill and drain; with V chunks per rank they are chunk passes of 1/V of a stage's time)."""
    pp = len(stage_times)
    return (microbatches + (pp - 1) / virtual_stages) * max(stage_times)


@dataclass(frozen=True)
class Split:
    """Decoder layers per pipeline stage as the flags set them; None: megatron-core's even share."""

    first: Optional[int]
    last: Optional[int]
    virtual_stages: int
    counts: tuple[int, ...]

    def flags(self) -> list[str]:
        """The pretrain_internvl.py flags that give this split."""
        return split_flags(self.first, self.last, self.virtual_stages)


def split_flags(first: Optional[int], last: Optional[int], virtual_stages: int) -> list[str]:
    """pretrain_internvl.py's flags for a stage split (None: the even split's count): the one place
    tools/plan.py, examples/gen_scripts.py and the planner spell them."""
    out = []
    if first is not None:
        out.append(f"--decoder-first-pipeline-num-layers {first}")
    if last is not None:
        out.append(f"--decoder-last-pipeline-num-layers {last}")
    if virtual_stages > 1:
        out.append(f"--num-virtual-stages-per-pipeline-rank {virtual_stages}")
    return out


@functools.lru_cache(maxsize=None)
def split_options(num_layers: int, pp: int, virtual_stages: int = 1) -> tuple[Split, ...]:
    """Every split of `num_layers` over `pp` stages of `virtual_stages` chunks megatron-core builds:
    an optional first and last count (each divisible by V, at least V), the middle stages an equal
    share divisible by V (at least one layer each). One spelling per split: the fewest flags, the
    first stage's before the last's (at PP 2 --decoder-first-pipeline-num-layers alone says it)."""
    v = virtual_stages
    if pp == 1:
        return (Split(None, None, 1, (num_layers,)),) if v == 1 else ()
    seen: dict[tuple[int, ...], Split] = {}
    ends = [None, *range(v, num_layers, v)]
    # fewest flags first, the first stage's flag before the last's: one spelling per split
    for first, last in sorted(
        itertools.product(ends, ends), key=lambda fl: (fl[0] is not None) + 2 * (fl[1] is not None)
    ):
        rest = num_layers - (first or 0) - (last or 0)
        middle_stages = pp - (first is not None) - (last is not None)
        if middle_stages < 0 or rest < 0 or (middle_stages == 0 and rest):
            continue
        if middle_stages and (rest % (middle_stages * v) or rest == 0):
            continue
        middle = rest // middle_stages if middle_stages else 0
        counts = [middle] * pp
        counts[0] = first if first is not None else middle
        counts[-1] = last if last is not None else middle
        seen.setdefault(tuple(counts), Split(first, last, v, tuple(counts)))
    out = list(seen.values())
    return tuple(out)


@functools.lru_cache(maxsize=256)
def rank_splits(
    costs: PieceCosts, num_layers: int, pp: int, microbatches: int, virtual_stages: tuple[int, ...] = (1,)
) -> tuple[tuple[float, Split], ...]:
    """(pipeline seconds, split) of every split for each V in `virtual_stages`, fastest first; ties
    keep fewer flags (the even split, then V = 1) first. Cached: a search's memory-saver variants of
    one TP / PP / CP share their piece costs."""
    ranked, splits = [], []
    for v in virtual_stages:
        for s in split_options(num_layers, pp, v):
            t = (microbatches + (pp - 1) / v) * _slowest_stage(costs, s.counts, v)  # pipeline_seconds
            ranked.append((t, (s.first is not None) + (s.last is not None) + (v > 1), len(splits)))  # len(s.flags())
            splits.append(s)
    ranked.sort()  # the list index keeps a stable order among equal (time, flags)
    return tuple((t, splits[i]) for t, _, i in ranked)


def _slowest_stage(costs: PieceCosts, counts: tuple[int, ...], v: int) -> float:
    """max(costs.stage_times(counts, v)[0]), the same sums: the middle stages share one count, so
    stage 0, stage 1 and the last decide."""
    last = len(counts) - 1
    sends = costs.send * v
    return max(
        counts[r] * costs.layer + costs.vision * (r == 0) + costs.output * (r == last) + sends
        for r in {0, min(1, last), last}
    )


def balanced_chunks(costs: PieceCosts, num_layers: int, pp: int, virtual_stages: int) -> list[list[int]]:
    """Decoder layers per [pp_rank][model chunk] that make the slowest chunk as fast as possible:
    each layer goes to the virtual stage (chunk-major order, as megatron-core numbers them) it makes
    the least slow, the ViT + projector weighing on the first and the output layer on the last.
    Water-filling is optimal here: every stage's time grows by one layer's time per layer. Chunks
    may stay empty (a chunk of E or L only)."""
    n = pp * virtual_stages
    base = [costs.send] * n
    base[0] += costs.vision
    base[-1] += costs.output
    counts = [0] * n
    heap = [(base[s] + costs.layer, s) for s in range(n)]
    heapq.heapify(heap)
    for _ in range(num_layers):
        _, s = heapq.heappop(heap)
        counts[s] += 1
        heapq.heappush(heap, (base[s] + (counts[s] + 1) * costs.layer, s))
    return [[counts[c * pp + r] for c in range(virtual_stages)] for r in range(pp)]


def layout_string(chunk_counts: list[list[int]]) -> str:
    """megatron-core's --pipeline-model-parallel-layout for decoder layers per [pp_rank][chunk]:
    the virtual stages in chunk-major order, E (embedding, ViT, projector) opening the first and L
    (final norm, output layer, loss) closing the last, e.g. "Et|tttt|ttt|L"."""
    pp, v = len(chunk_counts), len(chunk_counts[0])
    stages = ["t" * chunk_counts[s % pp][s // pp] for s in range(pp * v)]
    stages[0], stages[-1] = "E" + stages[0], stages[-1] + "L"
    return "|".join(stages)


@functools.lru_cache(maxsize=4096)
def schedule_table(pp: int, v: int, microbatches: int) -> list[tuple[int, int]]:
    """megatron-core's forward order of (microbatch, model chunk) on every rank (schedules.py
    get_schedule_table): chunk-major inside each group of PP microbatches; V = 1: the microbatches."""
    return [(mb, c) for g in range(0, microbatches, pp) for c in range(v) for mb in range(g, min(g + pp, microbatches))]


def warmup_forwards(pp: int, v: int, microbatches: int, rank: int) -> int:
    """Forwards rank `rank` runs before its first backward in megatron-core's (interleaved) 1F1B
    (schedules.py get_pp_rank_microbatches)."""
    warmup = (pp - rank - 1) * 2 + (v - 1) * pp if v > 1 else pp - rank - 1
    return min(warmup, microbatches * v)


def _rank_order(pp: int, v: int, microbatches: int, rank: int) -> list[tuple[bool, int, int]]:
    """(forward?, microbatch, chunk) in the order rank `rank` runs them: warm-up forwards, then one
    forward and one backward per step (backwards in reverse chunk order), then the cool-down backwards."""
    table = schedule_table(pp, v, microbatches)
    warm = warmup_forwards(pp, v, microbatches, rank)
    fwd = [(True, mb, c) for mb, c in table]
    bwd = [(False, mb, v - 1 - c) for mb, c in table]
    return fwd[:warm] + [op for pair in zip(fwd[warm:], bwd) for op in pair] + bwd[len(table) - warm :]


def simulate_schedule(chunk_s: list[list[float]], microbatches: int) -> list[float]:
    """Each rank's idle share of the pipeline span when megatron-core's (interleaved) 1F1B order runs
    with these forward + backward seconds per [rank][chunk] of one microbatch (backward 2x forward),
    a chunk's send counted in its time: what uneven stages and chunks make of the bubble. Equal
    chunks give (PP - 1) / (V m + PP - 1) on every rank. One simulation for the planner
    (`pipeline_bubble`) and bench/pipeline.py."""
    pp, v = len(chunk_s), len(chunk_s[0])
    ops = [_rank_order(pp, v, microbatches, r) for r in range(pp)]
    done: dict[tuple[bool, int, int], float] = {}
    free, nxt = [0.0] * pp, [0] * pp
    last_stage = pp * v - 1
    while True:
        progressed = False
        for r in range(pp):
            order, k = ops[r], nxt[r]
            while k < len(order):
                fwd, mb, c = order[k]
                stage = c * pp + r
                if fwd:
                    dep = (True, mb, stage - 1) if stage else None
                else:
                    dep = (True, mb, stage) if stage == last_stage else (False, mb, stage + 1)
                if dep is not None and dep not in done:
                    break
                start = max(free[r], done[dep]) if dep is not None else free[r]
                free[r] = start + chunk_s[r][c] * (1 if fwd else 2) / 3
                done[(fwd, mb, stage)] = free[r]
                k += 1
                progressed = True
            nxt[r] = k
        if all(nxt[r] == len(ops[r]) for r in range(pp)):
            break
        if not progressed:
            raise RuntimeError("schedule simulation deadlocked")
    span = max(free)
    return [1 - microbatches * sum(chunk_s[r]) / span for r in range(pp)]


@functools.lru_cache(maxsize=4096)
def _bubble(chunk_s: tuple[tuple[float, ...], ...], microbatches: int) -> float:
    return sum(simulate_schedule([list(row) for row in chunk_s], microbatches)) / len(chunk_s)


def pipeline_bubble(chunk_s: list[list[float]], microbatches: int) -> float:
    """The pipeline bubble, the ranks' mean idle share of the pipeline span, from megatron-core's
    schedule replayed with the per-chunk times (`simulate_schedule`); PP 1: 0."""
    if len(chunk_s) == 1:
        return 0.0
    return _bubble(tuple(tuple(row) for row in chunk_s), microbatches)


def interleaved_in_flight(pp: int, v: int, microbatches: int, rank: int) -> tuple[tuple[int, ...], ...]:
    """The per-chunk counts of microbatches whose activations rank `rank` holds, after each forward
    of megatron-core's interleaved schedule (microbatch groups of PP; V = 1: 1F1B): warm-up forwards, then
    one forward and one backward per step, backwards in reverse chunk order. Distinct states only."""
    total = microbatches * v
    table = schedule_table(pp, v, microbatches)
    warmup = warmup_forwards(pp, v, microbatches, rank)
    held = [0] * v
    states = set()
    for k in range(warmup):
        held[table[k][1]] += 1
        states.add(tuple(held))
    for k in range(total - warmup):
        held[table[warmup + k][1]] += 1
        states.add(tuple(held))
        held[v - 1 - table[k][1]] -= 1
    return tuple(sorted(states))
