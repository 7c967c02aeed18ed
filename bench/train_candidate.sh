#!/usr/bin/env bash
# Issue 14: the LoRA default-model candidate, two stages, then its evaluation against the base LM's log-likelihood
# and the current default head. Resumable: a stage whose output directory holds rewardkit.json is skipped.
#   nohup bench/train_candidate.sh > runs/candidate.log 2>&1 &
# Threads: OMP_NUM_THREADS (default 1, so one core stays free on a 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RK=.venv/bin/rewardkit
[ -f data/testbed/manifest.json ] || $RK testbed make --out data/testbed
[ -f data/testbed_bal/manifest.json ] || $RK testbed make --out data/testbed_bal --p-agree 0.5
if [ ! -f runs/bal_frozen/rewardkit.json ]; then
  $RK train bt --model embedded:smollm2 --mode frozen --train-file data/testbed_bal --max-train-pairs 500 \
    --num-epochs 30 --learning-rate 1e-3 --output-dir runs/bal_frozen
fi
if [ ! -f runs/lora_bal/rewardkit.json ]; then
  $RK train bt --model runs/bal_frozen --mode lora --lora-r 8 --lora-alpha 16 --lora-target-modules q_proj,v_proj \
    --train-file data/testbed_bal --max-train-pairs 500 --num-epochs 2 --learning-rate 1e-4 --batch-size 8 \
    --warmup-ratio 0.05 --output-dir runs/lora_bal --model-id smollm2-135m-instruct-rewardkit-bt-lora --seed 0
fi
.venv/bin/python bench/eval_default.py --model runs/lora_bal --name lora_bal --json bench/results/default_candidate.json
