"""On the same shards and seed, the first 5 losses of every layout (stopped by --exit-interval inside the
same 10-step LR schedule: warm-up and decay both seen) equal the single-process run (that run is the
session's shared one: tests/conftest.py's `pretrain_log`, also used by test_device_tiling.py). Every
run is a job of the session's reused worlds (tests/conftest.py `pretrain`): the subject is the layouts'
arithmetic, not the launch."""

import json

import pytest

from tests.conftest import DIGITS_ITERS as ITERS, digits_run_args, pretrain

# the layouts' steps are most of this file's CPU: half of the shared reference's steps check the same
# arithmetic (forward, backward, the optimizer's update under warm-up and decay) at half the cost
LAYOUT_ITERS = 5

LAYOUTS = {  # name: (processes, flags)
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "dp2": (2, []),
    "dp2-distopt": (2, ["--use-distributed-optimizer"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "dp2pp2": (4, ["--pipeline-model-parallel-size", "2"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "cp2-tp2": (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"]),
    "cp4-2d": (
        4,
        [
            "--context-parallel-size",
            "4",
            "--cp-comm-type",
            "a2a+p2p",
            "--hierarchical-context-parallel-sizes",
            "2",
            "2",
        ],
    ),
}


def _run(shards, out, nproc, flags):
    pretrain(nproc, digits_run_args(shards, "--log-jsonl", str(out), *flags), timeout=400)
    return [json.loads(line)["loss"] for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(digits_shards, pretrain_log):
    return [r["loss"] for r in pretrain_log(1, digits_run_args(digits_shards))]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_first_losses_match_single_process(digits_shards, reference, tmp_path, name):
    nproc, flags = LAYOUTS[name]
    losses = _run(digits_shards, tmp_path / "run.jsonl", nproc, flags + ["--exit-interval", str(LAYOUT_ITERS)])
    assert len(losses) == LAYOUT_ITERS and len(reference) == ITERS
    for i, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name} iteration {i + 1}: {a} vs single-process {b}"
    assert reference[-1] < reference[0] - 0.5  # the run actually learns


# --- a checkpoint that is no preset: HF -> --model DIR -> TP2 -----------------------------------------


@pytest.fixture(scope="module")
def qwen3_dirs(digits_shards, tmp_path_factory):
    """A tiny Qwen3-dense InternVL (per-head QK-norm, head_dim 32 != 64 / 4 heads, InternViT-300M-style
    vision: no preset has this shape) saved by transformers with the digits tokenizer next to it, and
    the same checkpoint converted by tools/convert_from_hf.py's code."""
    import shutil
    from pathlib import Path

    from internvl_mcore.convert import convert_hf_to_checkpoint
    from tests.convert.tiny_hf import save_transformers_dir, tiny_transformers_model

    root = tmp_path_factory.mktemp("qwen3")
    hf = save_transformers_dir(tiny_transformers_model("qwen3", "300m", tie=False, seed=3), root / "hf")
    tokenizer = Path(digits_shards).parents[1] / "tokenizer"
    for f in tokenizer.iterdir():
        shutil.copy(f, hf / f.name)
    convert_hf_to_checkpoint(hf, root / "ckpt")
    return hf, root / "ckpt"


def test_qwen3_checkpoint_dir_trains_the_same_at_tp2(digits_shards, qwen3_dirs, tmp_path):
    """`--model DIR --pretrained DIR` on the HF directory (single process) and on its converted
    checkpoint at TP2 (stopped after 5 of the 10 steps): the first 5 losses agree, so the config inferred from the directory, the
    on-the-fly HF load, the conversion and the QK-norm / head_dim sharding all line up."""
    hf, ckpt = qwen3_dirs
    ref = _run(digits_shards, tmp_path / "ref.jsonl", 1, ["--model", str(hf), "--pretrained", str(hf)])
    tp2 = _run(
        digits_shards,
        tmp_path / "tp2.jsonl",
        2,
        ["--model", str(ckpt), "--pretrained", str(ckpt), "--tensor-model-parallel-size", "2"]
        + ["--exit-interval", str(LAYOUT_ITERS)],
    )
    assert len(ref) == ITERS and len(tp2) == LAYOUT_ITERS
    for i, (a, b) in enumerate(zip(tp2, ref)):
        assert abs(a - b) <= 1e-5 * abs(b), f"qwen3 TP2 iteration {i + 1}: {a} vs single-process {b}"
    assert ref[-1] < ref[0] - 0.5
