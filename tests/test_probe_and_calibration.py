"""The linear-probe start (LP-FT) and calibrated probabilities: the model a buyer keeps is never worse
than a logistic regression on its own frozen features, and its probabilities mean what they say."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import COLOURS, TINY_MODEL, failure_reason, make_job, read_summary, run_train
from efficientnet_train.calibration import calibrated, ece_by_chance, fit_temperature, top_label_ece
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


def test_a_fit_whose_loss_overflows_starts_from_a_zero_head_and_reports_that_heads_loss():
    features, labels = blobs(2, 10, 8, seed=3)
    head = fit_head(features * 1e25, labels, 2, torch.nn.CrossEntropyLoss())  # logits past float32's range
    assert not head.weight.any() and not head.bias.any()
    assert head.loss == pytest.approx(math.log(2))  # the zero head's, which epoch 0 logs: not nan


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
    few = probe_sample(many_classes, 2000, seed=0, max_images=MEASURED_IMAGES)  # one image of 128 of the classes
    assert len(few) == MEASURED_IMAGES == len({many_classes[i][1] for i in few})


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


def test_ece_by_chance_is_what_sampling_alone_gives_a_calibrated_model(monkeypatch):
    from efficientnet_train import calibration

    # Four answers at 50% in one bin: ECE = |right - 2| / 4, so 0 (6 in 16), 0.25 (8 in 16) or 0.5 (2 in 16):
    # mean 0.1875, 90th percentile 0.5. Sure answers add nothing, whatever bin they share the set with.
    mean, p90 = ece_by_chance(torch.full((4,), 0.5))
    assert mean == pytest.approx(0.1875, abs=0.015) and p90 == 0.5
    assert ece_by_chance(torch.ones(50)) == (0.0, 0.0)
    mixed = ece_by_chance(torch.tensor([0.5] * 4 + [1.0] * 4))
    assert mixed[0] == pytest.approx(0.1875 / 2, abs=0.01) and mixed[1] == 0.25
    assert ece_by_chance(torch.full((4,), 0.5)) == (mean, p90)  # seeded: the same confidences, the same numbers
    assert ece_by_chance(torch.tensor([])) == (0.0, 0.0)
    # Against the job's own top_label_ece on drawn answers, with bins whose gaps would cancel if pooled and
    # confidences on bin edges: the same distribution (mean and 90th percentile, below its largest draw).
    confidence = torch.tensor([0.3] * 6 + [0.7] * 6 + [0.2, 0.5, 0.6, 0.9, 0.95, 0.81, 0.42, 0.66])
    generator = torch.Generator().manual_seed(1)
    direct = []
    for _ in range(4000):
        right = torch.rand(len(confidence), generator=generator) < confidence
        rows = torch.cat([confidence[:, None], ((1 - confidence) / 99)[:, None].expand(-1, 99)], dim=1)
        direct.append(top_label_ece(rows.log(), (~right).long()))  # class 0 the top label, right or not
    direct = torch.tensor(direct)
    eces = calibration.chance_eces(confidence)
    assert len(eces) == 1000 and float(eces.mean()) == pytest.approx(float(direct.mean()), abs=0.006)
    assert float(eces.quantile(0.9)) == pytest.approx(float(direct.quantile(0.9)), abs=0.015)
    assert ece_by_chance(confidence)[1] < float(eces.max())
    # A large set: fewer draws (never under 100), drawn a chunk at a time, the same numbers as in one go.
    whole = calibration.chance_eces(confidence, draws=300)
    monkeypatch.setattr(calibration, "CHANCE_CHUNK", 7 * len(confidence))
    assert torch.equal(calibration.chance_eces(confidence, draws=300), whole)
    monkeypatch.setattr(calibration, "CHANCE_WORK", 50 * len(confidence))
    assert len(calibration.chance_eces(confidence)) == 100
    monkeypatch.setattr(calibration, "CHANCE_WORK", 500 * len(confidence))
    assert len(calibration.chance_eces(confidence)) == 500
    # The more images, the smaller an ECE they can resolve.
    assert ece_by_chance(torch.full((2000,), 0.9))[1] < ece_by_chance(torch.full((57,), 0.9))[1] < 0.2
    stream = torch.Generator().manual_seed(3)  # a generator of the caller's: draws go on where the last call ended
    assert not torch.equal(calibration.chance_eces(confidence, generator=stream),
                           calibration.chance_eces(confidence, generator=stream))


def test_ece_noise_floor_shrinks_with_the_validation_set():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "ece_noise_floor.py"), "57",
                          "1000", "--draws", "300"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = {int(m[1]): (float(m[2]), float(m[3]))
            for m in re.finditer(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", run.stdout, re.M)}
    assert set(rows) == {57, 1000} and rows[1000][0] < rows[1000][1] < rows[57][0] < rows[57][1] < 0.2


def test_the_final_calibration_line_reads_a_best_model_recorded_before_ece_by_chance(tmp_path, caplog):
    from efficientnet_train.best_model import finish
    from efficientnet_train.sagemaker import SageMakerEnvironment

    env = SageMakerEnvironment(tmp_path, {"TRAINING_JOB_NAME": "resumed"})  # SageMaker packs: nothing to pack here
    env.model_dir.mkdir(parents=True)
    old = {"temperature": 0.9, "ece_before": 0.1, "ece_after": 0.05, "loss_after": 0.3,
           "per_class_confidence": [0.8, 0.9]}
    best = {"epoch": 1, "top1": 75.0, "loss": 0.4, "weights": "raw", "per_class": {"a": 50.0, "b": 100.0},
            "confusion": [[1, 1], [0, 2]], "calibration": old}
    with caplog.at_level("INFO", logger="efficientnet_train"):
        finish(env, {"val_images": 4}, [{"epoch": "0"}, {"epoch": "1"}], best, "done", 1.0)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Calibration:"))
    assert "top-label ECE 0.1000 -> 0.0500, validation loss" in line and "by chance" not in line
    best["calibration"] = {**old, "ece_by_chance": 0.08, "ece_by_chance_p90": 0.12}
    caplog.clear()
    with caplog.at_level("INFO", logger="efficientnet_train"):
        finish(env, {"val_images": 4}, [{"epoch": "0"}, {"epoch": "1"}], best, "done", 1.0)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Calibration:"))
    assert ("0.1000 -> 0.0500 (by chance alone, a perfectly calibrated model with these calibrated confidences "
            "shows 0.0800 on average on these 4 validation images, up to 0.1200 in 9 draws of 10)") in line


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
    assert probe["training_images_acc_1"] == probe["measured_images_acc_1"] == 100
    first = probe["measured"][0]
    assert first["part"] == "freeze_batchnorm" and first["setting"] == 0 and first["acc_1"] < 90
    assert [step["part"] for step in probe["measured"]].count("freeze_batchnorm") == 1  # all frozen: unmeasured
    assert probe["recipe"]["freeze_batchnorm"] == 1
    assert args["freeze_batchnorm"] == "auto" and args["effective_freeze_batchnorm"] == 1
    assert args["opt"] == "auto" and args["effective_opt"] == "sgd"
    assert args["data_config"]["train_input_size"] == args["data_config"]["input_size"] == [3, 37, 37]
    said = [line for line in log.splitlines() if "Recipe (auto): freeze_batchnorm=1.0" in line]
    assert len(said) == 1 and " INFO " in said[0] and f"{first['acc_1']:.1f}% at freeze_batchnorm=0.0" in said[0]
    assert_statistics_are_pretrained(base, pretrained_tiny_weights)


def test_every_part_left_to_auto_is_measured_chosen_by_one_rule_and_said_in_one_line(probed_job):
    from efficientnet_train.recipe import PARTS, SURE, blended_setting, keeps_chance, line_of

    base, log = probed_job
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    probe = args["linear_probe"]
    for names, settings, _ in PARTS:
        part = "+".join(names)
        steps = [step for step in probe["measured"] if step["part"] == part]
        kept = [step for step in steps if step["acc_1"] >= line_of(names) * probe["measured_images_acc_1"]]
        assert [step["setting"] for step in steps] == \
            [list(s) if len(s) > 1 else s[0] for s in settings[:len(steps)]]  # strongest first
        answered = round(probe["measured_images"] * probe["measured_images_acc_1"] / 100)
        chances = [keeps_chance(step["acc_1"] / probe["measured_images_acc_1"], answered, line_of(names))
                   for step in steps]
        assert [step["keeps_chance"] for step in steps] == [round(chance, 3) for chance in chances]
        assert [chance >= 0.5 for chance in chances] == [step in kept for step in steps]
        # Measured until one is SURE to keep the answers, or up to the gentlest, which is never measured.
        assert all(chance < SURE for chance in chances[:-1])
        assert chances[-1] >= SURE or len(steps) == len(settings) - 1
        chosen = blended_setting(settings, chances)
        assert tuple(probe["recipe"][name] for name in names) == tuple(chosen)
        assert tuple(args[f"effective_{name}"] for name in names) == tuple(chosen)
        assert sum(f"Recipe (auto): {names[0]}=" in line for line in log.splitlines()) == 1
    mirrored = next(step for step in probe["measured"] if step["part"] == "hflip")  # on every image, not half
    assert f"{mirrored['acc_1']:.1f}% with every image mirrored, for hflip=0.5" in log
    assert args["effective_eval_hflip"] is (args["effective_hflip"] >= 0.25)


def assert_statistics_are_pretrained(base: Path, pretrained_weights: Path) -> None:
    pretrained = torch.load(pretrained_weights, weights_only=True)
    checkpoint = torch.load(sorted((base / "checkpoints").glob("checkpoint-*.pth.tar"))[-1], weights_only=False)
    trained = checkpoint["model"]
    statistics = [name for name in trained if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(trained[name], pretrained[name]) for name in statistics)
    assert not torch.equal(trained["conv_stem.weight"], pretrained["conv_stem.weight"])  # the rest trained


def test_a_trained_model_answers_with_calibrated_confidence_not_uniform(probed_job):
    from efficientnet_train.inference import Classifier
    from efficientnet_train.decoding import load_image

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
    assert 0 < calibration["ece_by_chance"] <= calibration["ece_by_chance_p90"] < 1
    assert "Calibration: the best model's log probabilities are divided by a temperature" in log
    assert f"on average on these {args['val_images']} validation images, up to" in log
    assert "confidence" in log and len(calibration["per_class_confidence"]) == len(COLOURS)


def test_diagnose_calibration_finds_the_jobs_own_calibration_again(probed_job, tmp_path):
    """benchmarks/diagnose_calibration.py scores the served model on the val channel: its fitted row is the job's
    ECE after the temperature, and its chance figures the job's; a file that is no image is left out, named."""
    import shutil
    import subprocess
    import sys

    base, _ = probed_job
    val = shutil.copytree(base / "input" / "data" / "val", tmp_path / "val")
    (val / next(iter(COLOURS)) / "notes.jpg").write_text("not an image")
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "diagnose_calibration.py"),
                             str(base / "model" / "model.tar.gz"), str(val)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "left out" in result.stderr and "notes.jpg" in result.stderr and "(1 left out)" in result.stdout
    calibration = yaml.safe_load((base / "model" / "args.yml").read_text())["calibration"]
    fitted = re.search(r"^\| [\d.]+ \(fitted\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|", result.stdout,
                       re.M)
    assert fitted, result.stdout
    assert float(fitted[1]) == pytest.approx(calibration["ece_after"], abs=1e-3)
    assert float(fitted[2]) == pytest.approx(calibration["ece_by_chance"], abs=2e-3)
    assert float(fitted[3]) == pytest.approx(calibration["ece_by_chance_p90"], abs=2e-3)
    assert len(re.findall(r"^\| [\d.]+( \(fitted\))? \| [\d.]+ \|", result.stdout, re.M)) == 9  # the temperatures
    assert len(re.findall(r"^\| \d\.\d-\d\.\d \|", result.stdout, re.M)) >= 1  # the reliability table


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


@pytest.mark.parametrize("low, high, batch_top1", [(3.0, 5.0, 50.0), (-1.0, 1.0, 100.0)])
def test_batch_statistics_top1_sees_features_that_each_batch_renormalises(low, high, batch_top1):
    from efficientnet_train.linear_probe import probe_top1

    # Classes 3 and 5 apart from the pretrained statistics (mean 0): normalised by their own batch they become -1
    # and +1, below the head's threshold of 4 both, so half the answers go. Classes -1 and 1 keep theirs.
    model = threshold_model((low + high) / 2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    loader = shifted_pairs(low, high)
    assert (model(next(iter(loader))[0]).argmax(1) == next(iter(loader))[1]).all()  # right with the pretrained ones
    assert probe_top1(model, loader, lambda images: images, contextlib.nullcontext) == 100.0
    top1 = probe_top1(model, loader, lambda images: images, contextlib.nullcontext, frozen_batchnorm=0.0)
    assert top1 == pytest.approx(batch_top1)
    assert not model.training and all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_batchnorms_measurement_is_the_mean_over_several_batch_orders():
    """Which images share a batch changes what batch statistics do to them: one order's answer is not the set's."""
    from efficientnet_train.linear_probe import BATCH_ORDERS, batch_statistics_top1, probe_top1

    # Normalised by its own batch, a pair of one class is two zeros, answered 0 (under the threshold of 0.5): right
    # for class 0, wrong for class 1; a mixed pair becomes -1 and +1, both right.
    model, identity = threshold_model(0.5), (lambda images: images)
    images = torch.tensor([[3.0], [5.0]] * 8)

    def shuffled(seed: int):
        return torch.utils.data.DataLoader(list(zip(images, torch.tensor([0, 1] * 8))), batch_size=2, shuffle=True,
                                           generator=torch.Generator().manual_seed(seed))

    passes = [probe_top1(model, shuffled(seed), identity, contextlib.nullcontext, frozen_batchnorm=0.0)
              for seed in range(BATCH_ORDERS)]
    assert BATCH_ORDERS >= 4 and len(set(passes)) > 1  # the orders differ, and so do their answers
    mean = batch_statistics_top1(model, (shuffled(seed) for seed in range(BATCH_ORDERS)), identity,
                                 contextlib.nullcontext, 0.0)
    assert mean == pytest.approx(sum(passes) / BATCH_ORDERS) and mean != pytest.approx(passes[0])
    assert not model.training


def test_batch_statistics_are_measured_without_a_last_batch_under_half_of_one_as_training_drops_its_last():
    from efficientnet_train.linear_probe import short_last_batch

    assert short_last_batch(99, 32)  # photos' 99 measured images: 32, 32, 32 and 3
    assert not short_last_batch(128, 32) and not short_last_batch(125, 32) and not short_last_batch(112, 32)
    assert short_last_batch(111, 32) and short_last_batch(33, 32)
    assert not short_last_batch(20, 32) and not short_last_batch(3, 32)  # no full batch: every image is measured


def test_each_process_measures_batch_statistics_on_every_image_so_its_batches_are_as_large_as_training():
    from efficientnet_train.distributed import Rank
    from efficientnet_train.linear_probe import share_of_images

    # Features and the transforms' measurements: each image once, in one process.
    shares = [share_of_images(128, Rank(rank, 8)) for rank in range(8)]
    assert sorted(i for share in shares for i in share) == list(range(128)) and len(shares[3]) == 16
    # Batch statistics: 16 images a process would be one batch of 16 where training's are 32.
    assert all(share_of_images(128, Rank(rank, 8), batched_as_training=True) == range(128) for rank in range(8))
    assert share_of_images(99, Rank()) == share_of_images(99, Rank(), batched_as_training=True) == range(99)


def test_the_measurements_are_shares_of_the_measured_images_own_answers_as_fitted(pretrained_tiny_weights):
    """The probe's top-1 on its whole sample is not the top-1 on the images measured: a share of the one is compared
    with the other, and both are on the same images."""
    from efficientnet_train.linear_probe import fit_linear_probe
    from efficientnet_train.model import create_model

    model = create_model(TINY_MODEL, ["a", "b", "c"], str(pretrained_tiny_weights), 0.0, 0.0)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(48, 3, 32, 32, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(list(zip(images, labels)), range(48)),
                                         batch_size=16)
    measured = [0, 5, 6, 11, 30, 47]
    fit = fit_linear_probe(model, loader, lambda batch: batch, contextlib.nullcontext, 3,
                           torch.nn.CrossEntropyLoss(), measured=measured)
    with torch.no_grad():
        answers = model.eval()(images).argmax(1) == labels
    assert fit.top1 == pytest.approx(100 * answers.float().mean().item())
    assert fit.measured_top1 == pytest.approx(100 * answers[measured].float().mean().item())
    assert fit.measured_top1 != pytest.approx(fit.top1)  # random labels: the fit leaves some of them wrong
    assert fit_linear_probe(model, loader, lambda batch: batch, contextlib.nullcontext, 3,
                            torch.nn.CrossEntropyLoss()).measured_top1 == pytest.approx(fit.top1)


def hyperparameters_of(**given):
    from efficientnet_train import hyperparameters

    return hyperparameters.parse(given)[0]


def test_each_part_keeps_its_strongest_setting_that_keeps_nine_in_ten_answers_measured_on_those_before_it():
    from efficientnet_train.recipe import choose, recipe_for

    seen = []

    def measure(view, kind):  # digits-like: batch statistics, crops under half and RandAugment lose the answers
        seen.append((kind, view))
        if kind == "batch_statistics":
            return 10.0
        if kind == "regularisation":
            return 99.0 if view.drop < 0.3 else 50.0
        return 100.0 - 20 * (view.crop_scale < 0.5) - 30 * (view.aa != "none") - 40 * (view.hflip < 0.5)

    record = choose(hyperparameters_of(), 100.0, measure, 128)
    assert record["recipe"] == {"freeze_batchnorm": 1.0, "opt": "sgd", "lr": 0.064, "hflip": 0.5, "crop_scale": 0.5,
                                "aa": "none", "reprob": 0.2, "drop": 0.15, "drop_connect": 0.1}
    assert [step["keeps_chance"] for step in record["measured"]] == [0, 0.995, 0, 0, 0, 1, 0, 1]  # far from the line
    assert [(step["part"], step["setting"]) for step in record["measured"]] == [
        ("freeze_batchnorm", 0.0), ("hflip", 0.5), ("crop_scale", 0.25), ("aa", "rand-m9-mstd0.5"), ("aa", "rand-m5-mstd0.5"), ("reprob", 0.2), ("drop+drop_connect", [0.3, 0.2]),
        ("drop+drop_connect", [0.15, 0.1])]
    kinds = [kind for kind, _ in seen]
    assert kinds == ["batch_statistics"] + ["transform"] * 5 + ["regularisation"] * 2
    assert seen[0][1].freeze_batchnorm == 0  # every layer on batch statistics
    mirrored, crops = seen[1][1], seen[2][1]
    assert mirrored.hflip == 1.0 and mirrored.crop_scale == 1.0 and mirrored.aa == "none"  # every image mirrored
    assert crops.hflip == 0.5 and crops.freeze_batchnorm == 1 and crops.aa == "none" and crops.reprob == 0
    assert seen[5][1].aa == "none" and seen[5][1].crop_scale == 0.5  # erasing on top of what was chosen
    assert all(view.drop == 0 for kind, view in seen if kind != "regularisation")
    recipe = recipe_for(hyperparameters_of(), record["recipe"])
    assert (recipe.freeze_batchnorm, recipe.crop_scale, recipe.aa, recipe.drop) == (1, 0.5, "none", 0.15)


def test_the_mirror_which_loses_no_pixel_must_keep_nineteen_answers_in_twenty():
    """A digit set's mirrored images keep about 88% of the answers: on the line of the parts that hide pixels,
    under the mirror's own, so it is not mirrored (nor is evaluation); a photo set's keep them all."""
    from efficientnet_train.recipe import KEEPS, choose, keeps_chance, line_of, mirrors_at_evaluation, recipe_for

    assert line_of(("hflip",)) == 0.95 and line_of(("crop_scale",)) == line_of(("drop", "drop_connect")) == KEEPS
    for mirrored, hflip in ((88.0, 0.0), (100.0, 0.5)):
        record = choose(hyperparameters_of(), 100.0, lambda view, kind: mirrored if view.hflip == 1 else 100.0, 128)
        assert record["recipe"]["hflip"] == hflip, record
        assert record["measured"][1] == {"part": "hflip", "setting": 0.5, "acc_1": mirrored,
                                         "keeps_chance": round(keeps_chance(mirrored / 100, 128, 0.95), 3)}
        assert mirrors_at_evaluation(hyperparameters_of(), recipe_for(hyperparameters_of(), record["recipe"])) \
            is (hflip > 0)
    assert keeps_chance(0.88, 128, 0.95) < 0.001 < 0.2 < keeps_chance(0.88, 128)  # on the other line: a blend


def test_a_value_set_by_hand_is_used_as_set_and_its_part_not_measured():
    from efficientnet_train.recipe import choose, recipe_for

    seen = []
    record = choose(hyperparameters_of(freeze_batchnorm="false", aa="rand-m7-mstd0.5", drop="0.1", hflip="0"), 100.0,
                    lambda view, kind: seen.append(view) or 100.0, 128)
    parts = [step["part"] for step in record["measured"]]
    assert parts == ["crop_scale", "reprob"]  # the strongest kept at once; drop set by hand takes drop_connect's listing
    assert all(view.hflip == 0 and view.freeze_batchnorm == 0 for view in seen)
    assert [view.aa for view in seen] == ["none", "rand-m7-mstd0.5"]  # the crops measured before, erasing after it
    assert record["recipe"] == {"opt": "sgd", "lr": 0.064, "crop_scale": 0.25, "reprob": 0.2, "drop_connect": 0.2}
    recipe = recipe_for(hyperparameters_of(freeze_batchnorm="false", aa="rand-m7-mstd0.5", drop="0.1", hflip="0"),
                        record["recipe"])
    assert (recipe.freeze_batchnorm, recipe.aa, recipe.drop, recipe.drop_connect, recipe.hflip) == \
        (0, "rand-m7-mstd0.5", 0.1, 0.2, 0.0)
    assert choose(hyperparameters_of(), 100.0, lambda view, kind: None, 128)["recipe"]["freeze_batchnorm"] == 0


def test_the_log_names_only_the_parts_measured_whichever_name_of_a_part_is_set_by_hand():
    from efficientnet_train.recipe import choose, decisions

    for given in ({"drop": "0.1"}, {"drop_connect": "0.1"}, {"drop_connect": "0"}):
        record = choose(hyperparameters_of(**given), 100.0, lambda view, kind: 100.0, 128)
        lines = decisions(record)
        assert [line.split("=")[0] for line in lines] == ["freeze_batchnorm", "hflip", "crop_scale", "aa", "reprob"]
        assert not any("drop" in line for line in lines), given


def test_a_setting_measured_near_the_line_moves_a_little_with_each_image_never_a_whole_step():
    import re
    from dataclasses import replace

    from efficientnet_train.recipe import PARTS, SURE, blended_setting, keeps_chance, mirrors_at_evaluation, recipe_for

    ladder = {names: settings for names, settings, _ in PARTS}

    def chosen(names, *right_of_128):  # as choose measures them: strongest first, until one is SURE to keep
        chances = []
        for right in right_of_128:
            chances.append(keeps_chance(right / 128, 128))
            if chances[-1] >= SURE:
                break
        return blended_setting(ladder[names], chances)

    def augmentation(text):  # (magnitude, each op's chance) of a RandAugment text
        if text == "none":
            return 5, 0.0
        chance = re.search(r"-p([0-9.]+)", text)
        return int(re.search(r"-m([0-9]+)", text).group(1)), float(chance.group(1)) if chance else 0.5

    line = 0.9 * 128  # 115.2 of 128
    assert keeps_chance(0.9, 128) == 0.5
    assert chosen(("reprob",), line) == (0.1,)  # on the line: halfway
    erasing = [chosen(("reprob",), right)[0] for right in range(100, 129)]
    assert erasing[0] == 0.0 and erasing[-1] == 0.2  # far from the line: the rule's choice
    assert all(0 <= later - earlier < 0.04 for earlier, later in zip(erasing, erasing[1:]))  # an image: a little
    assert chosen(("drop", "drop_connect"), line, 128) == (0.22, 0.15)  # between the listing's and half of it
    assert chosen(("drop", "drop_connect"), 90, 128) == (0.15, 0.1)
    # Three settings: one image more under either measurement, whichever crosses the line, moves dropout by at most
    # 0.02 and RandAugment by one step of magnitude or 0.06 of each op's chance.
    for strongest in range(90, 129):
        for middle in range(strongest, 129):  # a gentler setting keeps at least about as much
            drop, aa = chosen(("drop", "drop_connect"), strongest, middle), chosen(("aa",), strongest, middle)
            for nearby in ((strongest + 1, middle), (strongest, middle + 1)):
                if nearby[0] <= nearby[1] <= 128:
                    assert abs(chosen(("drop", "drop_connect"), *nearby)[0] - drop[0]) < 0.021
                    (magnitude, chance), (m, c) = augmentation(aa[0]), augmentation(chosen(("aa",), *nearby)[0])
                    assert abs(magnitude - m) <= 1 and abs(chance - c) < 0.061
    # RandAugment blends its magnitude toward m9 and each op's chance (timm's p) toward none, in its own text.
    assert chosen(("aa",), 126) == ("rand-m9-mstd0.5",) and chosen(("aa",), 90, 100) == ("none",)
    assert chosen(("aa",), 113, 116) == ("rand-m6-mstd0.5-p0.3",)
    assert chosen(("aa",), 90, line) == ("rand-m5-mstd0.5-p0.25",)
    # Mirroring on the line: half the listing's rate. BatchNorm on it: half its layers frozen, those nearest the
    # classifier; far from it, all or none; one image moves the share a little.
    assert chosen(("hflip",), line) == (0.25,) and chosen(("hflip",), 100) == (0.0,)
    assert chosen(("freeze_batchnorm",), line) == (0.5,)
    batchnorm = [chosen(("freeze_batchnorm",), right)[0] for right in range(100, 129)]
    assert batchnorm[0] == 1.0 and batchnorm[-1] == 0.0
    assert all(0 <= earlier - later < 0.16 for earlier, later in zip(batchnorm, batchnorm[1:]))
    # Evaluation mirrors where auto mirrors at half the listing's rate or more, and wherever a hand-set hflip does.
    listing = recipe_for(hyperparameters_of())
    assert mirrors_at_evaluation(hyperparameters_of(), replace(listing, hflip=0.25))
    assert not mirrors_at_evaluation(hyperparameters_of(), replace(listing, hflip=0.24))
    assert mirrors_at_evaluation(hyperparameters_of(hflip="0.1"), recipe_for(hyperparameters_of(hflip="0.1")))


def test_a_probe_that_answers_nothing_right_or_a_part_that_cannot_be_measured_leaves_the_listings_recipe():
    from efficientnet_train.recipe import LISTING, choose

    for clean, measured in ((0.0, 0.0), (100.0, None)):
        record = choose(hyperparameters_of(), clean, lambda view, kind: measured, 128)
        assert {name: record["recipe"][name] for name in LISTING} == LISTING
        assert all(step["keeps_chance"] == (None if measured is None else 1.0) for step in record["measured"])


def test_before_the_probe_auto_is_the_listings_recipe_with_sgd_and_the_training_size_follows_batchnorm():
    from dataclasses import replace

    from efficientnet_train.recipe import Recipe, probe_record_read, recipe_for, training_size_config

    hp = hyperparameters_of()
    listing = Recipe(freeze_batchnorm=0.0, opt="sgd", lr=0.064, hflip=0.5, crop_scale=0.25, aa="rand-m9-mstd0.5",
                     reprob=0.2, drop=0.3, drop_connect=0.2)
    assert recipe_for(hp) == listing  # sgd instead of rmsproptf, at the rate measured for it
    explicit = hyperparameters_of(opt="rmsproptf", freeze_batchnorm="true", reprob="0.5")
    assert recipe_for(explicit, {"reprob": 0.0}) == replace(listing, opt="rmsproptf", lr=0.016, freeze_batchnorm=1.0,
                                                            reprob=0.5)
    for old, share in ((True, 1.0), (False, 0.0)):  # a checkpoint's record from before the shares
        record = {"acc_1": 90.0, "recipe": {"freeze_batchnorm": old, "reprob": 0.0},
                  "measured": [{"part": "freeze_batchnorm", "setting": False, "acc_1": 80.0},
                               {"part": "reprob", "setting": 0.2, "acc_1": 85.0}]}
        read = probe_record_read(record)
        assert read == {"acc_1": 90.0, "recipe": {"freeze_batchnorm": share, "reprob": 0.0},
                        "measured": [{"part": "freeze_batchnorm", "setting": 0.0, "acc_1": 80.0},
                                     {"part": "reprob", "setting": 0.2, "acc_1": 85.0}]}
        assert type(read["recipe"]["freeze_batchnorm"]) is float is type(read["measured"][0]["setting"])
        assert record["recipe"]["freeze_batchnorm"] is old and record["measured"][0]["setting"] is False  # a copy
        assert recipe_for(hp, read["recipe"]).freeze_batchnorm == share
    current = {"recipe": {"freeze_batchnorm": 0.64}, "measured": [{"part": "freeze_batchnorm", "setting": 0.0}]}
    assert probe_record_read(current) == current and probe_record_read(None) is None
    assert probe_record_read({"recipe": {"reprob": 0.0}}) == {"recipe": {"reprob": 0.0}}  # BatchNorm set by hand
    for asked, share in (("true", 1.0), ("False", 0.0), ("0.64", 0.64), ("1", 1.0)):  # a share set by hand
        assert recipe_for(hyperparameters_of(freeze_batchnorm=asked), {"freeze_batchnorm": 0.3}).freeze_batchnorm == share
    config = {"input_size": [3, 74, 74], "train_input_size": [3, 64, 64]}
    for recipe, size in ((listing, 64), (replace(listing, freeze_batchnorm=0.001), 74)):  # any frozen layer
        assert training_size_config(config, recipe)["train_input_size"] == [3, size, size]
    assert config["train_input_size"] == [3, 64, 64]  # not changed in place


@pytest.mark.parametrize("frozen", [0.0, 0.5, 1.0])
def test_a_frozen_batchnorm_keeps_its_statistics_while_everything_else_trains(frozen):
    """The share frozen is the BatchNorm layers nearest the classifier: half of two is the second."""
    from timm.scheduler import create_scheduler_v2

    from efficientnet_train import engine
    from efficientnet_train.checkpoints import Progress
    from efficientnet_train.stopping import StopRequest
    from efficientnet_train.data import ModelInput, TrainBatches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    images = [(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8), index % 2) for index in range(16)]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=1, decay_epochs=1, updates_per_epoch=4)
    loader = engine.data_loader(images, 0, torch.device("cpu"), 0, batch_sampler=TrainBatches(16, 4, seed=0))
    engine.train_one_epoch(model, loader, ModelInput({"mean": [0.5] * 3, "std": [0.5] * 3}, torch.device("cpu")),
                          torch.nn.CrossEntropyLoss(), optimizer, scheduler, None, None, contextlib.nullcontext,
                          Progress(), StopRequest(), frozen_batchnorm=frozen)
    after = model.state_dict()
    for layer, kept in (("1", frozen == 1), ("4", frozen > 0)):
        assert all(torch.equal(before[f"{layer}.{name}"], after[f"{layer}.{name}"])
                   for name in ("running_mean", "running_var")) is kept
    assert not any(torch.equal(before[name], after[name])
                   for name in ("0.weight", "1.weight", "1.bias", "4.weight", "4.bias", "7.weight"))
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
    parts = {step["part"] for step in args["linear_probe"]["measured"]}
    assert "freeze_batchnorm" not in parts and "aa" not in parts and "hflip" in parts
    assert "Recipe (auto): freeze_batchnorm" not in result.stdout and "Recipe (auto): aa=" not in result.stdout
    assert_statistics_are_pretrained(base, pretrained_tiny_weights)


def test_a_job_that_fails_after_its_probe_leaves_args_yml_saying_what_it_trained_with(
        tmp_path, pretrained_tiny_weights, in_process, monkeypatch):
    """args.yml was written before the probe and again only at the end: a job out of memory in epoch 1 left the
    listing's recipe there and no `linear_probe`, where it had trained with what its probe chose."""
    from efficientnet_train import train

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(train, "train_epoch", out_of_memory)
    base = make_job(tmp_path, {"epochs": "2", "batch_size": "8", "model": TINY_MODEL, "img_size": "32",
                               "pretrained_path": str(pretrained_tiny_weights), "workers": "0",
                               "freeze_batchnorm": "true"})
    assert in_process(base) == 1
    assert failure_reason(base).startswith("Out of memory")
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    chosen = args["linear_probe"]["recipe"]
    assert chosen["aa"] != "rand-m9-mstd0.5"  # so the listing's would show
    assert {name: args["lr_per_256" if name == "lr" else f"effective_{name}"] for name in chosen} == chosen
    assert read_summary(base / "model")[0]["epoch"] == "0"


def test_the_transforms_are_measured_at_the_evaluation_size_that_of_the_answers_they_are_a_share_of(
        tmp_path, pretrained_tiny_weights, in_process, monkeypatch):
    """With batch statistics in every layer, training takes the model's training size, 32 here, and evaluation 37:
    measured at 32 the mirror would also count what the smaller size loses against it."""
    from efficientnet_train import linear_probe

    sizes, transform = [], linear_probe.train_transform
    monkeypatch.setattr(linear_probe, "train_transform",
                        lambda config, *args: sizes.append(config["train_input_size"]) or transform(config, *args))
    base = make_job(tmp_path, {"epochs": "1", "batch_size": "8", "model": TINY_MODEL, "img_size": "32",
                               "pretrained_path": str(pretrained_tiny_weights), "workers": "0",
                               "freeze_batchnorm": "false"})
    assert in_process(base) == 0
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert args["data_config"]["train_input_size"] == [3, 32, 32] and args["data_config"]["input_size"] == [3, 37, 37]
    assert len(sizes) == len([step for step in args["linear_probe"]["measured"] if step["part"] != "drop+drop_connect"])
    assert all(size == [3, 37, 37] for size in sizes)


def test_a_capped_sample_measures_a_few_of_its_images_against_their_own_answers(
        tmp_path, pretrained_tiny_weights, in_process, monkeypatch):
    """Past 200 images a class the probe takes a sample, and the measurements a few of its images: the images'
    places in the sample are not their places in the set."""
    from efficientnet_train import linear_probe

    monkeypatch.setattr(linear_probe, "PROBE_IMAGES_PER_CLASS", 5)
    monkeypatch.setattr(linear_probe, "MEASURED_IMAGES", 6)
    base = make_job(tmp_path, {"epochs": "1", "batch_size": "4", "model": TINY_MODEL, "img_size": "32",
                               "pretrained_path": str(pretrained_tiny_weights), "workers": "0"})
    assert in_process(base) == 0
    probe = yaml.safe_load((base / "model" / "args.yml").read_text())["linear_probe"]
    assert probe["images"] == 15 and probe["measured_images"] == 6  # of 36 training images
    assert probe["measured_images_acc_1"] == probe["training_images_acc_1"] == 100  # the colours: all right


def test_measuring_the_augmentation_changes_nothing_that_training_draws(tmp_path, pretrained_tiny_weights):
    """The auto recipe trains exactly as the same recipe set by hand: the measurements' crops, flips and random
    erasing draw from generators of their own."""
    common = {"epochs": "1", "batch_size": "8", "model": TINY_MODEL, "img_size": "32", "workers": "0",
              "pretrained_path": str(pretrained_tiny_weights), "freeze_batchnorm": "false"}
    measured = make_job(tmp_path / "auto", {**common, "aa": "auto"})
    assert run_train(measured).returncode == 0
    args = yaml.safe_load((measured / "model" / "args.yml").read_text())
    assert any(step["part"] == "reprob" for step in args["linear_probe"]["measured"])
    by_hand = make_job(tmp_path / "by_hand", {**common, **{name: str(args[f"effective_{name}"]) for name in (
        "aa", "reprob", "hflip", "crop_scale", "drop", "drop_connect")}})
    assert run_train(by_hand).returncode == 0

    def weights(base: Path) -> dict:
        return torch.load(sorted((base / "checkpoints").glob("checkpoint-*.pth.tar"))[-1], weights_only=False)["model"]

    trained, reference = weights(measured), weights(by_hand)
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[name], reference[name]) for name in trained)


def test_dropout_and_drop_connect_can_be_lowered_after_the_model_is_built_and_raised_back(pretrained_tiny_weights):
    from timm.layers import DropPath

    from efficientnet_train.model import create_model, set_regularisation

    model = create_model(TINY_MODEL, ["a", "b"], str(pretrained_tiny_weights), 0.3, 0.2)
    built = [path.drop_prob for path in model.modules() if isinstance(path, DropPath)]
    assert built and max(built) <= 0.2 and model.drop_rate == 0.3
    set_regularisation(model, 0.15, 0.1)
    assert [path.drop_prob for path in model.modules() if isinstance(path, DropPath)] == \
        pytest.approx([rate / 2 for rate in built]) and model.drop_rate == 0.15  # deeper blocks still drop more
    set_regularisation(model, 0.0, 0.0)
    model.train()
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(images), model(images))  # nothing random left in a training-mode pass but BatchNorm's
    set_regularisation(model, 0.3, 0.2)
    assert [path.drop_prob for path in model.modules() if isinstance(path, DropPath)] == pytest.approx(built)


def test_the_batchnorm_layers_frozen_first_are_those_nearest_the_classifier():
    import timm

    from efficientnet_train.model import set_batchnorm

    model = timm.create_model(TINY_MODEL, num_classes=3).train()
    layers = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    for share in (0.0, 0.001, 0.25, 0.5, 1.0):
        on_batch_statistics = set_batchnorm(model, share)
        frozen = [not layer.training for layer in layers]
        assert on_batch_statistics == len(layers) - sum(frozen)
        assert sum(frozen) == (max(1, round(share * len(layers))) if share else 0)  # any share: at least one
        assert frozen == sorted(frozen)  # a run of layers ending at the classifier's
        assert model.bn2.training is (share == 0) and model.bn1.training is (share < 1)
        assert model.get_classifier().training  # only BatchNorm changes
