"""What a buyer reads after training: progress in words, the per-class table, the confusion
matrix and `metrics.png`, the curves the listing shows."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from .outputs import atomic_write, write_text
from .untrusted import LOG_LIST_MAX, csv_cell

# Beyond this many classes a full matrix in the log is unreadable: the log lists the worst confusions.
LOG_MATRIX_MAX_CLASSES = 12
# Beyond this many classes confusion_matrix.csv lists the (true, predicted) pairs that occur: the full matrix grows
# with the square of the class count (2 MB at 1,000 classes, mostly zeros), the list with the validation set.
CSV_MATRIX_MAX_CLASSES = 200


def capped(value, depth: int = 0):
    """args.yml's contents for the log: each list or mapping inside of more than LOG_LIST_MAX entries cut to its
    first ones and a count of the rest (at 1,000 classes the whole was 3,000 lines)."""
    if isinstance(value, dict):
        items = list(value.items())
        kept = {key: capped(item, depth + 1) for key, item in (items[:LOG_LIST_MAX] if depth else items)}
        if depth and len(items) > LOG_LIST_MAX:
            kept["..."] = f"{len(items) - LOG_LIST_MAX:,} more in args.yml"
        return kept
    if isinstance(value, list):
        kept = [capped(item, depth + 1) for item in value[:LOG_LIST_MAX]]
        return kept + [f"... {len(value) - LOG_LIST_MAX:,} more in args.yml"] if len(value) > LOG_LIST_MAX else kept
    return value


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class StartUp:
    """Where the time before the first training step went, said in one line when that step is done. On a
    GPU machine the first step alone can take most of a minute (CUDA loading the kernels, cuDNN timing
    them): a buyer should see that it is that, not slow data or a hang."""

    def __init__(self, started: float):
        self.started = self.last = started
        self.phases: list[tuple[str, float]] = []

    def done(self, phase: str) -> None:
        now = time.time()
        self.phases.append((phase, now - self.last))
        self.last = now

    def line(self) -> str:
        return (f"First training step done {self.last - self.started:.1f} s after the job started: "
                + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.phases))


def class_scores(confusion: list[list[int]]) -> list[dict]:
    """Each class's precision, recall (its accuracy) and F1, in percent: None where undefined (precision of a class
    never predicted, recall of a class without validation images), F1 0 where either is 0 or undefined."""
    predicted = [sum(column) for column in zip(*confusion)]
    scores = []
    for index, row in enumerate(confusion):
        right, images = row[index], sum(row)
        precision = 100 * right / predicted[index] if predicted[index] else None
        recall = 100 * right / images if images else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if images else None)
        scores.append({"precision": precision, "recall": recall, "f1": f1})
    return scores


def macro_f1(scores: list[dict]) -> float | None:
    """The mean F1 over the classes with validation images: every class counts the same, however many images."""
    values = [score["f1"] for score in scores if score["f1"] is not None]
    return sum(values) / len(values) if values else None


def per_class_table(classes: list[str], confusion: list[list[int]], confidence: list[float]) -> str:
    """Images, right answers, accuracy (recall), precision, F1 and mean (calibrated) top probability per class, and
    what each class is mistaken for most: a class whose confidence is far from its accuracy is one whose
    probabilities mislead; one whose precision is low is the answer given for others."""
    scores = class_scores(confusion)
    shown_classes = list(enumerate(classes))
    if len(classes) > LOG_LIST_MAX:  # the classes that need attention first; args.yml has every one
        f1_of = [2.0 if score["f1"] is None else score["f1"] for score in scores]
        shown_classes = sorted(shown_classes, key=lambda item: f1_of[item[0]])[:LOG_LIST_MAX]
    width = max(len("class"), *(len(name) for _, name in shown_classes))
    lines = [f"{'class':<{width}}  images  right  accuracy  precision      F1  confidence  most often mistaken for"]
    for index, name in shown_classes:
        row, score = confusion[index], scores[index]
        images, right = sum(row), row[index]
        wrong = max(((count, other) for other, count in enumerate(row) if other != index and count), default=None)
        accuracy, precision, f1 = (f"{value:{size}.1f}%" if value is not None else " " * (size - 1) + "- "
                                   for value, size in ((score["recall"], 7), (score["precision"], 8),
                                                       (score["f1"], 5)))
        sure = f"{100 * confidence[index]:9.1f}%" if images else "        - "
        mistaken = f"{classes[wrong[1]]} ({wrong[0]})" if wrong else "-"
        lines.append(f"{name:<{width}}  {images:6d}  {right:5d}  {accuracy}  {precision}  {f1}  {sure}  {mistaken}")
    if len(classes) > len(shown_classes):
        lines.append(f"... the {len(shown_classes)} of lowest F1 of {len(classes):,} classes; every class's scores are "
                     f"in args.yml (best_per_class_acc_1, best_per_class_scores)")
    return "\n".join(lines)


def per_label_table(labels: list[str], average_precision: list[float | None], calibration: dict) -> str:
    """For several labels an image: each label's validation images, average precision, threshold, and precision,
    recall and F1 at it; the labels of lowest AP first where there are many."""
    scores, cut = calibration["per_label"], calibration["thresholds"]
    order = list(range(len(labels)))
    if len(labels) > LOG_LIST_MAX:
        order = sorted(order, key=lambda i: 101.0 if average_precision[i] is None else average_precision[i])
        order = order[:LOG_LIST_MAX]
    width = max(len("label"), *(len(labels[i]) for i in order))
    lines = [f"{'label':<{width}}  images      AP  threshold  precision  recall      F1"]
    for i in order:
        cells = [f"{value:{size}.1f}%" if value is not None else " " * (size - 1) + "- " for value, size in
                 ((average_precision[i], 6), (scores[i]["precision"], 8), (scores[i]["recall"], 5),
                  (scores[i]["f1"], 5))]
        lines.append(f"{labels[i]:<{width}}  {scores[i]['support']:6d}  {cells[0]}  {cut[i]:9.3f}  {cells[1]}  "
                     f"{cells[2]}  {cells[3]}")
    if len(labels) > len(order):
        lines.append(f"... the {len(order)} of lowest AP of {len(labels):,} labels; every label's scores are in "
                     f"args.yml (best_per_label_ap, calibration.per_label)")
    return "\n".join(lines)


def confusion_text(classes: list[str], confusion: list[list[int]]) -> str:
    if len(classes) > LOG_MATRIX_MAX_CLASSES:
        mistakes = sorted(((count, classes[t], classes[p]) for t, row in enumerate(confusion)
                           for p, count in enumerate(row) if p != t and count), reverse=True)[:15]
        return "most frequent mistakes (true -> predicted: images): " + (
            ", ".join(f"{t} -> {p}: {count}" for count, t, p in mistakes) or "none")
    width = max(6, *(len(name) for name in classes))
    header = " " * width + "  " + " ".join(f"{name[:width]:>{width}}" for name in classes)
    rows = [f"{name:<{width}}  " + " ".join(f"{count:>{width}d}" for count in confusion[index])
            for index, name in enumerate(classes)]
    return "rows: true class, columns: predicted class\n" + "\n".join([header, *rows])


def write_confusion_csv(path: Path, classes: list[str], confusion: list[list[int]]) -> None:
    """The matrix (rows: true class, columns: predicted), or above CSV_MATRIX_MAX_CLASSES one row per (true,
    predicted) pair with any images, mistakes first, most frequent first."""
    names = [csv_cell(name) for name in classes]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if len(classes) <= CSV_MATRIX_MAX_CLASSES:
        writer.writerow(["true \\ predicted", *names])
        writer.writerows([name, *row] for name, row in zip(names, confusion))
    else:
        pairs = sorted(((t == p, -count, t, p) for t, row in enumerate(confusion) for p, count in enumerate(row)
                        if count))
        writer.writerow(["true", "predicted", "images"])
        writer.writerows([names[t], names[p], -negative] for _, negative, t, p in pairs)
    write_text(path, buffer.getvalue())


def plot_metrics(path: Path, summary: list[dict], best_epoch: int | None, title: str) -> None:
    """Loss and accuracy per epoch, the best epoch marked: the listing's metrics figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a training container
    from matplotlib.figure import Figure

    epochs = [int(row["epoch"]) for row in summary]
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    loss, accuracy = figure.subplots(1, 2)
    loss.plot(epochs, [float(row["train_loss"]) for row in summary], "o-", label="train:loss")
    loss.plot(epochs, [float(row["eval_loss"]) for row in summary], "o-", label="validation:loss")
    loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    if summary and "eval_map" in summary[0]:  # several labels an image
        accuracy.plot(epochs, [float(row["eval_map"]) for row in summary], "o-", label="validation:mAP")
        accuracy.set(xlabel="epoch", ylabel="mean average precision (%)", title="Validation mAP")
    else:
        accuracy.plot(epochs, [float(row["eval_top1"]) for row in summary], "o-", label="validation:acc_1")
        accuracy.plot(epochs, [float(row["eval_top5"]) for row in summary], "o-", label="validation:acc_5")
        accuracy.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
    for axes in (loss, accuracy):
        if best_epoch is not None:
            axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        axes.grid(alpha=0.3)
        axes.legend()
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    atomic_write(path, lambda f: figure.savefig(f, format="png"))
