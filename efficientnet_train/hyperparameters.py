"""The one schema of hyperparameters.

It drives parsing and validation of `hyperparameters.json`, the README table
(`python -m efficientnet_train.hyperparameters --markdown`) and the
`SupportedHyperParameters` of `container/algorithm-spec.json`, so the three never disagree.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from .errors import JobError
from .untrusted import shown

# SageMaker's tuner adds `_tuning_objective_metric`; the SDK's estimators add `sagemaker_*`.
IGNORED_PREFIXES = ("_", "sagemaker_")
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "on", "1"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "off", "0"})
LR_REFERENCE_BATCH = 256
LR_EXHAUSTED = 1e-3  # early stopping ends a run whose learning rate fell below this share of its peak
# For the schedule, warmup and early stopping, an epoch of a small set lasts at least this many updates
# (optimisation.schedule_epoch_updates says why).
MIN_SCHEDULE_EPOCH_UPDATES = 50
MAX_ECHOED = 60  # characters of a bad name or value that an error repeats
AUTO = "auto"  # the default of a number the job chooses itself (recipe.py): any number in range sets it by hand
SMALL_SET_EPOCH = f"on small sets an epoch counts as at least {MIN_SCHEDULE_EPOCH_UPDATES} updates here"


def measured(share: str = "nine in ten") -> str:
    """How an auto part of the training recipe is chosen (recipe.py), in the words of the table: `share` is the
    part's line."""
    return (f"chosen after the linear probe: the strongest setting under which the probe's classifier still answers "
            f"{share} of the training images it answers right, blended with the gentler settings where a measurement "
            f"is too near that line to decide")


MEASURED = measured()


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    kind: type  # int, float, bool or str
    default: Any
    help: str
    # Inclusive, as SageMaker's ranges are; the default is allowed outside them (img_size's 0 = the model's own).
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    # An extra check for values whose rules live in timm: returns an error text or None.
    check: Callable[[Any], str | None] | None = None
    allowed_text: str | None = None  # how the extra check's rule reads in a table
    canonical: Callable[[Any], Any] | None = None  # one spelling of a checked value, as a resumed job compares it
    tunable: bool = False

    @property
    def allowed(self) -> str:
        """What values are accepted, in words a buyer reads in an error message."""
        if self.allowed_text:
            return self.allowed_text
        if self.default == AUTO and self.kind in (int, float):
            return "auto, or " + Hyperparameter(self.name, self.kind, 0, "", self.minimum, self.maximum).allowed
        if self.kind is bool:
            return "auto, true or false" if self.default == AUTO else "true or false"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        kind = "an integer" if self.kind is int else "a number"
        if self.minimum is None and self.maximum is None:
            return kind
        if None not in (self.minimum, self.maximum):
            return f"{kind} from {format_value(self.minimum)} to {format_value(self.maximum)}"
        low = "" if self.minimum is None else f">= {format_value(self.minimum)}"
        high = "" if self.maximum is None else f"<= {format_value(self.maximum)}"
        return f"{kind} {' and '.join(part for part in (low, high) if part)}"

    def parse(self, raw: Any) -> Any:
        """Turn one raw value (normally a string) into a checked value, or raise ValueError."""
        raw = _unwrap_json_string(raw)
        if self.default == AUTO and isinstance(raw, str) and raw.strip().lower() == AUTO:
            return AUTO
        value = _convert(self.kind, raw)
        if self.choices:
            # timm's names are lower-case; AdamW is adamw, not "did you mean adam?"
            value = next((choice for choice in self.choices if choice.lower() == value.lower()), value)
            if value not in self.choices:
                close = difflib.get_close_matches(str(value), self.choices, n=1, cutoff=0.6)
                raise ValueError("not one of the choices" + (f"; did you mean {close[0]}?" if close else ""))
        if self.kind in (int, float) and value != self.default:
            if (self.minimum is not None and value < self.minimum) or (
                    self.maximum is not None and value > self.maximum):
                raise ValueError("out of range")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ValueError(problem)
        return value if self.canonical is None else self.canonical(value)


def format_value(value: Any) -> str:
    """A value as hyperparameters.json spells it: plain decimals, lower-case booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if "e" not in repr(value) else f"{value:.10f}".rstrip("0")
    return str(value)


def _unwrap_json_string(raw: Any) -> Any:
    # The SDK's framework estimators JSON-encode values once more ("\"sgd\"").
    if isinstance(raw, str) and len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw


def _convert(kind: type, raw: Any) -> Any:
    text = raw.strip() if isinstance(raw, str) else raw
    if kind is bool:
        if isinstance(text, bool):
            return text
        word = str(text).lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError("not true or false")
    if kind is int:
        if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
            raise ValueError("not an integer")  # int(2.5) would be a silent 2
        try:
            return int(text)
        except (TypeError, ValueError):
            pass
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise ValueError("not an integer") from None
        if not number.is_integer():
            raise ValueError("not an integer")
        return int(number)
    if kind is float:
        if isinstance(text, bool):
            raise ValueError("not a number")
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise ValueError("not a number") from None
        if not math.isfinite(number):
            raise ValueError("not a finite number")
        return number
    if isinstance(text, (dict, list)):
        raise ValueError("not a string")
    return "" if text is None else str(text)


# ---- rules that belong to timm ------------------------------------------------------


@lru_cache(maxsize=1)
def efficientnet_models() -> tuple[str, ...]:
    import timm

    return tuple(name for name in timm.list_models(module="efficientnet") if "efficientnet" in name)


def shipped_weights() -> list[str]:
    """The timm models whose pretrained weights are in this image's Hugging Face cache (the image's build bakes
    them in: PRETRAINED_MODELS), with their weights' tag: efficientnet_b3.ra2_in1k."""
    try:
        from huggingface_hub import scan_cache_dir

        return sorted(repo.repo_id.removeprefix("timm/") for repo in scan_cache_dir().repos
                      if repo.repo_type == "model" and repo.repo_id.startswith("timm/"))
    except Exception:  # noqa: BLE001 - no cache at all is the common case here
        return []


def _check_model(name: str) -> str | None:
    if name in efficientnet_models():
        return None
    close = difflib.get_close_matches(name, efficientnet_models(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"not a timm EfficientNet model{hint}"


def _check_auto_augment(policy: str) -> str | None:
    if policy.lower() in ("", "none", "auto"):
        return None
    family, *sections = policy.split("-")
    if family in ("rand", "augmix"):
        # timm skips a section it cannot read, so a typo would silently change the augmentation.
        unreadable = [s for s in sections if not re.fullmatch(r"[a-z]+[0-9][0-9.]*", s)
                      and not (family == "rand" and s.startswith("t"))]
        if unreadable:
            return (f"timm would ignore the part(s) {', '.join(unreadable)} of this policy; each part is a "
                    f"letter code and a number, as in rand-m9-mstd0.5 or rand-m7-n3")
    from timm.data import create_transform

    try:  # timm's own parser decides what a policy string may say
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception as exc:  # noqa: BLE001 - any failure means timm cannot use this policy
        return f"timm cannot parse this augmentation policy ({exc})"
    return None


def frozen_batchnorm_share(value: str) -> float:
    """freeze_batchnorm's value set by hand as the share of BatchNorm layers frozen: true 1, false 0, or a number
    from 0 to 1 (what auto may choose); ValueError for anything else."""
    word = value.strip().lower()
    share = 1.0 if word in TRUE_WORDS else 0.0 if word in FALSE_WORDS else float(word)
    if not 0 <= share <= 1:  # also refuses nan
        raise ValueError(value)
    return share


def _check_freeze_batchnorm(value: str) -> str | None:
    try:
        _canonical_freeze_batchnorm(value)
    except ValueError:
        return "not auto, true, false or a number from 0 to 1"
    return None


def _canonical_freeze_batchnorm(value: str) -> str:
    """auto, true (a share of 1), false (0) or the share as a plain decimal: True, 1 and 1.0 are one setting."""
    if value.strip().lower() == AUTO:
        return AUTO
    share = frozen_batchnorm_share(value)
    return format_value(share == 1) if share in (0, 1) else format_value(share)


NO_PRETRAINED = "none"  # pretrained_path's value for random weights: training from scratch
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar", ".safetensors")


def _check_pretrained_path(path: str) -> str | None:
    if path and path.lower() != NO_PRETRAINED and not path.lower().endswith(WEIGHTS_SUFFIXES):
        return "not a weights file name"
    return None


# SageMaker checks values against the spec's range, which cannot hold the 0 that hyperparameters.json may say.
IMG_SIZE_ALLOWED = "an integer from 32 to 1024; unset (or 0, outside SageMaker) = automatic"

# Common timm optimizers; CreateAlgorithm allows at most 30 categorical values.
OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "rmsproptf", "adam", "adamw", "nadam", "nadamw",
              "radam", "adamp", "sgdp", "lamb", "lars", "adabelief", "adafactor", "lion", "madgrad",
              "novograd", "laprop", "adopt")

SCHEMA: tuple[Hyperparameter, ...] = (
    # -- the listing's hyperparameters, with its names and defaults
    Hyperparameter("epochs", int, 250, "Number of epochs to train.", minimum=1, maximum=10000, tunable=True),
    Hyperparameter("batch_size", int, 32, "Images per training step on each device (GPU, or the CPU); a smaller "
                   "training set trains with batches of its whole size, with a warning.",
                   minimum=2, maximum=4096, tunable=True),  # BatchNorm can't train on one image
    Hyperparameter("aa", str, "auto",
                   "Augmentation policy (timm's auto_augment): v0, original, a RandAugment string such as "
                   "rand-m9-mstd0.5, or none. auto = rand-m9-mstd0.5 (the listing's), rand-m5-mstd0.5, none, or "
                   f"between (a magnitude from 5 to 9, each op's chance p under 0.5), {MEASURED}.",
                   # Not tunable: a tuning job can only search ranges and category lists, not free text.
                   check=_check_auto_augment,
                   allowed_text="auto, none, v0, original, or a timm RandAugment string"),
    Hyperparameter("decay_epochs", float, 2.4,
                   f"Epochs between learning-rate decays (step schedule); {SMALL_SET_EPOCH}.",
                   minimum=0.01, maximum=10000, tunable=True),
    Hyperparameter("decay_rate", float, 0.1, "Factor the learning rate is multiplied by at each decay.",
                   minimum=0.001, maximum=1, tunable=True),
    Hyperparameter("drop", float, AUTO,
                   f"Dropout rate before the classifier. auto = 0.3 (the listing's), 0.15, 0 or between, with "
                   f"drop_connect's 0.2, 0.1, 0 or between: {MEASURED}.", minimum=0, maximum=0.95, tunable=True),
    Hyperparameter("drop_connect", float, AUTO,
                   "Drop-connect (stochastic depth) rate; timm's drop_path_rate. auto: chosen with drop.",
                   minimum=0, maximum=0.95, tunable=True),
    Hyperparameter("lr", float, AUTO,
                   f"Learning rate for a global batch of {LR_REFERENCE_BATCH} images; the job scales it linearly to "
                   f"the real global batch (lr x batch_size x devices / {LR_REFERENCE_BATCH}). auto = 0.064 for sgd "
                   "with adaptive clipping (opt=auto's, clip_mode=agc), else the listing's 0.016.",
                   minimum=0.000001, maximum=10, tunable=True),
    Hyperparameter("model_ema", bool, True,
                   "Keep an exponential moving average (EMA) of the weights; the best of the EMA and the "
                   "raw weights is kept."),
    Hyperparameter("model_ema_decay", float, 0.9999,
                   "Decay of the weights' moving average. Until it is reached, the average is the plain mean of the "
                   "starting weights and of every update since (the decay after n updates is n/(n+1)).",
                   minimum=0, maximum=0.99999, tunable=True),
    Hyperparameter("opt", str, "auto",
                   "Optimizer (timm's names). auto = sgd (Nesterov momentum), whose steps shrink with the gradient "
                   "as fine-tuning refines the linear probe's classifier; the listing's rmsproptf moves every weight "
                   "by about lr a step, which undoes the probe in the first epoch.",
                   choices=("auto",) + OPTIMIZERS, tunable=True),
    Hyperparameter("opt_eps", float, 0.001, "Optimizer epsilon.", minimum=0.0000000001, maximum=1, tunable=True),
    Hyperparameter("remode", str, "pixel", "Random-erasing fill mode.", choices=("const", "rand", "pixel"),
                   tunable=True),
    Hyperparameter("reprob", float, AUTO,
                   f"Random-erasing probability. auto = 0.2 (the listing's), 0 or between, {MEASURED}.",
                   minimum=0, maximum=1, tunable=True),
    # Not timm's plateau: it only steps on epochs (a whole first epoch at warmup_lr), its patience outlasts early
    # stopping's, and its state is not in timm's checkpoints.
    Hyperparameter("sched", str, "step", "Learning-rate schedule (timm's names), stepped every update.",
                   choices=("step", "cosine", "tanh", "poly"), tunable=True),
    Hyperparameter("workers", int, -1,
                   "Data-loading worker processes per GPU; -1 = every CPU core but one per GPU (the listing's 1 "
                   "starves a GPU); 0 loads in the training process.", minimum=-1, maximum=128),
    Hyperparameter("warmup_lr", float, 0.000001, "Learning rate at the start of the warmup.",
                   minimum=0, maximum=10, tunable=True),
    Hyperparameter("weight_decay", float, 0.00001, "Weight decay.", minimum=0, maximum=1, tunable=True),
    # -- what a fine-tuning product needs besides
    Hyperparameter("model", str, "efficientnet_b3", "timm EfficientNet model name.", check=_check_model,
                   allowed_text="a timm EfficientNet name (efficientnet_b0..b8, tf_efficientnet_lite0..4, "
                                "efficientnetv2_s, ...)"),
    Hyperparameter("pretrained_path", str, "",
                   "Local ImageNet weights in timm format (.pth or .safetensors), as timm's --pretrained-path; "
                   "empty = the file in the optional 'pretrained' channel if there is one, else the weights shipped "
                   "in the image (`train --help` lists them); none = random weights: training from scratch, which "
                   "needs far more images than fine-tuning.",
                   check=_check_pretrained_path,
                   allowed_text="empty, none, or the path of a .pth, .pt, .bin or .safetensors file"),
    Hyperparameter("img_size", int, 0,
                   "Training image size in pixels; 0 or unset = the model's own. With any BatchNorm layer frozen "
                   "(freeze_batchnorm above 0) training uses the evaluation size instead.",
                   minimum=32, maximum=1024, allowed_text=IMG_SIZE_ALLOWED, tunable=True),
    Hyperparameter("eval_img_size", int, 0,
                   "Validation and serving image size in pixels; 0 or unset = the model's test size in timm if it "
                   "has one and img_size is 0, otherwise 1.15 x the training size.",
                   minimum=32, maximum=1024, allowed_text=IMG_SIZE_ALLOWED, tunable=True),
    Hyperparameter("warmup_epochs", float, 1.0,
                   "Epochs of linear learning-rate warmup from warmup_lr, updated every step, over which the random "
                   f"crops also grow from evaluation's view to crop_scale; {SMALL_SET_EPOCH}.",
                   minimum=0, maximum=10000, tunable=True),
    Hyperparameter("hflip", float, AUTO,
                   "Probability of mirroring a training image left-right (timm's --hflip); 0 also turns eval_hflip "
                   "off. auto = 0.5, or down to 0 where mirrored images lose the probe's answers (text, digits): "
                   f"{measured('nineteen in twenty')} (the mirror loses no pixel); under 0.25 it also turns "
                   "eval_hflip off.",
                   minimum=0, maximum=1, tunable=True),
    Hyperparameter("crop_scale", float, AUTO,
                   "Smallest share of a training image's area that a random training crop keeps; 1 = no random "
                   "crop: evaluation's own view (the central crop_pct of the image's short side: all of it for "
                   "efficientnet_b3 at its default sizes, 87.5% for b0 or lite0). auto = 0.25, 0.5 or between, "
                   f"{MEASURED}; never 1: on the panel's digits, training without random crops ended lower than "
                   "half crops. The crops grow to it over the warmup, from evaluation's view.",
                   minimum=0.05, maximum=1, tunable=True),
    Hyperparameter("eval_hflip", bool, True,
                   "Average each validation and served prediction over the image and its mirror image "
                   "(test-time augmentation): a better model for twice the inference compute."),
    Hyperparameter("layer_decay", float, 0.85,
                   "Layer-wise learning-rate decay (timm's layer_decay): the classifier gets lr, each block "
                   "below it layer_decay times the one above; 1 = the same lr everywhere.",
                   minimum=0.01, maximum=1, tunable=True),
    Hyperparameter("clip_grad", float, 0.01,
                   "Gradient clipping (timm's clip_grad); with clip_mode=agc each unit's gradient is clipped to this "
                   "share of its weights' norm, so no layer's update outgrows its weights (with BatchNorm frozen, "
                   "plain sgd diverges at any useful rate without it); 0 = off.",
                   minimum=0, maximum=100, tunable=True),
    Hyperparameter("clip_mode", str, "agc",
                   "How clip_grad clips (timm's clip_mode): agc (adaptive, per unit, relative to the weights; Brock et "
                   "al. 2021), norm (the global gradient norm) or value (each element).",
                   choices=("agc", "norm", "value")),
    Hyperparameter("seed", int, 42, "Random seed.", minimum=0, maximum=2**31 - 1),
    Hyperparameter("smoothing", float, 0.1,
                   "Label smoothing of the training loss (timm's recipe, which the listing's defaults come "
                   "from, uses 0.1).", minimum=0, maximum=0.9, tunable=True),
    Hyperparameter("early_stopping", bool, True,
                   "Stop when no better model has been found for early_stopping_patience epochs, or when "
                   "the learning rate has decayed below 1/1000 of its peak."),
    Hyperparameter("early_stopping_patience", int, 5,
                   f"Epochs without a better model before stopping; {SMALL_SET_EPOCH}.",
                   minimum=1, maximum=1000),
    Hyperparameter("freeze_batchnorm", str, "auto",
                   "Keep BatchNorm's pretrained (ImageNet) statistics while fine-tuning instead of normalising by "
                   "each batch's own (its scales and shifts still train); then training runs at the evaluation "
                   "size. auto = false (the listing's) or true, or between: a share of the BatchNorm layers "
                   f"frozen, those nearest the classifier, the others on batch statistics; {MEASURED} (args.yml's "
                   "effective_freeze_batchnorm is the share). A number from 0 to 1 sets the share by hand.",
                   check=_check_freeze_batchnorm, allowed_text="auto, true, false, or a number from 0 to 1",
                   canonical=_canonical_freeze_batchnorm),
    Hyperparameter("balance_classes", bool, AUTO,
                   "Weight the training loss by inverse class frequency, so that every class counts as much "
                   "as the others however many images it has. auto = between false and true by the chance that the "
                   "'val' channel's class counts come from equal class shares rather than the training set's (a "
                   "balanced 'val' beside an imbalanced 'train' gives true once 'val' has the images to tell); false "
                   "where val is held out of train or an image has several labels."),
    Hyperparameter("max_unusable_fraction", float, 0.1,
                   "Largest share of a channel's image files that may be unusable (corrupt, truncated, empty, "
                   "too large, unsupported format, outside a class folder) before the job fails instead of "
                   "skipping them; 0 = fail on the first one, 1 = never fail for this.",
                   minimum=0, maximum=1),
    Hyperparameter("val_fraction", float, 0.2,
                   "Without a 'val' channel: the share of each class of 'train' held out for validation (chosen by "
                   "seed, at least one image a class; the list is in the model's held_out_validation.csv). "
                   "Ignored when there is a 'val' channel.", minimum=0.01, maximum=0.5),
)
BY_NAME: dict[str, Hyperparameter] = {hp.name: hp for hp in SCHEMA}
# What buyers coming from SageMaker's built-in image classifier or other trainers tend to type.
COMMON_NAMES = {"learning_rate": "lr", "mini_batch_size": "batch_size", "num_epochs": "epochs",
                "optimizer": "opt", "lr_scheduler": "sched", "scheduler": "sched", "dropout": "drop",
                "drop_path": "drop_connect", "drop_path_rate": "drop_connect", "image_size": "img_size",
                "image_shape": "img_size", "num_workers": "workers", "use_weighted_loss": "balance_classes",
                "patience": "early_stopping_patience", "eps": "opt_eps", "ema": "model_ema",
                "auto_augment": "aa", "label_smoothing": "smoothing", "pretrained_weights": "pretrained_path",
                "checkpoint": "pretrained_path", "clip_gradient": "clip_grad", "grad_clip": "clip_grad",
                "validation_split": "val_fraction", "val_split": "val_fraction", "test_size": "val_fraction"}


def scaled_lr(lr: float, batch_size: int, processes: int = 1) -> float:
    """The learning rate the job trains with: `lr` is for a global batch of LR_REFERENCE_BATCH images and scales
    linearly to batch_size x the training processes."""
    return lr * (batch_size * processes) / LR_REFERENCE_BATCH


def echoed(raw: Any) -> str:
    """A value from hyperparameters.json as an error shows it: quoted, one line, at most about MAX_ECHOED
    characters, so that a huge value cannot push the fix out of the 1,024-character failure reason."""
    return f"'{shown(raw, MAX_ECHOED)}'" if isinstance(raw, str) else shown(repr(raw), MAX_ECHOED)


def defaults() -> dict[str, Any]:
    return {hp.name: hp.default for hp in SCHEMA}


def parse(raw: Mapping[str, Any]) -> tuple[SimpleNamespace, list[str]]:
    """Check every raw value against the schema.

    Returns the resolved hyperparameters (defaults filled in) and the names that were
    ignored on purpose. Raises JobError listing every problem at once, so the buyer fixes
    them all in one go rather than one failed job at a time.
    """
    values = defaults()
    ignored, problems = [], []
    for name, raw_value in raw.items():
        if name.startswith(IGNORED_PREFIXES):
            ignored.append(name)
            continue
        spec = BY_NAME.get(name)
        if spec is None:
            close = [COMMON_NAMES[name]] if name in COMMON_NAMES else \
                difflib.get_close_matches(name[:MAX_ECHOED], BY_NAME, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"valid names are: {', '.join(BY_NAME)}."
            problems.append(f"unknown hyperparameter '{shown(name, MAX_ECHOED)}' = {echoed(raw_value)}: {hint}")
            continue
        try:
            values[name] = spec.parse(raw_value)
        except ValueError as exc:
            problems.append(f"hyperparameter '{name}' = {echoed(raw_value)} is invalid ({shown(exc, 100)}); "
                            f"allowed: {spec.allowed}; default {format_value(spec.default) or '(empty)'}")
    if problems:
        raise JobError("Bad hyperparameters, fix them and start the job again: " + " | ".join(problems))
    return SimpleNamespace(**values), ignored


# ---- the same schema, for people and for SageMaker ---------------------------------------


def markdown_table() -> str:
    rows = ["| Name | Default | Allowed values | Meaning |", "|---|---|---|---|"]
    for hp in SCHEMA:
        default = format_value(hp.default) if hp.default != "" else "(empty)"
        rows.append(f"| `{hp.name}` | `{default}` | {hp.allowed} | {hp.help} |")
    return "\n".join(rows)


def plain_text() -> str:
    """The same table for a terminal (`train --hyperparameters`): the image holds no README."""
    import textwrap

    entries = []
    for hp in SCHEMA:
        default = format_value(hp.default) if hp.default != "" else "(empty)"
        body = textwrap.fill(f"{hp.help} Allowed: {hp.allowed}.", 100, initial_indent="    ", subsequent_indent="    ")
        entries.append(f"{hp.name} (default {default})\n{body}")
    return ("Hyperparameters (hyperparameters.json; every one optional, its values as strings). \"The listing\" is "
            "this algorithm's AWS Marketplace page, whose names and defaults are kept; auto marks where fine-tuning "
            "chooses other values:\n\n"
            + "\n".join(entries))


def sagemaker_hyperparameter_specs() -> list[dict]:
    """SupportedHyperParameters of the CreateAlgorithm request."""
    specs = []
    for hp in SCHEMA:
        spec: dict[str, Any] = {
            "Name": hp.name,
            "Description": hp.help,
            "IsTunable": hp.tunable,
            "IsRequired": False,
            "DefaultValue": format_value(hp.default),
        }
        high = math.inf if hp.maximum is None else hp.maximum
        if hp.kind in (int, float) and (hp.default == AUTO or (hp.minimum is not None and
                                                                not hp.minimum <= hp.default <= high)):
            del spec["DefaultValue"]  # the range must hold it; the job uses it when SageMaker sends nothing
        if hp.kind is bool:
            spec["Type"] = "Categorical"
            values = ([AUTO] if hp.default == AUTO else []) + ["true", "false"]
            spec["Range"] = {"CategoricalParameterRangeSpecification": {"Values": values}}
        elif hp.choices:
            spec["Type"] = "Categorical"
            spec["Range"] = {"CategoricalParameterRangeSpecification": {"Values": list(hp.choices)}}
        elif hp.kind in (int, float) and hp.minimum is not None and hp.maximum is not None:
            spec["Type"] = "Integer" if hp.kind is int else "Continuous"
            key = "IntegerParameterRangeSpecification" if hp.kind is int else "ContinuousParameterRangeSpecification"
            spec["Range"] = {key: {"MinValue": format_value(hp.minimum), "MaxValue": format_value(hp.maximum)}}
        else:
            spec["Type"] = "FreeText"
        specs.append(spec)
    return specs


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table())
    else:
        sys.exit("usage: python -m efficientnet_train.hyperparameters --markdown")
