#!/usr/bin/env bash
# InternVL3-8B Mixed Preference Optimization (MPO), the last stage of InternVL 2.5 / 3 / 3.5: every part
# trains on MMPR preference pairs, loss = 0.8 DPO sigmoid + 0.2 BCO pair + 1.0 SFT on the chosen response,
# beta 0.1, lr 2e-7 (--stage mpo; InternVL's MPO scripts), against a frozen reference model that starts
# from the same weights (PRETRAINED) and is sharded like the policy.
#
# 1. preference shards (chosen + rejected of a record packed together; SEQ_LENGTH holds both):
#   MODEL=internvl3-8b TOKENIZER=checkpoints/hf/InternVL3-8B META=examples/data/meta_example_mpo.json \
#       OUTPUT_PREFIX=data/shards/internvl3-8b_mpo bash examples/preprocess.sh --preference
# 2. training:
#   GPUS=8 bash examples/mpo.sh [more pretrain_internvl.py flags, e.g. --mpo-beta 0.1 --mpo-loss-weights 0.8 0.2 1]
#   DRY_RUN=1 bash examples/mpo.sh        # print the torchrun command, run nothing
#
# Layout: the capacity planner's fastest fit for 8 x A100 80GB, 16384-token packs, 128 packs per step,
# reference model included:
#   python tools/plan.py --model internvl3-8b --gpus 8 --stage mpo --seq-length 16384
#   -> TP4 PP1 CP1 DP2 (SP, dist-opt): 68.6 GiB peak per GPU (planner estimate, not measured on a GPU)
# Other settings (DATA_PATH, PRETRAINED, OUTPUT_DIR, TRAIN_ITERS, ...) are read by examples/train.sh.
export MODEL=${MODEL:-internvl3-8b} STAGE=mpo STAGE_NAME=mpo
export GPUS=${GPUS:-8}
export TP=${TP:-4} PP=${PP:-1} CP=${CP:-1}
export SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-1}
export DISTRIBUTED_OPTIMIZER=${DISTRIBUTED_OPTIMIZER:-1}
export RECOMPUTE=${RECOMPUTE:-0}
export FIRST_STAGE_LAYERS=${FIRST_STAGE_LAYERS-}
export DATA_PATH=${DATA_PATH:-data/shards/${MODEL}_mpo}
export PRETRAINED=${PRETRAINED-work_dirs/$MODEL/2nd_finetune}
exec bash "$(dirname "$0")/train.sh" "$@"
