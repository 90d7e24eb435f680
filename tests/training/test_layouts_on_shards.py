"""On the same shards and seed, the first 10 losses of every layout equal the single-process run."""
import json

import pytest

from tests.launch import REPO, torchrun
from tests.training.conftest import SEQ

SCRIPT = REPO / "pretrain_internvl.py"
ITERS = 10
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
    "cp4-2d": (4, ["--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p",
                   "--hierarchical-context-parallel-sizes", "2", "2"]),
}


def _run(shards, out, nproc, flags):
    args = ["--model", "debug", "--data-path", shards, "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--seq-length", str(SEQ), "--lr", "2e-3", "--lr-warmup-iters", "2", "--seed", "5",
            "--log-jsonl", str(out), *flags]
    torchrun(SCRIPT, nproc, args, timeout=400)
    return [json.loads(line)["loss"] for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(digits_shards, tmp_path_factory):
    return _run(digits_shards, tmp_path_factory.mktemp("ref") / "ref.jsonl", 1, [])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_first_losses_match_single_process(digits_shards, reference, tmp_path, name):
    nproc, flags = LAYOUTS[name]
    losses = _run(digits_shards, tmp_path / "run.jsonl", nproc, flags)
    assert len(losses) == len(reference) == ITERS
    for i, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name} iteration {i + 1}: {a} vs single-process {b}"
    assert reference[-1] < reference[0] - 0.5  # the run actually learns
