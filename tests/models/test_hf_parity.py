"""Parity with transformers: a tiny random `InternVLForConditionalGeneration`, saved offline,
converted by our key map into our megatron-core model, gives the same logits (fp32, 1e-4).

Covers Qwen2, Llama-style and Qwen3 (per-head QK-norm, decoupled head_dim) text models,
InternViT-300M-style (LayerNorm, qkv bias) and InternViT-6B-style (RMSNorm, QK-norm over all heads,
no qkv bias, 3 heads) vision, tied and untied embeddings. The model config is inferred from the saved
config.json by the converter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.convert.tiny_hf import save_transformers_dir, tiny_batch, tiny_transformers_model

pytest.importorskip("transformers")

CASES = [  # (text, vision, tied embeddings)
    ("qwen2", "300m", False),
    ("llama", "6b", True),
    ("qwen2", "6b", True),
    ("llama", "300m", False),
    ("qwen3", "6b", False),  # per-head QK-norm, head_dim 32 != 64 / 4 (InternVL3.5-38B-like: InternViT-6B + Qwen3)
]


def _ours(hf_dir: Path, ckpt: Path, par):
    from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint
    from internvl_mcore.convert import convert_hf_to_checkpoint
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.models.weights import load_canonical
    from internvl_mcore.parallel.state import process_groups

    convert_hf_to_checkpoint(hf_dir, ckpt)
    loaded = CanonicalCheckpoint.open(ckpt)
    model = build_model(loaded.config, par, process_groups()).eval()
    load_canonical(model, loaded.tensors, loaded.config)
    return model, loaded.config


@pytest.mark.parametrize("text,vision,tie", CASES)
@torch.no_grad()
def test_logits_match_transformers(world, tmp_path: Path, text: str, vision: str, tie: bool) -> None:
    hf = tiny_transformers_model(text, vision, tie, seed=7)
    hf_dir = save_transformers_dir(hf, tmp_path / "hf")
    ours, cfg = _ours(hf_dir, tmp_path / "ckpt", world)
    assert cfg.llm.family == text and cfg.llm.tie_word_embeddings == tie
    assert cfg.vision.qk_normalization == (vision == "6b")
    assert cfg.llm.qk_layernorm == (text == "qwen3")
    assert cfg.llm.head_dim == hf.config.text_config.head_dim if text == "qwen3" else cfg.llm.kv_channels is None

    ids, pixels = tiny_batch(seed=3)
    want = hf(input_ids=ids, pixel_values=pixels).logits  # (B, S, V)
    pos = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape[0], -1)
    got = ours(ids, pos, pixels)  # (B, S, V)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # the image really reaches the logits (a wrong vision mapping cannot hide behind the text path)
    other = ours(ids, pos, torch.randn_like(pixels))
    assert (other - got).abs().max() > 1e-3
