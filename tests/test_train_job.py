"""`train` as SageMaker runs it: a subprocess on a mocked /opt/ml tree, checked from the outside."""

from __future__ import annotations

import csv
import json
import math
import re
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import COLOURS, TINY_MODEL, make_channels, make_job, read_summary, run_train, write_images

REPO = Path(__file__).resolve().parent.parent
MODEL_FILES = {"args.yml", "labels.json", "model_best.pth.tar", "summary.csv", "metrics.png", "confusion_matrix.csv"}
EPOCHS = 3


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_weights):
    """One complete local job (no TRAINING_JOB_NAME), with SageMaker's extra keys and encodings."""
    base = make_job(tmp_path_factory.mktemp("opt_ml"), {
        "epochs": str(EPOCHS), "batch_size": "8", "model": TINY_MODEL, "pretrained_path": str(tiny_weights["pth"]),
        "img_size": "32", "workers": "1", "lr": "0.1", "opt": '"sgd"', "model_ema": "True",
        "_tuning_objective_metric": "validation:acc_1", "sagemaker_program": "train"})
    train = base / "input" / "data" / "train"
    (train / "ants" / "notes.txt").write_text("not an image")  # skipped and listed
    (train / ".DS_Store").write_bytes(b"\0")  # hidden: ignored
    (train / "bees" / ".hidden.jpg").write_bytes(b"")
    write_images(train / "bees" / "more", COLOURS["bees"], 2, seed=7)  # sub-folders of a class count
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base, result.stdout + result.stderr


def spec_metric_regexes() -> dict[str, str]:
    spec = json.loads((REPO / "container" / "algorithm-spec.json").read_text())
    return {d["Name"]: d["Regex"] for d in spec["TrainingSpecification"]["MetricDefinitions"]}


def test_local_run_writes_the_four_files_and_the_archive(finished_job):
    base, _ = finished_job
    model_dir = base / "model"
    assert {p.name for p in model_dir.iterdir()} == MODEL_FILES | {"model.tar.gz"}
    with tarfile.open(model_dir / "model.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(MODEL_FILES)
        assert tar.extractfile("labels.json").read() == (model_dir / "labels.json").read_bytes()
    assert not (base / "output" / "failure").exists()


def test_labels_are_the_sorted_train_folders(finished_job):
    base, _ = finished_job
    labels = json.loads((base / "model" / "labels.json").read_text())
    assert labels == {str(i): name for i, name in enumerate(sorted(COLOURS))}


def test_args_hold_resolved_hyperparameters_and_derived_values(finished_job):
    base, _ = finished_job
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert args["epochs"] == EPOCHS and args["opt"] == "sgd" and args["model_ema"] is True
    assert args["decay_rate"] == 0.1 and args["aa"] == "auto"  # defaults filled in
    assert args["classes"] == sorted(COLOURS) and args["num_classes"] == 3
    assert args["data_config"]["train_input_size"] == [3, 32, 32]
    assert args["data_config"]["input_size"] == [3, 37, 37]  # evaluated 1.15x larger
    assert args["effective_lr"] == pytest.approx(0.1 * 8 / 256)
    # the crops grow from evaluation's area to the recipe's over the rate's warmup: one schedule epoch
    assert args["crop_growth_updates"] == args["schedule_epoch_updates"] * args["warmup_epochs"] > 0
    assert args["train_images_per_class"] == {"ants": 12, "bees": 14, "wasps": 12}
    # val's 6 a class fit equal shares a little better than the training set's (12, 14, 12): the posterior chance
    log_odds = sum(6 * -math.log(count / 38 * 3) for count in (12, 14, 12))
    assert args["effective_balance_classes"] == pytest.approx(1 / (1 + math.exp(-log_odds)), abs=1e-4)
    assert args["effective_balance_classes"] == pytest.approx(0.5121, abs=1e-4)
    assert args["skipped_files"]["train"] == {
        "count": 1, "unusable": 0, "by_reason": {"not an image file": 1}, "per_class": {"ants": 1},
        "examples": ["ants/notes.txt (not an image file)"], "ignored_hidden_or_system": 2}
    assert args["skipped_files"]["val"]["count"] == 0 and args["failed_during_training"] == {}
    assert set(args["ignored_hyperparameters"]) == {"_tuning_objective_metric", "sagemaker_program"}
    assert {"torch", "timm", "torchvision", "python"} <= set(args["versions"])
    assert args["best_epoch"] in range(0, EPOCHS + 1) and args["epochs_completed"] == EPOCHS  # 0: the probe


def test_summary_has_one_row_per_epoch(finished_job):
    base, _ = finished_job
    rows = read_summary(base / "model")
    assert [int(row["epoch"]) for row in rows] == list(range(0, EPOCHS + 1))  # 0: the linear probe
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    for row in rows:
        assert float(row["eval_top5"]) == 100.0  # 3 classes: top-5 is over all of them
        assert 0 <= float(row["eval_top1"]) <= 100 and float(row["train_loss"]) > 0


def test_spec_regexes_capture_every_metric_once_per_epoch(finished_job):
    base, log = finished_job
    rows = read_summary(base / "model")
    columns = {"train:loss": "train_loss", "validation:loss": "eval_loss",
               "validation:acc_1": "eval_top1", "validation:acc_5": "eval_top5"}
    regexes = spec_metric_regexes()
    assert set(regexes) == set(columns) | {"validation:mAP"}  # mAP: only a job of several labels an image logs it
    for name, regex in regexes.items():
        values = [float(m.group(1)) for m in re.finditer(regex, log)]
        assert values == [float(row[columns[name]]) for row in rows] if name in columns else not values, name


def test_log_shows_inventory_settings_and_versions(finished_job):
    _, log = finished_job
    assert "channel 'train'" in log and "38 images in 3 classes" in log
    assert "ants: 12, bees: 14, wasps: 12" in log
    assert "skipped 1 files (1 not an image file) [ants: 1], e.g. ants/notes.txt (not an image file)" in log
    assert "ignored 2 hidden or system files and folders (.DS_Store, bees/.hidden.jpg)" in log
    assert re.search(r"formats \[bmp: \d+, gif: \d+, jpeg: \d+, jpg: \d+, png: \d+, webp: \d+\]", log)
    assert "Resolved settings" in log and "timm:" in log and "device: cpu" in log
    assert "Class balance (auto): the training loss weighs the classes 0.951 to 1.03, 51.2% of the way" in log
    assert "Ignoring SageMaker's own hyperparameters: _tuning_objective_metric, sagemaker_program" in log


def test_best_checkpoint_loads_safely_and_with_plain_timm(finished_job):
    import timm

    base, _ = finished_job
    path = base / "model" / "model_best.pth.tar"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["arch"] == TINY_MODEL and checkpoint["labels"] == sorted(COLOURS)
    assert {"state_dict", "epoch", "metric", "data_config", "args", "weights"} <= set(checkpoint)
    assert checkpoint["eval_hflip"] is True  # the default
    model = timm.create_model(TINY_MODEL, num_classes=3, checkpoint_path=str(path))
    assert torch.equal(model.state_dict()["classifier.weight"], checkpoint["state_dict"]["classifier.weight"])


def test_saved_model_scores_what_the_summary_says(finished_job):
    """The weights kept are the ones that earned the best metric (EMA or raw), with the same preprocessing."""
    from efficientnet_train.channels import scan_channel
    from efficientnet_train.data import ImageDataset, ModelInput, eval_transform
    from efficientnet_train.model import load_trained_model, predict_log_probabilities

    base, _ = finished_job
    model, checkpoint = load_trained_model(base / "model" / "model_best.pth.tar")
    assert model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)  # as trained and validated
    val = scan_channel("val", base / "input" / "data" / "val", classes=checkpoint["labels"])
    dataset = ImageDataset(val.samples, eval_transform(checkpoint["data_config"]))
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    with torch.no_grad():
        inputs = ModelInput(checkpoint["data_config"], torch.device("cpu"))(torch.stack(images))
        predictions = predict_log_probabilities(model, inputs, checkpoint["eval_hflip"]).argmax(dim=1)
    accuracy = 100.0 * (predictions == torch.tensor(targets)).float().mean().item()
    best_row = read_summary(base / "model")[checkpoint["epoch"]]  # row 0: the linear probe
    assert accuracy == pytest.approx(float(best_row["eval_top1"]), abs=1e-3)
    assert float(best_row["eval_top1"]) == max(float(r["eval_top1"]) for r in read_summary(base / "model"))


def test_sagemaker_run_leaves_packing_to_sagemaker(tmp_path, tiny_hyperparameters, tiny_weights):
    """With TRAINING_JOB_NAME only the four files; channels from SM_CHANNEL_*; .safetensors weights; no EMA;
    no mirrored training images, so no mirrored evaluation either."""
    base = make_job(tmp_path / "opt_ml", {**tiny_hyperparameters, "model_ema": "false", "hflip": "0",
                                          "pretrained_path": str(tiny_weights["safetensors"])}, with_data=False)
    data = make_channels(tmp_path / "elsewhere")
    result = run_train(base, TRAINING_JOB_NAME="job-1", SM_CHANNEL_TRAIN=str(data / "train"),
                       SM_CHANNEL_VAL=str(data / "val"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p.name for p in (base / "model").iterdir()} == MODEL_FILES
    assert "weights=raw" in result.stdout and "ema acc_1" not in result.stdout
    assert torch.load(base / "model" / "model_best.pth.tar", weights_only=True)["eval_hflip"] is False


def test_val_may_hold_a_subset_of_the_classes(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters)
    for image in (base / "input" / "data" / "val" / "wasps").iterdir():
        image.unlink()
    (base / "input" / "data" / "val" / "wasps").rmdir()
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((base / "model" / "labels.json").read_text())["2"] == "wasps"


def test_per_class_accuracy_of_the_best_model(finished_job):
    base, log = finished_job
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    per_class = args["best_per_class_acc_1"]
    assert list(per_class) == sorted(COLOURS)
    assert sum(per_class.values()) / 3 == pytest.approx(args["best_acc_1"])  # 6 val images per class
    heading = ("Best model per class (validation; confidence: mean calibrated probability of its answers; macro F1, "
               f"the mean of the classes' F1: {args['best_macro_f1']:.1f}%):\n")
    table = log.split(heading, 1)[1].splitlines()
    assert table[0].split() == ["class", "images", "right", "accuracy", "precision", "F1", "confidence", "most", "often",
                                "mistaken", "for"]
    assert [line.split()[:2] for line in table[1:4]] == [["ants", "6"], ["bees", "6"], ["wasps", "6"]]
    assert float(table[1].split()[3].rstrip("%")) == pytest.approx(per_class["ants"], abs=0.05)
    confidence = args["calibration"]["per_class_confidence"][0]
    assert float(table[1].split()[6].rstrip("%")) == pytest.approx(100 * confidence, abs=0.05)
    scores = args["best_per_class_scores"]
    assert list(scores) == sorted(COLOURS) and scores["ants"]["recall"] == pytest.approx(per_class["ants"])
    for name, line in zip(sorted(COLOURS), table[1:4]):
        shown = [None if cell == "-" else float(cell.rstrip("%")) for cell in line.split()[4:6]]
        assert shown == pytest.approx([scores[name]["precision"], scores[name]["f1"]], abs=0.05)
    assert args["best_macro_f1"] == pytest.approx(sum(score["f1"] for score in scores.values()) / 3)


def test_confusion_matrix_and_metrics_plot_beside_the_model(finished_job):
    from PIL import Image

    base, log = finished_job
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    with open(base / "model" / "confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", "ants", "bees", "wasps"] and [row[0] for row in rows[1:]] == sorted(COLOURS)
    counts = [[int(value) for value in row[1:]] for row in rows[1:]]
    assert [sum(row) for row in counts] == [6, 6, 6]
    assert [100 * counts[i][i] / 6 for i in range(3)] == pytest.approx(list(args["best_per_class_acc_1"].values()))
    assert "rows: true class, columns: predicted class" in log
    with Image.open(base / "model" / "metrics.png") as plot:
        assert plot.format == "PNG" and plot.size == (1000, 400)


def test_progress_line_says_speed_and_time_left(finished_job):
    _, log = finished_job
    lines = [line for line in log.splitlines() if re.search(r"epoch \d/3 train:loss", line)]
    assert len(lines) == EPOCHS + 1  # and the linear probe's epoch 0
    pattern = r" images/s=\d+\.\d training=\d+s data_wait=\d+\.\ds validation=\d+s elapsed=\d+s left<=\S+$"
    assert all(re.search(pattern, line) for line in lines), lines
    assert lines[-1].endswith("left<=0s")
    assert re.search(r"Done in \S+ after 3 epochs \(epochs done\)\. Best model: epoch \d, top-1 accuracy", log), \
        [line for line in log.splitlines() if "Done" in line]


def test_the_first_step_line_says_where_the_start_up_went(finished_job):
    _, log = finished_job
    lines = [line.split(" INFO ", 1)[1] for line in log.splitlines() if "First training step done" in line]
    assert len(lines) == 1, lines
    total, phases = re.fullmatch(r"First training step done ([\d.]+) s after the job started: (.*)", lines[0]).groups()
    seconds = dict((phase, float(s)) for phase, s in re.findall(r"(?:^|, )([^,]+?) ([\d.]+) s", phases))
    assert list(seconds) == ["Python and imports", "checking the hyperparameters (importing timm)",
                             "checking the data and the disk (checkpoints and free space)", "building the model on the CPU",
                             "fitting the linear probe on 38 images", "validating the linear probe", "setting up training",
                             "first batch (the loader's workers starting)", "first step"]
    assert seconds["Python and imports"] > 0 and sum(seconds.values()) == pytest.approx(float(total), abs=0.35)


def test_stops_once_the_learning_rate_is_spent(tmp_path, tiny_hyperparameters):
    """Early stopping ends the run; summary.csv and the best model are complete all the same."""
    # 36 images in batches of 2: 18 updates a pass, so an epoch of the schedule is 50 updates (the floor), and
    # the one decay, to 1/1000, comes in the 3rd pass.
    base = make_job(tmp_path, {**tiny_hyperparameters, "epochs": "10", "batch_size": "2", "warmup_epochs": "0",
                               "decay_epochs": "1", "decay_rate": "0.001", "balance_classes": "true"})
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Stopping after epoch 3 of 10: the learning rate has decayed" in result.stdout
    assert [row["epoch"] for row in read_summary(base / "model")] == ["0", "1", "2", "3"]
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert args["epochs_completed"] == 3 and args["stop_reason"].startswith("the learning rate has decayed")
    assert args["updates_per_epoch"] == 18 and args["schedule_epoch_updates"] == 50
    assert args["crop_growth_updates"] == 0  # no warmup: the recipe's crops from the first update
    assert torch.load(base / "model" / "model_best.pth.tar", weights_only=True)["epoch"] in range(4)
    with tarfile.open(base / "model" / "model.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(MODEL_FILES)
