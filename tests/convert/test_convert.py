"""Checkpoint converters: HF (both layouts, three LLM families) -> canonical -> TP2xPP2 -> HF.

- round trips are bit-exact (tensor names, dtypes, values; config.json) from TP1 and via a real
  TP2 x PP2 model (spawned gloo processes load the shards and gather them back), and both give
  byte-identical files (through training checkpoints of TP2 x PP2 and TP2 x EP2: test_dist_export.py);
- InternVL-layout tensors land on the right modules: a checkpoint written by tiny_hf.py's
  independent restatement of InternVL's layout, converted to transformers' layout, loads in
  `InternVLForConditionalGeneration` and reproduces the original model's logits and ours;
- malformed inputs are refused with the offending key in the message, before anything is written.
"""

from __future__ import annotations

import dataclasses

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint
from internvl_mcore.checkpoint.safetensors_io import SafetensorsDir, ShardedWriter, plan_of
from internvl_mcore.config import PRESETS
from internvl_mcore.errors import ConversionError
from internvl_mcore.convert import (
    canonical_shapes,
    convert_checkpoint_to_hf,
    convert_hf_to_checkpoint,
    hf_config_for,
    model_config_from_hf,
    verify_layout,
)
from internvl_mcore.convert.keymaps import canonical_names

from .tiny_hf import IMG_END, IMG_START, save_transformers_dir, tiny_batch, tiny_transformers_model, write_internvl_dir

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]

# name -> (HF format, text model, vision, tied, LLM family in the InternVL layout, dtype)
SOURCES = {
    "internvl-qwen2": ("internvl", "qwen2", "300m", False, "qwen2", torch.bfloat16),
    "internvl-llama": ("internvl", "llama", "6b", True, "llama", torch.bfloat16),
    "internvl-internlm2": ("internvl", "llama", "6b", False, "internlm2", torch.bfloat16),
    "transformers-qwen2": ("transformers", "qwen2", "300m", False, None, torch.float32),
    "transformers-llama": ("transformers", "llama", "6b", True, None, torch.bfloat16),
    "internvl-qwen3": ("internvl", "qwen3", "6b", False, "qwen3", torch.bfloat16),
    "transformers-qwen3": ("transformers", "qwen3", "300m", True, None, torch.float32),
}


def make_source(name: str, path: Path, seed: int = 11) -> Path:
    fmt, text, vision, tie, family, dtype = SOURCES[name]
    model = tiny_transformers_model(text, vision, tie, seed=seed)
    if fmt == "transformers":
        return save_transformers_dir(model, path, dtype)
    return write_internvl_dir(model, path, family, dtype)


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = SafetensorsDir(a_dir), SafetensorsDir(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        ta, tb = a[k], b[k]
        assert ta.dtype == tb.dtype, k
        assert ta.shape == tb.shape, k
        assert torch.equal(ta, tb), k


def config_of(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _in_reused_world(tp: int, pp: int, jobs: list, result_dir: str) -> None:
    """verify_layout's ranks as a job of the session's world of tp * pp ranks, not tp * pp spawned
    interpreters (tests/convert/layout_worker.py)."""
    from tests.launch import REPO
    from tests.worldpool import run_in_world

    worker = REPO / "tests" / "convert" / "layout_worker.py"
    run_in_world(worker, tp * pp, [str(tp), str(pp), result_dir, json.dumps(jobs)], timeout=240)


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Every source converted to canonical at TP1 and exported, then loaded into TP2 x PP2 and
    gathered back (one job of the session's 4-rank world for all sources), and exported again."""
    root = tmp_path_factory.mktemp("round_trip")
    runs = {}
    for name, (fmt, *_rest) in SOURCES.items():
        d = root / name
        src = make_source(name, d / "hf")
        convert_hf_to_checkpoint(src, d / "ckpt_tp1")
        convert_checkpoint_to_hf(d / "ckpt_tp1", d / "out_tp1", fmt, template_dir=src)
        runs[name] = dict(
            src=src,
            fmt=fmt,
            ckpt=d / "ckpt_tp1",
            gathered=d / "ckpt_tp2pp2",
            out_tp1=d / "out_tp1",
            out_tp2pp2=d / "out_tp2pp2",
        )
    verify_layout([(r["ckpt"], r["gathered"]) for r in runs.values()], tp=2, pp=2, run_world=_in_reused_world)
    for r in runs.values():
        convert_checkpoint_to_hf(r["gathered"], r["out_tp2pp2"], r["fmt"], template_dir=r["src"])
    return runs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SOURCES))
def test_round_trip_bit_exact(round_trips, name: str) -> None:
    r = round_trips[name]
    for out in (r["out_tp1"], r["out_tp2pp2"]):
        assert_same_tensors(r["src"], out)
        assert config_of(out) == config_of(r["src"])
    # the remote-code and tokenizer files come along for InternVL's layout
    if r["fmt"] == "internvl":
        assert (r["out_tp1"] / "modeling_internvl_chat.py").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SOURCES))
def test_tp1_and_tp2pp2_give_identical_files(round_trips, name: str) -> None:
    r = round_trips[name]
    files = sorted(p.name for p in r["out_tp1"].iterdir())
    assert files == sorted(p.name for p in r["out_tp2pp2"].iterdir())
    for f in files:
        assert (r["out_tp1"] / f).read_bytes() == (r["out_tp2pp2"] / f).read_bytes(), f


def test_gathered_checkpoint_records_layout(round_trips) -> None:
    meta = CanonicalCheckpoint.open(round_trips["internvl-qwen2"]["gathered"]).meta
    assert meta["layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}


@pytest.mark.timeout(300)
def test_verify_layout_spawns_its_own_world(round_trips) -> None:
    """Without a world given, verify_layout spawns its gloo processes (the fixture's TP2 x PP2 check
    runs in the session's reused world): one rank here, the same load, gather and report."""
    r = round_trips["transformers-qwen2"]
    (report,) = verify_layout([(r["ckpt"], None)], tp=1, pp=1, timeout_s=280)
    assert report["ckpt"] == str(r["ckpt"]) and report["mismatched"] == report["missing_in_file"] == []


# --- the InternVL layout maps to the right modules ---------------------------------------------


@pytest.mark.parametrize(
    "text,vision,tie,family",
    [
        ("qwen2", "300m", False, "qwen2"),
        ("llama", "6b", False, "internlm2"),
        ("llama", "6b", True, "llama"),
        ("qwen3", "300m", False, "qwen3"),
    ],
)
@torch.no_grad()
def test_internvl_layout_exports_to_transformers_with_same_logits(
    world, tmp_path: Path, monkeypatch, text, vision, tie, family
) -> None:
    from transformers import InternVLForConditionalGeneration

    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.models.weights import load_canonical
    from internvl_mcore.parallel.state import process_groups

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = tiny_transformers_model(text, vision, tie, seed=5)
    src = write_internvl_dir(original, tmp_path / "internvl", family, torch.float32)
    convert_hf_to_checkpoint(src, tmp_path / "ckpt")
    convert_checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "hf", "transformers")

    exported = InternVLForConditionalGeneration.from_pretrained(
        str(tmp_path / "hf"), attn_implementation="eager"
    ).eval()
    ckpt = CanonicalCheckpoint.open(tmp_path / "ckpt")
    assert ckpt.config.llm.family == family
    ours = build_model(ckpt.config, world, process_groups()).eval()
    load_canonical(ours, ckpt.tensors, ckpt.config)

    ids, pixels = tiny_batch(seed=4)
    pos = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape[0], -1)
    want = original(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(exported(input_ids=ids, pixel_values=pixels).logits, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(ids, pos, pixels), want, atol=1e-4, rtol=1e-4)


def test_canonical_shapes_match_the_model(world) -> None:
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.models.weights import canonical_state_dict

    for name in ("debug", "debug-6b", "debug-qwen3"):
        cfg = PRESETS[name]
        state = canonical_state_dict(build_model(cfg, world, process_groups()))
        shapes = canonical_shapes(cfg)
        assert sorted(state) == sorted(canonical_names(cfg))  # the key map places exactly the model's tensors
        for k, t in state.items():
            assert shapes[k] == tuple(t.shape), k


# --- config.json inference ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["internvl", "transformers"])
@pytest.mark.parametrize("preset", [p for p in PRESETS])
def test_config_round_trip_for_every_preset(fmt: str, preset: str, tmp_path: Path) -> None:
    cfg = PRESETS[preset]
    if fmt == "transformers" and cfg.llm.family == "internlm2":
        # transformers has no InternLM2 class: exported in Llama naming (same math), read back as such;
        # no preset has that shape, so the special ids come from the tokenizer files (refused without)
        config = hf_config_for(cfg, fmt, torch.bfloat16)
        with pytest.raises(ConversionError, match="img_start_token_id, img_end_token_id, pad_token_id are unknown"):
            model_config_from_hf(config)
        tokens = {cfg.img_start_token_id: "<img>", cfg.img_end_token_id: "</img>", cfg.pad_token_id: "<pad>"}
        (tmp_path / "tokenizer_config.json").write_text(
            json.dumps(
                {"added_tokens_decoder": {str(i): {"content": t} for i, t in tokens.items()}, "pad_token": "<pad>"}
            )
        )
        back, got_fmt = model_config_from_hf(config, tmp_path)
        assert back.llm == dataclasses.replace(cfg.llm, family="llama") and back.vision == cfg.vision
        assert [back.img_context_token_id, back.img_start_token_id, back.img_end_token_id, back.pad_token_id] == [
            cfg.img_context_token_id,
            cfg.img_start_token_id,
            cfg.img_end_token_id,
            cfg.pad_token_id,
        ]
        return
    back, got_fmt = model_config_from_hf(hf_config_for(cfg, fmt, torch.bfloat16))
    assert got_fmt == fmt
    # InternVL2.5-1B/38B/78B have InternVL3's shapes: a config of either reads as the first preset
    same_shape = [p.name for p in PRESETS.values() if p.replace(name="") == cfg.replace(name="")]
    assert back.name == same_shape[0]
    if fmt == "internvl":
        assert back == cfg.replace(name=back.name)
    else:  # transformers' config has no chat template: the preset's is used
        assert back == cfg.replace(name=back.name, template=back.template)


def test_special_tokens_come_from_tokenizer_files(tmp_path: Path) -> None:
    src = write_internvl_dir(tiny_transformers_model("qwen2", "300m", seed=1), tmp_path / "hf", "qwen2")
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["added_tokens_decoder"]["77"] = {"content": "<IMG_CONTEXT>"}
    (src / "tokenizer_config.json").write_text(json.dumps(tok))
    cfg, _ = model_config_from_hf(config_of(src), src)
    assert (cfg.img_context_token_id, cfg.img_start_token_id, cfg.img_end_token_id, cfg.pad_token_id) == (
        77,
        IMG_START,
        IMG_END,
        0,
    )


def test_reads_transformers_module_names_too(tmp_path: Path) -> None:
    # `model.state_dict()` names (model.vision_tower.*, model.language_model.*, lm_head) as some
    # tools save them, instead of the names save_pretrained writes
    model = tiny_transformers_model("qwen2", "300m", False, seed=9)
    saved = save_transformers_dir(model, tmp_path / "saved")
    raw = tmp_path / "raw"
    raw.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(raw / "model.safetensors"))
    shutil.copy(saved / "config.json", raw)
    assert any(k.startswith("model.vision_tower.") for k in SafetensorsDir(raw))
    convert_hf_to_checkpoint(saved, tmp_path / "a")
    convert_hf_to_checkpoint(raw, tmp_path / "b")
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


# --- refusals ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_internvl(tmp_path_factory) -> Path:
    return write_internvl_dir(
        tiny_transformers_model("qwen2", "300m", seed=2),
        tmp_path_factory.mktemp("small") / "hf",
        "qwen2",
        torch.float32,
    )


def _rewrite(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    tensors = dict(SafetensorsDir(src).items())
    if edit_tensors:
        edit_tensors(tensors)
    dst.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    config = config_of(src)
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    if (src / "tokenizer_config.json").exists():  # the special-token ids of a model no preset has
        (dst / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
    return dst


def _refused(src: Path, out: Path, *needles: str) -> None:
    with pytest.raises(ConversionError) as err:
        convert_hf_to_checkpoint(src, out)
    for n in needles:
        assert n in str(err.value)
    assert not (list(out.glob("*.safetensors")) if out.exists() else [])  # refused before writing


def test_refuses_wrong_shape(small_internvl: Path, tmp_path: Path) -> None:
    def edit(t):
        t["mlp1.1.weight"] = t["mlp1.1.weight"][:, :-1]

    src = _rewrite(small_internvl, tmp_path / "hf", edit)
    _refused(src, tmp_path / "out", "mlp1.1.weight", "(64, 255)", "(64, 256)")


def test_refuses_config_tensor_mismatch(small_internvl: Path, tmp_path: Path) -> None:
    src = _rewrite(small_internvl, tmp_path / "hf", edit_config=lambda c: c["llm_config"].update(intermediate_size=96))
    _refused(src, tmp_path / "out", "language_model.model.layers.0.mlp.gate_proj.weight", "(128, 64)", "(96, 64)")


def test_refuses_missing_key(small_internvl: Path, tmp_path: Path) -> None:
    src = _rewrite(small_internvl, tmp_path / "hf", lambda t: t.pop("vision_model.encoder.layers.1.ls2"))
    _refused(src, tmp_path / "out", "vision_model.encoder.layers.1.ls2", "missing")


def test_refuses_unexpected_key(small_internvl: Path, tmp_path: Path) -> None:
    src = _rewrite(small_internvl, tmp_path / "hf", lambda t: t.update({"vision_model.extra.weight": torch.zeros(2)}))
    _refused(src, tmp_path / "out", "vision_model.extra.weight", "unexpected")


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda c: c.update(model_type="llava"), "'llava'"),
        (lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"]), "'Phi3ForCausalLM'"),
        (lambda c: c.update(ps_version="v1"), "ps_version"),
        (lambda c: c["llm_config"].update(rope_scaling={"type": "linear", "factor": 2.0}), "'linear'"),
        (lambda c: c.update(use_llm_lora=16), "use_llm_lora"),
        (lambda c: c["llm_config"].update(use_sliding_window=True), "use_sliding_window"),
        (lambda c: c["vision_config"].update(norm_type="batch_norm"), "batch_norm"),
        (lambda c: c["llm_config"].update(architectures=["GptOssForCausalLM"]), "attention sinks"),
    ],
)
def test_refuses_unknown_model_types_and_features(small_internvl: Path, tmp_path: Path, edit, needle: str) -> None:
    src = _rewrite(small_internvl, tmp_path / "hf", edit_config=edit)
    _refused(src, tmp_path / "out", needle)


def test_export_refuses_bad_canonical(small_internvl: Path, tmp_path: Path) -> None:
    convert_hf_to_checkpoint(small_internvl, tmp_path / "ckpt")
    tensors = dict(SafetensorsDir(tmp_path / "ckpt").items())
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tmp_path / "ckpt" / "model_config.json", bad)
    tensors.pop("language_model.decoder.layers.2.mlp.linear_fc2.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match="language_model.decoder.layers.2.mlp.linear_fc2.weight"):
        convert_checkpoint_to_hf(bad, tmp_path / "out", "internvl")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_refuses_a_tensor_the_hf_layout_lacks(tmp_path: Path) -> None:
    # InternViT-6B has no qkv bias: neither has our model, and a canonical checkpoint carrying one
    # (say from a model built differently) cannot be exported without dropping weights
    src = write_internvl_dir(tiny_transformers_model("llama", "6b", seed=3), tmp_path / "hf", "llama")
    convert_hf_to_checkpoint(src, tmp_path / "ckpt")
    tensors = dict(SafetensorsDir(tmp_path / "ckpt").items())
    key = "vision_model.encoder.layers.0.self_attention.linear_qkv.bias"
    assert key not in tensors
    tensors[key] = torch.full((3 * 48,), 1e-3)
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        convert_checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out", "internvl")


# --- sharded, streamed output ------------------------------------------------------------------


def test_sharded_writer_respects_shard_size_and_indexes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(100 + 37 * i, generator=g) for i in range(12)}
    limit = 2000
    writer = ShardedWriter(tmp_path, plan_of(tensors), max_shard_bytes=limit)
    for k, v in tensors.items():
        writer.add(k, v)
    files = writer.close()
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    biggest = max(v.numel() * 4 for v in tensors.values())
    for f in files:  # data bytes stay under the limit unless one tensor alone exceeds it (+ header)
        assert f.stat().st_size <= max(limit, biggest) + 1024
    back = SafetensorsDir(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


# --- command-line tools, end to end with training ----------------------------------------------


def test_cli_refuses_with_the_key(small_internvl: Path, tmp_path: Path, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_from_hf", REPO / "tools" / "convert_from_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    bad = _rewrite(small_internvl, tmp_path / "bad", lambda t: t.pop("mlp1.0.bias"))
    assert tool.main(["--hf-dir", str(bad), "--save", str(tmp_path / "ckpt")]) == 2
    assert not (tmp_path / "ckpt").exists()  # a failed conversion leaves no --save directory
    assert "mlp1.0.bias" in capsys.readouterr().err
    # the recorded layout is checked against the model before converting (no process is spawned)
    assert (
        tool.main(
            ["--hf-dir", str(small_internvl), "--save", str(tmp_path / "ckpt"), "--tensor-model-parallel-size", "3"]
        )
        == 2
    )
    assert not (tmp_path / "ckpt").exists()
    assert "--tensor-model-parallel-size 3 does not divide" in capsys.readouterr().err
