"""--image-tiling device (the loader decodes, the first pipeline stage tiles on its device with
data/resample.py) trains bit-identically to --image-tiling loader: the same tiles, so the same losses."""
import json

from tests.launch import REPO, torchrun
from tests.conftest import SEQ

SCRIPT = REPO / "pretrain_internvl.py"
ITERS = 4


def _losses(shards, out, tiling, nproc=1, extra=()):
    args = ["--model", "debug", "--data-path", shards, "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--seq-length", str(SEQ), "--lr", "2e-3", "--lr-warmup-iters", "2", "--seed", "5",
            "--image-tiling", tiling, "--log-jsonl", str(out), *extra]
    torchrun(SCRIPT, nproc, args, timeout=400)
    return [json.loads(line)["loss"] for line in out.read_text().splitlines()]


def test_device_tiling_gives_the_same_losses_bit_for_bit(digits_shards, tmp_path):
    """Single process; then pipeline-parallel (the first stage tiles) with 2 loader workers, which
    matches the single process as every layout does (tests/training/test_layouts_on_shards.py)."""
    loader = _losses(digits_shards, tmp_path / "loader.jsonl", "loader")
    device = _losses(digits_shards, tmp_path / "device.jsonl", "device")
    assert len(loader) == ITERS and device == loader  # exact, not approximate
    pp2 = _losses(digits_shards, tmp_path / "pp2.jsonl", "device", 2,
                  ["--pipeline-model-parallel-size", "2", "--num-workers", "2"])
    assert len(pp2) == ITERS
    for i, (a, b) in enumerate(zip(pp2, loader)):
        assert abs(a - b) <= 1e-5 * abs(b), f"pp2 iteration {i + 1}: {a} vs single-process {b}"


def test_mpo_with_device_tiling_is_exact(preference_shards, tmp_path):
    """Preference packs: the rejected sequence's images are table rows sharing the chosen one's pixels."""
    extra = ["--stage", "mpo", "--seq-length", "800"]
    loader = _losses(preference_shards, tmp_path / "loader.jsonl", "loader", extra=extra)
    device = _losses(preference_shards, tmp_path / "device.jsonl", "device", extra=extra)
    assert len(loader) == ITERS and device == loader
