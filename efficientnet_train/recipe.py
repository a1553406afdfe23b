"""What fine-tuning trains with where the buyer leaves the choice to the job (`freeze_batchnorm=auto`, `opt=auto`,
`aa=auto`): chosen from what the linear probe measured on the set's own training images, before the first update.

Two measurements decide, each the probe's head scored on its own training images against its score on them clean,
in evaluation mode (linear_probe.loses_most_answers):

- with BatchNorm normalising each batch by its own statistics, as a training step does. Where that loses most
  of the answers (digit scans, drawings: images whose statistics are far from ImageNet's), BatchNorm keeps its
  pretrained statistics; then the optimiser is sgd, since rmsproptf's steps of about lr whatever the gradient are
  what BatchNorm on batch statistics absorbs and frozen BatchNorm does not, and the network trains at the
  evaluation size, since frozen statistics do not follow a change of size (docs/quality.md has the runs);
- on the training transform: crops, flips, RandAugment and random erasing. Where the augmented images lose most
  of the answers, the policy destroys what tells this set's classes apart (a quarter of an 8x8 digit is often no
  digit), and fine-tuning goes without RandAugment and random erasing.

The record of both is args.yml's `linear_probe`, kept in the checkpoint: a resumed job makes the same choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LISTING_AUGMENTATION = "rand-m9-mstd0.5"  # the listing's aa, which aa=auto starts from


@dataclass(frozen=True)
class Recipe:
    freeze_batchnorm: bool
    opt: str
    aa: str
    reprob: float

    def record(self) -> dict:
        """For args.yml: what the job trained with, whatever was asked."""
        return {f"effective_{name}": value for name, value in asdict(self).items()}


def recipe_for(hp, measured: dict | None = None) -> Recipe:
    """The recipe `hp` asks for, with the auto choices made from `measured` (the `linear_probe` record of args.yml;
    None before the probe, or without one: then auto is the listing's recipe)."""
    measured = measured or {}
    frozen = hp.freeze_batchnorm == "true" or (
        hp.freeze_batchnorm == "auto" and bool(measured.get("far_from_pretrained_statistics")))
    without_augmentation = hp.aa == "auto" and bool(measured.get("augmentation_loses_answers"))
    return Recipe(
        freeze_batchnorm=frozen,
        opt=hp.opt if hp.opt != "auto" else "sgd" if frozen else "rmsproptf",
        aa="none" if without_augmentation else LISTING_AUGMENTATION if hp.aa == "auto" else hp.aa,
        reprob=0.0 if without_augmentation else hp.reprob)


def training_size_config(data_config: dict, recipe: Recipe) -> dict:
    """`data_config` with the size this recipe trains at: the evaluation size with frozen BatchNorm (digits at 64 px
    evaluated at 74: 87.8%, at 64: 96.4%), else the training size it has."""
    if not recipe.freeze_batchnorm:
        return data_config
    return {**data_config, "train_input_size": list(data_config["input_size"])}
