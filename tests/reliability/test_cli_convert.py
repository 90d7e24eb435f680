"""tools/convert_to_hf.py, tools/convert_from_hf.py and tools/plan.py on careless input (issue 17,
defects 4 and 9; docs/errors.md): refused with one line and exit 2, outputs complete or absent."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.reliability.cli_helpers import assert_user_error, run

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
    from internvl_mcore.convert.hf import SafetensorsDir

    src = SafetensorsDir(directory)
    return {k: src[k] for k in src}


def test_export_over_an_existing_export(ckpt, tmp_path):
    """Refused without --overwrite (nothing touched); with it, the stale sharded set and its index are
    removed before the new single file moves in, so every reader sees the new weights; a file that
    is not ours survives."""
    out = tmp_path / "export"
    proc = run("convert_to_hf", "--load", ckpt, "--save", out, "--format", "transformers", "--max-shard-size", "30KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stale = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in stale and len(stale) > 3
    (out / "NOTES.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    proc = run("convert_to_hf", "--load", ckpt, "--save", out, "--format", "transformers", "--dtype", "bf16")
    assert_user_error(proc, "--save", str(out), "not empty", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    proc = run("convert_to_hf", "--load", ckpt, "--save", out, "--format", "transformers", "--dtype", "bf16",
               "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
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


@pytest.mark.parametrize("args, says", [
    (["--gpus", "0"], "--gpus 0"),
    (["--gpus", "8", "--gpu-memory", "-5"], "--gpu-memory -5"),
    (["--gpus", "8", "--compute-efficiency", "1.5"], "--compute-efficiency"),
    (["--gpus", "8", "--seq-length", "0"], "--seq-length 0"),
])
def test_plan_refuses_impossible_numbers(args, says):
    assert_user_error(run("plan", "--model", "debug", *args), says)


def test_plan_unknown_model_directory(tmp_path):
    assert_user_error(run("plan", "--model", str(tmp_path / "nope"), "--gpus", "8"), str(tmp_path / "nope"))


def test_cli_wrapper_turns_ctrl_c_and_user_errors_into_one_line(capsys):
    """What every tool's main() goes through (the convert tools finish too fast to interrupt)."""
    from internvl_mcore.cli_errors import run_cli

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_cli(interrupted, "tool", interrupted="OUT left as it was") == 130
    assert capsys.readouterr().err == "tool: interrupted (Ctrl-C); OUT left as it was\n"
    assert run_cli(lambda: open("/nonexistent/x.json"), "tool") == 2
    assert capsys.readouterr().err == "tool: error: No such file or directory: /nonexistent/x.json\n"

    def multiline() -> int:
        raise ValueError("refusing to start:\n  --a\n  --b")

    assert run_cli(multiline, "tool") == 2
    assert capsys.readouterr().err == "tool: error: refusing to start: --a; --b\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda: 1 // 0, "tool")
