"""Generate the per-size stage scripts (examples/internvl3_*/*.sh) from the capacity planner.

    python examples/gen_scripts.py --plan    # re-run the planner, rewrite examples/layouts.tsv, then the scripts
    python examples/gen_scripts.py           # rewrite the scripts from examples/layouts.tsv (fast)
    python examples/gen_scripts.py --check   # exit 1 if a script differs from what layouts.tsv renders

Every stage script is a few lines of per-size data (default GPU count, TP / PP / CP, sequence
parallel, distributed optimizer, recompute, the stage split: decoder layers on the first and last
pipeline stage and model chunks per rank) in front of the one shared launcher, examples/train.sh.
The data is the planner's choice (internvl_mcore.plan.search: the fastest layout that fits, its
stage split from per-piece cost, docs/planner.md) for each model and stage on A100 80 GB GPUs at the
workload below.
The GPU count starts at the size's natural count (what InternVL's own InternVL3 fine-tuning
scripts use) and doubles until a layout fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from internvl_mcore.config.training import STAGES  # noqa: E402
from internvl_mcore.plan.stages import split_flags  # noqa: E402

LAYOUTS_TSV = os.path.join(HERE, "layouts.tsv")

# Natural GPU counts: InternVL's InternVL3 2nd-finetune scripts run 1B-14B on 8 GPUs, 38B on 16, 78B on 32.
SIZES: dict[str, int] = {
    "internvl3-1b": 8,
    "internvl3-2b": 8,
    "internvl3-8b": 8,
    "internvl3-9b": 8,
    "internvl3-14b": 8,
    "internvl3-38b": 16,
    "internvl3-78b": 32,
}


@dataclass(frozen=True)
class StageScript:
    """One script per model: its file name, the --stage preset it runs and what that stage is."""

    name: str
    stage: str
    title: str
    pretrained: str
    """Default PRETRAINED (MODEL is substituted): where the stage's starting weights come from."""


STAGE_SCRIPTS = (
    StageScript("stage1", "1", "stage 1, MLP warm-up: only the projector trains", "checkpoints/{model}"),
    StageScript(
        "stage1_5",
        "1.5",
        "stage 1.5, ViT incremental learning: ViT + projector + LLM train",
        "work_dirs/{model}/stage1",
    ),
    StageScript(
        "stage2",
        "2",
        "stage 2, full-model instruction tuning: ViT + projector + LLM train",
        "work_dirs/{model}/stage1_5",
    ),
    StageScript(
        "2nd_finetune",
        "finetune",
        "2nd fine-tuning of a released model: projector + LLM train, ViT frozen",
        "checkpoints/{model}",
    ),
)

# The workload the layouts are planned for; train.sh's defaults (SEQ_LENGTH, BATCH_SIZE,
# PER_DEVICE_BATCH_SIZE) are the same numbers.
GPU = "a100-80gb"
SEQ_LENGTH = 16384
GLOBAL_BATCH_SIZE = 128
MICRO_BATCH_SIZE = 1
VIRTUAL_STAGES = (1, 2)
"""Model chunks per pipeline rank the planner may choose (the stage presets all run interleaved)."""

COLUMNS = (
    "model",
    "stage",
    "gpus",
    "tp",
    "pp",
    "cp",
    "sequence_parallel",
    "distributed_optimizer",
    "recompute",
    "first_stage_layers",
    "last_stage_layers",
    "virtual_stages",
    "peak_gib",
    "step_s",
    "mfu",
    "fastest_any_cp",
)


@dataclass(frozen=True)
class Row:
    """One planned layout (a line of layouts.tsv)."""

    model: str
    stage: str
    gpus: int
    tp: int
    pp: int
    cp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: bool
    first_stage_layers: Optional[int]
    last_stage_layers: Optional[int]
    virtual_stages: int
    """Model chunks per pipeline rank (--num-virtual-stages-per-pipeline-rank; 1: no interleaving)."""
    peak_gib: float
    step_s: float
    mfu: float
    fastest_any_cp: str
    """The planner's fastest layout with any CP size: this row's layout (training accepts CP > 1)."""

    def describe(self) -> str:
        flags = (
            ["SP"] * self.sequence_parallel
            + ["dist-opt"] * self.distributed_optimizer
            + ["recompute"] * self.recompute
            + ([f"first-stage-layers {self.first_stage_layers}"] if self.first_stage_layers is not None else [])
            + ([f"last-stage-layers {self.last_stage_layers}"] if self.last_stage_layers is not None else [])
        )
        dp = self.gpus // (self.tp * self.pp * self.cp)
        vpp = f" VPP{self.virtual_stages}" if self.virtual_stages > 1 else ""
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{dp}{vpp}" + (f" ({', '.join(flags)})" if flags else "")

    def plan_command(self) -> str:
        """The tools/plan.py command that evaluates this layout."""
        cmd = [
            f"python tools/plan.py --model {self.model} --gpus {self.gpus} --gpu {GPU}",
            f"--seq-length {SEQ_LENGTH} --global-batch-size {GLOBAL_BATCH_SIZE} --stage {self.stage}",
            f"--tensor-model-parallel-size {self.tp} --pipeline-model-parallel-size {self.pp}",
            f"--context-parallel-size {self.cp}",
        ]
        cmd += split_flags(self.first_stage_layers, self.last_stage_layers, self.virtual_stages)
        if self.distributed_optimizer:
            cmd.append("--use-distributed-optimizer")
        if self.recompute:
            cmd.append("--recompute-granularity full")
        return " ".join(cmd)


def trainable_parts(stage: str) -> frozenset[str]:
    """The planner's part names a stage preset trains (from config/training.py's STAGES)."""
    s = STAGES[stage]
    return frozenset(
        part for part, on in (("vision", s.train_vit), ("projector", s.train_projector), ("llm", s.train_llm)) if on
    )


def workload(stage: str):
    """The planner's Workload for a stage."""
    from internvl_mcore.plan import Workload

    return Workload(
        seq_length=SEQ_LENGTH,
        global_batch_size=GLOBAL_BATCH_SIZE,
        micro_batch_size=MICRO_BATCH_SIZE,
        trainable=trainable_parts(stage),
    )


def row_from_plan(model: str, stage: str, p, fastest_any: str) -> Row:
    lay = p.layout
    return Row(
        model,
        stage,
        lay.tp * lay.pp * lay.cp * lay.dp,
        lay.tp,
        lay.pp,
        lay.cp,
        lay.sequence_parallel,
        lay.distributed_optimizer,
        lay.recompute,
        lay.first_stage_layers,
        lay.last_stage_layers,
        lay.virtual_stages,
        round(p.peak_gib, 1),
        round(p.step_time_s, 1),
        round(p.mfu, 3),
        fastest_any,
    )


def plan_row(model: str, stage: str) -> Row:
    """The fastest fitting layout of `model` at `stage`, from the model's natural GPU count up."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.plan import HARDWARE, search

    cfg, hw = get_preset(model), HARDWARE[GPU]
    gpus = SIZES[model]
    while gpus <= 1024:
        plans = search(cfg, gpus, workload(stage), hw, virtual_stages=VIRTUAL_STAGES)
        if plans:
            return row_from_plan(model, stage, plans[0], plans[0].layout.describe())
        gpus *= 2
    raise RuntimeError(f"no layout of {model} stage {stage} fits on up to 1024 x {GPU}")


def replan(row: Row):
    """The planner's verdict on a recorded row's layout (memory, step time), with today's planner."""
    from internvl_mcore.config import get_preset
    from internvl_mcore.plan import HARDWARE, Layout, plan

    lay = Layout(
        row.tp,
        row.pp,
        row.cp,
        row.gpus // (row.tp * row.pp * row.cp),
        row.sequence_parallel,
        row.distributed_optimizer,
        row.recompute,
        row.first_stage_layers,
        last_stage_layers=row.last_stage_layers,
        virtual_stages=row.virtual_stages,
    )
    return plan(get_preset(row.model), lay, workload(row.stage), HARDWARE[GPU])


# ------------------------------------------------------------------------------------------------
# layouts.tsv
TSV_HEADER = f"""\
# Per-size layouts of the example scripts: the capacity planner's fastest fitting layout
# (internvl_mcore.plan.search) for each model and --stage on {GPU} GPUs (80 GiB, 6 GiB reserve),
# {SEQ_LENGTH}-token packs, {GLOBAL_BATCH_SIZE} packs per step, micro batch {MICRO_BATCH_SIZE}, bf16.
# peak_gib / step_s / mfu are planner estimates, never measured on a GPU.
# Regenerate: python examples/gen_scripts.py --plan
# CP > 1 allowed: pretrain_internvl.py accepts --context-parallel-size
"""


def format_tsv(rows: list[Row]) -> str:
    lines = [TSV_HEADER.rstrip("\n"), "\t".join(COLUMNS)]
    for r in rows:
        values = dataclasses.astuple(r)
        lines.append("\t".join("" if v is None else str(int(v)) if isinstance(v, bool) else str(v) for v in values))
    return "\n".join(lines) + "\n"


def read_tsv(path: str = LAYOUTS_TSV) -> list[Row]:
    """The rows of layouts.tsv; errors name the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = [(i, line.rstrip("\n")) for i, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
    header = lines[0][1].split("\t")
    if tuple(header) != COLUMNS:
        raise ValueError(f"{path}:{lines[0][0]}: columns {header} are not {list(COLUMNS)}")
    kinds = [f.type for f in dataclasses.fields(Row)]
    for lineno, line in lines[1:]:
        cells = line.split("\t")
        if len(cells) != len(COLUMNS):
            raise ValueError(f"{path}:{lineno}: {len(cells)} cells, expected {len(COLUMNS)}")
        values = []
        for cell, kind in zip(cells, kinds):
            if kind == "bool":
                values.append(cell == "1")
            elif kind == "int":
                values.append(int(cell))
            elif kind == "Optional[int]":
                values.append(int(cell) if cell else None)
            elif kind == "float":
                values.append(float(cell))
            else:
                values.append(cell)
        rows.append(Row(*values))
    return rows


def plan_all() -> list[Row]:
    """Every (model, stage) row."""
    from tqdm import tqdm

    jobs = [(m, s.stage) for m in SIZES for s in STAGE_SCRIPTS]
    return [plan_row(m, st) for m, st in tqdm(jobs, desc="planning", unit="layout")]


# ------------------------------------------------------------------------------------------------
# scripts
def script_path(model: str, script: StageScript) -> str:
    return os.path.join(HERE, model.replace("-", "_"), f"{script.name}.sh")


def render_script(row: Row, script: StageScript) -> str:
    """The text of one per-size stage script."""
    rel = os.path.relpath(script_path(row.model, script), REPO)
    size = row.model.split("-")[1].upper()
    first = "" if row.first_stage_layers is None else str(row.first_stage_layers)
    last = "" if row.last_stage_layers is None else str(row.last_stage_layers)
    dp = row.gpus // (row.tp * row.pp * row.cp)
    return f"""\
#!/usr/bin/env bash
# InternVL3-{size}, {script.title} (--stage {script.stage}).
#
# Generated by examples/gen_scripts.py from examples/layouts.tsv: edit those, not this file.
# The layout is the capacity planner's fastest fit for {row.gpus} x A100 80GB, {SEQ_LENGTH}-token packs and
# {GLOBAL_BATCH_SIZE} packs per step; re-check it on your cluster with
#   {row.plan_command()}
#   -> {row.describe()}: {row.peak_gib} GiB peak per GPU, ~{row.step_s} s per step, MFU {row.mfu:.0%}
#      (planner estimates, not measured on a GPU)
#
# GPUS is the total over all nodes; DP = GPUS / (TP x PP x CP) = {dp} by default.
#   GPUS={row.gpus} PER_DEVICE_BATCH_SIZE=1 bash {rel} [more pretrain_internvl.py flags]
#   DRY_RUN=1 bash {rel}        # print the torchrun command, run nothing
#   PARTITION=p GPUS={row.gpus} sh examples/slurm/launch.sh {rel}
# Other settings (DATA_PATH, PRETRAINED, OUTPUT_DIR, TRAIN_ITERS, ...) are read by examples/train.sh.
export MODEL={row.model} STAGE={script.stage} STAGE_NAME={script.name}
export GPUS=${{GPUS:-{row.gpus}}}
export TP=${{TP:-{row.tp}}} PP=${{PP:-{row.pp}}} CP=${{CP:-{row.cp}}}
export SEQUENCE_PARALLEL=${{SEQUENCE_PARALLEL:-{int(row.sequence_parallel)}}}
export DISTRIBUTED_OPTIMIZER=${{DISTRIBUTED_OPTIMIZER:-{int(row.distributed_optimizer)}}}
export RECOMPUTE=${{RECOMPUTE:-{int(row.recompute)}}}
export FIRST_STAGE_LAYERS=${{FIRST_STAGE_LAYERS-{first}}} LAST_STAGE_LAYERS=${{LAST_STAGE_LAYERS-{last}}}
export VIRTUAL_STAGES=${{VIRTUAL_STAGES:-{row.virtual_stages}}}
export PRETRAINED=${{PRETRAINED-{script.pretrained.format(model=row.model)}}}
exec bash "$(dirname "$0")/../train.sh" "$@"
"""


def rendered(rows: list[Row]) -> dict[str, str]:
    """path -> text of every per-size script."""
    by_key = {(r.model, r.stage): r for r in rows}
    out = {}
    for model in SIZES:
        for script in STAGE_SCRIPTS:
            row = by_key.get((model, script.stage))
            if row is None:
                raise ValueError(f"{LAYOUTS_TSV}: no row for {model} stage {script.stage}")
            out[script_path(model, script)] = render_script(row, script)
    return out


def stale_files(rows: list[Row]) -> list[str]:
    """Scripts whose content differs from what `rows` renders."""
    stale = []
    for path, text in rendered(rows).items():
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        except FileNotFoundError:
            pass
        stale.append(os.path.relpath(path, REPO))
    return stale


def write_scripts(rows: list[Row]) -> None:
    for path, text in rendered(rows).items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o755)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="re-run the planner (about a minute) and rewrite layouts.tsv")
    mode.add_argument("--check", action="store_true", help="exit 1 when a script differs from layouts.tsv")
    a = p.parse_args(argv)
    if a.plan:
        rows = plan_all()
        with open(LAYOUTS_TSV, "w", encoding="utf-8") as f:
            f.write(format_tsv(rows))
    rows = read_tsv()
    if a.check:
        stale = stale_files(rows)
        for path in stale:
            print(f"out of date: {path} (run python examples/gen_scripts.py)")
        return 1 if stale else 0
    write_scripts(rows)
    print(f"wrote {len(rows)} scripts from {os.path.relpath(LAYOUTS_TSV, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
