#!/usr/bin/env bash
# One command that checks the GPU path on a CUDA machine, in < 10 minutes: one PASS / FAIL / SKIP line
# per check (tools/gpu_check.py lists them), exit 1 if any FAILed.
#   bash scripts/gpu_check.sh [--only CHECK ...] [--work DIR]
# Which python: $PYTHON, else .venv/bin/python when there is one, else python3. It must import torch:
# a python that cannot is an error (exit 3), not "no GPU". Without a CUDA GPU it says so and exits 0.
# This package runs from the working tree (PYTHONPATH); it is never pip-installed here, so no other
# torch can come with it. Wheels carried in .whl/ (scripts/gpu_wheels.sh, e.g. megatron-core for a
# machine without network) are installed with --no-index --no-deps into $GPU_CHECK_SITE, only when
# megatron.core is not importable already. Data: .gpu_data/ (made by scripts/gpu_wheels.sh) when
# carried, else tools/gpu_check.py makes it here from scikit-learn's digits (then sklearn is needed).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

if ! err=$("$PY" -c "import torch" 2>&1); then
    echo "gpu_check: $PY cannot import torch ($(echo "$err" | tail -n 1)); run it with a python that has torch (PYTHON=...)" >&2
    exit 3
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU present (torch.cuda.is_available() is False); nothing to check, exit 0"
    exit 0
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import megatron.core" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${GPU_CHECK_SITE:-/tmp/internvl_mcore_gpu_site}
    before=$("$PY" -c "import torch; print(torch.__version__)")
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || {
        echo "gpu_check: installing the carried wheels (.whl/) into $SITE failed" >&2; exit 1; }
    export PYTHONPATH="$SITE:$PYTHONPATH"
    after=$("$PY" -c "import torch; print(torch.__version__)")
    [ "$before" = "$after" ] || { echo "gpu_check: torch changed from $before to $after" >&2; exit 1; }
    echo "gpu_check: installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE"
fi

DATA_ARGS=()
NEEDS="megatron.core transformers PIL numpy pyarrow safetensors tokenizers sentencepiece tiktoken einops psutil"
if [ -f .gpu_data/READY ]; then
    DATA_ARGS=(--data "$REPO/.gpu_data")
else
    NEEDS="$NEEDS sklearn"  # the digits shards are made here: sklearn.datasets.load_digits
fi
missing=$("$PY" - $NEEDS <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m.split(".")[0]) is None
               or (m == "megatron.core" and importlib.util.find_spec(m) is None)))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: $PY lacks: $missing. megatron.core: run scripts/gpu_wheels.sh where a registry is reachable and carry .whl/; sklearn: the digits data (or carry .gpu_data/ from scripts/gpu_wheels.sh)" >&2
    exit 1
fi
exec timeout 590 "$PY" tools/gpu_check.py "${DATA_ARGS[@]}" "$@"
