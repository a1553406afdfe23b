"""The best model and what the buyer keeps: the best model so far (its record and checkpoint, written to model/ as
soon as it is found), the files rewritten after every epoch (args.yml, summary.csv, metrics.png, the confusion
matrix), and at the end args.yml's results, the calibration, the per-class (or per-label) table and model.tar.gz."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import multilabel, outputs, report
from .calibration import calibrate
from .engine import Evaluation
from .metrics import VAL_ACC_1, VAL_MAP
from .model import checkpoint_of, save_checkpoint
from .sagemaker import SageMakerEnvironment
from .session import FineTuning, Session

log = logging.getLogger("efficientnet_train")


def summary_row(epoch: int, train_loss: float, result: Evaluation, lr_now: float) -> dict:
    scores = {"eval_map": f"{result.mean_ap:.6f}"} if result.mean_ap is not None else \
        {"eval_top1": f"{result.top1:.6f}", "eval_top5": f"{result.top5:.6f}"}
    return {"epoch": epoch, "train_loss": f"{train_loss:.6f}", "eval_loss": f"{result.loss:.6f}", **scores,
            "lr": f"{lr_now:.10f}"}


class BestModel:
    """The best model so far: its `record` (epoch, accuracy, per class, confusion, calibration; for several labels
    an image mAP, each label's average precision and threshold) and its `checkpoint`, which rank 0 writes to
    model/ as soon as it is found. Better: a higher top-1 (mAP), or the same with a lower validation loss."""

    def __init__(self, record: dict | None = None, checkpoint: dict | None = None):
        self.record, self.checkpoint = record, checkpoint

    def beaten_by(self, result: Evaluation) -> bool:
        return self.record is None or (result.score, -result.loss) > (score_of(self.record), -self.record["loss"])

    def take(self, epoch: int, result: Evaluation, weights: str, net: torch.nn.Module, s: Session,
             tuning: FineTuning, model_dir: Path, write: bool) -> None:
        multi = result.mean_ap is not None
        calibration = multilabel.calibrate(result.log_probabilities, result.targets) if multi else \
            calibrate(result.log_probabilities, result.targets, len(s.classes))
        self.record = {"epoch": epoch, "top1": result.top1, "loss": result.loss, "weights": weights,
                       "per_class": dict(zip(s.classes, result.per_class)), "confusion": result.confusion,
                       "calibration": calibration, **({"mean_ap": result.mean_ap} if multi else {})}
        self.checkpoint = checkpoint_of(net, arch=s.hp.model, epoch=epoch, metric=result.score,
                                        metric_name=VAL_MAP if multi else VAL_ACC_1, weights=weights,
                                        labels=s.classes, num_classes=len(s.classes),
                                        data_config=tuning.data_config, eval_hflip=tuning.eval_hflip,
                                        temperature=calibration["temperature"], args=s.args,
                                        **({"multi_label": True, "thresholds": calibration["thresholds"]}
                                           if multi else {}))
        if write:
            save_checkpoint(model_dir / outputs.BEST_MODEL_FILE, self.checkpoint)
        # Not "validation:acc_1=": SageMaker's regex would record the value a second time.
        log.info("New best model: epoch %d, %s %.4f%% (%s weights); temperature %.3f takes its calibration error "
                 "(%s) from %.4f to %.4f", epoch, "mAP" if multi else "top-1 accuracy", result.score, weights,
                 calibration["temperature"], "every label's ECE" if multi else "top-label ECE",
                 calibration["ece_before"], calibration["ece_after"])


def score_of(record: dict) -> float:
    """A best model's record's score: its top-1, or for several labels an image its mAP."""
    return record.get("mean_ap", record["top1"])


def write_epoch_outputs(model_dir: Path, args: dict, summary: list[dict], best: dict | None, classes: list[str],
                        title: str) -> None:
    """What a stopped job leaves beside its best model, rewritten every epoch: args.yml too, so that a job that
    fails or is killed later says what it trained with (the recipe its probe chose), not the listing's."""
    outputs.write_args(model_dir, args)
    outputs.write_summary(model_dir, summary)
    if best is not None:
        report.plot_metrics(model_dir / outputs.METRICS_PLOT_FILE, summary, best["epoch"], title)
        if best["confusion"] is not None:  # none for several labels an image
            report.write_confusion_csv(model_dir / outputs.CONFUSION_FILE, classes, best["confusion"])


def finish(env: SageMakerEnvironment, args: dict, summary: list[dict], best: dict | None, stop_reason: str,
           seconds: float) -> None:
    args.update(epochs_completed=sum(int(row["epoch"]) > 0 for row in summary), stop_reason=stop_reason)  # not 0
    if best is None:
        outputs.write_args(env.model_dir, args)
        log.info("No epoch finished, so there is no model yet.")
        return
    if "mean_ap" in best:
        finish_multi_label(env, args, best, stop_reason, seconds)
        return
    scores = report.class_scores(best["confusion"])
    args.update(best_epoch=best["epoch"], best_acc_1=best["top1"], best_weights=best["weights"],
                best_per_class_acc_1=best["per_class"], best_macro_f1=report.macro_f1(scores),
                best_per_class_scores=dict(zip(best["per_class"], scores)), calibration=best["calibration"])
    outputs.write_args(env.model_dir, args)
    classes = list(best["per_class"])
    log.info("Done in %s after %d epochs (%s). Best model: epoch %d, top-1 accuracy %.4f%% (%s weights), "
             "saved to %s", report.duration(seconds), args["epochs_completed"], stop_reason, best["epoch"],
             best["top1"], best["weights"], env.model_dir / outputs.BEST_MODEL_FILE)
    calibration = best["calibration"]
    chance = "" if "ece_by_chance" not in calibration else (  # a best model found before this was measured
        f" (by chance alone, a perfectly calibrated model with these calibrated confidences shows "
        f"{calibration['ece_by_chance']:.4f} on average on these {args['val_images']} validation images, up to "
        f"{calibration['ece_by_chance_p90']:.4f} in 9 draws of 10)")
    log.info("Calibration: the best model's log probabilities are divided by a temperature of %.4f fitted on the "
             "validation set (stored in the model, applied when serving): top-label ECE %.4f -> %.4f%s, "
             "validation loss %.4f -> %.4f", calibration["temperature"], calibration["ece_before"],
             calibration["ece_after"], chance, best["loss"], calibration["loss_after"])
    log.info("Best model per class (validation; confidence: mean calibrated probability of its answers; macro F1, "
             "the mean of the classes' F1: %s):\n%s", "-" if args["best_macro_f1"] is None else
             f"{args['best_macro_f1']:.1f}%", report.per_class_table(classes, best["confusion"],
                                                                    calibration["per_class_confidence"]))
    log.info("Best model's confusion matrix (also in %s and, as curves, %s):\n%s", outputs.CONFUSION_FILE,
             outputs.METRICS_PLOT_FILE, report.confusion_text(classes, best["confusion"]))
    pack(env)


def finish_multi_label(env: SageMakerEnvironment, args: dict, best: dict, stop_reason: str, seconds: float) -> None:
    calibration = best["calibration"]
    args.update(best_epoch=best["epoch"], best_map=best["mean_ap"], best_weights=best["weights"],
                best_per_label_ap=best["per_class"], best_micro_f1=calibration["micro_f1"],
                best_macro_f1=calibration["macro_f1"], calibration=calibration)
    outputs.write_args(env.model_dir, args)
    log.info("Done in %s after %d epochs (%s). Best model: epoch %d, mAP %.4f%% (%s weights), saved to %s",
             report.duration(seconds), args["epochs_completed"], stop_reason, best["epoch"], best["mean_ap"],
             best["weights"], env.model_dir / outputs.BEST_MODEL_FILE)
    log.info("Calibration: every logit of the best model is divided by a temperature of %.4f fitted on the "
             "validation set (stored in the model, applied when serving): ECE over every label's probability "
             "%.4f -> %.4f, validation loss %.4f -> %.4f", calibration["temperature"], calibration["ece_before"],
             calibration["ece_after"], best["loss"], calibration["loss_after"])
    log.info("Best model per label (validation; threshold: the calibrated probability from which an answer says "
             "yes, chosen for the label's best F1 on these images, stored in the model; micro F1 %.1f%%, macro F1 "
             "%s):\n%s", calibration["micro_f1"], "-" if calibration["macro_f1"] is None else
             f"{calibration['macro_f1']:.1f}%", report.per_label_table(list(best["per_class"]),
                                                                      list(best["per_class"].values()), calibration))
    pack(env)


def pack(env: SageMakerEnvironment) -> None:
    if env.training_job_name is None:
        # SageMaker packs model/ itself; a plain `docker run` should still hand over the same artifact.
        log.info("Packed %s", outputs.pack_model(env.model_dir))
