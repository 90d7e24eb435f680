#!/usr/bin/env bash
# Run a stage script on a SLURM allocation: one srun task per node, each starting torchrun for its
# node's GPUs (the stage script does that with NODE_RANK = SLURM_NODEID and MASTER_ADDR = the
# allocation's first node).
#
#   PARTITION=gpu GPUS=32 sh examples/slurm/launch.sh examples/internvl3_78b/stage2.sh [pretrain flags]
#   DRY_RUN=1 PARTITION=gpu GPUS=32 sh examples/slurm/launch.sh examples/internvl3_78b/stage2.sh
#       prints the srun command and every node's torchrun command; nothing is submitted
#
# Environment: PARTITION (required), GPUS [the stage script's default] and GPUS_PER_NODE [8] size the
# job exactly as the stage script does; JOB_NAME [the script's name], CPUS_PER_TASK [10 per GPU],
# SRUN_ARGS (extra srun flags, e.g. "--quotatype=reserved --time=2-00:00:00"); everything else
# (BATCH_SIZE, DATA_PATH, ...) is passed to the stage script through srun's environment.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

die() { echo "examples/slurm/launch.sh: $*" >&2; exit 2; }
(( $# >= 1 )) || die "usage: PARTITION=... GPUS=N sh examples/slurm/launch.sh STAGE_SCRIPT [pretrain flags]"
script=$1; shift
[[ -f $script ]] || die "no such stage script: $script"
PARTITION=${PARTITION:-}
[[ -n $PARTITION || ${DRY_RUN:-0} == 1 ]] || die "set PARTITION to the SLURM partition"

# The stage script decides nodes x GPUs per node (from GPUS, GPUS_PER_NODE, NNODES); ask it.
probe=$(DRY_RUN=1 TRAIN_ITERS=${TRAIN_ITERS:-1} NODE_RANK=0 MASTER_ADDR=probe bash "$script" 2>/dev/null) || {
  DRY_RUN=1 TRAIN_ITERS=${TRAIN_ITERS:-1} NODE_RANK=0 MASTER_ADDR=probe bash "$script" >/dev/null || true
  die "$script refuses this configuration (see above)"
}
read -r -a words <<< "$probe"
for i in "${!words[@]}"; do
  case ${words[$i]} in
    --nnodes) NNODES=${words[$((i + 1))]} ;;
    --nproc_per_node) NPROC=${words[$((i + 1))]} ;;
  esac
done
export NNODES GPUS=$(( NNODES * NPROC ))
JOB_NAME=${JOB_NAME:-$(basename "$(dirname "$script")")_$(basename "$script" .sh)}
CPUS_PER_TASK=${CPUS_PER_TASK:-$(( 10 * NPROC ))}
read -r -a srun_extra <<< "${SRUN_ARGS:-}"

# one task per node; the node's rank and the rendezvous host come from SLURM inside the allocation
node_cmd='export NODE_RANK=$SLURM_NODEID MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); exec bash "$0" "$@"'
cmd=(
  srun --partition "${PARTITION:-PARTITION}" --job-name "$JOB_NAME" --nodes "$NNODES" --ntasks-per-node 1
  --gres "gpu:$NPROC" --cpus-per-task "$CPUS_PER_TASK" --kill-on-bad-exit=1 "${srun_extra[@]}"
  bash -c "$node_cmd" "$script" "$@"
)

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; printf '\n'
  for (( rank = 0; rank < NNODES; rank++ )); do
    echo "# node $rank runs (MASTER_ADDR: the allocation's first node):"
    DRY_RUN=1 NODE_RANK=$rank MASTER_ADDR=FIRST_NODE bash "$script" "$@"
  done
  exit 0
fi
exec "${cmd[@]}"
