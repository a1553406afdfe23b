"""`train`: the SageMaker training job, from image folders to a fine-tuned EfficientNet.

The job's story: `prepare` checks what can be checked without the model (once per host), `run` trains in each
process (epoch 0 the linear probe, then fine-tuning, validating and keeping the best model after each epoch), and
`finish` (best_model.py's, with the best model so far) writes what the buyer keeps. The epoch loop is engine.py's,
the optimizer and schedule optimisation.py's, the probe and the recipe it chooses linear_probe.py's and recipe.py's,
the machine's arithmetic resources.py's.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import distributed, hyperparameters, linear_probe, outputs, report
from .best_model import BestModel, finish, score_of, summary_row, write_epoch_outputs
from .checkpoints import (CHECKPOINT_NAME, Progress, check_resumable, load_latest_state, restore_training_state,
                          room_for_checkpoints, save_state, training_state)
from .channels import check_channels_differ, copies_across, warn_about_copies, warn_about_thin_classes
from .data import report_load_failures
from .engine import Evaluation, evaluate, seed_everything, train_one_epoch
from .errors import JobError
from .failures import explained
from .holdout import held_out_rows, hold_out
from .label_manifest import scan
from .manifests import images_folder
from .metrics import VAL_ACC_1, VAL_ACC_5, VAL_LOSS, VAL_MAP, TRAIN_LOSS, metric_line
from .model import pretrained_source, save_checkpoint
from .optimisation import early_stop_reason
from .recipe import Recipe, decisions, probe_record_read, recipe_for
from .resources import fitted_batch_size, output_sizes, process_started_at
from .sagemaker import DEBUG_VARIABLE, SageMakerEnvironment
from .session import FineTuning, Job, Session, fine_tuning, set_up, trainables
from .stopping import Interrupted, StopRequest
from .untrusted import shown, shown_lines

log = logging.getLogger("efficientnet_train")


@dataclass(frozen=True)
class EpochTraining:
    """An epoch's training: its mean loss, data wait, images and time, the candidates for the best model (name:
    network), and in epoch 0 the probe."""
    loss: float
    data_wait: float
    images: int
    candidates: dict
    seconds: float
    probe: linear_probe.ProbeStart | None = None


def main() -> int:
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


def prepare(env: SageMakerEnvironment, world_size: int, startup: report.StartUp) -> Job:
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
    train_channel = scan("train", images_folder(env, "train"), max_unusable_fraction=hp.max_unusable_fraction)
    log.info(train_channel.inventory())
    classes = train_channel.classes
    if len(classes) < 2:
        raise JobError(f"The 'train' channel has one class ({classes[0]}); a classifier needs at least two. "
                       f"Add a folder of images for each other label to {train_channel.root}.")
    held_out = None
    if env.channel_dir("val").exists() or env.input_mode("val") == "Pipe":
        val_channel = scan("val", images_folder(env, "val"), classes=classes,
                           max_unusable_fraction=hp.max_unusable_fraction, multi_label=train_channel.multi_label)
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
        check_resumable(*resumed, vars(hp), classes, len(train_channel.samples), world_size,
                        len(val_channel.samples), val_channel.images_per_class())
    # On every host, though only the first one writes: all have the same storage and the same copy of the data,
    # and each fails at once with this reason instead of waiting for the first one to meet them.
    model_bytes, checkpoint_bytes = output_sizes(hp, len(classes))
    outputs.check_room({
        env.model_dir: (2 * model_bytes,
                        f"the best model ({outputs.megabytes(model_bytes)}) and the copy replacing it"),
        env.checkpoint_dir: room_for_checkpoints(env.checkpoint_dir, checkpoint_bytes)})
    startup.done("checking the data and the disk (checkpoints and free space)")
    return Job(hp=hp, ignored=ignored, train_channel=train_channel, val_channel=val_channel, held_out=held_out,
               copies=copies, resumed=resumed, startup=startup)


def run(env: SageMakerEnvironment, job: Job, rank: distributed.Rank = distributed.SINGLE) -> None:
    """Train in this process: the only one, or one of `rank.world_size` (then only rank 0 writes)."""
    # A distributed job's training processes hear a terminal's Ctrl-C twice (from it, and passed on by the launcher,
    # whose own second Ctrl-C ends them all at once).
    stop = StopRequest(at_once_on_second_interrupt=not rank.distributed).install()
    if rank.distributed:
        stop = distributed.AgreedStop(stop)
    # Rank 0's checkpoint for all: another host's checkpoint folder may be empty or behind. Handed over, not kept
    # twice in memory: resume() loads it into the model and the optimizer.
    resumed, job.resumed = distributed.broadcast_object(job.resumed, rank), None
    s = set_up(env, job, resumed is not None, rank)
    hp, args = s.hp, s.args
    # A resumed job takes the recipe its probe chose; a new one the listing's until its probe has chosen.
    probe_record = probe_record_read(resumed[1].get("linear_probe")) if resumed else None
    tuning = fine_tuning(s, recipe_for(hp, probe_record["recipe"] if probe_record else None))
    args.update(tuning.record(), **({"linear_probe": probe_record} if probe_record else {}))
    progress, summary, best, stop_reason = resume(s, tuning, resumed, rank)
    del resumed
    if rank.is_main:
        write_first_outputs(env.model_dir, job, s, progress, summary, best)

    def save_progress() -> Path | None:
        if not rank.is_main:
            return None
        return save_state(env.checkpoint_dir, training_state(
            progress=progress, **trainables(s, tuning), summary=summary, best=best.record, best_model=best.checkpoint,
            finished=stop_reason, linear_probe=args.get("linear_probe"), hyperparameters=vars(hp),
            classes=s.classes, train_images=len(job.train_channel.samples), world_size=rank.world_size,
            val_images=args["val_images"], val_images_per_class=args["val_images_per_class"]))

    started, epoch_seconds, startup = time.monotonic(), [], job.startup
    try:
        while stop_reason is None and progress.epoch <= hp.epochs:
            epoch, epoch_started = progress.epoch, time.monotonic()
            if epoch == 0:
                trained = probe_epoch(s, tuning.recipe, rank, stop)
                chosen_recipe = recipe_for(hp, trained.probe.choices["recipe"])
                if chosen_recipe != tuning.recipe:
                    tuning = fine_tuning(s, chosen_recipe)
                    args.update(tuning.record())
                startup.done(f"fitting the linear probe on {trained.images} images")
            else:
                trained = train_epoch(s, tuning, progress, stop, startup, rank)
                startup = None  # said once per process: a resumed job says its own start-up again
            results = validate(s, tuning, trained.candidates, stop)
            if startup is not None:
                startup.done("validating the linear probe")
            chosen = max(results, key=lambda name: (results[name].score, -results[name].loss))
            result, seconds = results[chosen], time.monotonic() - epoch_started
            epoch_seconds += [seconds] if epoch else []
            # The classifier's (the highest with layer_decay); nothing was trained at it in the probe's epoch 0.
            lr_now = max(group["lr"] for group in tuning.optimizer.param_groups) if epoch else 0.0
            log_epoch(s, tuning, epoch, results, chosen, lr_now, trained, seconds, time.monotonic() - started,
                      epoch_seconds)
            if trained.probe is not None:
                args["linear_probe"] = {**trained.probe.record(result.top1, result.loss, trained.seconds),
                                        **({"mAP": result.mean_ap} if result.mean_ap is not None else {})}
                log_probe(trained.probe, result, trained.seconds)
                if rank.is_main:  # after the probe chose the recipe, which the settings then show
                    log_settings(args)
            summary.append(summary_row(epoch, trained.loss, result, lr_now))
            args["failed_during_training"] = report_load_failures(epoch, [tuning.train_data, s.val_data])
            if best.beaten_by(result):
                best.take(epoch, result, chosen, trained.candidates[chosen], s, tuning, env.model_dir, rank.is_main)
            if rank.is_main:
                write_epoch_outputs(env.model_dir, args, summary, best.record, s.classes, s.title)
            if hp.early_stopping:
                stop_reason = early_stop_reason(epoch, best.record["epoch"], lr_now, tuning.lr, hp,
                                                tuning.schedule_epoch / len(tuning.train_loader))
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
                     "from.", stop.signal_name, progress.epoch, progress.step, len(tuning.train_loader), path)
        stop_reason = f"stopped by {stop.signal_name}"
    except Exception as exc:  # out of memory, a data-loading worker killed: the reason says what to change
        raise explained(exc, hp.batch_size, s.workers, (tuning.train_data, s.val_data))
    if rank.is_main:
        finish(env, args, summary, best.record, stop_reason or "epochs done", time.monotonic() - started)


def write_first_outputs(model_dir: Path, job: Job, s: Session, progress: Progress, summary: list[dict],
                        best: "BestModel") -> None:
    """model/ before the first epoch: the labels, the held-out images, the settings, and for a resumed job its best
    model and records so far (a restarted spot job's model/ starts empty)."""
    outputs.write_labels(model_dir, s.classes)
    if job.held_out is not None:
        outputs.write_held_out(model_dir, job.held_out)
    if progress.epoch > 0:  # resumed after the probe: the recipe is the one it chose
        log_settings(s.args)
    if best.checkpoint is not None:
        save_checkpoint(model_dir / outputs.BEST_MODEL_FILE, best.checkpoint)
    write_epoch_outputs(model_dir, s.args, summary, best.record, s.classes, s.title)


def log_settings(args: dict) -> None:
    text = yaml.safe_dump(report.capped(args), sort_keys=False, allow_unicode=True)
    log.info("Resolved settings (all of them in %s):\n%s", outputs.ARGS_FILE, shown_lines(text))


def resume(s: Session, tuning: FineTuning, resumed: tuple | None, rank: distributed.Rank):
    """Where training starts: the checkpoint's place and records when resuming, else epoch 0 (the linear probe)
    or 1. Returns the progress, the summary rows, the best model and why training had finished, if it had."""
    if not resumed:
        return Progress(0 if s.probe_first else 1), [], BestModel(), None
    path, state = resumed
    progress = restore_training_state(state, **trainables(s, tuning))
    if rank.rank:
        seed_everything(s.hp.seed + rank.rank + 1000 * progress.epoch)  # the saved RNG states are rank 0's
    s.args["resumed_from"] = (f"{path} (epoch {progress.epoch}, after {progress.step} of "
                              f"{len(tuning.train_loader)} batches)")
    best = BestModel(state["best"], state["best_model"])
    log.info("Resuming from checkpoint %s: epoch %d, after %d of its %d batches; %s", path, progress.epoch,
             progress.step, len(tuning.train_loader), "no best model yet" if best.record is None else
             f"best so far {'mAP' if 'mean_ap' in best.record else 'top-1'} {score_of(best.record):.4f}% at epoch "
             f"{best.record['epoch']}")
    return progress, state["summary"], best, state["finished"]


def probe_epoch(s: Session, recipe: Recipe, rank: distributed.Rank, stop: StopRequest) -> EpochTraining:
    """Epoch 0: the new classifier fitted as a linear probe on the frozen features, and the recipe's choices."""
    started = time.monotonic()
    probe = linear_probe.start(s.model, s.train_channel, s.resolved_data_config, recipe, s.hp, workers=s.workers,
                               device=s.device, to_input=s.val_input, autocast=s.autocast, loss_fn=s.loss_fn,
                               rank=rank, stop=stop)
    if s.ema is not None:
        s.ema.set(s.model)
    return EpochTraining(loss=probe.fit.loss, data_wait=0.0, images=probe.fit.images, candidates={"probe": s.model},
                         seconds=time.monotonic() - started, probe=probe)


def train_epoch(s: Session, tuning: FineTuning, progress: Progress, stop: StopRequest,
                startup: report.StartUp | None, rank: distributed.Rank) -> EpochTraining:
    """The rest of `progress.epoch`'s training; its candidates for the best model: the raw weights and the EMA."""
    started, seen_before = time.monotonic(), progress.seen
    loss, data_wait = train_one_epoch(s.stepped, tuning.train_loader, tuning.train_input, s.loss_fn, tuning.optimizer,
                                      tuning.scheduler, s.ema, s.scaler, s.autocast, progress, stop, startup,
                                      s.slow_data, tuning.recipe.freeze_batchnorm, s.hp.clip_grad, s.hp.clip_mode)
    s.slow_data.check(data_wait, time.monotonic() - started, f"epoch {progress.epoch}'s training")
    return EpochTraining(loss=loss, data_wait=data_wait, images=(progress.seen - seen_before) * rank.world_size,
                         candidates={"raw": s.model, **({"ema": s.ema.module} if s.ema else {})},
                         seconds=time.monotonic() - started)


def validate(s: Session, tuning: FineTuning, candidates: dict, stop: StopRequest) -> dict[str, Evaluation]:
    """Every candidate's validation results, the same on every process."""
    for net in candidates.values():
        distributed.broadcast_buffers(net)
    return evaluate(candidates, s.val_loader, s.val_input, s.autocast, len(s.classes), tuning.eval_hflip, stop,
                    s.train_channel.multi_label)


def log_epoch(s: Session, tuning: FineTuning, epoch: int, results: dict, chosen: str, lr_now: float,
              trained: EpochTraining, seconds: float, elapsed: float, epoch_seconds: list[float]) -> None:
    """The epoch's line, which SageMaker's metric regexes read."""
    hp, result = s.hp, results[chosen]
    log.info("epoch %d/%d %s lr=%.8f weights=%s%s images/s=%.1f training=%.0fs data_wait=%.1fs "
             "validation=%.0fs elapsed=%.0fs left<=%s", epoch, hp.epochs,
             metric_line({TRAIN_LOSS: trained.loss, VAL_LOSS: result.loss,
                          **({VAL_MAP: result.mean_ap} if result.mean_ap is not None else
                             {VAL_ACC_1: result.top1, VAL_ACC_5: result.top5})}),
             lr_now, chosen, "" if len(results) == 1 else
             " (" + ", ".join(f"{name} {'mAP' if r.mean_ap is not None else 'acc_1'}={r.score:.2f}"
                              for name, r in results.items()) + ")",
             trained.images / max(trained.seconds, 1e-6), trained.seconds, trained.data_wait,
             seconds - trained.seconds, elapsed,
             report.duration((hp.epochs - epoch) * sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else "?")
    if s.device.type == "cuda" and epoch and len(epoch_seconds) == 1:
        log.info("Peak GPU memory: %.1f GiB of %.1f GiB (batch_size=%d, img_size=%d)",
                 torch.cuda.max_memory_reserved(s.device) / 2**30,
                 torch.cuda.get_device_properties(s.device).total_memory / 2**30, hp.batch_size,
                 tuning.data_config["train_input_size"][-1])


def log_probe(probe: linear_probe.ProbeStart, result: Evaluation, seconds: float) -> None:
    """The probe's own line after epoch 0's, and a line for each choice it made."""
    fit = probe.fit
    log.info("Linear probe (epoch 0): validation %s %.2f%%, loss %.4f; fitted on the frozen features (%d) of "
             "%d training images in %.1f s: features %.1f s, logistic regression %.1f s",
             "top-1" if result.mean_ap is None else "mAP", result.score,
             result.loss, fit.features, fit.images, seconds, fit.extract_seconds, fit.fit_seconds)
    for line in decisions(probe.choices):
        log.info("Recipe (auto): %s", line)


if __name__ == "__main__":  # python -m: as the installed command, offline and with its stop handling
    from efficientnet_train.commands import train

    sys.exit(train())
