"""`--model PRESET|DIR`: the model config comes from a preset or from any checkpoint directory, the
same as tools/convert_from_hf.py infers it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from internvl_mcore.config import PRESETS
from internvl_mcore.convert import convert_hf_to_checkpoint, model_config_from_hf, read_hf_config
from internvl_mcore.errors import ConversionError
from internvl_mcore.convert.source import checkpoint_kind, resolve_model

from .tiny_hf import save_transformers_dir, tiny_transformers_model, write_internvl_dir

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("source")
    model = tiny_transformers_model("qwen3", "300m", seed=1)
    out = {
        "transformers": save_transformers_dir(model, root / "tf"),
        "internvl": write_internvl_dir(model, root / "ivl", "qwen3", torch.float32),
    }
    convert_hf_to_checkpoint(out["internvl"], root / "ckpt")
    out["canonical"] = root / "ckpt"
    # a training checkpoint as training/checkpoint.py lays it out (only what --model reads)
    train = root / "train"
    (train / "iter_0000003").mkdir(parents=True)
    cfg = model_config_from_hf(read_hf_config(out["internvl"]), out["internvl"])[0]
    (train / "iter_0000003" / "run.json").write_text(json.dumps({"model": dataclasses.asdict(cfg)}))
    (train / "latest_checkpointed_iteration.txt").write_text("3")
    out["training"] = train
    return out


def test_preset_names_stay_shortcuts() -> None:
    assert resolve_model("internvl3-8b") is PRESETS["internvl3-8b"]


@pytest.mark.parametrize("kind", ["transformers", "internvl", "canonical", "training"])
def test_every_checkpoint_kind_carries_the_converter_config(dirs, kind: str) -> None:
    src = dirs["transformers" if kind == "transformers" else "internvl"]
    want = model_config_from_hf(read_hf_config(src), src)[0]
    got = resolve_model(str(dirs[kind]))
    assert checkpoint_kind(dirs[kind]) == ("hf" if kind in ("transformers", "internvl") else kind)
    assert got.llm == want.llm and got.vision == want.vision  # the InternVL layout also names the template
    assert got.llm.family == "qwen3" and got.llm.qk_layernorm and got.llm.head_dim == 32
    assert got.name.startswith("hf:")  # no preset has this shape


def test_refusals_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="neither a preset .*debug"):
        resolve_model("no-such-model")
    with pytest.raises(ConversionError, match="config.json"):
        resolve_model(str(tmp_path))


def test_pretrain_cli_takes_a_directory(dirs, capsys) -> None:
    import pretrain_internvl

    run = pretrain_internvl.parse_run_config(["--model", str(dirs["transformers"]), "--mock-data"])
    assert run.model.llm.kv_channels == 32
    with pytest.raises(SystemExit):
        pretrain_internvl.parse_run_config(["--model", "internvl9-1b", "--mock-data"])
    assert "neither a preset" in capsys.readouterr().err


def test_gpt_oss_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    from internvl_mcore.convert import hf_config_for

    config = hf_config_for(PRESETS["debug"], "transformers", torch.float32)
    config["text_config"]["model_type"] = "gpt_oss"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="attention sinks.*MXFP4"):
        resolve_model(str(tmp_path))
