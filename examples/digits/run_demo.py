#!/usr/bin/env python
"""The digits demo: real handwritten digits through the whole InternVL job on 2 CPU processes.

    python examples/digits/run_demo.py [--out runs/demo] [--layout tp2|pp2] [--quick]

Phases (each timed, each leaving its artifact under --out):

  1. data        scikit-learn's 1,797 8x8 digits -> PNGs + InternVL JSONL/meta + fixed held-out split
                 + a tiny tokenizer                                          (data/)
  2. preprocess  tools/preprocess_mm_data.py -> packed shards                (shards/)
  3. stage 1     pretrain_internvl.py --stage 1: projector only              (stage1/, logs/stage1.jsonl)
  4. stage 2     pretrain_internvl.py --stage 2 --pretrained stage1/: all    (stage2/, logs/stage2.jsonl)
  5. export      tools/convert_to_hf.py --format transformers                (hf/)
  6. evaluate    transformers' InternVLForConditionalGeneration answers the held-out questions
                 (examples/digits/evaluate.py)                               (predictions.jsonl)
  7. plot        loss curve of both stages (examples/digits/plot_loss.py)    (loss.png)

and a summary (accuracy, per-phase seconds) in summary.json. Training runs with pipeline parallelism 2
(--layout pp2, default) or tensor parallelism 2 (--layout tp2) on two gloo CPU processes.
--quick runs a few iterations of each stage (the test suite uses it): every phase and artifact, no
meaningful accuracy. Other flags override single recipe values (see --help).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MARKER = ".digits-demo-output"  # lets a rerun empty --out safely
LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"]}


@dataclass
class Recipe:
    """Everything that shapes the demo's result. Defaults are the tuned full demo."""

    model: str = "debug"
    """Model preset (pretrain_internvl.py --model); the data uses its tile size."""
    layout: str = "pp2"
    """pp2: pipeline parallel over 2 processes (cheaper on CPU: one activation send per microbatch);
    tp2: tensor parallel over 2 processes (two all-reduces per layer)."""
    seq_length: int = 1024
    """Tokens per packed training sequence (about 35 digit questions of 28 tokens)."""
    global_batch_size: int = 2
    """Packed sequences per optimizer step."""
    micro_batch_size: int = 1
    """Packed sequences per microbatch."""
    system_prompt: str = ""
    """Replaces InternVL's default system prompt, 145 tokens with the tiny tokenizer (5x a digit question)."""
    multi_image: int = 300
    """'Which of these images shows a 3?' samples (3 training images each)."""
    text_only: int = 200
    """Text-only arithmetic samples."""
    max_single: int = 0
    """Cap on the 'What digit is shown?' training samples (0: all 1,438 of the training split)."""
    stage1_iters: int = 40
    """Stage-1 steps. The LLM is random here (no pretrained one is shipped), so stage 1 barely moves
    the loss; it runs to show the stage mechanics (only the projector trains, stage 2 starts from it)."""
    stage1_lr: float = 2e-3
    """Stage-1 peak learning rate (cosine decay)."""
    stage2_iters: int = 400
    """Stage-2 steps (about 13 epochs of the training split at the default batch)."""
    stage2_lr: float = 2e-3
    """Stage-2 peak learning rate (cosine decay after the warmup)."""
    stage2_warmup: int = 20
    """Stage-2 linear warmup steps."""
    stage2_drop_path_rate: float = 0.1
    """ViT stochastic depth (the stage-2 preset's 0.1); it regularizes: held-out accuracy is ~2 points
    below training accuracy."""
    weight_decay: float = 0.1
    """AdamW weight decay of both stages."""
    seed: int = 1234
    """Training seed (weights, data order, drop path); the data split is fixed."""
    eval_batch_size: int = 128
    """Held-out questions per generate() call."""
    num_workers: int = 1
    """Loader processes per training rank (pretrain_internvl.py --num-workers). --quick uses 0: its few
    steps would mostly wait for each rank's loader process to start (~13 s, ~3 CPU-s each)."""
    preprocess_workers: int = 2
    """Tokenizing processes of the preprocess phase (tools/preprocess_mm_data.py --workers; 1: in its own
    process). --quick uses 1: its few hundred samples take less than starting the workers."""


# The shortened demo the tests run: same phases and code path, a handful of steps.
QUICK = dict(
    stage1_iters=2,
    stage2_iters=3,
    stage2_warmup=1,
    seq_length=512,
    max_single=100,
    multi_image=10,
    text_only=10,
    num_workers=0,
    preprocess_workers=1,
)


@dataclass
class Phase:
    """One timed phase and the file that proves it ran."""

    name: str
    seconds: float
    """Wall-clock time."""
    cpu_seconds: float
    """CPU time of this process and its children (user + system, summed over processes): unlike the
    wall time it does not grow when other jobs share the machine."""
    artifact: str


@dataclass
class DemoResult:
    """What the demo produced; also written to OUT/summary.json."""

    out: str
    recipe: dict
    phases: list[Phase] = field(default_factory=list)
    accuracy: float | None = None
    num_correct: int | None = None
    num_heldout: int | None = None
    final_losses: dict = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (torchrun's workers included)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _run(cmd: list[str], log_path: str, show: Callable[[str], bool] = lambda line: False) -> None:
    """Run `cmd` from the repo root, keep its full output in `log_path`, echo the lines `show` picks,
    and raise with the output's tail when it fails."""
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONUNBUFFERED": "1",
    }
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if show(line):
                print("    " + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = f.readlines()[-40:]
        raise RuntimeError(f"{cmd[0]} ... failed with exit code {code}; full output in {log_path}:\n" + "".join(tail))


class Runner:
    """How the phases run their commands: fresh processes here; the test suite passes one that uses its
    reused worlds and in-process tools (tests/examples/test_demo.py)."""

    def tool(self, script: str, args: list[str], log: str) -> None:
        """`python tools/SCRIPT args`, its output kept in `log`."""
        show = lambda line: line.startswith(("inputs", "packs", "wrote", "convert_to_hf"))  # noqa: E731
        _run([sys.executable, os.path.join("tools", script), *args], log, show=show)

    def train(self, args: list[str], log: str) -> None:
        """`pretrain_internvl.py args` on 2 gloo processes (torchrun), its output kept in `log`."""
        from internvl_mcore.parallel.state import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), "pretrain_internvl.py", *args]
        _run(cmd, log, show=lambda line: line.startswith(("iteration", "loaded weights", "error")))


def _last_loss(log_jsonl: str) -> float:
    with open(log_jsonl, encoding="utf-8") as f:
        return float(json.loads(f.readlines()[-1])["loss"])


def _sibling(name: str):
    """Import examples/digits/<name>.py under a private module name (examples/ is not a package, and
    `evaluate` is also the name of a PyPI package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_digits_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_demo(out: str, recipe: Recipe, log_every: int = 20, run: Runner | None = None) -> DemoResult:
    """Run every phase into `out` (replacing an earlier demo output there) and return the result."""
    run = run or Runner()
    if recipe.layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {sorted(LAYOUTS)}, got {recipe.layout!r}")
    out = os.path.abspath(out)
    marker = os.path.join(out, MARKER)
    if os.path.isdir(out) and os.listdir(out):
        # a fresh run every time (logs append, checkpoints would resume), but never wipe a directory
        # this script did not make
        if not os.path.exists(marker):
            raise FileExistsError(
                f"{out} exists, is not empty and is not a digits demo output ({MARKER} missing): choose another --out"
            )
        shutil.rmtree(out)
    # imported after the checks: a refused --out answers without importing torch, megatron-core, transformers
    from internvl_mcore.config import get_preset
    from internvl_mcore.data.digits import build_digits_dataset

    evaluate, plot_loss = _sibling("evaluate").evaluate, _sibling("plot_loss").plot_loss

    logs = os.path.join(out, "logs")
    os.makedirs(logs)
    open(marker, "w").close()
    result = DemoResult(out=out, recipe=dataclasses.asdict(recipe))
    steps = 7

    def phase(k: int, name: str, what: str) -> tuple[float, float]:
        print(f"[{k}/{steps}] {name}: {what}", flush=True)
        return time.perf_counter(), _cpu_seconds()

    def done(name: str, start: tuple[float, float], artifact: str) -> None:
        seconds, cpu = time.perf_counter() - start[0], _cpu_seconds() - start[1]
        if not os.path.exists(artifact):
            raise RuntimeError(f"phase {name} finished but {artifact} is missing")
        result.phases.append(Phase(name, seconds, cpu, artifact))
        print(f"      done in {seconds:.1f}s ({cpu:.1f} CPU-s) -> {artifact}", flush=True)

    # 1. data
    t = phase(1, "data", "scikit-learn digits -> PNG images, InternVL JSONL, held-out split, tokenizer")
    image_size = get_preset(recipe.model).vision.image_size
    data = build_digits_dataset(
        os.path.join(out, "data"),
        image_size=image_size,
        seed=0,
        multi_image=recipe.multi_image,
        text_only=recipe.text_only,
        max_single=recipe.max_single or None,
    )
    print(f"      {data.num_train} training samples, {data.num_heldout} held-out questions", flush=True)
    done("data", t, data.meta)

    # 2. preprocess
    t = phase(2, "preprocess", f"tools/preprocess_mm_data.py -> packs of {recipe.seq_length} tokens")
    prefix = os.path.join(out, "shards", "digits")
    run.tool(
        "preprocess_mm_data.py",
        [
            *("--meta", data.meta, "--tokenizer", data.tokenizer, "--output-prefix", prefix),
            *("--seq-length", str(recipe.seq_length), "--model", recipe.model),
            *("--system-prompt", recipe.system_prompt, "--workers", str(recipe.preprocess_workers), "--no-progress"),
        ],
        os.path.join(logs, "preprocess.log"),
    )
    done("preprocess", t, prefix + ".manifest.json")

    # 3. + 4. training
    def train(k: int, stage: str, iters: int, lr: float, extra: list[str]) -> str:
        save = os.path.join(out, f"stage{stage}")
        log_jsonl = os.path.join(logs, f"stage{stage}.jsonl")
        what = "projector only" if stage == "1" else "vision, projector and LLM"
        t = phase(k, f"stage {stage}", f"{what}, {iters} steps on 2 CPU processes ({recipe.layout})")
        args = [
            "--model",
            recipe.model,
            *LAYOUTS[recipe.layout],
            "--data-path",
            prefix,
            "--stage",
            stage,
            "--train-iters",
            str(iters),
            "--lr",
            str(lr),
            "--seq-length",
            str(recipe.seq_length),
            "--global-batch-size",
            str(recipe.global_batch_size),
            "--micro-batch-size",
            str(recipe.micro_batch_size),
            "--seed",
            str(recipe.seed),
            "--weight-decay",
            str(recipe.weight_decay),
            "--num-workers",
            str(recipe.num_workers),
            "--log-interval",
            str(log_every),
            "--log-jsonl",
            log_jsonl,
            "--save",
            save,
            *extra,
        ]
        run.train(args, os.path.join(logs, f"stage{stage}.log"))
        result.final_losses[f"stage{stage}"] = _last_loss(log_jsonl)
        done(f"stage {stage}", t, os.path.join(save, "latest_checkpointed_iteration.txt"))
        return save

    stage1 = train(3, "1", recipe.stage1_iters, recipe.stage1_lr, [])
    stage2 = train(
        4,
        "2",
        recipe.stage2_iters,
        recipe.stage2_lr,
        [
            "--pretrained",
            stage1,
            "--lr-warmup-iters",
            str(min(recipe.stage2_warmup, recipe.stage2_iters)),
            "--drop-path-rate",
            str(recipe.stage2_drop_path_rate),
        ],
    )

    # 5. export
    t = phase(5, "export", "tools/convert_to_hf.py --format transformers")
    hf_dir = os.path.join(out, "hf")
    run.tool(
        "convert_to_hf.py",
        ["--load", stage2, "--save", hf_dir, "--format", "transformers"],
        os.path.join(logs, "export.log"),
    )
    done("export", t, os.path.join(hf_dir, "config.json"))

    # 6. evaluate
    t = phase(6, "evaluate", "InternVLForConditionalGeneration (transformers) answers the held-out questions")
    ev = evaluate(
        hf_dir, data.heldout, data.tokenizer, recipe.system_prompt, batch_size=recipe.eval_batch_size, progress=False
    )
    predictions = os.path.join(out, "predictions.jsonl")
    with open(predictions, "w", encoding="utf-8") as f:
        for pred in ev.predictions:
            f.write(json.dumps(pred) + "\n")
    result.accuracy, result.num_correct, result.num_heldout = ev.accuracy, ev.num_correct, ev.num_questions
    print(f"      held-out accuracy {ev.accuracy:.2%} ({ev.num_correct}/{ev.num_questions})", flush=True)
    done("evaluate", t, predictions)

    # 7. plot
    t = phase(7, "plot", "loss curve from the training logs")
    png = plot_loss(
        [
            ("stage 1 (projector)", os.path.join(logs, "stage1.jsonl")),
            ("stage 2 (all)", os.path.join(logs, "stage2.jsonl")),
        ],
        os.path.join(out, "loss.png"),
        title=f"digits demo: {recipe.model} model, {recipe.layout}",
    )
    done("plot", t, png)

    summary = {**dataclasses.asdict(result), "total_seconds": result.total_seconds}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return result


def _recipe_flags(parser: argparse.ArgumentParser) -> None:
    from internvl_mcore.config.cli import field_docs

    group = parser.add_argument_group("recipe (defaults: the full demo)")
    docs = field_docs(Recipe)
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        choices = sorted(LAYOUTS) if f.name == "layout" else None
        # default None: only flags given on the command line override --quick's values
        group.add_argument(
            flag,
            type=type(f.default),
            default=None,
            choices=choices,
            help=f"{docs.get(f.name, '')} (default: {f.default!r})",
        )


def main(argv: list[str] | None = None, run: Runner | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        default=os.path.join(REPO, "runs", "demo"),
        help="output directory (a previous demo output there is replaced)",
    )
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the path, not the accuracy")
    p.add_argument("--log-every", type=int, default=20, help="print every N-th training step")
    _recipe_flags(p)
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if getattr(args, f.name) is not None}
    )
    recipe = Recipe(**values)
    start = time.perf_counter()
    try:
        r = run_demo(args.out, recipe, log_every=1 if args.quick else args.log_every, run=run)
    except FileExistsError as e:
        print(f"run_demo: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    print("\nphase        wall s    CPU s")
    for ph in r.phases:
        print(f"{ph.name:<12} {ph.seconds:7.1f}  {ph.cpu_seconds:7.1f}")
    print(f"{'total':<12} {wall:7.1f}  {sum(ph.cpu_seconds for ph in r.phases):7.1f}")
    print(f"\nheld-out accuracy: {r.accuracy:.2%} ({r.num_correct}/{r.num_heldout}) in {wall / 60:.1f} min")
    print(f"loss curve: {os.path.join(r.out, 'loss.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
