#!/usr/bin/env bash
# Issue 14: a default-model candidate with a trainable backbone, two stages, then its evaluation against the base
# LM's log-likelihood and the current default head. Resumable: a stage whose output directory holds rewardkit.json
# is skipped.
#   nohup bench/train_candidate.sh > runs/candidate.log 2>&1 &
# Stage 1: a frozen BT head on 500 artifact-balanced pairs (the start: a zero head gives LoRA no gradient).
# Stage 2: LoRA on every linear layer of every layer (LORA_TARGETS, default all-linear), the head at its own rate.
# The 2026-12-03 candidate was LORA_TARGETS=q_proj,v_proj LORA_OUT=runs/lora_bal HEAD_LR=0 (docs/results.md).
# Threads: OMP_NUM_THREADS (default 1, so one core stays free on a 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RK=.venv/bin/rewardkit
LORA_TARGETS="${LORA_TARGETS:-all-linear}"
LORA_OUT="${LORA_OUT:-runs/lora_all_bal}"
HEAD_LR="${HEAD_LR:-1e-3}"
SEED="${SEED:-0}"
[ -f data/testbed/manifest.json ] || $RK testbed make --out data/testbed
[ -f data/testbed_bal/manifest.json ] || $RK testbed make --out data/testbed_bal --p-agree 0.5
if [ ! -f runs/bal_frozen/rewardkit.json ]; then
  $RK train bt --model embedded:smollm2 --mode frozen --train-file data/testbed_bal --max-train-pairs 500 \
    --num-epochs 30 --learning-rate 1e-3 --output-dir runs/bal_frozen
fi
if [ ! -f "$LORA_OUT/rewardkit.json" ]; then
  $RK train bt --model runs/bal_frozen --mode lora --lora-r 8 --lora-alpha 16 --lora-target-modules "$LORA_TARGETS" \
    --train-file data/testbed_bal --max-train-pairs 500 --num-epochs 2 --learning-rate 1e-4 \
    --head-learning-rate "$HEAD_LR" --batch-size 8 --warmup-ratio 0.05 --output-dir "$LORA_OUT" \
    --model-id smollm2-135m-instruct-rewardkit-bt-lora --seed "$SEED"
fi
.venv/bin/python bench/eval_default.py --model "$LORA_OUT" --name "$(basename "$LORA_OUT")" \
  --json "bench/results/default_candidate_$(basename "$LORA_OUT").json"
