#!/usr/bin/env python
"""MPO after SFT on the digits: preference training (--stage mpo) on top of a short stage-2 SFT run.

    python examples/digits/run_mpo.py [--out runs/mpo_demo] [--sft-iters 150] [--mpo-iters 100]

Phases (2 gloo CPU processes, pipeline parallel 2, the `debug` model):

  1. data        the digits (internvl_mcore/data/digits.py) plus an MMPR preference set over the training
                 images: chosen = the right digit, rejected = a wrong one
  2. preprocess  SFT shards, and preference shards (tools/preprocess_mm_data.py --preference)
  3. SFT         pretrain_internvl.py --stage 2, deliberately short (the model is left imperfect)
  4. evaluate    export to transformers, held-out accuracy of the SFT model
  5. MPO         pretrain_internvl.py --stage mpo --pretrained SFT (reference = the SFT weights)
  6. evaluate    held-out accuracy after MPO

summary.json holds both accuracies and the MPO run's first / last logged reward accuracy and margin.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_digits_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "mpo_demo"))
    p.add_argument("--sft-iters", type=int, default=150, help="stage-2 SFT steps (default 150)")
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--mpo-iters", type=int, default=100, help="MPO steps (default 100)")
    p.add_argument(
        "--mpo-lr",
        type=float,
        default=1e-3,
        help="MPO peak lr (InternVL's 2e-7 is for billion-parameter models; default 1e-3)",
    )
    p.add_argument("--pairs", type=int, default=1000, help="preference pairs (training images) (default 1000)")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    demo, ev = _load("run_demo"), _load("evaluate")
    from internvl_mcore.config import get_preset
    from internvl_mcore.data.digits import build_digits_dataset
    from internvl_mcore.parallel.state import free_port

    out = os.path.abspath(a.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    data = build_digits_dataset(
        os.path.join(out, "data"), image_size=get_preset("debug").vision.image_size, seed=0, preference_pairs=a.pairs
    )
    shards = {}
    for kind, meta, extra in (("sft", data.meta, []), ("pref", data.preference_meta, ["--preference"])):
        shards[kind] = os.path.join(out, "shards", kind)
        demo._run(
            [
                sys.executable,
                "tools/preprocess_mm_data.py",
                "--meta",
                meta,
                "--tokenizer",
                data.tokenizer,
                "--output-prefix",
                shards[kind],
                "--seq-length",
                str(a.seq_length),
                "--model",
                "debug",
                "--system-prompt",
                "",
                "--workers",
                "2",
                "--no-progress",
                *extra,
            ],
            os.path.join(logs, f"preprocess_{kind}.log"),
            show=lambda line: line.startswith(("inputs", "packs")),
        )

    def train(name: str, stage: str, data_path: str, iters: int, lr: float, extra: list[str]) -> str:
        save = os.path.join(out, name)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "pretrain_internvl.py",
            "--model",
            "debug",
            "--pipeline-model-parallel-size",
            "2",
            "--data-path",
            data_path,
            "--stage",
            stage,
            "--train-iters",
            str(iters),
            "--lr",
            str(lr),
            "--seq-length",
            str(a.seq_length),
            "--global-batch-size",
            "2",
            "--seed",
            str(a.seed),
            "--weight-decay",
            "0.1",
            "--drop-path-rate",
            "0",
            "--log-interval",
            "10",
            "--log-jsonl",
            os.path.join(logs, f"{name}.jsonl"),
            "--save",
            save,
            "--overwrite-checkpoints",
            *extra,
        ]  # a re-run replaces its own checkpoints
        demo._run(cmd, os.path.join(logs, f"{name}.log"), show=lambda line: line.startswith(("iteration", "error")))
        return save

    def accuracy(name: str, ckpt: str) -> float:
        hf = os.path.join(out, f"hf_{name}")
        demo._run(
            [
                sys.executable,
                "tools/convert_to_hf.py",
                "--load",
                ckpt,
                "--save",
                hf,
                "--format",
                "transformers",
                "--overwrite",
            ],  # a re-run replaces its own export
            os.path.join(logs, f"export_{name}.log"),
        )
        r = ev.evaluate(hf, data.heldout, data.tokenizer, "", batch_size=128, progress=False)
        print(f"{name}: held-out accuracy {r.accuracy:.2%} ({r.num_correct}/{r.num_questions})", flush=True)
        return r.accuracy

    sft = train("sft", "2", shards["sft"], a.sft_iters, a.sft_lr, ["--lr-warmup-iters", "10"])
    acc_sft = accuracy("sft", sft)
    mpo = train("mpo", "mpo", shards["pref"], a.mpo_iters, a.mpo_lr, ["--pretrained", sft])
    acc_mpo = accuracy("mpo", mpo)
    with open(os.path.join(logs, "mpo.jsonl")) as f:
        records = [json.loads(line) for line in f]
    summary = {
        "args": vars(a),
        "heldout_accuracy_sft": acc_sft,
        "heldout_accuracy_mpo": acc_mpo,
        "mpo_first": {k: records[0][k] for k in ("loss", "reward_accuracy", "reward_margin")},
        "mpo_last": {k: records[-1][k] for k in ("loss", "reward_accuracy", "reward_margin")},
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
