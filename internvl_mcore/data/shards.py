"""Packed shards on megatron-core's indexed dataset format (`.bin` / `.idx`).

A shard set with prefix P is six megatron-core `IndexedDataset`s plus a manifest:

    P_tokens.{bin,idx}        int32    one sequence per sub-sample   (token ids)
    P_loss_mask.{bin,idx}     uint8    one sequence per sub-sample   (1 = token is a target)
    P_position_ids.{bin,idx}  float32  one sequence per sub-sample   (V2PE positions, from 0)
    P_num_tiles.{bin,idx}     int32    one sequence per sub-sample   (tiles of each of its images)
    P_source.{bin,idx}        int64    one sequence per sub-sample   ([dataset index, line])
    P_tiles.{bin,idx}         uint8    one sequence per tile         (encoded tile bytes)
                                       or per image ("source" format: header + image bytes)
    P.manifest.json

In every one of them a megatron "document" is one pack, so `document_indices` gives the pack ->
sequence mapping and the sequence lengths of P_tokens give cu_seqlens directly. Keeping one field
per file keeps each file a single honest dtype (megatron-core's format has one dtype per file) and
lets a reader touch only what it needs (inspect reads tokens without tiles).

"source" stores each image once: a 9-byte header (b"SRC1", grid cols and rows as uint16, thumbnail
flag as uint8) followed by the image's encoded bytes as the user gave them (re-encoded as lossless
WebP only for formats Pillow may not decode identically again, and for frames of video files, which
are stored as their one 448x448 tile). The loader decodes each image once and cuts its tiles with
`image.cut_tiles`, pixel-exact to the tiles the other formats store (see docs/data.md for the
measured size and speed).

The other formats store tiles one per sequence in `tile_format`:

- "webp": lossless WebP at the least encoding effort (the default before "source").
- "png": lossless, for Pillow builds without libwebp.
- "raw": uncompressed; the fastest to load (no decode, no resize) at ~34x the source bytes.
- "jpeg": lossy (q95 4:4:4), changes pixels.

docs/data.md has bench/data_pipeline.py's numbers for all five (bytes, preprocessing and load CPU).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np

from ..errors import ConfigError, DataError
from .image import ImageTiling, cut_tiles, decode_rgb
from .sample import StoredImage

SHARD_FORMAT = "internvl-mcore-packed-v1"
TileFormat = Literal["source", "webp", "png", "raw", "jpeg"]
TILE_FORMATS: tuple[str, ...] = get_args(TileFormat)
TILE_CODECS = TILE_FORMATS[1:]  # formats storing one encoded payload per tile
# "source" payload header: magic, grid cols, grid rows, thumbnail flag.
SOURCE_HEADER = struct.Struct("<4sHHB")
SOURCE_MAGIC = b"SRC1"
DEFAULT_TILE_FORMAT = "source"

# field name -> numpy dtype on disk
FIELDS: dict[str, type] = {
    "tokens": np.int32,
    "loss_mask": np.uint8,
    "position_ids": np.float32,
    "num_tiles": np.int32,
    "source": np.int64,
    "tiles": np.uint8,
}


def field_prefix(prefix: str, name: str) -> str:
    """Indexed-dataset prefix of one field: P_tokens -> P_tokens.bin / P_tokens.idx."""
    return f"{prefix}_{name}"


def manifest_path(prefix: str) -> str:
    return f"{prefix}.manifest.json"


def shard_files(prefix: str) -> list[str]:
    """All data files of a shard set (not the manifest), in a fixed order."""
    return [field_prefix(prefix, n) + ext for n in FIELDS for ext in (".bin", ".idx")]


def max_token_id(prefix: str, manifest: dict) -> int:
    """The largest token id of a shard set: the manifest's (written since it records it), else one
    pass over the tokens' .bin (megatron-core's .bin is the bare int32 array; ~4 bytes a token, no
    tiles read), so older shard sets are checked as exactly."""
    recorded = manifest.get("counts", {}).get("max_token_id")
    if isinstance(recorded, int):
        return recorded
    path = field_prefix(prefix, "tokens") + ".bin"
    if not os.path.getsize(path):
        return -1
    return int(np.memmap(path, dtype=FIELDS["tokens"], mode="r").max())


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Tile codecs
# ------------------------------------------------------------------------------------------------


def encode_tiles(tiles: np.ndarray, tile_format: str) -> list[bytes]:
    """(T, H, W, 3) uint8 -> T payloads in `tile_format`."""
    from PIL import Image

    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be (T, H, W, 3) uint8, got {tiles.shape} {tiles.dtype}")
    if tile_format == "raw":
        return [np.ascontiguousarray(t).tobytes() for t in tiles]
    out = []
    for t in tiles:
        buf = io.BytesIO()
        if tile_format == "webp":
            # lossless; quality/method 0 = least effort: 5-15x faster to encode than the defaults
            # for a few % more bytes, and decoding speed does not depend on the effort.
            Image.fromarray(t).save(buf, format="WEBP", lossless=True, quality=0, method=0)
        elif tile_format == "png":
            # compress_level 1: ~3x faster to encode than the default 6 for ~10% more bytes.
            Image.fromarray(t).save(buf, format="PNG", compress_level=1)
        elif tile_format == "jpeg":
            Image.fromarray(t).save(buf, format="JPEG", quality=95, subsampling=0)
        else:
            raise ValueError(
                f"unknown tile codec {tile_format!r}; choose from {TILE_CODECS} "
                "('source' stores images, see encode_source_images)"
            )
        out.append(buf.getvalue())
    return out


def encode_source_images(images: Sequence[StoredImage]) -> list[bytes]:
    """One "source" payload per image: header (grid, thumbnail) + the stored encoded bytes."""
    return [
        SOURCE_HEADER.pack(SOURCE_MAGIC, im.tiling.cols, im.tiling.rows, int(im.tiling.thumbnail)) + im.data
        for im in images
    ]


def source_tiling(payload: np.ndarray | bytes) -> ImageTiling:
    """The grid recorded in a "source" payload's header."""
    magic, cols, rows, thumb = SOURCE_HEADER.unpack_from(memoryview(payload)[: SOURCE_HEADER.size])
    if magic != SOURCE_MAGIC:
        raise ValueError(f"not a 'source' image payload (header {bytes(magic)!r})")
    return ImageTiling(int(cols), int(rows), bool(thumb))


def decode_source_images(payloads: Sequence[np.ndarray | bytes], image_size: int) -> np.ndarray:
    """ "source" payloads -> (T, S, S, 3) uint8 tiles: each image decoded once, then cut like InternVL."""
    tilings = [source_tiling(p) for p in payloads]
    out = np.empty((sum(t.num_tiles for t in tilings), image_size, image_size, 3), dtype=np.uint8)
    k = 0
    for p, tiling in zip(payloads, tilings):
        image = decode_rgb(memoryview(p)[SOURCE_HEADER.size :])
        cut_tiles(image, tiling, image_size, out=out[k : k + tiling.num_tiles])
        k += tiling.num_tiles
    return out


def payload_count(num_tiles: np.ndarray | Sequence[int], tile_format: str) -> int:
    """Payloads stored for images with `num_tiles` tiles each: one per image ("source") or per tile."""
    return len(num_tiles) if tile_format == "source" else int(np.sum(num_tiles, dtype=np.int64))


def decode_tiles(payloads: Sequence[np.ndarray | bytes], tile_format: str, tile_shape: Sequence[int]) -> np.ndarray:
    """T payloads -> (T, H, W, 3) uint8 (a fresh array; use `ShardReader.raw_tiles` for views)."""
    from PIL import Image

    h, w, c = (int(x) for x in tile_shape)
    if tile_format == "source":
        return decode_source_images(payloads, h)
    out = np.empty((len(payloads), h, w, c), dtype=np.uint8)
    for i, p in enumerate(payloads):
        if tile_format == "raw":
            out[i] = np.frombuffer(p, dtype=np.uint8).reshape(h, w, c)
            continue
        if tile_format not in TILE_FORMATS:
            raise ValueError(f"unknown tile format {tile_format!r}")
        with Image.open(io.BytesIO(memoryview(p))) as im:
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        if arr.shape != (h, w, c):
            raise ValueError(f"tile {i} decodes to {arr.shape}, manifest says {(h, w, c)}")
        out[i] = arr
    return out


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


@dataclass
class EncodedSample:
    """One sub-sample ready to be written: arrays in on-disk dtypes, tiles already encoded."""

    tokens: np.ndarray  # (S,) int32
    loss_mask: np.ndarray  # (S,) uint8
    position_ids: np.ndarray  # (S,) float32
    num_tiles: np.ndarray  # (n_images,) int32
    tiles: list  # payloads (bytes or uint8 arrays): one per tile, or one per image ("source" format)
    dataset_index: int  # index into the manifest's "datasets"
    line: int  # 1-based line / row in the source file

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class RawPack:
    """One pack as stored. Arrays are read-only views into the mmapped files (zero-copy)."""

    tokens: np.ndarray  # (S,) int32
    loss_mask: np.ndarray  # (S,) uint8
    position_ids: np.ndarray  # (S,) float32
    seq_lengths: np.ndarray  # (n,) int32 tokens per sub-sample
    num_tiles: np.ndarray  # (n_images,) int32, all sub-samples concatenated
    images_per_sample: np.ndarray  # (n,) int32 images of each sub-sample
    source: np.ndarray  # (n, 2) int64 [dataset index, line]
    tile_bytes: np.ndarray  # all payloads of the pack back to back, uint8
    tile_lengths: np.ndarray  # (P,) int32 bytes of each payload (P = tiles, or images for "source")

    @property
    def tile_payloads(self) -> list[np.ndarray]:
        """T uint8 views, one encoded tile each."""
        offsets = np.concatenate([[0], np.cumsum(self.tile_lengths, dtype=np.int64)])
        return [self.tile_bytes[offsets[k] : offsets[k + 1]] for k in range(self.tile_lengths.shape[0])]

    @property
    def cu_seqlens(self) -> np.ndarray:
        out = np.zeros(self.seq_lengths.shape[0] + 1, dtype=np.int32)
        np.cumsum(self.seq_lengths, out=out[1:])
        return out


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends packs to a shard set; `finalize()` writes the indexes and the manifest.

    Usage:
        w = ShardWriter("out/data", tile_format="png", tile_shape=(448, 448, 3))
        w.add_pack([EncodedSample(...), ...])
        manifest = w.finalize(extra={...})
    """

    def __init__(self, prefix: str, tile_format: str = DEFAULT_TILE_FORMAT, tile_shape: Sequence[int] = (448, 448, 3)):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path

        if tile_format not in TILE_FORMATS:
            raise ValueError(f"unknown tile format {tile_format!r}; choose from {TILE_FORMATS}")
        if tile_format == "webp":
            from PIL import features

            if not features.check("webp"):
                raise ConfigError("this Pillow build has no WebP support; use --tile-format png (also lossless)")
        self.prefix = prefix
        self.tile_format = tile_format
        self.tile_shape = [int(x) for x in tile_shape]
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._builders = {
            name: IndexedDatasetBuilder(get_bin_path(field_prefix(prefix, name)), dtype=dtype)
            for name, dtype in FIELDS.items()
        }
        # max_token_id: what training checks against the model's vocabulary without reading the tokens
        self.counts = {
            "packs": 0,
            "samples": 0,
            "tokens": 0,
            "images": 0,
            "tiles": 0,
            "loss_tokens": 0,
            "max_token_id": -1,
        }
        self._finalized = False

    def add_pack(self, samples: Sequence[EncodedSample]) -> None:
        """Write one pack made of `samples` (in order)."""
        if not samples:
            raise ValueError("a pack needs at least one sample")
        raw_tile_bytes = int(np.prod(self.tile_shape))
        lengths = [len(s) for s in samples]
        for s in samples:
            if not (s.loss_mask.shape[0] == s.position_ids.shape[0] == len(s)):
                raise ValueError(
                    f"sample (dataset {s.dataset_index}, line {s.line}): tokens, loss_mask, position_ids differ in length"
                )
            if payload_count(s.num_tiles, self.tile_format) != len(s.tiles):
                raise ValueError(
                    f"sample (dataset {s.dataset_index}, line {s.line}): num_tiles {list(s.num_tiles)} needs "
                    f"{payload_count(s.num_tiles, self.tile_format)} {self.tile_format} payloads, {len(s.tiles)} given"
                )
            if self.tile_format == "raw" and any(len(p) != raw_tile_bytes for p in s.tiles):
                raise ValueError(
                    f"sample (dataset {s.dataset_index}, line {s.line}): raw tile is not {self.tile_shape}"
                )
        b = self._builders
        b["tokens"].add_document(np.concatenate([s.tokens for s in samples]), lengths)
        b["loss_mask"].add_document(np.concatenate([s.loss_mask for s in samples]), lengths)
        b["position_ids"].add_document(np.concatenate([s.position_ids for s in samples]), lengths)
        b["num_tiles"].add_document(
            np.concatenate([np.asarray(s.num_tiles, dtype=np.int32) for s in samples]),
            [len(s.num_tiles) for s in samples],
        )
        b["source"].add_document(
            np.array([[s.dataset_index, s.line] for s in samples], dtype=np.int64).reshape(-1), [2] * len(samples)
        )
        payloads = [np.frombuffer(p, dtype=np.uint8) for s in samples for p in s.tiles]
        b["tiles"].add_document(
            np.concatenate(payloads) if payloads else np.zeros(0, np.uint8), [p.shape[0] for p in payloads]
        )
        c = self.counts
        c["packs"] += 1
        c["samples"] += len(samples)
        c["tokens"] += sum(lengths)
        c["images"] += sum(len(s.num_tiles) for s in samples)
        c["tiles"] += int(sum(int(np.sum(s.num_tiles)) for s in samples))
        c["loss_tokens"] += int(sum(int(s.loss_mask.sum()) for s in samples))
        c["max_token_id"] = max(c["max_token_id"], *(int(s.tokens.max()) for s in samples if len(s)))

    def finalize(self, extra: dict | None = None, checksums: bool = True) -> dict:
        """Close the files, write the `.idx` files and the manifest; returns the manifest.

        `extra` is merged into the manifest (the preprocessing CLI adds the tokenizer hash,
        template, arguments, datasets, rejects, fill ratio). The manifest holds no timestamps or
        absolute output paths so identical inputs give byte-identical manifests. `checksums=False`
        skips hashing the files (for the preprocessor's temporary set, which is read once).
        """
        from megatron.core.datasets.indexed_dataset import get_idx_path

        if self._finalized:
            raise RuntimeError("finalize() called twice")
        for name, builder in self._builders.items():
            builder.finalize(get_idx_path(field_prefix(self.prefix, name)))
        self._finalized = True
        files = {os.path.basename(p): sha256_file(p) if checksums else None for p in shard_files(self.prefix)}
        manifest = {
            "format": SHARD_FORMAT,
            "tile_format": self.tile_format,
            "tile_shape": self.tile_shape,
            "fields": {n: np.dtype(d).name for n, d in FIELDS.items()},
            "counts": dict(self.counts),
        }
        for k, v in (extra or {}).items():
            if k == "counts":
                manifest["counts"].update(v)
            else:
                manifest[k] = v
        manifest["files"] = files
        with open(manifest_path(self.prefix), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        return manifest


# ------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------


class _Anchor:
    """Exposes an array through `__array_interface__` while holding a reference to its owner."""

    def __init__(self, arr: np.ndarray, owner: object):
        self.__array_interface__ = arr.__array_interface__
        self._arr = arr
        self._owner = owner


def _anchored(arr: np.ndarray, owner: object) -> np.ndarray:
    """A view of `arr` that keeps `owner` alive as long as the view (or any view of it) lives.

    megatron-core's readers close their mmaps explicitly in `__del__`, so a bare view outliving
    its `IndexedDataset` would read unmapped memory (a segfault, not an exception). numpy keeps a
    non-ndarray base object in the chain (it collapses only ndarray bases), so the anchor sticks.
    """
    return np.asarray(_Anchor(arr, owner))


def check_bin_size(bin_path: str, pointers: np.ndarray, lengths: np.ndarray, itemsize: int) -> None:
    """The .bin must end exactly where its index's last sequence ends: a truncated (or overgrown)
    file is refused when the set is opened, not when a pack past the cut is drawn."""
    want = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    got = os.path.getsize(bin_path)
    if got != want:
        raise DataError(
            f"{bin_path}: {got} bytes, its index says {want} "
            f"({'truncated' if got < want else 'longer than indexed'}); re-run tools/preprocess_mm_data.py"
        )


class _Field:
    """One field's IndexedDataset, tolerating an empty `.bin` (e.g. tiles of a text-only set),
    which numpy refuses to mmap."""

    def __init__(self, prefix: str, dtype: type):
        from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

        bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
        for p in (bin_path, idx_path):
            if not os.path.exists(p):
                raise DataError(f"shard file missing: {p}")
        self.dtype = np.dtype(dtype)
        try:
            if os.path.getsize(bin_path) == 0:
                from megatron.core.datasets.indexed_dataset import _IndexReader

                self._ds = None
                index = _IndexReader(idx_path, multimodal=False)
            else:
                self._ds = IndexedDataset(prefix, mmap=True)
                index = self._ds.index
        except (AssertionError, ValueError, struct.error) as e:  # megatron-core's reader names no file
            raise DataError(
                f"{idx_path}: unreadable index ({e or type(e).__name__}): truncated or not a "
                "shard index; re-run tools/preprocess_mm_data.py"
            ) from None
        check_bin_size(bin_path, index.sequence_pointers, index.sequence_lengths, index.dtype_size)
        if index.dtype != self.dtype.type:
            raise DataError(f"{idx_path}: dtype {index.dtype.__name__}, expected {self.dtype.name}")
        self.lengths = index.sequence_lengths  # (n_seq,) int32
        self.pointers = index.sequence_pointers  # (n_seq,) int64 byte offsets
        self.doc_index = index.document_indices  # (n_docs+1,) int64
        self._index = index

    @property
    def num_documents(self) -> int:
        return int(self.doc_index.shape[0] - 1)

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """(flat values of all sequences of document d, their lengths): one contiguous view."""
        a, b = int(self.doc_index[d]), int(self.doc_index[d + 1])
        lengths = _anchored(self.lengths[a:b], self)
        count = int(lengths.sum())
        if count == 0:
            return np.zeros(0, dtype=self.dtype), lengths
        flat = self._ds.bin_reader.read(dtype=self.dtype.type, count=count, offset=int(self.pointers[a]))
        return _anchored(flat, self), lengths


class ShardReader:
    """Random access to the packs of one shard set (all reads are mmap views)."""

    def __init__(self, prefix: str):
        path = manifest_path(prefix)
        if not os.path.exists(path):
            raise DataError(f"no shard manifest at {path} (is {prefix!r} a preprocessed output prefix?)")
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"{path}: unreadable shard manifest ({e})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != SHARD_FORMAT:
            fmt = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise DataError(f"{path}: format {fmt!r}, expected {SHARD_FORMAT!r}")
        counts = self.manifest.get("counts")
        missing = [k for k in ("tile_format", "tile_shape") if k not in self.manifest]
        missing += [] if isinstance(counts, dict) and "packs" in counts else ["counts.packs"]
        if missing:  # a hand-edited manifest: a user error naming it, not a KeyError
            raise DataError(f"{path}: unreadable shard manifest (no {', '.join(missing)})")
        self.prefix = prefix
        self.tile_format: str = self.manifest["tile_format"]
        self.tile_shape: tuple[int, int, int] = tuple(self.manifest["tile_shape"])
        self.datasets: list[dict] = self.manifest.get("datasets", [])
        self._fields = {name: _Field(field_prefix(prefix, name), dtype) for name, dtype in FIELDS.items()}
        n = {name: f.num_documents for name, f in self._fields.items()}
        if len(set(n.values())) != 1:
            raise DataError(f"shard set {prefix}: fields disagree on the number of packs: {n}")
        self._len = n["tokens"]
        if self._len != self.manifest["counts"]["packs"]:
            raise DataError(
                f"shard set {prefix}: {self._len} packs on disk, manifest says {self.manifest['counts']['packs']}"
            )

    def __len__(self) -> int:
        return self._len

    @property
    def pack_lengths(self) -> np.ndarray:
        """(n_packs,) int64 tokens per pack, from the index alone (no data read)."""
        f = self._fields["tokens"]
        cum = np.concatenate([[0], np.cumsum(f.lengths, dtype=np.int64)])
        return cum[f.doc_index[1:]] - cum[f.doc_index[:-1]]

    def read(self, i: int, with_tiles: bool = True) -> RawPack:
        """Pack i as views into the files (tiles left encoded)."""
        if not 0 <= i < self._len:
            raise IndexError(f"pack {i} out of range [0, {self._len}) in {self.prefix}")
        f = self._fields
        tokens, seq_lengths = f["tokens"].document(i)
        loss_mask, _ = f["loss_mask"].document(i)
        position_ids, _ = f["position_ids"].document(i)
        num_tiles, images_per_sample = f["num_tiles"].document(i)
        source, _ = f["source"].document(i)
        tile_bytes, tile_lengths = np.zeros(0, np.uint8), np.zeros(0, np.int32)
        if with_tiles:
            tile_bytes, tile_lengths = f["tiles"].document(i)
            want = payload_count(num_tiles, self.tile_format)
            if tile_lengths.shape[0] != want:
                raise DataError(
                    f"{self.prefix} pack {i}: {tile_lengths.shape[0]} payloads stored, num_tiles says {want}"
                )
        return RawPack(
            tokens=tokens,
            loss_mask=loss_mask,
            position_ids=position_ids,
            seq_lengths=seq_lengths,
            num_tiles=num_tiles,
            images_per_sample=images_per_sample,
            source=source.reshape(-1, 2),
            tile_bytes=tile_bytes,
            tile_lengths=tile_lengths,
        )

    def tiles(self, pack: RawPack) -> np.ndarray:
        """(T, H, W, 3) uint8 tiles of a pack; a zero-copy view for the raw format."""
        h, w, c = self.tile_shape
        if self.tile_format == "raw":
            # The tiles of one pack sit back to back in the file: one reshape, no copy.
            return pack.tile_bytes.reshape(-1, h, w, c)
        return decode_tiles(pack.tile_payloads, self.tile_format, self.tile_shape)

    def encoded_samples(self, i: int) -> list[EncodedSample]:
        """Pack i split back into its sub-samples with tiles still encoded (used to re-pack)."""
        p = self.read(i)
        payloads = p.tile_payloads
        out = []
        tok_off = img_off = tile_off = 0
        for k in range(p.seq_lengths.shape[0]):
            n, m = int(p.seq_lengths[k]), int(p.images_per_sample[k])
            nt = p.num_tiles[img_off : img_off + m]
            t = payload_count(nt, self.tile_format)
            out.append(
                EncodedSample(
                    tokens=p.tokens[tok_off : tok_off + n],
                    loss_mask=p.loss_mask[tok_off : tok_off + n],
                    position_ids=p.position_ids[tok_off : tok_off + n],
                    num_tiles=nt,
                    tiles=payloads[tile_off : tile_off + t],
                    dataset_index=int(p.source[k, 0]),
                    line=int(p.source[k, 1]),
                )
            )
            tok_off, img_off, tile_off = tok_off + n, img_off + m, tile_off + t
        return out

    def expected_sha256(self, name: str) -> str | None:
        """The manifest's sha256 of field file `name` (e.g. "tokens.bin"), also when the set's files
        were renamed to another prefix after preprocessing (the manifest keeps the original names)."""
        files = self.manifest.get("files", {})
        original = next((k[: -len("_tokens.bin")] for k in files if k.endswith("_tokens.bin")), None)
        return files.get(f"{original}_{name}") if original is not None else None

    def verify(self) -> dict[str, str]:
        """Recompute each file's sha256 and compare with the manifest; returns mismatches."""
        bad = {}
        for p in shard_files(self.prefix):
            name = os.path.basename(p)
            want = self.expected_sha256(name[len(os.path.basename(self.prefix)) + 1 :])
            got = sha256_file(p)
            if want != got:
                bad[name] = f"manifest {want}, file {got}"
        return bad


# ------------------------------------------------------------------------------------------------
# Inspection (tools/inspect_shards.py)
# ------------------------------------------------------------------------------------------------

LOSS_OPEN, LOSS_CLOSE = "[[", "]]"


def summary_line(reader: ShardReader) -> str:
    """One line about a shard set: samples, packs, fill, tiles, bytes on disk, rejects (from its manifest)."""
    m, c = reader.manifest, reader.manifest.get("counts", {})
    size = sum(os.path.getsize(p) for p in shard_files(reader.prefix))
    return (
        f"{reader.prefix}: samples {c.get('samples', '?')}, packs {c.get('packs', '?')}, "
        f"fill {100 * float(m.get('fill_ratio', 0)):.2f}%, images {c.get('images', '?')}, "
        f"tiles {c.get('tiles', '?')} ({reader.tile_format}), bytes {size} ({size / 2**20:.1f} MiB), "
        f"rejects {c.get('rejects', '?')} of {c.get('inputs', '?')} inputs"
    )


def pack_json(reader: ShardReader, i: int) -> dict:
    """Pack i as plain JSON types: tokens, loss_mask (0/1), position_ids (floats), cu_seqlens,
    num_tiles (per image, in order), source (per sub-sample: dataset, line, file)."""
    p = reader.read(i, with_tiles=False)
    source = []
    for d, line in p.source.tolist():
        info = reader.datasets[d] if 0 <= d < len(reader.datasets) else {}
        source.append({"dataset": info.get("name", str(d)), "line": int(line), "file": info.get("source_file", "")})
    return {
        "prefix": reader.prefix,
        "sample": i,
        "num_samples": len(reader),
        "tokens": p.tokens.tolist(),
        "loss_mask": p.loss_mask.tolist(),
        "position_ids": [float(x) for x in p.position_ids],
        "cu_seqlens": p.cu_seqlens.tolist(),
        "num_tiles": p.num_tiles.tolist(),
        "images_per_sample": p.images_per_sample.tolist(),
        "source": source,
    }


def _fmt_pos(x: float) -> str:
    return f"{x:g}"


def _render_tokens(j: dict, a: int, b: int, img_k: int, start_id: int, end_id: int, decode) -> tuple[str, int]:
    """Tokens [a, b) of pack_json `j` as text: loss runs in [[ ]], each image block collapsed to
    `<img>×N tiles{...}` (img_k: index of the next image); returns the text and the next img_k."""
    tokens, loss, pos = j["tokens"], j["loss_mask"], j["position_ids"]
    out: list[str] = []
    in_loss = False
    t = a
    while t < b:
        want_loss = bool(loss[t])
        if want_loss != in_loss:
            out.append(LOSS_OPEN if want_loss else LOSS_CLOSE)
            in_loss = want_loss
        if tokens[t] == start_id:
            e = t + 1
            while e < b and tokens[e] != end_id:
                e += 1
            n_tiles = j["num_tiles"][img_k] if img_k < len(j["num_tiles"]) else "?"
            img_k += 1
            n_vis = e - t - 1
            delta = (pos[t + 2] - pos[t + 1]) if n_vis > 1 else 1.0
            end_pos = _fmt_pos(pos[e]) if e < b else "?"
            out.append(
                f"<img>×{n_tiles} tiles{{{n_vis} tokens, <img>@{_fmt_pos(pos[t])} "
                f"visual {_fmt_pos(pos[t + 1])}..{_fmt_pos(pos[e - 1])} δ={delta:g} </img>@{end_pos}}}"
            )
            t = e + 1
            continue
        e = t
        while e < b and bool(loss[e]) == want_loss and tokens[e] != start_id:
            e += 1
        run = tokens[t:e]
        out.append(decode(run) if decode is not None else " ".join(str(x) for x in run) + " ")
        t = e
    if in_loss:
        out.append(LOSS_CLOSE)
    return "".join(out), img_k


def describe_pack(reader: ShardReader, i: int, decode=None, img_ids: tuple[int, int, int] | None = None) -> str:
    """Human-readable view of pack i.

    decode: ids -> text (the tokenizer's decode); None prints token ids instead.
    img_ids: (<img>, </img>, <IMG_CONTEXT>) ids; defaults to those in the manifest.
    Loss-carrying tokens are wrapped in [[ ]]; each image block collapses to `<img>×N tiles` with
    the positions its visual tokens span and the V2PE step.
    """
    m = reader.manifest
    if img_ids is None:
        t = m.get("tokenizer", {})
        img_ids = (t.get("img_start_id", -1), t.get("img_end_id", -1), t.get("img_context_id", -1))
    start_id, end_id, _ = img_ids
    j = pack_json(reader, i)
    tokens, loss, pos = j["tokens"], j["loss_mask"], j["position_ids"]
    cu = j["cu_seqlens"]
    c = m.get("counts", {})
    seq_length = m.get("seq_length")
    n = len(tokens)
    lines = [
        f"shard set {reader.prefix}: {len(reader)} packs, {c.get('samples', '?')} samples, "
        f"{c.get('tokens', '?')} tokens, fill {100 * float(m.get('fill_ratio', 0)):.2f}%"
        + (f" of {seq_length}" if seq_length else "")
        + f", tiles {reader.tile_format} {reader.tile_shape[0]}x{reader.tile_shape[1]}",
        f"pack {i}: {n} tokens"
        + (f" ({100 * n / seq_length:.1f}% of {seq_length})" if seq_length else "")
        + f", {len(cu) - 1} sub-samples, {len(j['num_tiles'])} images / {sum(j['num_tiles'])} tiles, "
        f"{sum(loss)} loss tokens",
        f"{LOSS_OPEN} {LOSS_CLOSE} marks tokens that carry loss",
    ]
    img_k = 0
    for k in range(len(cu) - 1):
        a, b = cu[k], cu[k + 1]
        src = j["source"][k]
        where = f"{src['file']}:{src['line']}" if src["file"] else f"line {src['line']}"
        lines.append("")
        lines.append(
            f"── sub-sample {k}: dataset {src['dataset']!r}, {where}, tokens [{a}, {b}), "
            f"positions {_fmt_pos(pos[a])} → {_fmt_pos(pos[b - 1])}"
        )
        text, img_k = _render_tokens(j, a, b, img_k, start_id, end_id, decode)
        lines.append(text)
    return "\n".join(lines)
