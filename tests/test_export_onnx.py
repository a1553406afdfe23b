"""`export-onnx`: the model as one ONNX file whose probabilities are `predict`'s, for any batch size."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from conftest import TINY_MODEL, make_job, run_train
from efficientnet_train.decoding import load_image
from efficientnet_train.errors import JobError
from efficientnet_train.export_onnx import export
from efficientnet_train.inference import Classifier

EXPORT_COMMAND = Path(sys.executable).with_name("export-onnx")


@pytest.fixture(scope="module", params=["mirrored", "plain"])
def job(request, tmp_path_factory, tiny_weights) -> Path:
    """A finished tiny job, validated with mirror averaging (the default) or without it (hflip=0)."""
    hyperparameters = {"epochs": "2", "batch_size": "8", "model": TINY_MODEL, "pretrained_path": str(tiny_weights["pth"]),
                       "img_size": "32", "workers": "0", "lr": "0.1", "opt": "sgd"}
    if request.param == "plain":
        hyperparameters["hflip"] = "0"
    base = make_job(tmp_path_factory.mktemp("opt_ml"), hyperparameters)
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base


def val_images(job: Path) -> list[Path]:
    return sorted(p for p in (job / "input" / "data" / "val").rglob("*") if p.is_file())


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_answers_what_predict_answers(job, tmp_path, batch):
    output = tmp_path / "model.onnx"
    result = export(job / "model", output)
    assert result["max_difference"] <= 1e-4 and output.stat().st_size == result["bytes"]
    classifier = Classifier(job / "model", torch.device("cpu"))  # what `predict` and `serve` run
    images = torch.stack([classifier.preprocess(load_image(str(path))) for path in val_images(job)[:batch]])
    assert len(images) == batch
    expected = classifier.probabilities(images).numpy()
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"images": images.numpy()})[0]
    assert probabilities.shape == expected.shape
    np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()
    assert classifier.temperature != 1.0  # the calibration is in the file


def test_the_file_says_its_labels_and_preprocessing(job, tmp_path):
    export(job / "model", tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(metadata["labels"]) == ["ants", "bees", "wasps"]
    assert json.loads(metadata["preprocessing"])["input_size"][1:] == [37, 37]  # 1.15 x img_size 32
    inputs = model.graph.input[0].type.tensor_type
    assert inputs.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inputs.shape.dim][1:] == [3, 37, 37]
    assert not [p for p in tmp_path.iterdir() if p.name != "model.onnx"]  # one file: no external weights


def test_export_onnx_takes_model_tar_gz_and_says_what_it_wrote(job, tmp_path):
    archive = job / "model" / "model.tar.gz"
    assert archive.is_file()
    result = subprocess.run([str(EXPORT_COMMAND), str(archive), "--output", str(tmp_path / "c.onnx")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Wrote {tmp_path / 'c.onnx'} (") and "onnxruntime matches PyTorch" in result.stdout


def test_export_onnx_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        export(tmp_path / "nothing", tmp_path / "m.onnx")
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tar:
        tar.add(__file__, arcname="labels.json")
    with pytest.raises(JobError, match="holds no model_best.pth.tar"):
        export(tmp_path / "model.tar.gz", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_documented_onnxruntime_example_answers_what_predict_answers(job, tmp_path):
    """docs/serving.md's example, run as written on a validation image: its own resize and crop, in Pillow."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    example = docs.split("<!-- onnxruntime example: tests/test_export_onnx.py runs this block -->\n```python\n")[1]
    example = example.split("```")[0]
    export(job / "model", tmp_path / "model.onnx")
    image = next(p for p in val_images(job) if p.suffix == ".png")
    (tmp_path / "bee.jpg").write_bytes(image.read_bytes())  # the example's file name; Pillow reads the content
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    label, probability = result.stdout.rsplit(" ", 1)
    classifier = Classifier(job / "model", torch.device("cpu"))
    expected = classifier.probabilities(classifier.preprocess(load_image(str(image))).unsqueeze(0))[0]
    assert label == classifier.labels[int(expected.argmax())]
    assert abs(float(probability) - float(expected.max())) < 1e-4


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXPORT_COMMAND), *args], capture_output=True, text=True, timeout=300)


def test_export_onnx_gives_a_reason_not_a_traceback_for_a_foreign_or_unknown_model(job, tmp_path):
    """A foreign pickle and an unknown architecture printed tracebacks; a Hugging Face Hub name made the export
    reach the network."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "labels.json").write_bytes((job / "model" / "labels.json").read_bytes())
    checkpoint = torch.load(job / "model" / "model_best.pth.tar", weights_only=True)
    cases = {"is not one of timm's EfficientNets": {**checkpoint, "arch": "hf-hub:someone/model"},
             "do not fit": {**checkpoint, "state_dict": {"classifier.weight": torch.zeros(2, 2)}},
             "has no state_dict": {key: value for key, value in checkpoint.items() if key != "state_dict"}}
    for reason, content in cases.items():
        torch.save(content, model_dir / "model_best.pth.tar")
        result = run_export(str(model_dir), "--output", str(tmp_path / "m.onnx"))
        assert result.returncode == 1 and reason in result.stderr and "Traceback" not in result.stderr, result.stderr
    with open(model_dir / "model_best.pth.tar", "wb") as f:
        pickle.dump(Foreign(), f)
    result = run_export(str(model_dir), "--output", str(tmp_path / "m.onnx"))
    assert result.returncode == 1 and "cannot be loaded as plain weights" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m.onnx").exists()


def test_export_onnx_refuses_an_output_folder_or_link_before_exporting(job, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "link.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    for output, reason in ((tmp_path / "out", "is a folder"), (tmp_path / "link.onnx", "is a symbolic link")):
        started = time.monotonic()
        result = run_export(str(job / "model"), "--output", str(output))
        assert result.returncode == 1 and reason in result.stderr and "Traceback" not in result.stderr
        assert time.monotonic() - started < 60  # not after the export (24 s on the 2-core CPU for Lite0)
    assert not (tmp_path / "elsewhere.onnx").exists() and list((tmp_path / "out").iterdir()) == []


class Foreign:
    """A type a weights-only load refuses."""
