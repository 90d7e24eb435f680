#!/usr/bin/env bash
# InternVL3.5-30B-A3B (InternViT-300M + Qwen3-30B-A3B: 128 experts, top-8; 30.8B parameters, 3.7B
# active per token), stage 2, full-model instruction tuning (--stage 2), with expert parallelism.
#
# The layout is the capacity planner's fastest fit with expert parallelism for 16 x A100 80GB,
# 16384-token packs and 128 packs per step, its stage split the planner's proposal (planner
# estimates, never measured on a GPU; without EP, TP4 PP2 CP2 with 16 layers on stage 0 is 0.5 s faster):
#   python tools/plan.py --model internvl3.5-30b-a3b --gpus 16 --stage 2 --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --context-parallel-size 2 --expert-model-parallel-size 2 --decoder-first-pipeline-num-layers 18 --use-distributed-optimizer
#   -> TP4 PP2 CP2 DP1 EP2 (SP, dist-opt, first-stage-layers 18): 71.3 GiB peak per GPU, ~33.5 s per step, MFU 52% (active FLOPs)
# Without context parallelism the planner's next choices are TP1 PP1 DP16 EP8 (dist-opt, recompute)
# and TP2 PP1 DP8 EP4 (SP, dist-opt, recompute); set TP/PP/CP/EP/RECOMPUTE to use them.
#
# Weights: python tools/convert_from_hf.py --hf-dir InternVL3_5-30B-A3B --save checkpoints/internvl3.5-30b-a3b
#   GPUS=16 bash examples/moe/internvl3_5_30b_a3b_stage2.sh [more pretrain_internvl.py flags]
#   DRY_RUN=1 bash examples/moe/internvl3_5_30b_a3b_stage2.sh      # print the torchrun command, run nothing
# Other settings (DATA_PATH, PRETRAINED, OUTPUT_DIR, TRAIN_ITERS, ...) are read by examples/train.sh.
export MODEL=internvl3.5-30b-a3b STAGE=2 STAGE_NAME=stage2
export GPUS=${GPUS:-16}
export TP=${TP:-4} PP=${PP:-2} CP=${CP:-2} EP=${EP:-2}
export SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-1}
export DISTRIBUTED_OPTIMIZER=${DISTRIBUTED_OPTIMIZER:-1}
export RECOMPUTE=${RECOMPUTE:-0}
export FIRST_STAGE_LAYERS=${FIRST_STAGE_LAYERS-18}
export PRETRAINED=${PRETRAINED-checkpoints/internvl3.5-30b-a3b}
exec bash "$(dirname "$0")/../train.sh" "$@"
