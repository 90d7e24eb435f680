#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU; `--quick`: only the quick tier
# (pytest -m quick, the table in tests/conftest.py, under 3 minutes). Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then args+=(-m quick); else args+=("$a"); fi
done
exec .venv/bin/python -m pytest -q "${args[@]}"
