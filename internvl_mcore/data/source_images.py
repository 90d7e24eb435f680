"""A batch's images (`Images`, the one type the collate makes of them) and their device tiling.

`Images` carries the images in the form the data made them, uint8 tiles cut on the host, the decoded
images of `--image-tiling device` (`SourceImages`) or mock data's normalized floats, and
`Images.pixel_values()` makes the vision model's input from any of them on their device: consumers call
that one method and never look at the form.

Device tiling: the loader decodes each "source" image once and ships its pixels with the grid picked at
preprocessing; the first pipeline stage cuts the tiles on its device with `resample.resize_rgb`, Pillow's
bicubic resize re-implemented exactly, so the tiles are byte-identical to the loader's `image.cut_tiles`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .image import IMAGENET_MEAN, IMAGENET_STD
from .resample import resize_rgb
from .sample import DecodedImages, PackedSample


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
        image = pixels[off : off + h * w * 3].view(h, w, 3)
        n = cols * nrows
        same = (w, h) == (cols * s, nrows * s)  # tiles cut on the CPU: Image.resize would only copy
        grid = image if same else resize_rgb(image, cols * s, nrows * s)  # (rows*S, cols*S, 3)
        out[k : k + n].view(nrows, cols, s, s, 3).copy_(grid.view(nrows, s, cols, s, 3).permute(0, 2, 1, 3, 4))
        if thumb:
            out[k + n] = resize_rgb(image, s, s)
        k += n + thumb
    return out


def source_images_of(packs: list[DecodedImages], tile_size: int) -> SourceImages:
    """One batch's SourceImages from its packs' decoded images, in order."""
    return SourceImages.from_numpy(DecodedImages.concat(packs), tile_size)


def numpy_tiles(images: DecodedImages, tile_size: int) -> np.ndarray:
    """The tiles of `images` computed with torch on the CPU (tests and benchmarks)."""
    return cut_tiles_on_device(torch.from_numpy(images.pixels), torch.from_numpy(images.table), tile_size).numpy()


def normalize_pixels(tiles: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB tiles -> (T, 3, H, W) float32, scaled to [0, 1] and ImageNet-normalized
    (InternVL's ToTensor + Normalize) on the tiles' own device, so the data loader ships uint8 (4x fewer
    bytes) and the CPU never makes float tiles."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=tiles.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=tiles.device)[:, None, None]
    x = tiles.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    return (x / 255.0 - mean) / std  # the same float32 operations as data/image.py normalize_tiles


@dataclass
class Images:
    """A batch's images, all tiles in batch order, in the one form its data made; exactly one field is set.

    tiles       (T, S, S, 3) uint8 RGB cut on the host (--image-tiling host): normalized on their device.
    source      the decoded images of --image-tiling device: cut on their device, then normalized.
    normalized  (T, 3, S, S) float32 already normalized: mock data's random floats (no image bytes behind
                them; floats keep mock runs' numbers, which tools/gpu_reference.json pins)."""

    tiles: Optional[torch.Tensor] = None
    source: Optional[SourceImages] = None
    normalized: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.tiles, self.source, self.normalized)) != 1:
            raise TypeError("Images holds exactly one of tiles, source, normalized")

    @staticmethod
    def of_packs(samples: Sequence[PackedSample]) -> "Images":
        """The images of `samples` in order: their (T, S, S, 3) uint8 tiles (mock packs: (T, 3, S, S)
        normalized floats), or their decoded images where any pack carries them (--image-tiling device)."""
        if any(s.images is not None for s in samples):
            packs = [s.images if s.images is not None else DecodedImages.from_tiles(s.tiles) for s in samples]
            return Images(source=source_images_of(packs, int(samples[0].tiles.shape[1])))
        tiles = torch.cat([torch.as_tensor(s.tiles) for s in samples])  # numpy, or the workers' shared memory
        return Images(tiles=tiles) if tiles.dtype == torch.uint8 else Images(normalized=tiles)

    @property
    def num_tiles(self) -> int:
        """T, the number of tiles (of the vision model's input)."""
        return self.source.num_tiles if self.source is not None else int(self._tensor().shape[0])

    def pixel_values(self) -> torch.Tensor:
        """(T, 3, S, S) float32 normalized tiles on the images' device: the vision model's input."""
        if self.source is not None:
            return self.device_tiled()
        return self.host_tiled() if self.tiles is not None else self.normalized

    def host_tiled(self) -> torch.Tensor:
        """The host-cut uint8 tiles normalized on their device."""
        return normalize_pixels(self.tiles)

    def device_tiled(self) -> torch.Tensor:
        """The source images cut into tiles on their device (`SourceImages.tiles`, computed once per
        object: MPO's reference forward reuses them), normalized there."""
        return normalize_pixels(self.source.tiles())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Images":
        """The same images on `device` (a source table stays on the host)."""
        moved = {k: None if v is None else v.to(device, non_blocking=non_blocking) for k, v in self._fields()}
        return Images(**moved)

    def pin_memory(self) -> "Images":
        """The same images in page-locked memory (copies to a GPU asynchronously)."""
        return Images(**{k: None if v is None else v.pin_memory() for k, v in self._fields()})

    def _fields(self) -> list[tuple[str, object]]:
        return [("tiles", self.tiles), ("source", self.source), ("normalized", self.normalized)]

    def _tensor(self) -> torch.Tensor:
        return self.tiles if self.tiles is not None else self.normalized
