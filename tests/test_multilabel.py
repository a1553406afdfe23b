"""Several labels an image: a channel labelled by a manifest of label lists trains sigmoid outputs, is judged by
mAP, and its model answers with each label's probability and the labels at or above their thresholds."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY_MODEL, make_job, read_summary, run_train
from efficientnet_train import multilabel
from efficientnet_train.errors import JobError
from test_serve import PREDICT_COMMAND, Server
from test_train_job import spec_metric_regexes

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def picture(colours: list[str], seed: int) -> Image.Image:
    """A 40-pixel image whose quarters hold `colours` (the rest grey), with noise: its labels are its colours."""
    pixels = np.full((40, 40, 3), 128, dtype=np.int64)
    for quarter, name in enumerate(colours):
        y, x = divmod(quarter, 2)
        pixels[y * 20:(y + 1) * 20, x * 20:(x + 1) * 20] = COLOURS[name]
    noise = np.random.default_rng(seed).integers(-30, 30, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def labelled_channel(root: Path, count: int, seed: int, ground_truth: bool) -> list[list[str]]:
    """Images of one to three colours and their manifest: Ground Truth's multi-label output (class indices, a
    class-map, S3 URIs) or one written by hand (class names, relative paths). Returns each image's labels."""
    rng, names, lines, labels = random.Random(seed), sorted(COLOURS), [], []
    (root / "img").mkdir(parents=True)
    for index in range(count):
        chosen = rng.sample(names, rng.choice([1, 2, 3]))
        picture(chosen, seed * 1000 + index).save(root / "img" / f"{index:03d}.png")
        labels.append(chosen)
        if ground_truth:
            lines.append({"source-ref": f"s3://bucket/job/img/{index:03d}.png",
                          "colours": sorted(names.index(c) for c in chosen),
                          "colours-metadata": {"class-map": {str(names.index(c)): c for c in chosen},
                                               "type": "groundtruth/image-classification-multilabel"}})
        else:
            lines.append({"source-ref": f"img/{index:03d}.png", "colours": chosen})
    (root / "output.manifest").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return labels


def multi_label_job(base: Path, hyperparameters: dict, val: bool = True) -> Path:
    make_job(base, hyperparameters, with_data=False)
    labelled_channel(base / "input" / "data" / "train", 48, 0, ground_truth=True)
    if val:
        labelled_channel(base / "input" / "data" / "val", 24, 1, ground_truth=False)
    return base


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_weights) -> tuple[Path, subprocess.CompletedProcess]:
    base = multi_label_job(tmp_path_factory.mktemp("multi"), {
        "epochs": "2", "batch_size": "8", "model": TINY_MODEL, "pretrained_path": str(tiny_weights["pth"]),
        "img_size": "32", "workers": "0"})
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base, result


def test_a_manifest_of_label_lists_trains_a_multi_label_model_judged_by_map(trained):
    base, result = trained
    rows = read_summary(base / "model")
    for name, regex in spec_metric_regexes().items():  # mAP once an epoch, as summary.csv has it; no accuracy
        values = [float(match.group(1)) for match in re.finditer(regex, result.stdout)]
        column = {"train:loss": "train_loss", "validation:loss": "eval_loss", "validation:mAP": "eval_map"}.get(name)
        assert values == ([float(row[column]) for row in rows] if column else []), name
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert args["multi_label"] is True and args["classes"] == sorted(COLOURS)
    assert args["effective_balance_classes"] == 0  # auto leaves each label's positives unweighted
    assert 0 < args["best_map"] <= 100 and set(args["best_per_label_ap"]) == set(COLOURS)
    assert len(args["calibration"]["thresholds"]) == 4 and args["linear_probe"]["mAP"] > 0
    assert [row["epoch"] for row in read_summary(base / "model")] == ["0", "1", "2"]
    assert set(read_summary(base / "model")[0]) == {"epoch", "train_loss", "eval_loss", "eval_map", "lr"}
    assert "Best model per label" in result.stdout and "threshold" in result.stdout
    with tarfile.open(base / "model" / "model.tar.gz") as archive:  # no confusion matrix: no single answer
        assert "confusion_matrix.csv" not in archive.getnames() and "model_best.pth.tar" in archive.getnames()


def test_its_answers_are_each_labels_probability_and_the_labels_over_their_thresholds(trained, tmp_path):
    from efficientnet_train.inference import Classifier

    base, _ = trained
    classifier = Classifier(base / "model")
    images = [base / "input" / "data" / "val" / "img" / f"{index:03d}.png" for index in range(4)]
    batch = torch.stack([classifier.preprocess(Image.open(path).convert("RGB")) for path in images])
    probabilities = classifier.probabilities(batch)
    assert probabilities.shape == (4, 4) and not torch.allclose(probabilities.sum(dim=1), torch.ones(4))
    thresholds = yaml.safe_load((base / "model" / "args.yml").read_text())["calibration"]["thresholds"]
    for row, answer in zip(probabilities.tolist(), classifier.verbose(probabilities)):
        assert answer["labels"] == sorted(COLOURS) and answer["probabilities"] == row
        assert set(answer["predicted_labels"]) == {label for label, p, t in zip(sorted(COLOURS), row, thresholds)
                                                   if p >= t}
    top = classifier.top_k(probabilities, 2)
    assert all(len(answer["labels"]) == 2 and "predicted_labels" in answer for answer in top)

    output = tmp_path / "predictions.csv"
    predicted = subprocess.run([PREDICT_COMMAND, *map(str, images), "--model-dir", str(base / "model" / "model.tar.gz"),
                                "-o", str(output), "--workers", "0", "--top-k", "4"],
                               capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr
    rows = list(csv.DictReader(io.StringIO(output.read_text())))
    assert [json.loads(row["predicted_labels"]) for row in rows] == \
        [answer["predicted_labels"] for answer in classifier.verbose(probabilities)]
    assert [float(row["probability_1"]) for row in rows] == pytest.approx(probabilities.max(dim=1).values.tolist())


def test_serve_answers_a_multi_label_model_with_its_predicted_labels(trained, tmp_path):
    base, _ = trained
    buffer = io.BytesIO()
    picture(["red", "blue"], 7).save(buffer, format="PNG")
    running = Server(base, tmp_path).wait_until_ready()
    try:
        status, _, body = running.invoke(buffer.getvalue(), Accept="application/json;verbose")
        answer = json.loads(body)
        assert status == 200 and answer["labels"] == sorted(COLOURS) and len(answer["probabilities"]) == 4
        assert isinstance(answer["predicted_labels"], list) and "predicted_label" not in answer
        status, _, body = running.invoke(buffer.getvalue())
        plain = json.loads(body)
        assert status == 200 and "predicted_labels" in plain["predictions"][0]
    finally:
        running.stop()


def test_the_same_ground_truth_manifest_streamed_in_pipe_mode_trains_the_same_model(trained, tmp_path,
                                                                                    tiny_weights):
    """train streamed as SageMaker streams an augmented manifest (image, label list, metadata), val as files: the
    same images in the same order as the manifest beside the images, so the same run, bit for bit."""
    from test_manifests import recordio, stream_into_fifo

    base, _ = trained
    piped = make_job(tmp_path, json.loads((base / "input" / "config" / "hyperparameters.json").read_text()),
                     with_data=False)
    config = {"train": {"TrainingInputMode": "Pipe", "RecordWrapperType": "RecordIO",
                        "ContentType": "application/x-recordio", "S3DistributionType": "FullyReplicated"},
              "val": {"TrainingInputMode": "File"}}
    (piped / "input" / "config" / "inputdataconfig.json").write_text(json.dumps(config))
    (piped / "input" / "data").mkdir(parents=True)
    shutil.copytree(base / "input" / "data" / "val", piped / "input" / "data" / "val")
    payloads = []
    for line in (base / "input" / "data" / "train" / "output.manifest").read_text().splitlines():
        record = json.loads(line)
        image = base / "input" / "data" / "train" / record["source-ref"].split("/job/")[1]
        payloads += [image.read_bytes(), json.dumps(record["colours"]).encode(),
                     json.dumps(record["colours-metadata"]).encode()]
    writer = stream_into_fifo(piped / "input" / "data" / "train_0", recordio(*payloads))
    result = run_train(piped)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "48 images with several labels each, of 4 classes, spooled to" in result.stdout
    assert read_summary(piped / "model") == read_summary(base / "model")
    writer.join(timeout=10)


def test_without_val_a_multi_label_set_holds_images_out_at_random_and_lists_their_labels(tmp_path):
    from efficientnet_train.holdout import held_out_rows, hold_out
    from efficientnet_train.label_manifest import scan

    labels = labelled_channel(tmp_path / "train", 48, 0, ground_truth=True)
    kept, held = hold_out(scan("train", tmp_path / "train"), 0.2, seed=0)
    assert held.multi_label and len(held.samples) == round(0.2 * 48) and len(kept.samples) == 48 - len(held.samples)
    rows = held_out_rows(kept, held)
    assert [sorted(json.loads(names)) for _, names in rows] == \
        [sorted(labels[int(Path(path).stem)]) for path, _ in rows]  # each image's own labels, a JSON list


def test_validation_folders_of_one_label_each_measure_a_multi_label_model(tmp_path):
    from efficientnet_train.label_manifest import scan

    root = tmp_path / "val"
    for index, name in enumerate(["blue", "red"]):
        (root / name).mkdir(parents=True)
        picture([name], index).save(root / name / "a.png")
    channel = scan("val", root, classes=sorted(COLOURS), multi_label=True)
    assert channel.multi_label and sorted(label for _, label in channel.samples) == [(0,), (2,)]
    train = tmp_path / "train"
    labelled_channel(train, 4, 0, ground_truth=False)
    with pytest.raises(JobError, match="gives images lists of labels, but 'train' gives one label an image"):
        scan("val", train, classes=sorted(COLOURS), multi_label=False)


# --- the measures ------------------------------------------------------------------------------------------

def test_average_precision_thresholds_and_f1_on_a_known_case():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.6], [0.2, 0.05]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    # label 0: positives ranked 1st and 3rd: AP = (1/1 + 2/3) / 2; label 1: ranked 1st and 2nd: AP 1.
    assert multilabel.average_precisions(scores, targets) == pytest.approx([100 * (1 + 2 / 3) / 2, 100.0])
    assert multilabel.average_precisions(scores, torch.zeros(4, 2)) == [None, None]
    cut = multilabel.thresholds(scores, targets)
    assert cut[1] == pytest.approx((0.6 + 0.1) / 2)  # both positives above, every negative below: F1 1
    scored = multilabel.label_scores(scores, targets, cut)
    assert scored[1] == {"precision": 100.0, "recall": 100.0, "f1": 100.0, "support": 2}
    assert multilabel.micro_f1(scores, targets, [2.0, 2.0]) == 0.0  # nothing said: no positive found


def test_hits_is_top_1_for_one_label_and_the_share_of_labels_ranked_first_for_several():
    logits = torch.tensor([[3.0, 1.0, -1.0], [0.5, 2.0, 1.0], [-1.0, -2.0, -3.0]])
    assert float(multilabel.hits(logits, torch.tensor([0, 2, 2]))) == 1.0
    several = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    # image 1: labels 0 and 2, top-2 are 0 and 1: half; image 2: both in its top-2; image 3: nothing said, none there
    assert float(multilabel.hits(logits, several)) == pytest.approx(0.5 + 1.0 + 1.0)


def test_the_temperature_softens_over_confident_logits():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(400, 3, generator=generator) < 0.5).float()
    seen = torch.where(targets > 0, 1.0, -1.0) + torch.randn(400, 3, generator=generator)  # ±1, unit noise
    calibrated = 2 * seen  # the log odds of a label given what is seen, for two unit Gaussians at ±1
    assert 4 < multilabel.fit_temperature(calibrated * 5, targets) < 6  # five times too sure: divided back


def test_a_validation_set_answered_without_a_mistake_does_not_make_the_model_claim_certainty():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    logits = torch.where(targets > 0, 4.0, -4.0)  # every yes and no right: the likelihood wants T -> 0
    temperature = multilabel.fit_temperature(logits, targets)
    p = (logits / temperature).sigmoid()
    assert float(torch.maximum(p, 1 - p).mean()) == pytest.approx((6 + 1) / (6 + 2), abs=1e-3)
