"""Loader: DP split, blending, exact resume, seeded augmentation, collate."""

import json

import numpy as np
import pytest
import torch

from internvl_mcore.data.image import JPEG_QUALITIES, jpeg_recompress, normalize_tiles
from internvl_mcore.data.loader import PackedDataLoader, collate, parse_data_path
from internvl_mcore.data.source_images import Images, normalize_pixels
from internvl_mcore.data.sample import PackedSample
from internvl_mcore.data.shards import EncodedSample, ShardReader, ShardWriter, encode_tiles
from internvl_mcore.errors import DataError

TILE = (16, 16, 3)


def write_set(prefix, set_id, n_packs, augment=False, fmt="png"):
    """Packs whose first token encodes (set_id, pack index) so a returned sample names its pack."""
    rng = np.random.default_rng(set_id)
    w = ShardWriter(prefix, tile_format=fmt, tile_shape=TILE)
    for i in range(n_packs):
        samples = []
        for k in range(2):
            n = 6 + k
            tokens = np.full(n, 7, np.int32)
            tokens[0] = set_id * 100000 + i
            tiles = rng.integers(0, 256, (k + 1, *TILE), dtype=np.uint8)
            samples.append(
                EncodedSample(
                    tokens,
                    np.array([0, 0, 1, 1, 1, 0, 1][:n], np.uint8),
                    np.arange(n, dtype=np.float32),
                    np.array([k + 1], np.int32),
                    encode_tiles(tiles, fmt),
                    0,
                    10 * i + k + 1,
                )
            )
        w.add_pack(samples)
    w.finalize(extra={"datasets": [{"name": f"set{set_id}", "source_file": "x.jsonl", "data_augment": augment}]})
    return prefix


def pack_id(sample: PackedSample) -> tuple[int, int]:
    t = int(sample.tokens[0])
    return t // 100000, t % 100000


@pytest.fixture
def two_sets(tmp_path):
    a = write_set(str(tmp_path / "a"), 1, 10)
    b = write_set(str(tmp_path / "b"), 2, 7, augment=True)
    return a, b


def take(loader, n):
    return [next(loader) for _ in range(n)]


# ----------------------------------------------------------------------------- --data-path


def test_parse_data_path_forms(two_sets):
    a, b = two_sets
    assert parse_data_path([a]) == [(1.0, a)]
    assert parse_data_path(["0.7", a, "0.3", b]) == [(0.7, a), (0.3, b)]
    assert parse_data_path(["3", a, "1", b]) == [(0.75, a), (0.25, b)]
    # unweighted: proportional to packs (10 and 7), as Megatron concatenates
    got = parse_data_path([a, b])
    assert got[0][1] == a and got[0][0] == pytest.approx(10 / 17)
    for bad in (["0.5", a, "0.5"], ["x", a, "0.5", b], ["-1", a, "1", b], ["0", a, "0", b], [a, "0.5"]):
        with pytest.raises(DataError):
            parse_data_path(bad)
    with pytest.raises(DataError, match="nope"):
        parse_data_path([a, "nope"])


# ----------------------------------------------------------------------------- stream


def test_each_epoch_visits_every_pack_once(two_sets):
    a, _ = two_sets
    ld = PackedDataLoader([a], seed=3)
    ids = [pack_id(s)[1] for s in take(ld, 30)]
    for e in range(3):
        assert sorted(ids[10 * e : 10 * e + 10]) == list(range(10))
    assert ids[:10] != ids[10:20]  # reshuffled per epoch
    assert [pack_id(s)[1] for s in take(PackedDataLoader([a], seed=3, shuffle=False), 12)] == list(range(10)) + [0, 1]


def test_blend_proportions(two_sets):
    a, b = two_sets
    ld = PackedDataLoader(["0.7", a, "0.3", b], seed=0)
    draws = ld.peek_draws(1000)
    # At every prefix of the stream each dataset is within one draw of its weight's share.
    counts = np.zeros(2)
    for g, (_, d, _) in enumerate(draws):
        counts[d] += 1
        assert np.all(np.abs(counts - np.array([0.7, 0.3]) * (g + 1)) <= 1.0)
    sets = [pack_id(s)[0] for s in take(ld, 100)]
    assert sets.count(1) == 70 and sets.count(2) == 30


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_split_disjoint_and_covering(two_sets, dp_size):
    a, b = two_sets
    single = PackedDataLoader(["0.6", a, "0.4", b], seed=1).peek_draws(12 * dp_size)
    per_rank = [
        PackedDataLoader(["0.6", a, "0.4", b], seed=1, dp_rank=r, dp_size=dp_size).peek_draws(12)
        for r in range(dp_size)
    ]
    g_sets = [set(x[0] for x in draws) for draws in per_rank]
    assert all(not (g_sets[i] & g_sets[j]) for i in range(dp_size) for j in range(i + 1, dp_size))
    assert set().union(*g_sets) == set(range(12 * dp_size))
    # Rank r's s-th pack is the single-rank stream's (r + s*dp)-th pack.
    for r, draws in enumerate(per_rank):
        for s, draw in enumerate(draws):
            assert draw == single[r + s * dp_size]
    # and the data actually loaded agrees with the plan
    ld = PackedDataLoader(["0.6", a, "0.4", b], seed=1, dp_rank=1, dp_size=dp_size)
    for s, (g, d, p) in zip(take(ld, 5), per_rank[1]):
        assert pack_id(s) == (d + 1, p)


def test_packed_sample_contents(two_sets):
    a, _ = two_sets
    r = ShardReader(a)
    ld = PackedDataLoader([a], seed=0, shuffle=False)
    s = next(ld)
    raw = r.read(0)
    assert s.tokens.dtype == np.int64 and np.array_equal(s.tokens, raw.tokens)
    assert s.loss_mask.dtype == np.float32 and np.array_equal(s.loss_mask, raw.loss_mask)
    assert s.position_ids.dtype == np.float32 and s.cu_seqlens.tolist() == [0, 6, 13]
    assert s.num_tiles.tolist() == [1, 2]
    assert s.source == [{"dataset": "set1", "line": 1}, {"dataset": "set1", "line": 2}]
    # the stored uint8 tiles as they are (not augmented: set a has no data_augment); the model normalizes
    assert s.tiles.dtype == np.uint8 and np.array_equal(s.tiles, r.tiles(raw))


# ----------------------------------------------------------------------------- resume


def samples_equal(x: PackedSample, y: PackedSample) -> bool:
    return (
        np.array_equal(x.tokens, y.tokens)
        and np.array_equal(x.position_ids, y.position_ids)
        and np.array_equal(x.tiles, y.tiles)
        and x.source == y.source
    )


@pytest.mark.parametrize("workers,resume_workers", [(0, 2), (2, 1), (1, 0)])
def test_resume_continues_exactly_without_rereading(two_sets, workers, resume_workers, monkeypatch):
    """Saved with one number of loader workers, resumed with another: the same packs, same pixels."""
    a, b = two_sets
    args = (["0.5", a, "0.5", b],)
    first = PackedDataLoader(*args, seed=5, dp_rank=1, dp_size=2, num_workers=workers)
    take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    expected = take(first, 9)
    first.close()  # its prefetching workers must not show up in the read count below

    reads = []
    orig = ShardReader.read
    monkeypatch.setattr(ShardReader, "read", lambda self, i, **kw: reads.append(i) or orig(self, i, **kw))
    resumed = PackedDataLoader(*args, seed=5, dp_rank=1, dp_size=2, num_workers=resume_workers)
    resumed.load_state_dict(state)
    assert reads == []  # restoring reads nothing
    got = take(resumed, 9)
    if resume_workers == 0:
        assert len(reads) == 9  # exactly the packs returned, none of the 26 skipped
    assert all(samples_equal(x, y) for x, y in zip(expected, got))
    resumed.close()


@pytest.mark.parametrize("old_dp,new_dp", [(2, 1), (2, 4), (1, 2), (3, 2)])
def test_resume_into_another_data_parallel_size(two_sets, old_dp, new_dp):
    """Saved at one data-parallel size after 6 global batches of 12 packs, resumed at another: the new
    ranks continue the same stream, so every later global batch holds the same packs as uninterrupted."""
    blend = ["0.6", two_sets[0], "0.4", two_sets[1]]
    old = [PackedDataLoader(blend, seed=3, dp_rank=r, dp_size=old_dp) for r in range(old_dp)]
    for ld in old:
        take(ld, 6 * 12 // old_dp)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in old]
    stream = PackedDataLoader(blend, seed=3).peek_draws(6 * 12 + 24)
    new = [PackedDataLoader(blend, seed=3, dp_rank=r, dp_size=new_dp) for r in range(new_dp)]
    for ld in new:
        ld.load_resharded_state(states)
    got = sorted(x for ld in new for x in ld.peek_draws(24 // new_dp))
    assert got == stream[6 * 12 :]
    if (6 * 12) % 5:  # a position the new ranks cannot share evenly is refused, naming it
        with pytest.raises(DataError, match="does not split over 5"):
            PackedDataLoader(blend, seed=3, dp_rank=0, dp_size=5).load_resharded_state(states)
    with pytest.raises(DataError, match="seed"):
        PackedDataLoader(blend, seed=4, dp_rank=0, dp_size=new_dp).load_resharded_state(states)


def test_resume_refuses_other_configuration(two_sets):
    a, b = two_sets
    st = PackedDataLoader([a], seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        PackedDataLoader([a], seed=2).load_state_dict(st)
    with pytest.raises(DataError, match="dp_size"):
        PackedDataLoader([a], seed=1, dp_rank=0, dp_size=2).load_state_dict(st)
    with pytest.raises(DataError, match="data"):
        PackedDataLoader([b], seed=1).load_state_dict(st)


def test_augmentation_seeded_and_reproducible_after_resume(two_sets):
    a, b = two_sets
    plain = PackedDataLoader([b], seed=0, augment=False, shuffle=False)
    aug = PackedDataLoader([b], seed=0, shuffle=False)
    p0, a0 = next(plain), next(aug)
    assert np.array_equal(p0.tokens, a0.tokens)
    assert not np.array_equal(p0.tiles, a0.tiles)  # JPEG re-compression changed the pixels
    # ... and each tile is the stored tile re-compressed at some quality InternVL draws from.
    stored = ShardReader(b).tiles(ShardReader(b).read(0))
    for t in range(len(stored)):
        assert any(np.array_equal(jpeg_recompress(stored[t : t + 1], q), a0.tiles[t : t + 1]) for q in JPEG_QUALITIES)
    # Epoch 2 revisits pack 0 with a different draw.
    later = take(aug, 7)[-1]
    assert pack_id(later) == pack_id(a0) and not np.array_equal(later.tiles, a0.tiles)
    # Resume mid-stream: the same augmentation again.
    ld = PackedDataLoader([b], seed=0)
    take(ld, 3)
    st = ld.state_dict()
    want = take(ld, 3)
    again = PackedDataLoader([b], seed=0)
    again.load_state_dict(st)
    assert all(samples_equal(x, y) for x, y in zip(want, take(again, 3)))
    # Non-augmented sets are never touched.
    s = next(PackedDataLoader([a], seed=0, shuffle=False))
    raw = ShardReader(a)
    assert np.array_equal(s.tiles, raw.tiles(raw.read(0)))


def test_empty_weighted_set_refused(tmp_path):
    w = ShardWriter(str(tmp_path / "e"), tile_format="raw", tile_shape=TILE)
    w.finalize()
    with pytest.raises(DataError, match="no packs"):
        PackedDataLoader([str(tmp_path / "e")])


# ----------------------------------------------------------------------------- collate


def make_packed(tokens, loss_mask, cu, n_tiles):
    n = len(tokens)
    return PackedSample(
        tokens=np.array(tokens, np.int64),
        loss_mask=np.array(loss_mask, np.float32),
        position_ids=np.arange(n, dtype=np.float32),
        cu_seqlens=np.array(cu, np.int32),
        tiles=np.ones((sum(n_tiles), 4, 4, 3), np.uint8),
        num_tiles=np.array(n_tiles, np.int32),
    )


def test_collate_shapes_labels_and_segments():
    s1 = make_packed([10, 11, 12, 13, 20, 21, 22], [0, 0, 1, 1, 0, 1, 1], [0, 4, 7], [2])
    s2 = make_packed([30, 31, 32, 33, 34, 35, 36, 37], [0, 1, 1, 1, 1, 1, 1, 1], [0, 8], [1, 3])
    b = collate([s1, s2], seq_length=8, pad_id=0)
    assert b["tokens"].shape == (2, 8) and b["tokens"].dtype == torch.int64
    assert b["tokens"][0].tolist() == [10, 11, 12, 13, 20, 21, 22, 0]
    # label of i = token i+1 where token i+1 carries loss and is in the same sub-sample (else the pad id,
    # weight 0: no -100 to turn back into a valid id)
    assert b["loss_weight"].tolist() == [[0, 1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]]
    assert b["loss_weight"].dtype == torch.float32
    assert b["labels"][0].tolist() == [0, 12, 13, 0, 21, 22, 0, 0]
    assert b["labels"][1].tolist() == [31, 32, 33, 34, 35, 36, 37, 0]
    assert b["cu_seqlens"].tolist() == [0, 4, 7, 8, 16] and b["cu_seqlens"].dtype == torch.int32
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]  # padding restarts
    assert b["images"].tiles.shape == (6, 4, 4, 3) and b["images"].tiles.dtype == torch.uint8
    assert b["num_tiles"].tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="seq_length"):
        collate([s2], seq_length=7, pad_id=0)


def test_device_normalization_matches_cpu_float_path():
    """The model's on-device normalization of uint8 tiles equals the CPU float path (InternVL's
    ToTensor + Normalize, data/image.py normalize_tiles) within 1e-6, on every available device."""
    tiles = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    tiles[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [128, 7, 250]]
    want = torch.from_numpy(normalize_tiles(tiles))  # (T, 3, H, W) float32
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = normalize_pixels(torch.from_numpy(tiles).to(device)).cpu()
        assert got.shape == (3, 3, 20, 24) and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-6, device
    floats = torch.randn(2, 3, 4, 4)
    assert Images(normalized=floats).pixel_values() is floats  # float tiles are already normalized
    assert normalize_pixels(torch.zeros(0, 4, 4, 3, dtype=torch.uint8)).shape == (0, 3, 4, 4)


def test_worker_processes_give_the_same_stream(two_sets):
    a, b = two_sets
    sync = PackedDataLoader(["0.5", a, "0.5", b], seed=2)
    workers = PackedDataLoader(["0.5", a, "0.5", b], seed=2, num_workers=2)
    for x, y in zip(take(sync, 8), take(workers, 8)):
        assert samples_equal(x, y)
    assert workers.state_dict() == sync.state_dict()  # prefetched packs are not counted
    workers.close()
