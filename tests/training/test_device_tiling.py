"""--image-tiling device (the loader decodes, the first pipeline stage tiles on its device with
data/resample.py) trains bit-identically to --image-tiling loader: the same tiles, so the same losses.
Every run is a job of the session's reused worlds (tests/conftest.py `pretrain`)."""

import json

from tests.conftest import DIGITS_ITERS, digits_run_args, pretrain

MPO_ITERS = 4
PP2_ITERS = 5  # tests/training/test_layouts_on_shards.py LAYOUT_ITERS


def _losses(out, nproc, args):
    pretrain(nproc, [*args, "--log-jsonl", str(out)], timeout=400)
    return [json.loads(line)["loss"] for line in out.read_text().splitlines()]


def test_device_tiling_gives_the_same_losses_bit_for_bit(digits_shards, pretrain_log, tmp_path):
    """Single process (all 10 steps' batches, bit for bit); then pipeline-parallel (the first stage tiles)
    with 2 loader workers, stopped after 5 of the same 10-step schedule's steps like every layout of
    tests/training/test_layouts_on_shards.py, which it matches as they do. The loader-tiling run is the
    session's shared single-process run (the layouts' reference)."""
    loader = [r["loss"] for r in pretrain_log(1, digits_run_args(digits_shards))]
    device = _losses(tmp_path / "device.jsonl", 1, digits_run_args(digits_shards, "--image-tiling", "device"))
    assert len(loader) == DIGITS_ITERS and device == loader  # exact, not approximate
    pp2 = _losses(
        tmp_path / "pp2.jsonl",
        2,
        digits_run_args(
            digits_shards, "--image-tiling", "device", "--pipeline-model-parallel-size", "2", "--num-workers", "2"
        )
        + ["--exit-interval", str(PP2_ITERS)],
    )
    assert len(pp2) == PP2_ITERS
    for i, (a, b) in enumerate(zip(pp2, loader)):
        assert abs(a - b) <= 1e-5 * abs(b), f"pp2 iteration {i + 1}: {a} vs single-process {b}"


def test_mpo_with_device_tiling_is_exact(preference_shards, tmp_path):
    """Preference packs: the rejected sequence's images are table rows sharing the chosen one's pixels."""

    def args(tiling):
        return [
            "--model",
            "debug",
            "--data-path",
            preference_shards,
            "--global-batch-size",
            "4",
            "--train-iters",
            str(MPO_ITERS),
            "--lr",
            "2e-3",
            "--lr-warmup-iters",
            "2",
            "--seed",
            "5",
            "--image-tiling",
            tiling,
            "--stage",
            "mpo",
            "--seq-length",
            "800",
        ]

    loader = _losses(tmp_path / "loader.jsonl", 1, args("loader"))
    device = _losses(tmp_path / "device.jsonl", 1, args("device"))
    assert len(loader) == MPO_ITERS and device == loader
