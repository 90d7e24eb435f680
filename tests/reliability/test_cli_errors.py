"""Issue 26 item 1: only a UserError (internvl_mcore/errors.py) ends a tool with one line and exit 2;
any other exception, a ValueError / KeyError / OSError from a bug included, keeps its traceback (exit
1), and INTERNVL_MCORE_TRACEBACK=1 shows the traceback of a user error too (docs/errors.md)."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
import torch

from internvl_mcore.cli_errors import TRACEBACK_ENV, read_json, run_cli
from internvl_mcore.errors import ConfigError, ConversionError, DataError
from tests.reliability.cli_helpers import REPO, assert_user_error, env, run

pytestmark = pytest.mark.timeout(300)


def test_run_cli_user_errors_bugs_and_ctrl_c(capsys, monkeypatch):
    """In-process: what every tool's main() goes through."""
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_cli(interrupted, "tool", interrupted="OUT left as it was") == 130
    assert capsys.readouterr().err == "tool: interrupted (Ctrl-C); OUT left as it was\n"

    def multiline() -> int:
        raise ConfigError("refusing to start:\n  --a\n  --b")

    assert run_cli(multiline, "tool") == 2
    assert capsys.readouterr().err == "tool: error: refusing to start: --a; --b\n"
    with pytest.raises(DataError):  # a missing file the user named: a UserError where it is opened
        read_json("/nonexistent/x.json", DataError)
    assert run_cli(lambda: read_json("/nonexistent/x.json", DataError), "tool") == 2
    assert capsys.readouterr().err == "tool: error: No such file or directory: /nonexistent/x.json\n"

    # bugs: the built-in errors the boundary used to flatten now propagate (a traceback, exit 1)
    for bug, exc in (
        (lambda: int("x"), ValueError),
        (lambda: {}["key"], KeyError),
        (lambda: open("/nonexistent/y.json"), FileNotFoundError),
        (lambda: 1 // 0, ZeroDivisionError),
    ):
        with pytest.raises(exc):
            run_cli(bug, "tool")
    assert capsys.readouterr().err == ""

    monkeypatch.setenv(TRACEBACK_ENV, "1")  # the switch: the user error's traceback, then its one line
    assert run_cli(multiline, "tool") == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in multiline" in err
    assert err.endswith("tool: error: refusing to start: --a; --b\n")


PLAN = ["--model", "debug", "--gpus", "8", "--gpu-memory", "10", "--reserve-gb", "20"]


def test_a_real_tool_user_error_bug_and_switch():
    """tools/plan.py (the quickest tool) in subprocesses: a user error is one line, exit 2; the same
    with the switch shows its traceback; a bug injected into an internal function is a traceback, exit 1."""
    line = assert_user_error(run("plan", *PLAN), "--gpu-memory 10", "--reserve-gb 20")
    assert line.startswith("plan: error: ")

    shown = run("plan", *PLAN, environ=env(**{TRACEBACK_ENV: "1"}))
    assert shown.returncode == 2, shown.stderr[-3000:]
    assert "Traceback (most recent call last):" in shown.stderr and "ConfigError" in shown.stderr
    assert shown.stderr.rstrip().splitlines()[-1] == line

    inject = (
        "import runpy, sys; import internvl_mcore.plan as p\n"
        "def count_params(model): raise KeyError('bug inside count_params')\n"
        "p.count_params = count_params\n"
        f"sys.argv = ['plan.py', *{PLAN[:4]!r}]\n"
        "runpy.run_path('tools/plan.py', run_name='__main__')"
    )
    bug = subprocess.run(
        [sys.executable, "-c", inject], cwd=REPO, env=env(), capture_output=True, text=True, timeout=180
    )
    assert bug.returncode == 1, bug.stderr[-3000:]
    assert "Traceback (most recent call last):" in bug.stderr and "in count_params" in bug.stderr
    assert bug.stderr.rstrip().splitlines()[-1] == "KeyError: 'bug inside count_params'"


def test_pretrain_reports_only_user_errors_as_one_line(tmp_path, capsys, monkeypatch):
    """pretrain_internvl.py's main(), in-process, before any process group exists: a DataError is one
    line and exit 2 (with the switch, after its traceback); a bug in the checks propagates."""
    import pretrain_internvl
    from internvl_mcore.training import preemption

    monkeypatch.setattr(preemption, "install", lambda exit_signal_handler: None)  # pytest's own signals stay
    # the suite's in-process tests may hold a 1-rank world (tests/conftest.py: world); main() then leaves
    # with os._exit, which would end pytest itself: this test is about a run before its process group exists
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    argv = ["--model", "debug", "--data-path", str(tmp_path / "nope"), "--global-batch-size", "1"]
    with pytest.raises(SystemExit) as stop:
        pretrain_internvl.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: --data-path {tmp_path / 'nope'}: no shard set there ({tmp_path / 'nope'}.manifest.json not found)\n"
    )

    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(SystemExit) as stop:
        pretrain_internvl.main(argv)
    assert stop.value.code == 2
    shown = capsys.readouterr().err
    assert shown.startswith("Traceback (most recent call last):") and shown.endswith(err)

    def check_data(run) -> None:
        raise ValueError("bug inside check_data")

    monkeypatch.setattr(pretrain_internvl, "check_data", check_data)
    with pytest.raises(ValueError, match="bug inside check_data"):
        pretrain_internvl.main(argv)


def test_unwritable_outputs_are_refused_before_the_model(tmp_path, capsys, monkeypatch):
    """--log-jsonl, --tensorboard-dir and --save that cannot be written: one line naming each (exit 2)
    from the start-up checks every rank runs (training/preflight.py, also in training/loop.py: validate), before any process group or
    model; nothing is created. (The writer rank used to find the first two after building its model.)"""
    import pretrain_internvl
    from internvl_mcore.config.training import LogConfig
    from internvl_mcore.training import preemption
    from internvl_mcore.training.preflight import output_problems

    monkeypatch.setattr(preemption, "install", lambda exit_signal_handler: None)  # pytest's own signals stay
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # see the test above
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as stop:
        pretrain_internvl.main(
            [
                "--mock-data",
                "--model",
                "debug",
                "--global-batch-size",
                "1",
                "--train-iters",
                "1",
                "--log-jsonl",
                str(tmp_path),
                "--tensorboard-dir",
                str(a_file / "tb"),
                "--save",
                str(a_file / "save"),
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to start: ") and err.count("\n") == 1, err
    for needle in (
        f"--log-jsonl {tmp_path} is a directory",
        f"--tensorboard-dir {a_file / 'tb'}: {a_file} exists and is not a directory",
        f"--save {a_file / 'save'}: cannot write there",
    ):
        assert needle in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]

    assert output_problems(LogConfig(log_jsonl=str(tmp_path / "no" / "log.jsonl"))) == [
        f"--log-jsonl {tmp_path / 'no' / 'log.jsonl'}: the folder {tmp_path / 'no'} does not exist (or is not a directory)"
    ]
    assert (
        output_problems(LogConfig(log_jsonl=str(tmp_path / "log.jsonl"), tensorboard_dir=str(tmp_path / "a" / "b")))
        == []
    )
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_unreadable_hf_shard_and_tokenizer_files_are_one_line(tmp_path, monkeypatch):
    """convert_from_hf.py (and pretrain --pretrained, the same reader) on a shard it cannot open: one line
    naming the file, exit 2, no --save; a permission error (simulated where the files are opened: root reads
    any file) on a shard or a tokenizer file is a ConversionError / DataError naming the file."""
    from internvl_mcore.checkpoint import safetensors_io
    from internvl_mcore.config import PRESETS
    from internvl_mcore.data import tokenizer
    from tests.convert.tiny_hf import tiny_config, write_tokenizer_config

    hf = tmp_path / "hf"
    tiny_config().save_pretrained(str(hf))
    write_tokenizer_config(hf, PRESETS["debug"].pad_token_id)
    (hf / "model.safetensors").mkdir()  # opening it fails with an OSError naming it, as a permission error does
    assert_user_error(
        run("convert_from_hf", "--hf-dir", hf, "--save", tmp_path / "out"),
        f"Is a directory: {hf / 'model.safetensors'}",
    )
    assert not (tmp_path / "out").exists()

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(safetensors_io, "open", denied, raising=False)
    with pytest.raises(ConversionError, match=f"^Permission denied: {hf / 'x.safetensors'}$"):
        safetensors_io.read_safetensors_header(hf / "x.safetensors")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(tokenizer, "open", denied, raising=False)
    with pytest.raises(DataError, match=f"^Permission denied: {tmp_path / 'tok' / 'tokenizer.json'}$"):
        tokenizer.load_tokenizer(str(tmp_path / "tok"))


def test_template_error_survives_pickling():
    """A preprocessing worker's TemplateError reaches the parent pickled: its two arguments survive
    (pickle rebuilt it from its one-message args, a TypeError)."""
    import pickle

    from internvl_mcore.errors import TemplateError

    copy = pickle.loads(pickle.dumps(TemplateError("bad_record", "message 2 has no 'role'")))
    assert type(copy) is TemplateError and (copy.reason, copy.detail) == ("bad_record", "message 2 has no 'role'")
    assert str(copy) == "bad_record: message 2 has no 'role'"
