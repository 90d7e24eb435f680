"""Context-parallel attention vs full single-process attention, one CP world (a job of tests/worldpool.py, or under torchrun).

Every rank builds the same full (unsplit) q, k, v and computes the reference with
`PackedSDPAttention` on its own; then runs `ContextParallelAttention` on its CP split, for every
comm type given, and records the largest output / input-gradient differences of its tokens for
every case in rank{r}.json ({comm: {"cases": ..., "refused": ...}, "megatron_split_equal": ...}).

--cp C --comms p2p a2a a2a+p2p --hcp A P --out DIR   (--hcp: megatron's hierarchical CP sizes)
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from internvl_mcore.parallel import cpu_compat

p = argparse.ArgumentParser()
p.add_argument("--cp", type=int, required=True)
p.add_argument("--comms", nargs="+", required=True)
p.add_argument("--hcp", type=int, nargs=2, default=None)
p.add_argument("--out", required=True)
a = p.parse_args()

cpu_compat.apply()
if not dist.is_initialized():  # a reused world (tests/worldpool.py) has its default group already
    dist.init_process_group("gloo")
from megatron.core import parallel_state as ps
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank

from internvl_mcore.parallel.attention import PackedSDPAttention, packed_seq_params_from_cu_seqlens
from internvl_mcore.parallel.context_parallel import ContextParallelAttention, gather_from_cp, split_for_cp

C = a.cp
ps.initialize_model_parallel(context_parallel_size=C, hierarchical_context_parallel_sizes=a.hcp)
assert ps.get_context_parallel_world_size() == C
rank = ps.get_context_parallel_rank()
S, D = 48, 8
L = S // (2 * C)


def config(hq: int, hkv: int, comm: str) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=hq * D,
        num_attention_heads=hq,
        num_query_groups=hkv,
        kv_channels=D,
        attention_dropout=0.0,
        context_parallel_size=C,
        cp_comm_type=comm,
    )


def rows(*row_bounds: list[int]) -> torch.Tensor:
    """Global batch-major cu_seqlens from per-row boundaries."""
    cu = [0]
    for r, bounds in enumerate(row_bounds):
        cu += [r * S + x for x in bounds[1:]]
    return torch.tensor(cu, dtype=torch.int32)


borders = sorted({L, 3 * L, (2 * C - 1) * L})
BIG = (512, 1024)  # (query tile, key tile) of the ring kernel: one tile per chunk pair
CASES = {  # name: (B, hq, hkv, cu_seqlens or None, mask type, (query tile, key tile))
    "inside": (1, 4, 4, rows([0, 5, 13, 29, 47, S]), AttnMaskType.causal, BIG),
    "inside-tiled": (1, 4, 4, rows([0, 5, 13, 29, 47, S]), AttnMaskType.causal, (5, 7)),
    "across": (1, 4, 4, rows([0, 3, 45, S]), AttnMaskType.causal, (4, 5)),
    "borders": (1, 4, 4, rows([0, *borders, S]), AttnMaskType.causal, BIG),
    "borders-tiled": (1, 4, 4, rows([0, *borders, S]), AttnMaskType.causal, (3, 4)),
    "empty-sample": (1, 4, 4, rows([0, 10, 10, S]), AttnMaskType.causal, BIG),
    "unpacked-b2": (2, 4, 4, None, AttnMaskType.causal, (7, 1024)),
    "gqa-b2": (2, 8, 4, rows([0, 7, 30, S], [0, 2 * L, 2 * L + 5, S]), AttnMaskType.causal, BIG),
    "gqa-b2-tiled": (2, 8, 4, rows([0, 7, 30, S], [0, 2 * L, 2 * L + 5, S]), AttnMaskType.causal, (5, 3)),
    "no-mask": (2, 8, 4, rows([0, 5, 13, 29, 47, S], [0, L, S]), AttnMaskType.no_mask, (5, 6)),
}
P2P_ONLY = {"gqa-1kv": (2, 4, 1, rows([0, 9, S], [0, 31, S]), AttnMaskType.causal, (6, 5))}

# the groups are passed explicitly (no global fallback): the collection init_distributed returns
# (every group, hcp included); a missing collection, or a2a+p2p without its hcp groups, is refused
pg_modes = {"pg": ProcessGroupCollection.use_mpu_process_groups()}
tp_cp_only = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])


def refusal(comm: str, pgc) -> str | None:
    try:
        ContextParallelAttention(config(4, 4, comm), 1, AttnMaskType.causal, cp_comm_type=comm, pg_collection=pgc)
    except ValueError as exc:
        return str(exc)
    return None


report = {"rank": rank}
for comm in a.comms:
    cases = {**CASES, **(P2P_ONLY if comm == "p2p" else {})}
    got = report[comm] = {"cases": {}, "no_groups": refusal(comm, None)}
    if comm == "a2a+p2p":
        got["no_hcp"] = refusal(comm, tp_cp_only)
    for case_no, (name, (B, hq, hkv, cu, mask_type, tile)) in enumerate(cases.items()):
        g = torch.Generator().manual_seed(case_no)  # same tensors on every rank
        q = torch.randn(S, B, hq, D, generator=g)
        k = torch.randn(S, B, hkv, D, generator=g)
        v = torch.randn(S, B, hkv, D, generator=g)
        w = torch.randn(S, B, hq * D, generator=g)  # loss = <out, w>: every output element matters
        psp = packed_seq_params_from_cu_seqlens(cu) if cu is not None else None

        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = PackedSDPAttention(config(hq, hkv, comm), 1, AttnMaskType.causal)
        ref_out = ref(*ref_in, None, attn_mask_type=mask_type, packed_seq_params=psp)
        (ref_out * w).sum().backward()
        ref_out = ref_out.detach()

        for mode, pgc in pg_modes.items():
            attn = ContextParallelAttention(
                config(hq, hkv, comm),
                1,
                AttnMaskType.causal,
                cp_comm_type=comm,
                pg_collection=pgc,
                query_tile=tile[0],
                key_tile=tile[1],
            )
            loc = [split_for_cp(t, 0, rank, C).detach().requires_grad_() for t in (q, k, v)]
            out = attn(*loc, None, attn_mask_type=mask_type, packed_seq_params=psp)
            (out * split_for_cp(w, 0, rank, C)).sum().backward()
            errs = {"out": float((out.detach() - split_for_cp(ref_out, 0, rank, C)).abs().max())}
            for n_, mine, full in zip("qkv", loc, ref_in):
                errs["d" + n_] = float((mine.grad - split_for_cp(full.grad, 0, rank, C)).abs().max())
            errs["ref_grad_scale"] = min(float(t.grad.abs().max()) for t in ref_in)
            # gather_from_cp rebuilds the full output from every rank's part
            parts = [torch.empty_like(out) for _ in range(C)]
            dist.all_gather(parts, out.detach().contiguous())
            errs["gathered"] = float((gather_from_cp(parts, 0) - ref_out).abs().max())
            got["cases"][f"{name}/{mode}"] = errs

    # head counts the all-to-all cannot split must be refused, naming the problem
    if comm in ("a2a", "a2a+p2p"):
        size = C if comm == "a2a" else a.hcp[0]
        hq, hkv = 2 * size, 1  # kv heads not divisible by the all-to-all size
        attn = ContextParallelAttention(
            config(hq, hkv, comm), 1, AttnMaskType.causal, cp_comm_type=comm, pg_collection=pg_modes["pg"]
        )
        try:
            attn(*(torch.randn(S // C, 1, h, D) for h in (hq, hkv, hkv)), None)
            got["refused"] = None
        except ValueError as exc:
            got["refused"] = str(exc)

# split_for_cp is megatron-core's own get_batch_on_this_cp_rank
tokens = torch.arange(2 * S).view(2, S)
batch = {
    "tokens": tokens,
    "position_ids": tokens.float() / 3,
    "labels": tokens + 1,
    "attention_mask": torch.rand(2, 1, S, S) > 0.5,
}
mine = {key: split_for_cp(val, 2 if key == "attention_mask" else 1, rank, C) for key, val in batch.items()}
theirs = get_batch_on_this_cp_rank(dict(batch))
report["megatron_split_equal"] = all(torch.equal(mine[key], theirs[key]) for key in batch)

Path(a.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
