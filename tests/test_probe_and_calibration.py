"""The linear-probe start (LP-FT) and calibrated probabilities: the model a buyer keeps is never worse
than a logistic regression on its own frozen features, and its probabilities mean what they say."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import COLOURS, TINY_MODEL, make_job, read_summary, run_train
from efficientnet_train.calibration import calibrated, fit_temperature, top_label_ece
from efficientnet_train.linear_probe import (MEASURED_IMAGES, PROBE_IMAGES_PER_CLASS, PROBE_MAX_IMAGES, fit_head,
                                             probe_sample)
from efficientnet_train.model import predict_log_probabilities


def blobs(classes: int, per_class: int, width: int, seed: int, spread: float = 1.0):
    """Gaussian clusters, one a class, that a linear classifier separates well but not perfectly."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, width, generator=torch.Generator().manual_seed(0)) * 1.5
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), width, generator=generator), labels


def test_probe_head_separates_what_a_logistic_regression_separates():
    from sklearn.linear_model import LogisticRegression

    features, labels = blobs(4, 40, 32, seed=1)
    held_out, held_out_labels = blobs(4, 100, 32, seed=2)
    head = fit_head(features, labels, 4, torch.nn.CrossEntropyLoss())
    ours = ((held_out @ head.weight.T + head.bias).argmax(1) == held_out_labels).float().mean().item()
    reference = LogisticRegression(max_iter=2000).fit(features.numpy(), labels.numpy())
    theirs = (reference.predict(held_out.numpy()) == held_out_labels.numpy()).mean()
    assert ours >= theirs - 0.01 and ours > 0.9, (ours, theirs)
    # A zero head would answer every class with 1/4; the fitted one is sure of most training points.
    assert (features @ head.weight.T + head.bias).softmax(1).max(1).values.median() > 0.8
    assert head.loss < math.log(4) / 4


def test_probe_sample_caps_each_class_and_the_total_and_is_the_same_every_time():
    samples = [(f"{label}/{i}.jpg", label) for label in range(3) for i in range(PROBE_IMAGES_PER_CLASS + 50)]
    samples += [("rare/0.jpg", 3)]
    chosen = probe_sample(samples, 4, seed=7)
    labels = [samples[i][1] for i in chosen]
    assert [labels.count(label) for label in range(4)] == [PROBE_IMAGES_PER_CLASS] * 3 + [1]
    assert chosen == probe_sample(samples, 4, seed=7) != probe_sample(samples, 4, seed=8)
    many_classes = [(f"{label}/{i}.jpg", label) for label in range(2000) for i in range(10)]
    assert len(probe_sample(many_classes, 2000, seed=0)) == 2000 * max(1, PROBE_MAX_IMAGES // 2000)
    # The measurements' share: a like number a class, at least one of each.
    measured = probe_sample(samples, 4, seed=7, max_images=MEASURED_IMAGES)
    assert [[samples[i][1] for i in measured].count(label) for label in range(4)] == [MEASURED_IMAGES // 4] * 3 + [1]
    assert len(probe_sample(many_classes, 2000, seed=0, max_images=MEASURED_IMAGES)) == 2000


@pytest.mark.parametrize("mirror", [False, True])
def test_temperature_changes_no_prediction(mirror):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    images = torch.randn(64, 3, 8, 8) * 3
    plain = predict_log_probabilities(model, images, mirror)
    for temperature in (0.01, 0.3, 1.0, 2.5, 100.0):
        scaled = predict_log_probabilities(model, images, mirror, temperature)
        assert torch.equal(scaled.argmax(1), plain.argmax(1))
        assert torch.allclose(scaled.exp().sum(1), torch.ones(64), atol=1e-5)
    sharper = predict_log_probabilities(model, images, mirror, 0.5).exp().max(1).values
    assert (sharper >= plain.exp().max(1).values - 1e-6).all()


def test_fitted_temperature_recovers_the_one_labels_were_drawn_at():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(20_000, 6, generator=generator) * 3
    labels = torch.multinomial((logits / 2.0).softmax(1), 1, generator=generator).squeeze(1)
    log_probabilities = logits.log_softmax(1)
    temperature = fit_temperature(log_probabilities, labels)
    assert temperature == pytest.approx(2.0, rel=0.05)
    before = top_label_ece(log_probabilities, labels)
    after = top_label_ece(calibrated(log_probabilities, temperature), labels)
    assert before > 0.1 and after < 0.02


def test_a_validation_set_answered_all_right_does_not_make_the_model_certain():
    logits = torch.tensor([[4.0, 0.0, 0.0]] * 12 + [[0.0, 5.0, 0.0]] * 12)
    labels = torch.tensor([0] * 12 + [1] * 12)
    temperature = fit_temperature(logits.log_softmax(1), labels)
    confidence = calibrated(logits.log_softmax(1), temperature).exp().max(1).values.mean()
    assert confidence == pytest.approx(25 / 26, abs=1e-3)  # Laplace: 24 of 24 right claims at most 25/26


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_otherwise():
    # Ten answers at 0.8 of which eight right: calibrated. The same at 0.9: 0.1 over-confident.
    right, wrong = [0.8, 0.2], [0.2, 0.8]
    log_probabilities = torch.tensor([right] * 8 + [wrong] * 2).log()
    assert top_label_ece(log_probabilities, torch.zeros(10, dtype=torch.long)) == pytest.approx(0.0, abs=1e-6)
    sure = torch.tensor([[0.9, 0.1]] * 8 + [[0.1, 0.9]] * 2).log()
    assert top_label_ece(sure, torch.zeros(10, dtype=torch.long)) == pytest.approx(0.1, abs=1e-6)


@pytest.fixture(scope="module")
def pretrained_tiny_weights(tmp_path_factory) -> Path:
    """The tiny model's random weights with BatchNorm statistics of real inputs, as pretrained weights have:
    with the initial ones (mean 0, variance 1) its pooled features hardly vary, and no head could separate
    anything with them."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, num_classes=1000)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(32, 3, 32, 32) * 4 - 2)
    path = tmp_path_factory.mktemp("weights") / "tiny-calibrated.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def probed_job(tmp_path_factory, pretrained_tiny_weights):
    """The tiny three-colour set, trained for 2 epochs from the tiny model's 'pretrained' weights."""
    base = make_job(tmp_path_factory.mktemp("probed"), {
        "epochs": "2", "batch_size": "8", "model": TINY_MODEL, "pretrained_path": str(pretrained_tiny_weights),
        "img_size": "32", "workers": "0"})
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base, result.stdout


def test_the_probe_is_epoch_0_logged_in_one_line_and_kept_in_args(probed_job):
    base, log = probed_job
    rows = read_summary(base / "model")
    assert [row["epoch"] for row in rows] == ["0", "1", "2"] and float(rows[0]["lr"]) == 0
    assert "epoch 0/2 train:loss=" in log and "weights=probe" in log
    probe_lines = [line for line in log.splitlines() if "Linear probe (epoch 0)" in line]
    assert len(probe_lines) == 1 and "of 36 training images" in probe_lines[0]
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert args["linear_probe"]["acc_1"] == pytest.approx(float(rows[0]["eval_top1"]))
    assert args["linear_probe"]["images"] == 36 and args["epochs_completed"] == 2
    assert args["best_acc_1"] >= args["linear_probe"]["acc_1"]  # never worse than its own probe



def test_auto_freezes_batchnorm_where_batch_statistics_lose_the_probe_and_says_so_once(probed_job,
                                                                                        pretrained_tiny_weights):
    """The tiny model's statistics come from other inputs than these plain colours: batch statistics lose the
    probe's answers, so fine-tuning keeps the pretrained ones, with sgd, at the evaluation size."""
    base, log = probed_job
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    probe = args["linear_probe"]
    assert probe["training_images_acc_1"] == 100 and probe["batch_statistics_acc_1"] < 50
    assert probe["far_from_pretrained_statistics"] is True
    assert args["freeze_batchnorm"] == "auto" and args["effective_freeze_batchnorm"] is True
    assert args["opt"] == "auto" and args["effective_opt"] == "sgd"
    assert args["data_config"]["train_input_size"] == args["data_config"]["input_size"] == [3, 37, 37]
    said = [line for line in log.splitlines() if "BatchNorm: the probe answers" in line]
    assert len(said) == 1 and " INFO " in said[0] and "(freeze_batchnorm=auto), with opt=sgd, at the evaluation " \
        "size 37 px" in said[0]
    assert_statistics_are_pretrained(base, pretrained_tiny_weights)


def test_auto_augmentation_is_measured_on_the_probe_and_recorded(probed_job):
    base, log = probed_job
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    probe = args["linear_probe"]
    assert 0 <= probe["augmented_acc_1"] <= 100
    loses = probe["augmentation_loses_answers"]
    assert loses is (probe["augmented_acc_1"] < (100 / 3 + 100) / 2)
    assert (args["effective_aa"], args["effective_reprob"]) == (("none", 0.0) if loses else ("rand-m9-mstd0.5", 0.2))
    said = [line for line in log.splitlines() if "Augmentation: the probe answers" in line]
    assert len(said) == 1 and "aa=rand-m9-mstd0.5, reprob=0.2" in said[0]
    assert ("without RandAugment and random erasing (aa=auto)" in said[0]) is loses


def assert_statistics_are_pretrained(base: Path, pretrained_weights: Path) -> None:
    pretrained = torch.load(pretrained_weights, weights_only=True)
    checkpoint = torch.load(sorted((base / "checkpoints").glob("checkpoint-*.pth.tar"))[-1], weights_only=False)
    trained = checkpoint["model"]
    statistics = [name for name in trained if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(trained[name], pretrained[name]) for name in statistics)
    assert not torch.equal(trained["conv_stem.weight"], pretrained["conv_stem.weight"])  # the rest trained


def test_a_trained_model_answers_with_calibrated_confidence_not_uniform(probed_job):
    from efficientnet_train.inference import Classifier
    from efficientnet_train.data import load_image

    base, log = probed_job
    classifier = Classifier(base / "model")
    images = sorted((base / "input" / "data" / "train").glob("*/img00[0-5].*"))
    batch = torch.stack([classifier.preprocess(load_image(str(path))) for path in images])
    probabilities = classifier.probabilities(batch)
    answers = [classifier.labels[i] for i in probabilities.argmax(1).tolist()]
    assert answers == [path.parent.name for path in images]
    assert probabilities.max(1).values.min() > 0.6  # 1/3 is what a zero head answers
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    calibration = args["calibration"]
    assert classifier.temperature == calibration["temperature"] != 1.0
    assert 0 <= calibration["ece_after"] <= calibration["ece_before"] + 1e-9
    assert "Calibration: the best model's log probabilities are divided by a temperature" in log
    assert "confidence" in log and len(calibration["per_class_confidence"]) == len(COLOURS)


def shifted_pairs(low: float, high: float, pairs: int = 16):
    """One number an image, `high` for class 1 and `low` for class 0, as a loader yields them in mixed batches."""
    images = torch.tensor([[high], [low]] * pairs)
    return torch.utils.data.DataLoader(list(zip(images, torch.tensor([1, 0] * pairs))), batch_size=8)


def threshold_model(threshold: float) -> torch.nn.Module:
    """BatchNorm with the 'pretrained' statistics mean 0, variance 1, then a head answering 1 above `threshold`."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(1), torch.nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0], [1.0]]) / 2)
        model[1].bias.copy_(torch.tensor([threshold, -threshold]) / 2)
    return model.eval()


@pytest.mark.parametrize("low, high, batch_top1, far", [(3.0, 5.0, 50.0, True), (-1.0, 1.0, 100.0, False)])
def test_batch_statistics_top1_sees_features_that_each_batch_renormalises(low, high, batch_top1, far):
    from efficientnet_train.linear_probe import loses_most_answers, probe_top1

    # Classes 3 and 5 apart from the pretrained statistics (mean 0): normalised by their own batch they become -1
    # and +1, below the head's threshold of 4 both, so half the answers go. Classes -1 and 1 keep theirs.
    model = threshold_model((low + high) / 2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    loader = shifted_pairs(low, high)
    assert (model(next(iter(loader))[0]).argmax(1) == next(iter(loader))[1]).all()  # right with the pretrained ones
    assert probe_top1(model, loader, lambda images: images, contextlib.nullcontext) == 100.0
    top1 = probe_top1(model, loader, lambda images: images, contextlib.nullcontext, batch_statistics=True)
    assert top1 == pytest.approx(batch_top1)
    assert loses_most_answers(top1, 100.0, num_classes=2) is far
    assert not model.training and all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_losing_most_answers_is_below_halfway_from_chance_and_needs_a_measurement():
    from efficientnet_train.linear_probe import loses_most_answers

    # Measured on Lite0's probes with batch statistics: digits 12.8% of 100, drawings 42.6% of 100 (25 classes),
    # photos 89.7% (2 classes); augmented as the listing's recipe: digits 25.3%, photos 97.8%.
    assert loses_most_answers(12.8, 100.0, 10) and loses_most_answers(42.6, 100.0, 25)
    assert loses_most_answers(36.1, 100.0, 3)  # the tiny model on plain colours (probed_job)
    assert not loses_most_answers(89.7, 100.0, 2)
    assert loses_most_answers(25.3, 100.0, 10) and not loses_most_answers(97.8, 100.0, 2)
    assert loses_most_answers(54.9, 100.0, 10) and not loses_most_answers(55.0, 100.0, 10)
    assert not loses_most_answers(None, 100.0, 10)  # no batch of two images: nothing measured


@pytest.mark.parametrize("freeze, aa, opt, reprob, measured, expected", [
    ("auto", "auto", "auto", 0.2, None, (False, "rmsproptf", "rand-m9-mstd0.5", 0.2)),  # before the probe
    ("auto", "auto", "auto", 0.2, {"far_from_pretrained_statistics": True, "augmentation_loses_answers": True},
     (True, "sgd", "none", 0.0)),
    ("auto", "auto", "auto", 0.3, {"far_from_pretrained_statistics": False, "augmentation_loses_answers": False},
     (False, "rmsproptf", "rand-m9-mstd0.5", 0.3)),
    ("auto", "auto", "adamw", 0.2, {"far_from_pretrained_statistics": True}, (True, "adamw", "rand-m9-mstd0.5", 0.2)),
    ("false", "v0", "auto", 0.2, {"far_from_pretrained_statistics": True, "augmentation_loses_answers": True},
     (False, "rmsproptf", "v0", 0.2)),  # what the buyer set is what trains
    ("true", "none", "auto", 0.5, None, (True, "sgd", "none", 0.5)),
])
def test_the_recipe_follows_the_measurements_only_where_left_to_auto(freeze, aa, opt, reprob, measured, expected):
    from types import SimpleNamespace

    from efficientnet_train.recipe import Recipe, recipe_for, training_size_config

    hp = SimpleNamespace(freeze_batchnorm=freeze, aa=aa, opt=opt, reprob=reprob)
    recipe = recipe_for(hp, measured)
    assert recipe == Recipe(*expected)
    config = {"input_size": [3, 74, 74], "train_input_size": [3, 64, 64]}
    size = 74 if recipe.freeze_batchnorm else 64
    assert training_size_config(config, recipe)["train_input_size"] == [3, size, size]
    assert config["train_input_size"] == [3, 64, 64]  # not changed in place


@pytest.mark.parametrize("frozen", [False, True])
def test_a_frozen_batchnorm_keeps_its_statistics_while_everything_else_trains(frozen):
    from timm.scheduler import create_scheduler_v2

    from efficientnet_train import train
    from efficientnet_train.checkpoints import Progress, StopRequest
    from efficientnet_train.data import ModelInput, TrainBatches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    images = [(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8), index % 2) for index in range(16)]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=1, decay_epochs=1, updates_per_epoch=4)
    loader = train.data_loader(images, 0, torch.device("cpu"), 0, batch_sampler=TrainBatches(16, 4, seed=0))
    train.train_one_epoch(model, loader, ModelInput({"mean": [0.5] * 3, "std": [0.5] * 3}, torch.device("cpu")),
                          torch.nn.CrossEntropyLoss(), optimizer, scheduler, None, None, contextlib.nullcontext,
                          Progress(), StopRequest(), frozen_batchnorm=frozen)
    after = model.state_dict()
    statistics = ("1.running_mean", "1.running_var")
    assert all(torch.equal(before[name], after[name]) for name in statistics) is frozen
    assert not any(torch.equal(before[name], after[name]) for name in ("0.weight", "1.weight", "1.bias", "5.weight"))
    assert model[2].training  # dropout still drops


def test_freeze_batchnorm_true_trains_with_sgd_at_the_evaluation_size_and_measures_nothing_it_needs_not(
        tmp_path, pretrained_tiny_weights):
    base = make_job(tmp_path, {"epochs": "2", "batch_size": "8", "model": TINY_MODEL, "img_size": "32",
                               "pretrained_path": str(pretrained_tiny_weights), "workers": "0",
                               "freeze_batchnorm": "true", "aa": "rand-m7-mstd0.5"})
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert args["effective_opt"] == "sgd" and args["effective_aa"] == "rand-m7-mstd0.5"
    assert args["data_config"]["input_size"] == args["data_config"]["train_input_size"] == [3, 37, 37]
    probe = args["linear_probe"]
    assert probe["batch_statistics_acc_1"] is None and probe["augmented_acc_1"] is None
    assert "BatchNorm: the probe" not in result.stdout and "Augmentation: the probe" not in result.stdout
    assert_statistics_are_pretrained(base, pretrained_tiny_weights)


def test_measuring_the_augmentation_changes_nothing_that_training_draws(tmp_path, pretrained_tiny_weights):
    """aa=auto trains exactly as the same augmentation set by hand: the measurement's random erasing draws from
    generators of its own."""
    common = {"epochs": "1", "batch_size": "8", "model": TINY_MODEL, "img_size": "32", "workers": "0",
              "pretrained_path": str(pretrained_tiny_weights), "freeze_batchnorm": "false"}
    measured = make_job(tmp_path / "auto", {**common, "aa": "auto"})
    assert run_train(measured).returncode == 0
    args = yaml.safe_load((measured / "model" / "args.yml").read_text())
    assert args["linear_probe"]["augmented_acc_1"] is not None
    by_hand = make_job(tmp_path / "by_hand", {**common, "aa": args["effective_aa"],
                                              "reprob": str(args["effective_reprob"])})
    assert run_train(by_hand).returncode == 0

    def weights(base: Path) -> dict:
        return torch.load(sorted((base / "checkpoints").glob("checkpoint-*.pth.tar"))[-1], weights_only=False)["model"]

    trained, reference = weights(measured), weights(by_hand)
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[name], reference[name]) for name in trained)
