"""Planner arithmetic that needs no model: released parameter counts, padding rules, FLOP formulas."""

import math

import pytest
import torch

from internvl_mcore.config import ParallelConfig, get_preset
from internvl_mcore.plan.flops import causal_pairs, forward_flops, train_step_flops
from internvl_mcore.plan.memory import grad_buffer, owned_elements, state_bytes
from internvl_mcore.plan.params import (
    ParamSpec,
    count_params,
    decoder_layers_per_stage,
    padded_vision_heads,
    stage_params,
)
from internvl_mcore.errors import ConfigError

# Published sizes of the released checkpoints (the Hugging Face model pages' safetensors counts,
# as quoted in third-party model tables: InternVL3-1B 0.94B, InternVL3-2B 2.09B; the technical
# report / model cards: InternVL3-8B ~7.9B, InternVL3-78B 78.4B), to the digits published.
PUBLISHED = {
    "internvl3-1b": (0.94, 2),
    "internvl3-2b": (2.09, 2),
    "internvl3-8b": (7.9, 1),
    "internvl3-78b": (78.4, 1),
    # InternVL2.5 model cards / report (InternLM2.5 and Qwen2.5-3B based sizes)
    "internvl2.5-2b": (2.2, 1),
    "internvl2.5-4b": (3.7, 1),
    "internvl2.5-8b": (8.1, 1),
    "internvl2.5-26b": (25.5, 1),
    # InternVL3.5 (OpenGVLab/InternVL README, "#Total Param" of the GitHub format)
    "internvl3.5-1b": (1.1, 1),
    "internvl3.5-2b": (2.3, 1),
    "internvl3.5-4b": (4.7, 1),
    "internvl3.5-8b": (8.5, 1),
    "internvl3.5-14b": (15.1, 1),
    "internvl3.5-38b": (38.4, 1),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_sizes_match_published(name):
    value, digits = PUBLISHED[name]
    total = count_params(get_preset(name)).total / 1e9
    assert round(total, digits) == pytest.approx(value), total


def test_part_sizes_match_component_models():
    """InternViT-300M is ~0.3B and InternViT-6B (45 of 48 blocks) ~5.5B; Qwen2.5-7B with InternVL's
    151674-row vocabulary ~7.6B."""
    assert round(count_params(get_preset("internvl3-8b")).vision / 1e9, 1) == 0.3
    assert round(count_params(get_preset("internvl3-78b")).vision / 1e9, 1) == 5.5
    assert round(count_params(get_preset("internvl3-8b")).llm / 1e9, 1) == 7.6


def test_padding_rules_match_the_model_code():
    pytest.importorskip("megatron.core")
    from internvl_mcore.config.megatron import padded_vision_heads as model_rule
    from internvl_mcore.models.language import padded_vocab_size

    for heads in (3, 16, 25):
        for tp in (1, 2, 4, 8):
            assert padded_vision_heads(heads, tp) == model_rule(heads, tp)
    cfg = get_preset("internvl3-78b")
    for tp in (1, 2, 4, 8):
        par = ParallelConfig(tensor_model_parallel_size=tp)
        emb = next(s for s in stage_params(cfg, par, 0) if s.name.endswith("word_embeddings.weight"))
        assert emb.shape[0] * tp == padded_vocab_size(cfg.llm.vocab_size, tp)


def test_tp_shards_add_up_to_padded_model():
    """Summed over TP ranks, sharded tensors give the padded model; replicated ones repeat."""
    cfg = get_preset("internvl3-78b")
    one = sum(s.numel for s in stage_params(cfg, ParallelConfig(), 0))
    par = ParallelConfig(tensor_model_parallel_size=2)
    two = sum(s.numel for s in stage_params(cfg, par, 0))
    heads_pad = padded_vision_heads(25, 2) - 25  # one zero head per ViT block at TP2
    v = cfg.vision
    pad = v.num_layers * heads_pad * v.head_dim * (3 * v.hidden_size + 3 + v.hidden_size + 2)
    assert 2 * two > one + pad  # replicated norms / biases are counted twice
    assert 2 * two - (one + pad) < 0.01 * one


def test_uneven_pipeline_split():
    par = ParallelConfig(pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=14)
    assert decoder_layers_per_stage(80, par) == [14, 22, 22, 22]
    with pytest.raises(ConfigError):
        decoder_layers_per_stage(80, ParallelConfig(pipeline_model_parallel_size=3))


def test_grad_buffer_padding_rule():
    """Distributed optimizer: param starts 64-aligned, bucket ends a multiple of lcm(dp, 128), the
    shards tile the bucket and own every parameter element exactly once."""
    specs = [ParamSpec(f"p{i}", (n,), "llm") for i, n in enumerate([100, 7, 1000, 3, 64, 65])]
    for dp in (1, 2, 3, 4, 6):
        buf = grad_buffer(specs, dp, use_distributed_optimizer=True)
        assert all(start % 64 == 0 for start, _ in buf.param_ranges)
        assert buf.numel % math.lcm(dp, 128) == 0 and buf.numel >= sum(s.numel for s in specs)
        owned = [owned_elements(buf, dp, r) for r in range(dp)]
        assert [sum(col) for col in zip(*owned)] == [s.numel for s in specs]
    plain = grad_buffer(specs, 4, use_distributed_optimizer=False)
    assert plain.numel == sum(s.numel for s in specs)


def test_distributed_optimizer_divides_state_by_dp():
    cfg = get_preset("internvl3-8b")
    par = ParallelConfig(tensor_model_parallel_size=2)
    plain = state_bytes(cfg, par, 0, 8)
    dist = state_bytes(cfg, par, 0, 8, use_distributed_optimizer=True)
    assert dist.optimizer == pytest.approx(plain.optimizer / 8, rel=1e-3)
    # bf16: 2 bytes of weights, 4 of fp32 gradient, 12 of fp32 master + Adam moments per parameter
    n = sum(s.numel for s in stage_params(cfg, par, 0))
    assert (plain.params, plain.grads, plain.optimizer) == (2 * n, 4 * n, 12 * n)
    frozen = state_bytes(cfg, par, 0, 8, trainable=["projector", "llm"])
    vit = sum(s.numel for s in stage_params(cfg, par, 0) if s.part == "vision")
    assert frozen.grads == plain.grads - 4 * vit and frozen.optimizer == plain.optimizer - 12 * vit


def test_causal_pairs_match_a_mask():
    lengths = [5, 1, 9, 17]
    n = sum(lengths)
    mask = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for length in lengths:
        mask[start : start + length, start : start + length] = torch.ones(length, length).tril().bool()
        start += length
    assert causal_pairs(lengths) == int(mask.sum())


def test_flops_formula_against_a_direct_count():
    """LLM linear FLOPs of one token equal 2 x the decoder's weight elements touched per token
    (every weight is one multiply-add per token), and attention scales with causal pairs."""
    cfg = get_preset("internvl3-8b")
    par = ParallelConfig()
    specs = stage_params(cfg, par, 0)
    weights = sum(
        s.numel
        for s in specs
        if ".decoder.layers." in s.name and s.name.endswith("weight") and "layernorm" not in s.name
    )
    f = forward_flops(cfg, tokens=4096, tiles=0, seq_length=4096)
    assert f.llm_linear == 2 * weights * 4096
    m = cfg.llm
    assert f.llm_attention == m.num_layers * 4 * m.num_attention_heads * m.head_dim * 4096 * 4097 // 2
    assert f.lm_head == 2 * m.hidden_size * m.vocab_size * 4096
    packed = forward_flops(cfg, tokens=4096, tiles=0, attention_lengths=[1024] * 4)
    assert packed.llm_attention < f.llm_attention / 3.9


def test_train_step_flops_is_three_forwards():
    cfg = get_preset("internvl3-2b")
    fwd = forward_flops(cfg, tokens=8 * 2048, tiles=40, seq_length=2048)
    assert train_step_flops(cfg, 8 * 2048, 40, seq_length=2048) == 3 * fwd.forward
    with pytest.raises(ValueError):
        train_step_flops(cfg, 100, 0, attention_lengths=[50, 49])


def test_frozen_parts_count_only_the_passes_they_run():
    cfg = get_preset("internvl3-8b")
    f = forward_flops(cfg, tokens=2048, tiles=4, seq_length=2048)
    vit = f.vit_linear + f.vit_attention + f.vit_patch_embed
    llm = f.llm_linear + f.llm_attention + f.lm_head
    all_parts = train_step_flops(cfg, 2048, 4, seq_length=2048)
    finetune = train_step_flops(cfg, 2048, 4, seq_length=2048, trainable=["projector", "llm"])
    stage1 = train_step_flops(cfg, 2048, 4, seq_length=2048, trainable=["projector"])
    assert all_parts - finetune == pytest.approx(2 * vit)  # frozen ViT: forward only
    assert finetune - stage1 == pytest.approx(llm)  # frozen LLM: no weight gradients


def test_planner_lists_the_adapters_lora_target_names():
    """--lora-target / --lora-modules decide which linears the planner gives adapters (config/lora.py:
    adapts, as models/lora.py attaches them), each pair shaped by its base weight's shard."""
    from internvl_mcore.config.lora import LoRAConfig
    from internvl_mcore.plan.params import stage_params

    cfg, par = get_preset("debug"), ParallelConfig(tensor_model_parallel_size=2)
    towers = {}
    for target in ("llm", "vit", "all"):
        specs = stage_params(cfg, par, 0, LoRAConfig(lora_rank=4, lora_target=target, lora_modules=["linear_qkv"]))
        adapters = [s for s in specs if s.part == "lora"]
        towers[target] = {s.name.split(".", 1)[0] for s in adapters}
        shapes = {s.name: s.shape for s in specs}
        for a in adapters[::2]:  # A: r x (the base shard's input), B: (the base shard's output) x r
            base = shapes[a.name.rsplit(".lora.", 1)[0] + ".weight"]
            assert a.shape == (4, base[1]) and shapes[a.name[:-1] + "b"] == (base[0], 4)
        assert all(s.name.rsplit(".lora.", 1)[0].endswith("linear_qkv") for s in adapters)
    assert towers == {"llm": {"language_model"}, "vit": {"vision_model"}, "all": {"language_model", "vision_model"}}
