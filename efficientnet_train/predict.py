"""`predict`: classify an image or a folder of images with a trained model, into a CSV.

    predict photos/ --model-dir model.tar.gz --output predictions.csv --top-k 3
    predict photo.jpg --model-dir model/ -o -          # the CSV on standard output

The same model, preprocessing and prediction as `serve` (efficientnet_train.inference), batched,
with a progress bar. Files that are not readable images are listed on stderr and left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch

from . import __version__
from .channels import IMAGE_EXTENSIONS
from .data import Loader
from .decoding import UnreadableImage, load_image
from .errors import JobError
from .inference import Classifier, model_files
from .outputs import check_output_file
from .sagemaker import ServingEnvironment
from .stopping import StopFlag, Stopped
from .untrusted import csv_cell

log = logging.getLogger("efficientnet_train.predict")
STOP = StopFlag()  # SIGTERM or SIGINT, checked between batches


def find_images(inputs: list[Path]) -> list[Path]:
    """Each file as given; each folder's images, recursively, in sorted order."""
    images = []
    for path in inputs:
        if path.is_dir():
            images += sorted(p for p in path.rglob("*")
                             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        elif path.is_file():
            images.append(path)
        else:
            raise JobError(f"{path} is neither an image file nor a folder.")
    return images


class ImageFiles(torch.utils.data.Dataset):
    """Preprocessed images, or the reason one can't be read (so one bad file doesn't stop the run)."""

    def __init__(self, paths: list[Path], preprocess, decode_side: int):
        self.paths, self.preprocess, self.decode_side = paths, preprocess, decode_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.preprocess(load_image(str(self.paths[index]), self.decode_side)), None
        except (UnreadableImage, OSError) as exc:
            return index, None, str(exc)


def _collate(items):
    return items  # a list of (index, tensor or None, error or None): stacked after dropping failures


def predict(classifier: Classifier, paths: list[Path], top_k: int, batch_size: int, workers: int,
            progress: bool = True):
    """Yields (path, prediction) for each readable image and (path, error) for each other, in order."""
    from tqdm import tqdm

    loader = Loader(ImageFiles(paths, classifier.preprocess, classifier.decode_side), batch_size=batch_size,
                    num_workers=workers, collate_fn=_collate)
    with tqdm(total=len(paths), unit="image", disable=not progress, file=sys.stderr) as bar:
        for items in loader:
            STOP.check()
            readable = [(index, tensor) for index, tensor, _ in items if tensor is not None]
            predictions = {}
            if readable:
                probabilities = classifier.probabilities(torch.stack([tensor for _, tensor in readable]))
                predictions = dict(zip((index for index, _ in readable), classifier.top_k(probabilities, top_k)))
            for index, _, error in items:
                yield paths[index], predictions.get(index, error)
            bar.update(len(items))


def write_csv(rows, output, k: int, multi_label: bool = False) -> tuple[int, list[str]]:
    """image, label_1, probability_1, ..., label_k, probability_k, and for a multi-label model predicted_labels
    (a JSON list: a label may hold any character); returns the count and the failures."""
    writer = csv.writer(output, lineterminator="\n")
    ranks = [f"{column}_{rank}" for rank in range(1, k + 1) for column in ("label", "probability")]
    writer.writerow(["image", *ranks] + (["predicted_labels"] if multi_label else []))
    written, failures = 0, []
    for path, prediction in rows:
        if isinstance(prediction, str):
            failures.append(f"{path}: {prediction}")
            continue
        cells = [value for pair in zip(prediction["labels"], prediction["probabilities"]) for value in pair]
        predicted = [csv_cell(json.dumps(prediction["predicted_labels"], ensure_ascii=False))] if multi_label else []
        writer.writerow([csv_cell(str(path))] + [repr(cell) if isinstance(cell, float) else csv_cell(cell)
                                                 for cell in cells] + predicted)
        written += 1
    return written, failures


HEADER_START = "image,label_1,probability_1"  # how a CSV this command wrote begins


def check_output(path: Path, inputs: list[Path], images: list[Path], overwrite: bool) -> None:
    """Refuse an --output that would destroy something: a link, a folder, one of the images or folders read, or an
    existing file that is not a predictions CSV (unless `overwrite`); make its folder."""
    check_output_file(path, "--output", "predictions.csv")
    if path.resolve() in {p.resolve() for p in (*inputs, *images)}:
        raise JobError(f"--output {path} is one of the images to classify; give the predictions another name, "
                       f"such as predictions.csv.")
    if path.exists() and not overwrite and not _is_predictions_csv(path):
        raise JobError(f"--output {path} exists and is not a predictions CSV this command wrote; it is left as "
                       f"it is. Give another name, or add --overwrite to replace it.")


def _is_predictions_csv(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(HEADER_START)) == HEADER_START.encode()
    except OSError:
        return False


def write_atomically(path: Path, write):
    """`write(text_file)` into a new file beside `path`, renamed over it when complete: a crash mid-run leaves the
    previous file as it was. The temporary name is unique, so no file of the user's is touched."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(descriptor, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        with os.fdopen(descriptor, "w", newline="", encoding="utf-8") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = ServingEnvironment.from_environ()
    except JobError as exc:
        log.error("%s", exc)
        return 1
    parser = argparse.ArgumentParser(prog="predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="image files and folders of images")
    parser.add_argument("--model-dir", type=Path, default=settings.model_dir,
                        help="the model.tar.gz of a `train` job, or the folder it was extracted to "
                             "(default: %(default)s)")
    parser.add_argument("--output", "-o", default="predictions.csv",
                        help="the CSV to write (default: predictions.csv in the current folder), or - for standard "
                             "output")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output even if it is not a predictions CSV this command wrote")
    parser.add_argument("--top-k", type=int, default=settings.top_k, help="labels per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images classified at once; lower it if memory runs out (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes that decode images (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    options = parser.parse_args(argv)
    if options.top_k < 1 or options.batch_size < 1 or options.workers < 0:
        parser.error("--top-k and --batch-size must be at least 1, --workers at least 0")
    try:
        paths = find_images(options.inputs)
        if not paths:
            raise JobError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, options.inputs))}.")
        if options.output != "-":  # before the model loads and the images are read, not after
            check_output(Path(options.output), options.inputs, paths, options.overwrite)
        with tempfile.TemporaryDirectory(prefix="predict-") as scratch:  # a model.tar.gz's two files, once loaded
            classifier = Classifier(model_files(options.model_dir, Path(scratch)))
    except JobError as exc:
        log.error("%s", exc)
        return 1
    k = min(options.top_k, len(classifier.labels))
    rows = predict(classifier, paths, k, options.batch_size, options.workers)
    try:
        if options.output == "-":
            written, failures = write_csv(rows, sys.stdout, k, classifier.multi_label)
        else:
            written, failures = write_atomically(Path(options.output),
                                                 lambda output: write_csv(rows, output, k, classifier.multi_label))
    except Stopped as stop:  # a stop signal to the `predict` command (STOP, installed by commands.predict)
        kept = " (the earlier one is kept)" if options.output != "-" and Path(options.output).exists() else ""
        log.error("Stopped by %s before every image was classified: %s", stop.signal_name,
                  "the rows so far went to standard output" if options.output == "-" else
                  f"{options.output} was not written{kept}")
        return stop.exit_code
    except BrokenPipeError:  # `predict photos/ -o - | head`: the reader has all it wanted
        rows.close()  # ends the loader's workers now, not at an exit that waited on them
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would fail again
        log.info("Standard output was closed before every image was classified: stopped")
        return 128 + signal.SIGPIPE  # as a command killed by SIGPIPE, what a shell pipeline expects
    for failure in failures:
        log.warning("Skipped %s", failure)
    log.info("Wrote %d predictions to %s%s", written, options.output,
             f"; skipped {len(failures)} unreadable files" if failures else "")
    return 0 if written else 1


if __name__ == "__main__":  # python -m: as the installed command, offline and with its stop handling
    from efficientnet_train.commands import predict

    sys.exit(predict())
