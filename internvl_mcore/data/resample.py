"""Pillow's `Image.resize(size)` of an RGB image (default BICUBIC filter) in torch, exact to the bit.

Pillow resamples 8-bit images in fixed point (src/libImaging/Resample.c), so its result is a pure
function of integer arithmetic once the coefficients are known; reproducing the coefficients in
float64 with the same operations, in the same order, gives the same bytes on any torch device:

- coefficients (`precompute_coeffs`): scale = in/out, filterscale = max(scale, 1), support = 2 *
  filterscale, ksize = ceil(support) * 2 + 1 taps; output pixel xx is centred at (xx + 0.5) * scale
  and reads input pixels [xmin, xmax) with xmin = (int)(center - support + 0.5) clamped to >= 0 and
  xmax = (int)(center + support + 0.5) clamped to <= in (C casts truncate toward zero); tap x weighs
  bicubic((x + xmin - center + 0.5) / filterscale) (a = -0.5), divided by the SEQUENTIAL sum of the
  weights of that pixel (when it is not 0);
- `normalize_coeffs_8bpc`: each weight becomes the int32 (int)(k * 2^22 +- 0.5) (half away from zero);
- a pass accumulates 2^21 + sum(pixel * weight) in int32 and keeps clip8(acc) = clamp(acc >> 22, 0, 255)
  (Pillow's lookup table over acc >> 22 is exactly that clamp) into an 8-bit image; the horizontal pass
  runs only if the width changes, the vertical pass only if the height changes, horizontal first (on the
  rows the vertical pass reads) except where Pillow 13 runs the vertical pass first (`PASS_ORDERS`);
- `Image.resize` itself returns a copy when the size does not change (also what the C does then).

Integer sums do not depend on their order and Pillow's accumulator is int32 too (its 2 spare bits keep
the true sum in range), so gathering the taps on a GPU and adding them in any order is exact. The
coefficients are computed once per (in size, out size) on the CPU in numpy and cached; the passes run on
the image's device. `tests/data/test_resample.py` compares with Pillow byte for byte.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import PIL
import torch
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits of result, 2 for the filter's overshoot
BICUBIC_SUPPORT = 2.0
BICUBIC_A = -0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Resample.c's bicubic_filter, element-wise, with the C's operations in the C's order."""
    x = np.abs(x)
    a = BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=512)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis's taps: (first input index (out,), window length (out,), int32 weights (out, ksize)).

    Pillow's precompute_coeffs + normalize_coeffs_8bpc for the box (0, in_size). Tap x of output pixel
    xx reads input pixel first[xx] + x; taps past the window (x >= length[xx]) weigh 0."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resample sizes must be >= 1, got {in_size} -> {out_size}")
    scale = float(np.float32(in_size) - np.float32(0.0)) / out_size  # (double)(in1 - in0) / outSize; box is float
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    length = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    inside = taps[None, :] < length[:, None]  # (out, ksize)
    w = np.where(inside, _bicubic(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    ww = np.cumsum(w, axis=1)[:, -1:]  # the C's running sum: cumsum adds strictly left to right
    w = np.where(ww != 0.0, w / np.where(ww != 0.0, ww, 1.0), w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, -0.5 + scaled, 0.5 + scaled)).astype(np.int32)
    return xmin, length, fixed


def tap_indices(in_size: int, out_size: int) -> np.ndarray:
    """(out, ksize) int64 input index of every tap; taps past a window repeat its last pixel (weight 0),
    so every index stays inside [first[0], first[-1] + length[-1]), the rows a vertical pass reads."""
    xmin, length, fixed = coefficients(in_size, out_size)
    return xmin[:, None] + np.minimum(np.arange(fixed.shape[1])[None, :], np.maximum(length, 1)[:, None] - 1)


def read_span(in_size: int, out_size: int) -> tuple[int, int]:
    """[first, last) input pixels a pass reads (Resample.c's ybox_first / ybox_last)."""
    xmin, length, _ = coefficients(in_size, out_size)
    return int(xmin[0]), int(xmin[-1] + length[-1])


class _DeviceCoefficients:
    """Tap indices and weights of (in, out) as tensors on one device, kept for the next image
    (least recently used out first)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (out, ksize) int64, weights (out, ksize) int32) on `device`."""
        key = (in_size, out_size, str(device))
        hit = self._cache.pop(key, None)
        if hit is None:
            first, _ = read_span(in_size, out_size)
            hit = (
                torch.as_tensor(tap_indices(in_size, out_size) - first, device=device),
                torch.as_tensor(coefficients(in_size, out_size)[2], device=device),
            )
        self._cache[key] = hit
        while len(self._cache) > self.capacity:
            self._cache.pop(next(iter(self._cache)))
        return hit

    def clear(self) -> None:
        self._cache.clear()


DEVICE_COEFFICIENTS = _DeviceCoefficients()


def _clip8(acc: torch.Tensor) -> torch.Tensor:
    """Resample.c's clip8: its lookup table over acc >> PRECISION_BITS (an arithmetic shift) is a clamp."""
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _pass(image: torch.Tensor, dim: int, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One resampling pass of an (H, W, 3) uint8 image along `dim` (0: vertical, 1: horizontal);
    `index` is relative to the image's first pixel along `dim`."""
    out_len = index.shape[0]
    shape = [1, 1, 1]
    shape[dim] = out_len
    out_shape = list(image.shape)
    out_shape[dim] = out_len
    acc = torch.full(out_shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    for t in range(index.shape[1]):  # the taps; integer sums are exact in any order
        acc.addcmul_(image.index_select(dim, index[:, t]), weights[:, t].reshape(shape))  # uint8 * int32 -> int32
    return _clip8(acc)


class PillowMismatch(RuntimeError):
    """The installed Pillow resizes differently from every pass order this module knows."""


# Which pass Pillow runs first when both run. "horizontal": always (Pillow <= 12, Resample.c's
# ImagingResampleInner). "pillow13": Pillow 13.0 runs the vertical pass first when the height shrinks
# and 2 * (width - in_w) > height - in_h (strictly); found by comparing both orders with its output
# over thousands of size pairs, boundary included (its source was not at hand). `pass_order()` tells
# which one the installed Pillow follows by resizing a few small images both ways.
PASS_ORDERS = ("horizontal", "pillow13")
# (in w, in h) -> (out w, out h) where the two orders give different bytes (or, at the boundary, the same order)
PROBES = (((16, 16), (14, 8)), ((9, 40), (3, 20)), ((10, 30), (25, 12)), ((30, 30), (20, 10)), ((20, 10), (8, 15)))


def _horizontal_first(in_w: int, in_h: int, width: int, height: int, order: str | None = None) -> bool:
    order = order or pass_order()
    return order == "horizontal" or not (height < in_h and 2 * (width - in_w) > height - in_h)


@lru_cache(maxsize=1)
def pass_order() -> str:
    """The pass order of the installed Pillow (one of PASS_ORDERS); PillowMismatch if none matches."""
    rng = np.random.default_rng(0)
    for order in PASS_ORDERS:
        ok = True
        for (w, h), (width, height) in PROBES:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            want = np.asarray(Image.fromarray(pixels).resize((width, height)))
            got = _resize(torch.from_numpy(pixels), width, height, order).numpy()
            ok = ok and np.array_equal(want, got)
        if ok:
            return order
    raise PillowMismatch(
        f"Pillow {PIL.__version__} resizes differently from this module's exact re-implementation "
        f"(pass orders {PASS_ORDERS}); tile images in the loader (--image-tiling loader)"
    )


def resize_rgb(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's `Image.fromarray(image).resize((width, height))` of an (H, W, 3) uint8 tensor, on its device."""
    return _resize(image, width, height, pass_order())


def _resize(image: torch.Tensor, width: int, height: int, order: str) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"resize_rgb expects an (H, W, 3) uint8 image, got {tuple(image.shape)} {image.dtype}")
    in_h, in_w = int(image.shape[0]), int(image.shape[1])
    if (in_w, in_h) == (width, height):
        return image.clone()  # Image.resize: the same size is a copy
    horizontal = (
        (lambda im: _pass(im, 1, *DEVICE_COEFFICIENTS.get(in_w, width, image.device))) if width != in_w else None
    )
    vertical = (
        (lambda im: _pass(im, 0, *DEVICE_COEFFICIENTS.get(in_h, height, image.device))) if height != in_h else None
    )
    out = image
    if height != in_h:  # the rows the vertical pass reads (index tensors are relative to the first)
        first, last = read_span(in_h, height)
        out = out[first:last]
    if horizontal is not None and vertical is not None and not _horizontal_first(in_w, in_h, width, height, order):
        return horizontal(vertical(out))
    for step in (horizontal, vertical):
        out = out if step is None else step(out)
    return out
