"""The small rules of the training loop, checked in-process."""

from __future__ import annotations

import contextlib
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

from efficientnet_train.channels import Channel
from efficientnet_train.hyperparameters import parse
from efficientnet_train.model import predict_log_probabilities
from efficientnet_train.engine import train_step
from efficientnet_train.optimisation import class_weights, create_optimizer, early_stop_reason


def rules(**overrides):
    return parse({"warmup_epochs": "1", "early_stopping_patience": "3", **overrides})[0]


def test_patience_counts_epochs_without_a_better_model():
    hp = rules()
    assert early_stop_reason(epoch=4, best_epoch=2, lr_now=0.01, peak_lr=0.01, hp=hp) is None
    assert "no better model for 3 epochs" in early_stop_reason(epoch=5, best_epoch=2, lr_now=0.01, peak_lr=0.01, hp=hp)


def test_a_spent_learning_rate_stops_but_not_during_warmup():
    hp = rules(warmup_epochs="2")
    assert early_stop_reason(epoch=2, best_epoch=2, lr_now=1e-9, peak_lr=0.01, hp=hp) is None  # still warming up
    assert "has decayed" in early_stop_reason(epoch=3, best_epoch=3, lr_now=1e-5, peak_lr=0.01, hp=hp)
    assert early_stop_reason(epoch=3, best_epoch=3, lr_now=2e-5, peak_lr=0.01, hp=hp) is None


def test_class_weights_make_every_class_count_the_same():
    channel = Channel("train", None, ["big", "small"], samples=[("x", 0)] * 100 + [("y", 1)] * 10)
    weights = class_weights(channel)
    assert weights.tolist() == pytest.approx([110 / 200, 110 / 20])
    assert (weights * torch.tensor([100.0, 10.0])).tolist() == pytest.approx([55.0, 55.0])


def _channels(train_counts, val_counts, multi_label=False):
    names = [f"c{i}" for i in range(len(train_counts))]

    def samples(counts):
        return [(f"{i}-{n}", (i,) if multi_label else i) for i, count in enumerate(counts) for n in range(count)]

    return (Channel("train", None, names, samples=samples(train_counts), multi_label=multi_label),
            Channel("val", None, names, samples=samples(val_counts), multi_label=multi_label))


def test_auto_balances_for_a_balanced_val_beside_an_imbalanced_train():
    from efficientnet_train.optimisation import balance_share, loss_function

    hp = rules()
    train, val = _channels([100, 60, 36, 22, 13, 8, 5, 5, 5, 5], [36] * 10)
    assert balance_share(hp, train, val, held_out=False) == 1.0
    weights = loss_function(train, hp, 1.0).weight
    assert (weights * torch.tensor([100.0, 60, 36, 22, 13, 8, 5, 5, 5, 5])).tolist() == pytest.approx([25.9] * 10)
    # a val that follows the training shares: the training set's own shares, weights of 1 (no weight at all)
    follows = _channels([100, 60, 36, 22, 13, 8, 5, 5, 5, 5], [40, 24, 14, 9, 5, 3, 2, 2, 2, 2])[1]
    assert balance_share(hp, train, follows, held_out=False) < 1e-6
    assert loss_function(train, hp, balance_share(hp, train, follows, held_out=False)).weight is None
    assert balance_share(hp, train, val, held_out=True) == 0.0  # held out of train: its shares by construction
    assert balance_share(rules(balance_classes="false"), train, val, held_out=False) == 0.0
    assert balance_share(rules(balance_classes="true"), train, follows, held_out=False) == 1.0


def test_auto_balance_degrades_gracefully_where_val_cannot_tell():
    from efficientnet_train.optimisation import balance_share, loss_function

    hp = rules()
    train, val = _channels([30, 20], [3, 3])  # 6 val images: equal shares a little likelier, not sure
    share = balance_share(hp, train, val, held_out=False)
    assert 0.5 < share < 0.7
    assert class_weights(train, share).tolist() == pytest.approx([1 - share + share * 50 / 60,
                                                                   1 - share + share * 50 / 40])
    even, even_val = _channels([30, 30], [5, 9])
    assert balance_share(hp, even, even_val, held_out=False) == 0.5  # a balanced train: the question is moot
    assert loss_function(even, hp, 0.5).weight is None  # and the loss is the unweighted one
    multi = _channels([30, 20], [5, 5], multi_label=True)
    assert balance_share(hp, *multi, held_out=False) == 0.0  # several labels an image: each label's own rate


def test_auto_balance_is_sure_without_overflow_on_a_thousand_classes():
    from efficientnet_train.optimisation import balance_share, balance_text

    hp = rules()
    shares = [50 + (i % 100) for i in range(1000)]  # 50 to 149 a class; val follows, a third of each
    train, follows = _channels(shares, [count // 3 for count in shares])
    assert balance_share(hp, train, follows, held_out=False) < 1e-300  # log odds near the end of exp's range
    assert balance_share(hp, train, _channels(shares, [40] * 1000)[1], held_out=False) == 1.0
    assert "weighs the classes 1 to 1, 0.0% of the way" in balance_text(train, 0.0)
    even = _channels([30, 30], [5, 9])[0]
    assert balance_text(even, 0.5) == "every class weighs 1 in the training loss (the training set is balanced)"


def test_evaluation_size_is_timms_test_view_or_larger_than_training():
    import timm

    from efficientnet_train.data import resolve_data_config

    b3 = timm.create_model("efficientnet_b3")  # timm trains it at 288 and measured 320 with crop 1.0 as best
    own = resolve_data_config(b3, img_size=0, eval_img_size=0)
    assert (own["train_input_size"], own["input_size"], own["crop_pct"]) == ([3, 288, 288], [3, 320, 320], 1.0)
    chosen = resolve_data_config(b3, img_size=256, eval_img_size=0)
    assert (chosen["train_input_size"], chosen["input_size"], chosen["crop_pct"]) == ([3, 256, 256],
                                                                                      [3, 294, 294], 0.875)
    assert resolve_data_config(b3, img_size=256, eval_img_size=256)["input_size"] == [3, 256, 256]


def test_layer_decay_gives_the_classifier_lr_and_the_stem_the_least():
    import timm

    model = timm.create_model("test_efficientnet", num_classes=3)
    params = dict(model.named_parameters())

    def lr_scale(optimizer, name):
        return next(group.get("lr_scale", 1.0) for group in optimizer.param_groups
                    if any(p is params[name] for p in group["params"]))

    decayed = create_optimizer(model, rules(layer_decay="0.5"), lr=0.01, opt="rmsproptf")
    scales = sorted({group["lr_scale"] for group in decayed.param_groups})
    assert len(scales) > 3 and all(b / a == pytest.approx(2.0) for a, b in zip(scales, scales[1:]))
    assert lr_scale(decayed, "classifier.weight") == 1.0
    assert lr_scale(decayed, "conv_stem.weight") == scales[0]

    flat = create_optimizer(model, rules(layer_decay="1"), lr=0.01, opt="rmsproptf")
    assert {group["lr"] for group in flat.param_groups} == {0.01}
    assert {lr_scale(flat, name) for name in params} == {1.0}


def test_weight_average_is_timms_with_two_operations_a_step_and_survives_a_resume():
    """The job's EMA must average exactly as timm's ModelEmaV3 does (BatchNorm statistics and batch counters
    included), also after a checkpoint is loaded into the model and the average in place, and dispatch two
    operations per update where timm's walks both state_dicts."""
    import timm
    from timm.utils import ModelEmaV3
    from torch.utils._python_dispatch import TorchDispatchMode

    from efficientnet_train.optimisation import model_ema

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    timms, ours = (make(model, decay=0.99, use_warmup=True) for make in (ModelEmaV3, model_ema))

    def train(steps: range):
        for step in steps:
            model.train()
            torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
            optimizer.step()
            optimizer.zero_grad()
            timms.update(model, step=step)
            ours.update(model, step=step)

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    train(range(1, 4))
    saved = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in (("model", model), ("ema", ours))}
    train(range(4, 6))
    model.load_state_dict(saved["model"])  # a resumed job: both restored in place, the same tensors as before
    ours.load_state_dict(saved["ema"])
    timms.load_state_dict(saved["ema"])
    train(range(4, 7))
    assert same(ours.module.state_dict(), timms.module.state_dict())
    assert not same(ours.module.state_dict(), model.state_dict())  # an average, not a copy
    assert ours.module.bn1.num_batches_tracked.item() == model.bn1.num_batches_tracked.item() == 6

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    with Count() as ours_count:
        ours.update(model, step=7)
    with Count() as timms_count:
        timms.update(model, step=7)
    assert ours_count.count == 2 and timms_count.count > 100


def test_the_jobs_weight_average_is_the_mean_of_the_start_and_every_update_until_its_decay():
    """The start (the probe's weights) counts as one of the averaged weights, each update as one more, until the
    decay reaches model_ema_decay; from there it is an exponential average at that decay."""
    import timm

    from efficientnet_train.optimisation import training_tools

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    ema, _ = training_tools(model, rules(model_ema_decay="0.75"), None)
    weights = [model.classifier.weight.detach().clone()]
    for step in range(1, 6):
        with torch.no_grad():
            model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
        ema.update(model, step=step)
        weights.append(model.classifier.weight.detach().clone())
        if step <= 3:  # decays 1/2, 2/3, 3/4: the plain mean so far
            assert torch.allclose(ema.module.classifier.weight, torch.stack(weights).mean(0), atol=1e-6)
    mean_of_four = torch.stack(weights[:4]).mean(0)
    expected = 0.75 * (0.75 * mean_of_four + 0.25 * weights[4]) + 0.25 * weights[5]  # then decay 0.75 itself
    assert torch.allclose(ema.module.classifier.weight, expected, atol=1e-6)


def test_mirrored_prediction_averages_an_image_and_its_mirror():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).eval()
    images = torch.randn(2, 3, 4, 4)
    mirrored = predict_log_probabilities(model, images, mirror=True)
    expected = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
    assert torch.allclose(mirrored.exp(), expected, atol=1e-6)
    assert torch.allclose(mirrored, predict_log_probabilities(model, images.flip(3), mirror=True), atol=1e-6)
    plain = predict_log_probabilities(model, images, mirror=False)
    assert torch.allclose(plain, model(images).log_softmax(1)) and not torch.allclose(plain, mirrored)


def test_data_loading_workers_use_every_core_but_one_per_gpu(monkeypatch):
    from efficientnet_train.resources import data_loading_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))  # ml.p3.2xlarge: 8 vCPUs, 1 GPU
    assert data_loading_workers(1) == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(32)))  # ml.p3.8xlarge: 32 vCPUs, 4 GPUs
    assert data_loading_workers(4) == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert data_loading_workers(1) == 0  # one core: loading in the training process beats competing with it


def test_slow_data_is_said_once_with_what_to_change(monkeypatch, caplog):
    """More than a tenth of training spent waiting for batches: one warning, from rank 0 only, that says the
    share and the fix: the default worker count where fewer were asked for, otherwise a bigger instance or
    cheaper images."""
    import logging

    from efficientnet_train.resources import SlowDataWarning

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))  # ml.p3.2xlarge: 8 vCPUs, 1 GPU

    def warnings_of(warning: SlowDataWarning, *checks) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="efficientnet_train"):
            for check in checks:
                warning.check(*check)
        return [record.getMessage() for record in caplog.records]

    asked_for_one = SlowDataWarning(workers=1, workers_asked=1, processes_on_this_host=1, gpu=True, speaks=True)
    assert warnings_of(asked_for_one, (5.0, 60.0, "epoch 1 so far"), (0.5, 4.0, "epoch 1's training")) == []
    said = warnings_of(asked_for_one, (30.0, 62.0, "epoch 1 so far"), (40.0, 80.0, "epoch 1's training"))
    assert said == ["Training waited for data 30 s of the 62 s of epoch 1 so far (48%): the GPU stood idle while 1 "
                    "data-loading worker process decoded and augmented images. workers=1 is set; set workers=-1 (the "
                    "default) to use 7 on this host (8 cores, 1 training process)."]
    assert warnings_of(asked_for_one, (40.0, 80.0, "epoch 2's training")) == []  # once is enough

    every_core = SlowDataWarning(workers=3, workers_asked=-1, processes_on_this_host=2, gpu=True, speaks=True)
    said = warnings_of(every_core, (20.0, 100.0, "epoch 1's training"))
    assert len(said) == 1 and "(20%): the GPU stood idle while 3 data-loading worker processes" in said[0]
    assert "every core but one per training process (8 cores, 2 training processes): choose an instance type " \
           "with more vCPUs for each GPU" in said[0] and "aa=none" in said[0] and "img_size" in said[0]

    in_process = SlowDataWarning(workers=0, workers_asked=0, processes_on_this_host=1, gpu=False, speaks=True)
    said = warnings_of(in_process, (10.0, 20.0, "epoch 3's training"))
    assert "training stood still while the training process itself (workers=0) decoded" in said[0]
    assert "set workers=-1 (the default) to use 7" in said[0]

    other_rank = SlowDataWarning(workers=1, workers_asked=1, processes_on_this_host=1, gpu=True, speaks=False)
    assert warnings_of(other_rank, (50.0, 60.0, "epoch 1 so far")) == []


def test_batch_size_is_per_process_and_fitted_to_each_process_share(caplog):
    from efficientnet_train.errors import JobError
    from efficientnet_train.resources import fitted_batch_size

    assert fitted_batch_size(18, 36, processes=2) == 18 and "larger" not in caplog.text
    assert fitted_batch_size(19, 36, processes=2) == 18
    assert "shared among 2 training processes (one per GPU)): training with batches of 18" in caplog.text
    with pytest.raises(JobError, match="or use fewer GPUs"):
        fitted_batch_size(32, 3, processes=2)


def test_model_input_normalises_uint8_batches_as_timms_float_transform_would():
    """The loaders hand over uint8; ModelInput's arithmetic on the device must give the model what timm's
    ToTensor + Normalize would have (the model was pretrained on that)."""
    from PIL import Image
    from timm.data import create_transform

    from efficientnet_train.data import ModelInput, eval_transform

    config = {"input_size": [3, 24, 24], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "crop_pct": 0.9, "crop_mode": "center"}
    image = Image.fromarray(torch.randint(0, 256, (40, 30, 3), dtype=torch.uint8).numpy())
    as_uint8 = eval_transform(config)(image)
    assert as_uint8.dtype == torch.uint8
    reference = create_transform(24, interpolation="bicubic", mean=config["mean"], std=config["std"], crop_pct=0.9)
    expected = reference(image).unsqueeze(0)
    given = ModelInput(config, torch.device("cpu"))(as_uint8.unsqueeze(0))
    assert given.dtype == torch.float32 and given.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(given, expected, rtol=0, atol=1e-5)


def test_model_input_erases_training_batches_only_when_asked():
    from efficientnet_train.data import ModelInput

    config = {"mean": [0.5] * 3, "std": [0.25] * 3}
    images = torch.full((8, 3, 16, 16), 128, dtype=torch.uint8)
    plain = ModelInput(config, torch.device("cpu"))(images)
    assert torch.allclose(plain, torch.full_like(plain, (128 - 127.5) / 63.75))
    erased = ModelInput(config, torch.device("cpu"), reprob=1.0, remode="pixel")(images)
    changed = (erased != plain).flatten(1).any(dim=1)
    assert changed.all()  # every image had a patch of noise put in


def test_randaugment_fills_with_the_models_own_mean():
    """The uint8 transforms leave normalising to ModelInput, but RandAugment still needs the model's mean: it
    fills what rotating, shearing and translating uncover with it."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from efficientnet_train.data import train_transform

    config = {"train_input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
              "std": [0.5, 0.5, 0.5]}
    transform = train_transform(config, "rand-m9-mstd0.5", hflip=0.5, crop_scale=0.25)
    augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    assert {op.hparams["img_mean"] for op in augment.ops} == {(128, 128, 128)}
    assert transform(Image.new("RGB", (40, 30))).dtype == torch.uint8


def test_the_training_transform_is_the_parts_the_recipe_chose_and_nothing_else():
    """No colour jitter (timm adds one where RandAugment is off), no mirroring at hflip=0, and at crop_scale=1 no
    random crop: evaluation's own view at the training size (the view the probe was fitted in), the same every
    time, with the mirror and RandAugment still applied where asked."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment
    from torchvision.transforms import ColorJitter, RandomHorizontalFlip

    from efficientnet_train.data import decode_side, eval_transform, train_transform

    config = {"train_input_size": [3, 32, 32], "input_size": [3, 36, 36], "interpolation": "bicubic",
              "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"}
    for aa, hflip, scale in (("none", 0.0, 1.0), ("none", 0.5, 0.5), ("rand-m5-mstd0.5", 0.5, 0.25),
                             ("rand-m5-mstd0.5", 0.5, 1.0)):
        transform = train_transform(config, aa, hflip, scale)
        kinds = [type(t) for t in transform.transforms]
        assert ColorJitter not in kinds and (RandomHorizontalFlip in kinds) is (hflip > 0)
        assert (RandAugment in kinds) is (aa != "none")
        assert (getattr(transform.transforms[0], "scale", None) == (scale, 1.0)) is (scale < 1)
    image = Image.linear_gradient("L").convert("RGB").resize((48, 32))  # wider than high: a centre square of it
    whole = train_transform(config, "none", 0.0, 1.0)
    assert all(torch.equal(whole(image), whole(image)) for _ in range(5))
    square = image.crop((8, 0, 40, 32)).resize((32, 32), Image.BICUBIC)
    assert torch.equal(whole(image), torch.tensor(list(square.tobytes()), dtype=torch.uint8).reshape(32, 32, 3).permute(2, 0, 1))
    for crop_pct, crop_mode in ((1.0, "center"), (0.875, "center"), (0.875, "squash"), (0.875, "border")):
        cropped = {**config, "crop_pct": crop_pct, "crop_mode": crop_mode}  # b3 at its default sizes: 1, lite0 0.875
        at_training_size = eval_transform({**cropped, "input_size": cropped["train_input_size"]})
        assert torch.equal(train_transform(cropped, "none", 0.0, 1.0)(image), at_training_size(image))
        assert decode_side(cropped, True, 1.0) == math.ceil(32 / crop_pct)  # evaluation's resize, at 32 pixels
    assert decode_side(config, True, 1.0) < decode_side(config, True, 0.25)  # a smaller crop needs more pixels


def test_model_input_refuses_float_batches():
    from efficientnet_train.data import ModelInput

    with pytest.raises(TypeError, match="uint8"):
        ModelInput({"mean": [0.5] * 3, "std": [0.25] * 3}, torch.device("cpu"))(torch.zeros(1, 3, 4, 4))


def test_an_epoch_reports_its_wait_for_data_and_progress_lines_say_it(monkeypatch, caplog):
    """A slow loader shows as data_wait, and the minute-by-minute line says its share while the epoch runs."""
    import logging
    import time

    from timm.scheduler import create_scheduler_v2

    from efficientnet_train import engine, report, resources
    from efficientnet_train.checkpoints import Progress
    from efficientnet_train.stopping import StopRequest
    from efficientnet_train.data import ModelInput, TrainBatches
    from efficientnet_train.model import autocast_for

    class SlowImages(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            time.sleep(0.02)  # 2 images a batch: 0.04 s of waiting per batch, in this process (workers=0)
            return torch.full((3, 16, 16), index, dtype=torch.uint8), index % 2

    device = torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=1, decay_epochs=1, updates_per_epoch=4)
    loader = engine.data_loader(SlowImages(), 0, device, 0, batch_sampler=TrainBatches(8, 2, seed=0))
    monkeypatch.setattr(engine, "PROGRESS_EVERY_S", 0)
    monkeypatch.setattr(resources.SlowDataWarning, "MIN_SECONDS", 0.0)
    startup = report.StartUp(time.time() - 10)
    with caplog.at_level(logging.INFO, logger="efficientnet_train"):
        loss, data_wait = engine.train_one_epoch(
            model, loader, ModelInput({"mean": [0.5] * 3, "std": [0.5] * 3}, device), torch.nn.CrossEntropyLoss(),
            optimizer, scheduler, None, None, autocast_for(device)[0], Progress(), StopRequest(),
            startup=startup, slow_data=resources.SlowDataWarning(0, 0, 1, gpu=False, speaks=True))
    assert loss > 0 and 0.1 <= data_wait < 1.0  # three batches after the first, 0.04 s each
    first_step = [r.getMessage() for r in caplog.records if r.getMessage().startswith("First training step")]
    assert first_step == [startup.line()] and re.fullmatch(
        # a loaded machine may take seconds for the first batch and step (seen: 1.3 s)
        r"First training step done \d\d+\.\d s after the job started: setting up training 10\.\d s, first batch "
        r"\(the loader's workers starting\) \d+\.\d s, first step \d+\.\d s", first_step[0]), first_step
    assert dict(startup.phases)["first batch (the loader's workers starting)"] >= 0.04  # two images, 0.02 s each
    lines = [r.getMessage() for r in caplog.records if "waiting for data" in r.getMessage()]
    assert len(lines) == 4 and re.search(r"epoch 1: 4/4 batches, [\d.]+ images/s, waiting for data \d+% of the time",
                                         lines[-1]), lines
    # The first progress line that shows the wait says, once, what it costs and what to change.
    slow = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(slow) == 1 and re.match(r"Training waited for data 0 s of the 0 s of epoch 1 so far \(\d+%\): training "
                                       r"stood still while the training process itself \(workers=0\)", slow[0]), slow


def test_adaptive_clipping_keeps_each_units_step_a_small_share_of_its_weights():
    # One unit with tiny weights and a huge gradient (a BatchNorm-frozen layer's case), one with bigger weights.
    before = torch.tensor([[0.01, 0.0], [3.0, 4.0]])
    images, targets = torch.tensor([[1000.0, 0.0]]), torch.tensor([0])

    def step(clip_grad: float) -> torch.Tensor:
        layer = torch.nn.Linear(2, 2, bias=False)
        layer.load_state_dict({"weight": before})
        train_step(layer, images, targets, torch.nn.CrossEntropyLoss(), torch.optim.SGD(layer.parameters(), lr=1.0),
                   None, contextlib.nullcontext, clip_grad=clip_grad)
        return (layer.weight.detach() - before).norm(dim=1)

    assert step(0.01).tolist() == pytest.approx([0.01 * 0.01, 0.01 * 5.0], rel=1e-3)  # each row 1% of its norm
    assert step(0.0)[0] > 100  # unclipped: 10,000 times its weights' norm


def test_adaptive_clipping_at_once_is_timms_with_a_few_operations_whatever_the_tensor_count():
    """The GPU's clipping must give timm's adaptive_clip_grad's gradients (channels-last weights, a gradient left None,
    units kept and units clipped), and launch the same few operations for 49 tensors as for 213: timm's loop launched
    about 13 a tensor, which took up to half of efficientnet_b3's steps on a GPU."""
    import timm
    from timm.utils import adaptive_clip_grad
    from torch.utils._python_dispatch import TorchDispatchMode

    from efficientnet_train import optimisation

    # Views and lists of views launch nothing; every other operation is a kernel launch on a GPU.
    views = {"as_strided", "split", "split_with_sizes", "detach", "view", "alias", "lift_fresh"}

    class Launches(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.__name__.split(".")[0] not in views
            return func(*args, **(kwargs or {}))

    launches = []
    for name in ("test_efficientnet", "efficientnet_b0"):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=3).to(memory_format=torch.channels_last)
        model(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)).square().sum().backward()
        for i, p in enumerate(model.parameters()):  # gradients from 1/100 to 100 times their natural size
            p.grad.mul_(10.0 ** (i % 5 - 2))
        model.classifier.bias.grad = None
        params = [p for p in model.parameters() if p.grad is not None]
        before = [p.grad.clone() for p in params]
        adaptive_clip_grad(params, 0.01)
        timms = [p.grad.clone() for p in params]
        for p, grad in zip(params, before):
            p.grad.copy_(grad)
        optimisation._unit_lengths.cache_clear()
        optimisation.adaptive_clip_at_once(params, 0.01)  # the units' lengths made and kept: not counted
        for p, grad in zip(params, before):
            p.grad.copy_(grad)
        with Launches() as counted:
            optimisation.adaptive_clip_at_once(params, 0.01)
        launches.append(counted.count)
        kept = torch.cat([(a == b).flatten() for a, b in zip(before, timms) if a.abs().max() > 0])
        assert kept.any() and not kept.all()  # some units kept, others clipped
        for ours, theirs in zip(params, timms):
            assert torch.allclose(ours.grad, theirs, rtol=1e-5, atol=1e-12)
        assert model.classifier.bias.grad is None
    assert launches[0] == launches[1] <= 18, launches


def test_tensors_clipped_at_once_by_device_and_dtype_and_the_odd_ones_by_timms_loop():
    """Each tensor the at-once clipping cannot take (its units' elements apart in memory) goes to timm's loop, not the
    whole model; tensors of two dtypes are clipped in two groups; and the result is timm's."""
    from timm.utils import adaptive_clip_grad

    from efficientnet_train.optimisation import adaptive_clip_at_once, at_once_groups

    torch.manual_seed(0)
    conv = torch.nn.Parameter(torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last))
    bias = torch.nn.Parameter(torch.randn(8))
    transposed = torch.nn.Parameter(torch.randn(6, 5).t())  # each row's elements apart in memory
    double = torch.nn.Parameter(torch.randn(3, 7, dtype=torch.float64))
    params = [conv, bias, transposed, double]
    for p in params:
        p.grad = torch.randn_like(p) * 10.0 ** torch.randint(-3, 2, p.shape[:1]).reshape(-1, *[1] * (p.dim() - 1))
    before = [p.grad.clone() for p in params]
    adaptive_clip_grad(params, 0.01)
    timms = [p.grad.clone() for p in params]
    for p, grad in zip(params, before):
        p.grad = grad.clone()

    groups, rest = at_once_groups(params, devices=("cpu",))
    assert [[id(p) for p in group] for group in groups] == [[id(conv), id(bias)], [id(double)]]
    assert [id(p) for p in rest] == [id(transposed)]
    assert at_once_groups(params) == ([], params)  # on a CPU, timm's loop for every tensor
    for group in groups:
        adaptive_clip_at_once(group, 0.01)
    adaptive_clip_grad(rest, 0.01)
    for p, theirs in zip(params, timms):
        assert torch.allclose(p.grad, theirs, rtol=1e-6, atol=1e-12)


def test_crops_grow_over_the_warmup_update_by_update_and_a_resumed_epoch_grows_as_an_uninterrupted_one():
    """Each training index carries how far the crops have grown by its batch's update: 0 at the first update of
    fine-tuning, 1 from `growth_updates` on, in between in proportion, counted across epochs; skipping an
    interrupted epoch's first batches leaves the rest as they were. Without a growth, plain indices."""
    from efficientnet_train.data import TrainBatches

    batches = TrainBatches(20, 4, seed=3, growth_updates=8)  # 5 updates an epoch
    seen = []
    for epoch in (1, 2, 3):
        batches.start_epoch(epoch)
        for batch in batches:
            assert len({grown for _, grown in batch}) == 1 and len(batch) == 4
            seen.append(batch[0][1])
    assert seen == [min(1.0, update / 8) for update in range(15)]
    batches.start_epoch(2)
    whole = list(batches)
    batches.start_epoch(2, skip_batches=3)
    assert list(batches) == whole[3:]
    plain = TrainBatches(20, 4, seed=3)
    plain.start_epoch(2)
    assert [[index for index, _ in batch] for batch in whole] == list(plain)
    assert TrainBatches.per_epoch(20, 4) == len(plain) == 5 and TrainBatches.per_epoch(21, 4, 2) == 2


def test_a_growing_crop_starts_at_evaluations_crop_and_moves_each_drawn_box_toward_it():
    """grown 0: evaluation's own crop at the training size (the probe's view), whatever the image's shape; 1: the
    transform's own random crop, drawing the same random numbers; between, the box between the drawn one and
    evaluation's. A transform without a random crop (crop_scale=1) is applied as it is; one that starts with
    neither, refused (timm changed)."""
    import random

    from PIL import Image
    from torchvision.transforms import Compose, ToTensor
    from torchvision.transforms.functional import resized_crop

    from efficientnet_train.data import GrowingCrop, eval_transform, train_transform

    image = Image.linear_gradient("L").convert("RGB").resize((48, 32))
    for crop_pct in (0.875, 1.0):
        config = {"train_input_size": [3, 16, 16], "input_size": [3, 20, 20], "interpolation": "bicubic",
                  "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": crop_pct, "crop_mode": "center"}
        grow = GrowingCrop(train_transform(config, "none", 0.0, 0.25), crop_pct, "center")
        at_training_size = eval_transform({**config, "input_size": config["train_input_size"]})(image)
        start = grow(image, 0.0)
        assert start.shape == at_training_size.shape == (3, 16, 16)
        assert (start.float() - at_training_size.float()).abs().mean() < 3  # resized then cropped, or the reverse
        for seed in range(5):
            random.seed(seed)
            drawn = grow.crop.get_params(image, grow.crop.scale, grow.crop.ratio)
            random.seed(seed)
            own = grow.transform(image)
            random.seed(seed)
            assert torch.equal(grow(image, 1.0), own)
            random.seed(seed)
            assert torch.equal(grow(image), own)
            middle = [round((e + d) / 2) for e, d in zip(grow.evaluation_box(image.size), drawn)]
            random.seed(seed)
            assert torch.equal(grow(image, 0.5), grow.rest(resized_crop(image, *middle, [16, 16],
                                                                          grow.crop.interpolation)))
    assert grow.evaluation_box((48, 32)) == (0, 8, 32, 32)  # crop_pct 1: the centre square
    assert GrowingCrop(grow.transform, 0.875).evaluation_box((48, 32)) == (2, 10, 28, 28)  # 32 * 16 / 18 = 28.4
    assert GrowingCrop(grow.transform, 0.875, "squash").evaluation_box((48, 32)) == (2, 3, 28, 43)
    still = GrowingCrop(train_transform(config, "none", 0.0, 1.0), 1.0)
    assert still.crop is None and torch.equal(still(image, 0.0), still(image, 1.0))
    with pytest.raises(RuntimeError, match="no longer starts with its crop"):
        GrowingCrop(Compose([ToTensor()]), 1.0)
