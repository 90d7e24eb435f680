"""Shared LoRA runs: a base checkpoint, the single-process reference run and a TP2 x PP2 run of the
same flags (each trained once per session, then checked by several tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import REPO
from tests.threads import torch_threads
from tests.worldpool import run_in_world

WORKER = REPO / "tests" / "lora" / "worker.py"
B_STD = 0.02
ITERS = 4


def lora_flags(model: str = "debug") -> list[str]:
    """Pretrain flags of every LoRA run here: adapters on both towers, no dropout (layouts must agree)."""
    return [
        "--model",
        model,
        "--mock-data",
        "--global-batch-size",
        "4",
        "--train-iters",
        str(ITERS),
        "--seq-length",
        "128",
        "--lr",
        "1e-3",
        "--lr-decay-style",
        "constant",
        "--stage",
        "finetune",
        "--lora-rank",
        "4",
        "--lora-target",
        "all",
        "--lora-dropout",
        "0",
    ]


def run_inprocess(argv: list[str], b_std: float = B_STD) -> dict:
    """One run in this process (a 1-rank gloo world): the references, resumes and refusals."""
    from tests.lora.worker import run

    with torch_threads(1):
        return run(argv, b_std)


def run_ranks(tmp: Path, nproc: int, argv: list[str], b_std: float = B_STD) -> list[dict]:
    """One run on the session's world of `nproc` ranks (tests/worldpool.py); returns every rank's report."""
    out = tmp / "report"
    run_in_world(WORKER, nproc, [str(out), str(b_std), *argv], timeout=400)
    return [json.loads((tmp / f"report.rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory) -> Path:
    """A canonical checkpoint of the debug model (what tools/convert_from_hf.py writes) to start from."""
    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.checkpoint.canonical import save_canonical
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.models.weights import canonical_state_dict, init_weights
    from internvl_mcore.parallel.state import init_distributed

    init_distributed(ParallelConfig(), seed=0)
    cfg = get_preset("debug")
    with torch_threads(1):
        model = build_model(cfg, ParallelConfig(), process_groups())
        init_weights(model, cfg, seed=77)
    path = tmp_path_factory.mktemp("base") / "canonical"
    save_canonical(path, cfg, canonical_state_dict(model), source={"format": "transformers", "dtype": "float32"})
    return path


@pytest.fixture(scope="session")
def ref_run(tmp_path_factory, base_ckpt) -> dict:
    """TP1 x PP1 reference: 4 LoRA steps from the base, checkpoints at iterations 2 and 4."""
    save = tmp_path_factory.mktemp("ref") / "ckpt"
    report = run_inprocess(lora_flags() + ["--pretrained", str(base_ckpt), "--save", str(save), "--save-interval", "2"])
    return {**report, "save": save}


@pytest.fixture(scope="session")
def tp2pp2_run(tmp_path_factory, base_ckpt) -> dict:
    """The same run on TP2 x PP2 (4 ranks), checkpoint at the end."""
    tmp = tmp_path_factory.mktemp("tp2pp2")
    save = tmp / "ckpt"
    reports = run_ranks(
        tmp,
        4,
        lora_flags()
        + [
            "--pretrained",
            str(base_ckpt),
            "--save",
            str(save),
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
        ],
    )
    return {"reports": reports, "save": save}
