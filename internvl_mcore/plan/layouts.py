"""Plans: memory per rank, estimated step time and MFU for one parallel layout, and the search over
layouts that fit a cluster.

Step time is a first-order model, not a simulation:

    step = (microbatches + (PP - 1) / V) * slowest stage's microbatch time  (1F1B fill and drain;
           V model chunks per rank with the interleaved schedule; every chunk sends its
           activations: V PP sends per stage and microbatch)
         + data-parallel gradient (and, with the distributed optimizer, parameter) traffic

    bubble = the ranks' mean idle share of the pipeline span with megatron-core's (interleaved)
             1F1B order replayed on the per-chunk times (stages.pipeline_bubble: the ViT makes
             rank 0's first chunk heavier, the output layer the last rank's last); equal chunks
             give (PP - 1) / (V x microbatches + PP - 1)

    stage microbatch time = stage FLOPs x (3, or 4 with full recompute) / (TP x CP)
                            / (peak x compute_efficiency)
                          + TP all-reduces, CP K/V exchange and PP sends / their link bandwidth

Communication is not overlapped with compute (the training loop runs with overlap_grad_reduce off),
ring collectives move 2(n-1)/n (all-reduce) or (n-1)/n (gather/scatter) of the data per rank, and
a group stays on NVLink when it fits in one node (megatron-core's rank order is TP, CP, DP, PP).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

from ..config.lora import LORA_MODULES, LoRAConfig
from ..config.model import ModelConfig, ParallelConfig
from ..config.pipeline_layout import check as pipeline_layout_check
from ..config.pipeline_layout import decoder_layers as layout_decoder_layers
from ..config.pipeline_layout import virtual_size as layout_virtual_size
from ..errors import ConfigError
from .flops import train_step_flops
from .memory import GiB, ActivationBytes, StateBytes, activation_bytes, kv_cache_bytes, state_bytes
from .params import (
    PARTS,
    check_divisibility,
    decoder_layers_per_stage,
    stage_numel,
    stage_params,
)
from .stages import _link, _ring, even_chunks, pipeline_bubble, pipeline_seconds, piece_costs, rank_splits


@dataclass(frozen=True)
class Hardware:
    """One GPU type: peak dense bf16 FLOP/s, memory, link bandwidths (per GPU, one direction)."""

    name: str
    peak_flops: float
    memory_gib: float
    nvlink_bytes_per_s: float
    network_bytes_per_s: float
    gpus_per_node: int = 8


# Vendor datasheet numbers (dense bf16 tensor-core peak, i.e. the "with sparsity" figure halved;
# NVLink total bidirectional bandwidth halved for one direction) and the DGX systems' InfiniBand:
# A100 SXM 80GB: 312 TFLOP/s, NVLink 3 600 GB/s, 8 x 200 Gb/s HDR per DGX A100 (25 GB/s per GPU).
# H100 SXM: 989 TFLOP/s, NVLink 4 900 GB/s, 8 x 400 Gb/s NDR per DGX H100 (50 GB/s per GPU).
# H200 SXM: same compute and links as H100, 141 GB HBM3e.
HARDWARE: dict[str, Hardware] = {
    "a100-80gb": Hardware("a100-80gb", 312e12, 80, 300e9, 25e9),
    "h100": Hardware("h100", 989e12, 80, 450e9, 50e9),
    "h200": Hardware("h200", 989e12, 141, 450e9, 50e9),
}


@dataclass(frozen=True)
class Rollout:
    """Online RL's sampling (--stage gspo / grpo): each step decodes prompts_per_step x
    rollouts_per_prompt responses with the policy, in the training layout, before the training passes."""

    prompts_per_step: int
    rollouts_per_prompt: int = 8
    """--rollouts-per-prompt (the group G)."""
    prompt_length: int = 1024
    """Prompt tokens, image tokens included."""
    max_new_tokens: int = 1024
    """Longest response."""
    max_requests: Optional[int] = None
    """Rows one rank decodes together (--inference-max-requests); None: all of its replica's."""

    def rows(self, dp: int) -> int:
        """Rows in one rank's KV cache: its data-parallel replica's share of the step's responses
        (CP and TP ranks of a replica decode the same rows), at most max_requests."""
        share = -(-self.prompts_per_step * self.rollouts_per_prompt // dp)
        return min(share, self.max_requests) if self.max_requests else share

    @property
    def tokens(self) -> int:
        """Positions of each row's cache: prompt + response."""
        return self.prompt_length + self.max_new_tokens


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes."""

    seq_length: int = 16384
    """Tokens per packed sequence (--seq-length)."""
    global_batch_size: int = 128
    """Sequences per step (--global-batch-size)."""
    micro_batch_size: int = 1
    """Sequences per microbatch (--micro-batch-size)."""
    tiles_per_sequence: Optional[float] = None
    """Image tiles per packed sequence; None: half of the tokens are image tokens."""
    sample_length: Optional[int] = None
    """Length of the packed samples (for attention); None: one sample per sequence."""
    trainable: frozenset = frozenset(PARTS)
    """Parts that train ('vision', 'projector', 'llm', 'lora')."""
    lora_rank: int = 0
    """LoRA rank (0: none); the adapters sit on `lora_modules` of the `lora_target` towers."""
    lora_target: str = "llm"
    """--lora-target: llm, vit or all."""
    lora_modules: tuple[str, ...] = LORA_MODULES
    """--lora-modules: the adapted linears of each layer."""
    bf16: bool = True
    """bf16 parameters with fp32 master weights (else fp32)."""
    reference_model: bool = False
    """--stage mpo (and gspo / grpo with --kl-coeff > 0): a frozen reference copy of the model, sharded
    like it, runs one forward per microbatch."""
    rollout: Optional[Rollout] = None
    """--stage gspo / grpo: the responses decoded each step (their KV cache)."""

    def lora(self) -> Optional[LoRAConfig]:
        """The adapters as training builds them (None without LoRA)."""
        if not self.lora_rank:
            return None
        return LoRAConfig(
            lora_rank=self.lora_rank,
            lora_target=self.lora_target,  # type: ignore[arg-type]
            lora_modules=list(self.lora_modules),
        )

    def tiles(self, model: ModelConfig) -> float:
        if self.tiles_per_sequence is not None:
            return self.tiles_per_sequence
        return float(int(0.5 * self.seq_length / model.num_image_token))

    def sample_lengths(self) -> list[int]:
        """Packed sample lengths of one sequence."""
        n = self.sample_length or self.seq_length
        full, rest = divmod(self.seq_length, n)
        return [n] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class Layout:
    """A parallel layout and the memory-saving switches."""

    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: bool
    first_stage_layers: Optional[int] = None
    ep: int = 1
    """Expert parallelism (MoE): experts split over EP ranks carved out of DP x CP (expert-TP = TP)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (--num-virtual-stages-per-pipeline-rank; 1: no interleaving)."""
    last_stage_layers: Optional[int] = None
    """--decoder-last-pipeline-num-layers (None: the even share)."""
    pipeline_layout: Optional[str] = None
    """--pipeline-model-parallel-layout: the layers of every model chunk (config/pipeline_layout.py);
    set, it gives the chunks per rank (virtual_stages) and replaces the first/last counts."""

    def parallel(self) -> ParallelConfig:
        if self.pipeline_layout is not None:
            return dataclasses.replace(self.parallel_flags(), **_layout_field(self.pipeline_layout))
        return self.parallel_flags()

    def parallel_flags(self) -> ParallelConfig:
        """The ParallelConfig of every field but the layout string."""
        return ParallelConfig(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp,
            sequence_parallel=self.sequence_parallel,
            decoder_first_pipeline_num_layers=self.first_stage_layers,
            decoder_last_pipeline_num_layers=self.last_stage_layers,
            recompute_granularity="full" if self.recompute else None,
            expert_model_parallel_size=self.ep,
            num_virtual_stages_per_pipeline_rank=self.virtual_stages if self.virtual_stages > 1 else None,
        )

    def describe(self) -> str:
        extra = [f"first-stage-layers {self.first_stage_layers}"] if self.first_stage_layers is not None else []
        extra += [f"last-stage-layers {self.last_stage_layers}"] if self.last_stage_layers is not None else []
        extra += [f"layout {self.pipeline_layout}"] if self.pipeline_layout is not None else []
        flags = (
            ["SP"] * self.sequence_parallel
            + ["dist-opt"] * self.distributed_optimizer
            + ["recompute"] * self.recompute
            + extra
        )
        ep = f" EP{self.ep}" if self.ep > 1 else ""
        ep += f" VPP{self.virtual_stages}" if self.virtual_stages > 1 else ""
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}{ep}" + (f" ({', '.join(flags)})" if flags else "")


def _layout_field(layout: str) -> dict:
    """ParallelConfig's layout field where the config has one (i29-layout's flag; until it lands the
    planner alone reads the layout: layout_chunks)."""
    fields = {f.name for f in dataclasses.fields(ParallelConfig)}
    if "pipeline_model_parallel_layout" not in fields:
        return {}
    return {"pipeline_model_parallel_layout": layout, "num_virtual_stages_per_pipeline_rank": None}


def with_pipeline_layout(layout: Layout, pipeline_layout: str, num_layers: int) -> Layout:
    """`layout` with its chunks placed by a --pipeline-model-parallel-layout string (checked against
    PP and the decoder's `num_layers`, a one-line ConfigError; the chunks per rank from it)."""
    pipeline_layout_check(pipeline_layout, layout.pp, num_layers)
    return replace(
        layout,
        pipeline_layout=pipeline_layout,
        virtual_stages=layout_virtual_size(pipeline_layout, layout.pp),
        first_stage_layers=None,
        last_stage_layers=None,
    )


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage's worst rank."""

    stage: int
    decoder_layers: int
    state: StateBytes
    activations: ActivationBytes
    kv_cache: float = 0.0
    """Online RL: the rollouts' KV cache (kv_cache_bytes); 0 otherwise."""

    @property
    def total(self) -> float:
        # decoding ends (its cache freed) before the training passes start: the larger of the two counts
        return self.state.total + max(self.activations.total, self.kv_cache)


class Breakdown(dict):
    """A plan's figures; "bubble" (stages.pipeline_bubble on "chunk_times_s") is replayed when first
    read with [] (a search plans hundreds of layouts and prints a few)."""

    def __getitem__(self, key: str):
        if key == "bubble" and not dict.__contains__(self, key):
            self[key] = pipeline_bubble(self["chunk_times_s"], self["microbatches"])
        return dict.__getitem__(self, key)


@dataclass(frozen=True)
class LayoutPlan:
    """Memory of every stage and the step-time estimate of one layout."""

    model: ModelConfig
    layout: Layout
    workload: Workload
    hardware: Hardware
    budget_gib: float
    stages: list[StagePlan]
    step_time_s: float
    model_flops: float
    compute_s: float = 0.0
    comm_s: float = 0.0
    breakdown: dict = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return max(s.total for s in self.stages) / GiB

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.budget_gib

    @property
    def gpus(self) -> int:
        lay = self.layout
        return lay.tp * lay.pp * lay.cp * lay.dp

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_time_s * self.hardware.peak_flops * self.gpus)

    @property
    def tokens_per_s(self) -> float:
        return self.workload.global_batch_size * self.workload.seq_length / self.step_time_s


def plan(
    model: ModelConfig,
    layout: Layout,
    workload: Workload,
    hardware: Hardware,
    budget_gib: Optional[float] = None,
    compute_efficiency: float = 0.7,
    reserve_gib: float = 6.0,
) -> LayoutPlan:
    """Memory per stage and estimated step time for one layout.

    compute_efficiency: fraction of the datasheet peak that large bf16 GEMMs and flash attention
    reach in practice (an assumption; 0.6-0.8 is typical on A100/H100).
    reserve_gib: memory kept out of the budget for the CUDA context, NCCL buffers and allocator
    fragmentation (an assumption)."""
    par = layout.parallel()
    check_divisibility(model, par)
    w = workload
    budget = (hardware.memory_gib if budget_gib is None else budget_gib) - reserve_gib
    microbatches = w.global_batch_size // (w.micro_batch_size * layout.dp)
    stages = _stage_memory(model, layout, w, microbatches)
    costs = piece_costs(model, layout, w, hardware, compute_efficiency)
    v = layout.virtual_stages
    chunks = layout_chunks(model, layout)
    stage_times, stage_compute = costs.stage_times([sum(row) for row in chunks], v)
    chunk_times = costs.chunk_times(chunks)
    # interleaved: V x microbatches chunk passes of 1/V of a stage's time each (V PP sends), and the
    # PP - 1 chunk passes of fill and drain
    pipeline = pipeline_seconds(stage_times, microbatches, v)
    dp_time = _dp_comm_s(model, layout, w, hardware)
    step = pipeline + dp_time
    model_flops = train_step_flops(
        model,
        w.global_batch_size * w.seq_length,
        int(round(w.tiles(model) * w.global_batch_size)),
        attention_lengths=w.sample_lengths() * w.global_batch_size,
        trainable=set(w.trainable),
    )
    compute_s = pipeline_seconds(stage_compute, microbatches, v)
    return LayoutPlan(
        model,
        layout,
        w,
        hardware,
        budget,
        stages,
        step,
        model_flops,
        compute_s=compute_s,
        comm_s=step - compute_s,
        breakdown=Breakdown(
            pipeline_s=pipeline,
            dp_comm_s=dp_time,
            microbatches=microbatches,
            stage_times_s=stage_times,
            chunk_times_s=chunk_times,
            costs=costs,
        ),
    )


def layout_chunks(model: ModelConfig, layout: Layout) -> list[list[int]]:
    """Decoder layers per [pp_rank][model chunk] of `layout`'s split."""
    if layout.pipeline_layout is not None:
        return layout_decoder_layers(layout.pipeline_layout, layout.pp)
    counts = decoder_layers_per_stage(model.llm.num_layers, layout.parallel())
    return even_chunks(counts, layout.virtual_stages)


_STATE_CACHE: dict[tuple, StateBytes] = {}


def _stage_state(model: ModelConfig, layout: Layout, w: Workload, r: int, layers: int) -> StateBytes:
    """state_bytes of stage `r`, which holds `layers` decoder layers: what the stage holds depends on
    its layer count and its place (first / last), not on how the other stages split the rest, so the
    splits one search compares share the result (the cache's key leaves the split out)."""
    base = replace(layout, first_stage_layers=None, last_stage_layers=None)
    key = (model, base, w.trainable, w.bf16, w.lora_rank, w.lora_target, w.lora_modules, r, layers)
    if key not in _STATE_CACHE:
        if len(_STATE_CACHE) > 4096:
            _STATE_CACHE.clear()
        _STATE_CACHE[key] = state_bytes(
            model,
            layout.parallel(),
            r,
            layout.dp,
            trainable=set(w.trainable),
            param_bytes=2 if w.bf16 else 4,
            use_distributed_optimizer=layout.distributed_optimizer,
            lora=w.lora(),
        )
    return _STATE_CACHE[key]


def _stage_memory(model: ModelConfig, layout: Layout, w: Workload, microbatches: int) -> list[StagePlan]:
    """State and activation bytes of every pipeline stage's worst rank."""
    par = layout.parallel()
    e = 2 if w.bf16 else 4
    trainable = set(w.trainable)
    tiles_mb = w.tiles(model) * w.micro_batch_size
    lengths = w.sample_lengths() * w.micro_batch_size
    layers = [sum(row) for row in layout_chunks(model, layout)]
    stages = []
    for r in range(layout.pp):
        st = _stage_state(model, layout, w, r, layers[r])
        act = activation_bytes(
            model,
            par,
            r,
            w.seq_length,
            w.micro_batch_size,
            tiles_mb,
            microbatches,
            param_bytes=e,
            sample_lengths=lengths,
            trainable=trainable,
        )
        if w.reference_model:  # its weights (no gradients, no optimizer state); its forward keeps no activations
            st = dataclasses.replace(st, params=st.params + sum(s.numel for s in stage_params(model, par, r)) * e)
        ro = w.rollout
        kv = kv_cache_bytes(model, par, r, ro.rows(layout.dp), ro.tokens, e) if ro is not None else 0
        stages.append(StagePlan(r, layers[r], st, act, float(kv)))
    return stages


def _dp_comm_s(model: ModelConfig, layout: Layout, w: Workload, hw: Hardware) -> float:
    """Data-parallel traffic of the largest stage's trainable parameters, in seconds."""
    tp, cp, dp = layout.tp, layout.cp, layout.dp
    e = 2 if w.bf16 else 4
    par = layout.parallel()
    dp_bw = _link(hw, tp * cp, dp)
    dp_time = 0.0
    for r in range(layout.pp):
        lora = w.lora()
        if lora is not None and lora.enabled:
            specs = [s for s in stage_params(model, par, r, lora) if s.part in w.trainable]
            dense, expert = sum(s.numel for s in specs if not s.expert), sum(s.numel for s in specs if s.expert)
        else:  # cached: a search asks for the same sizes under many layouts
            dense, expert = stage_numel(model, par, r, w.trainable)
        t = 0.0  # dense weights over DP x CP; expert weights over the expert DP group (DP x CP / EP)
        for n, group in ((dense, dp * cp), (expert, dp * cp // layout.ep)):
            if layout.distributed_optimizer:
                t += (_ring(group, False) * n * 4 + _ring(group, False) * n * e) / dp_bw
            else:
                t += _ring(group, True) * n * 4 / dp_bw
        dp_time = max(dp_time, t)
    return dp_time


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_layouts(
    model: ModelConfig,
    layout: Layout,
    workload: Workload,
    hardware: Hardware,
    compute_efficiency: float = 0.7,
    virtual_stages: tuple[int, ...] = (1,),
) -> list[tuple[float, Layout]]:
    """`layout` with every stage split megatron-core builds (stages.split_options) for each number of
    model chunks per rank in `virtual_stages`, as (pipeline seconds, layout), fastest first: the
    per-piece costs (ViT + projector on stage 0, each decoder layer, output layer on the last)
    decide. PP 1: the layout itself."""
    if layout.pp == 1:
        return [(0.0, layout)]
    costs = piece_costs(model, layout, workload, hardware, compute_efficiency)
    m = workload.global_batch_size // (workload.micro_batch_size * layout.dp)
    return [
        (
            t,
            replace(
                layout,
                first_stage_layers=s.first,
                last_stage_layers=s.last,
                virtual_stages=s.virtual_stages,
                pipeline_layout=None,
            ),
        )
        for t, s in rank_splits(costs, model.llm.num_layers, layout.pp, m, virtual_stages)
    ]


def propose_split(
    model: ModelConfig,
    layout: Layout,
    workload: Workload,
    hardware: Hardware,
    budget_gib: Optional[float] = None,
    compute_efficiency: float = 0.7,
    reserve_gib: float = 6.0,
    virtual_stages: tuple[int, ...] = (1, 2),
    tries: int = 8,
    slower_than: float = float("inf"),
) -> Optional[LayoutPlan]:
    """The plan of `layout`'s fastest stage split that fits in memory (its first/last/virtual-stage
    settings replaced), in order of pipeline time; None after `tries` planned splits that do not fit,
    or when the rest cannot beat a step of `slower_than` seconds (a search's best so far). A split
    that gives a stage at least as many layers as one found over the budget is not planned."""
    over: dict[tuple[int, int], int] = {}  # (V, stage) -> fewest layers seen over the budget there
    planned = 0
    if layout.pp == 1:
        p = plan(model, layout, workload, hardware, budget_gib, compute_efficiency, reserve_gib)
        return p if p.fits else None
    costs = piece_costs(model, layout, workload, hardware, compute_efficiency)
    m = workload.global_batch_size // (workload.micro_batch_size * layout.dp)
    # split_layouts' order; the layout is built only for the splits planned (a search ranks thousands)
    for t, s in rank_splits(costs, model.llm.num_layers, layout.pp, m, virtual_stages):
        if t >= slower_than or planned == tries:
            return None
        counts, v = s.counts, s.virtual_stages
        if any(n >= over.get((v, r), n + 1) for r, n in enumerate(counts)):
            continue  # a stage's memory grows with its layers: this one cannot fit either
        lay = replace(
            layout, first_stage_layers=s.first, last_stage_layers=s.last, virtual_stages=v, pipeline_layout=None
        )
        p = plan(model, lay, workload, hardware, budget_gib, compute_efficiency, reserve_gib)
        if p.fits:
            return p
        planned += 1
        for st in p.stages:
            if st.total / GiB > p.budget_gib:
                over[(v, st.stage)] = min(over.get((v, st.stage), st.decoder_layers), st.decoder_layers)
    return None


def expert_parallel_options(model: ModelConfig, dp_cp: int, fixed: Optional[int] = None) -> list[int]:
    """EP sizes to try for an MoE model: divisors of both the experts and DP x CP (megatron-core
    carves the expert-parallel group out of the data- and context-parallel ranks); [1] if dense."""
    if not model.llm.is_moe:
        return [1]
    return [ep for ep in _divisors(dp_cp) if model.llm.num_experts % ep == 0 and fixed in (None, ep)]


def candidate_layouts(
    model: ModelConfig,
    gpus: int,
    workload: Workload,
    max_tp: int = 8,
    max_cp: int = 8,
    distributed_optimizer: Optional[bool] = None,
    recompute: Optional[bool] = None,
    fixed: Optional[dict] = None,
) -> Iterable[Layout]:
    """Every layout of `gpus` ranks the model's shapes allow (TP a divisor of heads, key/value heads
    and widths; PP at most the decoder's layers; CP splits the sequence into 2*CP chunks; DP divides
    the global batch). Sequence parallelism is on whenever TP > 1 (it only saves memory). The stage
    split is left to `propose_split` (the layouts come with the even one)."""
    fixed = fixed or {}
    for tp, cp in itertools.product(_divisors(max_tp), _divisors(max_cp)):
        if fixed.get("tp", tp) != tp or fixed.get("cp", cp) != cp:
            continue
        if gpus % (tp * cp) or workload.seq_length % (2 * cp if cp > 1 else 1):
            continue
        try:
            check_divisibility(model, ParallelConfig(tensor_model_parallel_size=tp))
        except ConfigError:
            continue
        for pp in _divisors(gpus // (tp * cp)):
            if fixed.get("pp", pp) != pp or pp > model.llm.num_layers:
                continue
            dp = gpus // (tp * cp * pp)
            if workload.global_batch_size % (workload.micro_batch_size * dp):
                continue
            for ep in expert_parallel_options(model, dp * cp, fixed.get("ep")):
                for dist in [distributed_optimizer] if distributed_optimizer is not None else [True, False]:
                    for rc in [recompute] if recompute is not None else [False, True]:
                        yield Layout(
                            tp, pp, cp, dp, sequence_parallel=tp > 1, distributed_optimizer=dist, recompute=rc, ep=ep
                        )


def search(
    model: ModelConfig,
    gpus: int,
    workload: Workload,
    hardware: Hardware,
    budget_gib: Optional[float] = None,
    compute_efficiency: float = 0.7,
    reserve_gib: float = 6.0,
    distributed_optimizer: Optional[bool] = None,
    recompute: Optional[bool] = None,
    fixed: Optional[dict] = None,
    virtual_stages: tuple[int, ...] = (1,),
) -> list[LayoutPlan]:
    """Layouts that fit, fastest first; of the variants of one TP/PP/CP only the fastest is kept.
    With PP > 1 each variant takes its fastest stage split that fits (`propose_split`), with
    `virtual_stages` the numbers of model chunks per rank to try."""
    best: dict[tuple, LayoutPlan] = {}
    for lay in candidate_layouts(
        model, gpus, workload, distributed_optimizer=distributed_optimizer, recompute=recompute, fixed=fixed
    ):
        key = (lay.tp, lay.pp, lay.cp, lay.ep)
        bar = best[key].step_time_s if key in best else float("inf")
        p = propose_split(
            model, lay, workload, hardware, budget_gib, compute_efficiency, reserve_gib, virtual_stages, slower_than=bar
        )
        if p is None:
            continue
        if key not in best or p.step_time_s < best[key].step_time_s:
            best[key] = p
    return sorted(best.values(), key=lambda p: p.step_time_s)


def with_layout(layout: Layout, **changes: object) -> Layout:
    """A copy of `layout` with fields changed."""
    return replace(layout, **changes)
