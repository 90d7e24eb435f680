"""The records that pass between the data pipeline's stages.

sources.py reads user data and yields `TokenizedSample`s (or `Reject`s); packing.py groups samples
into packs; shards.py writes packs; loader.py reads them back as `PackedSample`s. Keeping these plain
(numpy only, no torch) lets worker processes pickle them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .image import ImageTiling

# InternVL's special strings. Their ids come from the tokenizer, never from literals.
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"


@dataclass
class StoredImage:
    """One image as the "source" tile format keeps it: its encoded bytes and the grid to cut at load time."""

    data: bytes
    """The image file's bytes as given, or lossless WebP when its format may not decode identically again."""
    tiling: ImageTiling
    """The grid (and thumbnail) InternVL's dynamic_preprocess picked for it; (1, 1) without thumbnail for a frame."""


@dataclass
class TokenizedSample:
    """One conversation after templating, tokenizing and tiling (before packing)."""

    tokens: np.ndarray
    """(S,) int32 token ids, including `<img>` + n_tiles*num_image_token `<IMG_CONTEXT>` + `</img>` per image."""
    loss_mask: np.ndarray
    """(S,) uint8, 1 where the token is a training target (assistant answer and its `<|im_end|>`)."""
    tiles: np.ndarray
    """(T, H, W, 3) uint8 RGB tiles of all images in order (T = sum(num_tiles)); (0, H, W, 3) for text."""
    num_tiles: list[int]
    """Tiles per image, in the order the images appear in `tokens`."""
    dataset: str
    """Name of the dataset (the meta JSON key) the sample came from."""
    line: int
    """1-based line (JSONL) or row (parquet, 0-based row + 1) in the source file."""
    source_file: str = ""
    """Path of the annotation/parquet file the sample came from."""
    data_augment: bool = False
    """The dataset asked for InternVL's training augmentation (applied by the loader, not stored)."""
    images: list[StoredImage] = field(default_factory=list)
    """Per image (aligned with num_tiles), filled instead of `tiles` when the options ask for source images."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Reject:
    """An input that could not become a sample; written to the rejects file, never silently dropped."""

    source_file: str
    line: int
    reason: str
    """Short machine-countable reason key, e.g. 'missing_image', 'bad_json', 'image_count_mismatch'."""
    detail: str = ""
    """Human-readable detail (exception text, offending value)."""


# Columns of a `DecodedImages` table (one row per image to tile).
IMAGE_TABLE_COLUMNS = ("height", "width", "cols", "rows", "thumbnail", "offset")


@dataclass
class DecodedImages:
    """Decoded images and how to tile them, for tiling on the model's device (`--image-tiling device`).

    Row i of `table` is [height, width, cols, rows, thumbnail, offset]: the (height, width, 3) uint8 RGB
    pixels at pixels[offset : offset + height * width * 3] become the cols x rows grid of the image resized
    to (cols * S, rows * S) plus, when thumbnail is 1, the image resized to (S, S), exactly as
    `image.cut_tiles`. Tiles already cut on the CPU are rows of one S x S image with a 1 x 1 grid and no
    thumbnail. Rows may share pixels (a preference pair's images). The rows' tiles in order are the
    pack's tiles in token order."""

    pixels: np.ndarray
    """(N,) uint8: every image's (height, width, 3) bytes, back to back."""
    table: np.ndarray
    """(n, 6) int64, columns IMAGE_TABLE_COLUMNS."""

    @property
    def num_tiles(self) -> int:
        return int((self.table[:, 2] * self.table[:, 3] + self.table[:, 4]).sum())

    @staticmethod
    def from_tiles(tiles: np.ndarray) -> "DecodedImages":
        """(T, S, S, 3) uint8 tiles as T images of a 1 x 1 grid (a view, no copy when contiguous)."""
        t, s = int(tiles.shape[0]), int(tiles.shape[1])
        table = np.zeros((t, 6), dtype=np.int64)
        table[:, 0:4] = (s, s, 1, 1)
        table[:, 5] = np.arange(t, dtype=np.int64) * (s * s * 3)
        return DecodedImages(np.ascontiguousarray(tiles).reshape(-1), table)

    @staticmethod
    def concat(parts: "list[DecodedImages]") -> "DecodedImages":
        """All parts' images in order (offsets shifted to the concatenated pixels)."""
        sizes = np.cumsum([0] + [int(p.pixels.shape[0]) for p in parts], dtype=np.int64)
        tables = [p.table + np.array([0, 0, 0, 0, 0, int(off)], dtype=np.int64) for p, off in zip(parts, sizes)]
        return DecodedImages(
            np.concatenate([p.pixels for p in parts]) if parts else np.zeros(0, np.uint8),
            np.concatenate(tables) if tables else np.zeros((0, 6), np.int64),
        )


@dataclass
class PackedSample:
    """One training sequence as the loader returns it (numpy; the training step makes tensors)."""

    tokens: np.ndarray
    """(S,) int64 token ids of the pack (S <= seq_length; padding is the trainer's business)."""
    loss_mask: np.ndarray
    """(S,) float32 0/1; the label of token i is tokens[i+1] (the trainer shifts)."""
    position_ids: np.ndarray
    """(S,) float32 V2PE positions, restarting at 0 for each sub-sample."""
    cu_seqlens: np.ndarray
    """(n_samples+1,) int32 sub-sample boundaries: 0, len0, len0+len1, ..., S."""
    tiles: np.ndarray
    """(T, H, W, 3) uint8 RGB tiles, T = sum(num_tiles); the model normalizes them on its device.
    (0, H, W, 3) when `images` carries them untiled."""
    num_tiles: np.ndarray
    """(n_images,) int32 tiles per image in order of appearance."""
    source: list[dict] = field(default_factory=list)
    """Per sub-sample {'dataset': str, 'line': int}."""
    pairs: int = 0
    """Preference packs: the sub-samples are `pairs` (chosen, rejected) pairs in order; 0 otherwise."""
    images: DecodedImages | None = None
    """`--image-tiling device`: the pack's images decoded but not tiled (then `tiles` is empty)."""
