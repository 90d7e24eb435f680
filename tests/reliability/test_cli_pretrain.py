"""pretrain_internvl.py on careless --data-path input (docs/errors.md).

Data problems are found before any process group or model exists: one line naming the flag and the
file, exit 2; those found from the manifests and the tokens file alone (`train_light`) are found
without importing torch or megatron-core (an interpreter start and numpy, ~0.3 CPU-s, not ~2). Shards
are opened with their sizes checked against the indexes and (unless --no-verify-shards) their sha256
against the manifest, so a truncated or corrupted file never trains.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.reliability.cli_helpers import (
    NO_TORCH,
    SEQ,
    assert_user_error,
    copy_prefix,
    error_lines,
    interrupt_when,
    run,
    run_light,
)

pytestmark = pytest.mark.timeout(300)


def _argv(args: tuple[str, ...], seq: int, model: str) -> list[str]:
    return ["--model", model, "--global-batch-size", "1", "--train-iters", "1", "--seq-length", str(seq), *args]


def train(*args: str, seq: int = SEQ, model: str = "debug"):
    return run("pretrain", *_argv(args, seq, model))


def train_light(*args: str, seq: int = SEQ, model: str = "debug"):
    """`train`, asserting the run imported no torch, megatron-core or transformers (cli_helpers.run_light):
    the checks of the manifests and the tokens file need numpy only; opening the shard files (megatron-core's
    index reader) and training import torch."""
    return run_light("pretrain", *_argv(args, seq, model), timeout=180, heavy=NO_TORCH)


def test_missing_prefix_and_folder(good_prefix, tmp_path):
    assert_user_error(
        train_light("--data-path", str(tmp_path / "nope")), "--data-path", "nope.manifest.json", "not found"
    )
    folder = str(Path(good_prefix).parent)
    assert_user_error(train_light("--data-path", folder), "--data-path", folder, "is a directory", good_prefix)
    broken = copy_prefix(good_prefix, tmp_path / "broken")
    Path(broken + ".manifest.json").write_text('{"counts": ')  # the line names the file
    assert_user_error(train_light("--data-path", broken), broken + ".manifest.json", "line 1 column")
    proc = train_light("--data-path", good_prefix, broken)  # a blend: its sizes come from the manifests too
    assert_user_error(proc, broken + ".manifest.json", "line 1 column")


def test_shards_for_another_model_or_longer_packs(good_prefix):
    manifest = good_prefix + ".manifest.json"
    assert_user_error(train_light("--data-path", good_prefix, model="internvl3-1b"), manifest, "img_context_id")
    assert_user_error(train_light("--data-path", good_prefix, seq=SEQ // 2), manifest, f"--seq-length {SEQ // 2}")


def test_malformed_blend_weights(good_prefix):
    assert_user_error(train_light("--data-path", "0.5", good_prefix, "0.5"), "--data-path", "pairs")


def test_empty_shard_set(tmp_path):
    from internvl_mcore.data.shards import ShardWriter

    from internvl_mcore.config.presets import get_preset

    debug = get_preset("debug")  # a set made for this model in which every input was rejected
    prefix = str(tmp_path / "empty")
    ShardWriter(prefix, tile_format="png", tile_shape=(56, 56, 3)).finalize(
        extra={
            "tokenizer": {
                "img_start_id": debug.img_start_token_id,
                "img_end_id": debug.img_end_token_id,
                "img_context_id": debug.img_context_token_id,
                "vocab_size": 500,
            },
            "num_image_token": debug.num_image_token,
            "template": debug.template,
            "seq_length": SEQ,
        }
    )
    assert_user_error(train_light("--data-path", prefix), "--data-path", prefix, "empty (0 packs")


def test_truncated_and_corrupted_shards(good_prefix, tmp_path):
    """A truncated .bin is refused at open (size vs index); a same-size corruption by its sha256 (the
    manifest's names are the original prefix's: the set was copied under another name)."""
    cut = copy_prefix(good_prefix, tmp_path / "cut")
    tiles = Path(cut + "_tiles.bin")
    with open(tiles, "r+b") as f:
        f.truncate(tiles.stat().st_size // 2)
    assert_user_error(train("--data-path", cut), str(tiles), "truncated")

    flipped = copy_prefix(good_prefix, tmp_path / "flip")
    tokens = Path(flipped + "_tokens.bin")
    data = bytearray(tokens.read_bytes())
    data[100] ^= 1
    tokens.write_bytes(bytes(data))
    assert_user_error(train("--data-path", flipped), str(tokens), "sha256", "--no-verify-shards")


def test_batch_sizes_that_do_not_divide(good_prefix):
    proc = run(
        "pretrain",
        "--model",
        "debug",
        "--global-batch-size",
        "3",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "1",
        "--seq-length",
        str(SEQ),
        "--data-path",
        good_prefix,
    )
    assert_user_error(proc, "--global-batch-size 3", "--micro-batch-size 2")


def test_ctrl_c_during_training():
    """Ctrl-C mid-run (while step 2 waits at a fault point): one line, exit 130 (no KeyboardInterrupt
    traceback)."""
    proc = interrupt_when(
        "pretrain",
        "--model",
        "debug",
        "--mock-data",
        "--global-batch-size",
        "1",
        "--train-iters",
        "3",
        "--seq-length",
        "64",
        fault="step:2:0:wait",
        sig=signal.SIGINT,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "iteration      1/3" in proc.stdout and "iteration      2/3" not in proc.stdout, proc.stdout[-3000:]
    # (megatron-core's own warnings may precede it on stderr)
    assert error_lines(proc)[-1] == "interrupted (Ctrl-C); checkpoints already saved are complete"
    assert "KeyboardInterrupt" not in proc.stderr


@pytest.mark.parametrize(
    "entries, says",
    [
        (["-1", "P"], "weight -1"),
        (["0", "P"], "sum to 0"),
        (["nan", "P"], "finite"),
        (["P", "0.5"], "mixes"),
    ],
)
def test_blend_weight_errors_in_process(good_prefix, entries, says):
    """The rest of the blend grammar's errors, through the same pre-flight the CLI runs."""
    import sys

    from tests.reliability.cli_helpers import REPO

    sys.path.insert(0, str(REPO))
    from pretrain_internvl import parse_run_config

    from internvl_mcore.training.shard_checks import check_shard_sets
    from internvl_mcore.errors import DataError

    entries = [good_prefix if e == "P" else e for e in entries]
    run_cfg = parse_run_config(["--model", "debug", "--seq-length", str(SEQ), "--data-path", *entries])
    with pytest.raises(DataError, match="--data-path") as err:
        check_shard_sets(entries, run_cfg)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_token_ids_outside_the_vocabulary(good_prefix, tmp_path):
    """Ids the embedding does not have are one line before (or, for shards changed
    after the check with --no-verify-shards, at) the first step, never an IndexError: the manifest's
    recorded largest id, an older manifest's scanned one, a batch's, the model's special ids."""
    import dataclasses
    import json

    import numpy as np

    from internvl_mcore.config.presets import get_preset
    from internvl_mcore.checkpoint.canonical import model_config_to_dict

    manifest = json.loads(Path(good_prefix + ".manifest.json").read_text())
    assert 0 < manifest["counts"]["max_token_id"] < 512  # recorded at preprocessing (debug: 512 rows)

    old = copy_prefix(good_prefix, tmp_path / "old")  # an older manifest without it, a token changed after
    tokens = np.fromfile(old + "_tokens.bin", dtype=np.int32)
    tokens[tokens == tokens[0]] = 9999  # the first token of every sample
    tokens.tofile(old + "_tokens.bin")
    stale = json.loads(Path(old + ".manifest.json").read_text())
    del stale["counts"]["max_token_id"]
    Path(old + ".manifest.json").write_text(json.dumps(stale))
    assert_user_error(
        train_light("--data-path", old, "--no-verify-shards"),
        old + ".manifest.json",
        "token id 9999",
        "vocabulary of 512",
    )

    stale["counts"]["max_token_id"] = manifest["counts"]["max_token_id"]  # the manifest no longer tells the truth
    Path(old + ".manifest.json").write_text(json.dumps(stale))
    # the batch's check is in the rank, whoever decoded the packs: decoded there (--num-workers 0), no
    # loader fork server (~3 CPU-s) is started for it
    line = assert_user_error(
        train("--data-path", old, "--no-verify-shards", "--num-workers", "0"), "token id 9999", "vocabulary of 512"
    )
    assert "IndexError" not in line

    model = tmp_path / "model"
    model.mkdir()
    cfg = dataclasses.replace(get_preset("debug"), pad_token_id=9999)
    (model / "model_config.json").write_text(json.dumps({"model": model_config_to_dict(cfg)}))
    assert_user_error(train("--mock-data", model=str(model)), "--model", "pad_token_id=9999", "vocabulary of 512")


def test_pretrained_hf_dir_with_a_damaged_header(tmp_path):
    """--pretrained HF_DIR whose safetensors header was overwritten: one line naming
    the file (was an OverflowError traceback)."""
    from tests.convert.tiny_hf import save_transformers_dir, tiny_transformers_model

    hf = save_transformers_dir(tiny_transformers_model(seed=3), tmp_path / "hf")
    weights = hf / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    assert_user_error(
        train("--mock-data", "--pretrained", str(hf), seq=64), "--pretrained", str(weights), "damaged safetensors"
    )


def test_a_signal_while_torch_is_half_imported_still_exits_with_one_line():
    """SIGTERM during `import torch` reaches `_exit` with torch.distributed half-loaded in sys.modules;
    `_exit` must not import it again (that raised ImportError, a traceback instead of the line)."""
    import subprocess
    import sys

    from tests.launch import REPO

    code = (
        "import runpy, sys, types; sys.modules['torch.distributed'] = types.ModuleType('torch.distributed'); "
        "runpy.run_path('pretrain_internvl.py', run_name='pretrain')['_terminated']()"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert "terminated (SIGTERM)" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
