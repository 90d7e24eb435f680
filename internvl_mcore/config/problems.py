"""Every check of a run's flags, in one place: `problems(run)` lists each setting or combination of
the parsed config that cannot run, as one line naming the flag(s); `check(run)` raises `ConfigError`
with all of them at once. pretrain_internvl.py runs it right after parsing, before any data is
hashed, any process group exists or megatron-core is imported; `training/loop.py: validate` runs it
again for callers of `train` that skip the entry point; tools/plan.py runs `problems` on the run config
its flags make (so the planner refuses a layout with pretrain's line). Pure: it reads the config only
(no files, no environment, no process group).
"""

from __future__ import annotations

from typing import Mapping, Optional

from ..errors import ConfigError
from . import pipeline_layout
from .lora import LORA_MODULES, LoRAConfig
from .model import ModelConfig, ParallelConfig, virtual_pipeline_size
from .rl import rl_stage_problems
from .training import RunConfig, TrainConfig, has_validation, trained_parts


def problems(run: RunConfig) -> list[str]:
    """Why this run config cannot run, one line per problem naming the flag(s) (empty: it can).

    Checked elsewhere, because the fact they need is not in the config:
    - each number's own domain (`--seq-length 0`, `--lr nan`): config/domains.py, while parsing;
    - a flag given without the flag it acts with (`--keep-checkpoints` without `--save`):
      config/needs.py, while parsing (it needs which flags the command line gave, not their values);
    - `--global-batch-size` divisible by micro batch x data-parallel size: training/loop.py `setup`,
      once the launcher's world size and the process groups give the data-parallel size;
    - `--save`, `--log-jsonl` and `--tensorboard-dir` writable and the wandb package installed for
      `--wandb-project`: training/loop.py `validate` (the file system and the Python environment, not
      the flags);
    - the shard sets' files, manifests, token ids and checksums: training/shard_checks.py `check_shard_sets`;
      the checkpoint under `--load` / `--pretrained` and its schedule: training/checkpoint.py and
      training/schedule.py, when it is read;
    - `--image-tiling device` with a Pillow that resizes differently: training/data.py (the installed Pillow).
    """
    t = run.train
    return [
        *layout_problems(run.model, run.parallel, t.seq_length),
        *virtual_pipeline_problems(run.model.llm.num_layers, run.parallel, t.stage, run.lora.enabled),
        *run_problems(run),
        *mpo_problems(run),
        *rl_stage_problems(run),
        *eval_problems(run),
        *guard_problems(run),
        *stage_problems(t, run.model.vision.num_layers),
        *moe_problems(run.model, run.parallel),
        *lora_problems(
            run.lora, {"vit": t.freeze_vit, "llm": t.freeze_llm, "projector": t.freeze_projector}, t.unfreeze_vit_layers
        ),
        *special_id_problems(run.model),
        *data_problems(run),
    ]


def refusal(found: list[str]) -> str:
    """The message of a refused run: one problem on the line, several indented below it."""
    if len(found) == 1:
        return f"refusing to start: {found[0]}"
    return "refusing to start:\n  " + "\n  ".join(found)


def check(run: RunConfig) -> None:
    """Raise ConfigError listing every problem of `run` (see `problems`)."""
    if found := problems(run):
        raise ConfigError(refusal(found))


def layout_problems(model: ModelConfig, p: ParallelConfig, seq_length: int) -> list[str]:
    """The tensor / context-parallel layout flags that cannot carry this model and sequence length."""
    found = []
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        found.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    cp = p.context_parallel_size
    if cp > 1 and seq_length % (2 * cp):
        found.append(f"--seq-length {seq_length} must be divisible by 2 x --context-parallel-size = {2 * cp}")
    if cp > 1 and p.cp_comm_type == "a2a+p2p":
        sizes = p.hierarchical_context_parallel_sizes
        if not sizes or len(sizes) != 2 or sizes[0] * sizes[1] != cp:
            found.append(f"--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes A P with A x P = {cp}")
    if cp > 1 and p.cp_comm_type in ("a2a", "a2a+p2p"):
        a = cp if p.cp_comm_type == "a2a" else (p.hierarchical_context_parallel_sizes or [cp])[0]
        tp = p.tensor_model_parallel_size
        for what, heads in (("heads", model.llm.num_attention_heads), ("kv heads", model.llm.num_query_groups)):
            if (heads // tp) % a:
                found.append(
                    f"--cp-comm-type {p.cp_comm_type}: {what} per TP rank ({heads // tp}) not divisible "
                    f"by the all-to-all size {a}"
                )
    if cp > 1 and p.cp_split == "thd":
        found += thd_problems(p.pipeline_model_parallel_size, p.sequence_parallel, p.cp_comm_type)
    if p.hierarchical_context_parallel_sizes and p.cp_comm_type != "a2a+p2p":
        found.append("--hierarchical-context-parallel-sizes only applies to --cp-comm-type a2a+p2p")
    return found


def virtual_pipeline_problems(
    num_layers: int, p: ParallelConfig, stage: Optional[str] = None, lora: bool = False
) -> list[str]:
    """The interleaved (virtual) pipeline flags that cannot split this decoder: every model chunk of
    a stage holds the same number of layers (megatron-core's offsets assume it), and what does not
    run the chunks yet."""
    per_stage, chunks = p.num_layers_per_virtual_pipeline_stage, p.num_virtual_stages_per_pipeline_rank
    if p.pipeline_model_parallel_layout is not None:
        return pipeline_layout_problems(num_layers, p, stage, lora)
    if per_stage is None and chunks is None:
        return []
    name = (
        "--num-layers-per-virtual-pipeline-stage" if per_stage is not None else "--num-virtual-stages-per-pipeline-rank"
    )
    pp, first, last = (
        p.pipeline_model_parallel_size,
        p.decoder_first_pipeline_num_layers,
        p.decoder_last_pipeline_num_layers,
    )
    if per_stage is not None and chunks is not None:
        return ["give one of --num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank"]
    if pp < 2:
        return [f"{name} needs --pipeline-model-parallel-size > 1"]
    if per_stage is not None and (first is not None or last is not None):
        return [f"{name} with --decoder-first/last-pipeline-num-layers: use --num-virtual-stages-per-pipeline-rank"]
    v = virtual_pipeline_size(p, num_layers) or 1
    middle = num_layers - (first or 0) - (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    found = [
        f"{what} {n} is not divisible by the {v} virtual stages per pipeline rank ({name})"
        for what, n in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last))
        if n is not None and n % v
    ]
    if middle_stages and middle % (middle_stages * v):
        found.append(
            f"{name}: {middle} decoder layers do not split evenly into {middle_stages} pipeline stages x {v} "
            "model chunks"
        )
    if stage in ("mpo", "gspo", "grpo") or lora:
        found.append(f"{name} does not run {f'--stage {stage}' if not lora else 'LoRA'} yet (one model chunk per rank)")
    return found


def pipeline_layout_problems(num_layers: int, p: ParallelConfig, stage: Optional[str], lora: bool) -> list[str]:
    """--pipeline-model-parallel-layout: the other split flags it replaces (megatron-core refuses them
    together), and a layout this model and pipeline size cannot build (config/pipeline_layout.py)."""
    flag, pp = pipeline_layout.FLAG, p.pipeline_model_parallel_size
    others = [
        name
        for name, value in (
            ("--decoder-first-pipeline-num-layers", p.decoder_first_pipeline_num_layers),
            ("--decoder-last-pipeline-num-layers", p.decoder_last_pipeline_num_layers),
            ("--num-layers-per-virtual-pipeline-stage", p.num_layers_per_virtual_pipeline_stage),
            ("--num-virtual-stages-per-pipeline-rank", p.num_virtual_stages_per_pipeline_rank),
        )
        if value is not None
    ]
    if others:
        return [f"{flag} places every layer itself: drop {', '.join(others)}"]
    if pp < 2:
        return [f"{flag} needs --pipeline-model-parallel-size > 1"]
    try:
        pipeline_layout.check(p.pipeline_model_parallel_layout or "", pp, num_layers)
    except ConfigError as e:
        return [str(e)]
    if pipeline_layout.virtual_size(p.pipeline_model_parallel_layout or "", pp) > 1 and (
        stage in ("mpo", "gspo", "grpo") or lora
    ):
        return [f"{flag} with several chunks per rank does not run {f'--stage {stage}' if not lora else 'LoRA'} yet"]
    return []


def thd_problems(pipeline: int, sequence_parallel: bool, cp_comm_type: str) -> list[str]:
    """Flag combinations the 'thd' CP split (parallel/context_parallel_thd.py) does not support."""
    found = []
    if pipeline > 1:
        found.append(
            "--cp-split thd: the local token count varies per microbatch (per-sample padding), "
            "which pipeline parallelism's fixed activation shapes cannot carry; use "
            "--pipeline-model-parallel-size 1 or --cp-split row"
        )
    if sequence_parallel:
        found.append(
            "--cp-split thd does not combine with --sequence-parallel (the local token count "
            "need not divide by the TP size); use --cp-split row"
        )
    if cp_comm_type != "p2p":
        found.append(f"--cp-split thd runs TE's context parallelism with --cp-comm-type p2p only, got {cp_comm_type!r}")
    return found


def run_problems(run: RunConfig) -> list[str]:
    """Schedule, batch, loss, checkpoint and data-source flags that contradict each other."""
    t, c = run.train, run.checkpoint
    found = []
    if t.lr_warmup_iters > t.train_iters:
        found.append(f"--lr-warmup-iters {t.lr_warmup_iters} exceeds --train-iters {t.train_iters}")
    if c.load and c.pretrained:
        found.append("--load resumes a run and --pretrained starts one: give one of them")
    if c.save_interval and not c.save:
        found.append("--save-interval needs --save DIR")
    if run.data.mock_data and run.data.data_path:
        found.append("--mock-data and --data-path exclude each other")
    if run.compute.cross_entropy_chunk_size < 0:
        found.append(
            f"--cross-entropy-chunk-size must be >= 0 (0: no chunking), got {run.compute.cross_entropy_chunk_size}"
        )
    if t.micro_batch_size < 1 or t.global_batch_size < t.micro_batch_size:
        found.append(
            f"--global-batch-size {t.global_batch_size} must be >= --micro-batch-size {t.micro_batch_size} >= 1"
        )
    return found


def mpo_problems(run: RunConfig) -> list[str]:
    """Flags --stage mpo cannot work with (and MPO flags without it)."""
    t = run.train
    if t.stage != "mpo":
        changed = t.mpo_beta != 0.1 or list(t.mpo_loss_weights) != [0.8, 0.2, 1.0]
        return ["--mpo-beta / --mpo-loss-weights apply to --stage mpo only"] if changed else []
    found = []
    if len(t.mpo_loss_weights) != 3 or min(t.mpo_loss_weights) < 0:
        found.append(f"--mpo-loss-weights takes three weights P Q G >= 0, got {t.mpo_loss_weights}")
    if not t.mpo_beta > 0:
        found.append(f"--mpo-beta must be > 0, got {t.mpo_beta}")
    if t.loss_reduction != "token":
        found.append("--loss-reduction does not apply to --stage mpo (its loss is a mean over pairs)")
    if run.data.mock_data:
        found.append(
            "--stage mpo needs preference shards (--data-path from tools/preprocess_mm_data.py "
            "--preference); --mock-data has no pairs"
        )
    return found


def eval_problems(run: RunConfig) -> list[str]:
    """Validation flags (training/eval.py) that cannot work together."""
    d, t = run.data, run.train
    found = []
    if d.mock_valid_data and not d.mock_data:
        found.append("--mock-valid-data needs --mock-data (use --valid-data-path for shards)")
    if d.mock_valid_data and d.valid_data_path:
        found.append("--mock-valid-data and --valid-data-path exclude each other")
    if t.eval_interval < 0 or t.eval_iters < 0:
        found.append(f"--eval-interval {t.eval_interval} and --eval-iters {t.eval_iters} must be >= 0")
    if has_validation(run) and t.stage == "mpo":
        found.append("validation (--valid-data-path / --mock-valid-data) is not implemented for --stage mpo")
    return found


def guard_problems(run: RunConfig) -> list[str]:
    """The long-run flags (training/guards.py, schedule.py, checkpoint retention) that cannot work."""
    t, c = run.train, run.checkpoint
    found = []
    if t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler:
        found.append("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")
    if t.skip_spike_factor is not None and not t.skip_spike_factor > 0:
        found.append(f"--skip-spike-factor must be > 0, got {t.skip_spike_factor}")
    if not t.distributed_timeout_minutes > 0:
        found.append(f"--distributed-timeout-minutes must be > 0, got {t.distributed_timeout_minutes}")
    if c.keep_checkpoints < 0:
        found.append(f"--keep-checkpoints must be >= 0, got {c.keep_checkpoints}")
    return found


def stage_problems(train: TrainConfig, vit_layers: int) -> list[str]:
    """--stage with the explicit freezing / drop-path flags: contradictions (config/training.py: resolve_stage)."""
    train_vit, train_projector, train_llm, drop_path = trained_parts(train)
    n = train.unfreeze_vit_layers
    found = []
    if n < 0 or n > vit_layers:
        found.append(f"--unfreeze-vit-layers {n} must be in [0, {vit_layers}]")
    if n and train_vit:
        found.append(
            "--unfreeze-vit-layers only makes sense with a frozen ViT (--freeze-vit or a stage that freezes it)"
        )
    if not (train_vit or train_projector or train_llm or n):
        found.append(
            "nothing to train: --freeze-vit, --freeze-projector and --freeze-llm (or the stage) freeze every part"
        )
    if drop_path > 0 and not (train_vit or n):
        found.append(
            f"--drop-path-rate {drop_path} (or the stage's) is for training the ViT, but the "
            "ViT is frozen; drop it or unfreeze the ViT"
        )
    return found


def moe_problems(model: ModelConfig, par: ParallelConfig) -> list[str]:
    """Flag combinations an MoE (or expert-parallel) run cannot use."""
    m, ep, etp = model.llm, par.expert_model_parallel_size, par.expert_tensor_parallel_size
    found = []
    if (ep > 1 or etp not in (None, par.tensor_model_parallel_size)) and not m.is_moe:
        found.append(
            f"--expert-model-parallel-size / --expert-tensor-parallel-size need an MoE model; {model.name} is dense"
        )
    if m.is_moe and (problem := expert_split_problem(model, ep)):
        found.append(problem)
    if m.is_moe and par.tensor_model_parallel_size > 1 and not par.sequence_parallel:
        found.append(
            "an MoE model with --tensor-model-parallel-size > 1 needs --sequence-parallel "
            "(megatron-core's MoE layer refuses TP without it)"
        )
    return found


def expert_split_problem(model: ModelConfig, ep: int) -> Optional[str]:
    """Why an MoE model's experts cannot be split over `ep` ranks, or None (the planner asks too)."""
    n = model.llm.num_experts
    return f"--expert-model-parallel-size {ep} does not divide the {n} experts of {model.name}" if n % ep else None


def lora_problems(
    lora: LoRAConfig, freeze_overrides: Mapping[str, Optional[bool]], unfreeze_vit_layers: int
) -> list[str]:
    """Why these LoRA flags cannot work. `freeze_overrides`: the explicit
    --freeze-vit/--freeze-llm/--freeze-projector values (None where not given)."""
    found = []
    if lora.lora_rank < 0:
        found.append(f"--lora-rank {lora.lora_rank} must be >= 0")
    if not lora.enabled:
        return found
    if not 0.0 <= lora.lora_dropout < 1.0:
        found.append(f"--lora-dropout {lora.lora_dropout} must be in [0, 1)")
    if lora.lora_alpha is not None and lora.lora_alpha <= 0:
        found.append(f"--lora-alpha {lora.lora_alpha} must be > 0")
    unknown = [m for m in lora.lora_modules if m not in LORA_MODULES]
    if unknown or not lora.lora_modules:
        found.append(f"--lora-modules {' '.join(lora.lora_modules)}: choose from {' '.join(LORA_MODULES)}")
    # LoRA trains adapters only; a base part trained in full alongside would be lost by --lora-only
    # exports and makes "only adapters change" false, so it is refused rather than half-supported
    trained = [f"--no-freeze-{part}" for part, frozen in freeze_overrides.items() if frozen is False]
    if unfreeze_vit_layers:
        trained.append(f"--unfreeze-vit-layers {unfreeze_vit_layers}")
    if trained:
        found.append(
            f"{', '.join(trained)} would train base weights, but with --lora-rank every base "
            "weight is frozen and only the adapters train"
        )
    return found


def special_id_problems(cfg: ModelConfig) -> list[str]:
    """The model's special-token ids outside its vocabulary: the embedding would be indexed past its
    rows (an IndexError deep in the first step) by the packs' padding and image tokens (mock data too)."""
    vocab = cfg.llm.vocab_size
    bad = [
        f"{field}={getattr(cfg, field)} is outside the vocabulary of {vocab} rows (model --model {cfg.name})"
        for field in ("img_context_token_id", "img_start_token_id", "img_end_token_id", "pad_token_id")
        if not 0 <= getattr(cfg, field) < vocab
    ]
    return ["--model: special-token id " + "; ".join(bad)] if bad else []


def data_problems(run: RunConfig) -> list[str]:
    """The loader's own numbers (training/data.py), whatever the data source."""
    d = run.data
    found = []
    if not d.data_worker_timeout > 0:  # (nan too)
        found.append(f"--data-worker-timeout must be a number of seconds > 0, got {d.data_worker_timeout}")
    if d.num_workers < 0:
        found.append(f"--num-workers must be >= 0, got {d.num_workers}")
    if d.balance_dp_compute and d.mock_data:  # mock batches are generated per rank, not dealt
        found.append("--balance-dp-compute deals shard packs (--data-path); it does nothing with --mock-data")
    return found
