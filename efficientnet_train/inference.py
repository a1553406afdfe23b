"""The trained model as an image classifier, shared by `serve` and `predict`.

Everything that decides a prediction comes from the training code itself: the weights that
were chosen as best (`load_trained_model`), validation's preprocessing (`eval_transform` and `ModelInput` on
the checkpoint's `data_config`) and validation's prediction (`predict_log_probabilities`, mirrored
when the job evaluated that way), so a served probability is the one validation computed.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch
from PIL import Image

from .data import ModelInput, decode_side, eval_transform
from .errors import JobError
from .model import archive_member, autocast_for, load_trained_model, predict_label_logits, predict_log_probabilities
from .outputs import BEST_MODEL_FILE, LABELS_FILE
from .untrusted import shown

LABELS_MAX_BYTES = 16 * 2**20  # labels.json of 1,000 classes with 255-byte names is 0.3 MB


class Classifier:
    def __init__(self, model_dir: Path, device: torch.device | None = None):
        check_model_dir(model_dir)

        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, checkpoint = load_trained_model(model_dir / BEST_MODEL_FILE)
        self.model = model.to(self.device)
        self.labels = read_labels(model_dir, expected=len(checkpoint["labels"]))
        self.transform = eval_transform(checkpoint["data_config"])
        self.to_input = ModelInput(checkpoint["data_config"], self.device)
        self.decode_side = decode_side(checkpoint["data_config"], training=False)  # pixels as validation decoded
        self.mirror = bool(checkpoint.get("eval_hflip", False))
        # Fitted on the validation set after training; models saved before calibration existed have none.
        self.temperature = float(checkpoint.get("temperature", 1.0))
        # Several labels an image: a probability each, and each label's threshold for saying yes.
        self.multi_label = bool(checkpoint.get("multi_label", False))
        self.thresholds = torch.tensor(checkpoint["thresholds"], dtype=torch.float) if self.multi_label else None
        self.autocast, _ = autocast_for(self.device)  # validation's precision: a GPU serves what it validated

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (each label's, for several labels an image), one row per preprocessed image, on the
        CPU."""
        images = self.to_input(images)
        with self.autocast():
            if self.multi_label:
                return predict_label_logits(self.model, images, self.mirror, self.temperature).sigmoid().cpu()
            log_probabilities = predict_log_probabilities(self.model, images, self.mirror, self.temperature)
        return log_probabilities.exp().cpu()

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[dict]:
        """The k likeliest labels of each row, likeliest first: {"labels": [...], "probabilities": [...]}; for
        several labels an image also "predicted_labels", those at or above their thresholds, likeliest first."""
        values, indices = probabilities.topk(min(k, len(self.labels)), dim=1)
        answers = [{"labels": [self.labels[i] for i in row_indices], "probabilities": row_values}
                   for row_values, row_indices in zip(values.tolist(), indices.tolist())]
        if self.multi_label:
            for answer, predicted in zip(answers, self.predicted_labels(probabilities)):
                answer["predicted_labels"] = predicted
        return answers

    def verbose(self, probabilities: torch.Tensor) -> list[dict]:
        """Every label with its probability, in the labels' order, and the likeliest: SageMaker JumpStart's image
        classifiers' answer ({"labels", "probabilities", "predicted_label"}); for several labels an image,
        "predicted_labels" instead, those at or above their thresholds."""
        if self.multi_label:
            return [{"labels": self.labels, "probabilities": row, "predicted_labels": predicted}
                    for row, predicted in zip(probabilities.tolist(), self.predicted_labels(probabilities))]
        return [{"labels": self.labels, "probabilities": row, "predicted_label": self.labels[index]}
                for row, index in zip(probabilities.tolist(), probabilities.argmax(dim=1).tolist())]

    def predicted_labels(self, probabilities: torch.Tensor) -> list[list[str]]:
        """Each row's labels at or above their thresholds, likeliest first."""
        said = probabilities >= self.thresholds
        return [[self.labels[i] for i in row.argsort(descending=True).tolist() if yes[i]]
                for row, yes in zip(probabilities, said)]


def check_model_dir(model_dir: Path) -> None:
    missing = [name for name in (BEST_MODEL_FILE, LABELS_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise JobError(f"No trained model in {model_dir}: {', '.join(missing)} missing. It must hold the "
                       f"contents of the model.tar.gz that `train` wrote ({BEST_MODEL_FILE}, {LABELS_FILE}); "
                       f"SageMaker extracts it to /opt/ml/model, and SAGEMAKER_BASE_DIR moves /opt/ml.")


def model_files(source: Path, scratch: Path) -> Path:
    """The model folder to load: `source` if it is one; for a model.tar.gz, its two files extracted by name into
    `scratch` (nothing else in the archive is read, and no name in it becomes a path)."""
    if source.is_dir():
        check_model_dir(source)
        return source
    if not source.is_file():
        raise JobError(f"{source} does not exist: give a model folder (model_best.pth.tar, labels.json) or the "
                       f"model.tar.gz a training job wrote.")
    try:
        (scratch / BEST_MODEL_FILE).write_bytes(archive_member(source, BEST_MODEL_FILE))
        (scratch / LABELS_FILE).write_bytes(archive_member(source, LABELS_FILE, LABELS_MAX_BYTES))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise JobError(f"{source} cannot be read as a model.tar.gz ({type(exc).__name__}: {shown(exc, 200)}).") \
            from exc
    return scratch


def read_labels(model_dir: Path, expected: int) -> list[str]:
    path = model_dir / LABELS_FILE
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        labels = [str(mapping[str(index)]) for index in range(len(mapping))]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise JobError(f"{path} must map every index \"0\"..\"N-1\" to a class name, as `train` writes it "
                       f"({type(exc).__name__}: {exc}).") from exc
    if len(labels) != expected:
        raise JobError(f"{path} names {len(labels)} classes but {BEST_MODEL_FILE} beside it was trained on "
                       f"{expected}: the two files come from different jobs.")
    return labels
