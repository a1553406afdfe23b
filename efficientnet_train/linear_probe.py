"""The new classifier's first weights: a logistic regression on the frozen pretrained features (LP-FT).

Fine-tuning from a zero (or random) head spends its first updates learning the head while the
backbone's gradients come from a head that knows nothing, and those early gradients distort the
pretrained features (Kumar et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022). Fitting the
head first on the frozen features, as a linear probe, and then fine-tuning everything avoids that;
and a job validated from that head on can never end worse than its own linear probe.

Here too the choices the job makes from the probe (recipe.py): `start` fits the probe, measures how its
classifier answers each part of the training recipe, and hands back the record (args.yml's `linear_probe`, kept in
the checkpoint) from which a new or resumed job takes its recipe.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed
from .stopping import Interrupted, stop_here
from .data import ModelInput, dataset_of, decode_side, eval_transform, train_transform
from .engine import data_loader
from .model import set_batchnorm, set_regularisation
from .multilabel import hits
from .recipe import Recipe, at_evaluation_size, choose

log = logging.getLogger("efficientnet_train")

# At most this many training images a class, and this many in all, go through the network for the probe:
# logistic regression on 1280-1536 features gains little beyond a few hundred a class, and on a set of
# 100,000 images the pass costs a small share of one epoch.
PROBE_IMAGES_PER_CLASS = 200
PROBE_MAX_IMAGES = 10_000
# The measurements after the probe (recipe.py) each score its head on this many of its images, a like number a
# class (one each of as many classes where there are more): each costs a forward pass, and ~128 images resolve
# 'nine in ten answers kept' to a few points.
MEASURED_IMAGES = 128
# Batch statistics depend on which images share a batch: one order moved photos' measurement by 3 points (standard
# deviation) where which images were measured moved it by 1, so BatchNorm's is the mean over several orders.
BATCH_ORDERS = 4
LBFGS_ITERATIONS = 300


def probe_sample(samples: list[tuple[str, int]], num_classes: int, seed: int,
                 max_images: int = PROBE_MAX_IMAGES) -> list[int]:
    """Indices of the training images the probe uses (of `samples`): every image of a class up to its quota, else a
    random quota of them, at least one a class but `max_images` in all; the same on every process."""
    quota = max(1, min(PROBE_IMAGES_PER_CLASS, max_images // num_classes))
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):  # several labels: counted under the first, -1 for none
        by_class.setdefault((label[0] if label else -1) if isinstance(label, tuple) else label, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for members in by_class.values():
        if len(members) > quota:
            members = [members[i] for i in torch.randperm(len(members), generator=generator)[:quota].tolist()]
        chosen += members
    if len(chosen) > max_images:  # more classes than images allowed: one image of as many classes
        chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=generator)[:max_images].tolist()]
    return sorted(chosen)


@torch.no_grad()
def features_of(model: torch.nn.Module, loader, to_input, autocast, stop=None,
                multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (what the classifier sees) and labels (multi-hot for several an image) of every image of the
    Subset that `loader`'s processes share among them, on each process. Interrupted between batches once `stop`
    is asked for."""
    model.eval()
    device = next(model.parameters()).device
    features = [torch.zeros(0, model.get_classifier().in_features, device=device)]
    labels = [torch.zeros(0, model.get_classifier().out_features, device=device) if multi_label else
              torch.zeros(0, dtype=torch.long, device=device)]
    for images, targets in distributed.stoppable(loader, stop):
        with autocast():
            features.append(model.forward_head(model.forward_features(to_input(images)), pre_logits=True).float())
        labels.append(targets.to(device))
    return (distributed.rows_of_all(torch.cat(features), loader.dataset),
            distributed.rows_of_all(torch.cat(labels), loader.dataset))


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor
    bias: torch.Tensor
    loss: float  # the training loss at the fit


@dataclass(frozen=True)
class ProbeFit:
    """A probe put in the model's classifier: its training loss, its top-1 (%) on the images it was fitted on and on
    those of them the recipe's measurements score, how many they were, the features' width and the seconds spent on
    them and on the regression."""
    loss: float
    top1: float
    measured_top1: float
    images: int
    features: int
    extract_seconds: float
    fit_seconds: float


@dataclass(frozen=True)
class ProbeStart:
    """Epoch 0: the probe fitted and `choices`, recipe.choose's record of the measurements and the settings chosen."""
    fit: ProbeFit
    choices: dict

    def record(self, val_top1: float, val_loss: float, seconds: float) -> dict:
        """args.yml's and the checkpoint's `linear_probe`, once the probe has been validated: what resume reads."""
        return {"acc_1": val_top1, "loss": val_loss, "images": self.fit.images, "seconds": round(seconds, 1),
                "training_images_acc_1": self.fit.top1, **self.choices}


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, loss_fn, stop=None) -> Head:
    """Multinomial logistic regression by full-batch LBFGS: the training loss (label smoothing and class weights
    included, so fine-tuning starts at its own optimum for the head) plus an L2 penalty of 1/n, as
    scikit-learn's LogisticRegression (C=1) regularises, on the features as the network makes them. Not
    standardised: a feature with little spread in the probe's images would get a weight that fine-tuning
    blows up as soon as it varies (timm's tiny test model overflowed in its first epoch)."""
    features, labels = features.float(), labels.float() if labels.dim() == 2 else labels.long()  # multi-hot: BCE
    mean = features.mean(dim=0)  # centred, for LBFGS's sake only: the unpenalised bias takes the mean back
    centred = features - mean
    weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    l2 = 1.0 / len(labels)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=LBFGS_ITERATIONS, history_size=20,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        stop_here(stop)  # each of up to LBFGS_ITERATIONS evaluations: seconds at 1,000 classes on a CPU
        optimizer.zero_grad()
        loss = loss_fn(centred @ weight.T + bias, labels) + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        weight, bias = weight.detach(), bias.detach() - weight.detach() @ mean
        loss = float(loss_fn(features @ weight.T + bias, labels))
    if not math.isfinite(loss):  # never the case with finite features; a zero head is then the safe start
        weight.zero_(), bias.zero_()
        loss = float(loss_fn(torch.zeros(len(labels), num_classes, device=features.device), labels))
    return Head(weight, bias, loss)


def fit_linear_probe(model: torch.nn.Module, loader, to_input, autocast, num_classes: int, loss_fn,
                     stop=None, multi_label: bool = False, measured: list[int] | None = None) -> ProbeFit:
    """Put a linear probe in `model`'s classifier, the same on every process; returns its training loss, its
    top-1 (%) on the images it was fitted on and on the rows `measured` of them (all by default), how many they were
    and the time it took. Interrupted by `stop` between batches and between LBFGS's evaluations."""
    started = time.monotonic()
    features, labels = features_of(model, loader, to_input, autocast, stop, multi_label)
    extracted = time.monotonic()
    log.info("Linear probe: fitting the classifier on %d features of %d images (logistic regression)",
             features.shape[1], len(labels))
    try:  # processes may take different numbers of LBFGS steps: each stops its own fit, then all stop together
        head = fit_head(features, labels, num_classes, loss_fn, distributed.own_request(stop))
    except Interrupted:
        head = None
    if stop or head is None:  # the agreed stop checked on every process first; it counts a fit stopped here
        raise Interrupted
    classifier = model.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(head.weight)
        classifier.bias.copy_(head.bias)
    distributed.broadcast_tensors([classifier.weight, classifier.bias])  # LBFGS may round apart on other GPUs
    with torch.no_grad():
        logits = classifier(features)
    top1 = top1_of(logits, labels)
    return ProbeFit(loss=head.loss, top1=top1,
                    measured_top1=top1 if measured is None else top1_of(logits[measured], labels[measured]),
                    images=len(labels), features=features.shape[1], extract_seconds=extracted - started,
                    fit_seconds=time.monotonic() - extracted)


def top1_of(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * float(hits(logits, labels)) / max(len(labels), 1)


@torch.no_grad()
def probe_top1(model: torch.nn.Module, loader, to_input, autocast, frozen_batchnorm: float = 1.0,
               dropout: bool = False, stop=None) -> float | None:
    """Top-1 (%) of `model` on `loader`'s images (over every process), in evaluation mode, or with BatchNorm
    normalising each batch by its own statistics in all but the share `frozen_batchnorm` of its layers nearest the
    classifier, or with dropout and drop-connect on, as a training step does; BatchNorm's running averages are left
    as they were. None if no batch had the two images BatchNorm on batch statistics needs."""
    saved = [buffer.clone() for buffer in model.buffers()]
    model.train(dropout)
    batch_statistics = set_batchnorm(model, frozen_batchnorm) > 0
    device = next(model.parameters()).device
    counts = torch.zeros(2, device=device)
    # The model's state is restored only by finishing: a stopped job saves nothing of it.
    for images, targets in distributed.stoppable(loader, stop):
        if len(targets) > 1 or not batch_statistics:
            with autocast():
                logits = model(to_input(images))
            counts[0] += hits(logits, targets.to(device))
            counts[1] += len(targets)
    for buffer, value in zip(model.buffers(), saved):
        buffer.copy_(value)
    model.eval()
    right, seen = distributed.sum_over_ranks(counts).tolist()
    return 100 * right / seen if seen else None


def share_of_images(images: int, rank: distributed.Rank, batched_as_training: bool = False) -> range:
    """The positions, among `images` images, of those this process takes: a share, each image in one process; or,
    batched as training, every one: a process's batches then hold batch_size images, as its training batches do,
    where a share would make them smaller (on 8 GPUs 128 images are one batch of 16 a process) and BatchNorm's
    statistics further from training's."""
    return range(images) if batched_as_training else range(rank.rank, images, rank.world_size)


def short_last_batch(images: int, batch_size: int) -> bool:
    """Whether `images` in batches of `batch_size` end in a batch under half of one, after a full one: its statistics
    are no training batch's (training drops its last batch; photos measured 3 of its 99 images in a batch of 3)."""
    return images > batch_size and 0 < images % batch_size < batch_size / 2


def batch_statistics_top1(model: torch.nn.Module, loaders, to_input, autocast, frozen_batchnorm: float,
                          stop=None) -> float | None:
    """probe_top1 with all but the share `frozen_batchnorm` of the BatchNorm layers on batch statistics: the mean
    over `loaders`, the same images each shuffled by a generator of its own (a loader's second pass would draw its
    order in one way with workers and another without). None as probe_top1."""
    top1 = [probe_top1(model, loader, to_input, autocast, frozen_batchnorm=frozen_batchnorm, stop=stop)
            for loader in loaders]
    return None if None in top1 else sum(top1) / len(top1)


def start(model: torch.nn.Module, channel, data_config: dict, recipe: Recipe, hp, *, workers: int,
          device: torch.device, to_input: ModelInput, autocast, loss_fn, rank: distributed.Rank, stop) -> ProbeStart:
    """Fit the classifier on the frozen features of (a capped sample of) the training images, seen as validation
    sees them, each process extracting a share; then, for the choices left to the job, score it on some of those
    images under each part of the recipe, as fine-tuning would apply it but at the evaluation size, that of the
    answers compared with (`recipe` is the one the model is set up with now).
    A stop is acted on at the next batch, in several processes at the same one (distributed.stoppable)."""
    classes = len(channel.classes)
    sample = probe_sample(channel.samples, classes, hp.seed)
    scored = [sample[i] for i in probe_sample([channel.samples[i] for i in sample], classes, hp.seed, MEASURED_IMAGES)]

    def shares_of(images: list[int], transform, side: int = decode_side(data_config, training=False),
                  orders: int = 1, batched_as_training: bool = False, **batching):
        """This process's share of `images` (share_of_images), one dataset, in `orders` loaders, each drawing from a
        seed of its own; made one at a time, as each starts its own workers. `batched_as_training`: also without a
        short last batch."""
        chosen = torch.utils.data.Subset(dataset_of(channel, transform, hp.max_unusable_fraction, workers, side),
                                         images)
        mine = torch.utils.data.Subset(chosen, share_of_images(len(images), rank, batched_as_training))
        drop_last = batched_as_training and short_last_batch(len(mine), hp.batch_size)
        for order in range(orders):
            yield data_loader(mine, workers, device, hp.seed + rank.rank + order * rank.world_size,
                              batch_size=hp.batch_size, drop_last=drop_last, **batching)

    def share_of(images: list[int], transform, side: int = decode_side(data_config, training=False), **batching):
        return next(shares_of(images, transform, side, **batching))

    log.info("Linear probe: the frozen features of %d training images", len(sample))
    row_of = {image: row for row, image in enumerate(sample)}
    fit = fit_linear_probe(model, share_of(sample, eval_transform(data_config)), to_input, autocast, classes,
                           loss_fn, stop, channel.multi_label, [row_of[image] for image in scored])

    def measure(view: Recipe, kind: str) -> float | None:
        stop_here(stop)
        with random_numbers_untouched(device):  # measuring must not change what training draws
            if kind == "batch_statistics":  # shuffled: a batch of one class has statistics no training batch has
                orders = shares_of(scored, eval_transform(data_config), orders=BATCH_ORDERS,
                                   batched_as_training=True, shuffle=True)
                return batch_statistics_top1(model, orders, to_input, autocast, view.freeze_batchnorm, stop)
            if kind == "regularisation":
                set_regularisation(model, view.drop, view.drop_connect)
                try:
                    return probe_top1(model, share_of(scored, eval_transform(data_config)), to_input, autocast,
                                      dropout=True, stop=stop)
                finally:
                    set_regularisation(model, recipe.drop, recipe.drop_connect)
            sized = at_evaluation_size(data_config)  # clean_top1's size: the part's effect, not the training size's
            return probe_top1(model, share_of(scored, train_transform(sized, view.aa, view.hflip, view.crop_scale),
                                              decode_side(sized, True, view.crop_scale)),
                              ModelInput(sized, device, view.reprob, hp.remode), autocast, stop=stop)

    log.info("Linear probe: measuring which parts of the training recipe keep its answers, on %d of its images",
             len(scored))
    return ProbeStart(fit, choose(hp, fit.measured_top1, measure, len(scored)))


@contextlib.contextmanager
def random_numbers_untouched(device: torch.device):
    """Python's, NumPy's and torch's generators as they were before, whatever the block draws (crops, RandAugment and
    dropout draw from them in this process, and in the loader's workers from their own)."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
