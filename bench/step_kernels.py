#!/usr/bin/env python
"""The train step's kernels, each against the path megatron-core takes on CPU by default, at
debug-m sizes (4096-token pack): medians of interleaved reps, CPU seconds (all threads) per call
forward + backward, and the results' largest difference.

    python bench/step_kernels.py            # ~1-2 min on 2 idle cores
    python bench/step_kernels.py --quick    # smaller shapes, 1 rep: checks that it runs

1. AdamW step over debug-m's parameter shapes: torch's per-tensor loop (what megatron-core builds
   without TE/apex) vs the fused CPU kernel (`cpu_compat.fuse_cpu_adam`, on by default);
2. RoPE on q and k: megatron-core's unfused `_apply_rotary_pos_emb_bshd` vs `models/rope.py` (on
   by default);
3. SwiGLU: megatron-core's unfused `silu(a) * b` vs its torch.compile'd fused SwiGLU
   (`--torch-compile`; the first call compiles, untimed);
4. output layer + cross entropy over a 32000 vocabulary: megatron-core's full-logit
   `vocab_parallel_cross_entropy` vs `models/chunked_loss.py` (`--cross-entropy-chunk-size`), with
   the peak memory each adds (resident-set peak, malloc returning freed blocks);
5. the same over every token (`--all-token-logits`) vs only the tokens that carry loss (default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.train_throughput import peak_memory, returning_malloc  # noqa: E402


def cpu_seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def compare(name: str, plain, fast, reps: int, unit: str = "call") -> None:
    """Interleaved reps of the two callables (each returns a tensor to compare); prints medians."""
    a, b = plain(), fast()  # warm-up (and compile) untimed
    diff = max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))
    tp, tf = [], []
    for k in range(reps):
        for side in ((plain, tp), (fast, tf)) if k % 2 == 0 else ((fast, tf), (plain, tp)):
            side[1].append(cpu_seconds(side[0]))
    p, f = statistics.median(tp), statistics.median(tf)
    print(f"{name:34s} {p:7.3f} s -> {f:7.3f} s CPU per {unit} ({p / f:4.2f}x), max diff {diff:.1e}")


def adam_case(shapes: list[tuple], reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]

    def make(**kw):
        ps = [p.clone().requires_grad_() for p in params]
        for p, gr in zip(ps, grads):
            p.grad = gr
        opt = torch.optim.AdamW(ps, lr=1e-3, **kw)
        return lambda: (opt.step(), ps)[1]

    compare("AdamW step (all parameters)", make(foreach=False), make(fused=True), reps, "step")


def rope_case(s: int, heads: int, groups: int, d: int, reps: int) -> None:
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from internvl_mcore.models.rope import apply_rotary

    freqs = torch.rand(s, 1, 1, d // 2) * s
    freqs = torch.cat([freqs, freqs], dim=-1)
    qkv = torch.randn(s, 1, (heads + 2 * groups) * d)

    def run(fn):
        def go():
            x = qkv.clone().requires_grad_()
            q = x.view(s, 1, heads + 2 * groups, d)[:, :, :heads]  # strided views, as megatron-core splits
            k = x.view(s, 1, heads + 2 * groups, d)[:, :, heads : heads + groups]
            (fn(q, freqs).sum() + 2 * fn(k, freqs).sum()).backward()
            return [x.grad]

        return go

    compare("RoPE on q and k, fwd+bwd", run(_apply_rotary_pos_emb_bshd), run(apply_rotary), reps)


def swiglu_case(s: int, ffn: int, reps: int) -> None:
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    y0, g = torch.randn(s, 1, 2 * ffn), torch.randn(s, 1, ffn)

    def run(fn):
        def go():
            y = y0.clone().requires_grad_()
            out = fn(y)
            out.backward(g)
            return [out.detach(), y.grad]

        return go

    def unfused(y):
        a, b = torch.chunk(y, 2, -1)
        return F.silu(a) * b

    compare("SwiGLU, fwd+bwd (compiled)", run(unfused), run(lambda y: bias_swiglu_impl(y, None)), reps)


def head_step(loss_fn, h0: torch.Tensor, w0: torch.Tensor, grad_out: torch.Tensor):
    """A callable: forward + backward of `loss_fn(hidden, weight)` weighted by grad_out; returns the grads."""

    def go():
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        (loss_fn(h, w) * grad_out).sum().backward()
        return [h.grad, w.grad]

    return go


def cross_entropy_case(s: int, hidden: int, vocab: int, chunk: int, reps: int) -> None:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from internvl_mcore.config.model import ParallelConfig
    from internvl_mcore.models.chunked_loss import chunked_output_cross_entropy
    from internvl_mcore.parallel.state import init_distributed

    pg = init_distributed(ParallelConfig(), seed=0)
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(s, 1, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.02
    labels, grad_out = torch.randint(0, vocab, (1, s), generator=g), torch.rand(1, s, generator=g)

    full = head_step(
        lambda h, w: vocab_parallel_cross_entropy(h @ w.t(), labels.t().contiguous()).t(), h0, w0, grad_out
    )
    chunked = head_step(
        lambda h, w: chunked_output_cross_entropy(h, w, labels, chunk, vocab, pg.tp, False), h0, w0, grad_out
    )
    compare(f"output layer + CE (chunks of {chunk})", full, chunked, reps)
    returning_malloc()
    print(f"{'  peak memory added':34s} {peak_memory(full):7.0f} MiB -> {peak_memory(chunked):7.0f} MiB")


def target_token_case(s: int, hidden: int, vocab: int, fraction: float, reps: int) -> None:
    """The output layer + loss over every token vs only the tokens that carry loss (the model's
    default, `LanguageModel._target_token_loss` at TP1: pick the rows, same loss, scatter back)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(1)
    h0, w0 = torch.randn(s, 1, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.02
    labels = torch.randint(0, vocab, (1, s), generator=g)
    keep = torch.rand(s, 1, generator=g) < fraction  # (S, B): which tokens carry loss
    grad_out = torch.rand(1, s, generator=g) * keep.t()  # the loss function weighs the others by 0

    def ce(h, w, t):  # megatron-core's vocab-parallel loss on (S, B, H) rows
        return vocab_parallel_cross_entropy(h @ w.t(), t)

    def targeted(h, w):
        picked = ce(h[keep][:, None], w, labels.t()[keep][:, None])  # (N, 1)
        return torch.zeros(keep.shape).masked_scatter(keep, picked.reshape(-1)).t()

    full = head_step(lambda h, w: ce(h, w, labels.t().contiguous()).t(), h0, w0, grad_out)
    compare(f"output layer + CE, {fraction:.0%} loss tokens", full, head_step(targeted, h0, w0, grad_out), reps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, 1 rep: checks that it runs")
    p.add_argument("--reps", type=int, default=None, help="interleaved reps per case (default 5; --quick 1)")
    p.add_argument("--chunk", type=int, default=1024, help="--cross-entropy-chunk-size to measure")
    p.add_argument(
        "--loss-fraction",
        type=float,
        default=0.3,
        help="share of the pack's tokens that carry loss (bench/train_throughput.py's packer steps: ~0.3)",
    )
    args = p.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    s, vocab = (512, 4000) if args.quick else (4096, 32000)
    llm = [(vocab, 512), (vocab, 512)] + [(3072, 512), (512, 1536), (768, 512), (512, 512), (512,), (512,)] * 8
    vit = [(1152, 384), (1152,), (384, 384), (384,), (1536, 384), (1536,), (384, 1536), (384,)] + [(384,)] * 6
    print(
        f"{torch.get_num_threads()} torch threads; debug-m shapes, {s}-token pack; medians of {reps} interleaved reps"
    )
    adam_case(llm + vit * 4, reps)
    rope_case(s, 8, 2, 64, reps)
    swiglu_case(s, 1536, reps)
    cross_entropy_case(s, 512, vocab, min(args.chunk, s), reps)
    target_token_case(s, 512, vocab, args.loss_fraction, reps)


if __name__ == "__main__":
    main()
