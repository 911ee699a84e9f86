#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in one run on one GPU node (about 10 minutes on an H100/H200):
# `factory bench` on toyworld and on sd15-arch (SD 1.5's architecture, random weights) at the paper's
# settings (512 px, 50 + 50 DDIM steps, guidance 1), bf16, compile off and on, batch 1 / 8 / 32, and the
# fast preset. Then SDXL's and SD3 Medium's architectures (sdxl-arch, sd3-arch; random weights, 1024 px)
# at batch 1 and 4, compile off. One JSON per run under OUT, and a table of them (docs/benchmarks.md's
# layout) at the end.
#
#   HF_HUB_OFFLINE=1 cluster/bench-gpu.sh docs/results/bench/h200
#
# The same script on the CPU, as a check of the script itself (seconds, toyworld only):
#   DEVICE=cpu DTYPE=bf16 MODELS=toyworld BATCHES=1 STEPS=2 COMPILE=off LARGE_MODELS= cluster/bench-gpu.sh /tmp/bench
set -euo pipefail
OUT=${1:-docs/results/bench/gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
MODELS=${MODELS:-toyworld sd15-arch}
LARGE_MODELS=${LARGE_MODELS-sdxl-arch sd3-arch}
LARGE_BATCHES=${LARGE_BATCHES:-1 4}
BATCHES=${BATCHES:-1 8 32}
STEPS=${STEPS:-50}
COMPILE=${COMPILE:-off on}
REPEATS=${REPEATS:-2}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
for model in $MODELS; do
  for compile in $COMPILE; do
    for batch in $BATCHES; do
      flags=()
      [ "$compile" = on ] && flags+=(--compile)
      # FLOPs do not depend on batch or compile: count them once per model (batch 1, compile off)
      if [ "$batch" != "$(echo $BATCHES | cut -d' ' -f1)" ] || [ "$compile" = on ]; then flags+=(--no-flops); fi
      name="$model-$DTYPE-b$batch-compile_$compile"
      echo "== $name"
      factory bench --model "$model" --device "$DEVICE" --dtype "$DTYPE" --steps "$STEPS" --batch "$batch" \
        --repeats "$REPEATS" "${flags[@]}" --out "$OUT/$name.json" | tail -n 6
    done
  done
  # the fast preset (docs/benchmarks.md): DPM-Solver++ for synthesis and inpainting, at the largest batch
  last=$(echo $BATCHES | awk '{print $NF}')
  factory bench --model "$model" --device "$DEVICE" --dtype "$DTYPE" --steps "$((STEPS * 15 / 50 > 0 ? STEPS * 15 / 50 : 1))" \
    --scheduler dpm++ --batch "$last" --repeats "$REPEATS" --no-flops --out "$OUT/$model-$DTYPE-b$last-fast.json" | tail -n 6
done
for model in $LARGE_MODELS; do
  for batch in $LARGE_BATCHES; do
    flags=()
    [ "$batch" != "$(echo $LARGE_BATCHES | cut -d' ' -f1)" ] && flags+=(--no-flops)
    name="$model-$DTYPE-b$batch-compile_off"
    echo "== $name"
    factory bench --model "$model" --device "$DEVICE" --dtype "$DTYPE" --steps "$STEPS" --batch "$batch" \
      --repeats "$REPEATS" "${flags[@]}" --out "$OUT/$name.json" | tail -n 6
  done
done
factory bench --summarize "$OUT" | tee "$OUT/table.md"
