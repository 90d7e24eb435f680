"""Shared fixtures: a small digits dataset preprocessed once per test session."""
import subprocess
import sys

import pytest

from tests.launch import REPO

SEQ = 256


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
