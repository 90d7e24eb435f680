"""Tiling, normalization, JPEG augmentation and frame sampling against InternVL's rules."""

import itertools
import os

import numpy as np
import pytest
from PIL import Image

from tests import fixtures
from internvl_mcore.data.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JPEG_QUALITIES,
    VideoDecoderMissing,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    frame_to_tile,
    get_frame_indices,
    jpeg_recompress,
    list_frame_files,
    load_frames_gif,
    load_video_frames,
    normalize_tiles,
    random_jpeg_recompress,
    sample_frame_indices,
    tiles_to_array,
)


def rule_grid(w, h, min_num, max_num, size):
    """InternVL's choice, restated: the grid with the smallest |w/h - cols/rows|; among exact ties (visited
    by increasing tile count), a later one replaces the current choice only when the image has more than
    half the pixels of that grid. Returns (grid, set of grids InternVL could pick if two tied grids have
    the same tile count and their mutual order decides)."""
    ar = w / h
    grids = sorted(
        {(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if min_num <= c * r <= max_num},
        key=lambda g: g[0] * g[1],
    )
    if not grids:
        return (1, 1), {(1, 1)}
    best = min(abs(ar - c / r) for c, r in grids)
    ties = [g for g in grids if abs(ar - g[0] / g[1]) == best]
    later = [g for g in ties[1:] if w * h > 0.5 * size * size * g[0] * g[1]]
    choice = later[-1] if later else ties[0]
    same_count = {g for g in ties if g[0] * g[1] == choice[0] * choice[1]}
    return choice, same_count


def test_grid_choice_against_rule():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 3000, size=(400, 2))]
    sizes += [(w, h) for w in (1, 10, 100, 447, 448, 449, 896, 1344) for h in (1, 10, 100, 448, 672, 2000)]
    sizes += [(3 * k, 2 * k) for k in (10, 100, 300, 1000)]  # aspect 1.5: ties between 1:1 and 2:1 for max 2
    ties_seen = 0
    for (w, h), (lo, hi), size in itertools.product(
        sizes, [(1, 12), (1, 6), (1, 2), (2, 6), (6, 6), (1, 1)], (448, 56)
    ):
        want, options = rule_grid(w, h, lo, hi, size)
        ar = w / h
        grids = sorted(
            {(c, r) for n in range(lo, hi + 1) for c in range(1, n + 1) for r in range(1, n + 1) if lo <= c * r <= hi},
            key=lambda g: g[0] * g[1],
        )
        got = find_closest_aspect_ratio(ar, grids, w, h, size)
        assert got == want or got in options, (w, h, lo, hi, size, got, want)
        best = min(abs(ar - c / r) for c, r in grids)
        ties_seen += sum(abs(ar - c / r) == best for c, r in grids) > 1
    assert ties_seen > 50  # the tie rule was exercised


def test_tile_count_follows_grid():
    rng = np.random.default_rng(1)
    for w, h in rng.integers(1, 400, size=(60, 2)):
        for lo, hi in [(1, 12), (1, 3), (2, 6)]:
            want, options = rule_grid(int(w), int(h), lo, hi, 28)
            tiles = dynamic_preprocess(Image.new("RGB", (int(w), int(h))), lo, hi, 28, use_thumbnail=True)
            counts = {c * r + (1 if c * r > 1 else 0) for c, r in options | {want}}
            assert len(tiles) in counts and all(t.size == (28, 28) for t in tiles)


def test_tie_rule_depends_on_area():
    # aspect 1.5 with grids {1x1, 1x2, 2x1}: 1x1 and 2x1 tie; 2x1 only for images > half of 2 tiles.
    grids = [(1, 1), (1, 2), (2, 1)]
    assert find_closest_aspect_ratio(1.5, grids, 30, 20, 448) == (1, 1)
    assert find_closest_aspect_ratio(1.5, grids, 600, 400, 448) == (2, 1)


@pytest.mark.parametrize("w,h,max_num", [(300, 60, 12), (64, 48, 12), (90, 30, 6), (50, 50, 12), (57, 200, 4)])
def test_tile_pixels_equal_direct_resize_and_crop(w, h, max_num):
    size = 56
    image = fixtures.digit_image(3, (w, h), seed=5)
    tiles = dynamic_preprocess(image, 1, max_num, size, use_thumbnail=True)
    cols, rows = find_closest_aspect_ratio(
        w / h,
        sorted(
            {(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if c * r <= max_num},
            key=lambda g: g[0] * g[1],
        ),
        w,
        h,
        size,
    )
    big = np.asarray(image.resize((cols * size, rows * size), Image.Resampling.BICUBIC))  # (rows*S, cols*S, 3)
    arr = tiles_to_array(tiles)
    assert arr.dtype == np.uint8 and arr.shape[1:] == (size, size, 3)
    for k in range(cols * rows):
        r, c = divmod(k, cols)  # row-major
        np.testing.assert_array_equal(arr[k], big[r * size : (r + 1) * size, c * size : (c + 1) * size])
    if cols * rows > 1:
        assert len(arr) == cols * rows + 1
        np.testing.assert_array_equal(arr[-1], np.asarray(image.resize((size, size), Image.Resampling.BICUBIC)))
    else:
        assert len(arr) == 1


def test_no_thumbnail_and_min_num():
    image = fixtures.digit_image(1, (300, 60))
    assert len(dynamic_preprocess(image, 1, 12, 56, use_thumbnail=False)) == 5  # 5x1, no thumbnail
    # min_num forces at least 4 tiles even for a square image: 2x2 is the closest grid with >= 4
    assert len(dynamic_preprocess(fixtures.digit_image(1, (50, 50)), 4, 12, 56, use_thumbnail=False)) == 4


def test_normalize_tiles():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    out = normalize_tiles(arr)
    assert out.shape == (3, 3, 5, 7) and out.dtype == np.float32
    for ch in range(3):
        expect = (arr[..., ch].astype(np.float64) / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
        np.testing.assert_allclose(out[:, ch], expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        normalize_tiles(arr.astype(np.float32))


def test_jpeg_recompress():
    tile = tiles_to_array([fixtures.digit_image(2, (64, 64))])[0]
    q100, q75 = jpeg_recompress(tile, 100), jpeg_recompress(tile, 75)
    assert q100.shape == tile.shape and q100.dtype == np.uint8
    err100 = np.abs(q100.astype(int) - tile).mean()
    err75 = np.abs(q75.astype(int) - tile).mean()
    assert err100 < err75 and err75 > 0
    np.testing.assert_array_equal(jpeg_recompress(tile, 80), jpeg_recompress(tile, 80))  # pure
    batch = np.stack([tile, tile[::-1]])
    np.testing.assert_array_equal(jpeg_recompress(batch, 90)[1], jpeg_recompress(tile[::-1], 90))


def test_random_jpeg_recompress_is_seeded():
    tiles = tiles_to_array([fixtures.digit_image(k, (32, 32), seed=k) for k in range(6)])
    a, qa = random_jpeg_recompress(tiles, np.random.default_rng(7))
    b, qb = random_jpeg_recompress(tiles, np.random.default_rng(7))
    assert qa == qb and np.array_equal(a, b)
    for k, q in enumerate(qa):
        np.testing.assert_array_equal(a[k], jpeg_recompress(tiles[k], q))
    qs = random_jpeg_recompress(tiles[:1].repeat(400, 0)[:, :8, :8], np.random.default_rng(3))[1]
    assert set(qs) == set(JPEG_QUALITIES) == set(range(75, 101))  # InternVL's quality range, uniformly


def test_frame_indices_rand_rule():
    rng = np.random.default_rng(0)
    for vlen, n in [(100, 8), (33, 32), (64, 16), (9, 8), (1000, 32), (20, 3)]:
        for _ in range(20):
            idx = get_frame_indices(n, vlen, rng, "rand")
            edges = np.linspace(0, vlen, n + 1).astype(int)
            assert len(idx) == n
            if all(edges[k + 1] - 1 > edges[k] for k in range(n)):
                # one frame per interval [a, b - 1) as InternVL's random.choice(range(a, b - 1))
                assert all(edges[k] <= i < edges[k + 1] - 1 for k, i in enumerate(idx))
            else:  # too-short intervals: InternVL's fallback, a sorted random subset
                assert idx == sorted(idx) and len(set(idx)) == n and max(idx) < vlen


def test_frame_indices_middle_and_padding():
    rng = np.random.default_rng(0)
    assert get_frame_indices(4, 20, rng, "middle") == [2, 7, 12, 17]  # (a + b - 1) // 2 of [0,5),[5,10)...
    assert get_frame_indices(5, 3, rng, "middle") == [0, 1, 2, 2, 2]  # padded with the last frame
    with pytest.raises(ValueError):
        get_frame_indices(4, 20, rng, "fps1")


def test_sample_frame_indices_count_and_determinism():
    counts = set()
    for seed in range(200):
        idx = sample_frame_indices(100, 8, 32, np.random.default_rng(seed))
        assert 8 <= len(idx) <= 32 and idx == sorted(idx) and len(set(idx)) == len(idx)
        counts.add(len(idx))
        assert idx == sample_frame_indices(100, 8, 32, np.random.default_rng(seed))
    assert min(counts) == 8 and max(counts) == 32  # uniform over [min, max], both ends reachable
    # a video with no more frames than drawn keeps all of them
    assert sample_frame_indices(5, 8, 32, np.random.default_rng(0)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 1, 2, np.random.default_rng(0))


def _mean_colors(frames):
    return [tuple(np.asarray(f, dtype=np.float64).mean(axis=(0, 1)).round(1)) for f in frames]


def test_frame_folder_order_and_loading(tmp_path):
    folder = fixtures.write_frame_folder(str(tmp_path / "frames"), n_frames=12)
    (tmp_path / "frames" / "notes.txt").write_text("not a frame")
    files = list_frame_files(folder)
    assert [os.path.basename(f) for f in files] == [f"frame_{k}.jpg" for k in range(1, 13)]
    frames = load_video_frames(folder + "/", 12, 12, np.random.default_rng(0))
    expected = [Image.open(f).convert("RGB") for f in files]
    assert _mean_colors(frames) == _mean_colors(expected)
    few = load_video_frames(folder + "/", 3, 3, np.random.default_rng(0))
    assert len(few) == 3


def test_gif_frames(tmp_path):
    path = fixtures.write_gif(str(tmp_path / "a.gif"), n_frames=6, size=(40, 30))
    frames = load_frames_gif(path, 6, 6, np.random.default_rng(0))
    assert len(frames) == 6 and all(f.mode == "RGB" and f.size == (40, 30) for f in frames)
    with Image.open(path) as gif:
        ref = []
        for k in range(6):
            gif.seek(k)
            ref.append(gif.convert("RGB"))
    assert _mean_colors(frames) == _mean_colors(ref)
    sub = load_video_frames(path, 2, 3, np.random.default_rng(4))
    assert 2 <= len(sub) <= 3


def test_video_file_decoding_or_missing_decoder(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")
    if not fixtures._video_decoder_available():
        with pytest.raises(VideoDecoderMissing, match="av"):
            load_video_frames(str(fake), 2, 4, np.random.default_rng(0))
        return
    # A decoder is installed: a fake file is a decode error, a real file decodes in frame order.
    with pytest.raises(Exception) as e:
        load_video_frames(str(fake), 2, 4, np.random.default_rng(0))
    assert not isinstance(e.value, VideoDecoderMissing)
    path = fixtures.write_video(str(tmp_path / "clip.mp4"), n_frames=12, size=(48, 32))
    frames = load_video_frames(path, 12, 12, np.random.default_rng(0))
    assert len(frames) == 12 and all(f.size == (48, 32) and f.mode == "RGB" for f in frames)
    ref = [np.asarray(fixtures.digit_image(k, (48, 32), seed=300 + k), dtype=np.float64) for k in range(12)]
    for k, f in enumerate(frames):  # lossy codec: each frame is closest to its own source image
        errs = [np.abs(np.asarray(f, dtype=np.float64) - r).mean() for r in ref]
        assert int(np.argmin(errs)) == k
    sub = load_video_frames(path, 3, 5, np.random.default_rng(1))
    assert 3 <= len(sub) <= 5


def test_frame_to_tile():
    frame = fixtures.digit_image(4, (40, 30))
    tile = frame_to_tile(frame, 28)
    assert tile.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(tile), np.asarray(frame.resize((28, 28), Image.Resampling.BICUBIC)))
