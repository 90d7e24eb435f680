#!/usr/bin/env bash
# Build the packed training shards the stage scripts read (their default DATA_PATH is
# data/shards/MODEL): InternVL meta JSON (JSONL / parquet annotations + images) -> tokens, tiles,
# V2PE positions in SEQ_LENGTH-token packs.
#
#   MODEL=internvl3-8b TOKENIZER=checkpoints/hf/InternVL3-8B META=examples/data/meta_example.json \
#       bash examples/preprocess.sh [more tools/preprocess_mm_data.py flags]
#   DRY_RUN=1 MODEL=internvl3-8b TOKENIZER=... bash examples/preprocess.sh   # print the command only
#
# Environment: MODEL (required: image size / patch / pixel-shuffle ratio come from the preset),
# TOKENIZER (required: the HF checkpoint directory with the tokenizer files), META
# [examples/data/meta_example.json], OUTPUT_PREFIX [data/shards/MODEL], SEQ_LENGTH [16384, the stage
# scripts' default], WORKERS [number of CPUs], PYTHON [python], DRY_RUN [0].
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${MODEL:?set MODEL, e.g. internvl3-8b}"
: "${TOKENIZER:?set TOKENIZER to the directory holding the model tokenizer files}"
read -r -a metas <<< "${META:-$REPO/examples/data/meta_example.json}"
OUTPUT_PREFIX=${OUTPUT_PREFIX:-data/shards/$MODEL}
SEQ_LENGTH=${SEQ_LENGTH:-16384}
WORKERS=${WORKERS:-$(nproc 2>/dev/null || echo 1)}

cmd=(
  "${PYTHON:-python}" "$REPO/tools/preprocess_mm_data.py" --meta "${metas[@]}" --tokenizer "$TOKENIZER"
  --model "$MODEL" --output-prefix "$OUTPUT_PREFIX" --seq-length "$SEQ_LENGTH" --workers "$WORKERS" "$@"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; printf '\n'
  exit 0
fi
mkdir -p "$(dirname "$OUTPUT_PREFIX")"
exec "${cmd[@]}"
