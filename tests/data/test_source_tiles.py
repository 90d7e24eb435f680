"""The "source" tile format: each image stored once, tiles cut at load time pixel-exact to today's tiles."""

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from internvl_mcore.data.image import (
    ImageTiling,
    candidate_grids,
    cut_tiles,
    dynamic_preprocess,
    plan_tiling,
    stored_image_bytes,
    tiles_to_array,
)
from internvl_mcore.data.loader import PackedDataLoader
from internvl_mcore.data.sample import StoredImage
from internvl_mcore.data.shards import ShardReader, decode_source_images, encode_source_images, source_tiling
from tests.fixtures import make_dataset_fixture, make_tokenizer_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_mm_data  # noqa: E402

SIZE = 28  # tile side: small, the tiling arithmetic is the same as at 448


def photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: resampling mixes neighbours, so a wrong filter or box shows up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y) * 127 // max(w + h, 1)], -1)
    noisy = base + rng.integers(-40, 40, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str) -> bytes:
    """`image` saved as `fmt` in a mode that format keeps (palette GIF, RGBA PNG, grey JPEG, ...)."""
    buf = io.BytesIO()
    if fmt == "GIF":
        image.convert("P").save(buf, "GIF")
    elif fmt == "PNG":
        image.convert("RGBA").save(buf, "PNG")
    elif fmt == "JPEG-L":
        image.convert("L").save(buf, "JPEG", quality=90)
    elif fmt == "JPEG-CMYK":
        image.convert("CMYK").save(buf, "JPEG", quality=90)
    elif fmt == "JPEG":
        image.save(buf, "JPEG", quality=85)
    else:
        image.save(buf, fmt)
    return buf.getvalue()


def internvl_tiles(image: Image.Image, min_num: int, max_num: int, size: int, thumbnail: bool) -> np.ndarray:
    """InternVL's own code path, restated: dynamic_preprocess's row-major crop boxes of the resized image
    (box i = (i % cols * size, i // cols * size, ...)), the thumbnail, then build_transform's RGB conversion
    and bicubic resize to size x size of every tile (torchvision hands PIL images to Pillow's resize)."""
    w, h = image.size
    grid = plan_tiling(w, h, min_num, max_num, size, False)
    cols, rows = grid.cols, grid.rows
    resized = image.resize((cols * size, rows * size))
    tiles = [
        resized.crop(((i % cols) * size, (i // cols) * size, (i % cols + 1) * size, (i // cols + 1) * size))
        for i in range(cols * rows)
    ]
    if thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    tiles = [t.convert("RGB").resize((size, size), Image.Resampling.BICUBIC) for t in tiles]
    return np.stack([np.asarray(t) for t in tiles])


FORMATS = ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG-L", "JPEG-CMYK", "PPM", "TGA"]


def test_every_grid_and_format_cut_at_load_time_equals_todays_tiles():
    """One image per candidate grid of max_num 12 (every aspect ratio InternVL can pick), each in another
    file format, with and without thumbnail, plus tie and tiny images: the stored bytes, decoded and cut
    at load time, give exactly today's tiles (dynamic_preprocess) and InternVL's own path."""
    # exact ratios at 1.25x the grid (so the resize is a real one); then off-ratio, tie and tiny images
    sizes = [(cols * 35, rows * 35) for cols, rows in candidate_grids(1, 12)]
    sizes += [(cols * SIZE + 5 * k, rows * SIZE + 3 * k) for k, (cols, rows) in enumerate(candidate_grids(1, 12))]
    sizes += [(30, 20), (600, 400), (7, 300), (300, 7), (1, 1), (SIZE, SIZE), (2 * SIZE, SIZE), (50, 50)]
    grids = set()
    for k, (w, h) in enumerate(sizes):
        fmt = FORMATS[k % len(FORMATS)]
        data = encoded(photo(w, h, k), fmt)
        with Image.open(io.BytesIO(data)) as im:
            source_format, rgb = im.format, im.convert("RGB")
        stored = stored_image_bytes(data, rgb, source_format)
        # formats Pillow decodes identically are kept as given; others become lossless WebP
        assert (stored is data) == (fmt not in ("PPM", "TGA")), fmt
        for thumbnail in (True, False):
            tiling = plan_tiling(w, h, 1, 12, SIZE, thumbnail)
            grids.add((tiling.cols, tiling.rows))
            payloads = encode_source_images([StoredImage(stored, tiling)])
            assert source_tiling(payloads[0]) == tiling
            got = decode_source_images(payloads, SIZE)
            today = tiles_to_array(dynamic_preprocess(rgb, 1, 12, SIZE, thumbnail))
            assert got.dtype == np.uint8 and got.shape == today.shape == (tiling.num_tiles, SIZE, SIZE, 3)
            assert np.array_equal(got, today), (w, h, fmt, thumbnail)
            assert np.array_equal(got, internvl_tiles(rgb, 1, 12, SIZE, thumbnail)), (w, h, fmt, thumbnail)
    assert grids >= set(candidate_grids(1, 12))  # every aspect ratio was exercised


def test_per_image_cap_and_frame_tiling():
    """A list of 3 images under max_dynamic_patch 12 gets a cap of 4 tiles each; a frame is one tile."""
    image = photo(500, 90, 1)  # wide: uncapped it would take 5x1 + thumbnail
    capped = plan_tiling(*image.size, 1, 12 // 3, SIZE, True)
    assert capped.cols * capped.rows <= 4 and capped.thumbnail
    assert np.array_equal(cut_tiles(image, capped, SIZE), tiles_to_array(dynamic_preprocess(image, 1, 4, SIZE, True)))
    frame = photo(40, 30, 2)
    one = ImageTiling(1, 1, False)
    want = np.asarray(frame.resize((SIZE, SIZE), Image.Resampling.BICUBIC))  # InternVL's frame transform
    assert np.array_equal(cut_tiles(frame, one, SIZE)[0], want)
    tile = Image.fromarray(want)  # a video file's frame is stored as its tile: cutting it again is exact
    assert np.array_equal(cut_tiles(tile, one, SIZE)[0], want)


@pytest.fixture(scope="module")
def two_formats(tmp_path_factory):
    """The front end's fixture (single / multi-image with per-image caps, frame folder, GIF and video
    file, parquet image bytes) preprocessed twice: tiles stored ("raw") and images stored ("source")."""
    root = tmp_path_factory.mktemp("src")
    fx = make_dataset_fixture(str(root / "data"))
    tok = make_tokenizer_dir(str(root / "tok"))
    out = {}
    for fmt in ("raw", "source"):
        prefix = str(root / fmt / "data")
        args = [
            "--meta",
            fx.meta_path,
            "--tokenizer",
            tok,
            "--output-prefix",
            prefix,
            "--seq-length",
            str(fx.max_seq_length),
            "--image-size",
            str(fx.image_size),
            "--num-image-token",
            str(fx.num_image_token),
            "--min-num-frames",
            str(fx.min_num_frames),
            "--max-num-frames",
            str(fx.max_num_frames),
            "--no-progress",
            "--max-reject-ratio",
            "1",
            "--tile-format",
            fmt,
            "--workers",
            "2",
        ]
        assert preprocess_mm_data.main(args) == 0
        out[fmt] = prefix
    return fx, out


def test_source_shards_load_the_same_tiles_as_stored_tiles(two_formats):
    fx, out = two_formats
    raw, src = ShardReader(out["raw"]), ShardReader(out["source"])
    assert src.tile_format == "source" and len(raw) == len(src) > 0
    assert raw.manifest["counts"]["tiles"] == src.manifest["counts"]["tiles"]
    kinds = set()
    for i in range(len(raw)):
        a, b = raw.read(i), src.read(i)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.num_tiles, b.num_tiles)
        assert b.tile_lengths.shape[0] == b.num_tiles.shape[0]  # one payload per image
        assert np.array_equal(raw.tiles(a), src.tiles(b)), f"pack {i}"
        for d, line in b.source.tolist():
            kinds.add(fx.kinds.get((src.datasets[d]["name"], line)))
    assert {"image", "multi_image", "video"} <= kinds
    # the loader emits the same uint8 tiles (in worker processes too)
    for x, y in zip(PackedDataLoader([out["raw"]], seed=1), PackedDataLoader([out["source"]], seed=1, num_workers=1)):
        assert x.tiles.dtype == y.tiles.dtype == np.uint8 and np.array_equal(x.tiles, y.tiles)
        break
    # images are stored once: far fewer bytes than their tiles, even raw ones at 56 px
    size = {f: os.path.getsize(out[f] + "_tiles.bin") for f in out}
    assert size["source"] < size["raw"]
