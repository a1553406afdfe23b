#!/usr/bin/env bash
# The GPU figures of the README's "Speed" table in one run of about 8 minutes, most important first, each
# part under its own time limit and saved as it finishes (a lent GPU machine gives minutes, not hours):
#   1. (a) and (c) at the defaults: the ratio the product is judged on
#   2. (b) the loader per worker count, and the scan
#   3. (a) at batch_size 64 and 128: how much of the GPU batch 32 leaves unused, and memory per image
#   4. (c) with half the cores as workers, and at batch_size 128: the next suspects for a low (c)/(a)
#   5. with COMPILE=1, (a) under torch.compile (measured once: it did not pay; about 2 more minutes)
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
half=$(( $(nproc) / 2 ))
N=${N:-4096}  # training images of (c): hymenoptera's linked over and over

step() {  # step NAME SECONDS ARGS...: one benchmark run, its output in the log, its numbers in NAME.json
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" $B --json "$OUT/$name.json" "$@" 2>&1 | grep -v "^W[0-9]" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  echo "cpus: $(nproc)"; $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$LOG"
step ac 150 --parts model,job --train-images "$N" --epochs 2 --steps 30
step loader 90 --parts loader,scan --train-images "$N" --loader-seconds 2 --scan-sizes 10000,100000
step model64 45 --parts model --batch-size 64 --steps 20
step model128 45 --parts model --batch-size 128 --steps 20
step job_half_workers 120 --parts job --train-images "$N" --epochs 2 --hp "workers=$half"
step job128 120 --parts job --train-images "$N" --epochs 2 --batch-size 128
if [ "${COMPILE:-0}" = 1 ]; then step compile 180 --parts model --compile --steps 30; fi
echo "== done" | tee -a "$LOG"
