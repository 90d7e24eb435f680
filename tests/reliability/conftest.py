"""The digits shards of tests/training (session-scoped there), for the --valid-data-path test."""
from tests.training.conftest import digits_shards  # noqa: F401
