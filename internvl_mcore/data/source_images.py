"""A batch's images decoded but not tiled, tiled on the model's device (`--image-tiling device`).

The loader decodes each "source" image once and ships its pixels with the grid picked at preprocessing;
the first pipeline stage cuts the tiles on its device with `resample.resize_rgb`, Pillow's bicubic resize
re-implemented exactly, so the tiles are byte-identical to the loader's `image.cut_tiles`. The batch's
`pixel_values` is then a `SourceImages` instead of a (T, S, S, 3) tensor; it behaves like one where the
training code looks at it (`.shape`, `.to(device, non_blocking=...)`, `.pin_memory()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .resample import resize_rgb
from .sample import DecodedImages


@dataclass
class SourceImages:
    """The images of a batch: flat pixels on some device + the (host) table of how to tile them.

    `pixels` (N,) uint8 holds each image's (height, width, 3) bytes; `table` (n, 6) int64 rows are
    [height, width, cols, rows, thumbnail, offset] (sample.IMAGE_TABLE_COLUMNS); `tile_size` S. The table
    stays in host memory: it only says which kernels to launch, reading it never waits for the device."""

    pixels: torch.Tensor
    table: torch.Tensor
    tile_size: int
    _tiles: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @staticmethod
    def from_numpy(images: DecodedImages, tile_size: int) -> "SourceImages":
        return SourceImages(torch.from_numpy(images.pixels), torch.from_numpy(images.table), int(tile_size))

    @property
    def num_tiles(self) -> int:
        t = self.table
        return int((t[:, 2] * t[:, 3] + t[:, 4]).sum()) if t.shape[0] else 0

    @property
    def shape(self) -> torch.Size:
        """The shape of the tiles it makes: (T, S, S, 3)."""
        return torch.Size((self.num_tiles, self.tile_size, self.tile_size, 3))

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SourceImages":
        """The pixels on `device` (the table stays on the host)."""
        return SourceImages(self.pixels.to(device, non_blocking=non_blocking), self.table, self.tile_size)

    def pin_memory(self) -> "SourceImages":
        return SourceImages(self.pixels.pin_memory(), self.table, self.tile_size)

    def tiles(self) -> torch.Tensor:
        """(T, S, S, 3) uint8 tiles on the pixels' device, the same bytes as `image.cut_tiles` on the CPU.
        Computed once per object (the MPO reference model's forward reuses them)."""
        if self._tiles is None:
            self._tiles = cut_tiles_on_device(self.pixels, self.table, self.tile_size)
        return self._tiles


def cut_tiles_on_device(pixels: torch.Tensor, table: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Each table row's tiles: the grid resize cut row-major, then the thumbnail (data/image.py: cut_tiles)."""
    s = int(tile_size)
    rows = table.tolist()
    total = sum(c * r + th for _, _, c, r, th, _ in rows)
    out = torch.empty((total, s, s, 3), dtype=torch.uint8, device=pixels.device)
    k = 0
    for h, w, cols, nrows, thumb, off in rows:
        image = pixels[off: off + h * w * 3].view(h, w, 3)
        n = cols * nrows
        same = (w, h) == (cols * s, nrows * s)  # tiles cut on the CPU: Image.resize would only copy
        grid = image if same else resize_rgb(image, cols * s, nrows * s)  # (rows*S, cols*S, 3)
        out[k: k + n].view(nrows, cols, s, s, 3).copy_(grid.view(nrows, s, cols, s, 3).permute(0, 2, 1, 3, 4))
        if thumb:
            out[k + n] = resize_rgb(image, s, s)
        k += n + thumb
    return out


def tile_pixel_values(pixel_values: torch.Tensor | SourceImages) -> torch.Tensor:
    """Tiles from either kind of `pixel_values` (a tensor passes through)."""
    return pixel_values.tiles() if isinstance(pixel_values, SourceImages) else pixel_values


def source_images_of(packs: list[DecodedImages], tile_size: int) -> SourceImages:
    """One batch's SourceImages from its packs' decoded images, in order."""
    return SourceImages.from_numpy(DecodedImages.concat(packs), tile_size)


def numpy_tiles(images: DecodedImages, tile_size: int) -> np.ndarray:
    """The tiles of `images` computed with torch on the CPU (tests and benchmarks)."""
    return cut_tiles_on_device(torch.from_numpy(images.pixels), torch.from_numpy(images.table), tile_size).numpy()
