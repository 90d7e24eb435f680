"""Context parallelism (CP) for the LLM's core attention, on CPU with gloo (and GPU without TE).

A packed row of S tokens is cut into 2*C equal chunks and CP rank r keeps chunks r and 2C-1-r
(megatron-core's load balancing: under a causal mask, an early chunk is cheap and a late one
expensive, so every rank gets one of each). Everything per token -- hidden states, V2PE position
ids, labels, loss weights -- is split with `split_for_cp`, through the microbatch's `TokenSplit`
(built once in the forward step, training/step.py); `cu_seqlens` is NOT split: it keeps the
global, batch-major sample boundaries and the attention turns them into per-token sample ids.

`ContextParallelAttention` is a drop-in `core_attention` (same constructor/forward as
`PackedSDPAttention` and megatron's `DotProductAttention`); `cp_comm_type` picks the scheme:

- "p2p" (ring): each rank keeps its queries; the (K, V) blocks travel around the CP ring with
  isend/irecv while the rank attends to the block it holds. Partial results are merged with their
  log-sum-exp (online softmax). The backward runs the same ring: (K, V) travel again together with
  their dK/dV accumulators, which arrive back home after C steps.
- "a2a" (Ulysses): one all-to-all turns "my tokens, all heads" into "all tokens, my heads", a full
  packed attention runs locally, and the inverse all-to-all restores the token split. Needs both
  the query and the key/value head counts (per TP rank) divisible by C.
- "a2a+p2p" (2D, LoongTrain's double ring idea with one ring): all-to-all inside groups of A ranks,
  ring across the P groups (C = A*P). The groups are megatron-core's hierarchical CP groups
  (`initialize_model_parallel(..., hierarchical_context_parallel_sizes=[A, P])`): level 0 holds A
  consecutive CP ranks (the all-to-all), level 1 the ranks with the same index in every level-0
  group (the ring).

Masking is "same packed sample, and key position <= query position" (causal) or "same packed
sample" (AttnMaskType.no_mask), exactly `PackedSDPAttention` on the unsplit row.

GPU / transformer-engine: this module also runs on CUDA (plain torch + torch.distributed; NCCL
supports batch_isend_irecv and all_to_all_single) but is not tuned for it (fp32 tiles). Its tile
plan depends only on the sample boundaries: it is computed on the host once per microbatch (the
boundaries are read once, not per layer) and reused by every layer, forward and backward, so the
device runs the tiles without host syncs. With TE the default is TE's own CP (`--cp-split auto` -> 'thd'): TE takes packed rows
only as 'thd', with *each sample* padded to a multiple of 2C and split into 2C chunks, so that path
has its own split and core attention (parallel/context_parallel_thd.py); `cp_core_attention` picks.
"""

from __future__ import annotations

import math
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .attention import PackedSDPAttention
from .context_parallel_thd import ThdContextParallelAttention, ThdSplit, required_cp_group

CP_COMM_TYPES = ("p2p", "a2a", "a2a+p2p")


# ----------------------------------------------------------------------------------------------
# load-balanced sequence split
def _chunk_len(seq_len: int, cp_size: int) -> int:
    if cp_size < 1:
        raise ValueError(f"parallel/context_parallel.py: cp_size must be >= 1, got {cp_size}")
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"parallel/context_parallel.py: sequence length {seq_len} is not divisible by "
            f"2 x --context-parallel-size = {2 * cp_size}; pad the packs"
        )
    return seq_len // (2 * cp_size)


def cp_chunk_starts(seq_len: int, cp_rank: int, cp_size: int) -> list[int]:
    """Global start positions of the two chunks CP rank `cp_rank` holds, in local order."""
    length = _chunk_len(seq_len, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"parallel/context_parallel.py: cp_rank {cp_rank} outside [0, {cp_size})")
    return [cp_rank * length, (2 * cp_size - 1 - cp_rank) * length]


def cp_token_indices(seq_len: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Global positions (int64, in local order) of the tokens CP rank `cp_rank` holds."""
    length = _chunk_len(seq_len, cp_size)
    return torch.cat([torch.arange(s, s + length) for s in cp_chunk_starts(seq_len, cp_rank, cp_size)])


def split_for_cp(t: torch.Tensor, seq_dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This CP rank's part of `t` along `seq_dim`: chunks r and 2C-1-r of 2C, concatenated."""
    if cp_size == 1:
        return t
    seq_dim = seq_dim % t.dim()
    idx = cp_token_indices(t.shape[seq_dim], cp_rank, cp_size).to(t.device)
    return t.index_select(seq_dim, idx)


def gather_from_cp(parts: Sequence[torch.Tensor], seq_dim: int) -> torch.Tensor:
    """Inverse of `split_for_cp`: the full tensor from every CP rank's part, in CP-rank order."""
    cp_size = len(parts)
    seq_dim = seq_dim % parts[0].dim()
    local = parts[0].shape[seq_dim]
    if local % 2:
        raise ValueError(f"parallel/context_parallel.py: a CP part holds two equal chunks, got length {local}")
    chunks: list[Optional[torch.Tensor]] = [None] * (2 * cp_size)
    for r, part in enumerate(parts):
        first, second = part.split(local // 2, dim=seq_dim)
        chunks[r], chunks[2 * cp_size - 1 - r] = first, second
    return torch.cat(chunks, dim=seq_dim)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TokenSplit:
    """Which tokens of one microbatch this context-parallel rank holds, decided once per microbatch
    (training/step.py builds it; the model splits the spliced embeddings with it, the forward step
    the positions, labels and loss weights, a loss function whatever per-token tensor it reads).

    layout "none" (no CP): every token; "row": chunks r and 2C-1-r of every packed row
    (`split_for_cp`); "thd": TE's per-sample split (`ThdSplit`, which needs the batch's cu_seqlens)."""

    layout: str
    cp_rank: int
    cp_size: int
    thd: Optional[ThdSplit] = None

    @staticmethod
    def build(layout: str, cu_seqlens: Optional[torch.Tensor], shape: Sequence[int], cp_group: Any) -> "TokenSplit":
        """The split of a (B, S) microbatch with global boundaries `cu_seqlens` (None: one sample per row)."""
        size = cp_group.size() if cp_group is not None else 1
        if size == 1:
            return TokenSplit("none", 0, 1)
        rank = cp_group.rank()
        if layout == "thd":
            return TokenSplit("thd", rank, size, ThdSplit.build(cu_seqlens, int(shape[0]), int(shape[1]), rank, size))
        return TokenSplit("row", rank, size)

    def split(self, t: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a per-token tensor: (B, S, ...) along seq_dim 1, (S, B, ...) along 0
        ('thd': (1, T, ...) / (T, 1, ...), padding tokens zero)."""
        if self.thd is not None:
            return self.thd.split(t, seq_dim)
        return split_for_cp(t, seq_dim, self.cp_rank, self.cp_size)


# ----------------------------------------------------------------------------------------------
# packed samples as per-token ids
@dataclass(frozen=True)
class PackedRows:
    """Sample membership of every global position of the B unsplit rows (host tensors: the tile plan
    is made from them without touching the device)."""

    seg: torch.Tensor
    """(B, S) int64 index of the packed sample each token belongs to."""
    seg_start: torch.Tensor
    """(B, S) int64 position (within the row) where that token's sample starts."""
    seg_end: torch.Tensor
    """(B, S) int64 position (within the row) one past the end of that sample."""
    tiles: dict = field(default_factory=dict, compare=False, repr=False)
    """Tile plans already made for these rows (`_tiles`), by block pair, tiling and device."""

    @staticmethod
    def from_cu_seqlens(cu: Optional[torch.Tensor], batch: int, seq_len: int) -> "PackedRows":
        """`cu` = boundaries over the batch-major flattened B*S tokens (None: one sample per row).

        Samples must not span rows (the boundaries must include every multiple of S): the
        attention never pairs tokens of different rows."""
        total = batch * seq_len
        if cu is None:
            bounds = torch.arange(0, total + 1, seq_len)
        else:
            bounds = cu.detach().to("cpu", torch.int64)
            if bounds.numel() < 2 or int(bounds[0]) != 0 or int(bounds[-1]) != total:
                raise ValueError(
                    f"parallel/context_parallel.py: cu_seqlens must run from 0 to B*S = {total} "
                    f"(the GLOBAL, unsplit boundaries), got {bounds.tolist()[:8]}..."
                )
            if bool((bounds[1:] < bounds[:-1]).any()):
                raise ValueError("parallel/context_parallel.py: cu_seqlens must be non-decreasing")
            rows = torch.arange(0, total + 1, seq_len)
            if not bool(torch.isin(rows, bounds).all()):
                raise ValueError(
                    f"parallel/context_parallel.py: cu_seqlens {bounds.tolist()} lets a sample span two "
                    f"rows of length {seq_len}; every row start must be a boundary"
                )
        flat = torch.arange(total)
        seg = torch.searchsorted(bounds[1:], flat, right=True)  # skips empty samples
        row_start = (flat // seq_len) * seq_len
        seg_start = bounds[seg] - row_start
        seg_end = bounds[seg + 1] - row_start
        shape = (batch, seq_len)
        return PackedRows(seg.view(shape), seg_start.view(shape), seg_end.view(shape))

    @staticmethod
    def of_batch(packed: Optional[PackedSeqParams], batch: int, seq_len: int) -> "PackedRows":
        """The rows of the microbatch `packed` describes, read from its cu_seqlens once: every layer
        gets the same PackedSeqParams object, which keeps them (and so their tile plans)."""
        if packed is None or packed.cu_seqlens_q is None:
            return _uniform_rows(batch, seq_len)
        cached = getattr(packed, "_cp_rows", None)
        if cached is not None and cached[0] == (batch, seq_len):
            return cached[1]
        rows = PackedRows.from_cu_seqlens(packed.cu_seqlens_q, batch, seq_len)
        packed._cp_rows = ((batch, seq_len), rows)  # type: ignore[attr-defined]
        return rows


@functools.lru_cache(maxsize=4)
def _uniform_rows(batch: int, seq_len: int) -> PackedRows:
    """One sample per row (no cu_seqlens)."""
    return PackedRows.from_cu_seqlens(None, batch, seq_len)


# ----------------------------------------------------------------------------------------------
# blockwise attention with log-sum-exp (no autograd: the ring Function calls these)
@dataclass
class _RingPlan:
    """Everything a ring attention call needs besides the tensors."""

    group: Any
    ring_rank: int
    ring_size: int
    member_starts: list[list[int]]
    """Chunk start positions (global, in local token order) of every ring member's tokens."""
    chunk: int
    """Chunk length L; every member holds len(member_starts[i]) * L tokens."""
    rows: PackedRows
    causal: bool
    scale: float
    tile: int
    """Query rows per score tile."""
    key_tile: int
    """Keys per score tile: score memory is O(tile x key_tile), not O(tokens^2)."""

    def peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.ring_rank + offset) % self.ring_size)


@dataclass
class _Tile:
    q_rows: slice
    """Rows of the local query block."""
    k_pieces: list[tuple[int, int]]
    """(local offset, length) runs of the keys some query of the tile may see."""
    mask: Optional[torch.Tensor]
    """(B, 1, 1, T, c1-c0) bool visibility of the key columns c0:c1 (window order); columns
    outside it are visible to every query of the tile. None: everything visible."""
    cols: slice

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        """The tile's keys/values of a (B, hkv, Nk, d) block, in window order (a view if one run)."""
        if len(self.k_pieces) == 1:
            off, n = self.k_pieces[0]
            return t.narrow(2, off, n)
        return torch.cat([t.narrow(2, off, n) for off, n in self.k_pieces], dim=2)

    def add_to_keys(self, acc: torch.Tensor, grad: torch.Tensor) -> None:
        """acc[keys of the tile] += grad, for a (B, hkv, Nk, d) accumulator."""
        at = 0
        for off, n in self.k_pieces:
            acc.narrow(2, off, n).add_(grad.narrow(2, at, n))
            at += n


def _cut(pieces: list[tuple[int, int, int]], limit: int) -> Iterator[list[tuple[int, int, int]]]:
    """Split (local offset, start, end) key runs into consecutive groups of at most `limit` keys."""
    group: list[tuple[int, int, int]] = []
    room = limit
    for off, a, b in pieces:
        while a < b:
            n = min(b - a, room)
            group.append((off, a, a + n))
            off, a, room = off + n, a + n, room - n
            if room == 0:
                yield group
                group, room = [], limit
    if group:
        yield group


def _tiles(q_starts: list[int], k_starts: list[int], plan: _RingPlan, device: torch.device) -> list[_Tile]:
    """`_make_tiles`, made once per microbatch and (block pair, tiling, device): every layer's
    forward and backward reuse the plan and its device masks."""
    key = (tuple(q_starts), tuple(k_starts), plan.chunk, plan.causal, plan.tile, plan.key_tile, device)
    tiles = plan.rows.tiles.get(key)
    if tiles is None:
        tiles = plan.rows.tiles[key] = list(_make_tiles(q_starts, k_starts, plan, device))
    return tiles


def _make_tiles(q_starts: list[int], k_starts: list[int], plan: _RingPlan, device: torch.device) -> Iterator[_Tile]:
    """(query tile, key tile) pairs of a (query block, key block) pair with at least one visible key.

    Keys are first cut to the window [first sample start, last causal/sample end) of the tile's
    queries; whole chunk pairs and tiles that fall outside it (e.g. key chunks after the query
    chunk under a causal mask) cost nothing. The window is cut into key tiles of at most
    `plan.key_tile` keys (partial softmaxes merge like ring steps), so score memory is bounded by
    query_tile x key_tile whatever the sequence length. The exact mask is built per key tile and
    trimmed to the columns that are not visible to every query (under a causal mask, the last few
    keys), so most scores need no masking. All of it runs on the host rows; only the masks go to
    `device`."""
    L, rows = plan.chunk, plan.rows
    for qi, qs in enumerate(q_starts):
        for t0 in range(0, L, plan.tile):
            t1 = min(L, t0 + plan.tile)
            lo = int(rows.seg_start[:, qs + t0].min())
            hi = int(rows.seg_end[:, qs + t1 - 1].max())
            if plan.causal:
                hi = min(hi, qs + t1)
            window = []
            for ki, ks in enumerate(k_starts):
                a, b = max(ks, lo), min(ks + L, hi)
                if a < b:
                    window.append((ki * L + a - ks, a, b))
            q_pos = torch.arange(qs + t0, qs + t1)
            q_rows = slice(qi * L + t0, qi * L + t1)
            for pieces in _cut(window, plan.key_tile):
                k_pos = torch.cat([torch.arange(a, b) for _, a, b in pieces])
                mask = rows.seg[:, q_pos][:, :, None] == rows.seg[:, k_pos][:, None, :]  # (B, T, M)
                if plan.causal:
                    mask &= k_pos[None, None, :] <= q_pos[None, :, None]
                if not bool(mask.any()):
                    continue
                partial = ~mask.all(dim=1).all(dim=0)  # (M,) columns some query cannot see
                k_pieces = [(off, b - a) for off, a, b in pieces]
                if not bool(partial.any()):
                    yield _Tile(q_rows, k_pieces, None, slice(0, 0))
                    continue
                cols = partial.nonzero()
                c0, c1 = int(cols[0]), int(cols[-1]) + 1
                yield _Tile(q_rows, k_pieces, mask[:, :, c0:c1].contiguous().to(device)[:, None, None], slice(c0, c1))


def _tile_scores(qt: torch.Tensor, kt: torch.Tensor, tile: _Tile, g: int) -> torch.Tensor:
    """(B, hkv, g*T, M) masked scores (-inf where invisible); qt is pre-scaled (B, hkv, g*T, d)."""
    s = torch.matmul(qt, kt.transpose(-1, -2))
    if tile.mask is not None:
        b, h, gt, m = s.shape
        s.view(b, h, g, gt // g, m)[..., tile.cols].masked_fill_(~tile.mask, float("-inf"))
    return s


def _query_tile(q: torch.Tensor, rows: slice, scale: float = 1.0) -> torch.Tensor:
    """(B, hkv, g, N, d)[..., rows, :] -> (B, hkv, g*T, d) fp32: one matmul per kv head, no
    broadcasting copies of K over the g query heads that share it."""
    b, h, g, _, d = q.shape
    t = q[:, :, :, rows].float()
    return (t * scale if scale != 1.0 else t).reshape(b, h, g * (rows.stop - rows.start), d)


def _block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_starts: list[int],
    k_starts: list[int],
    plan: _RingPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Attend the local queries to one (K, V) block and merge into the running (out, lse).

    q (B, hkv, g, Nq, d); k, v (B, hkv, Nk, d); out (B, hkv, g, Nq, d) fp32; lse (B, hkv, g, Nq)."""
    b, h, g, _, d = q.shape
    for tile in _tiles(q_starts, k_starts, plan, q.device):
        r = tile.q_rows
        s = _tile_scores(_query_tile(q, r, plan.scale), tile.keys(k).float(), tile, g)  # (B, hkv, gT, M)
        m = s.amax(dim=-1, keepdim=True)
        m.masked_fill_(torch.isneginf(m), 0.0)  # rows that see nothing in this block
        p = s.sub_(m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, tile.keys(v).float()).div_(denom.clamp_min(1e-30))  # (B, hkv, gT, d)
        blk_lse = (m + torch.log(denom)).view(b, h, g, -1)  # -inf where the row saw nothing
        o = o.view(b, h, g, -1, d)
        acc_o, acc_lse = out[:, :, :, r], lse[:, :, :, r]
        new = torch.logaddexp(acc_lse, blk_lse)
        safe = new.masked_fill(torch.isneginf(new), 0.0)
        acc_o.mul_(torch.exp(acc_lse - safe)[..., None]).add_(o * torch.exp(blk_lse - safe)[..., None])
        acc_lse.copy_(new)


def _block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_starts: list[int],
    k_starts: list[int],
    plan: _RingPlan,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Add one (K, V) block's share of dq and the local queries' share of that block's dk, dv.

    Flash-attention backward: P = exp(S - lse) with the final lse, dS = P * (dP - delta),
    delta = rowsum(dout * out). dq is fp32 (B, hkv, g, Nq, d); dk, dv fp32 (B, hkv, Nk, d)."""
    b, h, g, _, d = q.shape
    for tile in _tiles(q_starts, k_starts, plan, q.device):
        r = tile.q_rows
        kt, vt = tile.keys(k).float(), tile.keys(v).float()
        qt = _query_tile(q, r, plan.scale)  # (B, hkv, gT, d), scaled
        dot = _query_tile(dout, r)
        s = _tile_scores(qt, kt, tile, g)
        p = s.sub_(lse[:, :, :, r].reshape(b, h, -1, 1)).exp_()  # (B, hkv, gT, M)
        ds = torch.matmul(dot, vt.transpose(-1, -2)).sub_(delta[:, :, :, r].reshape(b, h, -1, 1)).mul_(p)
        dq[:, :, :, r] += torch.matmul(ds, kt).view(b, h, g, -1, d) * plan.scale
        # (gT)^T contractions sum the g query heads that share a kv head
        tile.add_to_keys(dk, torch.matmul(ds.transpose(-1, -2), qt))  # qt carries the scale
        tile.add_to_keys(dv, torch.matmul(p.transpose(-1, -2), dot))


def _exchange(send: torch.Tensor, recv: torch.Tensor, plan: _RingPlan, tag: int) -> list:
    """Start sending `send` to the next ring member and receiving `recv` from the previous one."""
    ops = [
        dist.P2POp(dist.isend, send, plan.peer(1), group=plan.group, tag=tag),
        dist.P2POp(dist.irecv, recv, plan.peer(-1), group=plan.group, tag=tag),
    ]
    return dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


class _RingAttention(torch.autograd.Function):
    """Ring attention over `plan.group`; q (B, hkv, g, N, d), k/v (B, hkv, N, d) -> like q."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _RingPlan) -> torch.Tensor:
        me, n = plan.ring_rank, plan.ring_size
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()  # one message per step
        for step in range(n):
            works, nxt = [], None
            if step < n - 1:  # the next block travels while this one is computed
                nxt = torch.empty_like(kv)
                works = _exchange(kv, nxt, plan, tag=0)
            src = (me - step) % n
            _block_forward(q, kv[0], kv[1], plan.member_starts[me], plan.member_starts[src], plan, out, lse)
            _wait(works)
            if nxt is not None:
                kv = nxt
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple:
        q, k, v, out, lse = ctx.saved_tensors
        plan: _RingPlan = ctx.plan
        me, n = plan.ring_rank, plan.ring_size
        dout = dout.float()
        lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # rows that saw no key at all: P = 0 there
        delta = (dout * out).sum(dim=-1)  # (B, hkv, g, N)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for step in range(n):
            works, nxt = [], None
            if step < n - 1:
                nxt = torch.empty_like(kv)
                works = _exchange(kv, nxt, plan, tag=0)
            src = (me - step) % n
            _block_backward(
                q,
                kv[0],
                kv[1],
                dout,
                lse,
                delta,
                plan.member_starts[me],
                plan.member_starts[src],
                plan,
                dq,
                dkv[0],
                dkv[1],
            )
            if n > 1:  # the block's gradient follows the block; after n hops it is home
                home = torch.empty_like(dkv)
                works += _exchange(dkv, home, plan, tag=1)
                _wait(works)
                dkv = home
            else:
                _wait(works)
            if nxt is not None:
                kv = nxt
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


# ----------------------------------------------------------------------------------------------
# all-to-all between "my tokens, all heads" and "everyone's tokens, my heads"
def _seq_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(N, B, h, d) -> (A*N, B, h/A, d): rank j of the group's tokens first-to-last, head slice me."""
    a = dist.get_world_size(group)
    n, b, h, d = x.shape
    send = x.reshape(n, b, a, h // a, d).permute(2, 0, 1, 3, 4).contiguous()  # (A, N, B, h/A, d)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(a * n, b, h // a, d)


def _heads_to_seq(y: torch.Tensor, group: Any) -> torch.Tensor:
    """Inverse of `_seq_to_heads`: (A*N, B, h/A, d) -> (N, B, h, d)."""
    a = dist.get_world_size(group)
    m, b, hs, d = y.shape
    send = y.reshape(a, m // a, b, hs, d).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my tokens, head slice j
    return recv.permute(1, 2, 0, 3, 4).reshape(m // a, b, a * hs, d)


class _SeqToHeads(torch.autograd.Function):
    """`_seq_to_heads` whose backward is the inverse permutation (`_heads_to_seq`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _heads_to_seq(grad.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    """`_heads_to_seq` whose backward is `_seq_to_heads`."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _heads_to_seq(y, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _seq_to_heads(grad.contiguous(), ctx.group), None


# ----------------------------------------------------------------------------------------------
# the module
class ContextParallelAttention(MegatronModule):
    """Core attention over CP-split packed rows: this rank's 2 chunks of queries vs all keys.

    Inputs are the local tokens (S/C per row, chunks r and 2C-1-r), q (S/C, B, hq, d) and k/v
    (S/C, B, hkv, d); `packed_seq_params.cu_seqlens_q` holds the GLOBAL batch-major boundaries
    (0..B*S). Returns (S/C, B, hq*d). With C = 1 it is `PackedSDPAttention`.

    `query_tile` x `key_tile` bounds the ring kernel's score tiles (memory independent of S)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,  # required; None only because megatron-core passes it by keyword
        query_tile: int = 256,
        key_tile: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(
                f"parallel/context_parallel.py: only self-attention is context-split, got {attention_type!r}"
            )
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_comm_type = cp_comm_type or "p2p"  # megatron-core / TE default
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(
                f"parallel/context_parallel.py: --cp-comm-type {self.cp_comm_type!r} is not supported "
                f"by the local core attention; choose one of {CP_COMM_TYPES}"
            )
        self.query_tile, self.key_tile = query_tile, key_tile
        # the whole-row packed attention for C = 1 and inside the a2a scheme (no parameters)
        self.local = PackedSDPAttention(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout,
            softmax_scale,
            pg_collection=pg_collection,
        )

        self.cp_group = required_cp_group(pg_collection)
        self.tp_group = getattr(pg_collection, "tp", None)  # megatron-core's sharded_state_dict reads it
        self.cp_size = self.cp_group.size()
        self.cp_rank = self.cp_group.rank()
        self.a2a_group = self.p2p_group = None
        if self.cp_size > 1 and self.cp_comm_type == "a2a+p2p":
            hcp = getattr(pg_collection, "hcp", None)
            if hcp is None or len(hcp) != 2:
                raise ValueError(
                    "parallel/context_parallel.py: --cp-comm-type a2a+p2p needs the two hierarchical CP "
                    "groups: initialize_model_parallel(..., hierarchical_context_parallel_sizes"
                    "=[A, P]) (--hierarchical-context-parallel-sizes A P)"
                )
            self.a2a_group, self.p2p_group = hcp
            self._check_hierarchy()

    def _check_hierarchy(self) -> None:
        """The ring's token bookkeeping assumes cp_rank = p2p_rank * A + a2a_rank (megatron's layout)."""
        a, p = self.a2a_group.size(), self.p2p_group.size()
        cp_ranks = dist.get_process_group_ranks(self.cp_group)
        i, j = self.a2a_group.rank(), self.p2p_group.rank()
        expect_a2a = [cp_ranks[j * a + x] for x in range(a)]
        expect_p2p = [cp_ranks[y * a + i] for y in range(p)]
        if (
            a * p != self.cp_size
            or self.cp_rank != j * a + i
            or dist.get_process_group_ranks(self.a2a_group) != expect_a2a
            or dist.get_process_group_ranks(self.p2p_group) != expect_p2p
        ):
            raise ValueError(
                f"parallel/context_parallel.py: hierarchical CP groups {dist.get_process_group_ranks(self.a2a_group)}"
                f" x {dist.get_process_group_ranks(self.p2p_group)} do not tile the CP group "
                f"{cp_ranks} as [A consecutive ranks] x [stride-A ring]"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if self.cp_size == 1:
            return self.local(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        if attention_bias is not None:
            raise ValueError("parallel/context_parallel.py: attention bias is not supported")
        n = query.shape[0]
        if n % 2:
            raise ValueError(
                f"parallel/context_parallel.py: {n} local tokens cannot be the two equal chunks of a CP rank"
            )
        mask_type = attn_mask_type or self.attn_mask_type
        if self.cp_comm_type == "a2a":
            return self._forward_a2a(query, key, value, attention_mask, mask_type, packed_seq_params)
        return self._forward_ring(query, key, value, mask_type, packed_seq_params)

    def _forward_ring(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask_type: AttnMaskType,
        packed_seq_params: Optional[PackedSeqParams],
    ) -> torch.Tensor:
        """p2p and a2a+p2p: this rank's query chunks against every ring member's key/value chunks."""
        if self.training and self.dropout_p > 0:
            raise NotImplementedError(
                "parallel/context_parallel.py: attention dropout is not implemented for the "
                f"ring (--cp-comm-type {self.cp_comm_type}); set --attention-dropout 0"
            )
        n, b, hq, d = query.shape
        c = self.cp_size
        seq_len = n * c
        rows = PackedRows.of_batch(packed_seq_params, b, seq_len)
        group, ring_rank, ring_size, members, (q, k, v) = self._ring(query, key, value, seq_len)
        plan = _RingPlan(
            group,
            ring_rank,
            ring_size,
            members,
            seq_len // (2 * c),
            rows,
            mask_type == AttnMaskType.causal,
            self.softmax_scale,
            self.query_tile,
            self.key_tile,
        )
        m, hq_l, hkv_l = q.shape[0], q.shape[2], k.shape[2]
        # (M, B, h, d) -> (B, hkv, g, M, d): query heads grouped under their kv head (GQA)
        qb = q.permute(1, 2, 0, 3).reshape(b, hkv_l, hq_l // hkv_l, m, d)
        kb, vb = (t.permute(1, 2, 0, 3) for t in (k, v))
        out = _RingAttention.apply(qb, kb, vb, plan)  # (B, hkv, g, M, d)
        out = out.reshape(b, hq_l, m, d).permute(2, 0, 1, 3)  # (M, B, h, d)
        if self.cp_comm_type == "a2a+p2p":
            out = _HeadsToSeq.apply(out.contiguous(), self.a2a_group)
        return out.reshape(n, b, hq * d)

    def _ring(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seq_len: int
    ) -> tuple[Any, int, int, list[list[int]], tuple[torch.Tensor, ...]]:
        """The ring's group, this rank's place in it, each member's chunk starts, and the q, k, v it
        runs on (a2a+p2p: this all-to-all group's tokens, a slice of the heads)."""
        c = self.cp_size
        if self.cp_comm_type == "p2p":
            members = [cp_chunk_starts(seq_len, r, c) for r in range(c)]
            return self.cp_group, self.cp_rank, c, members, (query, key, value)
        a = self.a2a_group.size()  # a2a+p2p
        self._check_heads(query.shape[2], key.shape[2], a, "a2a+p2p (all-to-all group size A)")
        ring_size = self.p2p_group.size()
        members = [sum((cp_chunk_starts(seq_len, p * a + x, c) for x in range(a)), []) for p in range(ring_size)]
        qkv = self._scatter_heads(query, key, value, self.a2a_group)
        return self.p2p_group, self.p2p_group.rank(), ring_size, members, qkv

    @staticmethod
    def _check_heads(hq: int, hkv: int, size: int, what: str) -> None:
        if hq % size or hkv % size:
            raise ValueError(
                f"parallel/context_parallel.py: --cp-comm-type {what} splits heads over {size} ranks, but this "
                f"rank has {hq} query and {hkv} key/value heads (after tensor parallelism); "
                f"both must be divisible by {size} -- use p2p or a smaller all-to-all group"
            )

    @staticmethod
    def _scatter_heads(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One all-to-all for q, k and v: (N, B, h*, d) each -> (A*N, B, h*/A, d) each."""
        a = dist.get_world_size(group)
        n, b, hq, d = query.shape
        hkv = key.shape[2]
        packed = torch.cat([t.reshape(n, b, a, t.shape[2] // a, d) for t in (query, key, value)], dim=3)
        packed = _SeqToHeads.apply(packed.reshape(n, b, -1, d), group)  # (A*N, B, (hq+2hkv)/A, d)
        return tuple(packed.split([hq // a, hkv // a, hkv // a], dim=2))  # type: ignore[return-value]

    def _forward_a2a(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        mask_type: AttnMaskType,
        packed_seq_params: Optional[PackedSeqParams],
    ) -> torch.Tensor:
        """Ulysses: all tokens of my head slice, whole-row packed attention, back to my tokens."""
        n, b, hq, d = query.shape
        c = self.cp_size
        self._check_heads(hq, key.shape[2], c, "a2a")
        q, k, v = self._scatter_heads(query, key, value, self.cp_group)  # (S, B, h/C, d), CP-rank order
        seq_len = n * c
        order = torch.cat([cp_token_indices(seq_len, r, c) for r in range(c)]).to(query.device)
        to_global = torch.argsort(order)
        q, k, v = (t.index_select(0, to_global) for t in (q, k, v))  # global token order
        out = self.local(q, k, v, attention_mask, mask_type, None, packed_seq_params)  # (S, B, h/C*d)
        out = out.index_select(0, order).reshape(seq_len, b, hq // c, d)  # back to CP-rank order
        return _HeadsToSeq.apply(out.contiguous(), self.cp_group).reshape(n, b, hq * d)


def cp_core_attention(split: str = "row", backend: str = "local") -> type:
    """The core-attention class a layer spec uses with --context-parallel-size > 1.

    split "row" (whole packed rows, `split_for_cp`): `ContextParallelAttention` on every device.
    split "thd" (per-sample, TE's layout; parallel/context_parallel_thd.py): `ThdContextParallelAttention`,
    with TE's kernel for backend "te" and the exact all-gather reference otherwise."""
    if split == "thd":
        if backend == "te":
            return type("ThdContextParallelAttentionTE", (ThdContextParallelAttention,), {"use_te": True})
        return ThdContextParallelAttention
    return ContextParallelAttention


def resolve_cp_split(
    split: str, backend: str, pipeline: int = 1, sequence_parallel: bool = False, cp_comm_type: str = "p2p"
) -> str:
    """--cp-split auto: TE's per-sample 'thd' split with the TE backend where the layout allows it
    (config/problems.py: thd_problems), whole rows otherwise."""
    return cp_split_choice(split, backend, pipeline, sequence_parallel, cp_comm_type)[0]


def cp_split_choice(
    split: str, backend: str, pipeline: int = 1, sequence_parallel: bool = False, cp_comm_type: str = "p2p"
) -> tuple[str, str]:
    """(split, why): the split `resolve_cp_split` picks and the reason, for the start-up log line."""
    if split != "auto":
        return split, f"--cp-split {split} given"
    blockers = []
    if backend != "te":
        blockers.append("no transformer-engine layer specs (local backend: --device cpu, or TE not installed)")
    if pipeline > 1:
        blockers.append(f"--pipeline-model-parallel-size {pipeline} > 1")
    if sequence_parallel:
        blockers.append("--sequence-parallel")
    if cp_comm_type != "p2p":
        blockers.append(f"--cp-comm-type {cp_comm_type} (TE's 'thd' path runs p2p only)")
    if not blockers:
        return "thd", "--cp-split auto: transformer-engine backend and a layout its 'thd' path carries"
    return "row", "--cp-split auto fell back from TE's 'thd' path because of " + "; ".join(blockers)


def cp_path_line(split: str, why: str, backend: str, cp_comm_type: str) -> str:
    """The one start-up line saying which context-parallel attention runs, and why."""
    if split == "thd":
        kernel = "TE's attention" if backend == "te" else "the all-gather CPU reference"
        return f"context parallelism: per-sample 'thd' split, {kernel} ({why})"
    kernel = {
        "p2p": "our fp32 ring attention",
        "a2a": "our all-to-all (Ulysses) attention",
        "a2a+p2p": "our all-to-all + ring attention",
    }.get(cp_comm_type, cp_comm_type)
    return f"context parallelism: whole-row split, {kernel} (--cp-comm-type {cp_comm_type}; {why})"
