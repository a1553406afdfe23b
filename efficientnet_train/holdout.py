"""Validation images held out of `train` when a job has no `val` channel.

JumpStart's image classifier and AutoTrain do the same: a seeded, stratified share of each class, so a
buyer with one folder of labelled images still gets a measured, calibrated model and early stopping. The
held-out images are listed in the model's outputs (outputs.HELD_OUT_FILE), so the buyer knows which of
their images the reported accuracy was measured on.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace

from .channels import Channel
from .errors import JobError
from .untrusted import listed, shown

HELD_OUT_NAME = "val (held out of train)"


def hold_out(train: Channel, fraction: float, seed: int) -> tuple[Channel, Channel]:
    """`train` split into what trains and what validates: from each class, round(fraction x its images) chosen
    by `seed`, at least one, leaving at least one to train on. A class of one image cannot be split."""
    by_class: dict[int, list[str]] = {}  # a multi-label channel's images all in one group: held out at random
    for path, label in train.samples:
        by_class.setdefault(-1 if train.multi_label else label, []).append(path)
    labels = dict(train.samples)
    too_small = [f"{shown(_name(train, label), 80)} ({len(paths)})" for label, paths in sorted(by_class.items())
                 if len(paths) < 2]
    if too_small:
        raise JobError(f"No 'val' channel, so the job holds out {fraction:g} of each class of 'train' for "
                       f"validation, but {len(too_small)} class(es) have a single image, which cannot be both "
                       f"trained on and held out: {listed(too_small)}. Add images to those classes, or give a "
                       f"'val' channel with images of every class.")
    kept, held = [], []
    for label, paths in sorted(by_class.items()):
        chosen = sorted(paths)
        random.Random(f"{seed}:{_name(train, label)}").shuffle(chosen)  # each class's draw independent of others
        count = min(len(chosen) - 1, max(1, round(fraction * len(chosen))))
        held += [(path, labels[path]) for path in sorted(chosen[:count])]
        kept += [(path, labels[path]) for path in sorted(chosen[count:])]
    return (replace(train, samples=kept),
            Channel(HELD_OUT_NAME, train.root, list(train.classes), samples=held, multi_label=train.multi_label))


def _name(train: Channel, group: int) -> str:
    return "every image" if group == -1 else train.classes[group]


def held_out_rows(train: Channel, held: Channel) -> list[tuple[str, str]]:
    """(image path relative to the train channel, label) of each held-out image, for outputs.HELD_OUT_FILE."""
    return [(os.path.relpath(path, train.root), json.dumps([held.classes[one] for one in label], ensure_ascii=False)
             if held.multi_label else held.classes[label]) for path, label in held.samples]
