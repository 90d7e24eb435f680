"""Preloaded by the preprocessing pool's fork server in test_worker_exception_costs_one_sample: the
workers it forks raise on one record (single:2), as a bug in the sample builder would. (Workers are not
forked from the test process, so a monkeypatch there does not reach them.)"""

from internvl_mcore.data import sources

_real = sources.build_sample


def _flaky(record, tokenizer, opts):
    if record.dataset.name == "single" and record.line == 2:
        raise RuntimeError("boom")
    return _real(record, tokenizer, opts)


sources.build_sample = _flaky
