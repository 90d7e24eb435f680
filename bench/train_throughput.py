#!/usr/bin/env python
"""Training throughput on this CPU: GEMM peak, CPU-MFU of our train step, and effective tokens/s
against transformers' `InternVLForConditionalGeneration` on the same samples.

    python bench/train_throughput.py            # debug-m, 4096-token packs: ~2 min on 2 idle cores
    python bench/train_throughput.py --quick    # tiny model, 512 tokens, < 1 min: checks that it runs
    python bench/train_throughput.py --profile  # then profile one more step of ours (torch.profiler)
    python bench/train_throughput.py --batches packer   # length-grouped batches (see make_steps)
    python bench/train_throughput.py --ours-flags='--torch-compile'   # extra training flags for ours

Prints, all measured in this run:
1. the fp32 GEMM peak of this machine (a square matmul with all torch threads, measured the way
   `metrics.measure_peak_flops` does for the training log), measured between the timed steps,
   since other processes share the cores;
2. the model FLOPs of one train step (`plan.flops.train_step_flops`, the count the training log's
   MFU uses) and the CPU-MFU of our real train step (`training.loop.setup` + `train_step`:
   megatron-core schedule, DDP, optimizer) for the debug-m model at TP1 in one process, fp32, on one
   pack of --seq-length tokens holding several samples with images;
3. effective (non-pad) tokens/s of ours and of transformers' model (built offline from the same
   config, same weights copied in, AdamW step and gradient clipping included) trained on the same
   samples, which transformers gets the usual HF way: one sample per row, right-padded to the
   longest sample of the batch, attention mask. The ratio is the headline number.

Steps of ours and of transformers alternate (rep 1: ours then HF, rep 2: HF then ours, ...) and the
medians are reported, so load from other processes hits both alike; each rep trains both on the
same samples. Each side first runs one untimed warm-up step on the same three samples from the same
weights, and the two losses must agree, which checks that both sides compute the same thing.
When other processes share the cores, wall-clock numbers swing by 2x and more; the figures "by CPU
time" (process CPU seconds of all threads, peak likewise) do not count time-slicing, but still
suffer from shared caches and memory bandwidth, so they read low under load too.

The samples are drawn from a scaled-down InternVL-SFT-like mix (text-only, single image with
dynamic tiles + thumbnail, multi-image; log-normal text lengths), grouped into steps of at most
--seq-length tokens (`make_steps`: a random draw by default), and collated by `Batch.from_packs`
(the data loader's `collate`) exactly as training batches are.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")

import torch  # noqa: E402

from internvl_mcore.config import ModelConfig, get_preset  # noqa: E402
from internvl_mcore.data.source_images import normalize_pixels  # noqa: E402

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One conversation as token ids, with its tiles."""

    tokens: np.ndarray
    """(L,) int64: per image <img> + tiles x num_image_token <IMG_CONTEXT> + </img>, then text."""
    loss_mask: np.ndarray
    """(L,) float32, 1 on the answer tokens."""
    tiles: np.ndarray
    """(T, H, W, 3) uint8 RGB tiles, as the data loader ships them (random: pixel values do not change the work)."""
    num_tiles: list[int]
    """Tiles per image."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def sample_shapes(n: int, seed: int, num_image_token: int, max_len: int) -> list[tuple[list[int], int]]:
    """(tiles per image, text tokens) of n samples from an InternVL-SFT-like mix, each <= max_len.

    25% text only; 55% one image of 1 tile (small image) or 2/4/6 tiles + thumbnail (InternVL's
    dynamic tiling); 20% 2-4 images of one tile each. Text is log-normal (median ~150 tokens, long
    tail to 2k). Samples that would not fit max_len are drawn again."""
    rng = np.random.default_rng(seed)
    out: list[tuple[list[int], int]] = []
    while len(out) < n:
        kind = rng.choice(3, p=[0.25, 0.55, 0.20])
        if kind == 0:
            images: list[int] = []
        elif kind == 1:
            images = [int(rng.choice([1, 3, 5, 7], p=[0.35, 0.30, 0.20, 0.15]))]
        else:
            images = [1] * int(rng.integers(2, 5))
        text = int(np.clip(rng.lognormal(5.0, 0.9), 16, 2000))
        if sum(t * num_image_token + 2 for t in images) + text <= max_len:
            out.append((images, text))
    return out


def make_sample(cfg: ModelConfig, images: list[int], text: int, seed: int) -> Sample:
    """Token ids and random tiles of one sample; the answer is the last 60% of the text."""
    rng = np.random.default_rng(seed)
    specials = {cfg.img_context_token_id, cfg.img_start_token_id, cfg.img_end_token_id, cfg.pad_token_id}
    parts = []
    for t in images:
        parts += [
            [cfg.img_start_token_id],
            [cfg.img_context_token_id] * (t * cfg.num_image_token),
            [cfg.img_end_token_id],
        ]
    words = rng.integers(0, cfg.llm.vocab_size, text)
    words = np.where(np.isin(words, list(specials)), 1, words)
    tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] + [words.astype(np.int64)])
    loss_mask = np.zeros(len(tokens), dtype=np.float32)
    loss_mask[len(tokens) - int(0.6 * text) :] = 1.0
    size = cfg.vision.image_size
    tiles = rng.integers(0, 256, (sum(images), size, size, 3), dtype=np.uint8)
    return Sample(tokens, loss_mask, tiles, list(images))


def stream_packs(lengths: np.ndarray, seq_length: int, n_packs: int, seed: int, window: int = 32) -> list[list[int]]:
    """Packs filled online from a shuffled sample stream, as a packing data loader does: take the
    next samples that fit (looking at most `window` samples ahead); the ones that did not fit come
    first in the next pack. The samples of a pack are a random draw, like a default (unsorted) batch."""
    rng = np.random.default_rng(seed)
    pending = list(rng.permutation(len(lengths)))
    packs = []
    for _ in range(n_packs):
        room, pack, skipped = seq_length, [], []
        while pending and len(pack) + len(skipped) < window and room > 0:
            i = int(pending.pop(0))
            if lengths[i] <= room:
                pack.append(i)
                room -= int(lengths[i])
            else:
                skipped.append(i)
        pending = skipped + pending
        packs.append(pack)
    return packs


def make_steps(
    cfg: ModelConfig, seq_length: int, n_steps: int, seed: int, batches: str = "stream"
) -> list[list[Sample]]:
    """The samples of n_steps steps (one pack of <= seq_length tokens each).

    batches="stream": online greedy packing of a shuffled stream (`stream_packs`): each step holds a
    random draw of samples, which is what transformers' Trainer batches by default.
    batches="packer": the data pipeline's offline packer (`data.packing.pack_lengths`,
    best-fit-decreasing in shuffled buffers): it groups samples of similar length, which also spares
    transformers most of its padding (like its group_by_length option)."""
    from internvl_mcore.data.packing import pack_lengths

    shapes = sample_shapes(2000, seed, cfg.num_image_token, seq_length)
    lengths = np.array([sum(t * cfg.num_image_token + 2 for t in im) + tx for im, tx in shapes])
    if batches == "stream":
        packs = stream_packs(lengths, seq_length, n_steps, seed)
    elif batches == "packer":
        packs = [list(p) for p in pack_lengths(lengths, seq_length, seed=seed)[:n_steps]]
    else:
        raise ValueError(f"--batches {batches!r}: choose stream or packer")
    return [[make_sample(cfg, *shapes[i], seed=seed * 100_003 + int(i)) for i in pack] for pack in packs]


def our_batch(samples: list[Sample], cfg: ModelConfig, seq_length: int):
    """One packed row, collated into a `Batch` as `training.data.ShardBatches` does."""
    from internvl_mcore.data.packing import cu_seqlens_from_lengths
    from internvl_mcore.data.sample import PackedSample
    from internvl_mcore.training.batch import Batch

    lengths = [len(s) for s in samples]
    pack = PackedSample(
        tokens=np.concatenate([s.tokens for s in samples]),
        loss_mask=np.concatenate([s.loss_mask for s in samples]),
        position_ids=np.concatenate([np.arange(n, dtype=np.float32) for n in lengths]),
        cu_seqlens=cu_seqlens_from_lengths(lengths),
        tiles=np.concatenate([s.tiles for s in samples]),
        num_tiles=np.asarray([t for s in samples for t in s.num_tiles], dtype=np.int32),
    )
    return Batch.from_packs([pack], seq_length, cfg.pad_token_id)


def hf_batch(samples: list[Sample], cfg: ModelConfig) -> dict:
    """The same samples as transformers trains on them: one per row, right-padded to the longest,
    attention mask, labels = ids on answer tokens else -100 (the model shifts them)."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s)
        ids[row, :n] = torch.from_numpy(s.tokens)
        mask[row, :n] = 1
        labels[row, :n] = torch.where(torch.from_numpy(s.loss_mask) > 0, torch.from_numpy(s.tokens), IGNORE_INDEX)
    tiles = np.concatenate([s.tiles for s in samples])
    # the same float32 normalization our model applies on its device; transformers wants None without images
    pixels = normalize_pixels(torch.from_numpy(tiles)) if len(tiles) else None
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


# ------------------------------------------------------------------------------------------------
# the two trainers
# ------------------------------------------------------------------------------------------------


def build_ours(model: str, seq_length: int, seed: int, lr: float, extra: list[str] = ()):
    """Our trainer exactly as `pretrain_internvl.py` builds it (1 process, TP1, fp32), with `extra`
    training flags (--ours-flags)."""
    from pretrain_internvl import parse_run_config
    from internvl_mcore.training.loop import setup

    run = parse_run_config(
        [
            "--model",
            model,
            "--mock-data",
            "--seq-length",
            str(seq_length),
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "1",
            "--train-iters",
            "1000",
            "--lr",
            str(lr),
            "--lr-decay-style",
            "constant",
            "--clip-grad",
            "1.0",
            "--seed",
            str(seed),
            *extra,
        ]
    )
    return setup(run)


def build_hf(cfg: ModelConfig, ours, lr: float):
    """transformers' InternVLForConditionalGeneration from the same config (offline), with our
    initial weights copied in through the converter's key map, and the AdamW transformers' Trainer
    uses by default (fused on torch >= 2.8)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from internvl_mcore.convert.distributed import gather_canonical_state
    from internvl_mcore.convert.hf import canonical_to_hf
    from internvl_mcore.convert.hf_config import hf_config_for
    from internvl_mcore.convert.keymaps import TRANSFORMERS_READ_ALIASES

    config = InternVLConfig.from_dict(hf_config_for(cfg, "transformers", torch.float32))
    config._attn_implementation = "sdpa"  # transformers' default for training
    model = InternVLForConditionalGeneration(config).to(torch.float32)
    state = gather_canonical_state(ours.model[0].module, cfg)
    # the converter writes save_pretrained's on-disk names; its read aliases map them to module names
    on_disk = {alias: module for module, alias in TRANSFORMERS_READ_ALIASES}
    hf_state = {}
    for name, t in canonical_to_hf(state, cfg, "transformers"):
        prefix = next((a for a in on_disk if name.startswith(a)), "")
        hf_state[on_disk.get(prefix, "") + name[len(prefix) :]] = t
    own = model.state_dict()
    missing = sorted(set(own) - set(hf_state) - ({"lm_head.weight"} if cfg.llm.tie_word_embeddings else set()))
    unexpected = sorted(set(hf_state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"weight copy to transformers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(hf_state, strict=not cfg.llm.tie_word_embeddings)
    model.train()
    fused = {"fused": True} if "fused" in torch.optim.AdamW.__init__.__code__.co_varnames else {}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **fused)
    return model, opt


def hf_step(model, opt, batch: dict) -> float:
    """forward, backward, clip to 1.0 (Trainer's default max_grad_norm), AdamW step."""
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock and process CPU seconds of one call (CPU time counts every thread)."""

    wall: float
    cpu: float


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every 2 ms on a thread while the block runs: with
    `returning_malloc`, the peak above the start is the step's working memory (activations,
    logits, gradients, optimizer temporaries)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def returning_malloc() -> None:
    """Make glibc's malloc serve blocks >= 64 KiB by mmap and return them on free (it otherwise
    raises that threshold as big blocks come and go and keeps freed memory in its heap), and trim
    the heap: resident memory then follows live memory. Only after the timed steps: fresh mmaps
    fault their pages in on every step, which costs time."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (a fixed value also stops its adjustment)
    gc.collect()
    libc.malloc_trim(0)


def peak_memory(fn, *args) -> float:
    """MiB of resident memory fn(*args) adds at its peak."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with PeakRSS() as mem:
        fn(*args)
    return mem.mib


def timed(fn, *args):
    """(fn(*args), Timing)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def gemm_peak(size: int, seconds: float) -> tuple[float, float]:
    """fp32 FLOP/s of a square matmul with all torch threads, as `metrics.measure_peak_flops`
    measures it (the training log's MFU denominator), per wall second and per CPU-second-per-thread.
    The second is what the cores deliver while this process runs, whoever else shares them."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm up
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        torch.matmul(a, b)
        n += 1
    flop = 2.0 * size**3 * n
    return flop / (time.perf_counter() - wall), flop / ((time.process_time() - cpu) / torch.get_num_threads())


def profile_ours(trainer, batch, top: int = 20) -> None:
    """One step of ours under torch.profiler: the optimizer's share, time by kind of op, the top ops
    by self CPU time with their input shapes."""
    from torch.profiler import ProfilerActivity, profile

    from internvl_mcore.training.loop import train_step

    opt_time = []
    step = trainer.optimizer.step

    def timed_step(*args, **kwargs):  # this trainer's optimizer only: its share of the step
        out, t = timed(lambda: step(*args, **kwargs))
        opt_time.append(t.wall)
        return out

    trainer.optimizer.step = timed_step
    trainer.batches = iter([batch])
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            _, t = timed(train_step, trainer)
    finally:
        trainer.optimizer.step = step
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"profiled step: {t.wall:.1f} s wall, of which optimizer.step (clip + AdamW + copies) {opt_time[0]:.1f} s")
    kinds = {
        "GEMM (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
        "attention (CPU flash kernel, fwd+bwd)": (
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        ),
        "patch-embedding conv": ("aten::mkldnn_convolution", "aten::convolution_backward"),
    }
    print(f"self CPU time by kind (total {total:.1f} s, all threads' work counted once):")
    rest = total
    for name, ops in kinds.items():
        k = sum(e.self_cpu_time_total for e in events if e.key in ops) / 1e6
        rest -= k
        print(f"  {name:40s} {k:7.2f} s  {100 * k / total:5.1f}%")
    print(f"  {'everything else (elementwise, copies, ...)':40s} {rest:7.2f} s  {100 * rest / total:5.1f}%")
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48, max_shapes_column_width=70
        )
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and pack: checks that everything runs (< 1 min)")
    p.add_argument("--model", default=None, help="preset (default: debug-m; --quick: debug)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per pack (default 4096; --quick 512)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per side (default 2; --quick 1)")
    p.add_argument(
        "--batches",
        choices=("stream", "packer"),
        default="stream",
        help="how a step's samples are drawn (see make_steps)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--peak-matrix", type=int, default=2048, help="side of the square fp32 matmul of the peak")
    p.add_argument("--profile", action="store_true", help="also profile one more step of ours (torch.profiler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ours-flags",
        default="",
        help="extra training flags for ours, after '=': --ours-flags='--torch-compile --cross-entropy-chunk-size 2048'",
    )
    args = p.parse_args(argv)
    model_name = args.model or ("debug" if args.quick else "debug-m")
    seq_length = args.seq_length or (512 if args.quick else 4096)
    reps = args.reps or (1 if args.quick else 2)
    peak_seconds = 0.3 if args.quick else 1.5
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    lr = 1e-5

    from internvl_mcore.plan.flops import train_step_flops
    from internvl_mcore.training.loop import train_step

    cfg = get_preset(model_name)
    t0 = time.perf_counter()
    steps = make_steps(cfg, seq_length, 1 + reps, args.seed, args.batches)
    ours_batches = [our_batch(s, cfg, seq_length) for s in steps]
    hf_batches = [hf_batch(s, cfg) for s in steps]
    t1 = time.perf_counter()
    trainer = build_ours(model_name, seq_length, args.seed, lr, args.ours_flags.split())
    t2 = time.perf_counter()
    hf, hf_opt = build_hf(cfg, trainer, lr)
    t3 = time.perf_counter()
    n_params = sum(p.numel() for p in trainer.model[0].module.parameters())
    print(
        f"model {model_name}: {n_params / 1e6:.1f}M parameters ({n_params * 4 / 2**20:.0f} MiB fp32), "
        f"{threads} torch threads, packs of {seq_length} tokens, {args.batches} batches; ours with "
        f"{args.ours_flags or 'default flags'}"
    )
    print(f"set-up: samples {t1 - t0:.1f} s, ours {t2 - t1:.1f} s, transformers {t3 - t2:.1f} s")
    real = [sum(len(x) for x in s) for s in steps]
    padded = [int(b["input_ids"].numel()) for b in hf_batches]
    for k in range(1, 1 + reps):
        print(
            f"step {k}: {len(steps[k])} samples, {sum(sum(x.num_tiles) for x in steps[k])} tiles, {real[k]} real "
            f"tokens (lengths {sorted(len(x) for x in steps[k])}); transformers computes {padded[k]}"
        )

    # warm-up (first-step costs: optimizer state allocation, kernel selection) on the same few
    # samples, from the same weights: the two losses must agree, or the comparison would compare
    # different work
    few = steps[0][:3]
    # padded to the timed packs' length: shape-specialized kernels (--torch-compile) compile here
    trainer.batches = iter([our_batch(few, cfg, seq_length)])
    warm, t_ours_warm = timed(train_step, trainer)
    hf_loss, t_hf_warm = timed(hf_step, hf, hf_opt, hf_batch(few, cfg))
    rel = abs(warm["loss"] - hf_loss) / abs(hf_loss)
    print(
        f"warm-up on the same {len(few)} samples from the same weights: loss ours {warm['loss']:.6f}, "
        f"transformers {hf_loss:.6f} (rel. diff {rel:.1e}); {t_ours_warm.wall:.1f} s vs {t_hf_warm.wall:.1f} s"
    )
    if rel > 1e-4:
        raise SystemExit("the two models disagree on the same samples: the comparison would be meaningless")
    trainer.batches = iter(ours_batches[1:])  # rep k trains both on step k

    peaks, t_ours, t_hf, flops = [], [], [], []
    for k in range(1, 1 + reps):
        peaks.append(gemm_peak(args.peak_matrix, peak_seconds))
        for side in ("ours", "hf") if k % 2 else ("hf", "ours"):  # alternate who goes first
            if side == "ours":
                stats, t = timed(train_step, trainer)
                t_ours.append(t)
                flops.append(
                    train_step_flops(
                        cfg,
                        tokens_per_step=seq_length,
                        tiles_per_step=stats["tiles"],
                        attention_lengths=stats["attention_lengths"],
                        seq_length=seq_length,
                        trainable=stats["trainable"],
                        lm_head_tokens=stats["logit_tokens"],
                    )
                )
            else:
                _, t = timed(hf_step, hf, hf_opt, hf_batches[k])
                t_hf.append(t)
        print(
            f"rep {k}: GEMM peak {peaks[-1][0] / 1e9:.1f} GFLOP/s | ours {t_ours[-1].wall:.1f} s "
            f"(CPU {t_ours[-1].cpu:.1f} s) | transformers {t_hf[-1].wall:.1f} s (CPU {t_hf[-1].cpu:.1f} s)"
        )
    peaks.append(gemm_peak(args.peak_matrix, peak_seconds))

    med = statistics.median
    peak_wall, peak_cpu = med(p[0] for p in peaks), med(p[1] for p in peaks)
    # MFU per rep against the mean of the peaks measured just before and after that step
    mfu = [f / (t.wall * (peaks[i][0] + peaks[i + 1][0]) / 2) for i, (f, t) in enumerate(zip(flops, t_ours))]
    mfu_cpu = [f / (t.cpu / threads * peak_cpu) for f, t in zip(flops, t_ours)]
    eff_ours = [n / t.wall for n, t in zip(real[1:], t_ours)]
    eff_hf = [n / t.wall for n, t in zip(real[1:], t_hf)]
    ratio = [h.wall / o.wall for h, o in zip(t_hf, t_ours)]  # same samples within a rep
    ratio_cpu = [h.cpu / o.cpu for h, o in zip(t_hf, t_ours)]
    print()
    print(
        f"fp32 GEMM peak ({args.peak_matrix}^2 matmul, {threads} threads): {peak_wall / 1e9:.1f} GFLOP/s "
        f"(median of {len(peaks)} between the steps: {', '.join(f'{p[0] / 1e9:.1f}' for p in peaks)}); "
        f"per CPU-second per thread {peak_cpu / 1e9:.1f}"
    )
    print(
        f"model FLOPs per train step: {med(flops) / 1e12:.3f} TFLOP (plan.flops.train_step_flops; the output "
        f"layer over the {'loss-bearing' if stats['logit_tokens'] is not None else 'all'} tokens it computes logits for)"
    )
    print(
        f"ours: step {med(t.wall for t in t_ours):.1f} s -> CPU-MFU {med(mfu):.1%} "
        f"(per rep: {', '.join(f'{m:.1%}' for m in mfu)}); by CPU time {med(mfu_cpu):.1%}"
    )
    # transformers' work as it computes it: every padded row a full causal sequence (model FLOPs
    # count; its masked kernels may even do more)
    hf_flops = [
        train_step_flops(
            cfg,
            tokens_per_step=padded[k],
            tiles_per_step=sum(sum(x.num_tiles) for x in steps[k]),
            attention_lengths=[padded[k] // len(steps[k])] * len(steps[k]),
        )
        for k in range(1, 1 + reps)
    ]
    print(
        f"transformers: {med(f / t.wall for f, t in zip(hf_flops, t_hf)) / 1e9:.1f} GFLOP/s on its padded work "
        f"({med(hf_flops) / 1e12:.3f} TFLOP per step)"
    )
    print(
        f"effective tokens/s: ours {med(eff_ours):.1f}, transformers {med(eff_hf):.1f} "
        f"(transformers computes {sum(padded[1:]) / sum(real[1:]):.2f}x the real tokens)"
    )
    print(
        f"ratio ours / transformers: {med(ratio):.2f}x (per rep: {', '.join(f'{r:.2f}' for r in ratio)}); "
        f"by CPU time {med(ratio_cpu):.2f}x"
    )
    # one more step each on step 1's samples, untimed, with malloc returning freed blocks
    returning_malloc()
    trainer.batches = iter([ours_batches[1]])
    mem_ours = peak_memory(train_step, trainer)
    mem_hf = peak_memory(hf_step, hf, hf_opt, hf_batches[1])
    print(
        f"peak memory per step above the resident model and optimizer state: ours {mem_ours:.0f} MiB, "
        f"transformers {mem_hf:.0f} MiB (one more step each on step 1's samples, untimed)"
    )
    print(f"total time {time.perf_counter() - t0:.0f} s")

    if args.profile:
        print()
        profile_ours(trainer, ours_batches[1])


if __name__ == "__main__":
    main()
