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
    """(T, H, W, 3) uint8 RGB tiles, T = sum(num_tiles); the model normalizes them on its device."""
    num_tiles: np.ndarray
    """(n_images,) int32 tiles per image in order of appearance."""
    source: list[dict] = field(default_factory=list)
    """Per sub-sample {'dataset': str, 'line': int}."""
    pairs: int = 0
    """Preference packs: the sub-samples are `pairs` (chosen, rejected) pairs in order; 0 otherwise."""
