"""LoRA training: every parallel layout follows the single-process losses, only adapters train, and
checkpoints hold the adapters, name their base, resume exactly and reshard across layouts.

Adapters start with a random B (worker.py), so from the first step on the losses depend on every
adapter's sharding (with B = 0 the first losses would agree whatever the sharding)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from .conftest import ITERS, lora_flags, run_inprocess, run_ranks

REL = 1e-5


def assert_close_losses(ref: list[float], got: list[float], what: str) -> None:
    assert len(ref) == len(got) == ITERS, (what, ref, got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= REL * abs(a), f"{what}: iteration {i + 1}: loss {b!r} vs single-process {a!r}"


def assert_only_adapters_train(report: dict) -> None:
    """Per rank: exactly the adapters require grad, have gradient buffers, changed, and are all
    the optimizer holds; every base parameter is bit-identical."""
    params = report["params"]
    lora = {n for n, v in params.items() if v["lora"]}
    assert {n for n, v in params.items() if v["requires_grad"]} == lora
    assert {n for n, v in params.items() if v["has_grad_buffer"]} == lora
    assert {n for n, v in params.items() if v["changed"]} == lora, "a base weight changed or an adapter did not"
    assert report["optimizer_numel"] == report["lora_numel"] > 0


def test_reference_run_trains_only_adapters(ref_run) -> None:
    assert_only_adapters_train(ref_run)
    # adapters on every layer of both towers: 4 linears x (2 ViT + 4 LLM layers), A and B each
    assert sum(v["lora"] for v in ref_run["params"].values()) == 4 * 6 * 2


@pytest.mark.timeout(600)
def test_tp2_pp2_matches_single_process(ref_run, tp2pp2_run) -> None:
    reports = tp2pp2_run["reports"]
    for r in reports:
        assert_only_adapters_train(r)
    assert_close_losses(ref_run["losses"], reports[0]["losses"], "TP2xPP2")
    for a, b in zip(ref_run["grad_norms"], reports[0]["grad_norms"]):
        assert abs(a - b) <= REL * abs(a)


def test_full_recompute_gives_the_same_training(ref_run, base_ckpt) -> None:
    # megatron-core's recompute is a reentrant checkpoint: with frozen embeddings the adapters inside
    # recomputed layers would get no gradient at all unless the embeddings' outputs require grad
    report = run_inprocess(lora_flags() + ["--pretrained", str(base_ckpt), "--recompute-granularity", "full"])
    assert_only_adapters_train(report)
    assert_close_losses(ref_run["losses"], report["losses"], "--recompute-granularity full")
    for a, b in zip(ref_run["grad_norms"], report["grad_norms"]):
        assert abs(a - b) <= REL * abs(a)


@pytest.fixture(scope="module")
def ref_6b(tmp_path_factory) -> dict:
    """Single-process reference on debug-6b: 3 ViT heads (padded to 4 at TP2: zero B rows / A
    columns), QK-norm, no qkv bias, tied embeddings, fresh weights from --seed; checkpoint at the end."""
    save = tmp_path_factory.mktemp("ref_6b") / "ckpt"
    return {**run_inprocess(lora_flags("debug-6b") + ["--save", str(save)]), "save": save}


@pytest.mark.timeout(600)
def test_pp2_matches_single_process(tmp_path, base_ckpt, ref_run) -> None:
    reports = run_ranks(
        tmp_path, 2, lora_flags() + ["--pretrained", str(base_ckpt), "--pipeline-model-parallel-size", "2"]
    )
    for r in reports:
        assert_only_adapters_train(r)
    assert_close_losses(ref_run["losses"], reports[0]["losses"], "PP2")


@pytest.mark.timeout(600)
def test_tp2_sequence_parallel_with_padded_heads_matches_single_process(tmp_path, ref_6b) -> None:
    reports = run_ranks(
        tmp_path,
        2,
        lora_flags("debug-6b")
        + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--save", str(tmp_path / "ckpt")],
    )
    for r in reports:
        assert_only_adapters_train(r)
    assert_close_losses(ref_6b["losses"], reports[0]["losses"], "debug-6b TP2 + sequence parallel")
    check_padded_checkpoint_exports(tmp_path / "ckpt", ref_6b["save"], tmp_path)


def check_padded_checkpoint_exports(padded: Path, ref: Path, tmp: Path) -> None:
    """The TP2 checkpoint holds padded ViT heads (4 instead of 3: extra B rows of qkv, A columns of
    proj); read and exported from its files, the padding is gone and everything equals the TP1 run's."""
    from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint
    from internvl_mcore.checkpoint.dist_reader import DistCheckpointReader
    from internvl_mcore.checkpoint.safetensors_io import SafetensorsDir
    from internvl_mcore.convert import convert_hf_to_checkpoint
    from internvl_mcore.convert.lora_export import export_lora, merge_adapters, read_lora_checkpoint

    ckpt, want = read_lora_checkpoint(padded), read_lora_checkpoint(ref)
    reader = DistCheckpointReader(ckpt.path)
    vit = "vision_model.encoder.layers.self_attention."
    assert reader.shape(vit + "linear_qkv.lora.b")[1:] == (4 * 3 * 16, 4)  # saved padded: 4 heads of (q, k, v)
    assert reader.shape(vit + "linear_proj.lora.a")[1:] == (4, 4 * 16)
    assert sorted(ckpt.base) == sorted(want.base) and sorted(ckpt.adapters) == sorted(want.adapters)
    for name, t in ckpt.base.items():
        assert torch.equal(t, want.base[name]), name
    for name, t in ckpt.adapters.items():
        torch.testing.assert_close(t, want.adapters[name], rtol=1e-4, atol=1e-6, msg=name)
    export_lora(padded, tmp / "merged", "internvl", merge=True, lora_only=False)
    convert_hf_to_checkpoint(tmp / "merged", tmp / "back")
    back = CanonicalCheckpoint.open(tmp / "back").tensors
    merged = merge_adapters(want.base, want.adapters, want.lora.config.scaling)
    assert sorted(back) == sorted(merged)
    for name, t in merged.items():
        torch.testing.assert_close(back[name], t, rtol=1e-4, atol=1e-5, msg=name)
    (adapter,) = export_lora(padded, tmp / "adapter", "transformers", merge=False, lora_only=True)
    peft = SafetensorsDir(adapter.parent)
    assert len(peft) == 2 * (4 * 7 + 2 * 6)  # every adapted module of both towers, A and B
    assert peft.shape("base_model.model.model.vision_tower.encoder.layer.0.attention.q_proj.lora_B.weight") == (48, 4)


# --- checkpoints ------------------------------------------------------------------------------


def _run_json(root: Path) -> dict:
    it = int((root / "latest_checkpointed_iteration.txt").read_text())
    return json.loads((root / f"iter_{it:07d}" / "run.json").read_text())


def test_checkpoint_names_its_base(ref_run, base_ckpt) -> None:
    lora = _run_json(ref_run["save"])["lora"]
    assert lora["base"] == str(Path(base_ckpt).resolve())
    assert (lora["lora_rank"], lora["lora_target"]) == (4, "all")


def test_resume_is_exact_and_keeps_the_base(tmp_path, ref_run, base_ckpt) -> None:
    # the reference saved at iterations 2 and 4: resume a copy of iteration 2 for two more steps
    root = tmp_path / "resume"
    root.mkdir()
    shutil.copytree(ref_run["save"] / "iter_0000002", root / "iter_0000002")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    report = run_inprocess(lora_flags() + ["--load", str(root), "--save", str(root)])
    assert report["losses"] == ref_run["losses"][2:], "resumed losses differ from the uninterrupted run"
    for name, t in report["adapters"].items():
        assert torch.equal(t, ref_run["adapters"][name]), name
    # the resumed run has no --pretrained, yet its checkpoint still names the original base
    assert _run_json(root)["lora"]["base"] == str(Path(base_ckpt).resolve())


@pytest.mark.timeout(600)
def test_tp2_pp2_checkpoint_reshards_to_tp1(ref_run, tp2pp2_run, base_ckpt) -> None:
    """dist_checkpointing puts every adapter shard at its place in the global tensor (B rows of fused
    qkv / gated fc1, A columns of row-parallel layers): read at TP1 they equal the TP1 run's."""
    from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint
    from internvl_mcore.convert.lora_export import read_lora_checkpoint

    ckpt = read_lora_checkpoint(tp2pp2_run["save"])
    assert sorted(ckpt.adapters) == sorted(ref_run["adapters"])
    for name, ref in ref_run["adapters"].items():
        torch.testing.assert_close(ckpt.adapters[name], ref, rtol=1e-4, atol=1e-6, msg=name)
    base = CanonicalCheckpoint.open(base_ckpt).tensors
    for name, t in ckpt.base.items():  # frozen through 4 steps at TP2 x PP2 and a save: bit-identical
        assert torch.equal(t, base[name]), name


def test_pretrained_lora_checkpoint_loads_merged(ref_run) -> None:
    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.convert.lora_export import merge_adapters, read_lora_checkpoint
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.models.weights import canonical_state_dict
    from internvl_mcore.training.checkpoint import load_weights

    cfg = get_preset("debug")
    model = build_model(cfg, ParallelConfig(), process_groups())
    assert "merged" in load_weights(ref_run["save"], model, cfg)
    assert not any(".lora." in n for n, _ in model.named_parameters())
    ckpt = read_lora_checkpoint(ref_run["save"])
    want = merge_adapters(ckpt.base, ckpt.adapters, ckpt.lora.config.scaling)
    got = canonical_state_dict(model)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7, msg=name)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--no-freeze-projector"], "--no-freeze-projector"),
        (["--freeze-vit", "--unfreeze-vit-layers", "1"], "--unfreeze-vit-layers"),
        (["--lora-modules", "linear_qkv", "q_proj"], "--lora-modules"),
    ],
)  # (--lora-dropout 1.5 stops at parse time: tests/reliability/test_flag_domains.py)
def test_contradictory_lora_flags_are_refused(extra, message) -> None:
    from pretrain_internvl import parse_run_config
    from internvl_mcore.training.loop import validate
    from internvl_mcore.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        validate(parse_run_config(lora_flags() + extra))


def _without_lora(argv: list[str]) -> list[str]:
    """`argv` without its LoRA flags: a run without adapters (their sub-flags alone are refused)."""
    out = list(argv)
    for flag in ("--lora-rank", "--lora-target", "--lora-dropout"):
        i = out.index(flag)
        del out[i : i + 2]
    return out


@pytest.mark.parametrize(
    "flags,message",
    [
        (None, "holds LoRA adapters"),
        (["--lora-rank", "8"], "--lora-rank: checkpoint 4, run 8"),
    ],
)
def test_resume_with_other_lora_settings_is_refused(ref_run, flags, message) -> None:
    from internvl_mcore.errors import CheckpointError

    argv = _without_lora(lora_flags()) if flags is None else lora_flags() + flags
    with pytest.raises(CheckpointError, match=message):
        run_inprocess(argv + ["--load", str(ref_run["save"])])
