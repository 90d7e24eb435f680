"""Shared inputs of the CLI tests, built once per session (a preprocessing run and the digits set: ~3 CPU-s
each time a file rebuilt them) and only read: a test that writes over a shard set works on a copy
(test_cli_preprocess.py `own_prefix`, cli_helpers.copy_prefix)."""

import pytest

from tests.reliability.cli_helpers import in_process, preprocess_args


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """A tiny digits dataset (16 training records) and its tokenizer (the debug model's ids)."""
    from internvl_mcore.data.digits import build_digits_dataset

    return build_digits_dataset(str(tmp_path_factory.mktemp("digits")), multi_image=2, text_only=2, max_single=12)


@pytest.fixture(scope="session")
def good_prefix(digits, tmp_path_factory) -> str:
    """A good shard set made by the CLI's `main` in this process (--workers 1: no worker processes; the
    launched CLI's successful run is test_cli_preprocess.py's test_bad_records_are_rejected_with_file_and_line)."""
    out = tmp_path_factory.mktemp("shards") / "dg"
    assert in_process("preprocess_mm_data", *preprocess_args(digits.meta, digits.tokenizer, out)) == 0
    return str(out)
