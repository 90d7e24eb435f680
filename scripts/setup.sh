#!/usr/bin/env bash
# Create .venv (Python 3.11) with torch 2.13.0 (CPU wheel here; on GPU clusters use the Dockerfile)
# and this package with its test extras. Re-running is cheap: it reinstalls only when setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.internvl-mcore-installed"
want=$(sha256sum setup.py | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # one resolver run for both (the same 100 packages as a call each: one index pass less); the
  # packages' bytecode compiled on every core afterwards instead of by pip on one (measured on the
  # 2-core machine: install 57.7 s -> 20.8 s + 24.9 s, the same .pyc files). pip ignores a file that
  # does not compile (a package's Python 2 example); so does this.
  "$VENV/bin/python" -m pip install -q --no-compile torch==2.13.0 -e ".[dev]"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$VENV/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
# our own modules' bytecode (pip compiled the installed packages'): with PYTHONDONTWRITEBYTECODE set
# no process would cache it, and every rank, tool and worker the tests start would compile each module
# of ours it imports again (~0.16 CPU-s a rank). Test modules are left to pytest (it rewrites them).
# Up-to-date files cost a stat each.
"$VENV/bin/python" -m compileall -q -x '(^|/)(test_[^/]*|conftest)\.py$' internvl_mcore tests tools bench examples >/dev/null
