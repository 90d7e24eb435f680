"""bench/train_throughput.py --quick runs end to end and prints every field it promises.

No timings are asserted (the machine is shared); the script itself refuses to report when our
model and transformers' disagree on the warm-up loss, so a zero exit also means they agreed.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FIELDS = {  # printed label -> pattern of the number(s) after it
    "fp32 GEMM peak": r"fp32 GEMM peak \(\d+\^2 matmul, \d+ threads\): ([\d.]+) GFLOP/s",
    "model FLOPs": r"model FLOPs per train step: ([\d.]+) TFLOP",
    "CPU-MFU": r"CPU-MFU ([\d.]+)%",
    "effective tokens/s": r"effective tokens/s: ours ([\d.]+), transformers ([\d.]+)",
    "ratio": r"ratio ours / transformers: ([\d.]+)x",
    "warm-up losses": r"loss ours ([\d.]+), transformers ([\d.]+)",
}
# printed label -> pattern of numbers that may be 0 (a tiny model's step may fit in memory freed before)
NONNEGATIVE = {
    "peak memory": r"peak memory per step above the resident model and optimizer state: ours (-?[\d.]+) "
    r"MiB, transformers (-?[\d.]+) MiB"
}


def test_quick_run_prints_every_field() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # one torch thread: with one per core, on a machine whose cores the other tests keep busy, the OpenMP
    # threads spin waiting for each other (tiny steps: 17.9 CPU-s for the run, 9.1 with one thread)
    proc = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--quick", "--threads", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name, pattern in FIELDS.items():
        m = re.search(pattern, proc.stdout)
        assert m is not None, f"{name!r} missing from the output:\n{proc.stdout}"
        values = [float(v) for v in m.groups()]
        assert all(math.isfinite(v) and v > 0 for v in values), f"{name}: {values}"
    for name, pattern in NONNEGATIVE.items():
        m = re.search(pattern, proc.stdout)
        assert m is not None, f"{name!r} missing from the output:\n{proc.stdout}"
        assert all(math.isfinite(float(v)) and float(v) >= 0 for v in m.groups()), f"{name}: {m.groups()}"
