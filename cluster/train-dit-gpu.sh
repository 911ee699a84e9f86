#!/usr/bin/env bash
# A wider, deeper toyworld DiT trained on one GPU inside a short slot (issue 32). The shipped DiT (128 wide,
# 4 + 4 blocks, 186 CPU-minutes in all) has not learned the shapes (the shape classifier reads 23% of its
# samples as the shape asked for, the SD model's 85%), and 61 more CPU-minutes moved nothing
# (docs/toyworld.md); a larger model seeing millions of images is the lever left, which a GPU gives in minutes.
#
#   HF_HUB_OFFLINE=1 cluster/train-dit-gpu.sh OUT          # from the repository root of a fresh clone
#
# Stages, each under `timeout`:
#   1. smoke: the same command at tiny size (2 steps) on DEVICE; the script stops at once if it fails
#   2. the run: `trainers pretrain-toyworld-dit` with WIDTH / HEADS / DOUBLE / SINGLE / BATCH / LR on
#      DEVICE, for MINUTES of training (--max-minutes: at the deadline it checkpoints and exports its EMA
#      model), its early-stopping attention AUC every EVAL_EVERY steps
#   3. pack: the export as one tarball cut into 15 MiB parts (a device call brings back at most 8 files of
#      16 MiB each), beside training.json and the log
# Default size: 192 wide (6 heads of 32), 6 + 6 blocks, about 11M transformer parameters (45 MB in fp32,
# under the 60 MB a shipped toyworld model may take); batch 256.
#
# Back here, on the CPU:
#   mkdir -p runs/dit-gpu && cat OUT/model.tar.part-* | tar -x -C runs/dit-gpu
#   trainers readout-sweep --model runs/dit-gpu/model --split out/toyworld-test --out out/dit-gpu-test
#
# Set-up as cluster/bench-gpu.sh: SETUP=make (default) runs `make venv` and .venv/bin/trainers; SETUP=none runs
# $TRAINERS (default `python3 -m trainers.cli`) where the packages are installed already (docs/development.md,
# "A GPU slot": the GPU image lacks diffusers and a few others, carried as wheels).
#
# The same script on the CPU at tiny settings, as a check of the script itself (tests/test_train_dit_gpu.py):
#   SETUP=none DEVICE=cpu WIDTH=32 HEADS=1 DOUBLE=1 SINGLE=1 BATCH=2 POOL=64 EVAL_EVERY=2 EVAL_IMAGES=2 \
#     STEPS=3 cluster/train-dit-gpu.sh /tmp/dit-gpu
set -euo pipefail
OUT=${1:-runs/dit-gpu}
SETUP=${SETUP:-make}
DEVICE=${DEVICE:-cuda}
WIDTH=${WIDTH:-192}
HEADS=${HEADS:-6}
DOUBLE=${DOUBLE:-6}
SINGLE=${SINGLE:-6}
BATCH=${BATCH:-256}
LR=${LR:-3e-4}
STEPS=${STEPS:-100000}  # the run ends at MINUTES, well before these
MINUTES=${MINUTES:-6}
POOL=${POOL:-24000}
EVAL_EVERY=${EVAL_EVERY:-500}
EVAL_IMAGES=${EVAL_IMAGES:-32}
SMOKE_TIMEOUT_S=${SMOKE_TIMEOUT_S:-180}
WORK=${WORK:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# fp32 training (the CPU recipe's) with TF32 matmuls on the GPU: PyTorch reads this at start-up
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=${TORCH_ALLOW_TF32_CUBLAS_OVERRIDE:-1}

case "$SETUP" in
  make) make venv >&2; TRAINERS=${TRAINERS:-.venv/bin/trainers} ;;
  none) TRAINERS=${TRAINERS:-python3 -m trainers.cli} ;;
  *) echo "SETUP must be make or none, got '$SETUP'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
LOG="$OUT/train.log"
: >"$LOG"

echo "== 1. smoke: a tiny DiT, 2 steps, on $DEVICE" | tee -a "$LOG"
if ! timeout "$SMOKE_TIMEOUT_S" $TRAINERS pretrain-toyworld-dit --device "$DEVICE" --width 32 --heads 1 \
  --double-layers 1 --single-layers 1 --batch 2 --steps 2 --pool-size 16 --eval-every 2 --eval-images 2 \
  --out "$WORK/smoke" --work-dir "$WORK/smoke-work" >>"$LOG" 2>&1; then
  echo "smoke run failed; the end of $LOG:" >&2
  tail -40 "$LOG" >&2
  exit 1
fi

echo "== 2. the run: width $WIDTH, $HEADS heads, $DOUBLE + $SINGLE blocks, batch $BATCH, lr $LR," \
  "$MINUTES min on $DEVICE" | tee -a "$LOG"
# the deadline checkpoints and exports; the outer timeout leaves room for the pool, the last eval and export
RUN_TIMEOUT_S=$(python3 -c "print(int(float('$MINUTES') * 60 + 300))")
status=0
timeout "$RUN_TIMEOUT_S" $TRAINERS pretrain-toyworld-dit --device "$DEVICE" --width "$WIDTH" --heads "$HEADS" \
  --double-layers "$DOUBLE" --single-layers "$SINGLE" --batch "$BATCH" --lr "$LR" --steps "$STEPS" \
  --max-minutes "$MINUTES" --pool-size "$POOL" --eval-every "$EVAL_EVERY" --eval-images "$EVAL_IMAGES" \
  --ckpt-every 1000000 --out "$WORK/model" --work-dir "$WORK/work" >>"$LOG" 2>&1 || status=$?

echo "== 3. pack" | tee -a "$LOG"
if [ -f "$WORK/model/training.json" ]; then
  cp "$WORK/model/training.json" "$OUT/training.json"
  tar -C "$WORK" -cf - model | split -b 15M -d - "$OUT/model.tar.part-"
  ls -l "$OUT" | tee -a "$LOG"
else
  echo "no export was written (the run's exit status: $status)" | tee -a "$LOG"
fi
grep -E "^\[dit\]|eval|AUC" "$LOG" | tail -20 || true
exit "$status"
