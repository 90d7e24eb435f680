"""data/resample.py: Pillow's bicubic RGB resize in torch, compared with Pillow itself byte for byte."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_mcore.data import resample
from internvl_mcore.data.image import candidate_grids
from internvl_mcore.data.resample import PASS_ORDERS, PillowMismatch, coefficients, pass_order, resize_rgb


def pillow(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels, "RGB").resize(size))


def ours(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return resize_rgb(torch.from_numpy(pixels), *size).numpy()


def noise(w: int, h: int, seed: int) -> np.ndarray:
    """Random pixels: every tap weight and every clip (0 and 255 overshoot) shows up."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


CASES = [  # (in w, in h) -> (out w, out h)
    ((100, 80), (448, 448)),
    ((30, 20), (1344, 448)),  # upscales
    ((4000, 120), (448, 448)),
    ((120, 4000), (448, 448)),
    ((4000, 160), (448, 96)),  # 4000 -> 448: ksize 37
    ((1, 50), (448, 448)),
    ((50, 1), (448, 448)),
    ((1, 1), (448, 448)),
    ((1, 1), (5, 9)),
    ((7, 3), (1, 1)),
    ((20000, 20), (448, 448)),
    ((20, 20000), (448, 448)),
    ((448, 448), (448, 448)),
    ((448, 333), (448, 448)),
    ((333, 448), (448, 448)),
    ((1200, 800), (896, 448)),
    ((999, 17), (13, 5)),
    ((5, 999), (17, 13)),
]


@pytest.mark.parametrize("src,dst", CASES)
def test_equals_pillow_byte_for_byte(src, dst):
    pixels = noise(*src, seed=sum(src) + sum(dst))
    assert np.array_equal(ours(pixels, dst), pillow(pixels, dst)), (src, dst)


@pytest.mark.parametrize("size", [448, 224])
def test_every_grid_of_max_dynamic_patch_12(size):
    """The grid resize and the thumbnail of an image of each aspect ratio InternVL can pick: upscaled
    from a small image, and (at 224, cheaper) downscaled from one 1.1-1.5x the grid."""
    for k, (cols, rows) in enumerate(candidate_grids(1, 12)):
        sources = [(cols * 37 + k, rows * 29 + 2 * k)]
        if size == 224:
            sources.append((cols * size * (11 + k % 5) // 10, rows * size * (11 + k % 3) // 10))
        for w, h in sources:
            pixels = noise(w, h, k)
            for dst in ((cols * size, rows * size), (size, size)):
                assert np.array_equal(ours(pixels, dst), pillow(pixels, dst)), ((w, h), dst)


def test_photos():
    """scikit-learn's sample photos (smooth regions, edges) at InternVL's usual sizes."""
    datasets = pytest.importorskip("sklearn.datasets")
    for k, photo in enumerate(datasets.load_sample_images().images):  # (427, 640, 3) uint8
        photo = np.ascontiguousarray(photo)
        small = photo[::3, ::2][: 97 + k, :]
        for pixels, sizes in ((photo, ((448, 448), (896, 448), (427, 640))), (small, ((1344, 896), (224, 224)))):
            for dst in sizes:
                assert np.array_equal(ours(pixels, dst), pillow(pixels, dst)), (pixels.shape, dst)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 48), st.integers(1, 48), st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**32 - 1))
def test_property_any_sizes(w, h, out_w, out_h, seed):
    pixels = noise(w, h, seed)
    assert np.array_equal(ours(pixels, (out_w, out_h)), pillow(pixels, (out_w, out_h)))


def test_pass_order_boundary():
    """Which pass runs first changes the bytes; on either side of the boundary the installed Pillow's order."""
    for w, h in ((100, 100), (50, 200), (200, 50)):
        for out_h in (1, h // 3, h - 1):
            for delta in (-1, 0, 1):  # 2 * (out_w - w) against out_h - h, at and next to equality
                twice = out_h - h + delta
                if twice % 2 or w + twice // 2 < 1:
                    continue
                dst = (w + twice // 2, out_h)
                pixels = noise(w, h, out_h + delta)
                assert np.array_equal(ours(pixels, dst), pillow(pixels, dst)), ((w, h), dst)


def test_coefficients_follow_resample_c():
    """Integer weights of a pixel sum to 2^22 up to the rounding of each; the windows as the C computes."""
    first, length, fixed = coefficients(4000, 448)
    assert fixed.shape == (448, 37) and fixed.dtype == np.int32
    assert np.all(np.abs(fixed.sum(1) - (1 << 22)) <= fixed.shape[1])
    assert first[0] == 0 and first[-1] + length[-1] == 4000
    assert np.all(fixed[np.arange(fixed.shape[1])[None, :] >= length[:, None]] == 0)
    first, length, fixed = coefficients(100, 448)  # upscale: 5 taps, support 2
    assert fixed.shape == (448, 5) and length.max() == 4


def test_unknown_pillow_arithmetic_is_refused(monkeypatch):
    """A Pillow that resizes differently from every known pass order: PillowMismatch (the training
    falls back to tiling in the loader, see tests/data/test_device_tiling.py)."""
    monkeypatch.setattr(resample, "PASS_ORDERS", tuple(o for o in PASS_ORDERS if o != pass_order()))
    pass_order.cache_clear()
    try:
        with pytest.raises(PillowMismatch):
            pass_order()
    finally:
        pass_order.cache_clear()  # the next caller probes again, with the real PASS_ORDERS
