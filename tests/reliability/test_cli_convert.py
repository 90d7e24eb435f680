"""tools/convert_to_hf.py, tools/convert_from_hf.py and tools/plan.py on careless input
(docs/errors.md): refused with one line and exit 2, outputs complete or absent. The refusals are real
launches (their stderr is what a user sees); a conversion that must succeed so that the next refusal
or check has its input calls the tool's `main` in this process (cli_helpers.in_process: the same code, without an
interpreter start and torch's import, ~3 CPU-s a run), as does the ENOSPC case, which patches the writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.reliability.cli_helpers import assert_user_error, in_process, run, run_light

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A converted (canonical) checkpoint of a tiny transformers InternVL, and its HF source."""
    from internvl_mcore.convert import convert_hf_to_checkpoint
    from tests.convert.tiny_hf import save_transformers_dir, tiny_transformers_model

    root = tmp_path_factory.mktemp("ckpt")
    hf = save_transformers_dir(tiny_transformers_model(seed=3), root / "hf")
    convert_hf_to_checkpoint(hf, root / "ckpt")
    return root / "ckpt"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from internvl_mcore.checkpoint.safetensors_io import SafetensorsDir

    src = SafetensorsDir(directory)
    return {k: src[k] for k in src}


def test_export_over_an_existing_export(ckpt, tmp_path):
    """Refused without --overwrite (nothing touched); with it, the stale sharded set and its index are
    removed before the new single file moves in, so every reader sees the new weights; a file that
    is not ours survives."""
    out = tmp_path / "export"
    assert (
        in_process(
            "convert_to_hf", "--load", ckpt, "--save", out, "--format", "transformers", "--max-shard-size", "30KB"
        )
        == 0
    )
    stale = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in stale and len(stale) > 3
    (out / "NOTES.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    proc = run("convert_to_hf", "--load", ckpt, "--save", out, "--format", "transformers", "--dtype", "bf16")
    assert_user_error(proc, "--save", str(out), "not empty", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert (
        in_process(
            "convert_to_hf", "--load", ckpt, "--save", out, "--format", "transformers", "--dtype", "bf16", "--overwrite"
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "config.json", "model.safetensors"]
    tensors = _tensors(out)
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_export_into_the_checkpoint_is_refused(ckpt):
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    for save in (ckpt, ckpt / "hf"):
        proc = run("convert_to_hf", "--load", ckpt, "--save", save, "--format", "internvl", "--overwrite")
        assert_user_error(proc, f"--save {save}", f"--load {ckpt}")
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


def test_failed_import_leaves_no_save_dir(ckpt, tmp_path):
    """A source whose weights are cut short fails mid-conversion: one line naming the file, no --save."""
    hf = ckpt.parent / "hf"
    bad = tmp_path / "bad_hf"
    bad.mkdir()
    (bad / "config.json").write_bytes((hf / "config.json").read_bytes())
    weights = (hf / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[: len(weights) * 2 // 3])
    proc = run("convert_from_hf", "--hf-dir", bad, "--save", tmp_path / "out")
    assert_user_error(proc, str(bad / "model.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_hf"]  # no out/, no staging folder

    assert_user_error(run("convert_from_hf", "--hf-dir", tmp_path / "none", "--save", tmp_path / "out"), "none")
    assert_user_error(run("convert_from_hf", "--hf-dir", hf, "--save", ckpt), f"--save {ckpt}", "--overwrite")


@pytest.mark.parametrize(
    "args, says",
    [
        (["--gpus", "0"], "--gpus 0"),
        (["--gpus", "8", "--gpu-memory", "-5"], "--gpu-memory -5"),
        (["--gpus", "8", "--compute-efficiency", "1.5"], "--compute-efficiency"),
        (["--gpus", "8", "--seq-length", "0"], "--seq-length 0"),
    ],
)
def test_plan_refuses_impossible_numbers(args, says):
    """Flag errors: one line, and no torch imported to say it (cli_helpers.run_light)."""
    assert_user_error(run_light("plan", "--model", "debug", *args), says)


def test_plan_unknown_model_directory(tmp_path):
    assert_user_error(run("plan", "--model", str(tmp_path / "nope"), "--gpus", "8"), str(tmp_path / "nope"))


def _copy_hf(ckpt: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(ckpt.parent / "hf", dst))


def _damage_header(path: Path) -> None:
    """A header length of 2^64 - 1 (what made int -> read() overflow), the file's size unchanged."""
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_damaged_safetensors_header_and_invalid_json(ckpt, tmp_path):
    """A header overwritten on either side of a conversion, and config.json / an index /
    model_config.json that is not JSON, are one line naming the file (no OverflowError traceback)."""
    import shutil

    hf = _copy_hf(ckpt, tmp_path / "hf")
    _damage_header(hf / "model.safetensors")
    assert_user_error(
        run("convert_from_hf", "--hf-dir", hf, "--save", tmp_path / "out"),
        str(hf / "model.safetensors"),
        "damaged safetensors",
    )
    canonical = Path(shutil.copytree(ckpt, tmp_path / "canonical"))
    _damage_header(canonical / "model.safetensors")
    assert_user_error(
        run("convert_to_hf", "--load", canonical, "--save", tmp_path / "out", "--format", "internvl"),
        str(canonical / "model.safetensors"),
        "damaged safetensors",
    )

    bad_json = _copy_hf(ckpt, tmp_path / "json")
    (bad_json / "config.json").write_text('{"model_type": "internvl",\n  "text_config": }')
    assert_user_error(
        run("convert_from_hf", "--hf-dir", bad_json, "--save", tmp_path / "out"),
        str(bad_json / "config.json"),
        "invalid JSON at line 2",
    )
    from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint  # the same reader, in-process
    from internvl_mcore.errors import ConversionError

    (canonical / "model_config.json").write_text("{")
    with pytest.raises(ConversionError, match=f"{canonical / 'model_config.json'}: invalid JSON at line 1"):
        CanonicalCheckpoint.open(canonical)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canonical", "hf", "json"]  # no out/, no staging


def test_special_token_ids_the_model_cannot_use(ckpt, tmp_path):
    """A model no preset has, without tokenizer files, does not convert with ids from
    another vocabulary; the ids come from the tokenizer files when present and must fit vocab_size."""
    import json

    hf = _copy_hf(ckpt, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5  # no preset has this model any more; tensors unchanged
    (hf / "config.json").write_text(json.dumps(config))
    tokenizer_config = (hf / "tokenizer_config.json").read_text()
    (hf / "tokenizer_config.json").unlink()
    line = assert_user_error(
        run("convert_from_hf", "--hf-dir", hf, "--save", tmp_path / "out"),
        str(hf / "config.json"),
        "img_start_token_id",
        "tokenizer files",
    )
    assert "img_context_token_id" not in line  # config.json states it (image_token_id)

    tok = json.loads(tokenizer_config)
    tok["added_tokens_decoder"]["151665"] = tok["added_tokens_decoder"].pop(next(iter(tok["added_tokens_decoder"])))
    (hf / "tokenizer_config.json").write_text(json.dumps(tok))
    assert_user_error(
        run("convert_from_hf", "--hf-dir", hf, "--save", tmp_path / "out"),
        "151665",
        "outside the LLM's vocabulary of 512 rows",
    )

    (hf / "tokenizer_config.json").write_text(tokenizer_config)
    assert in_process("convert_from_hf", "--hf-dir", hf, "--save", tmp_path / "out") == 0
    model = json.loads((tmp_path / "out" / "model_config.json").read_text())["model"]
    assert model["name"] == "hf:hf" and all(model[f] < 512 for f in ("img_start_token_id", "pad_token_id"))


def test_export_onto_a_full_disk(ckpt, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing a shard (in-process: the write path raises it) and EFBIG
    from a file-size limit (the real CLI under RLIMIT_FSIZE): one line naming --save and the file,
    nothing left behind."""
    import errno
    import io

    from internvl_mcore.checkpoint import safetensors_io

    class Full(io.FileIO):
        def write(self, data):  # as a full disk answers write(2): no file name in the error
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io, "open", lambda path, mode="r": Full(path, mode), raising=False)
    out = tmp_path / "export"
    assert in_process("convert_to_hf", "--load", ckpt, "--save", out, "--format", "transformers") == 2
    err = capsys.readouterr().err  # (after the progress bar)
    assert "Traceback" not in err and f"--save {out}: No space left on device while writing" in err.splitlines()[-1]
    assert ".shard-00000.safetensors.tmp" in err.splitlines()[-1] and not list(tmp_path.iterdir())

    limit = (
        "python3",
        "-c",
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)); "
        "os.execv(sys.argv[1], sys.argv[1:])",
    )
    proc = run("convert_to_hf", "--load", ckpt, "--save", out, "--format", "transformers", prefix=limit)
    assert_user_error(proc, f"--save {out}", "File too large while writing", ".safetensors")
    assert not list(tmp_path.iterdir())
