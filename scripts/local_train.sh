#!/usr/bin/env bash
# Runs the training image on a local data set the way SageMaker does: lays out a mocked /opt/ml
# tree, mounts it, runs `IMAGE train` with the network off, and says where the results are.
#
#   bash scripts/local_train.sh DATA_DIR [key=value ...]
#
# DATA_DIR holds train/<label>/<image> and, optionally, val/<label>/<image> (or images and a
# manifest of their labels, train/output.manifest; docs/data.md); they are mounted read-only as the
# 'train' and 'val' channels. Each key=value becomes a hyperparameter (a string, as SageMaker
# writes them). A pretrained_path that names a file on this machine is mounted as a 'weights'
# channel and rewritten to its path inside the container. Environment:
#   IMAGE   the image (default efficientnet-train:latest, from scripts/build_image.sh)
#   WORK    the mocked /opt/ml on this machine (default demo_run/local_train/opt_ml in the
#           repository; emptied first)
#   ENGINE  docker or podman (default: see scripts/container_engine.sh)
#   RUN_ARGS  more `run` options, e.g. "--gpus all" (docker) or "--device nvidia.com/gpu=all" (podman)
# Exits with the container's status: 0 when training succeeded.
set -euo pipefail
REPO=$(realpath "$(dirname "$0")/..")
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
DATA=$(realpath "$1")
shift
IMAGE=${IMAGE:-efficientnet-train:latest}
WORK=$(realpath -m "${WORK:-$REPO/demo_run/local_train/opt_ml}")
[ -d "$DATA/train" ] || {
    echo "$DATA/train is missing: DATA_DIR needs a train/ folder (val/ is optional)" >&2; exit 2; }
# shellcheck source=container_engine.sh
source "$REPO/scripts/container_engine.sh"

# shellcheck source=run_dir.sh
source "$REPO/scripts/run_dir.sh"
fresh_run_dir "$WORK" || { echo "(WORK=$WORK)" >&2; exit 2; }
mkdir -p "$WORK/input/config" "$WORK/input/data" "$WORK/model" "$WORK/output"
mounts=(-v "$WORK:/opt/ml" -v "$DATA/train:/opt/ml/input/data/train:ro")
[ -d "$DATA/val" ] && mounts+=(-v "$DATA/val:/opt/ml/input/data/val:ro")  # else the job holds val_fraction out
pairs=()
for pair in "$@"; do
    [[ "$pair" == *=* ]] || { echo "Not key=value: $pair" >&2; exit 2; }
    key=${pair%%=*}
    value=${pair#*=}
    if [ "$key" = pretrained_path ] && [ -f "$value" ]; then
        file=$(realpath "$value")
        mounts+=(-v "$file:/opt/ml/input/data/weights/$(basename "$file"):ro")
        value=/opt/ml/input/data/weights/$(basename "$file")
    fi
    pairs+=("$key=$value")
done
python3 - "$WORK/input/config/hyperparameters.json" "${pairs[@]}" <<'PY'
import json, sys
values = dict(pair.split("=", 1) for pair in sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(values, f, indent=1)
PY

run_args=(run --rm --network none --shm-size 1g "${PODMAN_FLAGS[@]}")
# shellcheck disable=SC2206 # RUN_ARGS is split into words on purpose
run_args+=(${RUN_ARGS:-} "${mounts[@]}" "$IMAGE" train)
LOG=$(dirname "$WORK")/train.log
echo "+ $ENGINE ${run_args[*]}"
echo "Hyperparameters: $(tr -d '\n' < "$WORK/input/config/hyperparameters.json")"
set +e
"$ENGINE" "${run_args[@]}" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e

echo
echo "Exit status: $status    log: $LOG"
echo "Metrics (the lines SageMaker's metric definitions match):"
grep -E 'train:loss=' "$LOG" | sed 's/^/  /' || echo "  none"
if [ -f "$WORK/model/model.tar.gz" ]; then
    echo "Model artifact: $WORK/model/model.tar.gz ($(tar tzf "$WORK/model/model.tar.gz" | tr '\n' ' '))"
fi
if [ -s "$WORK/output/failure" ]; then
    echo "Failure reason ($WORK/output/failure): $(cat "$WORK/output/failure")"
fi
exit "$status"
