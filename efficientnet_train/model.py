"""Creating the network with its ImageNet weights, and the checkpoint it is saved as."""

from __future__ import annotations

import io
import logging
import tarfile
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .calibration import calibrated
from .errors import JobError
from .hyperparameters import NO_PRETRAINED, WEIGHTS_SUFFIXES, shipped_weights
from .outputs import BEST_MODEL_FILE, atomic_write
from .untrusted import shown

log = logging.getLogger("efficientnet_train")

CHECKPOINT_VERSION = 1
# Convolutions run faster on images and weights stored channels-last, on a GPU (cuDNN, bf16 above all) and
# on a CPU (oneDNN) (docs/benchmarks.md). Every model and input batch of training, validation and serving is kept
# in it.
MEMORY_FORMAT = torch.channels_last


def create_model(name: str, labels: list[str], pretrained_path: str, drop: float, drop_connect: float,
                 start: tuple[Path, dict] | None = None):
    """The model to fine-tune, never downloading anything: from a previous job's checkpoint (`start`,
    incremental training) or ImageNet weights, with a new, zeroed head where the labels are new."""
    num_classes = len(labels)
    if start is not None:
        model = _create_from_previous_job(name, labels, drop, drop_connect, *start)
    else:
        model = _create_pretrained(name, num_classes, pretrained_path, drop, drop_connect)
        if num_classes != model.pretrained_cfg.get("num_classes"):
            # timm sizes EfficientNet's head init by its fan-out, +-1/sqrt(num_classes): made for 1000
            # classes, it gives two classes logits in the tens and an initial loss near 7, whose large
            # gradients wreck the pretrained features in the first steps. A zero head starts at
            # log(num_classes) and lets the backbone adapt gently.
            _zero_head(model)
    model.created_drop_connect = drop_connect  # what set_regularisation scales each block's rate from
    return model.to(memory_format=MEMORY_FORMAT)


def _zero_head(model: torch.nn.Module) -> None:
    torch.nn.init.zeros_(model.get_classifier().weight)
    torch.nn.init.zeros_(model.get_classifier().bias)


def _create_from_previous_job(name: str, labels: list[str], drop: float, drop_connect: float, path: Path,
                              checkpoint: dict):
    import timm

    if checkpoint["arch"] != name:
        arch = shown(checkpoint["arch"], 80)
        raise JobError(f"The 'model' channel holds a '{arch}' model ({path}), but this job's model is '{name}'. "
                       f"Set model={arch} to continue training it, or remove the 'model' channel to start from "
                       f"ImageNet weights.")
    model = timm.create_model(name, num_classes=len(labels), drop_rate=drop, drop_path_rate=drop_connect)
    state_dict = checkpoint["state_dict"]
    if checkpoint["labels"] == labels:
        model.load_state_dict(state_dict)
        log.info("Starting from the model in %s (epoch %s, top-1 %.2f%%), same labels", path,
                 checkpoint.get("epoch"), checkpoint.get("metric", float("nan")))
        return model
    head = {f"{model.pretrained_cfg.get('classifier', 'classifier')}.{kind}" for kind in ("weight", "bias")}
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in head}, strict=False)
    _zero_head(model)
    before, now = set(checkpoint["labels"]), set(labels)
    change = "; ".join(f"{what} {len(names)}: {shown(', '.join(sorted(names)), 300)}" for what, names in (
        ("added", now - before), ("gone", before - now)) if names) or "the same names in another order"
    log.warning("The 'model' channel's model (%s) was trained on other labels (%d there, %d here; %s): it continues "
                "with a new classifier head, so only its features carry over and its old answers do not. If the "
                "data is meant to have the same labels, check the class folders.", shown(str(path), 300), len(before),
                len(now), change)
    return model


MODEL_CHANNEL_MAX_BYTES = 4 * 2**30  # an EfficientNet-B8 checkpoint is ~350 MB; more is not a model of this algorithm


def read_model_channel(folder: Path) -> tuple[Path, dict] | None:
    """The checkpoint in the optional 'model' channel: a previous job's model.tar.gz or model_best.pth.tar."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    checkpoint_file = next((p for p in files if p.name == BEST_MODEL_FILE), None)
    archive = next((p for p in files if p.name.endswith((".tar.gz", ".tgz", ".tar"))), None)
    if not files:
        return None
    source = checkpoint_file or archive
    if source is None:
        raise JobError(f"The 'model' channel ({folder}) holds neither {BEST_MODEL_FILE} nor a model.tar.gz "
                       f"(found {', '.join(shown(p.name, 80) for p in files[:5])}). Give it the model.tar.gz of a "
                       f"previous training job, or remove the channel.")
    try:
        if checkpoint_file is not None:
            _check_size(checkpoint_file, checkpoint_file.stat().st_size)
            return checkpoint_file, _model_checkpoint(checkpoint_file, load_checkpoint(checkpoint_file))
        loaded = torch.load(io.BytesIO(archive_member(archive, BEST_MODEL_FILE)), map_location="cpu",
                            weights_only=True)
        return archive, _model_checkpoint(archive, loaded)
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged archive, a foreign pickle, an I/O error: all the same fix
        raise JobError(f"The 'model' channel's {source} cannot be read as a model of this algorithm "
                       f"({type(exc).__name__}: {shown(exc, 200)}). Give it an intact model.tar.gz of a previous "
                       f"training job, or remove the channel.") from exc


PRETRAINED_ENTRIES_LOOKED_AT = 1000  # the channel should hold one file; a bucket's whole prefix is a mistake


def pretrained_source(pretrained_path: str, channel: Path) -> str:
    """pretrained_path, or where it is empty the one weights file of the optional 'pretrained' channel (a buyer's
    own timm weights; SageMaker has no other way to bring a file into a job)."""
    if not channel.is_dir():
        return pretrained_path
    files = sorted(p for _, p in zip(range(PRETRAINED_ENTRIES_LOOKED_AT), channel.rglob("*"))
                   if p.is_file() and not p.name.startswith("."))
    if not files:
        return pretrained_path
    if pretrained_path:
        raise JobError(f"Both pretrained_path ({shown(pretrained_path, 200)}) and the 'pretrained' channel "
                       f"({channel}) give weights to start from. Give one: remove the channel, or unset "
                       f"pretrained_path.")
    weights = [p for p in files if p.name.lower().endswith(WEIGHTS_SUFFIXES)]
    if len(weights) != 1:
        found = ", ".join(shown(p.relative_to(channel), 80) for p in files[:5]) + (" ..." if len(files) > 5 else "")
        raise JobError(f"The 'pretrained' channel ({channel}) must hold one timm weights file "
                       f"({', '.join(WEIGHTS_SUFFIXES)}); it holds {len(weights)} among {found}. Give it the S3 "
                       f"key of one file.")
    return str(weights[0])


ARCHIVE_MEMBERS_LOOKED_AT = 1000  # a job's model.tar.gz holds six files


def archive_member(archive: Path, name: str, max_bytes: int = MODEL_CHANNEL_MAX_BYTES) -> bytes:
    """The file called `name` (wherever it sits) in a job's model.tar.gz, read by name, never extracted to disk
    by the archive's own paths; refused when missing, not among the first ARCHIVE_MEMBERS_LOOKED_AT members
    (an archive of millions would take that long to list), or over `max_bytes`."""
    with tarfile.open(archive) as tar:
        member, walked = None, 0
        for _, candidate in zip(range(ARCHIVE_MEMBERS_LOOKED_AT), tar):
            if Path(candidate.name).name == name and candidate.isfile():
                member = candidate
                break
            # Reaching the next member decompresses this one: a gzip bomb of zeros before ours would take minutes.
            walked += candidate.size
            if walked > max_bytes:
                raise JobError(f"{archive} holds {walked:,} bytes of other files before its {name}, more than any "
                               f"model of this algorithm has ({max_bytes:,} at most). Give the model.tar.gz of a "
                               f"previous training job.")
        if member is None:
            raise JobError(f"{archive} holds no {name} file. Give the model.tar.gz of a previous training job of "
                           f"this algorithm.")
        _check_size(archive, member.size, max_bytes)
        return tar.extractfile(member).read()


def _check_size(path: Path, size: int, max_bytes: int = MODEL_CHANNEL_MAX_BYTES) -> None:
    if size > max_bytes:
        raise JobError(f"{path} holds a file of {size:,} bytes, more than any model of this algorithm has "
                       f"({max_bytes:,} at most). Give the model.tar.gz of a previous training job.")


def _model_checkpoint(path: Path, checkpoint) -> dict:
    """`checkpoint` if it has what a job starts from, else a reason."""
    if (isinstance(checkpoint, dict) and isinstance(checkpoint.get("arch"), str)
            and isinstance(checkpoint.get("state_dict"), dict) and isinstance(checkpoint.get("labels"), list)
            and all(isinstance(label, str) for label in checkpoint["labels"])):
        return checkpoint
    raise JobError(f"The 'model' channel's {path} is not a model saved by this algorithm (it lacks its model "
                   f"name, weights or labels). Give it the model.tar.gz of a previous training job.")


def _create_pretrained(name: str, num_classes: int, pretrained_path: str, drop: float, drop_connect: float):
    import timm

    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_rate=drop, drop_path_rate=drop_connect)
    if pretrained_path.lower() == NO_PRETRAINED:
        log.warning("pretrained_path=none: training '%s' from random weights. Without ImageNet's features a model "
                    "needs far more images and epochs (hundreds of thousands of images, hundreds of epochs) to "
                    "reach what fine-tuning reaches from a few hundred; leave pretrained_path empty to fine-tune.",
                    name)
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise JobError(f"pretrained_path {path} does not exist. Give the path of a timm weights file "
                           f"(.pth or .safetensors) inside the container, or leave it empty to use the "
                           f"weights shipped in the image.")
        try:
            # The same as timm's --pretrained-path: the file replaces the hub as the weights' source,
            # and timm drops the ImageNet classifier when num_classes differs.
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
            # The names only: on the meta device a .pth is not read a second time (safetensors can't load there).
            file_keys = set(timm.models.load_state_dict(str(path), device="cpu" if path.suffix == ".safetensors"
                                                        else "meta"))
        except (RuntimeError, KeyError, ValueError, OSError, EOFError) as exc:
            raise JobError(f"pretrained_path {path} does not hold timm weights for model '{name}': "
                           f"{type(exc).__name__}: {str(exc)[:300]}. Check that the file was saved from "
                           f"timm's '{name}' (state_dict key names as in timm).") from exc
        _check_the_file_covers(model, file_keys, path, name)
        return model
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - offline hub errors come in many types
        shipped = shipped_weights()
        listing = f"This image has weights for: {', '.join(shipped)}." if shipped else \
            "This image has no pretrained weights."
        raise JobError(f"No ImageNet weights for model '{name}' are available without a network "
                       f"({type(exc).__name__}). {listing} Choose one of those models, or give a timm weights file "
                       f"for '{name}' in the 'pretrained' channel (or pretrained_path).") from exc


def _check_the_file_covers(model: torch.nn.Module, file_keys: set[str], path: Path, name: str) -> None:
    """timm loads a weights file leniently when it replaces the classifier: a file of another model, or of another
    library's names (`_conv_stem.weight`), would load nothing and leave the backbone random without an error."""
    classifiers = model.pretrained_cfg.get("classifier") or ()
    head = tuple(f"{c}." for c in ((classifiers,) if isinstance(classifiers, str) else classifiers))
    # BatchNorm's batch counters are not weights, and many files leave them out.
    file_keys = {key for key in file_keys if not key.endswith("num_batches_tracked")}
    model_keys = {key for key in model.state_dict() if not key.endswith("num_batches_tracked")}
    wanted = {key for key in model_keys if not key.startswith(head)}
    missing = sorted(wanted - file_keys)
    if missing:
        unknown = sorted(file_keys - model_keys)
        raise JobError(f"pretrained_path {path} does not hold timm weights for model '{name}': {len(missing)} of its "
                       f"{len(wanted)} tensors are not in the file (e.g. {', '.join(missing[:3])})"
                       + (f", which has {len(unknown)} that the model lacks (e.g. {', '.join(unknown[:3])})"
                          if unknown else "")
                       + f", so training would start from random weights. Give a file saved from timm's '{name}' "
                         f"(state_dict key names as in timm).")


def autocast_for(device: torch.device):
    """Mixed precision on CUDA (bf16 where the GPU has it), plain float32 on the CPU."""
    if device.type != "cuda":
        return nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return partial(torch.autocast, "cuda", dtype=dtype), dtype


def predict_log_probabilities(model: torch.nn.Module, images: torch.Tensor, mirror: bool,
                              temperature: float = 1.0) -> torch.Tensor:
    """Log class probabilities of a batch: the one definition of a prediction, for validation and serving.

    With `mirror`, each image's probabilities are averaged with its left-right mirror image's, which
    training's random flips taught the model to see as the same picture (docs/defaults.md has the gain).
    The temperature (fitted after training, 1 during it) calibrates them without changing any argmax.
    """
    if not mirror:
        return calibrated(model(images).float().log_softmax(dim=1), temperature)
    probabilities = model(torch.cat([images, images.flip(3)])).float().softmax(dim=1)
    # -1 for the batch, not len(images): an exported graph (ONNX) then keeps its batch size free.
    return calibrated(probabilities.view(2, -1, probabilities.shape[1]).mean(dim=0).log(), temperature)


def predict_label_logits(model: torch.nn.Module, images: torch.Tensor, mirror: bool,
                         temperature: float = 1.0) -> torch.Tensor:
    """For several labels an image: each label's logit (its probability is the sigmoid), averaged with the mirror
    image's with `mirror`, divided by the calibration's temperature; the one definition, as above."""
    logits = model(torch.cat([images, images.flip(3)]) if mirror else images).float()
    if mirror:
        logits = logits.view(2, -1, logits.shape[1]).mean(dim=0)
    return logits / temperature


def checkpoint_of(model: torch.nn.Module, **metadata: Any) -> dict:
    """A timm-layout checkpoint of plain types, loadable with torch.load(weights_only=True)."""
    # A copy even on the CPU, where .cpu() would alias the weights that training goes on changing.
    state_dict = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    return {"state_dict": state_dict, "version": CHECKPOINT_VERSION, **metadata}


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


TRAINED_MODEL_KEYS = ("arch", "state_dict", "labels", "data_config")


def load_trained_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """The best model a job saved, ready for inference, and its checkpoint's metadata. Anything else (another
    program's pickle, an architecture this product does not train, such as a Hugging Face Hub name that would be
    fetched from the network, weights of another shape) is refused with the reason, before any model is built."""
    import timm

    from .hyperparameters import efficientnet_models

    not_ours = f"{path} is not a model_best.pth.tar that a training job of this product wrote"
    try:
        checkpoint = load_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - torch reports a foreign pickle or a damaged file in many types
        raise JobError(f"{not_ours}: it cannot be loaded as plain weights ({type(exc).__name__}: "
                       f"{shown(str(exc).splitlines()[0] if str(exc) else '', 200)}).") from exc
    missing = [key for key in TRAINED_MODEL_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise JobError(f"{not_ours}: it has no {', '.join(missing)}.")
    arch = checkpoint["arch"]
    if not isinstance(arch, str) or arch not in efficientnet_models():
        raise JobError(f"{not_ours}: its architecture '{shown(arch, 100)}' is not one of timm's EfficientNets, "
                       f"which this product trains (and loads without the network).")
    if checkpoint.get("multi_label"):
        thresholds = checkpoint.get("thresholds")
        if not (isinstance(thresholds, list) and len(thresholds) == len(checkpoint["labels"])
                and all(isinstance(t, float) for t in thresholds)):
            raise JobError(f"{not_ours}: it is a multi-label model without a threshold (a number) for each label.")
    model = timm.create_model(arch, num_classes=len(checkpoint["labels"]))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise JobError(f"{not_ours}: its weights do not fit a {arch} of {len(checkpoint['labels'])} classes "
                       f"({shown(str(exc).splitlines()[0], 200)}).") from exc
    return model.eval().to(memory_format=MEMORY_FORMAT), checkpoint


def set_regularisation(model: torch.nn.Module, drop: float, drop_connect: float) -> None:
    """Set `model`'s dropout before the classifier and its drop-connect (stochastic depth), whose rate grows with
    depth as timm builds it; `model` comes from create_model, with a drop-connect rate above 0 for this one to be
    above 0 (timm leaves the blocks out otherwise)."""
    from timm.layers import DropPath

    model.drop_rate = drop
    paths = [module for module in model.modules() if isinstance(module, DropPath)]
    for path in paths:
        path.__dict__.setdefault("depth_share", path.drop_prob / model.created_drop_connect)
        path.drop_prob = path.depth_share * drop_connect


def set_batchnorm(model: torch.nn.Module, frozen: float) -> int:
    """Put `model`'s BatchNorm layers (and only those) in training mode, normalising by each batch's own statistics
    and updating the running averages, all but the share `frozen` of them nearest the classifier, which are put in
    evaluation mode, normalising by their running averages: 1 freezes every one, 0 none, any share above 0 at least
    one (which then trains at the evaluation size: recipe.training_size_config). The layers nearest the classifier
    are the ones whose batch statistics change the probe's answers most (docs/quality-log.md). Returns how many layers
    are on batch statistics."""
    layers = batchnorm_layers(model)
    on_batch_statistics = len(layers) - (max(1, round(frozen * len(layers))) if frozen > 0 else 0)
    for i, module in enumerate(layers):
        module.train(i < on_batch_statistics)
    return on_batch_statistics


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`model`'s BatchNorm layers, from the input to the classifier."""
    return [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
