"""What fine-tuning trains with where the buyer leaves a choice to the job (the hyperparameters whose default is
`auto`): chosen after the linear probe, before the first update, from how the probe's classifier answers its own
training images under each part of the training recipe.

After the probe the classifier sits at its optimum on features taken in evaluation mode from the evaluation view.
Fine-tuning then trains on another view of the same images: BatchNorm on batch statistics, random crops, mirror
images, RandAugment, random erasing, dropout and drop-connect. Where one of these makes the classifier answer
wrongly, the first epoch's gradients come from wrong answers and undo what the probe found (docs/quality-log.md). So
each part is measured in turn, the probe's classifier scored on the part applied to a sample of its training
images, and one rule picks each: **the strongest setting under which the classifier still answers nine in ten of
the images it answers right** (KEEPS), nineteen in twenty for the mirror, which loses no pixel (LINES). Settings
are tried strongest first; the gentlest is taken without a measurement. Each part is measured on top of the ones
chosen before it, in the order the training step applies them: BatchNorm, mirroring, the crop, RandAugment, random
erasing, then dropout and drop-connect. The transforms are measured at the evaluation size, that of the answers
they are compared with, whatever training size BatchNorm's share sets.

A measurement on the ~128 images the classifier answers right has a sampling error of about 2.7 points at that
line (1.9 at the mirror's), so one image could flip a part from one setting to the next (BatchNorm's, whose
answers also depend on which images share a batch, is the mean over several batch orders: linear_probe.BATCH_ORDERS).
The rule degrades gracefully instead: each measured setting gets the chance, given that error, that it keeps its
line on the whole set (`keeps_chance`), and a part whose setting is a number takes each step from the gentlest
setting toward the strongest by the chance that the step's stronger end keeps them (`blended_setting`). Far from
the line that is the rule's choice; on it, halfway. BatchNorm's setting is the share of its layers frozen, those
nearest the classifier first: their batch statistics change the probe's answers far more than the first layers' do
(docs/quality-log.md). The crops chosen are reached at the end of the rate's warmup: they grow to them from
evaluation's view (data.GrowingCrop).

The optimiser and its rate are not measured: fine-tuning from a fitted classifier needs steps that shrink with the
gradient (sgd, with clip_grad's adaptive clipping), not rmsproptf's steps of about lr whatever the gradient; and the
rate goes with the optimiser, as one choice: sgd with adaptive clipping at four times the listing's rate (better on
every panel set than at the listing's), any other optimiser or unclipped sgd at the listing's (docs/quality-log.md has
the runs).

The record of the measurements and choices is args.yml's `linear_probe`, kept in the checkpoint: a resumed job
takes the same recipe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

from .hyperparameters import AUTO, frozen_batchnorm_share

KEEPS = 0.9
# The mirror loses no pixel: an answer it changes is one whose class depends on the way the image faces (a digit, a
# letter), so it is held to one in twenty. The panel's photo sets keep 99.2 to 100% of their answers mirrored, the
# digits about 88 to 91% (the demo's 72%): any line from 93% to 98% mirrors the first and not the second
# (docs/defaults.md).
LINES = {"hflip": 0.95}
AUTO_OPT = "sgd"
LISTING_LR = 0.016  # per 256 images
CLIPPED_SGD_LR = 0.064  # lr=auto for sgd with adaptive clipping: the rate its panel runs were best at
# Each part: its hyperparameters, their settings strongest first (the first the listing's), and what measures them,
# in the order they are chosen.
PARTS = (
    # The share of BatchNorm layers frozen (those nearest the classifier first): all, the probe's own view of the
    # images. Shares between are the blend's, near the line: measured ones moved the choice toward batch statistics,
    # quarters for no better model, all but the first tenth for a worse one on stamps (docs/quality-log.md).
    (("freeze_batchnorm",), ((0.0,), (1.0,)), "batch_statistics"),
    (("hflip",), ((0.5,), (0.0,)), "transform"),
    (("crop_scale",), ((0.25,), (0.5,)), "transform"),  # never off: the panel trained better on half crops
    (("aa",), (("rand-m9-mstd0.5",), ("rand-m5-mstd0.5",), ("none",)), "transform"),
    (("reprob",), ((0.2,), (0.0,)), "transform"),
    (("drop", "drop_connect"), ((0.3, 0.2), (0.15, 0.1), (0.0, 0.0)), "regularisation"),
)
LISTING = {name: settings[0][i] for names, settings, _ in PARTS for i, name in enumerate(names)}
# RandAugment's settings as points that blend: (magnitude, chance of each op); none applies no op.
AA_POINTS = {"rand-m9-mstd0.5": (9.0, 0.5), "rand-m5-mstd0.5": (5.0, 0.5), "none": (5.0, 0.0)}
SURE = 0.99  # a setting this likely to keep the answers ends its part's measurements; the gentler ones count as sure
# A part measured at another setting than the one its chance is for, and how the log says so: the mirror on every
# image, where mirroring half of them would show half of what it does to the answers.
MEASURED_AT = {("hflip",): ((1.0,), "with every image mirrored, for")}


@dataclass(frozen=True)
class Recipe:
    freeze_batchnorm: float  # the share of BatchNorm layers frozen, those nearest the classifier (model.set_batchnorm)
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
        if name == "freeze_batchnorm":
            return chosen[name] if asked == AUTO else frozen_batchnorm_share(asked)
        return chosen[name] if asked == AUTO else asked

    opt = value("opt")
    lr = auto_lr(hp, opt) if hp.lr == AUTO else hp.lr
    return Recipe(**{name: value(name) for name in Recipe.__dataclass_fields__ if name not in ("opt", "lr")},
                  opt=opt, lr=lr)


def probe_record_read(record: dict | None) -> dict | None:
    """A checkpoint's linear-probe record as this version writes it: before BatchNorm's shares, its choice and its
    measurements said freeze_batchnorm true or false, the shares 1.0 and 0.0 now (so that args.yml says what the
    job trains with). A copy: the checkpoint's own record is left as it was."""
    if not record:
        return record

    def share(value):
        return float(value) if isinstance(value, bool) else value

    record = dict(record)
    if "freeze_batchnorm" in record.get("recipe", {}):
        record["recipe"] = {**record["recipe"], "freeze_batchnorm": share(record["recipe"]["freeze_batchnorm"])}
    if "measured" in record:
        record["measured"] = [{**step, "setting": share(step.get("setting"))}
                              if step.get("part") == "freeze_batchnorm" else step for step in record["measured"]]
    return record


def auto_lr(hp, opt: str) -> float:
    """lr=auto: the rate measured for this optimiser fine-tuning from the probe. Adaptive clipping bounds sgd's steps
    by each unit's weights, so it takes a higher rate; rmsproptf's steps are about lr whatever the gradient, and
    unclipped sgd diverges even at the listing's rate, so those keep the listing's."""
    clipped = hp.clip_mode == "agc" and hp.clip_grad > 0
    return CLIPPED_SGD_LR if opt == AUTO_OPT and clipped else LISTING_LR


def choose(hp, clean_top1: float, measure: Measure, images: int) -> dict:
    """Measure each part left to auto, strongest setting first, until one is SURE to keep its line (line_of) of the
    answers the probe's classifier gives right (`clean_top1`, its top-1 as fitted on the `images` of its training
    images that each part is measured on); then blend the part's settings by those chances (`blended_setting`). A
    part with a value set by hand takes it (and the listing's for the rest of the part). Returns the record: every
    measurement made, and the settings chosen (`recipe`, for recipe_for)."""
    asked = recipe_for(hp)
    answered = max(1, round(images * clean_top1 / 100))  # the images the measured share is a share of
    # Each part measured on top of those chosen before it, the later ones off: clean images, no dropout.
    view = replace(asked, hflip=0.0, crop_scale=1.0, aa="none", reprob=0.0, drop=0.0, drop_connect=0.0)
    steps = []
    for names, settings, kind in PARTS:
        if any(getattr(hp, name) != AUTO for name in names):
            view = replace(view, **{name: getattr(asked, name) for name in names})
            continue
        chances = []
        for setting in settings[:-1]:  # the gentlest is never measured
            measured_as = MEASURED_AT.get(names, (setting,))[0]
            top1 = measure(replace(view, **dict(zip(names, measured_as))), kind)
            if top1 is None:  # not measurable: the listing's setting, as before the rule
                chance = None
            elif clean_top1 > 0:
                chance = keeps_chance(top1 / clean_top1, answered, line_of(names))
            else:  # the classifier answers nothing right: nothing to lose
                chance = 1.0
            steps.append({"part": "+".join(names), "setting": list(setting) if len(setting) > 1 else setting[0],
                          "acc_1": top1, "keeps_chance": None if chance is None else round(chance, 3)})
            chances.append(1.0 if chance is None else chance)
            if chances[-1] >= SURE:
                break
        view = replace(view, **dict(zip(names, blended_setting(settings, chances))))
    return {"measured_images_acc_1": clean_top1, "measured_images": images, "measured": steps,
            "recipe": {name: getattr(view, name) for name in asdict(view) if getattr(hp, name) == AUTO}}


def line_of(names: tuple) -> float:
    """The share of the right answers a part must keep: KEEPS, or the part's own line in LINES."""
    return LINES.get("+".join(names), KEEPS)


def keeps_chance(kept: float, answered: int, line: float = KEEPS) -> float:
    """The chance that a setting under which the classifier still answers the share `kept` of the `answered` images
    it answers right keeps `line` of them on the whole set: the normal approximation to that share's sampling error.
    On a few dozen images even a share of 1 leaves some doubt, and a small set trains a little gentler."""
    standard_error = math.sqrt(line * (1 - line) / answered)
    return 0.5 * (1 + math.erf((kept - line) / (standard_error * math.sqrt(2))))


def blended_setting(settings: tuple, chances: list[float]) -> tuple:
    """A part's setting from the chances that its settings, strongest first, keep the answers (those not measured,
    gentler than a SURE one, count as 1): from the gentlest, each step toward the strongest is taken by the chance
    that its stronger end keeps them. A gentler setting keeps at least what a stronger one keeps, so each chance is
    raised to the largest of those stronger than it. Where every chance is near 0 or 1 this is the rule's choice;
    a measurement on the line puts the part halfway along that step, and one image moves it a little."""
    chances = list(chances) + [1.0] * (len(settings) - 1 - len(chances))
    points = [_point(setting) for setting in settings]
    blend = points[-1]
    for i in reversed(range(len(chances))):
        taken = max(chances[:i + 1])
        blend = [b + taken * (stronger - gentler) for b, stronger, gentler in zip(blend, points[i], points[i + 1])]
    if isinstance(settings[0][0], str):
        return (_rand_augment(*blend),)
    return tuple(round(value, 2) for value in blend)


def _point(setting: tuple) -> list[float]:
    """A setting as numbers that blend: its own, or RandAugment's (magnitude, chance of each op)."""
    return [coordinate for value in setting
            for coordinate in (AA_POINTS[value] if isinstance(value, str) else (value,))]


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
        if not all(name in record["recipe"] for name in names):  # a name set by hand: the part was not measured
            continue
        part = "+".join(names)
        tried = [step for step in record["measured"] if step["part"] == part]
        chosen = ", ".join(f"{name}={_shown(record['recipe'][name])}" for name in names)
        seen = ", ".join(f"{'-' if step['acc_1'] is None else format(step['acc_1'], '.1f')}% "
                         f"{MEASURED_AT.get(names, (None, 'at'))[1]} {part}={_shown(step['setting'])}"
                         + _chance_shown(step['keeps_chance']) for step in tried)
        how = (f"the strongest setting keeping {line_of(names):.0%} of that, blended with the gentler ones by each "
               f"one's chance of keeping it")
        lines.append(f"{chosen}: of {record['measured_images']} of its training images, the probe's classifier "
                     f"answers {seen or 'nothing measured'} right {VIEWS[kind]}, against "
                     f"{record['measured_images_acc_1']:.1f}% as fitted; chosen: {how} (sampling error of "
                     f"{record['measured_images']} images)")
    return lines


VIEWS = {"batch_statistics": "(the share of BatchNorm layers nearest the classifier frozen, the others on each batch's "
                             "statistics; the mean over several batch orders)",
         "transform": "through the training transform",
         "regularisation": "with dropout and drop-connect on"}


def _chance_shown(chance: float | None) -> str:
    return " (chance -)" if chance is None else f" (chance {chance:.0%})"


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def mirrors_at_evaluation(hp, recipe: Recipe) -> bool:
    """Whether eval_hflip may average with the mirror image: wherever training mirrors, with hflip set by hand; with
    auto, where it mirrors at least half as often as the listing, as it does (up to rounding) where mirroring's
    measurement is more likely than not to keep the answers."""
    return recipe.hflip > 0 if hp.hflip != AUTO else recipe.hflip >= LISTING["hflip"] / 2


def training_size_config(data_config: dict, recipe: Recipe) -> dict:
    """`data_config` with the size this recipe trains at: the evaluation size with any BatchNorm layer frozen (a
    share above 0; their statistics are the evaluation view's: docs/quality-log.md), else the training size it has."""
    return data_config if recipe.freeze_batchnorm == 0 else at_evaluation_size(data_config)


def at_evaluation_size(data_config: dict) -> dict:
    """`data_config` training at its evaluation size."""
    return {**data_config, "train_input_size": list(data_config["input_size"])}
