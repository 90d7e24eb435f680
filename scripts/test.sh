#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU; `--quick`: only the quick tier
# (pytest -m quick, the table in tests/conftest.py, under 3 minutes); `--workers N` (or TEST_WORKERS=N):
# N pytest-xdist workers with tests/xdist_plan.py's units (`-n N --dist loadgroup`, docs/testing.md);
# the default is 1, plain pytest. Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# let every process cache the bytecode it compiles (pytest's rewritten test modules too, once for both
# xdist workers): the suite starts hundreds of interpreters on the same files
unset PYTHONDONTWRITEBYTECODE
workers=${TEST_WORKERS:-1}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) args+=(-m quick) ;;
    --workers) workers=$2; shift ;;
    --workers=*) workers=${1#--workers=} ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [ "$workers" -gt 1 ]; then
  args=(-n "$workers" --dist loadgroup "${args[@]}")
fi
exec .venv/bin/python -m pytest -q "${args[@]}"
