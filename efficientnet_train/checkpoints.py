"""Resumable training state: what lets a stopped, interrupted or killed job carry on where it was.

SageMaker syncs the checkpoint folder to `checkpoint_s3_uri` while the job runs and restores it
when a managed spot job restarts on a new machine, whose `model/` starts empty: so the state
carries the best model so far as well as everything needed to continue training.
"""

from __future__ import annotations

import logging
import random
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import JobError
from .outputs import atomic_write, megabytes
from .untrusted import shown

log = logging.getLogger("efficientnet_train")

STATE_VERSION = 1
KEEP = 2  # the newest, and the one before it in case the newest is found unreadable
# Hyperparameters a resumed job may change: they change how fast it trains, or when it gives up, not what
# it learns.
MAY_CHANGE_ON_RESUME = frozenset({"workers", "max_unusable_fraction"})
REQUIRED_KEYS = frozenset({"version", "progress", "model", "optimizer", "scheduler", "rng", "summary", "best",
                           "best_model", "finished", "hyperparameters", "classes", "train_images"})


@dataclass
class Progress:
    """Where training is: `step` batches of `epoch` are done, with these training-loss sums."""

    epoch: int = 1
    step: int = 0
    loss_sum: float = 0.0
    seen: int = 0


CHECKPOINT_NAME = re.compile(r"checkpoint-\d{5}-\d{7}\.pth\.tar")


def checkpoint_files(folder: Path) -> list[Path]:
    """Newest first: the names sort by (epoch, batch)."""
    return sorted(folder.glob("checkpoint-*-*.pth.tar"), reverse=True) if folder.is_dir() else []


def save_state(folder: Path, state: dict) -> Path:
    progress = state["progress"]
    path = folder / f"checkpoint-{progress['epoch']:05d}-{progress['step']:07d}.pth.tar"
    atomic_write(path, lambda f: torch.save(state, f))
    for old in checkpoint_files(folder)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def room_for_checkpoints(folder: Path, checkpoint_bytes: int) -> tuple[int, str]:
    """What the checkpoint folder must have room for: KEEP checkpoints and the newest, written before the oldest
    goes, less those already there."""
    count = max(1, KEEP + 1 - len(checkpoint_files(folder)))
    return count * checkpoint_bytes, f"{count} checkpoint{'s' * (count > 1)} of {megabytes(checkpoint_bytes)}"


def load_latest_state(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads. One that is clearly damaged (cut short by a kill or a failed sync) is set
    aside under a new name, kept for the buyer, and the one before it is tried. Anything else that stops a
    checkpoint from loading (no memory, an I/O error, contents this version cannot read) fails the job and
    touches nothing: a spot restart must never lose its progress to a passing problem."""
    for path in checkpoint_files(folder):
        try:
            damage = _damage(path)
            if damage is None:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the file is left as it is
            if not _is_damaged_zip(exc):
                raise JobError(f"The checkpoint {path} could not be loaded ({type(exc).__name__}: "
                               f"{shown(exc, 300)}); nothing was changed. If memory ran out, choose an "
                               f"instance type with more memory; if its contents are from another program or "
                               f"version, move it out of the checkpoint folder (checkpoint_s3_uri).") from exc
            damage = f"{type(exc).__name__}: {shown(exc, 200)}"
        if damage is None:
            missing = REQUIRED_KEYS - set(state) if isinstance(state, dict) else REQUIRED_KEYS
            if missing:
                raise JobError(f"The checkpoint {path} is not a training state of this algorithm (it lacks "
                               f"{', '.join(sorted(missing))}); nothing was changed. Move it out of the checkpoint "
                               f"folder (checkpoint_s3_uri), or use a new checkpoint_s3_uri.")
            if state["version"] > STATE_VERSION:
                raise JobError(f"The checkpoint {path} was written by a newer version of this algorithm "
                               f"(state version {state['version']}). Resume with that version, or use a new "
                               f"checkpoint_s3_uri to start afresh.")
            return path, state
        kept = _set_aside(path)
        log.warning("Checkpoint %s is unreadable (%s); kept as %s, trying the one before it", path, damage, kept.name)
    return None


def _damage(path: Path) -> str | None:
    """Why the file clearly cannot be a checkpoint this job wrote (always a zip archive), or None."""
    if path.stat().st_size == 0:
        return "it is empty"
    if not zipfile.is_zipfile(path):
        return "it is not a complete zip archive, as every checkpoint is: cut short, or not a checkpoint"
    return None


def _is_damaged_zip(exc: Exception) -> bool:
    """torch's reader failing inside the archive (a bad CRC, a missing record): damaged bytes, not a foreign type,
    memory or I/O."""
    return isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc)


def _set_aside(path: Path) -> Path:
    """Rename out of the checkpoints' pattern, so that it is neither loaded nor rotated away; never overwrite."""
    for number in range(1000):
        kept = path.with_name(f"{path.name}.unreadable{f'-{number}' if number else ''}")
        if not kept.exists():
            path.rename(kept)
            return kept
    raise JobError(f"The checkpoint folder {path.parent} holds 1,000 set-aside unreadable checkpoints; empty it.")


def check_resumable(path: Path, state: dict, hyperparameters: dict, classes: list[str], train_images: int,
                    processes: int = 1, val_images: int | None = None,
                    val_images_per_class: dict[str, int] | None = None) -> None:
    """Refuse to continue a run with a checkpoint from a different one instead of silently mixing them."""
    saved = state["hyperparameters"]
    problems = [f"{key}={saved.get(key)!r} there, {value!r} here" for key, value in hyperparameters.items()
                if key not in MAY_CHANGE_ON_RESUME and saved.get(key) != value]
    if state["classes"] != classes:
        problems.append(f"classes {shown(state['classes'], 200)} there, {shown(classes, 200)} here")
    if state["train_images"] != train_images:
        problems.append(f"{state['train_images']} training images there, {train_images} here")
    # The best model so far was chosen on the val images, and balance_classes=auto weighs the loss by their shares.
    if "val_images" in state and val_images is not None and state["classes"] == classes:  # absent before it was kept
        there = state.get("val_images_per_class")
        there, here = there if isinstance(there, dict) else {}, val_images_per_class or {}
        changed = [name for name in classes if there.get(name) != here.get(name)]
        if state["val_images"] != val_images or changed:
            by_class = ", ".join(f"'{shown(name, 60)}' {there.get(name, 0)} there, {here.get(name, 0)} here"
                                 for name in changed[:3]) + (", ..." if len(changed) > 3 else "")
            problems.append(f"{state['val_images']} validation images there, {val_images} here"
                            + (f" (by class: {by_class})" if changed else ""))
    if state.get("world_size", 1) != processes:  # the global batch, and with it each step, would differ
        problems.append(f"{state.get('world_size', 1)} training processes there, {processes} here")
    if problems:
        raise JobError(f"The checkpoint {path} is from a different training run: {'; '.join(problems)}. "
                       f"Resuming it would mix two runs. To resume, give the same data and hyperparameters; "
                       f"to start afresh, use a new checkpoint_s3_uri (or empty {path.parent}).")


def capture_rng() -> dict:
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(*, progress: Progress, model, ema, optimizer, scheduler, scaler, summary: list[dict],
                   best: dict | None, best_model: dict | None, finished: str | None, hyperparameters: dict,
                   classes: list[str], train_images: int, world_size: int = 1,
                   linear_probe: dict | None = None, val_images: int | None = None,
                   val_images_per_class: dict[str, int] | None = None) -> dict:
    def cpu(state_dict):
        return {key: value.detach().cpu() for key, value in state_dict.items()}

    return {"version": STATE_VERSION, "progress": asdict(progress), "model": cpu(model.state_dict()),
            "ema": cpu(ema.state_dict()) if ema is not None else None, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": capture_rng(), "summary": summary, "best": best, "best_model": best_model, "finished": finished,
            "hyperparameters": hyperparameters, "classes": classes, "train_images": train_images,
            "world_size": world_size, "linear_probe": linear_probe, "val_images": val_images,
            "val_images_per_class": val_images_per_class}


def restore_training_state(state: dict, *, model, ema, optimizer, scheduler, scaler) -> Progress:
    model.load_state_dict(state["model"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    return Progress(**state["progress"])
