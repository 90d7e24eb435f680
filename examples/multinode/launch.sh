#!/usr/bin/env bash
# Run a stage script on several machines without a scheduler: ssh to every host and start the stage
# script there with its NODE_RANK; the first host is the rendezvous (MASTER_ADDR). Assumes the same
# checkout at the same path on every host (a shared file system), and password-less ssh.
#
#   HOSTS="node0 node1" bash examples/multinode/launch.sh examples/internvl3_38b/stage2.sh [pretrain flags]
#   HOSTFILE=hosts.txt GPUS=32 bash examples/multinode/launch.sh examples/internvl3_78b/stage2.sh
#   DRY_RUN=1 HOSTS="node0 node1" bash examples/multinode/launch.sh examples/internvl3_38b/stage2.sh
#       prints each host's ssh command and torchrun command; nothing is started
#
# Environment: HOSTS (space-separated) or HOSTFILE (one host per line, '#' comments); GPUS
# [hosts x GPUS_PER_NODE]; GPUS_PER_NODE [8]; MASTER_PORT [29500]; SSH [ssh -o BatchMode=yes];
# REMOTE_SETUP (run first on each host, e.g. "source .venv/bin/activate"); FORWARD_ENV (more variable
# names to pass). The stage script's variables (BATCH_SIZE, DATA_PATH, ...) and NCCL_* are passed on.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

die() { echo "examples/multinode/launch.sh: $*" >&2; exit 2; }
(( $# >= 1 )) || die "usage: HOSTS=\"h0 h1\" bash examples/multinode/launch.sh STAGE_SCRIPT [pretrain flags]"
script=$1; shift
[[ -f $script ]] || die "no such stage script: $script"
if [[ -n ${HOSTFILE:-} ]]; then
  [[ -f $HOSTFILE ]] || die "HOSTFILE $HOSTFILE does not exist"
  mapfile -t hosts < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/[[:space:]]//g' "$HOSTFILE")
else
  read -r -a hosts <<< "${HOSTS:-}"
fi
(( ${#hosts[@]} > 0 )) || die "set HOSTS=\"host0 host1 ...\" or HOSTFILE"
export NNODES=${#hosts[@]}
export GPUS=${GPUS:-$(( NNODES * ${GPUS_PER_NODE:-8} ))}
export MASTER_ADDR=${hosts[0]}
export MASTER_PORT=${MASTER_PORT:-29500}
read -r -a ssh_cmd <<< "${SSH:-ssh -o BatchMode=yes}"

# variables examples/train.sh reads, passed to every host when they are set here
names=(GPUS GPUS_PER_NODE NNODES MASTER_ADDR MASTER_PORT TP PP CP SEQUENCE_PARALLEL DISTRIBUTED_OPTIMIZER
       RECOMPUTE FIRST_STAGE_LAYERS BATCH_SIZE PER_DEVICE_BATCH_SIZE SEQ_LENGTH DATA_PATH EPOCHS TRAIN_ITERS
       LR_WARMUP_ITERS WEIGHT_DECAY LR PRETRAINED OUTPUT_DIR SAVE_INTERVAL BF16 PEAK_FLOPS TORCHRUN PYTHON
       CUDA_DEVICE_MAX_CONNECTIONS)
read -r -a more <<< "${FORWARD_ENV:-}"
mapfile -t nccl < <(compgen -e | grep '^NCCL_' || true)
forward=()
for name in "${names[@]}" "${more[@]}" "${nccl[@]}"; do
  [[ -n ${!name+set} ]] && forward+=("$name=${!name}")
done

remote_command() {  # the shell command line one host runs
  local rank=$1; shift
  local line
  line="cd $(printf %q "$PWD") && "
  [[ -n ${REMOTE_SETUP:-} ]] && line+="$REMOTE_SETUP && "
  line+="env$(printf ' %q' "${forward[@]}" "NODE_RANK=$rank") bash$(printf ' %q' "$script" "$@")"
  printf '%s' "$line"
}

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for rank in "${!hosts[@]}"; do
    printf '# host %s (node %d):' "${hosts[$rank]}" "$rank"
    printf ' %q' "${ssh_cmd[@]}" "${hosts[$rank]}"; printf ' %q\n' "$(remote_command "$rank" "$@")"
    NODE_RANK=$rank bash "$script" "$@"
  done
  exit 0
fi

pids=()
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
for rank in "${!hosts[@]}"; do
  "${ssh_cmd[@]}" "${hosts[$rank]}" "$(remote_command "$rank" "$@")" &
  pids+=($!)
done
status=0
for rank in "${!pids[@]}"; do
  wait "${pids[$rank]}" || { echo "host ${hosts[$rank]} (node $rank) failed" >&2; status=1; }
done
exit $status
