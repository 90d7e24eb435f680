#!/usr/bin/env bash
# Set up (scripts/setup.sh), then train the debug model on mock data with TP2 x PP2 on 4 CPU processes
# and the same run on 1 process, and show that both print the same losses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
out=${OUT:-runs/demo}
mkdir -p "$out"
rm -f "$out"/tp2pp2.jsonl "$out"/single.jsonl
args=(--model debug --mock-data --global-batch-size 4 --train-iters 5 --seq-length 256 --lr 1e-3)
echo "== TP2 x PP2 on 4 processes"
.venv/bin/torchrun --nproc_per_node 4 pretrain_internvl.py "${args[@]}" \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --log-jsonl "$out/tp2pp2.jsonl" 2>&1 | grep -E "^iteration|Error" || true
echo "== 1 process"
.venv/bin/torchrun --nproc_per_node 1 pretrain_internvl.py "${args[@]}" --log-jsonl "$out/single.jsonl" 2>&1 | grep -E "^iteration|Error" || true
.venv/bin/python - "$out" <<'PY'
import json, sys
d = sys.argv[1]
a = [json.loads(l)["loss"] for l in open(f"{d}/tp2pp2.jsonl")]
b = [json.loads(l)["loss"] for l in open(f"{d}/single.jsonl")]
worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
print(f"max relative loss difference TP2xPP2 vs 1 process: {worst:.2e}")
sys.exit(0 if len(a) == len(b) == 5 and worst <= 1e-5 else 1)
PY
