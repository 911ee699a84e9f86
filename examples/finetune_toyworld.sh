#!/usr/bin/env bash
# Concept fine-tuning in toyworld, end to end, and the m vs m' comparison of issue 5 (about 30 min on 2 cores).
#   bash examples/finetune_toyworld.sh [OUT]        (default OUT=out/ft-exp)
# 1. two one-concept training sets (star, heart) from seeds no training ever saw, and their held-out twins
# 2. `factory label` on each training set: preliminary masks, no ground truth used
# 3. `trainers finetune`: one m' for both concepts (2 CPU workers, DeepSpeed ZeRO-2)
# 4. `trainers evaluate-masks` on the held-out images: M_pre from m, background inpainting with m or with m'
set -euo pipefail
OUT=${1:-out/ft-exp}
STEPS=${STEPS:-1500}
FAST="--set num_inference_steps=20 --set probe_t0=16 --set inpaint_steps=20"
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
for c in star heart; do
  base=$([ $c = star ] && echo 2000000000 || echo 2000100000)
  factory toyworld-split --out "$OUT/train-$c" --seeds "$base:$((base + 150))" --concept $c
  factory toyworld-split --out "$OUT/test-$c" --seeds "$((base + 50000)):$((base + 50060))" --concept $c
  factory label configs/toyworld-label.yaml --input "$OUT/train-$c/images" \
      --set output.uri="$OUT/label-$c" --set concepts.0.name=$c
done
trainers finetune configs/finetune-toyworld.yaml --set data.shards="[$OUT/label-star, $OUT/label-heart]" \
    --set train.max_steps=$STEPS --set output.storage="$OUT/runs" --set output.export="$OUT/toyworld-ft"
for c in star heart; do
  trainers evaluate-masks --split "$OUT/test-$c" --model toyworld --out "$OUT/eval-m-$c" $FAST
  trainers evaluate-masks --split "$OUT/test-$c" --model toyworld --inpaint-model "$OUT/toyworld-ft" \
      --out "$OUT/eval-mprime-$c" $FAST
done
cat "$OUT"/eval-*/metrics.md
