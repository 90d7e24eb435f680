"""Build real models on a small gloo world and report what each rank holds (a job of tests/worldpool.py, or under torchrun).

For every case (model, TP, PP, distributed optimizer, trainable parts, dtype) in one world the worker
re-initializes megatron-core's parallel state, builds the stage, freezes the untrained parts, wraps
it in DDP, builds the optimizer exactly like training/loop.py and runs one training step (Adam
creates its state on the first step). It then reports, per rank, the bytes of the distinct storages
behind the parameters, the DDP gradient buffers and the optimizer (state + main params not aliasing
model storage). Then, for the activation check, one more forward of a microbatch through the stage
under torch.autograd.graph.saved_tensors_hooks, counting the distinct non-parameter storages saved
for backward.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from internvl_mcore.config import ParallelConfig, get_preset
from internvl_mcore.parallel.state import init_distributed

p = argparse.ArgumentParser()
p.add_argument("--cases", required=True, help="JSON list of cases")
p.add_argument("--out", required=True)
a = p.parse_args()
cases = json.loads(a.cases)

init_distributed(ParallelConfig(), seed=1)
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from internvl_mcore.config.lora import LoRAConfig  # noqa: E402
from internvl_mcore.models.internvl import build_model  # noqa: E402
from internvl_mcore.models.lora import add_lora  # noqa: E402
from internvl_mcore.parallel.state import process_groups  # noqa: E402
from internvl_mcore.models.weights import init_weights  # noqa: E402
from internvl_mcore.training.mock import mock_batches, mock_sample  # noqa: E402
from internvl_mcore.training.batch import Batch  # noqa: E402
from internvl_mcore.training.step import forward_step  # noqa: E402

PART_OF = {"vision_model": "vision", "projector": "projector", "language_model": "llm"}


def storage_bytes(tensors, exclude=frozenset()):
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
    return seen


def held_bytes(model, ddp, optimizer):
    params = storage_bytes(model.parameters())
    grads = storage_bytes([b.grad_data for b in ddp.buffers + ddp.expert_parallel_buffers], set(params))
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    opt_tensors = []
    for o in inner:
        for state in o.state.values():
            opt_tensors += [v for v in state.values() if torch.is_tensor(v)]
        for group in o.param_groups:
            opt_tensors += list(group["params"])
    opt = storage_bytes(opt_tensors, set(params) | set(grads))
    return sum(params.values()), sum(grads.values()), sum(opt.values())


def saved_activation_bytes(model, cfg, par, seq, tiles, dtype):
    """Distinct storages saved for backward by one forward of a microbatch through this stage."""
    sample = mock_sample(12345, 9, cfg, seq, tiles)
    batch = Batch.from_packs([sample], seq, cfg.pad_token_id)
    param_ptrs = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st  # kept alive until the count: a freed storage's address is reused
        # not `t`: a saved output packed as itself refers back to the node that saved it, a cycle through
        # C++ the collector cannot see (the graph, DDP's hooks, the model and its groups outlived the job)

    def unpack(_):
        raise AssertionError("no backward runs through the measured forward")

    if not ps.is_pipeline_first_stage():
        sp = par.tensor_model_parallel_size if par.sequence_parallel else 1
        x = torch.randn(seq // sp, 1, cfg.llm.hidden_size, dtype=dtype, requires_grad=True)
        model.set_input_tensor(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = model(
            batch.tokens,
            batch.position_ids,
            pixel_values=batch.images.pixel_values().to(dtype),
            labels=batch.labels,
            cu_seqlens=batch.cu_seqlens,
        )
    del out
    model.set_input_tensor(None)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    return sum(st.nbytes() for st in seen.values()), lengths


def measured_flops(model, cfg, seq=128):
    """torch's FlopCounterMode over one forward, and over forward + backward, of two packed sequences."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch's FlopCounterMode has no formula for the CPU flash-attention ops the packed attention
    # runs on (4-D SDPA inputs); count them with torch's own SDPA formulas (full L x S, as for the others)
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(
            q, k, v
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda grad_out, q, k, v, *a, out_shape=None, **kw: (
            sdpa_backward_flop_count(grad_out, q, k, v)
        ),
    }
    batch = Batch.from_packs([mock_sample(7, 9, cfg, seq, 1), mock_sample(8, 9, cfg, seq, 1)], seq, cfg.pad_token_id)
    args = (batch.tokens, batch.position_ids)
    kw = dict(pixel_values=batch.images.pixel_values(), labels=batch.labels, cu_seqlens=batch.cu_seqlens)
    with FlopCounterMode(display=False, custom_mapping=mapping) as fwd:
        model(*args, **kw)
    with FlopCounterMode(display=False, custom_mapping=mapping) as both:
        model(*args, **kw).sum().backward()
    return dict(
        forward=fwd.get_total_flops(),
        train=both.get_total_flops(),
        tokens=2 * seq,
        tiles=batch.images.num_tiles,
        lengths=(batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist(),
    )


reports = []
for case in cases:
    par = ParallelConfig(
        tensor_model_parallel_size=case["tp"],
        pipeline_model_parallel_size=case["pp"],
        sequence_parallel=case.get("sp", False),
        expert_model_parallel_size=case.get("ep", 1),
    )
    ps.destroy_model_parallel()
    init_distributed(par, seed=1)
    cfg = get_preset(case["model"])
    dtype = torch.bfloat16 if case.get("bf16") else torch.float32
    model = build_model(cfg, par, process_groups(), dtype=dtype)
    init_weights(model, cfg, seed=3)
    for name, q in model.named_parameters():
        q.requires_grad_(PART_OF[name.split(".", 1)[0]] in case["trainable"])
    if case.get("lora"):  # adapters as training adds them: every base weight frozen
        add_lora(model, LoRAConfig(**case["lora"]), cfg, seed=3)
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=case["dist_opt"]),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            bf16=case.get("bf16", False),
            params_dtype=dtype,
            use_distributed_optimizer=case["dist_opt"],
        ),
        [ddp],
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    dp = ps.get_data_parallel_world_size()
    seq = 64
    batches = mock_batches(
        cfg,
        seed=5,
        seq_length=seq,
        tiles=1,
        micro_batch_size=1,
        global_batch_size=2 * dp,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=dp,
    )
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[ddp],
        num_microbatches=2,
        seq_length=seq,
        micro_batch_size=1,
        forward_only=False,
    )
    optimizer.step()
    params, grads, opt = held_bytes(model, ddp, optimizer)
    rep = dict(
        case=case,
        rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp=dp,
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        params=params,
        grads=grads,
        optimizer=opt,
        names=[[n, list(q.shape)] for n, q in model.named_parameters()],
    )
    for seq_len in case.get("act_seqs", []):
        act, lengths = saved_activation_bytes(model, cfg, par, seq_len, case.get("act_tiles", 1), dtype)
        rep.setdefault("activations", []).append(dict(seq=seq_len, bytes=act, lengths=lengths))
    if case.get("flops"):
        rep["flops"] = measured_flops(model, cfg)
    reports.append(rep)
    del optimizer, ddp, model

Path(a.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(reports))
