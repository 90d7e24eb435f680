#!/usr/bin/env bash
# The digits demo: set up .venv (scripts/setup.sh), then build real handwritten-digit data, preprocess,
# train stage 1 (projector) and stage 2 (all) with pipeline parallelism 2 on 2 CPU processes, export to
# transformers, answer the held-out questions and draw the loss curve. Output in runs/demo (OUT=...).
# Extra arguments go to examples/digits/run_demo.py (see --help; e.g. --layout tp2, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python examples/digits/run_demo.py --out "${OUT:-runs/demo}" "$@"
