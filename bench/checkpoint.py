#!/usr/bin/env python
"""Checkpoint save, asynchronous-save stall, load, export and import: wall time and peak memory of
each, against `cp -r` of the same bytes, for three model shapes in one run.

    python bench/checkpoint.py                       # debug, 1b and 2b (the 2b shape takes a while)
    python bench/checkpoint.py --sizes debug         # the debug model only (a few minutes)
    python bench/checkpoint.py --sizes debug --dry-run   # print the commands, check their flags, run nothing

Shapes (random weights): debug; 1b = InternVL3-1B (InternViT-300M-448px + Qwen2.5-0.5B, ~0.94B
parameters); 2b = InternVL3-2B (InternViT-300M + Qwen2.5-1.5B, ~2.1B). Every measured step is a CLI
subprocess, run the way users run it (torchrun for training, the tools for conversions), so the bench
depends only on flags. What each number means: docs/checkpoints.md.

The training checkpoint is a stage-1 one (--stage 1, TP2 x PP2, 4 ranks): the weights of the whole
model and Adam state for the projector only. debug and 1b train in fp32; 2b in bf16 with full
activation recomputation, to keep its whole run under 10 GiB on a machine it shares (its fp32 run
held 23.9 GiB: fp32 weights, stage 0's activations, and megatron-core's save holding a copy of every
tensor that is a view, see docs/checkpoints.md); each shape has its own memory guard and waits for
enough available memory before it starts. The 2b checkpoint is saved with no training step
(bench/_save_only.py: a 2b step takes over 20 minutes on a shared 2-core machine), so for 2b the
bench measures that save, the exports and the import, not the steps that train (async save, loads).
A full-training checkpoint carries 8 more bytes per trainable parameter (Adam's two moments); the
bench measures what fits and docs/checkpoints.md scales it on paper.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This process only orchestrates and imports no torch: see bench/_common.py.
from _common import GIB, REPO, Child, cp_run, cp_time, dir_bytes, make_random_hf_dir, run_child  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One model shape of the bench: its preset, how it trains, and the memory it may use."""

    preset: str
    params: float  # for the disk-space check only (measured ones are printed)
    dtype: str = "fp32"  # of the training run's weights and of the random HF dir
    flags: tuple[str, ...] = ()  # the training runs' extra flags
    mem_limit_gib: Optional[float] = None  # this shape's memory guard (None: --mem-limit-gib)
    min_available_gib: float = 0.0  # MemAvailable the shape waits for before it starts
    save_only: bool = False  # the checkpoint from bench/_save_only.py (no training step); no async, no loads


SHAPES = {
    "debug": Shape("debug", 1e6),
    "1b": Shape("internvl3-1b", 0.94e9, min_available_gib=12.0),  # fp32: 10-16 GiB in all
    # save_only: one 2b step needs > 95 CPU-s per rank, > 20 min on this shared 2-core machine
    "2b": Shape("internvl3-2b", 2.1e9, "bf16", ("--bf16", "--recompute-granularity", "full"), 13.0, 15.0, True),
}
SIZES = {size: shape.preset for size, shape in SHAPES.items()}
DISK_COPIES = 4.5  # model-sized copies on disk at once, at most (the kept checkpoint + the async run's 3)
BYTES = {"fp32": 4, "bf16": 2}
STEPS = ("save", "async", "load", "export", "import")
TP, PP = 2, 2
SAVE_INTERVAL = 2
SAVE_ITERS = 3 * SAVE_INTERVAL  # saves after 2 and 4 (stalls measured over the steps up to the next save) and 6
ITERATION = r"iteration\s+(\d+)/\d+ \|"
SAVED = r"saved checkpoint at iteration (\d+)"


@dataclass
class Cmd:
    """One measured command: a script of this repository run with `argv`, on `ranks` torchrun ranks
    (0: a plain python process)."""

    script: str
    argv: list[str]
    ranks: int = 0

    def line(self) -> list[str]:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.ranks}"]
        return (launcher if self.ranks else [sys.executable]) + [self.script, *self.argv]


@dataclass
class Row:
    """One line of the table: seconds, the baseline it is compared with, memory, and a note."""

    step: str
    wall: Optional[float]
    base: Optional[float] = None
    rss: Optional[int] = None
    tree: Optional[int] = None
    note: str = ""


def seq_length(preset: str) -> int:
    """The shortest --seq-length whose mock samples hold one image tile: each of the two samples of a
    pack gets at least 3/8 of it and needs the tile's image tokens + 4."""
    from internvl_mcore.config import get_preset

    need = (get_preset(preset).num_image_token + 4) * 8 // 3 + 1
    return -(-need // 64) * 64


def _train(preset: str, *extra: str) -> Cmd:
    """pretrain_internvl.py at TP2 x PP2 on mock data with one image tile per sample (stage 1; fp32
    unless `extra` says --bf16)."""
    return Cmd(
        "pretrain_internvl.py",
        [
            "--model",
            preset,
            "--mock-data",
            "--mock-tiles-per-sample",
            "1",
            "--seq-length",
            str(seq_length(preset)),
            "--global-batch-size",
            "1",
            "--tensor-model-parallel-size",
            str(TP),
            "--pipeline-model-parallel-size",
            str(PP),
            "--stage",
            "1",
            "--peak-flops",
            "1e12",
            "--distributed-timeout-minutes",
            "60",
            *extra,
        ],
        ranks=TP * PP,
    )


def commands(
    preset: str, work: Path, async_save: bool, formats: list[str], flags: tuple[str, ...] = (), save_only: bool = False
) -> dict[str, Cmd]:
    """Every measured command of one size, by name; `flags` go to every training run. `save_only`:
    the checkpoint is saved at iteration 0 by bench/_save_only.py (the same flags, no step)."""
    ck, hf = work / "ckpt", work / "hf"
    saving = ["--train-iters", str(SAVE_ITERS), "--save-interval", str(SAVE_INTERVAL)]
    train = lambda *extra: _train(preset, *flags, *extra)  # noqa: E731
    cmds = {
        "save": train(*saving, "--save", str(ck), "--log-jsonl", str(work / "sync.jsonl")),
        "base": train("--train-iters", "1", "--log-jsonl", str(work / "base.jsonl")),
        "base2": train("--train-iters", "1", "--log-jsonl", str(work / "base2.jsonl")),
        "load": train("--train-iters", str(SAVE_ITERS), "--load", str(ck)),
        "pretrained": train(
            "--train-iters", "1", "--pretrained", str(ck), "--log-jsonl", str(work / "pretrained.jsonl")
        ),
        "import": Cmd("tools/convert_from_hf.py", ["--hf-dir", str(hf), "--save", str(work / "canonical")]),
        "pretrained_hf": train(
            "--train-iters", "1", "--pretrained", str(hf), "--log-jsonl", str(work / "pretrained_hf.jsonl")
        ),
    }
    if save_only:
        cmds["save"].script = "bench/_save_only.py"
    if async_save:
        cmds["async"] = train(
            *saving, "--save", str(work / "ckpt_async"), "--async-save", "--log-jsonl", str(work / "async.jsonl")
        )
    for fmt in formats:
        # no --dtype: the export follows the dtype the run stored (bf16 for the 2b shape's --bf16)
        cmds[f"export_{fmt}"] = Cmd(
            "tools/convert_to_hf.py", ["--load", str(ck), "--save", str(work / f"hf_{fmt}"), "--format", fmt]
        )
    return cmds


def step_times(jsonl: Path) -> dict[int, float]:
    """{iteration: step_time_s} of a --log-jsonl file (training records only)."""
    if not jsonl.exists():
        return {}
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    return {r["iteration"]: r["step_time_s"] for r in records if "step_time_s" in r}


def save_stalls(child: Child, jsonl: Path) -> dict[int, float]:
    """{iteration k: seconds the save after iteration k added to training before the next save}: for
    each step j from k to the next save, the time between the log lines of j and j+1 (stamped as they
    arrived) less step j+1's own time, less the same difference after iteration 1 (printing, data,
    no save). An asynchronous save's later work (waiting for its writers, checksums, publishing)
    lands in those steps too, so it is counted."""
    lines, steps = child.stamps(ITERATION), step_times(jsonl)
    gap = {j: lines[j + 1] - lines[j] - steps[j + 1] for j in lines if j + 1 in lines and j + 1 in steps}
    if 1 not in gap:
        return {}
    windows = {k: range(k, k + SAVE_INTERVAL) for k in range(SAVE_INTERVAL, SAVE_ITERS, SAVE_INTERVAL)}
    return {k: sum(gap[j] - gap[1] for j in js) for k, js in windows.items() if all(j in gap for j in js)}


class Bench:
    """The measurements of one model size, in a work directory of its own."""

    def __init__(self, size: str, work: Path, args: argparse.Namespace, async_save: bool) -> None:
        self.size, self.shape, self.work, self.args = size, SHAPES[size], work, args
        self.preset = self.shape.preset
        self.cmds = commands(self.preset, work, async_save, args.formats, self.shape.flags, self.shape.save_only)
        limit = self.shape.mem_limit_gib
        self.mem_limit_gib = min(args.mem_limit_gib, limit) if limit else args.mem_limit_gib
        self.rows: list[Row] = []
        self.children: dict[str, Child] = {}

    def run(self, name: str, what: str) -> Optional[Child]:
        """Run command `name` (progress lines on the way); None and a failure row when it failed."""
        cmd = self.cmds[name]
        print(f"  [{self.size}] {what} ...", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
        child = run_child(
            cmd.line(),
            label=f"{self.size} {name}",
            env=env,
            mem_limit=int(self.mem_limit_gib * GIB),
            deadline_s=self.args.step_deadline,
        )
        print(
            f"  [{self.size}] {what}: {child.wall:.1f}s, peak {child.peak_rss / GIB:.2f} GiB per process"
            + (f"; FAILED {child.failure()}" if child.failure() else ""),
            flush=True,
        )
        if child.failure():
            self.rows.append(Row(what, None, note=f"failed: {child.failure()[:300]}"))
            return None
        self.children[name] = child
        return child

    def ckpt_dir(self) -> Path:
        return self.work / "ckpt" / f"iter_{0 if self.shape.save_only else SAVE_ITERS:07d}"

    def saves(self) -> None:
        """The synchronous save (and, when the tree has --async-save, the asynchronous one): the step
        time each save added, against cp -r of one checkpoint."""
        if self.shape.save_only:
            return self.save_only()
        if self.reused(self.ckpt_dir()):
            self.ck_bytes, self.cp_ck = dir_bytes(self.ckpt_dir()), cp_time(self.ckpt_dir(), self.work / "cp")
            self.rows.append(Row(f"cp -r checkpoint ({self.ck_bytes / GIB:.2f} GiB)", self.cp_ck, self.cp_ck))
            return
        sync = self.run("save", f"save: {SAVE_ITERS} steps, saving every {SAVE_INTERVAL} (sync)")
        if sync is None:
            return
        for old in range(SAVE_INTERVAL, SAVE_ITERS, SAVE_INTERVAL):  # keep only the last one (disk)
            shutil.rmtree(self.work / "ckpt" / f"iter_{old:07d}", ignore_errors=True)
        self.ck_bytes, self.cp_ck = dir_bytes(self.ckpt_dir()), cp_time(self.ckpt_dir(), self.work / "cp")
        self.rows.append(Row(f"cp -r checkpoint ({self.ck_bytes / GIB:.2f} GiB)", self.cp_ck, self.cp_ck))
        stalls = save_stalls(sync, self.work / "sync.jsonl")
        for k, s in stalls.items():
            self.rows.append(
                Row(
                    f"save (sync) after it {k}: time added",
                    s,
                    self.cp_ck,
                    sync.peak_rss,
                    sync.tree_rss,
                    "first save: one-time set-up included" if k == SAVE_INTERVAL else "",
                )
            )
        self.sync_stalls = stalls

    def save_only(self) -> None:
        """The checkpoint of bench/_save_only.py: the trainer's save of iteration 0 (no step), timed
        inside the run, against cp -r of what it wrote."""
        child = self.run("save", "save: the run's set-up, then save iteration 0 (no training step)")
        if child is None:
            return
        said = [line for _, line in child.lines if line.startswith("save-only:")]
        self.ck_bytes, self.cp_ck = dir_bytes(self.ckpt_dir()), cp_time(self.ckpt_dir(), self.work / "cp")
        self.rows.append(Row(f"cp -r checkpoint ({self.ck_bytes / GIB:.2f} GiB)", self.cp_ck, self.cp_ck))
        if said:
            self.rows.append(
                Row(
                    "save (sync), first, no step: save() wall",
                    float(said[0].split()[-2]),
                    self.cp_ck,
                    child.peak_rss,
                    child.tree_rss,
                    "one-time set-up included; memory: the whole run",
                )
            )

    def async_save(self) -> None:
        """The same run with --async-save: what each save still adds, against the synchronous one."""
        if "async" not in self.cmds:
            self.rows.append(
                Row("async-save stall", None, note="not measured: this tree's pretrain_internvl.py has no --async-save")
            )
            return
        sync_stalls = getattr(self, "sync_stalls", {})
        child = self.run("async", f"async save: {SAVE_ITERS} steps, --async-save every {SAVE_INTERVAL}")
        shutil.rmtree(self.work / "ckpt_async", ignore_errors=True)
        if child is None:
            return
        # the snapshot copy overlaps the next step (async_save.py), which it may slow on a CPU: not a
        # stall (the step computes meanwhile) but shown, step k+1's time against the sync run's
        sync_steps, async_steps = step_times(self.work / "sync.jsonl"), step_times(self.work / "async.jsonl")
        for k, s in save_stalls(child, self.work / "async.jsonl").items():
            ratio = f"{s / sync_stalls[k]:.1%} of the sync save (goal <= 10%)" if sync_stalls.get(k) else ""
            if k + 1 in sync_steps and k + 1 in async_steps:
                ratio += f"; step {k + 1}: {async_steps[k + 1]:.2f}s (sync run: {sync_steps[k + 1]:.2f}s)"
            self.rows.append(
                Row(f"async-save stall after it {k}", s, self.cp_ck, child.peak_rss, child.tree_rss, ratio)
            )

    def baseline(self) -> None:
        """The same training run from random weights, with no checkpoint: what loads are compared to.
        Twice: the spread of its start-up (4 ranks importing and building on a shared machine) is the
        noise of every load time below."""
        starts = []
        for name in ("base", "base2"):
            base = self.run(name, f"baseline ({name}): 1 step from random weights, no checkpoint")
            if base is None:
                return
            starts.append(base.wall - step_times(self.work / f"{name}.jsonl").get(1, 0.0))
            self.base = base if name == "base" or base.peak_rss > self.base.peak_rss else self.base
        self.base_start = sum(starts) / 2
        self.rows.append(
            Row(
                "baseline start-up (random weights, 2 runs)",
                self.base_start,
                None,
                self.base.peak_rss,
                self.base.tree_rss,
                f"runs {starts[0]:.1f}s and {starts[1]:.1f}s: load times below "
                f"are +- {abs(starts[0] - starts[1]) / 2:.1f}s",
            )
        )

    def loads(self) -> None:
        """--load (resume) and --pretrained of the training checkpoint: the run's time less the
        baseline's start-up (its wall less its step), and the memory above the baseline."""
        if not (hasattr(self, "base") and hasattr(self, "cp_ck")):
            return
        load = self.run("load", "--load resume (model, optimizer, RNG, data position; no step)")
        if load is not None:
            self.rows.append(self._above_base("load: --load resume, start-up", load.wall, self.cp_ck, load))
        pre = self.run("pretrained", "--pretrained training checkpoint + 1 step")
        if pre is not None:
            start = pre.wall - step_times(self.work / "pretrained.jsonl").get(1, 0.0)
            self.rows.append(self._above_base("load: --pretrained CKPT, start-up", start, self.cp_ck, pre))

    def _above_base(self, step: str, start: float, cp: float, child: Child) -> Row:
        """A load's row: its run's start-up (wall less its step) in the wall column; the note has
        the difference from the baseline's start-up (which initializes random weights, a cost a load
        may skip: it can be negative) in seconds and in cp -r's, and the memory above the baseline."""
        extra, more = start - self.base_start, (child.peak_rss - self.base.peak_rss) / GIB
        return Row(
            step,
            start,
            None,
            child.peak_rss,
            child.tree_rss,
            f"{extra:+.1f}s vs the baseline's start-up ({extra / cp:+.1f}x cp); peak per process "
            f"{more:+.2f} GiB vs the baseline",
        )

    def exports(self) -> None:
        """Each export against a `cp -r` of the checkpoint run just before it (the same minute: on a
        shared machine the load moves), in wall time and in CPU seconds."""
        if not hasattr(self, "cp_ck"):
            return
        for fmt in self.args.formats:
            cp = cp_run(self.ckpt_dir(), self.work / "cp")
            child = self.run(f"export_{fmt}", f"export: convert_to_hf.py --format {fmt} from the TP2xPP2 checkpoint")
            shutil.rmtree(self.work / f"hf_{fmt}", ignore_errors=True)
            if child is not None:
                self.rows.append(
                    Row(
                        f"export --format {fmt}",
                        child.wall,
                        cp.wall,
                        child.peak_rss,
                        child.tree_rss,
                        _against_cp(child, cp) + "; goal: wall <= 5x cp; peak <= 2 GiB (1b), not growing to 2b",
                    )
                )

    def imports(self) -> None:
        """convert_from_hf.py of a random HF dir (InternVL's layout, the shape's dtype)."""
        hf = self.work / "hf"
        cp_child = cp_run(hf, self.work / "cp")
        cp = cp_child.wall
        self.rows.append(
            Row(f"cp -r HF dir ({dir_bytes(hf) / GIB:.2f} GiB)", cp, cp, note=_against_cp(cp_child, cp_child))
        )
        child = self.run("import", "import: convert_from_hf.py HF dir -> canonical")
        shutil.rmtree(self.work / "canonical", ignore_errors=True)
        if child is not None:
            note = _against_cp(child, cp_child) + "; goal: wall <= 5x cp"
            self.rows.append(Row("import convert_from_hf", child.wall, cp, child.peak_rss, child.tree_rss, note))
        self.cp_hf = cp

    def pretrained_hf(self) -> None:
        """--pretrained HF_DIR into the training run (after the baseline its note is against)."""
        cp = getattr(self, "cp_hf", None)
        pre = self.run("pretrained_hf", "import: --pretrained HF_DIR + 1 step")
        if pre is not None and hasattr(self, "base"):
            start = pre.wall - step_times(self.work / "pretrained_hf.jsonl").get(1, 0.0)
            row = self._above_base("import --pretrained HF_DIR, start-up", start, cp or 1.0, pre)
            row.note += " (goal: <= +1 GiB)"
            self.rows.append(row)

    def reused(self, path: Path) -> bool:
        """--reuse: `path` (the checkpoint, the HF dir) is kept from an earlier run in --workdir."""
        if self.args.reuse and path.exists():
            print(f"  [{self.size}] reusing {path} (--reuse)", flush=True)
            return True
        return False

    def make_hf(self) -> bool:
        """A random-weight HF checkpoint of this shape (InternVL's own layout, the shape's dtype) for
        the imports."""
        if self.reused(self.work / "hf"):
            return True
        start = time.perf_counter()
        print(f"  [{self.size}] writing a random-weight HF dir ...", flush=True)
        made = subprocess.run(
            [
                sys.executable,
                __file__,
                "--make-hf",
                str(self.work / "hf"),
                "--preset",
                self.preset,
                "--dtype",
                self.shape.dtype,
            ],
            capture_output=True,
            text=True,
            timeout=self.args.step_deadline,
        )
        if made.returncode != 0:
            self.rows.append(Row("import", None, note=f"failed to write the HF dir: {made.stderr.strip()[-300:]}"))
            return False
        self.params = int(made.stdout.split()[-1])
        print(
            f"  [{self.size}] HF dir: {self.params / 1e6:.1f}M params, {time.perf_counter() - start:.0f}s", flush=True
        )
        return True

    def measure(self, steps: set[str]) -> None:
        """Every selected step; a step the selected ones need (the checkpoint, the baseline) runs too.
        The converters run right after the checkpoint is written and before the other training runs:
        on a loaded machine a 2b training run takes many minutes, and the export is the figure the
        shapes are compared by."""
        if steps & {"save", "async", "load", "export"}:
            self.saves()
        if "export" in steps:
            self.exports()
        hf = "import" in steps and self.make_hf()
        if hf:
            self.imports()
        if self.shape.save_only or self.args.reuse:  # the rest train: see Shape.save_only, --reuse
            return
        if "async" in steps:
            self.async_save()
        if steps & {"load", "import"}:
            self.baseline()
        if "load" in steps:
            self.loads()
        if hf:
            self.pretrained_hf()


def _against_cp(child: Child, cp: Child) -> str:
    """CPU seconds of a command against those of the `cp -r` it is compared with, and the load
    average each started at (wall time ratios at a high load measure the scheduler)."""
    ratio = f" = {child.cpu_s / cp.cpu_s:.1f}x cp's {cp.cpu_s:.3g}" if cp is not child and cp.cpu_s else ""
    return f"CPU {child.cpu_s:.2f}s{ratio}; load {child.load:.1f}" + (
        f" (cp's {cp.load:.1f})" if cp is not child else ""
    )


def print_table(bench: Bench) -> None:
    gib = lambda b: f"{b / GIB:.2f}" if b is not None else ""  # noqa: E731
    flags = " ".join(f for f in bench.shape.flags if f != "--bf16")
    print(
        f"\n{bench.size} ({bench.preset}, TP{TP} x PP{PP}, stage 1, {bench.shape.dtype}{', ' + flags if flags else ''}; "
        f"memory guard {bench.mem_limit_gib:.1f} GiB):"
    )
    print(f"{'step':<44} {'wall s':>9} {'x cp':>8} {'peak RSS/proc GiB':>18} {'all procs GiB':>14}  note")
    for r in bench.rows:
        wall = f"{r.wall:.2f}" if r.wall is not None else "-"
        ratio = f"{r.wall / r.base:.1f}" if r.wall is not None and r.base else ""
        print(f"{r.step:<44} {wall:>9} {ratio:>8} {gib(r.rss):>18} {gib(r.tree):>14}  {r.note}")
    sys.stdout.flush()


def has_async_save(dry_run: bool) -> bool:
    """Whether this tree's pretrain_internvl.py takes --async-save (issue #24 adds it)."""
    if dry_run:  # torch is imported anyway to check the flags
        return "--async-save" in _script("pretrain_internvl.py").build_parser()._option_string_actions
    out = subprocess.run(
        [sys.executable, "pretrain_internvl.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return "--async-save" in out.stdout


_SCRIPTS: dict = {}


def _script(path: str):
    """The script of this repository at `path`, imported as a module (once)."""
    import importlib.util

    if path not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"_bench_{Path(path).stem}", REPO / path)
        _SCRIPTS[path] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_SCRIPTS[path])
    return _SCRIPTS[path]


def check_flags(cmds: dict[str, Cmd]) -> list[str]:
    """Parse every command's flags with the parser of the script it runs (dry run): the problems."""
    problems = []
    for name, cmd in cmds.items():
        module = _script(cmd.script)
        parse = getattr(module, "parse_run_config", None) or module.build_parser().parse_args
        try:
            parse(cmd.argv)
        except SystemExit as exc:
            problems.append(f"{name}: {cmd.script} refuses its flags (exit {exc.code})")
    return problems


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="debug,1b,2b", help="comma-separated: " + ", ".join(SIZES))
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated: " + ", ".join(STEPS))
    p.add_argument("--formats", default="transformers,internvl", help="convert_to_hf.py --format values to export")
    p.add_argument("--workdir", help="where to write (default: a temporary directory; removed after each size)")
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.85 / GIB, 1),
        help="kill a step whose processes together hold more (default: 85%% of RAM)",
    )
    p.add_argument(
        "--memory-wait",
        type=float,
        default=1800.0,
        help="seconds a shape waits for the available memory it needs before it is skipped",
    )
    p.add_argument("--step-deadline", type=float, default=3600.0, help="kill a step running longer (seconds)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, check their flags, run nothing")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="with --workdir: measure the exports / import of the checkpoint and HF dir an earlier run left "
        "there instead of training and writing them again (export,import steps only)",
    )
    p.add_argument("--make-hf", metavar="DIR", help=argparse.SUPPRESS)  # internal: the HF-dir writer child
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes, args.steps, args.formats = (
        args.sizes.split(","),
        set(args.steps.split(",")),
        args.formats.split(",") if args.formats else [],
    )
    if args.reuse and (args.workdir is None or args.steps - {"export", "import"}):
        p.error("--reuse needs --workdir and measures the export and import steps only")
    for value, known, flag in ((args.sizes, SIZES, "--sizes"), (args.steps, STEPS, "--steps")):
        if set(value) - set(known):
            p.error(f"{flag}: unknown {', '.join(sorted(set(value) - set(known)))} (known: {', '.join(known)})")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.make_hf:  # the child that writes a random HF dir (imports torch)
        from internvl_mcore.config import get_preset

        print(make_random_hf_dir(get_preset(args.preset), args.make_hf, "internvl", args.dtype, "2GB"))
        return 0
    async_save = has_async_save(args.dry_run)
    print(
        f"--async-save {'found' if async_save else 'NOT found'} in pretrain_internvl.py; sizes {args.sizes}; "
        f"memory guard {args.mem_limit_gib} GiB (a shape may set a lower one)",
        flush=True,
    )
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    failed = []
    for size in args.sizes:
        work = root / size
        if not args.reuse:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(size, work, args, async_save)
        free, need = shutil.disk_usage(work).free, DISK_COPIES * bench.shape.params * BYTES[bench.shape.dtype]
        if not args.dry_run and free < need:
            print(f"[{size}] skipped: {work} has {free / GIB:.0f} GiB free, the {size} steps need ~{need / GIB:.0f}")
            failed.append(size)
            continue
        if args.dry_run:
            failed += dry_run(bench)
            continue
        if not args.reuse and not wait_for_memory(size, bench.shape.min_available_gib, args.memory_wait):
            failed.append(size)
            continue
        start = time.perf_counter()
        try:
            bench.measure(args.steps)
        finally:
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        print_table(bench)
        print(f"({size}: {time.perf_counter() - start:.0f}s)", flush=True)
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def available_gib() -> float:
    """MemAvailable of /proc/meminfo (what `free` shows as available), in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def wait_for_memory(size: str, need_gib: float, deadline_s: float) -> bool:
    """Wait (up to `deadline_s`) until this shared machine has `need_gib` available, printing it as
    `free -g` would; False when it never had."""
    end = time.monotonic() + deadline_s
    while True:
        have = available_gib()
        print(f"[{size}] available memory {have:.1f} GiB (needs >= {need_gib:.0f} to start)", flush=True)
        if have >= need_gib:
            return True
        if time.monotonic() > end:
            print(f"[{size}] skipped: less than {need_gib:.0f} GiB available for {deadline_s:.0f}s", flush=True)
            return False
        time.sleep(30)


def dry_run(bench: Bench) -> list[str]:
    """Print the commands of one size and check their flags against the scripts' own parsers."""
    for name, cmd in bench.cmds.items():
        print(f"[{bench.size}] {name}: {' '.join(cmd.line())}")
    problems = check_flags(bench.cmds)
    for problem in problems:
        print(f"[{bench.size}] flag check FAILED: {problem}")
    print(
        f"[{bench.size}] flags of {len(bench.cmds)} commands {'refused' if problems else 'accepted'} by their scripts"
    )
    return problems


if __name__ == "__main__":
    sys.exit(main())
