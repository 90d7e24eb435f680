"""Training-run configuration: optimizer/schedule, batch geometry, data, checkpoints, logging.

Field names are Megatron-LM's flag names with '_' for '-'; `config/cli.py` turns every field into a
flag whose help text is the field's docstring, so defaults and documentation live here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .lora import LoRAConfig
from .model import ModelConfig, ParallelConfig
from .rl import RLConfig


@dataclass
class TrainConfig:
    """Optimization and batch geometry."""

    micro_batch_size: int = 1
    """Packed sequences per microbatch per data-parallel rank."""
    global_batch_size: int = 1
    """Sequences per optimizer step over all data-parallel ranks (= micro x microbatches x DP)."""
    seq_length: int = 256
    """Tokens per packed sequence (packs are padded to it)."""
    train_iters: int = 10
    """Optimizer steps to run."""
    lr: Optional[float] = None
    """Peak learning rate (default: the --stage preset's, else 1e-4)."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup steps from 0 to --lr."""
    lr_decay_style: Optional[Literal["cosine", "linear", "constant"]] = None
    """Decay after warmup, down to --min-lr at --train-iters (default: the stage's, else cosine)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    seed: int = 1234
    """Seeds weights (layout-independent), mock data and dropout-like randomness."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1 style)."""
    moe_aux_loss_coeff: Optional[float] = None
    """MoE load-balancing loss coefficient per layer, summed over layers (default: the model's, which
    a converted Qwen3-MoE takes from router_aux_loss_coef; see docs/moe.md)."""
    bf16: bool = False
    """Train in bf16 with fp32 master weights (fp32 is the CPU default)."""
    loss_reduction: Literal["token", "sample", "square"] = "token"
    """InternVL's loss weighting: each target token weighs 1 (token), 1/n (sample) or 1/sqrt(n)
    (square), n = target tokens of its sample; the step minimizes sum(w*loss)/sum(w) over the batch."""
    stage: Optional[Literal["1", "1.5", "2", "finetune", "mpo", "gspo", "grpo"]] = None
    """Training-stage preset (trainable parts, lr, schedule, drop path; see STAGES); flags override it."""
    freeze_vit: Optional[bool] = None
    """Freeze the vision encoder (overrides the stage)."""
    freeze_llm: Optional[bool] = None
    """Freeze the language model (overrides the stage)."""
    freeze_projector: Optional[bool] = None
    """Freeze the projector (overrides the stage)."""
    unfreeze_vit_layers: int = 0
    """Train the last N ViT blocks even when the ViT is frozen."""
    drop_path_rate: Optional[float] = None
    """ViT stochastic-depth rate of the last block (overrides the stage)."""
    mpo_beta: float = 0.1
    """--stage mpo: DPO/BCO temperature beta on the response log-prob ratios (TRL's default, which
    InternVL's MPO scripts keep)."""
    mpo_loss_weights: list[float] = field(default_factory=lambda: [0.8, 0.2, 1.0])
    """--stage mpo: weights P Q G of the preference (DPO sigmoid), quality (BCO pair) and generation
    (SFT on the chosen response) losses; InternVL's sigmoid_loss_weight, bco_pair_loss_weight, rpo_alpha."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s per rank used for MFU (default: measured at start-up by a matmul in the training dtype: bf16
    8192^2 on GPU, fp32 1024^2 on CPU)."""
    eval_interval: int = 1000
    """Evaluate the validation loss every N iterations when validation data is given (--valid-data-path
    or --mock-valid-data); 0: only the held-out evaluation at the end of the run."""
    eval_iters: int = 100
    """Global batches per evaluation (the same batches every time, so evaluations compare); 0 disables
    validation."""
    skip_spike_factor: Optional[float] = None
    """Skip the update of a step whose loss exceeds F x the mean loss of the last 20 updated steps (from
    the 6th update on); logged, and resumed exactly from checkpoints (default: off)."""
    override_opt_param_scheduler: bool = field(default=False, metadata={"flag": "--override-opt_param-scheduler"})
    """On --load: take the LR schedule (--lr, --min-lr, --lr-warmup-iters, --train-iters,
    --lr-decay-style, --weight-decay) from the flags, not from the checkpoint (Megatron-LM's flag)."""
    use_checkpoint_opt_param_scheduler: bool = field(
        default=False, metadata={"flag": "--use-checkpoint-opt_param-scheduler"}
    )
    """On --load: keep the checkpoint's LR schedule even where the flags differ (Megatron-LM's flag).
    Without either flag a resume whose schedule flags differ from the checkpoint's is refused."""
    distributed_timeout_minutes: float = 10.0
    """Timeout of every collective (Megatron-LM's flag): a rank that died or hangs makes the others
    stop with an error after this long instead of waiting forever."""


@dataclass(frozen=True)
class StagePreset:
    """What a training stage trains and how (InternVL's recipe; explicit flags override)."""

    train_vit: bool
    """The vision encoder gets gradients."""
    train_projector: bool
    """The projector gets gradients."""
    train_llm: bool
    """The language model gets gradients."""
    lr: float
    """Peak learning rate."""
    lr_decay_style: str = "cosine"
    """Schedule after warmup."""
    drop_path_rate: float = 0.0
    """ViT drop-path rate of the last block."""


STAGES: dict[str, StagePreset] = {
    "1": StagePreset(train_vit=False, train_projector=True, train_llm=False, lr=2e-4),
    "1.5": StagePreset(train_vit=True, train_projector=True, train_llm=True, lr=1e-5),
    "2": StagePreset(train_vit=True, train_projector=True, train_llm=True, lr=4e-5, drop_path_rate=0.1),
    "finetune": StagePreset(train_vit=False, train_projector=True, train_llm=True, lr=2e-5),
    # InternVL 3.0/3.5 MPO scripts: everything trains, lr 2e-7, cosine, drop path 0.1; the loss is
    # training/mpo.py's (preference data from tools/preprocess_mm_data.py --preference)
    "mpo": StagePreset(train_vit=True, train_projector=True, train_llm=True, lr=2e-7, drop_path_rate=0.1),
    # online RL (training/rl/stage.py): no drop path, so the policy's log-probs are deterministic and
    # the first update's importance ratios are exactly 1; constant lr (one step per rollout batch)
    "gspo": StagePreset(train_vit=True, train_projector=True, train_llm=True, lr=1e-6, lr_decay_style="constant"),
    "grpo": StagePreset(train_vit=True, train_projector=True, train_llm=True, lr=1e-6, lr_decay_style="constant"),
}


DEFAULT_LR = 1e-4
"""Peak learning rate without --lr and --stage."""


@dataclass(frozen=True)
class Plan:
    """What this run trains and with which schedule, after --stage and the explicit flags."""

    train_vit: bool
    train_projector: bool
    train_llm: bool
    unfreeze_vit_layers: int
    lr: float
    lr_decay_style: str
    drop_path_rate: float


def trained_parts(train: TrainConfig) -> tuple[bool, bool, bool, float]:
    """(ViT, projector, LLM trained, drop-path rate): --stage's, each overridden by an explicit flag."""
    stage = STAGES[train.stage] if train.stage else None

    def trains(frozen_flag: Optional[bool], stage_trains: bool) -> bool:  # --freeze-X / --no-freeze-X wins
        if frozen_flag is not None:
            return not frozen_flag
        return stage_trains if stage is not None else True

    drop_path = (
        train.drop_path_rate
        if train.drop_path_rate is not None
        else (stage.drop_path_rate if stage is not None else 0.0)
    )
    return (
        trains(train.freeze_vit, stage is not None and stage.train_vit),
        trains(train.freeze_projector, stage is not None and stage.train_projector),
        trains(train.freeze_llm, stage is not None and stage.train_llm),
        drop_path,
    )


def resolve_stage(train: TrainConfig) -> Plan:
    """Combine --stage with the explicit flags (their contradictions: config/problems.py)."""
    stage = STAGES[train.stage] if train.stage else None
    train_vit, train_projector, train_llm, drop_path = trained_parts(train)
    lr = train.lr if train.lr is not None else (stage.lr if stage is not None else DEFAULT_LR)
    decay = train.lr_decay_style or (stage.lr_decay_style if stage is not None else "cosine")
    return Plan(
        train_vit=train_vit,
        train_projector=train_projector,
        train_llm=train_llm,
        unfreeze_vit_layers=train.unfreeze_vit_layers,
        lr=lr,
        lr_decay_style=decay,
        drop_path_rate=drop_path,
    )


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: Optional[str] = None
    """Directory to write checkpoints to (iter_NNNNNNN/ + latest_checkpointed_iteration.txt)."""
    load: Optional[str] = None
    """Resume from the latest checkpoint in this directory (model, optimizer, schedule, RNG, data),
    checked against its checksums (falling back to the previous one, see --no-fallback), or from
    exactly the iter_NNNNNNN directory given."""
    save_interval: int = 0
    """Save every N iterations (0: only at the end when --save is given)."""
    exit_interval: int = 0
    """Stop after an iteration divisible by N (saving first when --save is given)."""
    exit_signal_handler: bool = False
    """On SIGTERM (a scheduler's preemption or time limit), finish the current step on every rank,
    save a checkpoint (with --save) and exit 0; without it SIGTERM stops the run at once (exit 143)."""
    async_save: bool = False
    """Write checkpoints in the background (megatron-core's async torch_dist save): the saving step
    only copies this rank's tensors into shared memory and hands them to its writer process (spawned,
    one per rank), and training goes on. A checkpoint is checksummed and published (tmp_iter_ renamed,
    the tracker advanced) once every rank's writer has finished: at a later step, at the latest before
    the next save and before the run ends. The same files as a synchronous save; a write that fails or
    does not finish within --distributed-timeout-minutes stops every rank with one line."""
    pretrained: Optional[str] = None
    """Start from these weights only: a training checkpoint directory, a converted checkpoint
    (tools/convert_from_hf.py) or an HF checkpoint directory in either layout (converted while loading)."""
    no_load_optim: bool = False
    """With --load: take model weights, iteration and data position, but fresh optimizer state."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints under --save, deleting older ones after each save (0: keep all)."""
    no_fallback: bool = False
    """With --load: refuse (naming the file) when the latest checkpoint fails its checksums, instead of
    falling back to the newest complete one with a warning."""
    overwrite_checkpoints: bool = False
    """Let a new run write into a --save that holds another run's checkpoints: they are deleted at
    start-up (without it such a --save is refused unless --load resumes from it)."""


@dataclass
class DataConfig:
    """Where training samples come from."""

    mock_data: bool = False
    """Train on generated batches (images + tokens) that depend only on --seed."""
    data_path: list[str] = field(default_factory=list)
    """Shard prefixes from tools/preprocess_mm_data.py, optionally weighted: [W1] P1 [W2] P2 ..."""
    no_verify_shards: bool = False
    """Skip the start-up sha256 check of every shard file against its manifest (file sizes are still
    checked). The hashing is split over the job's ranks; skip it only for sets too large to hash at
    every start, after one `tools/inspect_shards.py PREFIX --verify`."""
    mock_tiles_per_sample: int = 2
    """Mock data: image tiles per sample."""
    num_workers: int = 1
    """Processes that decode shard images ahead of the training step (0: decode in the training
    process). The batches and the resume point do not depend on it."""
    balance_dp_compute: bool = False
    """Deal each global batch's packs to the data-parallel ranks and microbatches by their estimated
    compute (the planner's FLOP model of each pack's tiles, tokens and segment lengths) instead of in
    stream order, so ranks wait less for each other at the gradient reduction. The global batch, and
    so the loss, stays the same; the resume point too (checkpoints move between runs with and without)."""
    data_worker_timeout: float = 300.0
    """Seconds a loader worker may take to start, and then to return each pack; past it, or when a worker
    dies (e.g. killed for memory), training stops with one line naming the worker and the pack instead
    of waiting forever (the default stays well inside --distributed-timeout-minutes' 10)."""
    image_tiling: Literal["auto", "loader", "device"] = "auto"
    """Where images stored once ("source" shards) are resized and cut into tiles: 'loader' (Pillow, in
    the loader workers), 'device' (the loader only decodes; the first pipeline stage tiles on its device
    with an exact re-implementation of Pillow's bicubic resize: the same tiles, bytes and losses), 'auto'
    (device when training on CUDA, else loader)."""
    valid_data_path: list[str] = field(default_factory=list)
    """Validation shard prefixes, weighted as --data-path: [W1] P1 [W2] P2 ..."""
    mock_valid_data: bool = False
    """With --mock-data: validate on generated batches of another seed than the training batches."""


@dataclass
class LogConfig:
    """What is reported and where."""

    log_interval: int = 1
    """Print a line every N iterations."""
    log_jsonl: Optional[str] = None
    """Append one JSON object per iteration (iteration, loss, lr, grad_norm, tokens_per_s, ...)."""
    tensorboard_dir: Optional[str] = None
    """Write tensorboard scalars here."""
    log_straggler: bool = False
    """Every --log-interval, print each rank's step and data-loading time, its compute (forward and
    backward), its waiting (pipeline: the rest of megatron-core's schedule; gradient reduction) and
    the other rest of the step as min / max with their ranks, and the largest share of the step a
    rank spent waiting; --log-jsonl gets every rank's times."""
    wandb_project: Optional[str] = None
    """Log the same scalars to this Weights & Biases project (needs the wandb package; WANDB_MODE=offline
    works without a network)."""
    wandb_exp_name: Optional[str] = None
    """Weights & Biases run name."""
    wandb_save_dir: Optional[str] = None
    """Directory for Weights & Biases' local files (default: wandb's)."""


@dataclass(frozen=True)
class ComputeConfig:
    """Device, kernels and loss chunking: where and how each rank computes.

    None of them changes the parallel layout or a result beyond rounding."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """--device: cuda when available; auto refuses a GPU-looking machine without CUDA (use cpu to force the CPU
    path; docs/gpu.md)."""
    torch_compile: bool = False
    """--torch-compile: on CPU too, use megatron-core's torch.compile'd (inductor) elementwise fusions (SwiGLU,
    bias-dropout-add), as on GPUs with TE/apex; the first step compiles them (~1 min, then cached on disk)."""
    cross_entropy_chunk_size: int = 0
    """--cross-entropy-chunk-size: compute the output layer and loss N tokens at a time, never holding the full fp32
    logits (the backward recomputes each chunk's logits); 0: megatron-core's full-logit loss."""
    all_token_logits: bool = False
    """--all-token-logits: compute the output layer and loss for every token, as megatron-core does; by default the
    last stage computes them only at the tokens that carry loss (the others' losses are zero and never used), which
    skips the image and prompt tokens' share of the output-layer GEMMs and logit memory."""


DEFAULT_COMPUTE = ComputeConfig()
"""The defaults (model code built outside a run: tests, conversions on the CPU give device="cpu")."""


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig
    """The model (from --model and overrides)."""
    parallel: ParallelConfig
    """Parallel layout."""
    train: TrainConfig
    """Optimization."""
    data: DataConfig
    """Data source."""
    log: LogConfig
    """Reporting."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (off unless --lora-rank > 0; config/lora.py)."""
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    """Device, kernels and the loss's chunking."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Online RL (--stage gspo / grpo; config/rl.py)."""


def has_validation(run: RunConfig) -> bool:
    """Validation data given and --eval-iters > 0."""
    return run.train.eval_iters > 0 and bool(run.data.valid_data_path or run.data.mock_valid_data)
