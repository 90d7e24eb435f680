"""Shared inputs of the CLI tests (module scope: each test file builds what it uses once)."""

import pytest

from tests.reliability.cli_helpers import preprocess_args, run


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A tiny digits dataset (16 training records) and its tokenizer (the debug model's ids)."""
    from internvl_mcore.data.digits import build_digits_dataset

    return build_digits_dataset(str(tmp_path_factory.mktemp("digits")), multi_image=2, text_only=2, max_single=12)


@pytest.fixture(scope="module")
def good_prefix(digits, tmp_path_factory) -> str:
    """A good shard set made by the real CLI."""
    out = tmp_path_factory.mktemp("shards") / "dg"
    proc = run("preprocess_mm_data", *preprocess_args(digits.meta, digits.tokenizer, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)
