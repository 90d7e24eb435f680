"""The example scripts: syntax, the exact torchrun command they print under DRY_RUN=1 (and launch
without it), the launchers' per-node commands, the planner-derived layouts, the example data.

Nothing here starts a training process: `TORCHRUN`, `srun`, `scontrol` and `ssh` are replaced by
small recorders, so the tests see exactly what the scripts would launch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def _load(path: Path, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gen = _load(EXAMPLES / "gen_scripts.py", "gen_scripts")
ROWS = gen.read_tsv()
STAGE_SCRIPTS = {s.name: s for s in gen.STAGE_SCRIPTS}
SIZE_SCRIPTS = sorted(p for p in EXAMPLES.glob("internvl3_*/*.sh"))


def shell_scripts() -> list[Path]:
    """Every shell script under examples/ except the demo's (examples/digits/, not ours)."""
    return sorted(p for p in EXAMPLES.rglob("*.sh") if "digits" not in p.relative_to(EXAMPLES).parts)


def row_for(script: Path):
    """The layouts.tsv row a per-size script was generated from (by its directory and file name)."""
    model = script.parent.name.replace("_", "-")
    stage = STAGE_SCRIPTS[script.stem].stage
    return next(r for r in ROWS if r.model == model and r.stage == stage)


def run(cmd: list[str], env: dict | None = None, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    # start from a clean slate: the scripts read many variables, none may leak in from the test runner
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    proc = subprocess.run(cmd, cwd=cwd, env={**keep, **(env or {})}, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def torchrun_argv(line: str) -> tuple[dict, list[str]]:
    """A printed command line -> (leading VAR=value assignments, argv starting at torchrun)."""
    words = shlex.split(line)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def option(argv: list[str], name: str) -> str | None:
    """The value after `name` (last occurrence, as argparse takes it), None when absent."""
    idx = [i for i, w in enumerate(argv) if w == name]
    return argv[idx[-1] + 1] if idx else None


def values(argv: list[str], name: str) -> list[str]:
    """All words after `name` up to the next flag (nargs='+')."""
    i = argv.index(name) + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(argv[i])
        i += 1
    return out


@pytest.fixture(scope="module")
def recorder(tmp_path_factory) -> Path:
    """A fake torchrun (and srun / scontrol / ssh) that append their argv and env as JSON lines."""
    d = tmp_path_factory.mktemp("bin")
    record = d / "record.py"
    record.write_text(
        "import json, os, sys\n"
        "with open(os.environ['RECORD_LOG'], 'a') as f:\n"
        "    f.write(json.dumps({'argv': [os.path.basename(sys.argv[1])] + sys.argv[2:],\n"
        "                        'env': {k: os.environ.get(k) for k in ('CUDA_DEVICE_MAX_CONNECTIONS', 'NODE_RANK')}})"
        " + '\\n')\n"
    )
    for name in ("torchrun", "ssh", "srun"):
        tool = d / name
        tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{record}" {name} "$@"\n')
        tool.chmod(0o755)
    # fake srun: record, then run the per-node command once per node like SLURM would
    (d / "srun").write_text(
        f'#!/usr/bin/env bash\n"{sys.executable}" "{record}" srun "$@"\n'
        'nodes=1\nwhile [ $# -gt 0 ]; do case $1 in --nodes) nodes=$2; shift 2;; bash) break;; *) shift;; esac; done\n'
        'for (( i = 0; i < nodes; i++ )); do SLURM_NODEID=$i SLURM_JOB_NODELIST="gpu[07-10]" "$@" || exit 1; done\n'
    )
    (d / "scontrol").write_text('#!/bin/sh\nprintf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n"\n')
    (d / "scontrol").chmod(0o755)
    # fake ssh: record, then run the remote command here (same checkout, like a shared file system)
    (d / "ssh").write_text(
        f'#!/usr/bin/env bash\n"{sys.executable}" "{record}" ssh "$@"\n'
        'while [ $# -gt 0 ]; do case $1 in -o) shift 2;; *) break;; esac; done\nshift\nexec bash -c "$1"\n'
    )
    return d


def recorded(recorder: Path) -> list[dict]:
    log = recorder / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def fake_env(recorder: Path, **extra: str) -> dict:
    return {
        "PATH": f"{recorder}:{os.environ['PATH']}",
        "RECORD_LOG": str(recorder / "calls.jsonl"),
        "PYTHON": sys.executable,
        **extra,
    }


# ------------------------------------------------------------------------------------------------
def test_every_script_passes_bash_n():
    scripts = shell_scripts()
    assert len(SIZE_SCRIPTS) == 7 * 4, SIZE_SCRIPTS
    for script in scripts:
        proc = run(["bash", "-n", str(script)], check=False)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_size_scripts_are_generated_from_layouts_tsv():
    assert gen.stale_files(ROWS) == []
    assert {(r.model, r.stage) for r in ROWS} == {(m, s.stage) for m in gen.SIZES for s in gen.STAGE_SCRIPTS}


@pytest.mark.parametrize("script", SIZE_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dry_run_prints_the_planned_torchrun_command(script: Path):
    row = row_for(script)
    proc = run(["bash", str(script), "--log-interval", "7"], env={"DRY_RUN": "1", "TRAIN_ITERS": "100"})
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # the command and nothing else on stdout
    env, argv = torchrun_argv(lines[0])
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert argv[0] == "torchrun"
    script_at = next(i for i, w in enumerate(argv) if w.endswith("pretrain_internvl.py"))
    launcher, args = argv[:script_at], argv[script_at + 1 :]
    assert Path(argv[script_at]) == REPO / "pretrain_internvl.py"
    # the job geometry: all of the row's GPUs, 8 per node
    nnodes, nproc = int(option(launcher, "--nnodes")), int(option(launcher, "--nproc_per_node"))
    assert nnodes * nproc == row.gpus and nproc == min(row.gpus, 8)
    assert option(launcher, "--node_rank") == "0"
    # the model, stage and the planner's layout
    assert option(args, "--model") == script.parent.name.replace("_", "-")
    assert option(args, "--stage") == STAGE_SCRIPTS[script.stem].stage
    assert int(option(args, "--tensor-model-parallel-size")) == row.tp
    assert int(option(args, "--pipeline-model-parallel-size")) == row.pp
    assert int(option(args, "--context-parallel-size")) == row.cp
    assert ("--sequence-parallel" in args) == row.sequence_parallel
    assert ("--use-distributed-optimizer" in args) == row.distributed_optimizer
    assert (option(args, "--recompute-granularity") == "full") == row.recompute
    first = option(args, "--decoder-first-pipeline-num-layers")
    assert (int(first) if first else None) == row.first_stage_layers
    last = option(args, "--decoder-last-pipeline-num-layers")
    assert (int(last) if last else None) == row.last_stage_layers
    chunks = option(args, "--num-virtual-stages-per-pipeline-rank")
    assert (int(chunks) if chunks else 1) == row.virtual_stages
    # batch geometry as InternVL's scripts take it, and InternVL's 3% warm-up
    assert option(args, "--global-batch-size") == "128" and option(args, "--micro-batch-size") == "1"
    assert option(args, "--seq-length") == str(gen.SEQ_LENGTH)
    assert option(args, "--train-iters") == "100" and option(args, "--lr-warmup-iters") == "3"
    assert "--bf16" in args
    assert args[-2:] == ["--log-interval", "7"]  # extra flags are passed on, last (so they win)
    assert values(args, "--data-path") == [f"data/shards/{row.model}"]
    stage_name = script.stem
    expected_start = {
        "stage1": f"checkpoints/{row.model}",
        "stage1_5": f"work_dirs/{row.model}/stage1",
        "stage2": f"work_dirs/{row.model}/stage1_5",
        "2nd_finetune": f"checkpoints/{row.model}",
    }
    assert option(args, "--pretrained") == expected_start[stage_name]
    assert option(args, "--save") == f"work_dirs/{row.model}/{stage_name}"


def test_dry_run_commands_are_accepted_by_the_trainer():
    """pretrain_internvl.py's own parser and the training loop's validation take every command."""
    pretrain = _load(REPO / "pretrain_internvl.py", "pretrain_internvl")
    from internvl_mcore.training.loop import validate

    for script in SIZE_SCRIPTS:
        line = run(["bash", str(script)], env={"DRY_RUN": "1", "TRAIN_ITERS": "100"}).stdout
        argv = torchrun_argv(line)[1]
        args = argv[next(i for i, w in enumerate(argv) if w.endswith("pretrain_internvl.py")) + 1 :]
        run_cfg = pretrain.parse_run_config(args)
        validate(run_cfg)  # raises ConfigError naming the flags when a combination is refused
        gpus = int(option(argv, "--nnodes")) * int(option(argv, "--nproc_per_node"))
        p = run_cfg.parallel
        dp = gpus // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)
        assert gpus % (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size) == 0
        assert run_cfg.train.global_batch_size % (run_cfg.train.micro_batch_size * dp) == 0


def test_dry_run_is_exactly_what_runs_and_nothing_else_runs(recorder, tmp_path):
    script = EXAMPLES / "internvl3_38b" / "stage2.sh"
    env = fake_env(recorder, TRAIN_ITERS="50", OUTPUT_DIR=str(tmp_path / "out"), NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    dry = run(["bash", str(script), "--seed", "5"], env={**env, "DRY_RUN": "1"})
    assert recorded(recorder) == [] and not (tmp_path / "out").exists()
    run(["bash", str(script), "--seed", "5"], env=env)
    calls = recorded(recorder)
    assert len(calls) == 1
    printed_env, printed_argv = torchrun_argv(dry.stdout)
    assert calls[0]["argv"] == printed_argv
    assert calls[0]["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == printed_env["CUDA_DEVICE_MAX_CONNECTIONS"]
    assert option(printed_argv, "--node_rank") == "1" and option(printed_argv, "--master_addr") == "10.0.0.1"
    assert (tmp_path / "out" / "training_log.node1.txt").exists()  # multi-node runs log per node


def test_posix_sh_invocation_re_executes_under_bash():
    """InternVL's scripts are run with `sh` (dash here); ours must print the same command that way."""
    script = str(EXAMPLES / "internvl3_8b" / "2nd_finetune.sh")
    env = {"DRY_RUN": "1", "TRAIN_ITERS": "10"}
    assert run(["sh", script], env=env).stdout == run(["bash", script], env=env).stdout


def test_resume_prefers_the_output_dir_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {"DRY_RUN": "1", "TRAIN_ITERS": "10", "OUTPUT_DIR": str(out)}
    script = str(EXAMPLES / "internvl3_1b" / "stage2.sh")
    argv = torchrun_argv(run(["bash", script], env=env).stdout)[1]
    assert option(argv, "--pretrained") == "work_dirs/internvl3-1b/stage1_5" and "--load" not in argv
    out.mkdir()
    (out / "latest_checkpointed_iteration.txt").write_text("4")
    argv = torchrun_argv(run(["bash", script], env=env).stdout)[1]
    assert option(argv, "--load") == str(out) and "--pretrained" not in argv
    argv = torchrun_argv(
        run(["bash", script], env={**env, "OUTPUT_DIR": str(tmp_path / "new"), "PRETRAINED": ""}).stdout
    )[1]
    assert "--pretrained" not in argv and "--load" not in argv  # empty PRETRAINED: fresh weights


def test_environment_overrides_layout_and_geometry():
    env = {
        "DRY_RUN": "1",
        "TRAIN_ITERS": "40",
        "GPUS": "16",
        "PER_DEVICE_BATCH_SIZE": "2",
        "BATCH_SIZE": "64",
        "TP": "2",
        "PP": "2",
        "RECOMPUTE": "1",
        "FIRST_STAGE_LAYERS": "10",
        "BF16": "0",
        "DATA_PATH": "0.3 /d/a 0.7 /d/b",
        "LR": "1e-5",
        "MASTER_PORT": "40000",
    }
    argv = torchrun_argv(run(["bash", str(EXAMPLES / "internvl3_8b" / "stage2.sh")], env=env).stdout)[1]
    assert option(argv, "--nnodes") == "2" and option(argv, "--nproc_per_node") == "8"
    assert option(argv, "--master_port") == "40000"
    assert option(argv, "--tensor-model-parallel-size") == "2" and option(argv, "--pipeline-model-parallel-size") == "2"
    assert option(argv, "--decoder-first-pipeline-num-layers") == "10"
    assert option(argv, "--recompute-granularity") == "full" and "--bf16" not in argv
    assert option(argv, "--micro-batch-size") == "2" and option(argv, "--global-batch-size") == "64"
    assert values(argv, "--data-path") == ["0.3", "/d/a", "0.7", "/d/b"]
    assert option(argv, "--lr") == "1e-5" and option(argv, "--lr-warmup-iters") == str(40 * 3 // 100)


def test_train_iters_count_an_epoch_from_the_manifests(tmp_path):
    packs = {"a": 1000, "b": 301}
    for name, n in packs.items():
        (tmp_path / f"{name}.manifest.json").write_text(json.dumps({"counts": {"packs": n}}))
    env = {
        "DRY_RUN": "1",
        "EPOCHS": "2",
        "BATCH_SIZE": "128",
        "DATA_PATH": f"2 {tmp_path / 'a'} 1 {tmp_path / 'b'}",
        "PYTHON": sys.executable,
    }
    argv = torchrun_argv(run(["bash", str(EXAMPLES / "internvl3_1b" / "stage1.sh")], env=env).stdout)[1]
    iters = math.ceil(2 * sum(packs.values()) / 128)
    assert option(argv, "--train-iters") == str(iters)
    assert option(argv, "--lr-warmup-iters") == str(iters * 3 // 100)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"GPUS": "12"}, "GPUS=12"),
        ({"GPUS": "8", "BATCH_SIZE": "101"}, "BATCH_SIZE=101"),
        ({"GPUS": "6"}, "TP x PP x CP"),
        ({"GPUS": "x"}, "GPUS=x"),
        ({"TRAIN_ITERS": "", "DATA_PATH": "/nonexistent/shards"}, "TRAIN_ITERS"),
    ],
)
def test_bad_settings_are_refused_by_name(env, message):
    proc = run(
        ["bash", str(EXAMPLES / "internvl3_8b" / "stage2.sh")],
        env={"DRY_RUN": "1", "TRAIN_ITERS": "10", "PYTHON": sys.executable, **env},
        check=False,
    )
    assert proc.returncode != 0 and proc.stdout == ""
    assert message in proc.stderr, proc.stderr


def test_slurm_launcher_dry_run_and_per_node_commands(recorder):
    script = "examples/internvl3_78b/stage2.sh"
    row = row_for(REPO / script)
    base = fake_env(recorder, PARTITION="gpu", GPUS="32", TRAIN_ITERS="20", SRUN_ARGS="--time=1:00:00")
    dry = run(["sh", "examples/slurm/launch.sh", script, "--seed", "3"], env={**base, "DRY_RUN": "1"})
    assert recorded(recorder) == []  # nothing submitted
    lines = [ln for ln in dry.stdout.splitlines() if not ln.startswith("#")]
    srun = shlex.split(lines[0])
    assert srun[0] == "srun" and option(srun, "--partition") == "gpu" and option(srun, "--nodes") == "4"
    assert option(srun, "--ntasks-per-node") == "1" and option(srun, "--gres") == "gpu:8"
    assert "--time=1:00:00" in srun and srun[-3:] == [script, "--seed", "3"]
    node_cmds = [torchrun_argv(ln)[1] for ln in lines[1:]]
    assert [option(a, "--node_rank") for a in node_cmds] == ["0", "1", "2", "3"]
    assert all(option(a, "--nnodes") == "4" and option(a, "--nproc_per_node") == "8" for a in node_cmds)
    assert all(int(option(a, "--tensor-model-parallel-size")) == row.tp for a in node_cmds)

    # for real, with srun / scontrol / torchrun replaced: each node runs torchrun with its rank and
    # the allocation's first host as the rendezvous
    run(["sh", "examples/slurm/launch.sh", script, "--seed", "3"], env=base)
    calls = recorded(recorder)
    assert [c["argv"][0] for c in calls] == ["srun"] + ["torchrun"] * 4
    for rank, call in enumerate(calls[1:]):
        assert option(call["argv"], "--node_rank") == str(rank)
        assert option(call["argv"], "--master_addr") == "gpu07"
        assert call["argv"][-2:] == ["--seed", "3"]


def test_multinode_launcher_ssh_per_host(recorder, tmp_path):
    script = "examples/internvl3_38b/2nd_finetune.sh"
    base = fake_env(
        recorder, HOSTS="hostA hostB", TRAIN_ITERS="20", OUTPUT_DIR=str(tmp_path / "o"), NCCL_SOCKET_IFNAME="eth0"
    )
    dry = run(["bash", "examples/multinode/launch.sh", script], env={**base, "DRY_RUN": "1"})
    assert recorded(recorder) == []
    commands = [torchrun_argv(ln)[1] for ln in dry.stdout.splitlines() if not ln.startswith("#")]
    assert [option(a, "--node_rank") for a in commands] == ["0", "1"]
    assert all(option(a, "--master_addr") == "hostA" and option(a, "--nnodes") == "2" for a in commands)
    run(["bash", "examples/multinode/launch.sh", script], env=base)
    calls = recorded(recorder)
    ssh = [c for c in calls if c["argv"][0] == "ssh"]
    runs = sorted((c for c in calls if c["argv"][0] == "torchrun"), key=lambda c: option(c["argv"], "--node_rank"))
    assert sorted(c["argv"][-2] for c in ssh) == ["hostA", "hostB"]
    assert all("NCCL_SOCKET_IFNAME=eth0" in c["argv"][-1] for c in ssh)  # NCCL settings travel along
    assert [c["argv"] for c in runs] == commands  # what ran is what the dry run printed


def test_preprocess_wrapper_dry_run():
    proc = run(
        ["bash", "examples/preprocess.sh", "--no-progress"],
        env={"DRY_RUN": "1", "MODEL": "internvl3-2b", "TOKENIZER": "/m/InternVL3-2B", "WORKERS": "3"},
    )
    argv = shlex.split(proc.stdout)
    assert Path(argv[1]) == REPO / "tools" / "preprocess_mm_data.py"
    assert option(argv, "--model") == "internvl3-2b" and option(argv, "--tokenizer") == "/m/InternVL3-2B"
    assert option(argv, "--output-prefix") == "data/shards/internvl3-2b" and option(argv, "--seq-length") == "16384"
    assert values(argv, "--meta") == [str(EXAMPLES / "data" / "meta_example.json")]
    assert option(argv, "--workers") == "3" and argv[-1] == "--no-progress"


# ------------------------------------------------------------------------------------------------
# the layouts come from the planner
def test_recorded_layouts_are_the_planners_numbers():
    """Re-plan every row's layout with today's planner: it fits and the recorded estimates match."""
    for r in ROWS:
        p = gen.replan(r)
        assert p.fits, r
        assert (round(p.peak_gib, 1), round(p.step_time_s, 1), round(p.mfu, 3)) == (r.peak_gib, r.step_s, r.mfu), r
        assert r.gpus >= gen.SIZES[r.model] and (r.gpus // gen.SIZES[r.model]) & (r.gpus // gen.SIZES[r.model] - 1) == 0


def test_recorded_layouts_are_the_planners_fastest_choice():
    """The planner's search picks the recorded layouts (the cheap 1B / 2B searches; the rest take
    minutes on two cores and are covered by the re-plan check above)."""
    for r in ROWS:
        if r.model in ("internvl3-1b", "internvl3-2b"):
            assert gen.plan_row(r.model, r.stage) == r


def test_layout_rows_round_trip_through_the_tsv(tmp_path):
    path = tmp_path / "layouts.tsv"
    path.write_text(gen.format_tsv(ROWS))
    assert gen.read_tsv(str(path)) == ROWS
    bad = gen.format_tsv(ROWS[:1]).replace("\t8\t", "\t8\t9\t", 1)
    path.write_text(bad)
    with pytest.raises(ValueError, match=r"layouts.tsv:\d+"):
        gen.read_tsv(str(path))


def test_stage_trainable_parts_follow_the_stage_presets():
    from internvl_mcore.config.training import STAGES

    for name, preset in STAGES.items():
        parts = gen.trainable_parts(name)
        assert ("vision" in parts, "projector" in parts, "llm" in parts) == (
            preset.train_vit,
            preset.train_projector,
            preset.train_llm,
        )


# ------------------------------------------------------------------------------------------------
# the example data
def test_example_data_preprocesses_without_rejects(tmp_path):
    from tests.fixtures import make_tokenizer_dir

    prep = _load(REPO / "tools" / "preprocess_mm_data.py", "preprocess_mm_data_cli")
    tok = make_tokenizer_dir(str(tmp_path / "tok"))
    out = tmp_path / "shards" / "ex"
    cwd = os.getcwd()
    os.chdir(REPO)  # the meta file's paths are relative to the repository root, as InternVL's
    try:
        code = prep.main(
            [
                "--meta",
                str(EXAMPLES / "data" / "meta_example.json"),
                "--tokenizer",
                tok,
                "--output-prefix",
                str(out),
                "--model",
                "debug",
                "--seq-length",
                "2048",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
    finally:
        os.chdir(cwd)
    assert code == 0
    manifest = json.loads((tmp_path / "shards" / "ex.manifest.json").read_text())
    jsonl_lines = (EXAMPLES / "data" / "example.jsonl").read_text().splitlines()
    meta = json.loads((EXAMPLES / "data" / "meta_example.json").read_text())
    import pyarrow.parquet as pq

    parquet_rows = pq.ParquetFile(EXAMPLES / "data" / "example.parquet").metadata.num_rows
    expected = len(jsonl_lines) * int(meta["example_chat"]["repeat_time"]) + parquet_rows * int(
        meta["example_parquet"]["repeat_time"]
    )
    assert manifest["counts"]["rejects"] == 0
    assert manifest["counts"]["samples"] == manifest["counts"]["inputs"] == expected
    assert meta["example_chat"]["length"] == len(jsonl_lines) and meta["example_parquet"]["length"] == parquet_rows


def test_example_files_are_what_the_generator_makes(tmp_path):
    """Committed images, frames and parquet equal make_example_data.py's output (pixels and rows)."""
    from PIL import Image
    import pyarrow.parquet as pq

    maker = _load(EXAMPLES / "data" / "make_example_data.py", "make_example_data")
    maker.write_all(str(tmp_path))
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert made == sorted(p.relative_to(EXAMPLES / "data") for p in (EXAMPLES / "data").rglob("*.png"))
    for rel in made:
        with Image.open(tmp_path / rel) as a, Image.open(EXAMPLES / "data" / rel) as b:
            assert a.size == b.size and a.tobytes() == b.tobytes(), rel
    assert (
        pq.read_table(tmp_path / "example.parquet").to_pylist()
        == pq.read_table(EXAMPLES / "data" / "example.parquet").to_pylist()
    )


def test_moe_example_runs_the_planned_expert_parallel_layout():
    """examples/moe: the dry-run command carries EP, the trainer accepts it, and the planner agrees
    that the layout fits (the script's header states the planner's numbers)."""
    pretrain = _load(REPO / "pretrain_internvl.py", "pretrain_internvl")
    from internvl_mcore.plan import HARDWARE, Layout, Workload, plan
    from internvl_mcore.training.loop import validate

    script = EXAMPLES / "moe" / "internvl3_5_30b_a3b_stage2.sh"
    line = run(["bash", str(script)], env={"DRY_RUN": "1", "TRAIN_ITERS": "100"}).stdout
    argv = torchrun_argv(line)[1]
    args = argv[next(i for i, w in enumerate(argv) if w.endswith("pretrain_internvl.py")) + 1 :]
    run_cfg = pretrain.parse_run_config(args)
    validate(run_cfg)
    p = run_cfg.parallel
    assert (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
        p.expert_model_parallel_size,
    ) == (4, 2, 2, 2) and p.sequence_parallel
    lay = Layout(4, 2, 2, 1, True, True, False, first_stage_layers=18, ep=2)
    planned = plan(
        run_cfg.model, lay, Workload(trainable=frozenset({"vision", "projector", "llm"})), HARDWARE["a100-80gb"]
    )
    assert planned.fits and f"{planned.peak_gib:.1f} GiB" in script.read_text()
    bad = run(["bash", str(script)], env={"DRY_RUN": "1", "TRAIN_ITERS": "100", "EP": "3"}, check=False)
    assert bad.returncode != 0 and "EP=3 must divide DP x CP" in bad.stderr
