"""What fine-tuning trains with where the buyer leaves a choice to the job (the hyperparameters whose default is
`auto`): chosen after the linear probe, before the first update, from how the probe's classifier answers its own
training images under each part of the training recipe.

After the probe the classifier sits at its optimum on features taken in evaluation mode from the evaluation view.
Fine-tuning then trains on another view of the same images: BatchNorm on batch statistics, random crops, mirror
images, RandAugment, random erasing, dropout and drop-connect. Where one of these makes the classifier answer
wrongly, the first epoch's gradients come from wrong answers and undo what the probe found (docs/quality.md). So
each part is measured in turn, the probe's classifier scored on the part applied
to a sample of its training images, and one rule picks each: **the strongest setting under which the classifier
still answers nine in ten of the images it answers right** (KEEPS). Settings are tried strongest first; the
gentlest is taken without a measurement. Each part is measured on top of the ones chosen before it, in the order
the training step applies them: BatchNorm (it fixes the training size), mirroring, the crop, RandAugment, random
erasing, then dropout and drop-connect.

A measurement on ~128 images has a sampling error of about 2.7 points at that line, so one image could flip a
choice between settings. The rule degrades gracefully instead: a part whose setting is a number moves from the
rule's choice toward each neighbour by the chance, given that error, that the measurement fell on the wrong side
of the line (`keeps_chance`). Far from the line that is the rule's choice; on the line, halfway. BatchNorm, on or
off, has no halfway.

The optimiser and its rate are not measured: fine-tuning from a fitted classifier needs steps that shrink with the
gradient (sgd, with clip_grad's adaptive clipping), not rmsproptf's steps of about lr whatever the gradient; and the
rate goes with the optimiser, as one choice: sgd with adaptive clipping at four times the listing's rate (better on
every panel set than at the listing's), any other optimiser or unclipped sgd at the listing's (docs/quality.md has
the runs).

The record of the measurements and choices is args.yml's `linear_probe`, kept in the checkpoint: a resumed job
takes the same recipe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

from .hyperparameters import AUTO

KEEPS = 0.9
AUTO_OPT = "sgd"
LISTING_LR = 0.016  # per 256 images
CLIPPED_SGD_LR = 0.064  # lr=auto for sgd with adaptive clipping: the rate its panel runs were best at
# Each part: its hyperparameters, their settings strongest first (the first the listing's), and what measures them,
# in the order they are chosen.
PARTS = (
    (("freeze_batchnorm",), ((False,), (True,)), "batch_statistics"),  # frozen: the probe's own view of the images
    (("hflip",), ((0.5,), (0.0,)), "transform"),
    (("crop_scale",), ((0.25,), (0.5,)), "transform"),  # never off: the panel trained better on half crops
    (("aa",), (("rand-m9-mstd0.5",), ("rand-m5-mstd0.5",), ("none",)), "transform"),
    (("reprob",), ((0.2,), (0.0,)), "transform"),
    (("drop", "drop_connect"), ((0.3, 0.2), (0.15, 0.1), (0.0, 0.0)), "regularisation"),
)
LISTING = {name: settings[0][i] for names, settings, _ in PARTS for i, name in enumerate(names)}
# RandAugment's settings as points that blend: (magnitude, chance of each op); none applies no op.
AA_POINTS = {"rand-m9-mstd0.5": (9.0, 0.5), "rand-m5-mstd0.5": (5.0, 0.5), "none": (5.0, 0.0)}


@dataclass(frozen=True)
class Recipe:
    freeze_batchnorm: bool
    opt: str
    lr: float  # per 256 images; train.py scales it to the real batch
    hflip: float
    crop_scale: float
    aa: str
    reprob: float
    drop: float
    drop_connect: float

    def record(self) -> dict:
        """For args.yml: what the job trained with, whatever was asked (effective_lr is the scaled rate)."""
        return {f"effective_{name}" if name != "lr" else "lr_per_256": value for name, value in asdict(self).items()}


# A measurement: the probe's top-1 (%) on its training images seen through `view` ("batch_statistics": clean images
# on each batch's statistics; "transform": the view's training transform; "regularisation": clean images with the
# view's dropout and drop-connect), or None where it could not be measured.
Measure = Callable[[Recipe, str], "float | None"]


def recipe_for(hp, chosen: dict | None = None) -> Recipe:
    """The recipe `hp` asks for: its explicit values, and for what is left to auto the settings `chosen` records
    (the `recipe` of args.yml's `linear_probe`), or before the probe (or without one) the listing's."""
    chosen = {**LISTING, "opt": AUTO_OPT, **(chosen or {})}

    def value(name: str):
        asked = getattr(hp, name)
        if asked == AUTO:
            return chosen[name]
        return asked == "true" if name == "freeze_batchnorm" else asked

    opt = value("opt")
    lr = auto_lr(hp, opt) if hp.lr == AUTO else hp.lr
    return Recipe(**{name: value(name) for name in Recipe.__dataclass_fields__ if name not in ("opt", "lr")},
                  opt=opt, lr=lr)


def auto_lr(hp, opt: str) -> float:
    """lr=auto: the rate measured for this optimiser fine-tuning from the probe. Adaptive clipping bounds sgd's steps
    by each unit's weights, so it takes a higher rate; rmsproptf's steps are about lr whatever the gradient, and
    unclipped sgd diverges even at the listing's rate, so those keep the listing's."""
    clipped = hp.clip_mode == "agc" and hp.clip_grad > 0
    return CLIPPED_SGD_LR if opt == AUTO_OPT and clipped else LISTING_LR


def choose(hp, clean_top1: float, measure: Measure, images: int) -> dict:
    """Measure each part left to auto, strongest setting first, up to the first under which the probe's classifier
    answers KEEPS of what it answers right on the `images` clean ones (`clean_top1`), and blend the settings around
    that choice by the chance that each measured setting keeps them (`graceful`); a part with a value set by hand
    takes it (and the listing's for the rest of the part). Returns the record: every measurement made, and the
    settings chosen (`recipe`, for recipe_for)."""
    asked = recipe_for(hp)
    answered = max(1, round(images * clean_top1 / 100))
    # Each part measured on top of those chosen before it, the later ones off: clean images, no dropout.
    view = replace(asked, hflip=0.0, crop_scale=1.0, aa="none", reprob=0.0, drop=0.0, drop_connect=0.0)
    steps = []
    for names, settings, kind in PARTS:
        if any(getattr(hp, name) != AUTO for name in names):
            view = replace(view, **{name: getattr(asked, name) for name in names})
            continue
        chances = []
        for setting in settings[:-1]:  # the gentlest is taken unmeasured where no stronger one keeps the answers
            measured_as = (1.0,) if names == ("hflip",) else setting  # mirroring measured on every image
            top1 = measure(replace(view, **dict(zip(names, measured_as))), kind)
            chances.append(1.0 if top1 is None else keeps_chance(top1 / clean_top1, answered))
            steps.append({"part": "+".join(names), "setting": list(setting) if len(setting) > 1 else setting[0],
                          "acc_1": top1, "keeps_chance": round(chances[-1], 3)})
            if chances[-1] >= 0.5:
                break
        view = replace(view, **dict(zip(names, graceful(settings, chances))))
    return {"training_images_acc_1": clean_top1, "measured_images": images, "measured": steps,
            "recipe": {name: getattr(view, name) for name in asdict(view) if getattr(hp, name) == AUTO}}


def keeps_chance(kept: float, answered: int) -> float:
    """The chance that a setting under which the classifier still answers the share `kept` of the `answered` images
    it answers right keeps KEEPS of them on the whole set: the normal approximation to that share's sampling error."""
    error = math.sqrt(KEEPS * (1 - KEEPS) / answered)
    return 0.5 * (1 + math.erf((kept - KEEPS) / (error * math.sqrt(2))))


def graceful(settings: tuple, chances: list[float]) -> tuple:
    """A part's setting from the chances its measured settings (strongest first) keep the answers: the rule's
    choice, the first whose chance is at least even (else the gentlest), moved toward the stronger setting before it
    by that one's chance, and toward the gentler one after it by its own chance of not keeping them. A measurement
    on the line gives the midpoint from either side, so one image moves a setting a little, never across a step.
    BatchNorm, true or false, is the rule's choice."""
    chosen = len(chances) - 1 if chances and chances[-1] >= 0.5 else len(settings) - 1
    if isinstance(settings[0][0], bool):
        return settings[chosen]
    points = [[coordinate for value in setting for coordinate in AA_POINTS.get(value, (value,))]
              for setting in settings]
    blend = list(points[chosen])
    if chosen > 0:
        blend = [b + chances[chosen - 1] * (stronger - p) for b, stronger, p in zip(blend, points[chosen - 1],
                                                                                      points[chosen])]
    if chosen < len(chances):
        blend = [b + (1 - chances[chosen]) * (gentler - p) for b, gentler, p in zip(blend, points[chosen + 1],
                                                                                     points[chosen])]
    if isinstance(settings[0][0], str):
        return (_rand_augment(*blend),)
    return tuple(round(value, 2) for value in blend)


def _rand_augment(magnitude: float, chance: float) -> str:
    """timm's RandAugment text for a blended point of AA_POINTS (each op's chance is timm's `p`, 0.5 unwritten)."""
    chance = round(chance, 2)
    if chance == 0:
        return "none"
    text = f"rand-m{round(magnitude)}-mstd0.5"
    return text if chance == 0.5 else f"{text}-p{chance:g}"


def decisions(record: dict) -> list[str]:
    """One line for each part the probe's measurements chose, with what was measured, for the log."""
    lines = []
    for names, _, kind in PARTS:
        if names[0] not in record["recipe"]:
            continue
        part = "+".join(names)
        tried = [step for step in record["measured"] if step["part"] == part]
        chosen = ", ".join(f"{name}={_shown(record['recipe'][name])}" for name in names)
        seen = ", ".join(f"{'-' if step['acc_1'] is None else format(step['acc_1'], '.1f')}% at {part}="
                         f"{_shown(step['setting'])}"
                         + (f" (chance {step['keeps_chance']:.0%})" if "keeps_chance" in step else "") for step in tried)
        images = f", {record['measured_images']} images" if "measured_images" in record else ""
        lines.append(f"{chosen}: the probe's classifier answers {seen or 'nothing measured'} of its training images "
                     f"right {VIEWS[kind]}, against {record['training_images_acc_1']:.1f}% as fitted; chosen: the "
                     f"strongest setting keeping {KEEPS:.0%} of that, blended with its neighbours by each one's "
                     f"chance of keeping it (sampling error{images})")
    return lines


VIEWS = {"batch_statistics": "(false: on each batch's statistics)", "transform": "through the training transform",
         "regularisation": "with dropout and drop-connect on"}


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def mirrors_at_evaluation(recipe: Recipe) -> bool:
    """Whether eval_hflip averages with the mirror image: where training mirrors at least half as often as the
    listing, which auto does exactly where mirroring's measurement keeps the answers more likely than not."""
    return recipe.hflip >= LISTING["hflip"] / 2


def training_size_config(data_config: dict, recipe: Recipe) -> dict:
    """`data_config` with the size this recipe trains at: the evaluation size with frozen BatchNorm (its statistics
    are the evaluation view's; docs/quality.md), else the training size it has."""
    if not recipe.freeze_batchnorm:
        return data_config
    return {**data_config, "train_input_size": list(data_config["input_size"])}
