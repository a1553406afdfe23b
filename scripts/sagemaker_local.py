#!/usr/bin/env python3
"""Run a training job on the image through the SageMaker Python SDK's local mode, and host its model.

This is the client buyers use on a laptop with Docker: `Estimator(instance_type="local")` with
`file://` inputs and output. The SDK writes the /opt/ml tree (hyperparameters as strings,
resourceconfig.json), sets TRAINING_JOB_NAME, runs `IMAGE train` through docker compose, and packs
the container's /opt/ml/model into model.tar.gz and /opt/ml/output into output.tar.gz under
--output. Afterwards this script lists model.tar.gz, checks that it holds exactly the model files
(outputs.MODEL_FILES), and prints the metric lines and any failure reason (from output.tar.gz's
`failure`).

    python scripts/sagemaker_local.py --data DIR [--image IMAGE] [--output DIR]
        [--weights FILE] [--deploy] [key=value ...]
    python scripts/sagemaker_local.py --data DIR --model-data MODEL.tar.gz [--image IMAGE]

DATA holds train/<label>/<image> and val/<label>/<image> (the 'train' and 'val' channels).
--weights names a timm weights file on this machine: it goes in as a third channel, 'weights',
and pretrained_path points at it inside the container. Each key=value is a hyperparameter.
Exits 0 when the job succeeded and model.tar.gz holds exactly the model files, 1 otherwise.

--deploy then hosts that model.tar.gz as a local endpoint, as a buyer would try a model package:
`Model(image_uri=IMAGE, model_data="file://.../model.tar.gz").deploy(instance_type="local")`. The
SDK extracts the archive, starts `IMAGE serve` through docker compose with it at /opt/ml/model and
port 8080 published (--serving-port to change the host's side), and waits for GET /ping. This
script then invokes the endpoint with the first image of DATA/val (sorted) and checks the answer:
every class once, probabilities summing to 1. --model-data deploys a model.tar.gz made before,
without training. The endpoint is deleted (its container stopped) afterwards.

Needs the SageMaker SDK v2 (v3 dropped sagemaker.estimator and sagemaker.local), in its own venv:
    python3 -m venv .venv-sagemaker && .venv-sagemaker/bin/pip install 'sagemaker==2.257.7'
    .venv-sagemaker/bin/python scripts/sagemaker_local.py --data ...
and a Docker engine with `docker compose` or `docker-compose`. Without Docker (docs/container.md):
    bash scripts/install_podman.sh      # podman, runc, docker-compose 1.29, containers.conf
    bash scripts/start_podman_socket.sh # podman's Docker API on /var/run/docker.sock
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# The package's own names (these two modules need only the standard library and PyYAML, which the
# SDK's venv has too), so that this check cannot drift from what the job writes.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from efficientnet_train.metrics import TRAIN_LOSS  # noqa: E402
from efficientnet_train.outputs import MODEL_FILES as _MODEL_FILES  # noqa: E402

MODEL_FILES = set(_MODEL_FILES)
METRIC_LINE = re.compile(re.escape(TRAIN_LOSS) + r"=[0-9.]+.*")
DUMMY_ROLE = "arn:aws:iam::111111111111:role/SageMakerRole"  # local mode never assumes it
WEIGHTS_DIR = "/opt/ml/input/data/weights"
# SDK defaults config that only opts out of the SDK's telemetry request (it fails offline and
# prints a harmless traceback).
NO_TELEMETRY = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}


class Tee(io.TextIOBase):
    """sys.stdout that also keeps what was written: the SDK streams the container's log there."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def text(self) -> str:
        return "".join(self.parts)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="folder holding train/ and val/")
    parser.add_argument("--image", default="efficientnet-train:latest",
                        help="training image (default %(default)s, from scripts/build_image.sh)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent.parent / "demo_run" / "sagemaker_local",
                        help="where model.tar.gz and output.tar.gz go (default %(default)s)")
    parser.add_argument("--weights", type=Path, help="a timm weights file, passed as the 'weights' channel")
    parser.add_argument("--instance-type", default="local", choices=["local", "local_gpu"],
                        help="local_gpu runs the container with the host's GPUs")
    parser.add_argument("--instance-count", type=int, default=1,
                        help="containers (hosts algo-1, algo-2, ...) that train one model together")
    parser.add_argument("--telemetry", action="store_true", help="let the SDK send its usage telemetry")
    parser.add_argument("--deploy", action="store_true",
                        help="after training, host model.tar.gz as a local endpoint and invoke it with one image")
    parser.add_argument("--model-data", type=Path, metavar="MODEL_TAR_GZ",
                        help="skip training: host this model.tar.gz as a local endpoint and invoke it")
    parser.add_argument("--serving-port", type=int, default=8080,
                        help="host port of the local endpoint (default %(default)s, the SDK's)")
    parser.add_argument("hyperparameters", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            parser.error(f"{args.data / split} is missing: --data needs train/ and val/ folders")
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"--weights {args.weights} is not a file")
    if args.model_data is not None and not args.model_data.is_file():
        parser.error(f"--model-data {args.model_data} is not a file")
    hyperparameters = {}
    for pair in args.hyperparameters:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"not key=value: {pair}")
        hyperparameters[key] = value
    args.hyperparameters = hyperparameters
    return args


def check_image(image: str) -> bool:
    """docker compose would try to pull a missing image from a registry: say so plainly instead."""
    import docker

    client = docker.from_env()
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        tags = sorted(tag for found in client.images.list() for tag in found.tags if "efficientnet" in tag)
        print(f"Image {image} not found; local images: {', '.join(tags) or 'none'}", file=sys.stderr)
        return False


def job_containers(image: str) -> set[str]:
    """Ids of the containers local mode starts from IMAGE (named <random>-algo-N-<random>)."""
    import docker

    client = docker.from_env()
    return {c.id for c in client.containers.list(all=True)
            if "-algo-" in c.name and image in (c.attrs.get("Config") or {}).get("Image", "")}


def finish_container(container_id: str) -> tuple[str, int | None]:
    """The container's name and exit code; then removes it (the archives hold its results)."""
    import docker

    try:
        container = docker.from_env().containers.get(container_id)
        name, code = container.name, container.attrs.get("State", {}).get("ExitCode")
        container.remove(force=True)
        return name, code
    except docker.errors.APIError as exc:
        print(f"Could not inspect or remove container {container_id[:12]}: {exc}", file=sys.stderr)
        return container_id[:12], None


def weights_channel(weights: Path, scratch: Path) -> Path:
    """A folder holding only the weights file: local mode mounts a file channel's whole folder."""
    folder = scratch / "weights"
    folder.mkdir()
    target = folder / weights.name
    try:
        os.link(weights.resolve(), target)
    except OSError:
        shutil.copy2(weights, target)
    return folder


def read_member(archive: Path, name: str) -> str | None:
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile(name)
            return member.read().decode("utf-8", "replace") if member else None
    except (KeyError, OSError, tarfile.TarError):
        return None


IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def first_val_image(data: Path) -> Path | None:
    images = sorted(p for p in (data / "val").rglob("*") if p.suffix.lower() in IMAGE_TYPES)
    return images[0] if images else None


def deploy(args, session, model_archive: Path) -> bool:
    """Hosts model_archive as a local endpoint, invokes it with one image, deletes the endpoint."""
    import json

    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.model import Model
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import IdentitySerializer

    image = first_val_image(args.data)
    if image is None:
        print(f"No .png or .jpg image under {args.data / 'val'} to invoke the endpoint with")
        return False
    # Local mode extracts model.tar.gz in the folder that holds it and mounts that whole folder at
    # /opt/ml/model: give it a folder of its own, removed afterwards.
    folder = Path(tempfile.mkdtemp(prefix="sagemaker_local_model_")).resolve()
    shutil.copy2(model_archive, folder / "model.tar.gz")
    # Through the setter, which passes the port on to the runtime client that invokes the endpoint. No
    # container_root: the training job's scratch folder is gone by now (the SDK's default, /tmp, is used).
    session.config = {"local": {"local_code": True, "serving_port": args.serving_port}}
    model = Model(image_uri=args.image, model_data=f"file://{folder / 'model.tar.gz'}", role=DUMMY_ROLE,
                  predictor_cls=Predictor, sagemaker_session=session)
    print(f"\n===== deploying {model_archive} on {args.image} (local endpoint, port {args.serving_port}) =====",
          flush=True)
    predictor = None
    ok = False
    before = job_containers(args.image)
    start = time.monotonic()
    try:
        # wait=False: local mode's create_endpoint already returns only once /ping answers 200;
        # waiting would add the SDK's status poll, which sleeps 30 s before its first look.
        predictor = model.deploy(initial_instance_count=1, instance_type=args.instance_type,
                                 serializer=IdentitySerializer(IMAGE_TYPES[image.suffix.lower()]),
                                 deserializer=JSONDeserializer(), wait=False)
        ready = time.monotonic() - start
        start = time.monotonic()
        labels = json.loads(read_member(model_archive, "labels.json") or "{}")
        answer = predictor.predict(image.read_bytes(), initial_args={"CustomAttributes": f"top_k={len(labels)}"})
        latency = time.monotonic() - start
        print(f"\n===== sagemaker_local.py deploy summary =====")
        print(f"deploy: in service after {ready:.0f} s (the SDK looks at /ping every 5 s); invoke with {image} "
              f"({image.stat().st_size} bytes): {latency * 1000:.0f} ms, with the SDK's `docker info` on each call")
        print(f"answer: {json.dumps(answer)}")
        prediction = answer["predictions"][0]
        total = sum(prediction["probabilities"])
        ok = sorted(prediction["labels"]) == sorted(labels.values()) and abs(total - 1) < 1e-4
        print(f"every class once, probabilities sum to {total:.6f}: {'ok' if ok else 'WRONG'}")
    except Exception as exc:  # noqa: BLE001 - reported; the endpoint is still deleted
        print(f"deploy or invoke failed: {exc!r}")
    finally:
        if predictor is not None:
            predictor.delete_endpoint()
        else:  # deploy() failed part way: stop whatever endpoint local mode started
            for endpoint in list(getattr(session.sagemaker_client, "_endpoints", {}) or {}):
                try:
                    session.delete_endpoint(endpoint)
                except Exception:  # noqa: BLE001
                    pass
        # Deleting the endpoint stops docker compose, which stops the container (SIGTERM) but
        # leaves it behind: its exit code says whether serve stopped cleanly.
        for name, code in sorted(dict(finish_container(c) for c in job_containers(args.image) - before).items()):
            print(f"Serving container {name} exit code after the endpoint was deleted: {code}")
            ok = ok and code == 0
        shutil.rmtree(folder, ignore_errors=True)
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # boto3 needs one; nothing calls AWS
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    from sagemaker.estimator import Estimator
    from sagemaker.local import LocalSession

    if not check_image(args.image):
        return 1
    if args.model_data is not None:
        session = LocalSession(sagemaker_config=None if args.telemetry else NO_TELEMETRY)
        return 0 if deploy(args, session, args.model_data.resolve()) else 1
    data = args.data.resolve()
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    model_archive, output_archive = output / "model.tar.gz", output / "output.tar.gz"
    for stale in (model_archive, output_archive):  # an earlier run's archives would mislead
        stale.unlink(missing_ok=True)

    inputs = {"train": f"file://{data / 'train'}", "val": f"file://{data / 'val'}"}
    hyperparameters = dict(args.hyperparameters)
    # The SDK's job folders (/opt/ml trees, a copy of model/) and the weights channel go in one
    # scratch folder, removed afterwards. resolve(): Docker Desktop cannot mount macOS's /var.
    scratch = Path(tempfile.mkdtemp(prefix="sagemaker_local_")).resolve()
    if args.weights is not None:
        inputs["weights"] = f"file://{weights_channel(args.weights, scratch)}"
        hyperparameters["pretrained_path"] = f"{WEIGHTS_DIR}/{args.weights.name}"

    session = LocalSession(sagemaker_config=None if args.telemetry else NO_TELEMETRY)
    session.config = {"local": {"local_code": True, "container_root": str(scratch)}}
    estimator = Estimator(
        image_uri=args.image,
        role=DUMMY_ROLE,
        instance_count=args.instance_count,
        instance_type=args.instance_type,
        hyperparameters=hyperparameters,
        output_path=f"file://{output}",
        sagemaker_session=session,
    )
    print(f"Image {args.image}; channels {inputs}; hyperparameters {hyperparameters}", flush=True)

    before = job_containers(args.image)
    tee = Tee(sys.stdout)
    error = None
    start = time.monotonic()
    sys.stdout = tee
    try:
        estimator.fit(inputs, wait=True, logs=True)
    except Exception as exc:  # noqa: BLE001 - reported below with the container's failure reason
        error = exc
    finally:
        sys.stdout = tee.stream
        # docker compose leaves the exited algo-N container behind. Its exit code is the truth:
        # docker-compose 1.29 on podman's API can miss the container's exit and return 0 (its
        # 'die' event wins the race with the log stream), so fit() does not raise.
        exit_codes = dict(finish_container(c) for c in job_containers(args.image) - before)
        shutil.rmtree(scratch, ignore_errors=True)  # files the container wrote may be root's
    elapsed = time.monotonic() - start

    print("\n===== sagemaker_local.py summary =====")
    print(f"fit: {elapsed:.0f} s, {'raised ' + repr(error) if error else 'returned'}")
    ok = error is None
    for name, code in sorted(exit_codes.items()):
        print(f"Container {name} exit code: {code}")
        ok = ok and code == 0
    if not exit_codes:
        print("No container of this job found")
    metrics = METRIC_LINE.findall(tee.text())
    print("Metric lines:" if metrics else "Metric lines: none")
    for line in metrics:
        print(f"  {line.strip()}")
    if model_archive.is_file():
        with tarfile.open(model_archive) as tar:
            members = tar.getnames()
        print(f"Model artifact: {model_archive}")
        for name in members:
            print(f"  {name}")
        names = {name.removeprefix("./") for name in members if name not in (".", "./")}
        if names == MODEL_FILES:
            print(f"model.tar.gz holds exactly the {len(MODEL_FILES)} model files")
        else:
            ok = False
            print(f"model.tar.gz is WRONG: missing {sorted(MODEL_FILES - names) or 'nothing'}, "
                  f"extra {sorted(names - MODEL_FILES) or 'nothing'}")
    else:
        ok = False
        print(f"No model artifact at {model_archive}")
    if output_archive.is_file():
        print(f"Output archive: {output_archive}")
        failure = read_member(output_archive, "failure")
        if failure:
            ok = False
            print(f"Failure reason: {failure.strip()}")
    if ok and args.deploy:
        ok = deploy(args, session, model_archive)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
