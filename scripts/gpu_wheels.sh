#!/usr/bin/env bash
# Run on a CPU machine WITH registry access, before a GPU check on a machine without one (no network).
# Downloads into the git-ignored .whl/ the cp312 manylinux wheels of what this package needs and the
# lent GPU machine's image lacks (it has Python 3.12, torch 2.11 + CUDA 13, transformers, safetensors,
# tokenizers, sentencepiece, tiktoken, pillow, pyarrow, numpy, scikit-learn, psutil, einops, tqdm,
# tensorboard, protobuf, packaging): megatron-core 0.16.1 (needs torch, numpy, packaging: all there).
# --no-deps and one version of each (pip refuses an install that holds two); fails over 64 MiB, the
# most that travels with the working tree. scripts/gpu_check.sh installs them with --no-index.
# Also makes .gpu_data/ (git-ignored): the digits shards and CPU-written checkpoints the reference
# checks start from (tools/gpu_check.py --prepare; needs this project's .venv or PYTHON with its deps).
#   bash scripts/gpu_wheels.sh     then carry .whl and .gpu_data to the GPU machine: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
DEST=.whl
LIMIT=$((64 * 1024 * 1024))
WHEELS=("megatron-core==0.16.1")
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

# one version each: the distribution name is the wheel file name up to its first '-'
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "gpu_wheels: more than one version of: $dups" >&2
    exit 1
fi
rm -rf .gpu_data
"$PY" tools/gpu_check.py --prepare .gpu_data >/dev/null
rm -rf .gpu_data/digits  # the shards hold what the checks read
size=$(( $(cat "$DEST"/*.whl | wc -c) + $(find .gpu_data -type f -print0 | xargs -0 cat | wc -c) ))
ls -l "$DEST"
if [ "$size" -gt "$LIMIT" ]; then
    echo "gpu_wheels: $DEST and .gpu_data hold $size bytes, over the $LIMIT that travel with the working tree" >&2
    exit 1
fi
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheel(s) in $DEST/ and the data in .gpu_data/: $size bytes together ($(( (size + 1048575) / 1048576 )) MiB of the 64 MiB limit)"
