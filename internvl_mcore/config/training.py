"""Training-run configuration: optimizer/schedule, batch geometry, data, checkpoints, logging.

Field names are Megatron-LM's flag names with '_' for '-'; `config/cli.py` turns every field into a
flag whose help text is the field's docstring, so defaults and documentation live here only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .model import ModelConfig, ParallelConfig


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
    lr: float = 1e-4
    """Peak learning rate (a --stage preset sets its own unless given)."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup steps from 0 to --lr."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to --min-lr at --train-iters."""
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
    bf16: bool = False
    """Train in bf16 with fp32 master weights (fp32 is the CPU default)."""
    loss_reduction: Literal["token", "sample", "square"] = "token"
    """InternVL loss averaging: over all target tokens, per sample then mean, or 1/sqrt(len) weights."""


@dataclass
class DataConfig:
    """Where training samples come from."""

    mock_data: bool = False
    """Train on generated batches (images + tokens) that depend only on --seed."""
    data_path: list[str] = field(default_factory=list)
    """Shard prefixes from tools/preprocess_mm_data.py, optionally weighted: [W1] P1 [W2] P2 ..."""
    mock_tiles_per_sample: int = 2
    """Mock data: image tiles per sample."""


@dataclass
class LogConfig:
    """What is reported and where."""

    log_interval: int = 1
    """Print a line every N iterations."""
    log_jsonl: Optional[str] = None
    """Append one JSON object per iteration (iteration, loss, lr, grad_norm, tokens_per_s, ...)."""
    tensorboard_dir: Optional[str] = None
    """Write tensorboard scalars here."""


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
