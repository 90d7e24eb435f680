"""LoRA on an MoE model: attention (and dense / shared MLPs) get adapters, the routed experts' linears
do not (config/lora.py: is_routed_expert), and the planner lists exactly the adapters the model builds.

Before, `--lora-rank` on any MoE preset ended in a TypeError from models/lora.py (megatron-core's
expert linears are not marked tensor-parallel), and adapters on them would have been reduced over the
dense data-parallel group at EP > 1. Here the single-process facts."""

from internvl_mcore.config import PRESETS
from internvl_mcore.config.lora import LoRAConfig, adapts, is_lora_name, is_routed_expert


def test_routed_experts_are_not_adapted_but_everything_else_is():
    lora = LoRAConfig(lora_rank=4, lora_target="all")
    layer = "language_model.decoder.layers.0"
    assert adapts(lora, f"{layer}.self_attention.linear_qkv")
    assert adapts(lora, f"{layer}.mlp.linear_fc1")  # a dense layer's MLP
    assert adapts(lora, f"{layer}.mlp.shared_experts.linear_fc2")
    assert not adapts(lora, f"{layer}.mlp.experts.local_experts.3.linear_fc1")
    assert is_routed_expert(f"{layer}.mlp.experts.local_experts.0.linear_fc2")
    assert not is_routed_expert(f"{layer}.mlp.shared_experts.linear_fc2")


def test_moe_model_builds_with_lora_and_the_planner_lists_its_adapters(world):
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.models.lora import add_lora
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.plan.params import stage_params

    cfg = PRESETS["debug-moe"]
    lora = LoRAConfig(lora_rank=4, lora_target="all")
    model = build_model(cfg, world, process_groups())
    add_lora(model, lora, cfg, seed=1)
    built = {n: tuple(p.shape) for n, p in model.named_parameters() if is_lora_name(n)}
    assert built and not any(is_routed_expert(n) for n in built)
    assert any(".self_attention.linear_qkv." in n for n in built)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(built)  # every base weight, experts included, frozen
    planned = {s.name: tuple(s.shape) for s in stage_params(cfg, world, 0, lora) if s.part == "lora"}
    assert planned == built
