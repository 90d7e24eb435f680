"""--stage gspo / grpo in the planner: the rollouts' KV cache (equal to what megatron-core's
StaticInferenceContext allocates) and the reference model with --kl-coeff > 0."""

import dataclasses
import importlib.util

import pytest
import torch

from internvl_mcore.config import ParallelConfig, get_preset
from internvl_mcore.plan import HARDWARE, Layout, Rollout, Workload, kv_cache_bytes, plan
from internvl_mcore.plan.memory import GiB
from tests.launch import REPO

spec = importlib.util.spec_from_file_location("plan_cli", REPO / "tools" / "plan.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def test_kv_cache_bytes_equal_megatron_cores_static_inference_context(world):
    """The debug model's decoder run once through a StaticInferenceContext (as inference/decode.py
    runs it): the key / value buffers megatron-core allocated add up to kv_cache_bytes, and not for
    a batch or length one off."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from internvl_mcore.config import PRESETS
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups

    cfg = PRESETS["debug"]
    lm = build_model(cfg, world, process_groups()).language_model
    rows, total = 3, 11
    ctx = StaticInferenceContext(max_batch_size=rows, max_sequence_length=total)
    x = torch.randn(4, rows, cfg.llm.hidden_size, dtype=lm.config.params_dtype)
    rotary = lm.rope(torch.arange(total, dtype=torch.float32)[None])
    with torch.no_grad():
        lm.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary, inference_context=ctx)
    tensors = [t for kv in ctx.key_value_memory_dict.values() for t in kv]
    allocated = sum(t.numel() * t.element_size() for t in tensors)
    assert len(tensors) == 2 * cfg.llm.num_layers
    e = torch.empty(0, dtype=lm.config.params_dtype).element_size()
    assert allocated == kv_cache_bytes(cfg, ParallelConfig(), 0, rows, total, e)
    assert allocated not in (
        kv_cache_bytes(cfg, ParallelConfig(), 0, rows + 1, total, e),
        kv_cache_bytes(cfg, ParallelConfig(), 0, rows, total + 1, e),
    )


def test_kv_cache_per_stage_and_what_a_step_holds():
    """TP divides the KV groups, PP the layers, DP the rows; the stage total counts the larger of
    the training activations and the KV cache (decoding ends before the passes start)."""
    model, hw = get_preset("internvl3-8b"), HARDWARE["a100-80gb"]
    m = model.llm
    lay = Layout(2, 2, 1, 2, sequence_parallel=True, distributed_optimizer=True, recompute=False)
    par = lay.parallel()
    ro = Rollout(prompts_per_step=64, rollouts_per_prompt=8, prompt_length=1000, max_new_tokens=3096)
    assert ro.rows(2) == 256 and dataclasses.replace(ro, max_requests=100).rows(2) == 100
    per_layer = 2 * 4096 * 256 * (m.num_query_groups // 2) * m.head_dim * 2  # bf16
    assert kv_cache_bytes(model, par, 0, 256, 4096, 2) == per_layer * m.num_layers // 2
    work = Workload(seq_length=4096, global_batch_size=16, tiles_per_sequence=4)
    base, rl = plan(model, lay, work, hw), plan(model, lay, dataclasses.replace(work, rollout=ro), hw)
    for a, b in zip(base.stages, rl.stages):
        assert b.kv_cache == kv_cache_bytes(model, par, a.stage, 256, 4096, 2) and a.kv_cache == 0
        assert (b.state, b.activations) == (a.state, a.activations)
        assert b.total == a.state.total + max(b.activations.total, b.kv_cache)
    # here stage 0 (the ViT's activations) trains above its cache, stage 1 decodes above its training
    s0, s1 = rl.stages
    assert s0.total == base.stages[0].total and s1.total == s1.state.total + s1.kv_cache > base.stages[1].total


def test_cli_stage_gspo_prints_the_cache_and_counts_the_reference(capsys):
    base = [
        "--model",
        "internvl3-8b",
        "--gpus",
        "8",
        "--tensor-model-parallel-size",
        "4",
        "--use-distributed-optimizer",
    ]
    rl = ["--stage", "gspo", "--prompts-per-step", "64", "--max-new-tokens", "2048", "--seq-length", "8192"]
    cli.main([*base, *rl])
    out = capsys.readouterr().out
    assert "rollouts: 64 prompts x 8 responses per step, 256 rows per rank" in out
    # 28 layers x 2 x 3072 positions x 256 rows x 1 KV group (4 / TP4) x 128 x 2 bytes
    assert f"stage 0 {2 * 28 * 3072 * 256 * 128 * 2 / GiB:.1f} GiB" in out and "no reference model" in out
    params = lambda text: float(text.split("\n    0     28")[1].split()[0])  # noqa: E731
    cli.main([*base, *rl, "--grpo-kl-beta", "0.01"])  # Megatron-LM's spelling of --kl-coeff
    with_ref = capsys.readouterr().out
    assert "reference model's weights are in 'params'" in with_ref and params(with_ref) > 1.9 * params(out)
    assert cli.main([*base, "--stage", "2", "--rollouts-per-prompt", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rollouts-per-prompt applies to --stage gspo / grpo" in err[0]


@pytest.mark.parametrize(
    "flag", ["--prompts-per-step", "--prompt-length", "--max-new-tokens", "--inference-max-requests"]
)
def test_rl_counts_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--model", "debug", "--gpus", "1", "--stage", "grpo", flag, "0"])
    assert e.value.code == 2 and f"{flag} 0: must be" in capsys.readouterr().err
