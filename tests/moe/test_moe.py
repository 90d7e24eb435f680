"""Qwen3-MoE InternVL through megatron-core's MoE layer, with expert parallelism.

A tiny transformers `InternVLForConditionalGeneration` with a `qwen3_moe` text config (4 experts,
top-2, renormalized top-k probabilities, per-head QK-norm), built offline from its config:

- its logits = ours within 1e-4 (fp32), converted from both HF layouts;
- HF -> convert -> training at EP2, TP2(+SP) x EP2 (expert-TP 2 and 1) and PP2 x EP2 (distributed
  optimizer): every gradient of one global batch equals the single-process one (aux loss included;
  all but the PP2 run, whose distributed optimizer leaves only shards of the gradients), and
  the first 10 losses equal the single-process run within 1e-5 (the logged aux losses within 5e-5);
- at every layout, the --pretrained shards each rank read through slices (canonical and HF) equal
  the shards cut from the whole tensors bit for bit;
- EP2 resumes exactly from a checkpoint (expert weights and their optimizer state);
- the EP2 training checkpoint exports to transformers (read without a model, checkpoint/dist_reader.py)
  and transformers' logits equal ours loaded at EP1 (dist-checkpointing reshards the experts), whose
  weights equal the reader's canonical tensors bit for bit.

One job per layout (tests/worldpool.py) runs all of that layout's checks (tests/moe/moe_worker.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.convert.tiny_hf import save_transformers_dir, tiny_batch, tiny_transformers_model, write_internvl_dir  # noqa: E402
from tests.launch import REPO  # noqa: E402
from tests.worldpool import run_in_world  # noqa: E402

pytest.importorskip("transformers")

WORKER = REPO / "tests" / "moe" / "moe_worker.py"
TOL = 1e-5
AUX_TOL = 5e-5  # the logged aux loss (not part of the 1e-5 loss criterion) drifts a little more
LAYOUTS = {  # name: (processes, worker flags)
    "ep2": (2, ["--ep", "2", "--grads"]),
    "tp2-ep2": (4, ["--tp", "2", "--ep", "2", "--grads"]),  # expert-TP = TP = 2: experts split too
    "tp2-etp1-ep2": (4, ["--tp", "2", "--ep", "2", "--etp", "1", "--grads"]),  # whole experts under TP2
    "pp2-ep2-distopt": (4, ["--pp", "2", "--ep", "2", "--dist-opt"]),
}


@pytest.fixture(scope="module")
def hf_model():
    return tiny_transformers_model("qwen3_moe", "300m", False, seed=7)


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    """The tiny model saved by transformers and converted to a canonical checkpoint."""
    from internvl_mcore.convert import convert_hf_to_checkpoint

    root = tmp_path_factory.mktemp("moe")
    hf_dir = save_transformers_dir(hf_model, root / "hf")
    convert_hf_to_checkpoint(hf_dir, root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def reference(converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_in_world(WORKER, 1, ["--ckpt", str(converted), "--out", str(out), "--ref"], timeout=240)
    return out


@pytest.fixture(scope="module")
def ep2_run(converted, reference, tmp_path_factory):
    """The EP2 world, which also checkpoints and resumes (its checkpoint feeds the export test)."""
    out = tmp_path_factory.mktemp("ep2")
    (out / "ref.pt").symlink_to(reference / "ref.pt")
    nproc, flags = LAYOUTS["ep2"]
    run_in_world(
        WORKER, nproc, ["--ckpt", str(converted), "--out", str(out), "--save", str(out / "save"), *flags], timeout=300
    )
    return out


def _ours(model_cfg, par, load):
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups

    model = build_model(model_cfg, par, process_groups()).eval()
    load(model)
    return model


@pytest.mark.parametrize("layout", ["transformers", "internvl"])
@torch.no_grad()
def test_logits_match_transformers(world, hf_model, tmp_path, layout):
    from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint
    from internvl_mcore.convert import convert_hf_to_checkpoint
    from internvl_mcore.models.weights import load_canonical

    hf_dir = (
        save_transformers_dir(hf_model, tmp_path / "hf")
        if layout == "transformers"
        else write_internvl_dir(hf_model, tmp_path / "hf", family="qwen3_moe")
    )
    cfg = convert_hf_to_checkpoint(hf_dir, tmp_path / "ckpt")
    m = cfg.llm
    assert (m.family, m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size) == ("qwen3_moe", 4, 2, 32)
    assert m.moe_norm_topk_prob and m.qk_layernorm and cfg.name == "debug-moe"
    # router_aux_loss_coef 0.01 x top-k 2 / 2 layers: megatron-core's per-layer coefficient
    assert m.moe_aux_loss_coeff == pytest.approx(0.01)
    ckpt = CanonicalCheckpoint.open(tmp_path / "ckpt")
    ours = _ours(ckpt.config, world, lambda m: load_canonical(m, ckpt.tensors, ckpt.config))

    ids, pixels = tiny_batch(seed=3)
    want = hf_model(input_ids=ids, pixel_values=pixels).logits  # (B, S, V)
    pos = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape[0], -1)
    got = ours(ids, pos, pixels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the experts matter: zeroing one expert's weights changes the logits
    fc2 = ours.language_model.decoder.layers[0].mlp.experts.local_experts[1].linear_fc2.weight
    fc2.zero_()
    assert (ours(ids, pos, pixels) - got).abs().max() > 1e-4


def _reports(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _check_layout(name: str, reports: list[dict], ref: dict) -> None:
    for r in reports:
        assert r["slice_checked"] > 0 and not r["slice_mismatch"], (name, r["rank"], r["slice_mismatch"])
        assert not r["global_lookups"], f"{name}: megatron-core used its global groups in {r['global_lookups']}"
        if "max_rel_grad_err" in r:
            assert r["params_checked"] > 0 and r["expert_params"] > 0, r
            assert r["max_rel_grad_err"] < TOL, (name, r["rank"], r["worst"], r["max_rel_grad_err"])
        for key, tol in (("losses", TOL), ("aux_losses", AUX_TOL)):
            assert len(r[key]) == len(ref[key]) == 10
            for i, (a, b) in enumerate(zip(r[key], ref[key])):
                assert abs(a - b) <= tol * abs(b), f"{name} rank {r['rank']} {key} iteration {i + 1}: {a} vs {b}"
    assert len(set(ref["losses"])) > 1 and all(a > 0.5 for a in ref["aux_losses"])  # training moves; aux logged


def test_ep2_gradients_losses_and_exact_resume(ep2_run, reference):
    ref = json.loads((reference / "rank0.json").read_text())
    reports = _reports(ep2_run, 2)
    _check_layout("ep2", reports, ref)
    for r in reports:
        assert r["expert_params"] == 2 * 2 * 2  # 2 of 4 experts x (fc1, fc2) x 2 layers on each EP rank
        assert r["resumed_at"] == 5
        assert r["resumed_losses"] == r["losses"][5:], "resume from iteration 5 is not exact"


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "ep2"])
def test_layout_matches_single_process(converted, reference, tmp_path, name):
    nproc, flags = LAYOUTS[name]
    (tmp_path / "ref.pt").symlink_to(reference / "ref.pt")
    run_in_world(WORKER, nproc, ["--ckpt", str(converted), "--out", str(tmp_path), *flags], timeout=300)
    _check_layout(name, _reports(tmp_path, nproc), json.loads((reference / "rank0.json").read_text()))


@torch.no_grad()
def test_ep2_checkpoint_exports_to_transformers(world, ep2_run, tmp_path):
    from transformers import InternVLForConditionalGeneration

    from internvl_mcore.checkpoint.canonical import model_config_from_dict
    from internvl_mcore.checkpoint.dist_canonical import DistCanonicalView
    from internvl_mcore.checkpoint.dist_reader import DistCheckpointReader
    from internvl_mcore.convert import convert_checkpoint_to_hf
    from internvl_mcore.models.weights import canonical_state_dict
    from internvl_mcore.training.checkpoint import load_weights

    save = ep2_run / "save"
    convert_checkpoint_to_hf(save, tmp_path / "hf", "transformers")
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    info = json.loads((save / "iter_0000010" / "run.json").read_text())
    assert info["layout"]["expert_model_parallel_size"] == 2
    cfg = model_config_from_dict(info["model"])
    ours = _ours(cfg, world, lambda m: load_weights(save, m, cfg))  # EP2 checkpoint -> EP1 model
    # the export read the experts without a model: the same tensors megatron-core's resharding loads
    state = canonical_state_dict(ours)
    view = DistCanonicalView(DistCheckpointReader(save / "iter_0000010"), cfg)
    assert sorted(view) == sorted(state) and all(torch.equal(view[k], state[k]) for k in state)
    ids, pixels = tiny_batch(seed=5)
    pos = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape[0], -1)
    torch.testing.assert_close(
        ours(ids, pos, pixels), hf(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=1e-4
    )
