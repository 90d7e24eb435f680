"""LoRA export through tools/convert_to_hf.py: --merge-lora (both HF layouts) and --lora-only (PEFT).

The adapted model's logits come from our TP1 model with the adapters attached, read back from the
TP2 x PP2 checkpoint; transformers' InternVLForConditionalGeneration on the merged export, and
PEFT's PeftModel on the transformers export of the base plus the adapter, must give them within 1e-4.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
from typing import Iterator

import pytest
import torch

from tests.fixtures import new_tensor_bytes
from tests.launch import REPO

pytest.importorskip("transformers")
pytest.importorskip("peft")

ATOL = 1e-4


def convert_to_hf(*argv: str) -> int:
    """tools/convert_to_hf.py's main, in this process."""
    spec = importlib.util.spec_from_file_location("convert_to_hf_tool", REPO / "tools" / "convert_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(list(argv))


def tiny_batch(cfg, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (2, 24): row 0 with a 2-tile image, row 1 with a 1-tile image; pixels (3, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    per_tile = cfg.num_image_token
    ids = torch.randint(1, cfg.pad_token_id, (2, 24), generator=g)
    for row, tiles in ((0, 2), (1, 1)):
        ids[row, 2] = cfg.img_start_token_id
        ids[row, 3 : 3 + tiles * per_tile] = cfg.img_context_token_id
        ids[row, 3 + tiles * per_tile] = cfg.img_end_token_id
    size = cfg.vision.image_size
    return ids, torch.randn(3, 3, size, size, generator=g)


@torch.no_grad()
def our_logits(ckpt, ids: torch.Tensor, pixels: torch.Tensor, with_adapters: bool = True) -> torch.Tensor:
    """Our TP1 model on the checkpoint's base weights, with (or without) its adapters attached."""
    from internvl_mcore.config import ParallelConfig
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.models.lora import add_lora
    from internvl_mcore.models.weights import load_canonical

    model = build_model(ckpt.config, ParallelConfig(), process_groups())
    load_canonical(model, ckpt.base, ckpt.config)
    if with_adapters:
        add_lora(model, ckpt.lora.config, ckpt.config, seed=0)
        params = dict(model.named_parameters())
        for name, t in ckpt.adapters.items():  # TP1: canonical names are the local ones
            params[name].copy_(t)
    pos = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape[0], -1)
    return model.eval()(ids, pos, pixels)


@contextlib.contextmanager
def no_model_no_world() -> Iterator[None]:
    """Inside, building a megatron-core module, starting a process group or processes, or loading
    through dist_checkpointing fails: the LoRA export reads the checkpoint's files directly."""
    import megatron.core.dist_checkpointing as dcp
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from megatron.core.transformer.module import MegatronModule

    def refuse(*args, **kwargs):
        raise AssertionError("the LoRA export built a model, a process group or processes")

    with pytest.MonkeyPatch.context() as mpatch:
        for owner, name in (
            (MegatronModule, "__init__"),
            (dist, "init_process_group"),
            (dist, "new_group"),
            (mp, "start_processes"),
            (dcp, "load"),
        ):
            mpatch.setattr(owner, name, refuse)
        yield


@contextlib.contextmanager
def recording_live_tensors(peaks: list[int]) -> Iterator[None]:
    """Inside, the live tensor bytes are appended to `peaks` whenever the HF writer gets a tensor."""
    from internvl_mcore.checkpoint.safetensors_io import ShardedWriter

    add = ShardedWriter.add

    def recording_add(self, name, tensor):
        peaks.append(new_tensor_bytes())
        add(self, name, tensor)

    gc.collect()
    gc.disable()
    try:
        with pytest.MonkeyPatch.context() as mpatch:
            mpatch.setattr(ShardedWriter, "add", recording_add)
            yield
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, ref_run, tp2pp2_run, base_ckpt) -> dict:
    from internvl_mcore.convert import convert_checkpoint_to_hf

    out = tmp_path_factory.mktemp("exports")
    ckpt = str(tp2pp2_run["save"])
    peaks: list[int] = []
    with no_model_no_world():
        with recording_live_tensors(peaks):
            assert (
                convert_to_hf(
                    "--load", ckpt, "--save", str(out / "merged_tf"), "--format", "transformers", "--merge-lora"
                )
                == 0
            )
        assert (
            convert_to_hf(
                "--load",
                str(ref_run["save"]),
                "--save",
                str(out / "merged_ivl"),
                "--format",
                "internvl",
                "--merge-lora",
            )
            == 0
        )
        assert (
            convert_to_hf("--load", ckpt, "--save", str(out / "adapter"), "--format", "transformers", "--lora-only")
            == 0
        )
    convert_checkpoint_to_hf(base_ckpt, out / "base_tf", "transformers")
    return {"peaks": peaks, **{k: out / k for k in ("merged_tf", "merged_ivl", "adapter", "base_tf")}}


@pytest.fixture(scope="module")
def adapted(tp2pp2_run) -> dict:
    from internvl_mcore.convert.lora_export import read_lora_checkpoint

    ckpt = read_lora_checkpoint(tp2pp2_run["save"])
    ids, pixels = tiny_batch(ckpt.config)
    logits = our_logits(ckpt, ids, pixels)
    # the adapters matter: without them the logits are clearly different
    assert (logits - our_logits(ckpt, ids, pixels, with_adapters=False)).abs().max() > 100 * ATOL
    return {"ckpt": ckpt, "ids": ids, "pixels": pixels, "logits": logits}


@pytest.mark.timeout(900)
@torch.no_grad()
def test_merged_transformers_export_gives_the_adapted_logits(exports, adapted) -> None:
    from transformers import InternVLForConditionalGeneration

    hf = InternVLForConditionalGeneration.from_pretrained(str(exports["merged_tf"]), attn_implementation="eager").eval()
    got = hf(input_ids=adapted["ids"], pixel_values=adapted["pixels"]).logits
    torch.testing.assert_close(got, adapted["logits"], atol=ATOL, rtol=ATOL)


@pytest.mark.timeout(900)
@torch.no_grad()
def test_peft_adapter_on_the_transformers_base_gives_the_adapted_logits(exports, adapted) -> None:
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    config = json.loads((exports["adapter"] / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    base = InternVLForConditionalGeneration.from_pretrained(str(exports["base_tf"]), attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(exports["adapter"])).eval()
    # every fused adapter became per-projection PEFT modules: q/k/v and gate/up of 4 LLM layers,
    # q/k/v of 2 ViT layers, plus o/down and proj/fc1/fc2
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert len(lora_modules) == 4 * 7 + 2 * 6
    got = model(input_ids=adapted["ids"], pixel_values=adapted["pixels"]).logits
    torch.testing.assert_close(got, adapted["logits"], atol=ATOL, rtol=ATOL)


def test_merged_export_streams_in_bounded_memory(exports) -> None:
    """Each weight is merged just before it is written: live tensors stay under 3x the largest
    tensor while the model is many times larger."""
    from internvl_mcore.checkpoint.safetensors_io import SafetensorsDir

    out = SafetensorsDir(exports["merged_tf"])
    largest = max(out[k].nbytes for k in out)
    model = sum(out[k].nbytes for k in out)
    assert model > 5 * largest, (model, largest)
    assert len(exports["peaks"]) == len(out) and max(exports["peaks"]) < 3 * largest, (max(exports["peaks"]), largest)


@pytest.mark.timeout(900)
def test_merged_internvl_export_holds_the_merged_weights(tmp_path, exports, ref_run) -> None:
    """InternVL's own layout: imported back it is exactly base + s * B A (merged on the TP1 run)."""
    from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint
    from internvl_mcore.convert import convert_hf_to_checkpoint
    from internvl_mcore.convert.lora_export import merge_adapters, read_lora_checkpoint

    config = json.loads((exports["merged_ivl"] / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    convert_hf_to_checkpoint(exports["merged_ivl"], tmp_path / "back")
    back = CanonicalCheckpoint.open(tmp_path / "back").tensors
    ckpt = read_lora_checkpoint(ref_run["save"])
    want = merge_adapters(ckpt.base, ckpt.adapters, ckpt.lora.config.scaling)
    assert sorted(back) == sorted(want)
    for name, t in want.items():
        torch.testing.assert_close(back[name], t, rtol=0, atol=1e-6, msg=name)


def test_lora_checkpoint_needs_an_export_mode(tmp_path, ref_run, capsys) -> None:
    ckpt = str(ref_run["save"])
    assert convert_to_hf("--load", ckpt, "--save", str(tmp_path / "x"), "--format", "transformers") == 2
    assert "--merge-lora" in capsys.readouterr().err
    assert convert_to_hf("--load", ckpt, "--save", str(tmp_path / "y"), "--format", "internvl", "--lora-only") == 2
    assert "--format transformers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_merge_lora_refuses_a_checkpoint_without_adapters(tmp_path, base_ckpt, capsys) -> None:
    assert (
        convert_to_hf(
            "--load", str(base_ckpt), "--save", str(tmp_path / "x"), "--format", "transformers", "--merge-lora"
        )
        == 2
    )
    assert "LoRA" in capsys.readouterr().err


class _FakeView(dict):
    """A canonical view (name -> tensor, with `shape`) standing in for a checkpoint's."""

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self[name].shape)


def test_an_adapter_that_does_not_fit_its_weight_is_named(tmp_path) -> None:
    from internvl_mcore.config import get_preset
    from internvl_mcore.errors import ConversionError
    from internvl_mcore.convert.lora_export import CheckpointTensors

    w = "language_model.decoder.layers.0.mlp.linear_fc2.weight"
    base = w[: -len("weight")]
    view = _FakeView(
        {w: torch.zeros(64, 128), base + "lora.a": torch.zeros(4, 128), base + "lora.b": torch.zeros(32, 4)}
    )
    src = CheckpointTensors(view, get_preset("debug"), tmp_path)
    assert src[base + "lora.a"].shape == (4, 128)
    with pytest.raises(ConversionError, match=r"adapter .*linear_fc2\.lora\.b has shape \(32, 4\), but its weight"):
        src[base + "lora.b"]
