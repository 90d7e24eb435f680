"""The training-checkpoint directory format, shared by training/ (which writes and resumes it) and
convert/ (which exports it), so that neither imports the other's internals:

    SAVE/latest_checkpointed_iteration.txt   the iteration of the newest complete checkpoint
    SAVE/iter_0000010/                       one checkpoint (megatron-core dist_checkpointing tensors)
        run.json                             iteration, schedule, model config, layout, LoRA record

Dependencies run training -> convert -> checkpoint -> models; this module imports only config/ (no
megatron-core: the CLIs' flag parsing reads it). Writing and resuming (optimizer, RNG, data
position) stay in training/checkpoint.py; checksums.json is checkpoint/checksums.py, the choice of
the checkpoint --load takes checkpoint/selection.py, and reading the model weights of a checkpoint
(`load_training_weights`, needed by `--pretrained` and the HF export) checkpoint/weights.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config.model import ModelConfig
from ..errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
RUN_INFO = "run.json"
# 2: RNG and data files in JSON (1: pickles), checksums.json always written
FORMAT_VERSION = 2


def iter_dir(root: str | Path, iteration: int, tmp: bool = False) -> Path:
    """The directory of checkpoint `iteration` under `root` (`tmp`: the one being written)."""
    return Path(root) / f"{'tmp_' if tmp else ''}iter_{iteration:07d}"


def tracked_iteration(root: str | Path) -> int:
    """The number in the `latest` pointer, whether or not its directory exists (checkpoint/selection.py
    `select` falls back from a missing one); errors say what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"--load {root}: no such directory")
    tracker = root / TRACKER
    if not tracker.exists():
        raise CheckpointError(f"--load {root}: no {TRACKER} (no complete checkpoint was saved there)")
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def latest_iteration(root: str | Path) -> int:
    """The iteration the `latest` pointer names; errors say what is missing."""
    root = Path(root)
    tracker = root / TRACKER
    iteration = tracked_iteration(root)
    if not iter_dir(root, iteration).is_dir():
        raise CheckpointError(f"{tracker} names iteration {iteration} but {iter_dir(root, iteration)} is missing")
    return iteration


def is_training_checkpoint(path: str | Path) -> bool:
    """A directory written by training/checkpoint.py `save` (a root with the tracker, or one iter_ dir)."""
    path = Path(path)
    return (path / TRACKER).exists() or (path / RUN_INFO).exists()


def resolve_iteration_dir(path: str | Path) -> tuple[Path, dict]:
    """(the iter_ directory, its run.json) for a checkpoint root (its latest iteration) or an iter_ dir."""
    path = Path(path)
    if (path / TRACKER).exists():
        path = iter_dir(path, latest_iteration(path))
    return path, json.loads((path / RUN_INFO).read_text())


def check_model(info: dict, model_cfg: ModelConfig, where: Path) -> None:
    """The model a checkpoint's run.json (`info`) was saved for must have `model_cfg`'s shapes."""
    saved = info.get("model", {})
    mine = dataclasses.asdict(model_cfg)
    diffs = []
    for part, cls in (("vision", type(model_cfg.vision)), ("llm", type(model_cfg.llm))):
        # a field the checkpoint predates takes its default (e.g. llm.qk_layernorm, llm.kv_channels)
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        for key, value in mine[part].items():
            if key in ("drop_path_rate", "layer_scale_init", "moe_aux_loss_coeff"):
                continue  # training knobs, not shapes
            theirs = saved.get(part, {}).get(key, defaults.get(key))
            if theirs != value:
                diffs.append(f"{part}.{key}: checkpoint {theirs!r}, model {value!r}")
    for key in ("downsample_ratio", "img_context_token_id"):
        if saved.get(key) != mine[key]:
            diffs.append(f"{key}: checkpoint {saved.get(key)!r}, model {mine[key]!r}")
    if diffs:
        raise CheckpointError(
            f"{where} was saved for model {saved.get('name')!r}, not {model_cfg.name!r}:\n  " + "\n  ".join(diffs)
        )


def checkpoint_dir(path: str | Path) -> Path:
    """The iter_NNNNNNN/ directory `path` means: itself, or the latest one of a --save root."""
    path = Path(path)
    return path if (path / RUN_INFO).exists() else iter_dir(path, latest_iteration(path))


def read_run_json(path: Path) -> dict:
    """run.json of checkpoint directory `path`; an unreadable one is an error naming it."""
    try:
        return json.loads((path / RUN_INFO).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / RUN_INFO}: unreadable ({exc})") from None
