#!/usr/bin/env python
"""Online RL (GSPO) after SFT on the digits, against a control that spends the same time on more SFT.

    python examples/digits/run_rl.py [--out runs/rl_demo] [--sft-iters 150] [--gspo-iters 200] [--quick]

Phases (2 gloo CPU processes, pipeline parallel 2, the `debug` model):

  1. data        the digits (internvl_mcore/data/digits.py) and their RL prompt set: the training
                 split's "What digit is shown?" questions with the digit as the reference answer
                 (build_digits_rl_prompts; the held-out split is never a prompt)
  2. preprocess  SFT shards, and prompt shards (tools/preprocess_mm_data.py --prompts)
  3. SFT         pretrain_internvl.py --stage 2, deliberately short: the under-trained checkpoint
  4. evaluate    export to transformers, held-out accuracy of that checkpoint (evaluate.py, greedy)
  5. GSPO        pretrain_internvl.py --stage gspo --pretrained SFT, reward `exact` (the digit)
  6. evaluate    held-out accuracy after GSPO
  7. control     pretrain_internvl.py --stage 2 --pretrained SFT for as many steps as fit GSPO's
                 measured wall time (at the SFT phase's measured seconds per step), same LR recipe
  8. evaluate    held-out accuracy of the control

summary.json holds every accuracy, each phase's wall and CPU seconds (CPU-s: this process and its
children, which does not grow when other jobs share the machine), how the control's step count was
chosen, and GSPO's first / last logged reward accuracy. --quick runs every phase at a few steps (the
test suite uses it; its accuracies mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RL_FIELDS = ("loss", "reward_mean", "reward_accuracy", "rl_clip_fraction_last", "rl_response_length", "rl_rollout_s")
"""GSPO log fields the summary keeps for the first and last iteration."""
QUICK = dict(
    sft_iters=3,
    gspo_iters=2,
    prompts_per_step=2,
    rollouts_per_prompt=2,
    max_single=40,
    multi_image=4,
    text_only=4,
    seq_length=256,
    preprocess_workers=1,
    heldout_limit=8,
    control_iters=2,
)
"""--quick: every phase and artifact at a few steps (tests/examples/test_rl_example.py)."""


@functools.cache
def _load(name: str):
    """A sibling script as a module, executed once (the phases call it for every command)."""
    spec = importlib.util.spec_from_file_location(f"_digits_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "rl_demo"))
    p.add_argument("--sft-iters", type=int, default=150, help="under-trained stage-2 SFT steps (default 150)")
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--gspo-iters", type=int, default=200, help="GSPO rollout batches (default 200)")
    p.add_argument("--gspo-lr", type=float, default=1e-3)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--rollouts-per-prompt", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=3)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--kl-coeff", type=float, default=0.0)
    p.add_argument("--clip-eps", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    p.add_argument("--rl-micro-batch-size", type=int, default=64)
    p.add_argument("--rl-seq-length", type=int, default=32, help="tokens per response row: a prompt is 25, +3 new")
    p.add_argument("--control-iters", type=int, default=None, help="control SFT steps (default: time-matched)")
    p.add_argument("--max-single", type=int, default=0, help="cap on single-image SFT samples (0: all)")
    p.add_argument("--multi-image", type=int, default=300, help="'Which of these images shows a D?' SFT samples")
    p.add_argument("--text-only", type=int, default=200, help="text-only arithmetic SFT samples")
    p.add_argument("--preprocess-workers", type=int, default=2)
    p.add_argument("--heldout-limit", type=int, default=None, help="evaluate only the first N held-out questions")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--skip", nargs="*", default=[], choices=["gspo", "control"], help="phases to leave out")
    p.add_argument("--quick", action="store_true", help="every phase at a few steps (tests)")
    return p


class Runner:
    """How the phases run their commands: fresh processes here; the test suite passes one that uses its
    reused worlds and in-process tools (tests/examples/test_rl_example.py)."""

    def tool(self, script: str, args: list[str], log: str) -> None:
        """`python tools/SCRIPT args`, its output kept in `log`."""
        show = lambda line: line.startswith("inputs")  # noqa: E731
        _load("run_demo")._run([sys.executable, os.path.join("tools", script), *args], log, show=show)

    def train(self, args: list[str], log: str) -> None:
        """`pretrain_internvl.py args` on 2 gloo processes (torchrun), its output kept in `log`."""
        from internvl_mcore.parallel.state import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), "pretrain_internvl.py", *args]
        show = lambda line: line.startswith(("iteration", "error")) and (" 1/" in line or "0/" in line)  # noqa: E731
        _load("run_demo")._run(cmd, log, show=show)


class Phases:
    """Times each phase (wall and CPU seconds of this process and its children) into `summary`."""

    def __init__(self, summary: dict):
        self.summary = summary
        summary.setdefault("phases", {})

    def __call__(self, name: str, fn, *args, **kwargs):
        demo = _load("run_demo")
        print(f"[{name}]", flush=True)
        t0, c0 = time.perf_counter(), demo._cpu_seconds()
        value = fn(*args, **kwargs)
        wall, cpu = time.perf_counter() - t0, demo._cpu_seconds() - c0
        self.summary["phases"][name] = {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2)}
        print(f"    {name}: {wall:.1f}s wall, {cpu:.1f} CPU-s", flush=True)
        return value


def _preprocess(run: Runner, a, data, rl, out: str) -> dict:
    """SFT shards and prompt shards, both with the SFT data's (empty) system prompt: --prompts stores
    it in each prompt record, so the stage samples from the prompt SFT trained on and evaluation asks."""
    shards = {}
    for kind, meta, seq, extra in (
        ("sft", data.meta, a.seq_length, []),
        ("prompts", rl.train_meta, a.rl_seq_length, ["--prompts"]),
    ):
        shards[kind] = os.path.join(out, "shards", kind)
        args = ["--meta", meta, "--tokenizer", data.tokenizer, "--output-prefix", shards[kind]]
        args += [
            "--seq-length",
            str(seq),
            "--model",
            "debug",
            "--system-prompt",
            "",
            "--workers",
            str(a.preprocess_workers),
        ]
        run.tool("preprocess_mm_data.py", [*args, "--no-progress", *extra], os.path.join(out, "logs", f"{kind}.log"))
    return shards


def _train(run: Runner, a, out: str, name: str, stage: str, data: str, iters: int, lr: float, extra: list) -> str:
    """One pretrain_internvl.py run on 2 processes (PP2); returns its checkpoint directory."""
    save = os.path.join(out, name)
    cmd = ["--model", "debug", "--pipeline-model-parallel-size", "2", "--data-path", data, "--stage", stage]
    cmd += ["--train-iters", str(iters), "--lr", str(lr), "--seed", str(a.seed), "--weight-decay", "0.1"]
    cmd += ["--drop-path-rate", "0", "--log-interval", "1", "--log-jsonl", os.path.join(out, "logs", f"{name}.jsonl")]
    cmd += ["--save", save, "--overwrite-checkpoints", *extra]  # a re-run replaces its own checkpoints
    run.train(cmd, os.path.join(out, "logs", f"{name}.log"))
    return save


def _accuracy(run: Runner, a, data, out: str, name: str, ckpt: str) -> dict:
    """Export `ckpt` to transformers and answer the held-out questions greedily (evaluate.py)."""
    hf = os.path.join(out, f"hf_{name}")
    args = ["--load", ckpt, "--save", hf, "--format", "transformers", "--overwrite"]  # a re-run replaces it
    run.tool("convert_to_hf.py", args, os.path.join(out, "logs", f"export_{name}.log"))
    r = _load("evaluate").evaluate(
        hf, data.heldout, data.tokenizer, "", batch_size=128, limit=a.heldout_limit, progress=False
    )
    print(f"    {name}: held-out accuracy {r.accuracy:.2%} ({r.num_correct}/{r.num_questions})", flush=True)
    return {"accuracy": r.accuracy, "correct": r.num_correct, "questions": r.num_questions}


def _gspo_args(a, data) -> list[str]:
    extra = ["--tokenizer-model", data.tokenizer, "--reward", "exact", "--temperature", str(a.temperature)]
    extra += ["--rollouts-per-prompt", str(a.rollouts_per_prompt), "--max-new-tokens", str(a.max_new_tokens)]
    extra += ["--global-batch-size", str(a.prompts_per_step * a.rollouts_per_prompt)]
    extra += ["--micro-batch-size", str(min(a.rl_micro_batch_size, a.prompts_per_step * a.rollouts_per_prompt))]
    extra += ["--seq-length", str(a.rl_seq_length), "--ppo-epochs", str(a.ppo_epochs), "--kl-coeff", str(a.kl_coeff)]
    if a.clip_eps:
        extra += ["--clip-eps-low", str(a.clip_eps[0]), "--clip-eps-high", str(a.clip_eps[1])]
    return extra


def _sft_args(a, warmup: int) -> list[str]:
    return ["--seq-length", str(a.seq_length), "--global-batch-size", "2", "--lr-warmup-iters", str(warmup)]


def _control_iters(a, summary: dict) -> int:
    """Steps of more SFT that take the GSPO phase's wall time, at the SFT phase's measured seconds per
    step (start-up included in both, so the control phase's total matches)."""
    if a.control_iters is not None:
        summary["control_iters_rule"] = "given (--control-iters)"
        return a.control_iters
    per_step = summary["phases"]["sft"]["seconds"] / a.sft_iters
    n = max(1, round(summary["phases"]["gspo"]["seconds"] / per_step))
    summary["control_iters_rule"] = f"GSPO phase {summary['phases']['gspo']['seconds']}s / SFT {per_step:.3f}s per step"
    return n


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(argv: list[str] | None = None, run: Runner | None = None) -> int:
    """Run the phases (see the module docstring) with `run`'s commands (default: fresh processes)."""
    a = _parser().parse_args(argv)
    run = run or Runner()
    if a.quick:
        parser = _parser()
        for k, v in QUICK.items():  # --quick changes only what the command line left at its default
            if getattr(a, k) == parser.get_default(k):
                setattr(a, k, v)
    from internvl_mcore.config import get_preset
    from internvl_mcore.data.digits import build_digits_dataset, build_digits_rl_prompts

    out = os.path.abspath(a.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    summary: dict = {"args": vars(a)}
    phase = Phases(summary)
    size = get_preset("debug").vision.image_size
    counts = dict(multi_image=a.multi_image, text_only=a.text_only, max_single=a.max_single or None)
    data = phase("data", build_digits_dataset, os.path.join(out, "data"), size, seed=0, **counts)
    rl = build_digits_rl_prompts(os.path.join(out, "data"), size, seed=0, num_train=a.max_single or None)
    summary["rl_prompts"] = rl.num_train
    shards = phase("preprocess", _preprocess, run, a, data, rl, out)
    sft_extra = _sft_args(a, max(1, min(10, a.sft_iters // 10)))
    sft = phase("sft", _train, run, a, out, "sft", "2", shards["sft"], a.sft_iters, a.sft_lr, sft_extra)
    summary["heldout_sft"] = phase("eval_sft", _accuracy, run, a, data, out, "sft", sft)
    if "gspo" not in a.skip:
        extra = ["--pretrained", sft, *_gspo_args(a, data)]
        gspo = phase("gspo", _train, run, a, out, "gspo", "gspo", shards["prompts"], a.gspo_iters, a.gspo_lr, extra)
        summary["heldout_gspo"] = phase("eval_gspo", _accuracy, run, a, data, out, "gspo", gspo)
        records = _records(os.path.join(out, "logs", "gspo.jsonl"))
        summary["gspo_first"] = {k: records[0].get(k) for k in RL_FIELDS}
        summary["gspo_last"] = {k: records[-1].get(k) for k in RL_FIELDS}
        summary["gspo_within_10_minutes"] = summary["phases"]["gspo"]["seconds"] <= 600
        summary["gspo_log"] = [{k: r.get(k) for k in ("iteration", *RL_FIELDS)} for r in records]
    if "control" not in a.skip:
        n = summary["control_iters"] = _control_iters(a, summary) if "gspo" in summary["phases"] else a.control_iters
        extra = ["--pretrained", sft, *_sft_args(a, max(1, min(10, n // 10)))]
        control = phase("control", _train, run, a, out, "control", "2", shards["sft"], n, a.sft_lr, extra)
        summary["heldout_control"] = phase("eval_control", _accuracy, run, a, data, out, "control", control)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "gspo_log"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
