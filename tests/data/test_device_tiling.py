"""--image-tiling device: the loader decodes only, `SourceImages.tiles()` cuts the tiles on the model's
device; the tiles equal the loader's byte for byte on every kind of pack, in workers, after resume."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from internvl_mcore.data import source_images
from internvl_mcore.data.loader import PackedDataLoader, collate
from internvl_mcore.data.resample import DEVICE_COEFFICIENTS, PASS_ORDERS, pass_order
from internvl_mcore.data import resample
from internvl_mcore.data.sample import DecodedImages
from internvl_mcore.data.source_images import Images, SourceImages, cut_tiles_on_device, normalize_pixels
from internvl_mcore.training.data import resolve_image_tiling
from internvl_mcore.errors import DataError
from tests.fixtures import make_dataset_fixture, make_tokenizer_dir, write_image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_mm_data  # noqa: E402


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """The front end's fixture (single images with data_augment, multi-image caps, frame folder, GIF and
    video frames, parquet bytes, text) as "source" with and without thumbnails and as stored "raw" tiles;
    and a preference (MMPR) set."""
    root = tmp_path_factory.mktemp("dev")
    fx = make_dataset_fixture(str(root / "data"))
    tok = make_tokenizer_dir(str(root / "tok"))
    common = [
        "--meta",
        fx.meta_path,
        "--tokenizer",
        tok,
        "--seq-length",
        "600",
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
        "--workers",
        "1",
    ]
    out = {}
    for name, extra in (("source", []), ("nothumb", ["--no-thumbnail"]), ("raw", ["--tile-format", "raw"])):
        out[name] = str(root / name / "data")
        assert preprocess_mm_data.main(common + ["--output-prefix", out[name], *extra]) == 0
    for k in range(3):
        write_image(str(root / f"img{k}.png"), size=(90 + 40 * k, 64), seed=k)
    ann = root / "mmpr.jsonl"
    ann.write_text(
        "\n".join(
            json.dumps(
                {
                    "image": f"img{i % 3}.png",
                    "question": f"<image>\nWhat is {i}?",
                    "chosen": "a cat " * (1 + i % 3),
                    "rejected": "a dog",
                }
            )
            for i in range(8)
        )
        + "\n"
    )
    meta = root / "pref.json"
    meta.write_text(json.dumps({"mmpr": {"root": str(root), "annotation": str(ann), "max_dynamic_patch": 6}}))
    out["pref"] = str(root / "pref" / "pref")
    assert (
        preprocess_mm_data.main(
            [
                "--meta",
                str(meta),
                "--tokenizer",
                tok,
                "--output-prefix",
                out["pref"],
                "--seq-length",
                "600",
                "--image-size",
                "56",
                "--num-image-token",
                "4",
                "--preference",
                "--max-reject-ratio",
                "1",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def batches(prefixes, tiling, n, workers=0, seed=3, **kw):
    loader = PackedDataLoader(prefixes, seed=seed, image_tiling=tiling, num_workers=workers, **kw)
    try:
        return [collate([next(loader), next(loader)], 600, 0) for _ in range(n)]
    finally:
        loader.close()


def assert_same_tiles(loader_batches, device_batches):
    for k, (a, b) in enumerate(zip(loader_batches, device_batches)):
        assert b["images"].source is not None and b["images"].num_tiles == a["images"].num_tiles
        assert torch.equal(b["images"].source.tiles(), a["images"].tiles), f"batch {k}"
        assert torch.equal(b["images"].pixel_values(), a["images"].pixel_values()), f"batch {k}"
        for key in ("tokens", "num_tiles", "cu_seqlens", "pairs"):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["source", "nothumb", "raw"])
def test_device_tiles_equal_loader_tiles(shard_sets, name):
    """Mixed packs (all fixture kinds, augmented or not, blended with the other sets), 0 and 2 workers."""
    blend = [shard_sets[name], shard_sets["source" if name != "source" else "raw"]]
    want = batches(blend, "loader", 6)
    assert sum(b["images"].num_tiles for b in want) > 20
    for workers in (0, 2):
        assert_same_tiles(want, batches(blend, "device", 6, workers))
    assert_same_tiles(batches(blend, "loader", 4, augment=False), batches(blend, "device", 4, augment=False))


def test_what_goes_in_as_images_and_what_as_tiles(shard_sets):
    """Source images keep their grid (thumbnails on/off as stored); augmented images, frames of video files
    and stored-tile formats come as 1 x 1 images of one tile; the device skips their (identity) resize."""
    grids = set()
    for name in ("source", "nothumb"):
        loader = PackedDataLoader([shard_sets[name]], seed=1, image_tiling="device", augment=False)
        for _ in range(len(loader.readers[0])):
            t = next(loader).images.table
            grids |= {(int(c), int(r), int(th)) for c, r, th in t[:, 2:5]}
            if name == "nothumb":
                assert not t[:, 4].any()
    assert any(c * r > 1 and th for c, r, th in grids) and any(c * r > 1 and not th for c, r, th in grids)
    raw = next(PackedDataLoader([shard_sets["raw"]], seed=1, image_tiling="device"))
    assert raw.tiles.shape[0] == 0 and (raw.images.table[:, 2:5] == [1, 1, 0]).all()
    calls = []
    orig = source_images.resize_rgb
    try:
        source_images.resize_rgb = lambda *a: calls.append(a) or orig(*a)
        tiles = SourceImages.from_numpy(raw.images, 56).tiles()
    finally:
        source_images.resize_rgb = orig
    assert calls == [] and tiles.shape[0] == raw.num_tiles.sum()


def test_preference_pairs_share_their_pixels(shard_sets):
    """The rejected sequence's table rows point at the chosen one's pixels: no second copy, same tiles."""
    want = batches([shard_sets["pref"]], "loader", 3)
    got = batches([shard_sets["pref"]], "device", 3)
    assert_same_tiles(want, got)
    table = got[0]["images"].source.table
    offsets = table[:, 5].tolist()
    assert len(set(offsets)) < len(offsets)  # shared
    sizes = {o: int(h * w * 3) for h, w, *_, o in table.tolist()}
    assert got[0]["images"].source.pixels.numel() == sum(sizes.values())


@pytest.mark.parametrize("workers,resume_workers", [(0, 2), (2, 1), (1, 0)])
def test_resume_across_worker_counts(shard_sets, workers, resume_workers):
    blend = ["0.5", shard_sets["source"], "0.5", shard_sets["raw"]]
    first = PackedDataLoader(blend, seed=5, dp_rank=1, dp_size=2, num_workers=workers, image_tiling="device")
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [next(first) for _ in range(4)]
    first.close()
    resumed = PackedDataLoader(blend, seed=5, dp_rank=1, dp_size=2, num_workers=resume_workers, image_tiling="device")
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(4)]
    resumed.close()
    plain = PackedDataLoader(blend, seed=5, dp_rank=1, dp_size=2, image_tiling="loader")
    plain.load_state_dict(state)
    for x, y in zip(expected, got):
        assert np.array_equal(x.tokens, y.tokens)
        assert np.array_equal(x.images.pixels, y.images.pixels) and np.array_equal(x.images.table, y.images.table)
        assert np.array_equal(source_images.numpy_tiles(y.images, 56), next(plain).tiles)
    assert set(state) == set(plain.state_dict())  # nothing about the tiling in the resume state


class _Devices(TorchFunctionMode):
    """Every tensor a torch call takes or returns, except `allowed` (the host table)."""

    def __init__(self, allowed):
        super().__init__()
        self.allowed, self.seen = allowed, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]:
            if isinstance(x, torch.Tensor) and x is not self.allowed:
                self.seen.append((getattr(func, "__name__", str(func)), x.device.type))
        return out


def test_tiling_runs_on_the_images_device():
    """On the meta device (the stand-in for a GPU): every tensor the tiling makes, coefficient and index
    tensors included, is on the images' device; only the table is read on the host."""
    table = torch.tensor(
        [[80, 100, 2, 1, 1, 0], [56, 56, 1, 1, 0, 100 * 80 * 3], [300, 20, 1, 3, 1, 100 * 80 * 3 + 56 * 56 * 3]]
    )
    pixels = torch.empty(100 * 80 * 3 + 56 * 56 * 3 + 300 * 20 * 3, dtype=torch.uint8, device="meta")
    DEVICE_COEFFICIENTS.clear()
    pass_order()  # its probe resizes on the CPU once per process
    with _Devices(table) as mode:
        tiles = SourceImages(pixels, table, 56).tiles()
    assert tiles.device.type == "meta" and tuple(tiles.shape) == (3 + 1 + 4, 56, 56, 3)
    assert mode.seen and {d for _, d in mode.seen} == {"meta"}, sorted(set(mode.seen))
    assert all(t.device.type == "meta" for pair in DEVICE_COEFFICIENTS._cache.values() for t in pair)


def test_source_images_quacks_like_the_tiles_tensor():
    images = DecodedImages.from_tiles(np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3))
    pv = SourceImages.from_numpy(images, 8)
    assert pv.shape == (2, 8, 8, 3) and pv.shape[0] == 2 and pv.dtype == torch.uint8
    moved = pv.to("meta", non_blocking=True)
    assert moved.device.type == "meta" and moved.table is pv.table
    assert pv.tiles() is pv.tiles()  # computed once (MPO's reference forward reuses them)
    assert torch.equal(cut_tiles_on_device(pv.pixels, pv.table, 8), torch.from_numpy(images.pixels).view(2, 8, 8, 3))


def test_images_give_one_model_input_whatever_the_tiling():
    """The batch's one image type: each form the data makes (host tiles, source images, mock data's
    normalized floats) gives the same vision input through `pixel_values()`; the collate picks the form."""
    tiles = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    floats = normalize_pixels(tiles)
    source = SourceImages.from_numpy(DecodedImages.from_tiles(tiles.numpy()), 8)
    forms = [Images(tiles=tiles), Images(source=source), Images(normalized=floats)]
    for im in forms:
        assert im.num_tiles == 3 and torch.equal(im.pixel_values(), floats)
        moved = im.pin_memory() if torch.cuda.is_available() else im.to("cpu", non_blocking=True)
        assert type(moved) is Images and moved is not im and torch.equal(moved.pixel_values(), floats)
    for wrong in ({}, {"tiles": tiles, "normalized": floats}):
        with pytest.raises(TypeError, match="exactly one"):
            Images(**wrong)

    def pack(t, images=None):
        return type("Pack", (), {"tiles": t, "images": images})()

    assert Images.of_packs([pack(tiles.numpy()), pack(tiles.numpy())]).tiles.shape == (6, 8, 8, 3)
    assert Images.of_packs([pack(floats)]).normalized is not None  # mock packs
    mixed = Images.of_packs([pack(tiles.numpy()), pack(tiles.numpy(), DecodedImages.from_tiles(tiles.numpy()))])
    assert mixed.num_tiles == 6 and torch.equal(mixed.pixel_values(), torch.cat([floats, floats]))


def test_resolve_image_tiling(monkeypatch):
    assert resolve_image_tiling("auto", "cpu") == "loader" and resolve_image_tiling("auto", "cuda") == "device"
    assert resolve_image_tiling("device", "cpu") == "device" and resolve_image_tiling("loader", "cuda") == "loader"
    monkeypatch.setattr(resample, "PASS_ORDERS", tuple(o for o in PASS_ORDERS if o != pass_order()))
    pass_order.cache_clear()
    try:  # a Pillow whose arithmetic we do not reproduce: auto falls back to the loader, device refuses
        assert resolve_image_tiling("auto", "cuda") == "loader"
        with pytest.raises(DataError, match="--image-tiling device"):
            resolve_image_tiling("device", "cuda")
    finally:
        pass_order.cache_clear()
