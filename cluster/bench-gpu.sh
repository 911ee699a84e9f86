#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, sized for a short GPU slot: `factory bench` rows, one JSON each,
# and a table of them. Run it from the repository root of a fresh clone on one GPU node:
#
#   HF_HUB_OFFLINE=1 cluster/bench-gpu.sh docs/results/bench/h200              # set-up + core run
#   HF_HUB_OFFLINE=1 OPTIONAL=1 cluster/bench-gpu.sh docs/results/bench/h200   # + the optional rows
#
# Set-up: the project's own, `make venv`, then .venv/bin/factory (SETUP=make, the default). SETUP=none skips
# it and runs $FACTORY (default `python3 -m factory.cli`) where the packages are installed already.
#
# Core run (at most CORE_BUDGET_S, 480 s, after the set-up): bf16; sd15-arch (SD 1.5's architecture,
# random weights) first, then toyworld, each at its native resolution (512 and 64 px; RESOLUTION sets one
# for all); the paper's 50 + 50 DDIM steps, attention over the 40 least-noisy, guidance 1; batch 1, 8 and
# 32; compile off. By its loops' arithmetic: 6 rows of about 25 denoising loops each (warm-up, repeats, the
# capture on/off pairs), the largest 32 x 50 UNet calls per loop. (The first H200 run, 2026-12-04, had
# toyworld first at 512 px: 28 TFLOP a triplet, its 128 x 128 latents' self-attention, 283 s for its
# three rows, and no sd15-arch row fitted.)
# Optional run (OPTIONAL=1, at most OPTIONAL_BUDGET_S): first flux-arch (FLUX.1-dev's 12B transformer) at
# 1024 px, batch 1, the synthesis loop alone with each readout's capture and without (--capture-only: the
# DiT readouts' overhead, the figure a short slot should get first); then compile on for sd15-arch at batch
# 8 and 32; then sdxl-arch and sd3-arch at 1024 px, batch 1 and 4.
#
# FLOPs are counted once per model and setting, by the first row of each model (batch 1, compile off), into
# $OUT/flops.json; every later row reads them from there, so every row reports MFU (FLOPs per triplet do
# not depend on batch or compile, and a compiled graph hides its FLOPs from the counter). The counts
# include attention on the CPU and on the GPU (factory.bench.count_flops).
#
# A row that would start past its run's budget is skipped and listed in $OUT/skipped.txt; each row also
# runs under `timeout` (ROW_TIMEOUT_S), so the script ends inside its slot.
#
# The same script on the CPU at tiny settings, as a check of the script itself (tests/test_bench_gpu.py):
#   SETUP=none DEVICE=cpu DTYPE=fp32 MODELS=toyworld RESOLUTION=64 BATCHES="1 2" STEPS=2 REPEATS=1 \
#     cluster/bench-gpu.sh /tmp/bench
set -euo pipefail
OUT=${1:-docs/results/bench/gpu}
SETUP=${SETUP:-make}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
MODELS=${MODELS:-sd15-arch toyworld}
RESOLUTION=${RESOLUTION:-}  # empty: each model's native resolution
BATCHES=${BATCHES:-1 8 32}
STEPS=${STEPS:-50}
REPEATS=${REPEATS:-2}
CORE_BUDGET_S=${CORE_BUDGET_S:-480}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-240}
OPTIONAL=${OPTIONAL:-0}
OPTIONAL_BUDGET_S=${OPTIONAL_BUDGET_S:-480}
COMPILE_MODELS=${COMPILE_MODELS-sd15-arch}
COMPILE_BATCHES=${COMPILE_BATCHES:-8 32}
LARGE_MODELS=${LARGE_MODELS-sdxl-arch sd3-arch}
LARGE_BATCHES=${LARGE_BATCHES:-1 4}
FLUX_MODELS=${FLUX_MODELS-flux-arch}
FLUX_STEPS=${FLUX_STEPS:-28}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

case "$SETUP" in
  make) make venv >&2; FACTORY=${FACTORY:-.venv/bin/factory} ;;
  none) FACTORY=${FACTORY:-python3 -m factory.cli} ;;
  *) echo "SETUP must be make or none, got '$SETUP'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
: > "$OUT/skipped.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true

# row NAME BUDGET_END ARGS...: one `factory bench` row into $OUT/NAME.json, unless the budget is spent
row() {
  local name=$1 end=$2
  shift 2
  if [ "$SECONDS" -ge "$end" ]; then
    echo "$name (budget spent at ${SECONDS}s)" >> "$OUT/skipped.txt"
    echo "== $name: skipped, the run's budget is spent"
    return 0
  fi
  echo "== $name (t=${SECONDS}s)"
  # shellcheck disable=SC2086  # FACTORY may be a command with arguments
  if ! timeout "$ROW_TIMEOUT_S" $FACTORY bench --device "$DEVICE" --dtype "$DTYPE" --steps "$STEPS" \
      --repeats "$REPEATS" --flops-cache "$OUT/flops.json" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1; then
    echo "$name (failed or timed out: $OUT/$name.log)" >> "$OUT/skipped.txt"
    echo "== $name: failed or timed out, see $OUT/$name.log"
    tail -n 5 "$OUT/$name.log"
    return 0
  fi
  grep -E '^(triplet|actor CPU|throughput|FLOPs)' "$OUT/$name.log" || true
}

res=()  # --resolution and the rows' name tag, when RESOLUTION is set
tag=""
if [ -n "$RESOLUTION" ]; then res=(--resolution "$RESOLUTION"); tag="-r$RESOLUTION"; fi
start=$SECONDS
core_end=$((start + CORE_BUDGET_S))
for model in $MODELS; do
  for batch in $BATCHES; do  # the first batch of each model counts the FLOPs, the others read them
    row "$model-$DTYPE$tag-b$batch-compile_off" "$core_end" --model "$model" "${res[@]}" --batch "$batch"
  done
done
echo "core run: $((SECONDS - start)) s"

if [ "$OPTIONAL" = 1 ]; then
  opt_end=$((SECONDS + OPTIONAL_BUDGET_S))
  for model in $FLUX_MODELS; do  # --steps again: the last one given wins
    row "$model-$DTYPE-b1-capture" "$opt_end" --model "$model" --batch 1 --capture-only --steps "$FLUX_STEPS"
  done
  for model in $COMPILE_MODELS; do
    for batch in $COMPILE_BATCHES; do
      row "$model-$DTYPE$tag-b$batch-compile_on" "$opt_end" --model "$model" "${res[@]}" --batch "$batch" --compile
    done
  done
  for model in $LARGE_MODELS; do
    for batch in $LARGE_BATCHES; do
      row "$model-$DTYPE-b$batch-compile_off" "$opt_end" --model "$model" --batch "$batch"
    done
  done
fi
# shellcheck disable=SC2086
$FACTORY bench --summarize "$OUT" | tee "$OUT/table.md"
echo "total: $((SECONDS - start)) s; skipped rows: $(wc -l < "$OUT/skipped.txt")"
