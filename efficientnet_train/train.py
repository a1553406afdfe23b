"""`train`: the SageMaker training job, from image folders to a fine-tuned EfficientNet."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from . import __version__, distributed, hyperparameters, outputs, report
from .calibration import calibrated, fit_temperature, top_label_ece
from .checkpoints import (CHECKPOINT_NAME, Interrupted, Progress, StopRequest, check_resumable, load_latest_state,
                          restore_training_state, room_for_checkpoints, save_state, stop_here, training_state)
from .data import (ModelInput, TrainBatches, check_channels_differ, copies_across, dataset_of, decode_side,
                   eval_transform, report_load_failures, resolve_data_config, scan_channel, train_transform,
                   warn_about_copies, warn_about_thin_classes)
from .errors import JobError
from .failures import explained
from .holdout import held_out_rows, hold_out
from .linear_probe import MEASURED_IMAGES, fit_linear_probe, probe_sample, probe_top1
from .metrics import VAL_ACC_1, VAL_ACC_5, VAL_LOSS, TRAIN_LOSS, metric_line
from .model import (autocast_for, checkpoint_of, create_model, predict_log_probabilities, pretrained_source,
                    read_model_channel,
                    save_checkpoint, set_batchnorm_training, set_regularisation)
from .recipe import Recipe, choose, decisions, recipe_for, training_size_config
from .sagemaker import DEBUG_VARIABLE, SageMakerEnvironment
from .untrusted import shown, shown_lines

log = logging.getLogger("efficientnet_train")
PROGRESS_EVERY_S = 60  # a line within long epochs too, so a buyer sees the job is alive and how fast it goes


def main() -> int:
    # Marketplace jobs run without a network: weights come from the image or pretrained_path, never a
    # hub. Set before anything imports timm (and with it huggingface_hub, which reads this on import).
    os.environ["HF_HUB_OFFLINE"] = "1"
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    startup = report.StartUp(process_started_at())
    startup.done("Python and imports")
    env = SageMakerEnvironment.from_environ()
    env.failure_file.unlink(missing_ok=True)  # a reason left by an earlier run would mislead
    try:
        cluster = distributed.Cluster.of(env)
        job = prepare(env, cluster.world_size, startup)
        if cluster.world_size == 1:
            run(env, job)
        else:
            distributed.launch(cluster, run, env, job)
        return 0
    except JobError as exc:  # the buyer's to fix: the reason says how, a traceback would only bury it
        log.error("Training failed: %s", exc, exc_info=bool(os.environ.get(DEBUG_VARIABLE, "").strip("0 ")))
        env.write_failure(str(exc))
    except Exception as exc:  # noqa: BLE001 - whatever it is, the buyer must see a reason
        log.exception("Training failed with an unexpected error")
        env.write_failure(f"Unexpected error: {type(exc).__name__}: {exc}. "
                          f"The full traceback is in the training job's log.")
    return 1


def prepare(env: SageMakerEnvironment, world_size: int, startup: report.StartUp) -> SimpleNamespace:
    """Everything that can be checked without the model is, first, once per host: a broken tree fails in
    seconds, before any training process starts."""
    hp, ignored = hyperparameters.parse(env.read_hyperparameters())
    startup.done("checking the hyperparameters (importing timm)")
    if ignored:
        log.info("Ignoring SageMaker's own hyperparameters: %s", shown(", ".join(ignored), 300))
    from_channel = pretrained_source(hp.pretrained_path, env.channel_dir("pretrained"))
    if from_channel != hp.pretrained_path:
        hp.pretrained_path = from_channel  # args.yml says so
        log.info("Starting from the 'pretrained' channel's weights: %s", shown(from_channel, 300))
    train_channel = scan_channel("train", env.channel_dir("train"), max_unusable_fraction=hp.max_unusable_fraction)
    log.info(train_channel.inventory())
    classes = train_channel.classes
    if len(classes) < 2:
        raise JobError(f"The 'train' channel has one class ({classes[0]}); a classifier needs at least two. "
                       f"Add a folder of images for each other label to {train_channel.root}.")
    held_out = None
    if env.channel_dir("val").exists():
        val_channel = scan_channel("val", env.channel_dir("val"), classes=classes,
                                   max_unusable_fraction=hp.max_unusable_fraction)
        log.info(val_channel.inventory())
    else:
        train_channel, val_channel = hold_out(train_channel, hp.val_fraction, hp.seed)
        held_out = held_out_rows(train_channel, val_channel)
        log.info("No 'val' channel: %d of the %d training images (val_fraction=%g of each class, chosen by seed %d) "
                 "are held out for validation and not trained on; %s lists them.\n%s", len(held_out),
                 len(held_out) + len(train_channel.samples), hp.val_fraction, hp.seed, outputs.HELD_OUT_FILE,
                 val_channel.inventory())
    hp.batch_size = fitted_batch_size(hp.batch_size, len(train_channel.samples), world_size)  # args.yml says so
    warn_about_thin_classes(train_channel, val_channel)
    copies = copies_across(train_channel, val_channel) if held_out is None else []
    check_channels_differ(train_channel, val_channel, copies)
    warn_about_copies(copies, train_channel, val_channel)
    for folder, names in ((env.model_dir, outputs.MODEL_OUTPUT_NAMES), (env.checkpoint_dir, CHECKPOINT_NAME)):
        removed = outputs.remove_leftover_temporaries(folder, names)
        if removed:
            log.info("Removed %d half-written file(s) a killed save left in %s: %s", len(removed), folder,
                     ", ".join(removed))
    resumed = load_latest_state(env.checkpoint_dir)
    if resumed:
        check_resumable(*resumed, vars(hp), classes, len(train_channel.samples), world_size)
    # On every host, though only the first one writes: all have the same storage and the same copy of the data,
    # and each fails at once with this reason instead of waiting for the first one to meet them.
    model_bytes, checkpoint_bytes = output_sizes(hp, len(classes))
    outputs.check_room({
        env.model_dir: (2 * model_bytes,
                        f"the best model ({outputs.megabytes(model_bytes)}) and the copy replacing it"),
        env.checkpoint_dir: room_for_checkpoints(env.checkpoint_dir, checkpoint_bytes)})
    startup.done("checking the data and the disk (checkpoints and free space)")
    return SimpleNamespace(hp=hp, ignored=ignored, train_channel=train_channel, val_channel=val_channel,
                           held_out=held_out, copies=copies, resumed=resumed, startup=startup)


def run(env: SageMakerEnvironment, job: SimpleNamespace, rank: distributed.Rank = distributed.SINGLE) -> None:
    """Train in this process: the only one, or one of `rank.world_size` (then only rank 0 writes)."""
    stop = StopRequest().install()
    if rank.distributed:
        stop = distributed.AgreedStop(stop)
    t = set_up(env, job, rank)
    hp, args = t.hp, t.args
    progress, summary, best, stop_reason = resume(t, job, rank)
    if rank.is_main:
        outputs.write_labels(env.model_dir, t.classes)
        if job.held_out is not None:
            outputs.write_held_out(env.model_dir, job.held_out)
        outputs.write_args(env.model_dir, args)
        if progress.epoch > 0:  # resumed after the probe: the recipe is the one it chose
            log_settings(args)
        if best.checkpoint is not None:  # a restarted spot job's model/ starts empty
            save_checkpoint(env.model_dir / outputs.BEST_MODEL_FILE, best.checkpoint)
        write_epoch_outputs(env.model_dir, summary, best.record, t.classes, t.title)

    def save_progress() -> Path | None:
        if not rank.is_main:
            return None
        return save_state(env.checkpoint_dir, training_state(
            progress=progress, **t.trainables, summary=summary, best=best.record, best_model=best.checkpoint,
            finished=stop_reason, linear_probe=args.get("linear_probe"), hyperparameters=vars(hp),
            classes=t.classes, train_images=len(job.train_channel.samples), world_size=rank.world_size))

    started, epoch_seconds, startup = time.monotonic(), [], job.startup
    try:
        while stop_reason is None and progress.epoch <= hp.epochs:
            epoch, epoch_started = progress.epoch, time.monotonic()
            trained = (probe_epoch(t, rank, startup, stop) if epoch == 0 else
                       train_epoch(t, progress, stop, startup, rank))
            startup = None if epoch else startup  # said once per process: a resumed job says its own start-up again
            results = validate(t, trained.candidates, stop, rank)
            if startup is not None:
                startup.done("validating the linear probe")
            chosen = max(results, key=lambda name: (results[name].top1, -results[name].loss))
            result, seconds = results[chosen], time.monotonic() - epoch_started
            epoch_seconds += [seconds] if epoch else []
            # The classifier's (the highest with layer_decay); nothing was trained at it in the probe's epoch 0.
            lr_now = max(group["lr"] for group in t.optimizer.param_groups) if epoch else 0.0
            log_epoch(t, epoch, results, chosen, lr_now, trained, seconds, time.monotonic() - started, epoch_seconds)
            if epoch == 0 and rank.is_main:  # after the probe chose the recipe, which the settings then show
                log_settings(args)
            summary.append(summary_row(epoch, trained.loss, result, lr_now))
            args["failed_during_training"] = report_load_failures(epoch, [t.train_data, t.val_data])
            if best.beaten_by(result):
                best.take(epoch, result, chosen, trained.candidates[chosen], t, env.model_dir, rank.is_main)
            if rank.is_main:
                write_epoch_outputs(env.model_dir, summary, best.record, t.classes, t.title)
            if hp.early_stopping:
                stop_reason = early_stop_reason(epoch, best.record["epoch"], lr_now, t.lr, hp,
                                                t.schedule_epoch / len(t.train_loader))
            progress = Progress(epoch + 1)
            save_progress()
            if stop_reason:
                log.info("Stopping after epoch %d of %d: %s.", epoch, hp.epochs, stop_reason)
            elif stop:
                stop_reason = f"stopped by {stop.signal_name}"
                log.info("Stopped by %s after epoch %d; a restarted job resumes from its checkpoint.",
                         stop.signal_name, epoch)
    except Interrupted:
        if progress.epoch == 0:  # the probe or its validation: nothing trained yet, nothing to save
            log.info("Stopped by %s in epoch 0 (the linear probe), before training began: nothing to save; a "
                     "restarted job starts with the probe again.", stop.signal_name)
        else:  # saved before stop_reason is set: a restarted job must carry on from that batch, not finish
            path = save_progress()
            log.info("Stopped by %s in epoch %d after %d of %d batches; saved %s, which a restarted job resumes "
                     "from.", stop.signal_name, progress.epoch, progress.step, len(t.train_loader), path)
        stop_reason = f"stopped by {stop.signal_name}"
    except Exception as exc:  # out of memory, a data-loading worker killed: the reason says what to change
        raise explained(exc, hp.batch_size, t.workers, (t.train_data, t.val_data))
    if rank.is_main:
        finish(env, args, summary, best.record, stop_reason or "epochs done", time.monotonic() - started)


def log_settings(args: dict) -> None:
    text = yaml.safe_dump(report.capped(args), sort_keys=False, allow_unicode=True)
    log.info("Resolved settings (all of them in %s):\n%s", outputs.ARGS_FILE, shown_lines(text))


def set_up(env: SageMakerEnvironment, job: SimpleNamespace, rank: distributed.Rank) -> SimpleNamespace:
    """Everything an epoch needs, made once: the device, the model, the data, the optimizer and its schedule,
    and the settings args.yml records."""
    hp, train_channel, val_channel = job.hp, job.train_channel, job.val_channel
    classes = train_channel.classes
    if rank.distributed:
        job.startup.done(f"starting training process {rank.rank + 1} of {rank.world_size}")
    seed_everything(hp.seed + rank.rank)  # other dropout and augmentation in each process
    device = torch.device("cuda", rank.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and rank.is_main:
        log.warning("No GPU found (torch.cuda.is_available() is False): training on the CPU, many times slower. "
                    "Choose a GPU instance type (ml.g5, ml.g6, ml.p3, ...) for more than a small test.")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed image sizes: cuDNN times its kernels once, keeps the fastest
    autocast, amp_dtype = autocast_for(device)
    # Rank 0's checkpoint for all: another host's checkpoint folder may be empty or behind.
    job.resumed = distributed.broadcast_object(job.resumed, rank)
    start = None if job.resumed else read_model_channel(env.channel_dir("model"))
    # At the strongest dropout and drop-connect the recipe may choose: the probe's measurements may lower them.
    listing = recipe_for(hp)
    model = create_model(hp.model, classes, hp.pretrained_path, listing.drop, listing.drop_connect,
                         start=start).to(device)
    job.startup.done(f"building the model on the {'GPU' if device.type == 'cuda' else 'CPU'}")
    data_config = resolve_data_config(model, hp.img_size, hp.eval_img_size)
    workers = data_loading_workers_for(hp, rank.per_host)
    val_data = dataset_of(val_channel, eval_transform(data_config), hp.max_unusable_fraction, workers,
                          decode_side(data_config, training=False))
    # Every rank a different share, each image exactly once (no padding): the summed counts are the val set's.
    val_share = torch.utils.data.Subset(val_data, range(rank.rank, len(val_data), rank.world_size))
    val_loader = data_loader(val_share, workers, device, hp.seed + rank.rank, batch_size=hp.batch_size)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(train_channel) if hp.balance_classes else None,
                                        label_smoothing=hp.smoothing).to(device)
    ema, scaler = training_tools(model, hp, amp_dtype)
    args = {**vars(hp),
            "ignored_hyperparameters": job.ignored, "classes": classes, "num_classes": len(classes),
            "global_batch_size": hp.batch_size * rank.world_size,
            "checkpoint_dir": str(env.checkpoint_dir),
            "processes": rank.world_size, "effective_workers": workers, "device": describe(device),
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
            "train_images": len(train_channel.samples), "val_images": len(val_channel.samples),
            "train_images_per_class": train_channel.images_per_class(),
            "val_images_per_class": val_channel.images_per_class(),
            "skipped_files": {ch.name: ch.skipped_summary() for ch in (train_channel, val_channel)},
            "val_held_out_of_train": job.held_out is not None,
            "val_copies_of_train_images": {"count": len(job.copies), "first": [
                {"val": v, "train": t} for v, t in job.copies[:20]]},
            "training_job_name": env.training_job_name, "versions": versions()}
    t = SimpleNamespace(
        hp=hp, rank=rank, classes=classes, train_channel=train_channel, device=device, autocast=autocast, model=model,
        # Gradients averaged over all processes after each backward; parameters start as rank 0's.
        trained=torch.nn.parallel.DistributedDataParallel(model) if rank.distributed else model,
        # A new head is fitted as a linear probe first (epoch 0); a previous job's head for the same labels is kept.
        probe_first=not job.resumed and (start is None or start[1]["labels"] != classes),
        resolved_data_config=data_config, workers=workers, val_data=val_data, val_loader=val_loader,
        val_input=ModelInput(data_config, device), loss_fn=loss_fn, ema=ema,
        trainables=dict(model=model, ema=ema, scaler=scaler),
        slow_data=SlowDataWarning(workers, hp.workers, rank.per_host, device.type == "cuda", rank.is_main),
        args=args, title=f"{hp.model} on {len(classes)} classes, {env.training_job_name or 'local run'}")
    # A resumed job makes the choices its probe's measurements made; a new one makes them again after its probe.
    use_recipe(t, recipe_for(hp, (job.resumed[1].get("linear_probe") or {}).get("recipe") if job.resumed else None))
    return t


def use_recipe(t: SimpleNamespace, recipe: Recipe) -> None:
    """Make what fine-tuning trains with under `recipe`: the training images at its size and augmentation, the
    optimizer and its schedule. Made again, before any update, when the probe's measurements change the recipe."""
    from timm.scheduler import create_scheduler_v2

    hp, rank = t.hp, t.rank
    t.recipe, t.data_config = recipe, training_size_config(t.resolved_data_config, recipe)
    t.train_data = dataset_of(t.train_channel,
                              train_transform(t.data_config, recipe.aa, recipe.hflip, recipe.crop_scale),
                              hp.max_unusable_fraction, t.workers, decode_side(t.data_config, True, recipe.crop_scale))
    t.train_loader = data_loader(t.train_data, t.workers, t.device, hp.seed + rank.rank,
                                 batch_sampler=TrainBatches(len(t.train_data), hp.batch_size, hp.seed, rank.world_size,
                                                            rank.rank))
    t.train_input = ModelInput(t.data_config, t.device, recipe.reprob, hp.remode)
    set_regularisation(t.model, recipe.drop, recipe.drop_connect)
    t.eval_hflip = hp.eval_hflip and recipe.hflip > 0  # a model never shown mirror images can't be asked about them
    t.lr = hyperparameters.scaled_lr(recipe.lr, hp.batch_size, rank.world_size)
    t.optimizer = create_optimizer(t.model, hp, t.lr, recipe.opt)
    # Stepping every update makes warmup and decay smooth even with a handful of steps per epoch.
    t.schedule_epoch = schedule_epoch_updates(hp, len(t.train_loader))
    t.scheduler, _ = create_scheduler_v2(
        t.optimizer, sched=hp.sched, num_epochs=hp.epochs * len(t.train_loader) / t.schedule_epoch,
        decay_epochs=hp.decay_epochs, decay_rate=hp.decay_rate, warmup_lr=hp.warmup_lr,
        warmup_epochs=hp.warmup_epochs, step_on_epochs=False, updates_per_epoch=t.schedule_epoch)
    t.trainables.update(optimizer=t.optimizer, scheduler=t.scheduler)
    t.args.update(recipe.record(), effective_lr=t.lr, effective_eval_hflip=t.eval_hflip, data_config=t.data_config,
                  updates_per_epoch=len(t.train_loader), schedule_epoch_updates=t.schedule_epoch)


def resume(t: SimpleNamespace, job: SimpleNamespace, rank: distributed.Rank):
    """Where training starts: the checkpoint's place and records when resuming, else epoch 0 (the linear probe)
    or 1. Returns the progress, the summary rows, the best model and why training had finished, if it had."""
    if not job.resumed:
        return Progress(0 if t.probe_first else 1), [], BestModel(), None
    (path, state), job.resumed = job.resumed, None  # not kept twice in memory
    progress = restore_training_state(state, **t.trainables)
    if state.get("linear_probe"):
        t.args["linear_probe"] = state["linear_probe"]
    if rank.rank:
        seed_everything(t.hp.seed + rank.rank + 1000 * progress.epoch)  # the saved RNG states are rank 0's
    t.args["resumed_from"] = (f"{path} (epoch {progress.epoch}, after {progress.step} of {len(t.train_loader)} "
                              f"batches)")
    best = BestModel(state["best"], state["best_model"])
    log.info("Resuming from checkpoint %s: epoch %d, after %d of its %d batches; %s", path, progress.epoch,
             progress.step, len(t.train_loader), "no best model yet" if best.record is None else
             f"best so far top-1 {best.record['top1']:.4f}% at epoch {best.record['epoch']}")
    return progress, state["summary"], best, state["finished"]


def probe_epoch(t: SimpleNamespace, rank: distributed.Rank, startup: report.StartUp,
                stop: StopRequest) -> SimpleNamespace:
    """Epoch 0: the new classifier fitted as a linear probe on the frozen features."""
    started = time.monotonic()
    probe = linear_probe(t, rank, stop)
    if t.ema is not None:
        t.ema.set(t.model)
    recipe = recipe_for(t.hp, probe.measured["recipe"])
    if recipe != t.recipe:
        use_recipe(t, recipe)
    startup.done(f"fitting the linear probe on {probe.images} images")
    return SimpleNamespace(loss=probe.loss, data_wait=0.0, images=probe.images, candidates={"probe": t.model},
                           seconds=time.monotonic() - started, probe=probe)


def train_epoch(t: SimpleNamespace, progress: Progress, stop: StopRequest, startup: report.StartUp | None,
                rank: distributed.Rank) -> SimpleNamespace:
    """The rest of `progress.epoch`'s training; its candidates for the best model: the raw weights and the EMA."""
    started, seen_before = time.monotonic(), progress.seen
    loss, data_wait = train_one_epoch(t.trained, t.train_loader, t.train_input, t.loss_fn, t.optimizer, t.scheduler,
                                      t.ema, t.trainables["scaler"], t.autocast, progress, stop, startup, t.slow_data,
                                      t.recipe.freeze_batchnorm, t.hp.clip_grad, t.hp.clip_mode)
    t.slow_data.check(data_wait, time.monotonic() - started, f"epoch {progress.epoch}'s training")
    return SimpleNamespace(loss=loss, data_wait=data_wait, images=(progress.seen - seen_before) * rank.world_size,
                           candidates={"raw": t.model, **({"ema": t.ema.module} if t.ema else {})},
                           seconds=time.monotonic() - started, probe=None)


def validate(t: SimpleNamespace, candidates: dict, stop: StopRequest, rank: distributed.Rank) -> dict:
    """Every candidate's validation results, the same on every process."""
    for net in candidates.values():
        distributed.broadcast_buffers(net)
    # Ranks may hold different val shares, so not interruptible by batch there: validation is short.
    return evaluate(candidates, t.val_loader, t.val_input, t.autocast, len(t.classes), t.eval_hflip,
                    None if rank.distributed else stop)


def log_epoch(t: SimpleNamespace, epoch: int, results: dict, chosen: str, lr_now: float, trained: SimpleNamespace,
              seconds: float, elapsed: float, epoch_seconds: list[float]) -> None:
    """The epoch's line, which SageMaker's metric regexes read; the probe's own line after epoch 0."""
    hp, result = t.hp, results[chosen]
    log.info("epoch %d/%d %s lr=%.8f weights=%s%s images/s=%.1f training=%.0fs data_wait=%.1fs "
             "validation=%.0fs elapsed=%.0fs left<=%s", epoch, hp.epochs,
             metric_line({TRAIN_LOSS: trained.loss, VAL_LOSS: result.loss, VAL_ACC_1: result.top1,
                          VAL_ACC_5: result.top5}),
             lr_now, chosen, "" if len(results) == 1 else
             " (" + ", ".join(f"{name} acc_1={r.top1:.2f}" for name, r in results.items()) + ")",
             trained.images / max(trained.seconds, 1e-6), trained.seconds, trained.data_wait,
             seconds - trained.seconds, elapsed,
             report.duration((hp.epochs - epoch) * sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else "?")
    if trained.probe is not None:
        probe = trained.probe
        t.args["linear_probe"] = {"acc_1": result.top1, "loss": result.loss, "images": probe.images,
                                  "seconds": round(trained.seconds, 1), **probe.measured}
        log.info("Linear probe (epoch 0): validation top-1 %.2f%%, loss %.4f; fitted on the frozen features (%d) of "
                 "%d training images in %.1f s: features %.1f s, logistic regression %.1f s", result.top1,
                 result.loss, probe.features, probe.images, trained.seconds, probe.extract_seconds, probe.fit_seconds)
        for line in decisions(probe.measured):
            log.info("Recipe (auto): %s", line)
    if t.device.type == "cuda" and epoch and len(epoch_seconds) == 1:
        log.info("Peak GPU memory: %.1f GiB of %.1f GiB (batch_size=%d, img_size=%d)",
                 torch.cuda.max_memory_reserved(t.device) / 2**30,
                 torch.cuda.get_device_properties(t.device).total_memory / 2**30, hp.batch_size,
                 t.data_config["train_input_size"][-1])


def summary_row(epoch: int, train_loss: float, result: SimpleNamespace, lr_now: float) -> dict:
    return {"epoch": epoch, "train_loss": f"{train_loss:.6f}", "eval_loss": f"{result.loss:.6f}",
            "eval_top1": f"{result.top1:.6f}", "eval_top5": f"{result.top5:.6f}", "lr": f"{lr_now:.10f}"}


class BestModel:
    """The best model so far: its `record` (epoch, accuracy, per class, confusion, calibration) and its
    `checkpoint`, which rank 0 writes to model/ as soon as it is found. Better: a higher top-1, or the same with
    a lower validation loss."""

    def __init__(self, record: dict | None = None, checkpoint: dict | None = None):
        self.record, self.checkpoint = record, checkpoint

    def beaten_by(self, result: SimpleNamespace) -> bool:
        return self.record is None or (result.top1, -result.loss) > (self.record["top1"], -self.record["loss"])

    def take(self, epoch: int, result: SimpleNamespace, weights: str, net: torch.nn.Module, t: SimpleNamespace,
             model_dir: Path, write: bool) -> None:
        calibration = calibrate(result, len(t.classes))
        self.record = {"epoch": epoch, "top1": result.top1, "loss": result.loss, "weights": weights,
                       "per_class": dict(zip(t.classes, result.per_class)), "confusion": result.confusion,
                       "calibration": calibration}
        self.checkpoint = checkpoint_of(net, arch=t.hp.model, epoch=epoch, metric=result.top1, metric_name=VAL_ACC_1,
                                        weights=weights, labels=t.classes, num_classes=len(t.classes),
                                        data_config=t.data_config, eval_hflip=t.eval_hflip,
                                        temperature=calibration["temperature"], args=t.args)
        if write:
            save_checkpoint(model_dir / outputs.BEST_MODEL_FILE, self.checkpoint)
        # Not "validation:acc_1=": SageMaker's regex would record the value a second time.
        log.info("New best model: epoch %d, top-1 accuracy %.4f%% (%s weights); temperature %.3f takes its "
                 "calibration error (top-label ECE) from %.4f to %.4f", epoch, result.top1, weights,
                 calibration["temperature"], calibration["ece_before"], calibration["ece_after"])


def write_epoch_outputs(model_dir: Path, summary: list[dict], best: dict | None, classes: list[str],
                        title: str) -> None:
    """What a stopped job leaves beside its best model, rewritten every epoch."""
    outputs.write_summary(model_dir, summary)
    if best is not None:
        report.plot_metrics(model_dir / outputs.METRICS_PLOT_FILE, summary, best["epoch"], title)
        report.write_confusion_csv(model_dir / outputs.CONFUSION_FILE, classes, best["confusion"])


def finish(env: SageMakerEnvironment, args: dict, summary: list[dict], best: dict | None, stop_reason: str,
           seconds: float) -> None:
    args.update(epochs_completed=sum(int(row["epoch"]) > 0 for row in summary), stop_reason=stop_reason)  # not 0
    if best is None:
        outputs.write_args(env.model_dir, args)
        log.info("No epoch finished, so there is no model yet.")
        return
    scores = report.class_scores(best["confusion"])
    args.update(best_epoch=best["epoch"], best_acc_1=best["top1"], best_weights=best["weights"],
                best_per_class_acc_1=best["per_class"], best_macro_f1=report.macro_f1(scores),
                best_per_class_scores=dict(zip(best["per_class"], scores)), calibration=best["calibration"])
    outputs.write_args(env.model_dir, args)
    classes = list(best["per_class"])
    log.info("Done in %s after %d epochs (%s). Best model: epoch %d, top-1 accuracy %.4f%% (%s weights), "
             "saved to %s", report.duration(seconds), args["epochs_completed"], stop_reason, best["epoch"], best["top1"],
             best["weights"], env.model_dir / outputs.BEST_MODEL_FILE)
    calibration = best["calibration"]
    log.info("Calibration: the best model's log probabilities are divided by a temperature of %.4f fitted on the "
             "validation set (stored in the model, applied when serving): top-label ECE %.4f -> %.4f, "
             "validation loss %.4f -> %.4f", calibration["temperature"], calibration["ece_before"],
             calibration["ece_after"], best["loss"], calibration["loss_after"])
    log.info("Best model per class (validation; confidence: mean calibrated probability of its answers; macro F1, "
             "the mean of the classes' F1: %s):\n%s", "-" if args["best_macro_f1"] is None else
             f"{args['best_macro_f1']:.1f}%", report.per_class_table(classes, best["confusion"],
                                                                    calibration["per_class_confidence"]))
    log.info("Best model's confusion matrix (also in %s and, as curves, %s):\n%s", outputs.CONFUSION_FILE,
             outputs.METRICS_PLOT_FILE, report.confusion_text(classes, best["confusion"]))
    if env.training_job_name is None:
        # SageMaker packs model/ itself; a plain `docker run` should still hand over the same artifact.
        log.info("Packed %s", outputs.pack_model(env.model_dir))


def linear_probe(t: SimpleNamespace, rank: distributed.Rank, stop: StopRequest) -> SimpleNamespace:
    """Fit the classifier on the frozen features of (a capped sample of) the training images, seen as validation
    sees them, each process extracting a share; then, for the choices left to the job, score it on those images as
    fine-tuning would see them (recipe.py). A stop is acted on at the next batch in one process, and between the
    phases and measurements in several, where all must stop at the same point."""
    hp, channel, config, classes = t.hp, t.train_channel, t.resolved_data_config, len(t.train_channel.classes)
    sample = probe_sample(channel.samples, classes, hp.seed)
    measured = [sample[i] for i in probe_sample([channel.samples[i] for i in sample], classes, hp.seed,
                                                MEASURED_IMAGES)]

    def share_of(images: list[int], transform, side: int = decode_side(config, training=False), **batching):
        chosen = torch.utils.data.Subset(dataset_of(channel, transform, hp.max_unusable_fraction, t.workers, side),
                                         images)
        return data_loader(torch.utils.data.Subset(chosen, range(rank.rank, len(images), rank.world_size)),
                           t.workers, t.device, hp.seed + rank.rank, batch_size=hp.batch_size, **batching)

    by_batch = None if rank.distributed else stop
    log.info("Linear probe: the frozen features of %d training images", len(sample))
    probe = fit_linear_probe(t.model, share_of(sample, eval_transform(config)), t.val_input, t.autocast,
                             classes, t.loss_fn, stop, by_batch)

    def measure(view: Recipe, kind: str) -> float | None:
        stop_here(stop)
        with random_numbers_untouched(t.device):  # measuring must not change what training draws
            if kind == "batch_statistics":  # shuffled: a batch of one class has statistics no training batch has
                return probe_top1(t.model, share_of(measured, eval_transform(config), shuffle=True), t.val_input,
                                  t.autocast, batch_statistics=True, stop=by_batch)
            if kind == "regularisation":
                set_regularisation(t.model, view.drop, view.drop_connect)
                try:
                    return probe_top1(t.model, share_of(measured, eval_transform(config)), t.val_input, t.autocast,
                                      dropout=True, stop=by_batch)
                finally:
                    set_regularisation(t.model, t.recipe.drop, t.recipe.drop_connect)
            sized = training_size_config(config, view)
            return probe_top1(t.model, share_of(measured, train_transform(sized, view.aa, view.hflip, view.crop_scale),
                                                decode_side(sized, True, view.crop_scale)),
                              ModelInput(sized, t.device, view.reprob, hp.remode), t.autocast, stop=by_batch)

    log.info("Linear probe: measuring which parts of the training recipe keep its answers, on %d of its images",
             len(measured))
    probe.measured = choose(hp, probe.top1, measure)
    return probe


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


def calibrate(result: SimpleNamespace, num_classes: int) -> dict:
    """The temperature that calibrates a model's validation answers, and what it changes: plain numbers, for
    args.yml and the checkpoint."""
    temperature = fit_temperature(result.log_probabilities, result.targets)
    scaled = calibrated(result.log_probabilities, temperature)
    confidence = scaled.exp().max(dim=1).values
    per_class = torch.bincount(result.targets, weights=confidence, minlength=num_classes) / \
        torch.bincount(result.targets, minlength=num_classes).clamp(min=1)
    return {"temperature": temperature, "ece_before": top_label_ece(result.log_probabilities, result.targets),
            "ece_after": top_label_ece(scaled, result.targets),
            "loss_after": float(F.nll_loss(scaled, result.targets)) if len(result.targets) else float("nan"),
            "per_class_confidence": per_class.tolist()}


def schedule_epoch_updates(hp, updates_per_epoch: int) -> int:
    """The updates an epoch lasts for the learning-rate schedule, warmup and early stopping: a pass over the
    training set, but at least MIN_SCHEDULE_EPOCH_UPDATES, as far as `epochs` leaves room for the warmup and
    the first decay. On a set of a few hundred images a pass is ten updates: decays every 2.4 of them would
    end the run after ~25 updates at a useful rate, before rmsproptf's step size has even grown."""
    run = hp.epochs * updates_per_epoch
    room = run / max(hp.warmup_epochs + hp.decay_epochs, 1.0)
    return max(updates_per_epoch, min(hyperparameters.MIN_SCHEDULE_EPOCH_UPDATES, round(room)))


def training_tools(model: torch.nn.Module, hp, amp_dtype: torch.dtype | None):
    """The weights' moving average (EMA, if asked for) and, for float16 only, the gradient scaler: what the job
    trains with besides the optimizer, and what scripts/benchmark_speed.py times."""
    # Warmup makes the average follow the weights early on; without it, decay 0.9999 keeps the
    # random classifier head for thousands of steps, far longer than a small data set trains.
    ema = model_ema(model, decay=hp.model_ema_decay, use_warmup=True) if hp.model_ema else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return ema, scaler


def model_ema(model: torch.nn.Module, **settings):
    """timm's ModelEmaV3, updating the same tensors with the same arithmetic, but from lists of them made at the
    first update. timm's own update walks both models' state_dict() every step: for efficientnet_b3 about 1,150
    detach calls and 78 copies of BatchNorm's one-number batch counters, 1,227 operations of the main thread's
    time per step against 2, time that a fast GPU spends waiting at the listing's batch size. The lists hold the
    tensors themselves, which loading a checkpoint and the optimizer change in place."""
    from timm.utils import ModelEmaV3

    class ModelEma(ModelEmaV3):
        tensors = None

        def apply_update_(self, model, decay):
            if self.tensors is None:
                pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
                averaged = [pair for pair in pairs if pair[0].is_floating_point()]
                copied = [pair for pair in pairs if not pair[0].is_floating_point()]  # the batch counters
                self.tensors = ([ours for ours, _ in averaged], [theirs for _, theirs in averaged],
                                [ours for ours, _ in copied], [theirs for _, theirs in copied])
            averages, sources, counters, counts = self.tensors
            self._foreach_lerp_(averages, sources, weight=1. - decay)
            if counters:
                torch._foreach_copy_(counters, counts)

    return ModelEma(model, **settings)


def output_sizes(hp, num_classes: int) -> tuple[int, int]:
    """The bytes of the best model and of one checkpoint: the weights, their average (EMA), the best model and the
    optimizer's state, from the model on the meta device: no memory, 0.2 s for efficientnet_b3."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(hp.model, num_classes=num_classes)
    weights = tensor_bytes(model.state_dict().values())
    optimizer_state = tensor_bytes(model.parameters()) * optimizer_state_per_weight(hp)
    return weights, weights * (2 + hp.model_ema) + round(optimizer_state)


def optimizer_state_per_weight(hp) -> float:
    """Bytes of optimizer state per byte of weights: 1 for SGD (auto's), 2 for RMSprop and Adam, 3 for MADGRAD, ...
    Measured by one step of the real optimizer on a tiny stand-in model, as the state only exists after a step, and
    some optimizers' steps cannot run on the meta device; a step of efficientnet_l2 itself would take 8 GB."""
    import timm

    stand_in = timm.create_model("test_efficientnet", num_classes=2)
    for weight in stand_in.parameters():
        weight.grad = torch.zeros_like(weight)
    recipe = recipe_for(hp)
    optimizer = create_optimizer(stand_in, hp, hyperparameters.scaled_lr(recipe.lr, hp.batch_size), recipe.opt)
    optimizer.step()
    state = tensor_bytes(value for weight_state in optimizer.state.values() for value in weight_state.values())
    return state / tensor_bytes(stand_in.parameters())


def tensor_bytes(values) -> int:
    return sum(value.numel() * value.element_size() for value in values if torch.is_tensor(value))


def create_optimizer(model: torch.nn.Module, hp, lr: float, opt: str) -> torch.optim.Optimizer:
    """timm's optimizer `opt`; with layer_decay < 1 the classifier gets lr and each block below it less,
    so the new head learns at full speed while the pretrained features only adapt."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=hp.weight_decay,
                               eps=hp.opt_eps, layer_decay=hp.layer_decay if hp.layer_decay < 1 else None)


def fitted_batch_size(batch_size: int, train_images: int, processes: int = 1) -> int:
    """`batch_size`, or a process's share of the training set where that is smaller: every training step takes a
    full batch in each process (a short last batch would be a noisy step), so a larger batch would never train. A
    small first set with the default batch trains with what there is, saying so; below two images a process (what
    BatchNorm needs to normalise a batch) no batch makes sense, and the job fails."""
    share = train_images // processes
    among = f", shared among {processes} training processes (one per GPU)" if processes > 1 else ""
    if share < 2:
        raise JobError(f"The training set is too small to train on: {train_images} usable images in 'train'{among} "
                       f"leave fewer than 2 a batch, and a training step needs at least 2. Add training images"
                       f"{' or use fewer GPUs' if processes > 1 else ''}.")
    if batch_size > share:
        log.warning("batch_size=%d is larger than the training set (%d usable images in 'train'%s): training with "
                    "batches of %d, the largest that fits (the learning rate scales with it).", batch_size,
                    train_images, among, share)
    return min(batch_size, share)


def early_stop_reason(epoch: int, best_epoch: int, lr_now: float, peak_lr: float, hp,
                      passes_per_schedule_epoch: float = 1.0) -> str | None:
    """Why to stop after `epoch`, if it is time to; patience and warmup count epochs of the schedule, each
    `passes_per_schedule_epoch` passes over the training set (more than one on a small set)."""
    patience = math.ceil(hp.early_stopping_patience * passes_per_schedule_epoch - 1e-9)
    if epoch - best_epoch >= patience:
        return (f"no better model for {patience} epochs (early_stopping_patience={hp.early_stopping_patience}"
                + (f", of {passes_per_schedule_epoch:.3g} passes each on this small training set)"
                   if passes_per_schedule_epoch > 1 else ")"))
    if epoch > hp.warmup_epochs * passes_per_schedule_epoch and \
            lr_now <= peak_lr * hyperparameters.LR_EXHAUSTED * (1 + 1e-6):
        return (f"the learning rate has decayed to {lr_now:.3g}, 1/{1 / hyperparameters.LR_EXHAUSTED:.0f} "
                f"of its peak {peak_lr:.3g} or less, so further epochs would change little")
    return None


def class_weights(channel) -> torch.Tensor:
    """Inverse class frequency, normalised so that a balanced data set gets weights of 1."""
    counts = torch.tensor(list(channel.images_per_class().values()), dtype=torch.float)
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def train_one_epoch(model, loader, to_input: ModelInput, loss_fn, optimizer, scheduler, ema, scaler, autocast,
                    progress: Progress, stop: StopRequest, startup: report.StartUp | None = None,
                    slow_data: SlowDataWarning | None = None, frozen_batchnorm: bool = False, clip_grad: float = 0.0,
                    clip_mode: str = "agc") -> tuple[float, float]:
    """Train the rest of `progress.epoch` (all of it unless resuming), counting batches in `progress`;
    given the job's start-up so far, say where the time to the first step went. Returns the mean training
    loss and the seconds spent waiting for the loader's next batch (beyond the first; the longest wait of any
    process, as the others wait for the slowest at every step): more than a small share of the epoch means the
    GPU waits on JPEG decoding and augmentation."""
    if startup is not None:
        startup.done("setting up training")
    model.train()
    if frozen_batchnorm:  # normalised as the pretrained network was (BatchNorm's scales and shifts still train)
        set_batchnorm_training(model, False)
    loader.batch_sampler.start_epoch(progress.epoch, skip_batches=progress.step)
    device = to_input.device
    loss_sum = torch.tensor(progress.loss_sum, device=device)  # no .item() per step: a sync would stall the GPU
    started, first_step, last_report = time.monotonic(), progress.step, time.monotonic()
    data_wait, asked = 0.0, None  # from the second batch on: the first one waits for the workers to (re)start
    for images, targets in loader:
        if asked is not None:
            data_wait += time.monotonic() - asked
        elif startup is not None:
            startup.done("first batch (the loader's workers starting)")
        images, targets = to_input(images), targets.to(device, non_blocking=True)
        loss = train_step(model, images, targets, loss_fn, optimizer, scaler, autocast, clip_grad, clip_mode)
        progress.step += 1
        num_updates = (progress.epoch - 1) * len(loader) + progress.step
        if ema is not None:
            ema.update(model, step=num_updates)
        scheduler.step_update(num_updates)
        loss_sum += loss.detach() * len(targets)
        progress.seen += len(targets)
        if startup is not None:
            loss.item()  # waits for the GPU, once
            startup.done("first step (CUDA loading and cuDNN timing the kernels)" if device.type == "cuda"
                         else "first step")
            log.info(startup.line())
            startup = None
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            rate = (progress.step - first_step) * len(targets) / (last_report - started)
            log.info("epoch %d: %d/%d batches, %.1f images/s, waiting for data %.0f%% of the time, epoch's training "
                     "done in ~%s", progress.epoch, progress.step, len(loader), rate,
                     100 * data_wait / (last_report - started),
                     report.duration((len(loader) - progress.step) * len(targets) / max(rate, 1e-6)))
            if slow_data is not None:
                slow_data.check(data_wait, last_report - started, f"epoch {progress.epoch} so far")
        if stop:  # before the next batch is loaded, so a resumed run draws the same random numbers
            progress.loss_sum = loss_sum.item()
            raise Interrupted
        asked = time.monotonic()
    progress.loss_sum = loss_sum.item()
    totals = distributed.sum_over_ranks(torch.tensor([progress.loss_sum, progress.seen], dtype=torch.float64,
                                                     device=device))
    mean_loss = (totals[0] / totals[1].clamp(min=1)).item()
    data_wait = distributed.max_over_ranks(torch.tensor([data_wait], dtype=torch.float64, device=device)).item()
    if not np.isfinite(mean_loss):
        raise JobError(f"Training diverged in epoch {progress.epoch}: the training loss is {mean_loss}. Lower lr "
                       f"(it is scaled to the batch size from a batch of {hyperparameters.LR_REFERENCE_BATCH}) "
                       f"or raise warmup_epochs.")
    return mean_loss, data_wait


def train_step(model, images, targets, loss_fn, optimizer, scaler, autocast, clip_grad: float = 0.0,
               clip_mode: str = "agc") -> torch.Tensor:
    """One update of the weights on one batch, its gradient clipped first if `clip_grad`; the loss stays on the
    device (reading it would wait for it)."""
    from timm.utils import dispatch_clip_grad

    with autocast():
        loss = loss_fn(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # float16: scaled so that small gradients do not underflow
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)  # clipped as they are, not as scaled
            dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad:
            dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
        optimizer.step()
    return loss


@torch.no_grad()
def evaluate(models: dict[str, torch.nn.Module], loader, to_input: ModelInput, autocast, num_classes: int,
             mirror: bool, stop: StopRequest | None = None) -> dict[str, SimpleNamespace]:
    """Loss, top-1/top-5 accuracy, confusion matrix and log probabilities of each model on the whole val set (of
    all processes). One pass over the images for all the models: decoding them is often the slow part."""
    from timm.utils import accuracy

    device = to_input.device
    top_k = min(5, num_classes)  # top-5 over fewer than 5 classes would fail; it is then over all of them
    for model in models.values():
        model.eval()
    # Per model: loss, top-1 and top-k summed over images, and true x predicted counts; one sync at the end.
    sums = {name: torch.zeros(3, device=device) for name in models}
    confusion = {name: torch.zeros(num_classes * num_classes, dtype=torch.long, device=device) for name in models}
    answers = {name: [torch.zeros(0, num_classes, device=device)] for name in models}  # for calibration
    labels = [torch.zeros(0, dtype=torch.long, device=device)]
    for images, targets in loader:
        if stop:
            raise Interrupted
        images, targets = to_input(images), targets.to(device, non_blocking=True)
        labels.append(targets)
        for name, model in models.items():
            with autocast():
                log_probabilities = predict_log_probabilities(model, images, mirror)
            answers[name].append(log_probabilities)
            top1, topk = accuracy(log_probabilities, targets, topk=(1, top_k))  # percentages of this batch
            sums[name] += torch.stack([F.nll_loss(log_probabilities, targets, reduction="sum"),
                                       top1 * len(targets), topk * len(targets)])
            confusion[name] += torch.bincount(targets * num_classes + log_probabilities.argmax(dim=1),
                                              minlength=num_classes * num_classes)
    targets = distributed.rows_of_all(torch.cat(labels), loader.dataset).cpu()
    return {name: _evaluation(distributed.sum_over_ranks(sums[name]), distributed.sum_over_ranks(confusion[name]),
                              num_classes, distributed.rows_of_all(torch.cat(answers[name]), loader.dataset).cpu(),
                              targets) for name in models}


def _evaluation(sums: torch.Tensor, confusion: torch.Tensor, num_classes: int, log_probabilities: torch.Tensor,
                targets: torch.Tensor) -> SimpleNamespace:
    loss, top1, top5 = (sums / confusion.sum()).tolist()  # over every image of the val set, once
    confusion = confusion.view(num_classes, num_classes).tolist()
    per_class = [100 * row[index] / sum(row) if sum(row) else None for index, row in enumerate(confusion)]
    return SimpleNamespace(loss=loss, top1=top1, top5=top5, per_class=per_class, confusion=confusion,
                           log_probabilities=log_probabilities, targets=targets)


def data_loader(dataset, workers: int, device: torch.device, seed: int, **batching) -> torch.utils.data.DataLoader:
    """The job's loaders: pinned memory for the GPU, workers kept from epoch to epoch, and a random generator
    of their own (drawing from the global one would shift it, and a resumed run would differ)."""
    return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
                                       **batching)


def data_loading_workers_for(hp, processes_on_this_host: int) -> int:
    """`workers` as given, or for -1 (the default) as many as the cores allow."""
    return hp.workers if hp.workers >= 0 else data_loading_workers(processes_on_this_host)


def data_loading_workers(processes_on_this_host: int) -> int:
    """Every CPU core this job may use, but one for each training process, shared among the processes."""
    return max(usable_cores() // processes_on_this_host - 1, 0)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SlowDataWarning:
    """Says once, at the first progress line or epoch end that shows it, that training spends more than
    `SHARE` of its time waiting for the loaders' next batch, and what to change: on a GPU that share of the
    bill buys nothing. Within a minute of the first step, not after a long first epoch."""

    SHARE, MIN_SECONDS = 0.1, 1.0

    def __init__(self, workers: int, workers_asked: int, processes_on_this_host: int, gpu: bool, speaks: bool):
        self.workers, self.workers_asked, self.processes, self.gpu = workers, workers_asked, processes_on_this_host, gpu
        self.pending = speaks  # only rank 0 speaks: every rank's loaders are alike

    def check(self, waited: float, seconds: float, what: str) -> None:
        if self.pending and waited > max(self.SHARE * seconds, self.MIN_SECONDS):
            self.pending = False
            log.warning(self.advice(waited, seconds, what))

    def advice(self, waited: float, seconds: float, what: str) -> str:
        idle = "the GPU stood idle" if self.gpu else "training stood still"
        loaders = (f"{self.workers} data-loading worker process{'es' if self.workers > 1 else ''}" if self.workers
                   else "the training process itself (workers=0)")
        said = (f"Training waited for data {waited:.0f} s of the {seconds:.0f} s of {what} ({waited / seconds:.0%}): "
                f"{idle} while {loaders} decoded and augmented images. ")
        possible, cores = data_loading_workers(self.processes), usable_cores()
        host = f"{cores} core{'s' if cores != 1 else ''}, {self.processes} training process" + \
            ("es" if self.processes != 1 else "")
        if self.workers < possible:
            return said + (f"workers={self.workers_asked} is set; set workers=-1 (the default) to use {possible} on "
                           f"this host ({host}).")
        return said + (f"Loading already has every core but one per training process ({host}): choose "
                       f"an instance type with more vCPUs for each GPU, or make each image cheaper to load: aa=none "
                       f"(no RandAugment), a smaller img_size, or images stored nearer the training size (large "
                       f"PNGs are decoded in full; JPEGs already at a reduced scale).")


def process_started_at() -> float:
    """When this process started (its imports included), as time.time() counts."""
    try:
        with open("/proc/self/stat") as f:  # field 22: clock ticks after boot; the name may hold spaces
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    import PIL
    import timm
    import torchvision

    return {"efficientnet_train": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "timm": timm.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda or "none"}


if __name__ == "__main__":
    sys.exit(main())
