"""Everything the job knows about SageMaker's container contract, read in one place.

The rest of the package asks a `SageMakerEnvironment` for paths and settings instead
of reading `/opt/ml` or environment variables itself (the same idea as the
sagemaker-training-toolkit's `environment.py`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .errors import JobError
from .untrusted import shown

DEFAULT_BASE_DIR = "/opt/ml"
# SageMaker shows the first 1,024 characters of output/failure as the job's FailureReason.
FAILURE_REASON_LIMIT = 1024


@dataclass(frozen=True)
class Hosts:
    """The instances of a training job (resourceconfig.json): `names` in SageMaker's order, the first one
    being where the others meet, and the network interface they reach each other on."""

    names: tuple[str, ...]
    current: str
    interface: str | None  # None: one host, everything over the loopback

    @property
    def rank(self) -> int:
        return self.names.index(self.current)


HYPERPARAMETERS_MAX_BYTES = 1_000_000
DEBUG_VARIABLE = "EFFICIENTNET_DEBUG"  # set to 1: a buyer's error also prints its traceback

TRAIN_USAGE = f"""usage: train [-h | --version | --hyperparameters]

Fine-tune an EfficientNet image classifier as a SageMaker training job: SageMaker runs `IMAGE train` with no
arguments; it reads and writes SageMaker's {DEFAULT_BASE_DIR} tree (or $SAGEMAKER_BASE_DIR).

reads:
  input/config/hyperparameters.json    the hyperparameters, all optional (`train --hyperparameters` lists them)
  input/data/train/<label>/<image>     training images, one folder per label ($SM_CHANNEL_TRAIN instead)
  input/data/val/<label>/<image>       validation images ($SM_CHANNEL_VAL); without them, val_fraction of train
  input/data/model/                    optional: a previous job's model.tar.gz, to continue ($SM_CHANNEL_MODEL)
  input/data/pretrained/               optional: one timm weights file to start from ($SM_CHANNEL_PRETRAINED)
  input/data/train_0, val_0            in Pipe mode (input/config/inputdataconfig.json): a Ground Truth manifest
                                       streamed as RecordIO (source-ref, label, metadata), spooled to input/spool/
  input/config/checkpointconfig.json   where checkpoints go (else checkpoints/); a restart resumes from them
  input/config/resourceconfig.json     the instances of a multi-instance job

writes:
  model/          model_best.pth.tar, labels.json, args.yml, summary.csv, metrics.png, confusion_matrix.csv,
                  held_out_validation.csv without a val channel (and model.tar.gz when $TRAINING_JOB_NAME is
                  unset: outside SageMaker)
  checkpoints/    the resumable state, after every epoch
  output/failure  why the job failed, with the fix (SageMaker's FailureReason)
  stdout          the log: one metric line an epoch (train:loss=... validation:acc_1=...)

environment: SAGEMAKER_BASE_DIR, SM_CHANNEL_<NAME>, TRAINING_JOB_NAME, MASTER_PORT (29500),
  TRAIN_PEER_TIMEOUT_S (600), {DEBUG_VARIABLE}=1 (print the traceback of a user error too)

exit status: 0 trained, or stopped by SIGTERM or Ctrl-C (a checkpoint is saved: run again to resume); 130 after a
  second Ctrl-C (stopped at once, nothing more saved); 1 failed."""

SERVE_USAGE = f"""usage: serve [-h | --version]

Serve a model trained by `train` over HTTP, as a SageMaker endpoint or batch transform: SageMaker runs
`IMAGE serve` with no arguments.

reads:   model/model_best.pth.tar and model/labels.json under {DEFAULT_BASE_DIR} (or $SAGEMAKER_BASE_DIR), where
         SageMaker extracts model.tar.gz
listens: 0.0.0.0:8080 ($SAGEMAKER_BIND_TO_PORT): GET /ping, POST /invocations, GET /execution-parameters
answers: application/json, application/jsonlines, each optionally ;verbose (JumpStart's form); errors as
         {{"error": "..."}}
log:     stdout

environment: SAGEMAKER_BASE_DIR, SAGEMAKER_BIND_TO_PORT (8080), SAGEMAKER_BATCH (true: JSON Lines by default),
  SAGEMAKER_MAX_PAYLOAD_IN_MB (6), SAGEMAKER_MODEL_SERVER_WORKERS (1), SERVE_THREADS (16), SERVE_TOP_K (5),
  SERVE_MAX_BATCH_SIZE (32)

exit status: 0 after SIGTERM or Ctrl-C (requests in flight are finished); 1 when the model cannot be loaded."""


@dataclass(frozen=True)
class SageMakerEnvironment:
    base_dir: Path
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "SageMakerEnvironment":
        environ = dict(os.environ if environ is None else environ)
        # SAGEMAKER_BASE_DIR is the name the SageMaker training toolkit uses for local runs.
        return cls(Path(environ.get("SAGEMAKER_BASE_DIR") or DEFAULT_BASE_DIR), environ)

    @property
    def hyperparameters_file(self) -> Path:
        return self.base_dir / "input" / "config" / "hyperparameters.json"

    @property
    def model_dir(self) -> Path:
        return self.base_dir / "model"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def checkpoint_dir(self) -> Path:
        """Where resumable state goes: SageMaker syncs it with checkpoint_s3_uri and restores it on restart."""
        config = self.base_dir / "input" / "config" / "checkpointconfig.json"
        if config.exists():
            try:
                local_path = json.loads(config.read_text(encoding="utf-8")).get("LocalPath")
            except (ValueError, AttributeError) as exc:
                raise JobError(f"{config} is not a JSON object with a LocalPath ({exc}).") from exc
            if local_path:
                return Path(local_path)
        return self.base_dir / "checkpoints"

    @property
    def training_job_name(self) -> str | None:
        """Set by SageMaker (and by the SDK's local mode); absent in a plain `docker run`."""
        return self.environ.get("TRAINING_JOB_NAME") or None

    @property
    def hosts(self) -> Hosts:
        path = self.base_dir / "input" / "config" / "resourceconfig.json"
        if not path.exists():  # a plain `docker run`: one machine
            return Hosts(("localhost",), "localhost", None)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            names, current = tuple(config["hosts"]), config["current_host"]
            interface = config.get("network_interface_name") or None
        except (ValueError, KeyError, TypeError) as exc:
            raise JobError(f"{path} is not a SageMaker resource config ({type(exc).__name__}: {exc}); it must be "
                           'a JSON object like {"current_host": "algo-1", "hosts": ["algo-1", "algo-2"], '
                           '"network_interface_name": "eth0"}.') from exc
        if current not in names:
            raise JobError(f"{path}: current_host {current!r} is not one of the hosts {list(names)}.")
        return Hosts(names, current, interface if len(names) > 1 else None)

    @property
    def processes_per_host(self) -> int | None:
        """None: one per GPU (one on a CPU-only host). Set to run several processes without GPUs, e.g. in tests."""
        return _positive_int(self.environ, "TRAIN_PROCESSES_PER_HOST", 0) or None

    @property
    def peer_timeout_s(self) -> int:
        """How long hosts wait for each other to resolve and connect before the job fails."""
        return _positive_int(self.environ, "TRAIN_PEER_TIMEOUT_S", 600)

    @property
    def rendezvous_port(self) -> int:
        """Where the processes of a distributed job meet, on the first host; torchrun's name and default."""
        return _positive_int(self.environ, "MASTER_PORT", 29500)

    def input_mode(self, channel: str) -> str:
        """How SageMaker gives the channel: "File" (a folder; also FastFile's), or "Pipe" (a FIFO a pass)."""
        path = self.base_dir / "input" / "config" / "inputdataconfig.json"
        if not path.exists():
            return "File"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            mode = (config.get(channel) or {}).get("TrainingInputMode", "File")
        except (ValueError, AttributeError) as exc:
            raise JobError(f"{path} is not SageMaker's input data config ({type(exc).__name__}: {exc}).") from exc
        return "Pipe" if mode == "Pipe" else "File"

    def pipe(self, channel: str) -> Path:
        """The FIFO of a Pipe-mode channel's first pass; a job that reads it once opens no other."""
        return self.base_dir / "input" / "data" / f"{channel}_0"

    def spool_dir(self, channel: str) -> Path:
        """Where a Pipe-mode channel's images are written once, to train from with random access: on the training
        volume (VolumeSizeInGB), beside the channels."""
        return self.base_dir / "input" / "spool" / channel

    def channel_dir(self, name: str) -> Path:
        override = self.environ.get(f"SM_CHANNEL_{name.upper()}")
        return Path(override) if override else self.base_dir / "input" / "data" / name

    def read_hyperparameters(self) -> dict:
        """The raw hyperparameters.json object: names to (normally) string values."""
        path = self.hyperparameters_file
        if not path.exists():
            return {}
        if path.stat().st_size > HYPERPARAMETERS_MAX_BYTES:
            raise JobError(f"{path} holds {path.stat().st_size:,} bytes, more than the {HYPERPARAMETERS_MAX_BYTES:,} "
                           f"any set of this algorithm's hyperparameters needs (SageMaker itself allows 2,500 "
                           f"characters a value). Remove the oversized values.")
        try:
            raw = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise JobError(f"{path} is not valid JSON ({shown(exc, 200)}). It must be one flat JSON object "
                           'of hyperparameter names to values, e.g. {"epochs": "10"}.') from exc
        if not isinstance(raw, dict):
            raise JobError(f"{path} must hold one JSON object of hyperparameter names to values, "
                           f"not a {type(raw).__name__}.")
        return raw

    def write_failure(self, reason: str) -> None:
        """Record why the job failed, where SageMaker shows it to the buyer."""
        text = " ".join(reason.split())  # one paragraph: CloudWatch and the console show it whole
        if len(text) > FAILURE_REASON_LIMIT:
            text = text[: FAILURE_REASON_LIMIT - 3] + "..."
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.failure_file.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:  # a full disk may refuse even this; the log still has the reason
            print(f"Cannot write {self.failure_file} ({exc}); the failure reason was: {text}", file=sys.stderr)


# Serving: what SageMaker hosting and batch transform tell the `serve` container, and this image's own
# settings (SERVE_*), which a buyer sets as the model's or the transform job's environment.
DEFAULT_SERVING_PORT = 8080
# InvokeEndpoint's real-time limit; batch transform says its own in SAGEMAKER_MAX_PAYLOAD_IN_MB.
REALTIME_PAYLOAD_LIMIT_MB = 6
DEFAULT_TOP_K = 5
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class ServingEnvironment:
    model_dir: Path
    port: int
    batch: bool  # batch transform: answer JSON Lines
    payload_limit_mb: int
    top_k: int
    workers: int  # server processes, each with its own copy of the model
    threads: int  # concurrent requests per process
    max_batch_size: int  # images per forward pass when requests are batched together

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "ServingEnvironment":
        environ = dict(os.environ if environ is None else environ)
        return cls(
            model_dir=SageMakerEnvironment.from_environ(environ).model_dir,
            # Only honoured because the image declares com.amazonaws.sagemaker.capabilities.accept-bind-to-port.
            port=_positive_int(environ, "SAGEMAKER_BIND_TO_PORT", DEFAULT_SERVING_PORT),
            # The SDK's local mode sends "True", SageMaker "true".
            batch=environ.get("SAGEMAKER_BATCH", "").strip().lower() == "true",
            # Some local tools send 0 for "not set".
            payload_limit_mb=_positive_int(environ, "SAGEMAKER_MAX_PAYLOAD_IN_MB", REALTIME_PAYLOAD_LIMIT_MB,
                                           zero_means_default=True),
            top_k=_positive_int(environ, "SERVE_TOP_K", DEFAULT_TOP_K),
            # The sagemaker-inference-toolkit's name for the same setting.
            workers=_positive_int(environ, "SAGEMAKER_MODEL_SERVER_WORKERS", 1),
            threads=_positive_int(environ, "SERVE_THREADS", 16),
            max_batch_size=_positive_int(environ, "SERVE_MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE),
        )


def _positive_int(environ: Mapping[str, str], name: str, default: int, zero_means_default: bool = False) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value == 0 and zero_means_default:
        return default
    if value < 1:
        raise JobError(f"The environment variable {name}='{shown(raw, 60)}' must be a whole number of at least 1 "
                       f"(or unset, for {default}).")
    return value
