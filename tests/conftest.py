"""Fixtures every test directory may use: the 1-rank gloo world of in-process tests and the digits
shard sets (each preprocessed once per test session by the real CLI)."""
import subprocess
import sys

import pytest

from tests.launch import REPO

SEQ = 256


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
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_mm_data.py"), "--meta", d.meta,
                    "--tokenizer", d.tokenizer, "--output-prefix", str(prefix), "--seq-length", str(SEQ),
                    "--model", "debug", "--workers", "1", "--no-progress"],
                   check=True, cwd=REPO, capture_output=True, timeout=300)
    return str(prefix)


@pytest.fixture(scope="session")
def preference_shards(tmp_path_factory):
    """The digits preference set (chosen = right digit, rejected = a wrong one), 2 pairs per pack."""
    from internvl_mcore.data.digits import build_digits_dataset

    root = tmp_path_factory.mktemp("digits_pref")
    d = build_digits_dataset(str(root), multi_image=4, text_only=4, max_single=20, preference_pairs=48)
    prefix = root / "shards" / "pref"
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_mm_data.py"), "--meta", d.preference_meta,
                    "--tokenizer", d.tokenizer, "--output-prefix", str(prefix), "--seq-length", "800",
                    "--model", "debug", "--preference", "--workers", "1", "--no-progress"],
                   check=True, cwd=REPO, capture_output=True, timeout=300)
    return str(prefix)
