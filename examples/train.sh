#!/usr/bin/env bash
# The one launcher behind every examples/internvl3_*/*.sh script: turns environment variables into a
# torchrun command for pretrain_internvl.py, on one node or on node NODE_RANK of NNODES.
#
#   MODEL=internvl3-8b STAGE=2 TP=4 bash examples/train.sh [more pretrain_internvl.py flags]
#   DRY_RUN=1 bash examples/internvl3_8b/stage2.sh     # print the command (stdout) and a summary (stderr)
#
# Set by the per-size scripts (their values come from the capacity planner, see examples/layouts.tsv):
#   MODEL STAGE STAGE_NAME        preset (--model), stage preset (--stage 1|1.5|2|finetune), output sub-dir
#   TP PP CP                      tensor / pipeline / context parallel sizes (default 1)
#   EP                            MoE models: expert parallel size (default 1), out of DP x CP
#   SEQUENCE_PARALLEL=0|1 DISTRIBUTED_OPTIMIZER=0|1 RECOMPUTE=0|1 (full) FIRST_STAGE_LAYERS=N (decoder
#                                 layers on pipeline stage 0, which also holds the ViT; empty: even split)
#   LAST_STAGE_LAYERS=N (decoder layers on the last stage, which also holds the output layer and loss)
#   VIRTUAL_STAGES=V (model chunks per pipeline rank, the interleaved schedule; 1: none)
# The job (defaults in brackets), as InternVL's shell scripts take them:
#   GPUS [8]                      GPUs over all nodes; DP = GPUS / (TP x PP x CP)
#   GPUS_PER_NODE [8]  NNODES [GPUS / GPUS_PER_NODE, at least 1]  NODE_RANK [0]
#   MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   BATCH_SIZE [128]              packed sequences per optimizer step (--global-batch-size)
#   PER_DEVICE_BATCH_SIZE [1]     packed sequences per microbatch (--micro-batch-size); the rest of
#                                 BATCH_SIZE is gradient accumulation: BATCH_SIZE / (PER_DEVICE_BATCH_SIZE x DP)
#   SEQ_LENGTH [16384]            tokens per pack; must equal the --seq-length the shards were built with
#   DATA_PATH [data/shards/MODEL] shard prefixes from tools/preprocess_mm_data.py (examples/preprocess.sh),
#                                 optionally weighted: "0.7 data/a 0.3 data/b"
#   EPOCHS [1]  TRAIN_ITERS       TRAIN_ITERS defaults to EPOCHS x (packs in DATA_PATH's manifests) / BATCH_SIZE
#   LR_WARMUP_ITERS [3% of TRAIN_ITERS]  WEIGHT_DECAY [0.05]  LR [the stage preset's]
#   PRETRAINED [per stage]        starting weights: a training checkpoint or tools/convert_from_hf.py output;
#                                 set it empty to start from fresh weights
#   OUTPUT_DIR [work_dirs/MODEL/STAGE_NAME]  SAVE_INTERVAL [200]; a run whose OUTPUT_DIR already holds a
#                                 checkpoint resumes from it (--load) instead of starting from PRETRAINED
#   BF16 [1]  PEAK_FLOPS [312e12, A100 dense bf16; H100 989e12] for the logged MFU
#   TORCHRUN [torchrun]  PYTHON [python]  DRY_RUN [0]
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "examples/train.sh: $*" >&2; exit 2; }
int() { [[ ${!1} =~ ^[0-9]+$ ]] || die "$1=${!1} is not a non-negative integer"; }

: "${MODEL:?set MODEL, e.g. internvl3-8b (or run a per-size script such as examples/internvl3_8b/stage2.sh)}"
: "${STAGE:?set STAGE to 1, 1.5, 2 or finetune}"
STAGE_NAME=${STAGE_NAME:-stage$STAGE}

GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
int GPUS; int GPUS_PER_NODE
(( GPUS > 0 && GPUS_PER_NODE > 0 )) || die "GPUS and GPUS_PER_NODE must be positive"
if [[ -z ${NNODES:-} ]]; then
  (( GPUS <= GPUS_PER_NODE || GPUS % GPUS_PER_NODE == 0 )) || \
    die "GPUS=$GPUS is more than one node but not a multiple of GPUS_PER_NODE=$GPUS_PER_NODE (or set NNODES)"
  NNODES=$(( GPUS > GPUS_PER_NODE ? GPUS / GPUS_PER_NODE : 1 ))
fi
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}; PP=${PP:-1}; CP=${CP:-1}; EP=${EP:-1}
BATCH_SIZE=${BATCH_SIZE:-128}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
SEQ_LENGTH=${SEQ_LENGTH:-16384}
for v in NNODES NODE_RANK MASTER_PORT TP PP CP EP BATCH_SIZE PER_DEVICE_BATCH_SIZE SEQ_LENGTH; do int "$v"; done
(( NNODES > 0 && TP > 0 && PP > 0 && CP > 0 && PER_DEVICE_BATCH_SIZE > 0 )) || die "NNODES, TP, PP, CP and PER_DEVICE_BATCH_SIZE must be positive"
(( GPUS % NNODES == 0 )) || die "GPUS=$GPUS is not divisible by NNODES=$NNODES"
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
NPROC_PER_NODE=$(( GPUS / NNODES ))
(( GPUS % (TP * PP * CP) == 0 )) || die "GPUS=$GPUS is not divisible by TP x PP x CP = $TP x $PP x $CP"
DP=$(( GPUS / (TP * PP * CP) ))
(( EP > 0 && (DP * CP) % EP == 0 )) || die "EP=$EP must divide DP x CP = $DP x $CP (experts are split over data/context-parallel ranks)"
(( BATCH_SIZE % (PER_DEVICE_BATCH_SIZE * DP) == 0 )) || \
  die "BATCH_SIZE=$BATCH_SIZE is not divisible by PER_DEVICE_BATCH_SIZE x DP = $PER_DEVICE_BATCH_SIZE x $DP"
GRADIENT_ACC=$(( BATCH_SIZE / (PER_DEVICE_BATCH_SIZE * DP) ))
if (( NNODES > 1 )) && [[ $MASTER_ADDR == 127.0.0.1 ]]; then
  echo "examples/train.sh: warning: NNODES=$NNODES but MASTER_ADDR is 127.0.0.1 (set it to node 0's address)" >&2
fi

read -r -a DATA_PATH_WORDS <<< "${DATA_PATH:-data/shards/$MODEL}"
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/$MODEL/$STAGE_NAME}
EPOCHS=${EPOCHS:-1}
if [[ -z ${TRAIN_ITERS:-} ]]; then
  # one epoch = every pack of every prefix once (weights in DATA_PATH are ignored for the count)
  TRAIN_ITERS=$("${PYTHON:-python}" - "$EPOCHS" "$BATCH_SIZE" "${DATA_PATH_WORDS[@]}" <<'EOF'
import json, math, sys
epochs, batch, words = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
packs = 0
for word in words:
    try:
        float(word)
        continue  # a blend weight
    except ValueError:
        pass
    try:
        with open(word + ".manifest.json", encoding="utf-8") as f:
            packs += int(json.load(f)["counts"]["packs"])
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"examples/train.sh: cannot count the packs of DATA_PATH prefix {word} ({exc}); "
                 "build the shards first (examples/preprocess.sh) or set TRAIN_ITERS")
print(max(1, math.ceil(epochs * packs / batch)))
EOF
)
fi
int TRAIN_ITERS
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-$(( TRAIN_ITERS * 3 / 100 ))}
SAVE_INTERVAL=${SAVE_INTERVAL:-200}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.05}
PEAK_FLOPS=${PEAK_FLOPS:-312e12}

case $STAGE_NAME in  # each stage starts where the previous one saved
  stage1_5) default_pretrained=work_dirs/$MODEL/stage1 ;;
  stage2) default_pretrained=work_dirs/$MODEL/stage1_5 ;;
  *) default_pretrained=checkpoints/$MODEL ;;
esac
PRETRAINED=${PRETRAINED-$default_pretrained}

args=(
  --model "$MODEL" --stage "$STAGE"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP"
)
(( EP > 1 )) && args+=(--expert-model-parallel-size "$EP")
[[ ${SEQUENCE_PARALLEL:-0} == 1 ]] && args+=(--sequence-parallel)
[[ -n ${FIRST_STAGE_LAYERS:-} ]] && args+=(--decoder-first-pipeline-num-layers "$FIRST_STAGE_LAYERS")
[[ -n ${LAST_STAGE_LAYERS:-} ]] && args+=(--decoder-last-pipeline-num-layers "$LAST_STAGE_LAYERS")
(( ${VIRTUAL_STAGES:-1} > 1 )) && args+=(--num-virtual-stages-per-pipeline-rank "$VIRTUAL_STAGES")
[[ ${RECOMPUTE:-0} == 1 ]] && args+=(--recompute-granularity full)
[[ ${DISTRIBUTED_OPTIMIZER:-0} == 1 ]] && args+=(--use-distributed-optimizer)
[[ ${BF16:-1} == 1 ]] && args+=(--bf16)
args+=(
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$PER_DEVICE_BATCH_SIZE" --global-batch-size "$BATCH_SIZE"
  --train-iters "$TRAIN_ITERS" --lr-warmup-iters "$LR_WARMUP_ITERS" --weight-decay "$WEIGHT_DECAY"
)
[[ -n ${LR:-} ]] && args+=(--lr "$LR")
args+=(--data-path "${DATA_PATH_WORDS[@]}")
if [[ -f $OUTPUT_DIR/latest_checkpointed_iteration.txt ]]; then
  args+=(--load "$OUTPUT_DIR")       # resume: model, optimizer, schedule, RNG and data position
elif [[ -n $PRETRAINED ]]; then
  args+=(--pretrained "$PRETRAINED")
fi
args+=(
  --save "$OUTPUT_DIR" --save-interval "$SAVE_INTERVAL"
  --log-jsonl "$OUTPUT_DIR/train.jsonl" --tensorboard-dir "$OUTPUT_DIR/tensorboard" --peak-flops "$PEAK_FLOPS"
)

# megatron-core's tensor-parallel communication overlap wants one CUDA work queue
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
cmd=(
  "${TORCHRUN:-torchrun}" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  "$REPO/pretrain_internvl.py" "${args[@]}" "$@"
)

{
  echo "# $MODEL --stage $STAGE: $GPUS GPUs = $NNODES node(s) x $NPROC_PER_NODE (this is node $NODE_RANK)"
  echo "# layout TP$TP PP$PP CP$CP DP$DP; $BATCH_SIZE packs per step = $PER_DEVICE_BATCH_SIZE per microbatch x $GRADIENT_ACC microbatches x DP $DP"
  echo "# $TRAIN_ITERS iterations x $BATCH_SIZE x $SEQ_LENGTH tokens; output $OUTPUT_DIR"
} >&2
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf 'CUDA_DEVICE_MAX_CONNECTIONS=%q' "$CUDA_DEVICE_MAX_CONNECTIONS"
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi

mkdir -p "$OUTPUT_DIR"
log=$OUTPUT_DIR/training_log.txt
(( NNODES > 1 )) && log=$OUTPUT_DIR/training_log.node$NODE_RANK.txt
"${cmd[@]}" 2>&1 | tee -a "$log"
