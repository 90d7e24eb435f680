"""Shard writer/reader round trip on megatron-core's indexed dataset format."""

import json
import os

import numpy as np
import pytest

from internvl_mcore.data.shards import (
    FIELDS,
    TILE_CODECS,
    EncodedSample,
    ShardReader,
    ShardWriter,
    decode_tiles,
    encode_tiles,
    manifest_path,
    max_token_id,
    shard_files,
)
from internvl_mcore.errors import DataError

TILE = (28, 28, 3)


def smooth_tiles(rng, n):
    """Photo-like tiles (smooth gradients + mild noise) so lossy codecs stay close."""
    y, x = np.mgrid[0 : TILE[0], 0 : TILE[1]]
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 4, 3)
        base = np.stack([np.sin(a * x / 9 + c), np.cos(b * y / 9), np.sin((x + y) / 11 + a)], -1)
        out.append(np.clip(127 + 100 * base + rng.normal(0, 2, TILE), 0, 255).astype(np.uint8))
    return np.stack(out) if out else np.zeros((0, *TILE), np.uint8)


def random_sample(rng, dataset_index, line, fmt):
    n_images = int(rng.integers(0, 3))
    num_tiles = rng.integers(1, 4, n_images).astype(np.int32)
    s = int(rng.integers(5, 60))
    tiles = smooth_tiles(rng, int(num_tiles.sum()))
    return (
        EncodedSample(
            tokens=rng.integers(0, 150000, s).astype(np.int32),
            loss_mask=rng.integers(0, 2, s).astype(np.uint8),
            position_ids=np.cumsum(rng.choice([0.25, 1.0], s)).astype(np.float32),
            num_tiles=num_tiles,
            tiles=encode_tiles(tiles, fmt),
            dataset_index=dataset_index,
            line=line,
        ),
        tiles,
    )


def write_random(prefix, fmt, n_packs=6, seed=0):
    rng = np.random.default_rng(seed)
    w = ShardWriter(prefix, tile_format=fmt, tile_shape=TILE)
    packs = []
    line = 1
    for _ in range(n_packs):
        pack = []
        for _ in range(int(rng.integers(1, 4))):
            pack.append(random_sample(rng, int(rng.integers(0, 2)), line, fmt))
            line += 1
        w.add_pack([s for s, _ in pack])
        packs.append(pack)
    manifest = w.finalize(extra={"datasets": [{"name": "a"}, {"name": "b"}], "counts": {"rejects": 3}})
    return packs, manifest


@pytest.mark.parametrize("fmt", TILE_CODECS)
def test_round_trip(tmp_path, fmt):
    prefix = str(tmp_path / "out")
    packs, manifest = write_random(prefix, fmt)
    r = ShardReader(prefix)
    assert len(r) == len(packs)
    assert r.tile_format == fmt and r.tile_shape == TILE
    for i, pack in enumerate(packs):
        p = r.read(i)
        samples = [s for s, _ in pack]
        np.testing.assert_array_equal(p.tokens, np.concatenate([s.tokens for s in samples]))
        np.testing.assert_array_equal(p.loss_mask, np.concatenate([s.loss_mask for s in samples]))
        np.testing.assert_array_equal(p.position_ids, np.concatenate([s.position_ids for s in samples]))
        np.testing.assert_array_equal(p.cu_seqlens, np.cumsum([0] + [len(s) for s in samples]))
        np.testing.assert_array_equal(p.num_tiles, np.concatenate([s.num_tiles for s in samples]))
        np.testing.assert_array_equal(p.images_per_sample, [len(s.num_tiles) for s in samples])
        assert p.source.tolist() == [[s.dataset_index, s.line] for s in samples]
        want_tiles = np.concatenate([t for _, t in pack])
        got = r.tiles(p)
        assert got.shape == want_tiles.shape and got.dtype == np.uint8
        if fmt == "jpeg":  # lossy but close on smooth content
            assert np.abs(got.astype(int) - want_tiles).mean() < 3
        else:
            np.testing.assert_array_equal(got, want_tiles)
        # Split back into sub-samples (used when re-packing) reproduces the inputs.
        for a, b in zip(r.encoded_samples(i), samples):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            assert [bytes(t) for t in a.tiles] == list(b.tiles)
            assert (a.dataset_index, a.line) == (b.dataset_index, b.line)
    assert r.verify() == {}
    assert manifest["counts"]["rejects"] == 3
    assert manifest["counts"]["samples"] == sum(len(p) for p in packs)
    # the largest token id: recorded, and found again from the tokens file for a manifest without it
    top = max(int(s.tokens.max()) for pack in packs for s, _ in pack if len(s))
    assert manifest["counts"]["max_token_id"] == top == max_token_id(prefix, {"counts": {}})
    assert manifest["counts"]["tiles"] == sum(int(s.num_tiles.sum()) for p in packs for s, _ in p)
    assert np.array_equal(r.pack_lengths, [sum(len(s) for s, _ in p) for p in packs])


def test_files_are_megatron_indexed_datasets(tmp_path):
    """Each field is readable by megatron-core's own IndexedDataset: documents = packs."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path / "out")
    packs, _ = write_random(prefix, "raw")
    ds = IndexedDataset(prefix + "_tokens")
    assert len(ds.document_indices) - 1 == len(packs)
    assert len(ds) == sum(len(p) for p in packs)  # one sequence per sub-sample
    np.testing.assert_array_equal(ds[0], packs[0][0][0].tokens)
    assert ds.index.dtype == FIELDS["tokens"]


def test_raw_tiles_are_zero_copy_views(tmp_path):
    prefix = str(tmp_path / "out")
    packs, _ = write_random(prefix, "raw", seed=3)
    r = ShardReader(prefix)
    i = next(i for i, p in enumerate(packs) if sum(int(s.num_tiles.sum()) for s, _ in p))
    t = r.tiles(r.read(i))
    assert not t.flags.owndata and not t.flags.writeable


def test_text_only_set_has_empty_tile_file(tmp_path):
    prefix = str(tmp_path / "txt")
    w = ShardWriter(prefix, tile_format="png", tile_shape=TILE)
    s = EncodedSample(
        np.arange(4, dtype=np.int32),
        np.ones(4, np.uint8),
        np.arange(4, dtype=np.float32),
        np.zeros(0, np.int32),
        [],
        0,
        1,
    )
    w.add_pack([s, s])
    w.finalize()
    assert os.path.getsize(prefix + "_tiles.bin") == 0
    r = ShardReader(prefix)
    p = r.read(0)
    assert r.tiles(p).shape == (0, *TILE)
    assert p.num_tiles.size == 0 and p.cu_seqlens.tolist() == [0, 4, 8]


def test_manifest_checksums_catch_corruption(tmp_path):
    prefix = str(tmp_path / "out")
    write_random(prefix, "png")
    with open(prefix + "_tokens.bin", "r+b") as f:
        f.seek(3)
        f.write(b"\xff")
    assert list(ShardReader(prefix).verify()) == ["out_tokens.bin"]
    m = json.load(open(manifest_path(prefix)))
    assert set(m["files"]) == {os.path.basename(p) for p in shard_files(prefix)}


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="manifest"):
        ShardReader(str(tmp_path / "nothing"))
    prefix = str(tmp_path / "out")
    write_random(prefix, "png")
    os.remove(prefix + "_tiles.idx")
    with pytest.raises(DataError, match="_tiles.idx"):
        ShardReader(prefix)


def test_writer_validates_samples(tmp_path):
    w = ShardWriter(str(tmp_path / "bad"), tile_format="raw", tile_shape=TILE)
    good = EncodedSample(
        np.arange(3, dtype=np.int32),
        np.ones(3, np.uint8),
        np.arange(3, dtype=np.float32),
        np.array([2], np.int32),
        [b"x" * int(np.prod(TILE))],
        0,
        1,
    )
    with pytest.raises(ValueError, match="num_tiles"):
        w.add_pack([good])
    short = EncodedSample(
        np.arange(3, dtype=np.int32),
        np.ones(2, np.uint8),
        np.arange(3, dtype=np.float32),
        np.zeros(0, np.int32),
        [],
        0,
        5,
    )
    with pytest.raises(ValueError, match="line 5"):
        w.add_pack([short])


def test_codecs_round_trip_lossless():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, *TILE), dtype=np.uint8)  # noise: worst case for codecs
    for fmt in ("raw", "png", "webp"):
        np.testing.assert_array_equal(decode_tiles(encode_tiles(tiles, fmt), fmt, TILE), tiles)
    with pytest.raises(ValueError):
        encode_tiles(tiles.astype(np.float32), "png")


def test_views_outlive_their_reader(tmp_path):
    """megatron-core closes its mmaps when the reader is collected; our views must keep it alive."""
    import gc

    prefix = str(tmp_path / "out")
    packs, _ = write_random(prefix, "raw", seed=5)
    tokens = ShardReader(prefix).read(0).tokens  # the reader is garbage right away
    raw = ShardReader(prefix).read(1)
    gc.collect()
    np.testing.assert_array_equal(tokens, np.concatenate([s.tokens for s, _ in packs[0]]))
    want_tiles = [np.frombuffer(t, np.uint8) for s, _ in packs[1] for t in s.tiles] or [np.zeros(0, np.uint8)]
    np.testing.assert_array_equal(raw.tile_bytes, np.concatenate(want_tiles))
