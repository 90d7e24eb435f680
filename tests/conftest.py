"""Fixtures every test directory may use: the 1-rank gloo world of in-process tests, the digits
shard sets (each preprocessed once per test session by the real CLI), pretrain_internvl.py runs as
jobs of the session's reused worlds (`pretrain`) and their cache (`pretrain_log`: one run per
distinct command, whichever test asks first); and the quick tier.

The quick tier (`pytest -m quick`, `bash scripts/test.sh --quick`: under 3 minutes, docs/testing.md) is
the table QUICK below, the one place it is defined: an explicit list, not a rule, because what makes a
test slow (a torchrun launch, a subprocess, a fixture that trains) is not visible from its name or
module, and a rule would silently pull in every new slow test of a module. A table entry naming nothing
collected from its file fails the run, so the table cannot rot silently.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.launch import REPO, run_ending_group
from tests.threads import one_torch_thread  # noqa: F401 (autouse in every test module: tests/threads.py)

pytest_plugins = ("tests.cpuprofile", "tests.xdist_plan")  # `--cpu-profile FILE`; `-n 2`: tests/xdist_plan.py

SEQ = 256
DIGITS_ITERS = 10


def digits_run_args(shards: str, *flags: str) -> list[str]:
    """pretrain_internvl.py's flags for DIGITS_ITERS steps of the debug model on the digits shards
    (seed 5, loader tiling): with no `flags` the single-process run that tests/training's layout and
    tiling tests share through `pretrain_log`."""
    return [
        "--model",
        "debug",
        "--data-path",
        shards,
        "--global-batch-size",
        "4",
        "--train-iters",
        str(DIGITS_ITERS),
        "--seq-length",
        str(SEQ),
        "--lr",
        "2e-3",
        "--lr-warmup-iters",
        "2",
        "--seed",
        "5",
        "--image-tiling",
        "loader",
        *flags,
    ]


QUICK = (  # node ids or node-id prefixes (a file, a file::test): the single-process unit tests of each package
    "tests/test_structure.py",  # structure and docs
    "tests/test_plumbing.py",
    "tests/config/test_problems.py",
    "tests/data/test_image.py",  # exactness of the data transforms
    "tests/data/test_packing.py",
    "tests/data/test_template.py",
    "tests/data/test_tokenizer.py",
    "tests/data/test_shards.py",
    "tests/data/test_sources.py",
    "tests/data/test_resample.py",
    "tests/data/test_source_tiles.py",
    "tests/data/test_preference.py",
    "tests/models/test_hf_parity.py",  # model parity with transformers
    "tests/models/test_rope.py",
    "tests/models/test_packed_attention.py",
    # conversion round trips on tiny models, in this process (test_round_trip_bit_exact spawns TP2 x PP2)
    "tests/convert/test_convert.py::test_internvl_layout_exports_to_transformers_with_same_logits",
    "tests/convert/test_convert.py::test_reads_transformers_module_names_too",
    "tests/convert/test_convert.py::test_config_round_trip_for_every_preset",
    "tests/convert/test_convert.py::test_refuses",
    "tests/plan/test_counts_and_flops.py",
    "tests/parallel/test_cpu_compat.py",
    # the one multi-process check: TP2 = single process, loss and every gradient (2 gloo ranks)
    "tests/parallel/test_layout_parity.py::test_layout_matches_single_process[debug-tp2-pp1-w2]",
)


def _quick(nodeid: str, entry: str) -> bool:
    return nodeid == entry or nodeid.startswith(entry + ("::" if entry.endswith(".py") else ""))


@pytest.hookimpl(tryfirst=True)  # before `-m quick` deselects
def pytest_collection_modifyitems(config, items):
    """Mark the QUICK table's tests; an entry whose whole file was collected but which names no test
    there is an error."""
    whole_files = not any("::" in str(a) for a in config.args)
    files = {item.nodeid.split("::")[0] for item in items} if whole_files else set()
    unused = set(QUICK)
    for item in items:
        for entry in QUICK:
            if _quick(item.nodeid, entry):
                item.add_marker(pytest.mark.quick)
                unused.discard(entry)
    stale = [e for e in unused if e.split("::")[0] in files]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py QUICK names tests that do not exist: {stale}")


@pytest.fixture(scope="module")
def world():
    """This process as a 1-rank gloo world with megatron-core's groups (seed 1); returns its layout.
    Module scope: each test module starts from the same seeds."""
    from internvl_mcore.config import ParallelConfig
    from internvl_mcore.parallel.state import init_distributed

    init_distributed(ParallelConfig(), seed=1)
    return ParallelConfig()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    from internvl_mcore.data.digits import build_digits_dataset

    root = tmp_path_factory.mktemp("digits")
    d = build_digits_dataset(str(root), multi_image=40, text_only=20, max_single=160)
    prefix = root / "shards" / "digits"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_mm_data.py"),
            "--meta",
            d.meta,
            "--tokenizer",
            d.tokenizer,
            "--output-prefix",
            str(prefix),
            "--seq-length",
            str(SEQ),
            "--model",
            "debug",
            "--workers",
            "1",
            "--no-progress",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    return str(prefix)


@pytest.fixture(scope="session")
def preference_shards(tmp_path_factory):
    """The digits preference set (chosen = right digit, rejected = a wrong one), 2 pairs per pack."""
    from internvl_mcore.data.digits import build_digits_dataset

    root = tmp_path_factory.mktemp("digits_pref")
    d = build_digits_dataset(str(root), multi_image=4, text_only=4, max_single=20, preference_pairs=48)
    prefix = root / "shards" / "pref"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_mm_data.py"),
            "--meta",
            d.preference_meta,
            "--tokenizer",
            d.tokenizer,
            "--output-prefix",
            str(prefix),
            "--seq-length",
            "800",
            "--model",
            "debug",
            "--preference",
            "--workers",
            "1",
            "--no-progress",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    return str(prefix)


# the rendezvous variables in-process tests leave in this process (tests/reliability/common.py drops the same)
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def one_process(script, args: list[str], timeout: float = 400.0) -> subprocess.CompletedProcess:
    """`script args` as one process without torchrun (the trainer starts its own 1-rank world), with
    the environment `tests.launch.torchrun` gives its ranks (OMP_NUM_THREADS=1: the same kernels, so
    the same bits) and none of this pytest process's leftover rendezvous variables; raises with the
    output if it fails or hangs."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = run_ending_group([sys.executable, str(script), *args], env=env, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def pretrain(nproc: int, args: list[str], timeout: float = 400.0) -> str:
    """`torchrun --nproc_per_node nproc pretrain_internvl.py args` as a job of the session's reused world
    of `nproc` ranks (tests/worldpool.py; also for 1: no interpreter start, no torch/megatron-core
    import, and the loader's fork server of an earlier job is reused); returns the ranks' output, raises
    with it if the run fails. For tests whose subject is not the launch itself (exit codes, signals,
    one-line errors, torchrun: those keep `tests.launch.torchrun` / `one_process`). The losses are the
    torchrun launch's bit for bit (tests/training/test_pretrain_mock.py checks it)."""
    from tests.worldpool import run_in_world

    return run_in_world(REPO / "pretrain_internvl.py", nproc, args, timeout=timeout)


@pytest.fixture(scope="session")
def pretrain_log(tmp_path_factory):
    """`pretrain_log(nproc, args)`: the --log-jsonl records of `pretrain_internvl.py args` on `nproc`
    ranks (a job of the session's reused world: `pretrain`), run once per session for each distinct
    (nproc, args) and shared: the single-process run that several files compare their layouts against
    is the same command (tests/training: test_layouts_on_shards.py, test_device_tiling.py). Pass only
    runs whose output is the log: a run that writes elsewhere (--save) is not the same run twice."""
    cache: dict[tuple, list[dict]] = {}

    def run(nproc: int, args: list[str], timeout: float = 400.0) -> list[dict]:
        key = (nproc, tuple(args))
        if key not in cache:
            assert "--log-jsonl" not in args and "--save" not in args, args
            log = tmp_path_factory.mktemp("pretrain_log") / "log.jsonl"
            pretrain(nproc, [*args, "--log-jsonl", str(log)], timeout=timeout)
            cache[key] = [json.loads(line) for line in log.read_text().splitlines()]
        return [dict(r) for r in cache[key]]

    return run


def pytest_terminal_summary(terminalreporter):
    """Say which reused worlds were replaced because a job left gloo groups polling (tests/worldpool.py):
    each is a leak somewhere in what that job ran: one line each names the test, the job and where the
    groups are still referenced from (tests/worldpool.py `group_holders`)."""
    from tests.worldpool import RECYCLED, REPLACED

    if RECYCLED:
        sizes = ", ".join(f"{RECYCLED.count(n)} of {n} ranks" for n in sorted(set(RECYCLED)))
        terminalreporter.write_line(f"worldpool: worlds replaced after a job left gloo groups polling: {sizes}")
    for r in REPLACED:
        held = "; ".join(r["holders"]) or "not searched (WORLDPOOL_HOLDERS=1 finds them; slow)"
        terminalreporter.write_line(f"  {r['test']} ({r['size']} ranks, {r['threads']} gloo threads): held by {held}")
