#!/usr/bin/env bash
# The GPU figures of the README's "Speed" table, most important first, each step under its own time limit
# and saved as it finishes (a lent GPU machine gives minutes, not hours). On the H100, every process that
# builds efficientnet_b3 spends about a minute before its first step (cuDNN autotuning, CUDA start-up):
# the limits below allow for it. All steps: about 15 minutes; STEPS picks some, in the order given.
#   loop   (a) and (d): the step fed a device batch, a pinned batch, the job's loader, the loader unpinned:
#          where the real loop loses against the ceiling, without a job's start-up (2.5 min)
#   clip   the job's gradient clipping against timm's loop on efficientnet_b3's gradients: the same numbers, and
#          a call's time; (a) also reports the clipping's share of the step (30 s)
#   job    (c) the real job at the defaults: images/s, data_wait, first step, memory, CPU use (3.5 min)
#   first  the probe phase's passes in the job's shapes on synthetic images, each timed the first time and again,
#          with cuDNN's benchmark mode and without: how much of the phase's start-up is new shapes (at most 4 min)
#   timm   timm's reference train.py (TIMM_TRAIN) on (c)'s images with the job's default settings (2.5 min)
#   loader (b) per worker count (1 min)
#   batch  (a) at batch_size 64 and 128: how much of the GPU batch 32 leaves unused; memory per image (3 min)
#   cudnn  (a) with cuDNN's benchmark mode off, only when named: is timing kernels on the first steps (about a
#          minute of start-up on the H100) worth its speed-up? (1.5 min)
#   graphs (a) under torch.compile's reduce-overhead mode (CUDA graphs), only when named: does replaying the
#          step's kernels beat launching them one by one, and after how long compiling (4 min)
#
#   bash benchmarks/benchmark_speed_gpu.sh DATA_DIR OUT_DIR        # DATA_DIR holds train/ and val/ (hymenoptera)
#   STEPS="loop job timm" TIMM_TRAIN=path/to/timm/train.py bash benchmarks/benchmark_speed_gpu.sh DATA_DIR OUT_DIR
#   EXTRA="--quick" N=64 bash benchmarks/benchmark_speed_gpu.sh ...  # the same steps, tiny model and set: try it on a CPU
set -uo pipefail
DATA=${1:?DATA_DIR holding train/ and val/}
OUT=${2:?OUT_DIR for the logs and JSON files}
PY=${PY:-python3}
STEPS=${STEPS:-loop clip job first timm loader batch}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/speed.log
B="$PY $(dirname "$0")/benchmark_speed.py --data $DATA ${EXTRA:-}"
cores=$(nproc)
N=${N:-4096}  # training images: hymenoptera's linked over and over; 128 steps an epoch at batch 32

run() {  # run NAME SECONDS ARGS...: one benchmark run, its output in the log, its numbers in NAME.json
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s): $*" | tee -a "$LOG"
  timeout -k 5 "$limit" $B --json "$OUT/$name.json" "$@" 2>&1 | grep -v "^W[0-9]" | tee -a "$LOG"
}

# The image's versions or nothing: timm 1.0.29's RMSpropTF launched 6x as many optimizer kernels per step as
# 1.0.31's, and an (a) and a (c) measured under different versions made a ratio that meant nothing.
pinned=$(grep -m1 "^timm==" "$(dirname "$0")/../constraints.txt" | cut -d= -f3)
found=$($PY -c "import timm; print(timm.__version__)")
if [ "$found" != "$pinned" ]; then
  echo "timm $found here, but the image pins $pinned (constraints.txt): install that one first, e.g." \
       "pip install --target /tmp/site timm-$pinned-py3-none-any.whl && export PYTHONPATH=/tmp/site:\$PWD" | tee "$LOG"
  exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  echo "cpus: $cores; kernel: $(uname -r); $(dmesg 2>/dev/null | grep -m1 -i gvisor || echo 'no gVisor in dmesg')"
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$LOG"
for step in $STEPS; do
  case $step in
    loop) run loop 180 --parts model,loop --train-images "$N" --steps 50 ;;
    clip) echo "== clip (at most 90s)" | tee -a "$LOG"
          timeout -k 5 90 $PY "$(dirname "$0")/measure_clipping.py" 2>&1 | grep -v "^W[0-9]" | tee -a "$LOG" ;;
    first) echo "== first (at most 240s)" | tee -a "$LOG"
           timeout -k 5 240 $PY "$(dirname "$0")/measure_first_passes.py" --json "$OUT/first.json" \
             $([[ " ${EXTRA:-} " == *" --quick "* ]] && echo --quick) 2>&1 \
             | grep -v "^W[0-9]" | tee -a "$LOG" ;;
    job) run job 210 --parts job --train-images "$N" --epochs 2
         cp "$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["job"]["log"])' "$OUT/job.json")" "$OUT/job_train.log" ;;
    timm) if [ -z "${TIMM_TRAIN:-}" ]; then echo "== timm: set TIMM_TRAIN" | tee -a "$LOG"; continue; fi
          run timm 150 --parts timm --timm-train "$TIMM_TRAIN" --train-images "$N" --epochs 2
          cp "$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["timm"]["log"])' "$OUT/timm.json")" "$OUT/timm.log" ;;
    loader) run loader 60 --parts loader --train-images "$N" --loader-seconds 2 ;;
    batch) run model64 80 --parts model --batch-size 64 --steps 20
           run model128 80 --parts model --batch-size 128 --steps 20 ;;
    cudnn) run cudnn_off 90 --parts model --cudnn-benchmark off --steps 30 ;;
    graphs) run graphs 240 --parts model --compile reduce-overhead --steps 30 ;;
    *) echo "unknown step $step" | tee -a "$LOG" ;;
  esac
done
echo "== done" | tee -a "$LOG"
