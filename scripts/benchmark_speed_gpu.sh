#!/usr/bin/env bash
# The GPU figures of the README's "Speed" table in one run of about 8 minutes, most important first, each
# part under its own time limit and saved as it finishes (a lent GPU machine gives minutes, not hours):
#   1. (a) and (c) at the defaults: the ratio the product is judged on, and where the CPU time goes
#   2. (b) the loader per worker count
#   3. with TIMM_TRAIN=path/to/timm's train.py: timm's reference script on (c)'s images, same settings
#   4. (c) with half the cores as workers: does the training process compete with its workers for cores?
#   5. (a) at batch_size 64 and 128: how much of the GPU batch 32 leaves unused, and memory per image
#
#   bash scripts/benchmark_speed_gpu.sh DATA_DIR OUT_DIR        # DATA_DIR holds train/ and val/ (hymenoptera)
#   EXTRA="--quick" N=64 bash scripts/benchmark_speed_gpu.sh ...  # the same steps, tiny model and set: try it on a CPU
set -uo pipefail
DATA=${1:?DATA_DIR holding train/ and val/}
OUT=${2:?OUT_DIR for the logs and JSON files}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/speed.log
B="$PY $(dirname "$0")/benchmark_speed.py --data $DATA ${EXTRA:-}"
cores=$(nproc)
N=${N:-8192}  # training images of (c): hymenoptera's linked over and over; 256 steps an epoch at batch 32

step() {  # step NAME SECONDS ARGS...: one benchmark run, its output in the log, its numbers in NAME.json
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" $B --json "$OUT/$name.json" "$@" 2>&1 | grep -v "^W[0-9]" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  echo "cpus: $cores; kernel: $(uname -r); $(dmesg 2>/dev/null | grep -m1 -i gvisor || echo 'no gVisor in dmesg')"
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$LOG"
step ac 170 --parts model,job --train-images "$N" --epochs 2 --steps 30
step loader 60 --parts loader --train-images 4096 --loader-seconds 2
if [ -n "${TIMM_TRAIN:-}" ]; then  # (c)'s own tree, so both read the same files; settings as the product's defaults
  tree=$(grep -o "work folder (job log): .*" "$LOG" | head -1 | cut -d" " -f5)/opt_ml/input/data
  # --lr: the product's lr 0.016 scaled to batch 32 as it does (x 32 / 256)
  model=$($PY -c "import json; print(json.load(open('$OUT/ac.json'))['model_name'])")
  echo "== timm (at most 120s): $TIMM_TRAIN on $tree" | tee -a "$LOG"
  timeout 120 $PY "$TIMM_TRAIN" "$tree" --train-split train --val-split val --model "$model" --num-classes 2 \
    -b 32 --epochs 2 --opt rmsproptf --opt-eps 0.001 --lr 0.002 --weight-decay 1e-5 --layer-decay 0.85 \
    --sched step --decay-epochs 2.4 --decay-rate 0.97 --warmup-epochs 1 --warmup-lr 1e-6 --drop 0.3 \
    --drop-path 0.2 --smoothing 0.1 --aa rand-m9-mstd0.5 --reprob 0.2 --remode pixel --model-ema \
    --model-ema-decay 0.9999 --amp --amp-dtype bfloat16 --channels-last --pin-mem -j $((cores - 1)) \
    --log-interval 50 --output "$OUT/timm" ${TIMM_EXTRA:-} 2>&1 | grep -E "Train: 1 |Test|Error|error|Traceback" \
    | tail -8 | tee -a "$LOG"
  rm -rf "$OUT/timm"  # its checkpoints: hundreds of MB nobody needs
fi
step job_half_workers 110 --parts job --train-images 4096 --epochs 2 --hp "workers=$((cores / 2))"
step model64 40 --parts model --batch-size 64 --steps 20
step model128 40 --parts model --batch-size 128 --steps 20
echo "== done" | tee -a "$LOG"
