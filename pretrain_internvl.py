"""Train an InternVL model with tensor/pipeline/data parallelism on megatron-core.

    torchrun --nproc_per_node 4 pretrain_internvl.py --model debug --mock-data \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --global-batch-size 4 --train-iters 5 --log-jsonl run.jsonl

    # fine-tune a released checkpoint: its shape, special tokens and weights come from the directory
    torchrun --nproc_per_node 8 pretrain_internvl.py --model HF_DIR --pretrained HF_DIR --data-path ...

Flags follow Megatron-LM's names; `--help` lists them with their defaults and meaning.
"""

from __future__ import annotations

import argparse
import os
import sys

from internvl_mcore.config import ParallelConfig
from internvl_mcore.config.cli import add_dataclass_flags, build_dataclass, explicit_dests
from internvl_mcore.config.domains import OneLineParser, declare_domains
from internvl_mcore.config.presets import PRESETS
from internvl_mcore.config.problems import check as check_config
from internvl_mcore.config.lora import LoRAConfig
from internvl_mcore.config.needs import ignored_flags
from internvl_mcore.config.rl import RL_STAGES, RLConfig, add_rl_flags
from internvl_mcore.config.training import (
    CheckpointConfig,
    ComputeConfig,
    DataConfig,
    LogConfig,
    RunConfig,
    TrainConfig,
)
from internvl_mcore.errors import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="debug",
        metavar="PRESET|DIR",
        help="The model: a preset name (" + ", ".join(PRESETS) + ") or a checkpoint directory "
        "whose config it carries: an HF checkpoint (transformers' or InternVL's layout, read "
        "as tools/convert_from_hf.py reads it), a converted checkpoint or a training "
        "checkpoint (default: debug)",
    )
    add_dataclass_flags(parser, ParallelConfig, "parallelism")
    add_dataclass_flags(parser, ComputeConfig, "device and kernels")
    add_dataclass_flags(parser, TrainConfig, "training")
    add_dataclass_flags(parser, DataConfig, "data")
    add_dataclass_flags(parser, LogConfig, "logging")
    add_dataclass_flags(parser, CheckpointConfig, "checkpointing")
    add_dataclass_flags(parser, LoRAConfig, "LoRA")
    add_rl_flags(parser)
    return declare_domains(parser)  # every number checked against its domain as it is parsed


def parse_run_config(argv: list[str]) -> RunConfig:
    """Flags -> RunConfig; contradictory combinations are refused naming the flags."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.mock_data and not ns.data_path:
        parser.error("give --data-path PREFIX [...] or --mock-data")
    ignored = ignored_flags(parser, ns, explicit_dests(parser, argv))
    if ignored:  # a flag that would silently change nothing (config/needs.py)
        parser.error("refusing to start: " + "; ".join(ignored))
    try:
        model = PRESETS.get(ns.model) or _model_from_dir(ns.model)
    except ConversionError as exc:
        parser.error(str(exc))
    return RunConfig(
        model=model,
        parallel=build_dataclass(ParallelConfig, ns),
        train=build_dataclass(TrainConfig, ns),
        data=build_dataclass(DataConfig, ns),
        log=build_dataclass(LogConfig, ns),
        checkpoint=build_dataclass(CheckpointConfig, ns),
        lora=build_dataclass(LoRAConfig, ns),
        compute=build_dataclass(ComputeConfig, ns),
        rl=build_dataclass(RLConfig, ns),
    )


def _model_from_dir(spec: str):
    """--model naming a checkpoint directory (convert/source.py). Its readers import torch, so a preset
    run's flag and config errors (config/problems.py) stay an interpreter start (~0.1 CPU-s)."""
    from internvl_mcore.convert.source import resolve_model

    return resolve_model(spec)


def check_environment(run: RunConfig) -> None:
    """Refuse what the flags name that this machine lacks (training/preflight.py: --save, --log-jsonl,
    --tensorboard-dir writable, the wandb package) in one line, before torch's import."""
    from internvl_mcore.config.problems import refusal
    from internvl_mcore.errors import ConfigError
    from internvl_mcore.training.preflight import environment_problems

    if found := environment_problems(run):
        raise ConfigError(refusal(found))


def check_data(run: RunConfig) -> None:
    """Refuse bad shard sets before any process group or model exists (one line, exit 2): every rank
    checks the prefixes, sizes and token ids, and hashes its share of the files (training/shard_checks.py,
    which imports no torch: an error in the manifests costs no torch import)."""
    if not (run.data.data_path or run.data.valid_data_path):
        return
    from internvl_mcore.training.shard_checks import check_shard_sets

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if run.train.stage in RL_STAGES:  # prompts, not training shards (training/rl/prompts.py)
        from internvl_mcore.training.rl.prompts import open_prompts

        open_prompts(run.data.data_path[0])
        return
    if run.data.data_path:
        check_shard_sets(run.data.data_path, run, rank=rank, world=world)
    if run.data.valid_data_path:
        check_shard_sets(run.data.valid_data_path, run, flag="--valid-data-path", rank=rank, world=world)


def _rollout_sampler(run: RunConfig):
    """--stage gspo / grpo: the rollouts' generation side, which training/ may not import (inference/
    sits above it); None for the other stages."""
    if run.train.stage not in RL_STAGES:
        return None
    from internvl_mcore.inference.rollout import RolloutSampler

    return RolloutSampler(run.rl.tokenizer_model, run.model)


def _exit(code: int, message: str | None) -> None:
    """Print the one line and leave. Once the process group exists, without interpreter shutdown:
    gloo's threads abort a normal exit ("terminate called ...", exit -6) and a clean shutdown would
    wait for peers that may be gone. The worker processes megatron-core's checkpoint writer spawned
    are ended first: orphaned, they would keep the job's output pipes open. torch is not imported here:
    a signal during `import torch` lands here with torch half-loaded, and importing it again raised."""
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
    dist = sys.modules.get("torch.distributed")
    is_initialized = getattr(dist, "is_initialized", None)
    if is_initialized is not None and dist.is_available() and is_initialized():
        from internvl_mcore.training import preemption

        preemption.end_helpers()
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _interrupted() -> None:
    print("interrupted (Ctrl-C); checkpoints already saved are complete", file=sys.stderr, flush=True)
    _exit(130, None)


def _terminated() -> None:
    print(
        "terminated (SIGTERM); checkpoints already saved are complete (--exit-signal-handler saves one first)",
        file=sys.stderr,
        flush=True,
    )
    _exit(143, None)


def main(argv: list[str] | None = None) -> None:
    """Exit 2 with one line for a user error (a UserError: flags, data, checkpoint); 1 with one line
    when the run diverged (NaN / Inf) or lost a rank; 130 on Ctrl-C; 143 on SIGTERM (0 after the
    checkpoint --exit-signal-handler saves); other exceptions are bugs and keep their traceback
    (INTERNVL_MCORE_TRACEBACK=1: a user error's too)."""
    from internvl_mcore.cli_errors import quiet_optional_gpu_libraries, user_error_line
    from internvl_mcore.errors import SaveDirRefused, UserError
    from internvl_mcore.training import preemption

    preemption.install(exit_signal_handler=False)
    quiet_optional_gpu_libraries()
    try:
        run = parse_run_config(sys.argv[1:] if argv is None else argv)
        check_config(run)  # every problem of the flags at once (config/problems.py), before the data's hashing
        check_environment(run)  # an unwritable --save / --log-jsonl, no wandb: before torch is imported
        check_data(run)  # before megatron-core's model code is imported: bad data fails in seconds
    except UserError as exc:
        _exit(2, user_error_line(exc))
    except KeyboardInterrupt:
        _interrupted()
    except preemption.Terminated:
        _terminated()
    preemption.install(exit_signal_handler=run.checkpoint.exit_signal_handler)
    from internvl_mcore.training.guards import PeerLost, TrainingDiverged
    from internvl_mcore.training.loop import train

    try:
        train(run, _rollout_sampler(run))
    except SaveDirRefused as exc:  # every rank knows; one line from rank 0 says it
        _exit(2, user_error_line(exc) if int(os.environ.get("RANK", "0")) == 0 else None)
    except UserError as exc:
        _exit(2, user_error_line(exc))
    except TrainingDiverged as exc:  # every rank knows; one line from rank 0 says it
        _exit(1, str(exc) if int(os.environ.get("RANK", "0")) == 0 else None)
    except PeerLost as exc:
        _exit(1, str(exc))
    except KeyboardInterrupt:
        _interrupted()
    except preemption.Terminated:
        _terminated()


if __name__ == "__mp_main__":  # a helper process a rank spawned (this file is its __main__): die with the rank
    from internvl_mcore.cli_errors import quiet_optional_gpu_libraries
    from internvl_mcore.training.preemption import child_of_run

    child_of_run()
    quiet_optional_gpu_libraries()  # before its target's imports (the --async-save writer imports megatron-core)
if __name__ == "__main__":  # the guard matters: megatron-core's async checkpoint writer re-imports __main__
    main()
