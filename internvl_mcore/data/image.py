"""Images and video frames the way InternVL prepares them, as pure functions.

- `dynamic_preprocess`: InternVL's dynamic tiling (closest tile grid, resize, crop, thumbnail).
- `plan_tiling` / `cut_tiles`: the same tiling split in two - the grid is chosen once (preprocessing, from
  the image size) and the pixels are cut at load time (the "source" tile format), pixel-exact.
- `stored_image_bytes`: the encoded bytes kept for an image (as given, or losslessly re-encoded).
- `tiles_to_array` / `normalize_tiles`: uint8 storage layout and the float input of the vision tower.
- `jpeg_recompress` / `random_jpeg_recompress`: InternVL's `data_augment` training augmentation.
- `sample_frame_indices` and the frame loaders: InternVL's video frame sampling.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageSequence

# InternVL's constants (internvl/train/constants.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# InternVL's build_transform(is_train=True) picks one JPEG quality uniformly from 75..100 per tile.
JPEG_QUALITIES = tuple(range(75, 101))

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoDecoderMissing(RuntimeError):
    """A video file needs PyAV (`av`) or `decord`, and neither is installed."""


# --------------------------------------------------------------------------------------------------
# Dynamic tiling
# --------------------------------------------------------------------------------------------------


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_num <= cols*rows <= max_num, in InternVL's order (by tile count).

    The order among equal tile counts matters for ties, so the candidate set is built and sorted the
    same way InternVL builds it (a Python set of (i, j), stably sorted by i*j).
    """
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """The grid whose cols/rows is closest to `aspect_ratio`.

    On an exact tie the later grid (more tiles) wins only if the image has more than half the pixels that
    grid would hold (area > 0.5 * image_size^2 * cols * rows), so small images are not blown up.
    """
    best = (1, 1)
    best_diff = float("inf")
    area = width * height
    for cols, rows in target_ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Cut `image` into image_size x image_size tiles like InternVL.

    Pick the grid (cols, rows) closest in aspect ratio, resize the image to (cols*size, rows*size) with
    Pillow's default filter (bicubic), crop it row-major into tiles, and append a thumbnail (the whole
    image resized to size x size) when there is more than one tile.
    """
    width, height = image.size
    grid = find_closest_aspect_ratio(width / height, candidate_grids(min_num, max_num), width, height, image_size)
    cols, rows = grid
    resized = image.resize((cols * image_size, rows * image_size))
    tiles = []
    for r in range(rows):
        for c in range(cols):
            box = (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
            tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


@dataclass(frozen=True)
class ImageTiling:
    """How one image becomes tiles: a cols x rows grid of the resized image, then maybe a thumbnail."""

    cols: int
    rows: int
    thumbnail: bool

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows + int(self.thumbnail)


def plan_tiling(
    width: int, height: int, min_num: int, max_num: int, image_size: int, use_thumbnail: bool
) -> ImageTiling:
    """The grid `dynamic_preprocess` picks for a width x height image (it needs only the size)."""
    cols, rows = find_closest_aspect_ratio(width / height, candidate_grids(min_num, max_num), width, height, image_size)
    return ImageTiling(cols, rows, bool(use_thumbnail and cols * rows != 1))


def cut_tiles(image: Image.Image, tiling: ImageTiling, image_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """(T, S, S, 3) uint8 tiles of an RGB image, pixel-exact to tiles_to_array(dynamic_preprocess(...)).

    Same Pillow calls as InternVL (resize with the default bicubic filter, the thumbnail resized from
    the whole image); the row-major crops of the resized image are array slices, which copy the same
    pixels as `Image.crop` without building one PIL image per tile. `out`: (T, S, S, 3) to write into.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    s, cols, rows = image_size, tiling.cols, tiling.rows
    if out is None:
        out = np.empty((tiling.num_tiles, s, s, 3), dtype=np.uint8)
    grid = np.asarray(image.resize((cols * s, rows * s)), dtype=np.uint8)  # (rows*S, cols*S, 3)
    out[: rows * cols].reshape(rows, cols, s, s, 3)[...] = grid.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4)
    if tiling.thumbnail:
        out[-1] = np.asarray(image.resize((s, s)), dtype=np.uint8)  # (S, S, 3)
    return out


# Formats whose bytes decode to the same pixels every time (`Image.open(...).convert("RGB")`), so the
# bytes the user gave are stored as they are. Anything else is re-encoded as lossless WebP.
REDECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def lossless_bytes(image: Image.Image) -> bytes:
    """An RGB image as lossless WebP (least effort: encoding speed, decoding is the same)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def stored_image_bytes(data: bytes, image: Image.Image, source_format: str | None) -> bytes:
    """What the "source" tile format keeps of an image: `data` itself when Pillow decodes that format
    exactly again, else `image` (the decoded RGB pixels) losslessly re-encoded."""
    return data if source_format in REDECODABLE_FORMATS else lossless_bytes(image)


def decode_rgb(data: bytes | memoryview) -> Image.Image:
    """Decode encoded image bytes to RGB exactly as preprocessing did (Image.open + convert("RGB"))."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


def tiles_to_array(tiles: Sequence[Image.Image]) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB from PIL tiles (all the same size)."""
    if not tiles:
        raise ValueError("tiles_to_array needs at least one tile")
    arrays = [np.asarray(t.convert("RGB") if t.mode != "RGB" else t, dtype=np.uint8) for t in tiles]
    return np.stack(arrays)


def normalize_tiles(arr: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32, scaled to [0, 1] then ImageNet-normalized (as InternVL)."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"normalize_tiles expects (T, H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    x = arr.astype(np.float32) / np.float32(255.0)  # (T, H, W, 3)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (T, 3, H, W)


# --------------------------------------------------------------------------------------------------
# data_augment: random JPEG re-compression
# --------------------------------------------------------------------------------------------------


def jpeg_recompress(arr: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at `quality` with Pillow and decode back; (H, W, 3) or (T, H, W, 3) uint8."""
    if arr.ndim == 4:
        return np.stack([jpeg_recompress(a, quality) for a in arr])
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def random_jpeg_recompress(
    tiles: np.ndarray, rng: np.random.Generator, qualities: Sequence[int] = JPEG_QUALITIES
) -> tuple[np.ndarray, list[int]]:
    """InternVL's training augmentation: each tile re-compressed at a quality drawn uniformly from `qualities`.

    Pure given `rng` (the loader seeds it so a resumed run sees the same augmentation).
    Returns the (T, H, W, 3) uint8 tiles and the qualities used.
    """
    qs = [int(qualities[i]) for i in rng.integers(0, len(qualities), size=len(tiles))]
    out = np.stack([jpeg_recompress(t, q) for t, q in zip(tiles, qs)]) if len(tiles) else tiles.copy()
    return out, qs


# --------------------------------------------------------------------------------------------------
# Video frames
# --------------------------------------------------------------------------------------------------


def get_frame_indices(num_frames: int, vlen: int, rng: np.random.Generator, sample: str = "rand") -> list[int]:
    """InternVL's uniform segment sampling of `num_frames` out of `vlen` frames.

    The video is split into min(num_frames, vlen) equal intervals [a, b) (integer edges from linspace).
    'rand' draws one index uniformly from range(a, b - 1) per interval - InternVL's exact range, so the last
    frame of an interval is never drawn - and, when some interval is too short for that, falls back to a
    sorted random subset of all frames. 'middle' takes (a + b - 1) // 2. The result is padded with its
    last index up to `num_frames`.
    """
    acc = min(num_frames, vlen)
    edges = np.linspace(0, vlen, num=acc + 1).astype(int)
    ranges = [(int(edges[k]), int(edges[k + 1]) - 1) for k in range(acc)]
    if sample == "rand":
        if all(hi > lo for lo, hi in ranges):
            indices = [int(rng.integers(lo, hi)) for lo, hi in ranges]
        else:
            indices = sorted(int(i) for i in rng.permutation(vlen)[:acc])
    elif sample == "middle":
        indices = [(lo + hi) // 2 for lo, hi in ranges]
    else:
        raise ValueError(f"unknown frame sampling {sample!r} (use 'rand' or 'middle')")
    if len(indices) < num_frames:
        indices = indices + [indices[-1]] * (num_frames - len(indices))
    return indices


def sample_frame_indices(
    num_frames_total: int,
    min_num_frames: int,
    max_num_frames: int,
    rng: np.random.Generator,
    sample: str = "rand",
) -> list[int]:
    """Which frames of a video to keep, following InternVL.

    The frame count is drawn uniformly from [min_num_frames, max_num_frames]; a video with no more frames
    than that keeps all its frames (InternVL's rule for frame folders; we apply it to every source rather
    than padding short videos with repeated frames); otherwise `get_frame_indices` picks them.
    """
    if num_frames_total <= 0:
        raise ValueError("video has no frames")
    if not 1 <= min_num_frames <= max_num_frames:
        raise ValueError(f"need 1 <= min_num_frames <= max_num_frames, got {min_num_frames}, {max_num_frames}")
    target = int(rng.integers(min_num_frames, max_num_frames + 1))
    if num_frames_total <= target:
        return list(range(num_frames_total))
    return get_frame_indices(target, num_frames_total, rng, sample)


def _frame_sort_key(name: str) -> tuple:
    """Frames sort by the last number in the file name (frame_2 < frame_10), then by name."""
    stem = os.path.splitext(name)[0]
    numbers = re.findall(r"\d+", stem)
    return (int(numbers[-1]) if numbers else -1, name)


def list_frame_files(folder: str) -> list[str]:
    """Image files of a frame folder in frame order."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)]
    return [os.path.join(folder, n) for n in sorted(names, key=_frame_sort_key)]


def sample_frame_files(
    folder: str, min_num_frames: int, max_num_frames: int, rng: np.random.Generator, sample: str = "rand"
) -> list[str]:
    """The sampled frame files of a folder of frame images, in frame order."""
    files = list_frame_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no frame images ({', '.join(FRAME_EXTENSIONS)})")
    return [files[k] for k in sample_frame_indices(len(files), min_num_frames, max_num_frames, rng, sample)]


def load_frames_folder(
    folder: str, min_num_frames: int, max_num_frames: int, rng: np.random.Generator, sample: str = "rand"
) -> list[Image.Image]:
    """Sampled frames (RGB) of a folder of frame images."""
    frames = []
    for path in sample_frame_files(folder, min_num_frames, max_num_frames, rng, sample):
        with Image.open(path) as im:
            frames.append(im.convert("RGB"))
    return frames


def load_frames_gif(
    path: str, min_num_frames: int, max_num_frames: int, rng: np.random.Generator, sample: str = "rand"
) -> list[Image.Image]:
    """Sampled frames (RGB, composited by Pillow) of a GIF."""
    with Image.open(path) as gif:
        n = getattr(gif, "n_frames", 1)
        wanted = sample_frame_indices(n, min_num_frames, max_num_frames, rng, sample)
        by_index = {}
        for k, frame in enumerate(ImageSequence.Iterator(gif)):
            if k in wanted:
                by_index[k] = frame.convert("RGB")
            if k >= max(wanted):
                break
    return [by_index[k] for k in wanted]


def load_frames_video(
    path: str, min_num_frames: int, max_num_frames: int, rng: np.random.Generator, sample: str = "rand"
) -> list[Image.Image]:
    """Sampled frames of a video file through PyAV or decord; VideoDecoderMissing if neither is installed."""
    try:
        import av  # type: ignore
    except ImportError:
        av = None
    if av is not None:
        with av.open(path) as container:
            n = container.streams.video[0].frames  # 0 when the container does not say
        if n <= 0:
            with av.open(path) as container:
                n = sum(1 for _ in container.decode(video=0))
        if n <= 0:
            raise ValueError(f"{path}: no decodable video frames")
        wanted = sample_frame_indices(n, min_num_frames, max_num_frames, rng, sample)
        by_index = {}
        with av.open(path) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    by_index[k] = frame.to_image().convert("RGB")
                if k >= max(wanted):
                    break
        missing = [k for k in wanted if k not in by_index]
        if missing:
            raise ValueError(f"{path}: frames {missing[:5]} could not be decoded")
        return [by_index[k] for k in wanted]
    try:
        import decord  # type: ignore
    except ImportError:
        decord = None
    if decord is not None:
        vr = decord.VideoReader(path, num_threads=1)
        wanted = sample_frame_indices(len(vr), min_num_frames, max_num_frames, rng, sample)
        batch = vr.get_batch(wanted).asnumpy()  # (T, H, W, 3) uint8
        return [Image.fromarray(f).convert("RGB") for f in batch]
    raise VideoDecoderMissing(f"{path}: decoding video files needs 'av' (PyAV) or 'decord'; neither is installed")


def load_video_frames(
    path: str, min_num_frames: int, max_num_frames: int, rng: np.random.Generator, sample: str = "rand"
) -> list[Image.Image]:
    """Frames of a video given as a folder (path ending in '/' or a directory), a GIF, or a video file."""
    if path.endswith("/") or os.path.isdir(path):
        return load_frames_folder(path, min_num_frames, max_num_frames, rng, sample)
    if path.lower().endswith(".gif"):
        return load_frames_gif(path, min_num_frames, max_num_frames, rng, sample)
    return load_frames_video(path, min_num_frames, max_num_frames, rng, sample)


def frame_to_tile(frame: Image.Image, image_size: int = 448) -> Image.Image:
    """A video frame becomes one tile: resized (bicubic) to image_size x image_size, as InternVL's transform."""
    return frame.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
