"""Capacity planner: memory per rank and estimated step time of InternVL training layouts.

    python tools/plan.py --model internvl3-38b --gpus 16 --gpu-memory 80 --seq-length 16384 \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 --use-distributed-optimizer

prints one row per pipeline stage (its largest rank): parameters, gradients, optimizer state,
activations, total against the budget, then the estimated step time and MFU. Without explicit
--tensor/--pipeline/--context-parallel sizes it lists the layouts that fit, fastest first.
With PP > 1 it prints the stage split (decoder layers and the modelled time of each stage: the ViT and
projector on stage 0, the output layer and loss on the last) with the predicted pipeline bubble, and,
for an explicit layout, the fastest split that fits (--decoder-first/last-pipeline-num-layers,
--num-virtual-stages-per-pipeline-rank). With --stage gspo / grpo the rollouts' KV cache (--prompts-per-step x --rollouts-per-prompt responses
of --prompt-length + --max-new-tokens tokens) and, with --kl-coeff > 0, the frozen reference model count too.
Every number comes from internvl_mcore.plan (docs/planner.md explains the model behind them).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvl_mcore.config import PRESETS, get_preset  # noqa: E402
from internvl_mcore.config.domains import OneLineParser, declare_domains  # noqa: E402
from internvl_mcore.config.lora import LORA_MODULES, LORA_TOWERS, LoRAConfig  # noqa: E402
from internvl_mcore.config.model import ModelConfig, ParallelConfig  # noqa: E402
from internvl_mcore.config.problems import check, problems  # noqa: E402
from internvl_mcore.config.training import (
    STAGES,
    DataConfig,
    LogConfig,
    RunConfig,
    TrainConfig,  # noqa: E402
    trained_parts,
)
from internvl_mcore.errors import ConfigError  # noqa: E402
from internvl_mcore.plan import HARDWARE, Layout, Rollout, Workload, count_params, plan, search  # noqa: E402
from internvl_mcore.plan.stages import split_flags as stage_split_flags  # noqa: E402
from internvl_mcore.plan.layouts import layout_chunks, propose_split, with_pipeline_layout  # noqa: E402
from internvl_mcore.plan.stages import balanced_chunks, layout_string, pipeline_bubble  # noqa: E402
from internvl_mcore.plan.params import active_params  # noqa: E402
from internvl_mcore.plan.memory import GiB  # noqa: E402


RL_STAGES = ("gspo", "grpo")
"""Online RL stages (docs/rl.md): the rollouts' KV cache, and the reference model with --kl-coeff > 0."""
RL_FLAGS = ("rollout_prompts_per_step", "rollout_group_size", "rollout_prompt_length", "rollout_max_new_tokens")
RL_FLAGS += ("grpo_kl_beta", "inference_max_requests")


def preset_stage(stage: str | None) -> str | None:
    """The stage as config/training.py's STAGES knows it: an online RL stage not (yet) in that table
    trains every part, as InternVL3.5's GSPO does (the table's entry wins once it has one)."""
    return stage if stage in STAGES or stage is None else None


def stage_parts(stage: str | None) -> frozenset[str]:
    """The parts --stage trains: config/training.py's STAGES, resolved as the training loop resolves
    them (--stage mpo adds the frozen reference model: Workload.reference_model)."""
    vit, projector, llm, _ = trained_parts(TrainConfig(stage=preset_stage(stage)))  # type: ignore[arg-type]
    return frozenset(part for part, on in (("vision", vit), ("projector", projector), ("llm", llm)) if on)


def build_parser() -> argparse.ArgumentParser:
    """The planner's flags; each number is checked against its domain (config/domains.py) as it is
    parsed: --gpus 0, --gpu-memory nan or --compute-efficiency 1.5 stop there with one line."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        metavar="PRESET|DIR",
        help="model preset (" + ", ".join(PRESETS) + ") or a checkpoint directory (HF in either "
        "layout, converted or training) whose config it carries",
    )
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument(
        "--gpu",
        default="a100-80gb",
        choices=sorted(HARDWARE),
        help="GPU type: peak FLOP/s, memory and link bandwidths (default a100-80gb)",
    )
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: the GPU type's)")
    p.add_argument(
        "--reserve-gb",
        type=float,
        default=6.0,
        help="GiB kept for CUDA context, NCCL buffers and fragmentation (default 6)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument(
        "--compute-efficiency", type=float, default=0.7, help="fraction of the peak large GEMMs reach (default 0.7)"
    )
    p.add_argument("--nvlink-gbps", type=float, default=None, help="override intra-node GB/s per GPU")
    p.add_argument("--network-gbps", type=float, default=None, help="override inter-node GB/s per GPU")
    p.add_argument("--seq-length", type=int, default=16384, help="tokens per packed sequence (default 16384)")
    p.add_argument("--global-batch-size", type=int, default=128, help="sequences per step (default 128)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per microbatch (default 1)")
    p.add_argument(
        "--tiles-per-sequence",
        type=float,
        default=None,
        help="image tiles per packed sequence (default: half of the tokens are image tokens)",
    )
    p.add_argument(
        "--sample-length",
        type=int,
        default=None,
        help="packed sample length for attention FLOPs (default: one sample per sequence)",
    )
    p.add_argument("--tensor-model-parallel-size", type=int, default=None)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None)
    p.add_argument("--context-parallel-size", type=int, default=None)
    p.add_argument(
        "--expert-model-parallel-size",
        type=int,
        default=None,
        help="MoE: ranks the experts are split over (out of DP x CP); with the layout flags, "
        "that layout (default 1), else the search keeps only this EP",
    )
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    p.add_argument(
        "--num-virtual-stages-per-pipeline-rank",
        type=int,
        default=1,
        help="model chunks per pipeline rank (the interleaved schedule divides the bubble by it)",
    )
    p.add_argument(
        "--pipeline-model-parallel-layout",
        default=None,
        help='the layers of every model chunk, e.g. "Et|tttt|ttt|L" (E: embedding, ViT and projector; t: a '
        "decoder layer; L: output layer and loss; stages split by | in virtual order): its chunks per rank, "
        "instead of the first/last counts",
    )
    p.add_argument("--sequence-parallel", action="store_true", help="(implied for TP > 1 in the search)")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--recompute-granularity", choices=["full"], default=None)
    p.add_argument(
        "--stage",
        choices=sorted({*STAGES, *RL_STAGES}),
        default=None,
        help="training stage: which parts train (default: everything); gspo / grpo add the rollouts' KV cache",
    )
    add_rl_flags(p)
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="LoRA adapters of this rank; every base weight is frozen, only the adapters train",
    )
    p.add_argument(
        "--lora-target",
        choices=sorted(LORA_TOWERS),
        default="llm",
        help="with --lora-rank: the towers whose layers get adapters (default llm)",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        choices=LORA_MODULES,
        default=list(LORA_MODULES),
        help="with --lora-rank: the adapted linears of each layer (default: all four)",
    )
    p.add_argument("--fp32", action="store_true", help="fp32 parameters instead of bf16")
    p.add_argument("--top", type=int, default=15, help="layouts to list in search mode (default 15)")
    return declare_domains(p)


def add_rl_flags(p: argparse.ArgumentParser) -> None:
    """--stage gspo / grpo: the rollouts of one step (Megatron-LM's RL spellings accepted as aliases)."""
    g = p.add_argument_group("online RL (--stage gspo / grpo)")
    g.add_argument(
        "--prompts-per-step",
        "--grpo-prompts-per-step",
        dest="rollout_prompts_per_step",
        type=int,
        default=None,
        help="prompts sampled per step (default: --global-batch-size / --rollouts-per-prompt)",
    )
    g.add_argument(
        "--rollouts-per-prompt",
        "--grpo-group-size",
        dest="rollout_group_size",
        type=int,
        default=None,
        help="responses per prompt (default 8)",
    )
    g.add_argument(
        "--prompt-length",
        dest="rollout_prompt_length",
        type=int,
        default=None,
        help="prompt tokens, image tokens included (default 1024)",
    )
    g.add_argument(
        "--max-new-tokens",
        "--max-response-length",
        dest="rollout_max_new_tokens",
        type=int,
        default=None,
        help="longest response (default 1024)",
    )
    g.add_argument(
        "--kl-coeff",
        "--grpo-kl-beta",
        dest="grpo_kl_beta",
        type=float,
        default=None,
        help="> 0: the frozen reference model is held too (default 0)",
    )
    g.add_argument(
        "--inference-max-requests",
        type=int,
        default=None,
        help="rows one rank decodes together (default: all of its data-parallel replica's responses)",
    )


def rollout(a: argparse.Namespace) -> Rollout | None:
    """The step's rollouts (None unless --stage gspo / grpo)."""
    if a.stage not in RL_STAGES:
        return None
    group = a.rollout_group_size or 8
    return Rollout(
        prompts_per_step=a.rollout_prompts_per_step or max(1, a.global_batch_size // group),
        rollouts_per_prompt=group,
        prompt_length=a.rollout_prompt_length or 1024,
        max_new_tokens=a.rollout_max_new_tokens or 1024,
        max_requests=a.inference_max_requests,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_ranges(args)
    return args


def check_ranges(args: argparse.Namespace) -> None:
    """Refuse what no single flag's domain can say: a memory budget the reserve eats up."""
    if args.gpu_memory is not None and args.gpu_memory <= args.reserve_gb:
        raise ConfigError(f"--gpu-memory {args.gpu_memory} GiB leaves nothing after --reserve-gb {args.reserve_gb}")
    given = [f for f in RL_FLAGS if getattr(args, f) is not None]
    if given and args.stage not in RL_STAGES:
        flag = next(a.option_strings[0] for a in build_parser()._actions if a.dest == given[0])
        raise ConfigError(f"{flag} applies to --stage gspo / grpo (the online RL stages), not --stage {args.stage}")
    if args.rollout_group_size == 1:  # as pretrain_internvl.py: group-normalized advantages need two
        raise ConfigError("--rollouts-per-prompt 1: must be at least 2 (a group of one has no advantage)")


def run_config(a: argparse.Namespace, model: ModelConfig, par: ParallelConfig) -> RunConfig:
    """The run config pretrain_internvl.py builds from the same flags (every other flag at its default,
    no data source: the checks that need data or a GPU are not run), for config/problems.py's checks."""
    train = TrainConfig(
        stage=preset_stage(a.stage),
        seq_length=a.seq_length,
        global_batch_size=a.global_batch_size,
        micro_batch_size=a.micro_batch_size,
    )
    lora = LoRAConfig(lora_rank=a.lora_rank, lora_target=a.lora_target, lora_modules=list(a.lora_modules))
    return RunConfig(model=model, parallel=par, train=train, data=DataConfig(), log=LogConfig(), lora=lora)


def gib(x: float) -> str:
    return f"{x / GiB:7.1f}"


def _model(spec: str):
    """A preset, else a checkpoint directory's config (convert/source.py imports torch: only then)."""
    if spec in PRESETS:
        return get_preset(spec)
    from internvl_mcore.convert.source import resolve_model

    return resolve_model(spec)


def explicit_layout(a: argparse.Namespace) -> Layout | None:
    """The layout the flags name, or None without --tensor/--pipeline/--context-parallel sizes (search)."""
    if all(x is None for x in (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size)):
        return None
    tp = a.tensor_model_parallel_size or 1
    pp = a.pipeline_model_parallel_size or 1
    cp = a.context_parallel_size or 1
    if a.gpus % (tp * pp * cp):
        raise ConfigError(f"--gpus {a.gpus} is not divisible by TP x PP x CP = {tp * pp * cp}")
    lay = Layout(
        tp,
        pp,
        cp,
        a.gpus // (tp * pp * cp),
        sequence_parallel=a.sequence_parallel or tp > 1,
        distributed_optimizer=a.use_distributed_optimizer,
        recompute=a.recompute_granularity == "full",
        first_stage_layers=a.decoder_first_pipeline_num_layers,
        last_stage_layers=a.decoder_last_pipeline_num_layers,
        ep=a.expert_model_parallel_size or 1,
        virtual_stages=a.num_virtual_stages_per_pipeline_rank,
    )
    if a.pipeline_model_parallel_layout is None:
        return lay
    return with_pipeline_layout(lay, a.pipeline_model_parallel_layout, _model(a.model).llm.num_layers)


def in_flight(a_) -> str:
    """The activations column's note: microbatches held x GiB each, or with interleaving the
    microbatches each model chunk holds at the peak (chunk 0 carries the ViT on stage 0)."""
    if a_.chunk_in_flight:
        return "chunks " + "+".join(map(str, a_.chunk_in_flight))
    return f"{a_.in_flight} x {a_.per_microbatch / GiB:.1f}"


def print_rollout(p) -> None:
    """--stage gspo / grpo: the KV cache per stage (the 'activations' column's alternative: decoding
    ends before the training passes start, so each stage's total counts the larger) and the reference."""
    ro, w = p.workload.rollout, p.workload
    if ro is None:
        return
    rows = ro.rows(p.layout.dp)
    print(
        f"rollouts: {ro.prompts_per_step} prompts x {ro.rollouts_per_prompt} responses per step, {rows} rows per rank "
        f"decoded together, {ro.prompt_length} + {ro.max_new_tokens} tokens each; KV cache per rank: "
        + ", ".join(f"stage {s.stage} {s.kv_cache / GiB:.1f} GiB" for s in p.stages)
        + (
            "; the frozen reference model's weights are in 'params'"
            if w.reference_model
            else "; no reference model (--kl-coeff 0)"
        )
    )


def virtual_stage_options(a: argparse.Namespace) -> tuple[int, ...]:
    """Model chunks per rank the split proposal tries: 1 and 2, or 1 where pretrain_internvl.py runs
    one chunk only (config/problems.py: --stage mpo / gspo / grpo, LoRA)."""
    return (1,) if a.stage in ("mpo", *RL_STAGES) or a.lora_rank else (1, 2)


def print_split(p, title: str) -> None:
    """A plan's stage split: decoder layers and the modelled microbatch time of each stage (ViT +
    projector on stage 0, output layer and loss on the last), the flags and the predicted bubble;
    with V > 1 each chunk's time; then the per-chunk placement that evens the chunks, if better."""
    lay, c = p.layout, p.breakdown["costs"]
    times = p.breakdown["stage_times_s"]
    flags = " ".join(split_flags(lay)) or "(the even split: no flags)"
    print(f"{title}: {flags}")
    print(
        f"  per microbatch: ViT + projector {c.vision:.2f} s, decoder layer {c.layer:.3f} s, "
        f"output layer + loss {c.output:.2f} s, PP send {c.send:.3f} s"
    )
    print(
        "  stage times: "
        + ", ".join(f"stage {s.stage} ({s.decoder_layers} layers) {t:.2f} s" for s, t in zip(p.stages, times))
        + f"; slowest/fastest {max(times) / min(times):.2f}"
    )
    v, m, pp = lay.virtual_stages, p.breakdown["microbatches"], lay.pp
    if v > 1:
        print(f"  chunk times: {chunk_text(p.breakdown['chunk_times_s'])}")
    print(
        f"  predicted bubble {p.breakdown['bubble']:.1%} (megatron-core's schedule replayed on the chunk times; "
        f"equal chunks: {(pp - 1) / (v * m + pp - 1):.1%}, V={v} model chunks per rank, m={m} microbatches); "
        f"step {p.step_time_s:.1f} s, MFU {p.mfu:.1%}"
    )
    chunks = balanced_chunks(c, p.model.llm.num_layers, pp, v)
    bubble = pipeline_bubble(c.chunk_times(chunks), m)
    if chunks != layout_chunks(p.model, lay) and bubble < p.breakdown["bubble"]:
        print(
            f"  evener per-chunk placement: --pipeline-model-parallel-layout {layout_string(chunks)}: chunk times "
            f"{chunk_text(c.chunk_times(chunks))}, predicted bubble {bubble:.1%} (its memory is not planned)"
        )


def chunk_text(chunk_s: list[list[float]]) -> str:
    """Per-chunk seconds, rank by rank: "1.2+0.8 / 0.9+1.1 s"."""
    return " / ".join("+".join(f"{t:.3g}" for t in row) for row in chunk_s) + " s"


def split_flags(lay: Layout) -> list[str]:
    """The pretrain_internvl.py flags of a layout's stage split."""
    if lay.pipeline_layout is not None:
        return [f"--pipeline-model-parallel-layout {lay.pipeline_layout}"]
    return stage_split_flags(lay.first_stage_layers, lay.last_stage_layers, lay.virtual_stages)


def main(argv: list[str] | None = None) -> int:
    from internvl_mcore.cli_errors import run_cli

    return run_cli(lambda: plan_cli(argv), "plan")


def plan_cli(argv: list[str] | None) -> int:
    a = parse_args(argv)
    model = _model(a.model)
    lay = explicit_layout(a)
    # what pretrain_internvl.py refuses, with its line, before anything is printed; in search mode the
    # flags that hold for every layout (each layout found is checked below)
    check(
        run_config(
            a,
            model,
            lay.parallel()
            if lay is not None
            else ParallelConfig(expert_model_parallel_size=a.expert_model_parallel_size or 1),
        )
    )
    hw = hardware(a)
    work = workload(a)
    print_header(a, model, hw, work)
    kw = dict(budget_gib=hw.memory_gib, compute_efficiency=a.compute_efficiency, reserve_gib=a.reserve_gb)
    if lay is not None:
        return explicit_plan(a, model, lay, work, hw, kw)
    return search_plans(a, model, work, hw, kw)


def hardware(a: argparse.Namespace):
    """--gpu's datasheet figures with the flags that override them."""
    hw = HARDWARE[a.gpu]
    return type(hw)(
        hw.name,
        a.peak_tflops * 1e12 if a.peak_tflops else hw.peak_flops,
        a.gpu_memory or hw.memory_gib,
        a.nvlink_gbps * 1e9 if a.nvlink_gbps else hw.nvlink_bytes_per_s,
        a.network_gbps * 1e9 if a.network_gbps else hw.network_bytes_per_s,
        hw.gpus_per_node,
    )


def workload(a: argparse.Namespace) -> Workload:
    """The step the flags describe."""
    # under LoRA every base weight is frozen (models/lora.py: add_lora), the projector too
    trainable = {"lora"} if a.lora_rank else set(stage_parts(a.stage))
    return Workload(
        seq_length=a.seq_length,
        global_batch_size=a.global_batch_size,
        micro_batch_size=a.micro_batch_size,
        tiles_per_sequence=a.tiles_per_sequence,
        sample_length=a.sample_length,
        trainable=frozenset(trainable),
        lora_rank=a.lora_rank,
        lora_target=a.lora_target,
        lora_modules=tuple(a.lora_modules),
        bf16=not a.fp32,
        reference_model=a.stage == "mpo" or (a.stage in RL_STAGES and (a.grpo_kl_beta or 0) > 0),
        rollout=rollout(a),
    )


def print_header(a: argparse.Namespace, model: ModelConfig, hw, work: Workload) -> None:
    """The model's parameters, the GPUs and the workload."""
    counts = count_params(model)
    print(
        f"{model.name}: {counts.total / 1e9:.2f}B parameters (ViT {counts.vision / 1e9:.2f}B, projector "
        f"{counts.projector / 1e6:.1f}M, LLM {counts.llm / 1e9:.2f}B); training {', '.join(sorted(work.trainable))}"
    )
    if model.llm.is_moe:  # MFU and the FLOPs below count the active parameters only
        m = model.llm
        print(
            f"mixture of experts: {m.num_experts} experts, top-{m.moe_router_topk}: "
            f"{active_params(model).total / 1e9:.2f}B parameters active per token (FLOPs and MFU count these)"
        )
    print(
        f"{a.gpus} x {hw.name}: {hw.memory_gib:.0f} GiB each, budget {hw.memory_gib - a.reserve_gb:.0f} GiB "
        f"after {a.reserve_gb:.0f} GiB reserve; peak {hw.peak_flops / 1e12:.0f} TFLOP/s x "
        f"{a.compute_efficiency:.2f} efficiency"
    )
    print(
        f"workload: {a.global_batch_size} x {a.seq_length} tokens per step, micro batch {a.micro_batch_size}, "
        f"{work.tiles(model):.0f} tiles per sequence, {'fp32' if a.fp32 else 'bf16'}"
    )


def explicit_plan(a: argparse.Namespace, model: ModelConfig, lay: Layout, work: Workload, hw, kw: dict) -> int:
    """One layout's memory per stage, step time, split and the proposed split; 1 if it does not fit."""
    p = plan(model, lay, work, hw, **kw)
    print(f"\nlayout {lay.describe()}, {p.breakdown['microbatches']} microbatches per step\n")
    rl = p.workload.rollout is not None  # + the KV cache column; total: state + the larger of the two
    print(f"stage layers  params   grads  optimizer  activations (in flight) {' KV cache' * rl}  total   budget")
    for s in p.stages:
        a_ = s.activations
        print(
            f"{s.stage:5d} {s.decoder_layers:6d} {gib(s.state.params)} {gib(s.state.grads)}  {gib(s.state.optimizer)}"
            f"      {gib(a_.total)} ({in_flight(a_)})  {gib(s.kv_cache) * rl} {gib(s.total)}  "
            f"{p.budget_gib:5.0f}  {'fits' if s.total / GiB <= p.budget_gib else 'DOES NOT FIT'}"
        )
    print(f"\n(ViT + projector activations on stage 0: {p.stages[0].activations.vision / GiB:.1f} GiB per microbatch)")
    print_rollout(p)
    print(
        f"estimated step time {p.step_time_s:.2f} s (compute {p.compute_s:.2f} s, communication "
        f"{p.comm_s:.2f} s, pipeline bubble {p.breakdown['bubble']:.0%}), "
        f"{p.tokens_per_s:,.0f} tokens/s, MFU {p.mfu:.1%}"
    )
    if lay.pp > 1:
        print()
        print_split(p, "stage split")
        best = propose_split(model, lay, work, hw, virtual_stages=virtual_stage_options(a), **kw)
        if best is not None:
            print_split(best, "proposed split (fastest that fits)")
    return 0 if p.fits else 1


def search_plans(a: argparse.Namespace, model: ModelConfig, work: Workload, hw, kw: dict) -> int:
    """The layouts that fit, fastest first, and #1's split; 1 if none fits."""
    fixed = {} if a.expert_model_parallel_size is None else {"ep": a.expert_model_parallel_size}
    plans = search(
        model,
        a.gpus,
        work,
        hw,
        distributed_optimizer=True if a.use_distributed_optimizer else None,
        recompute=True if a.recompute_granularity else None,
        fixed=fixed,
        virtual_stages=virtual_stage_options(a),
        **kw,
    )
    plans = [p for p in plans if not problems(run_config(a, model, p.layout.parallel()))]  # pretrain would refuse
    if not plans:
        print(
            "\nno layout fits; try more GPUs, a shorter --seq-length, fewer --tiles-per-sequence, "
            "a frozen ViT (--stage finetune) or --lora-rank"
        )
        return 1
    print(f"\n{len(plans)} layouts fit, fastest first (memory: the largest rank):\n")
    print(" #  layout                                                      peak GiB  step s   MFU   tokens/s")
    for i, p in enumerate(plans[: a.top], 1):
        print(
            f"{i:2d}  {p.layout.describe():58s}  {p.peak_gib:7.1f}  {p.step_time_s:6.1f}  "
            f"{p.mfu:5.1%}  {p.tokens_per_s:9,.0f}"
        )
    if plans[0].layout.pp > 1:
        print()
        print_split(plans[0], "#1's stage split")
    return 0


if __name__ == "__main__":
    sys.exit(main())
