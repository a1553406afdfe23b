"""The commands' first lines: what has to happen before torch and the rest are imported (the stop
signal's handler, `--help`)."""

from __future__ import annotations

import os
import signal
import sys

from .stopping import STOP_SIGNALS, exit_now  # no torch: cheap, and there before a signal can arrive

# Marketplace jobs and endpoints run without a network: weights come from the image or a channel, and a model file
# never needs a hub. Set before anything imports timm (huggingface_hub reads it on import); the image sets it too.
os.environ["HF_HUB_OFFLINE"] = "1"


def _usage(text: str) -> int | None:
    """`-h`/`--help`: the usage, exit 0, nothing started; any other argument: the usage, exit 2. None: run."""
    arguments = sys.argv[1:]
    if not arguments:
        return None
    if arguments[0] in ("-h", "--help"):
        print(text)
        return 0
    if arguments[0] == "--version":
        from . import __version__

        print(f"{text.split()[1]} {__version__}")  # the usage's first line: "usage: NAME ..."
        return 0
    print(f"{text}\n\nerror: unexpected arguments: {' '.join(arguments)[:200]}", file=sys.stderr)
    return 2


def train() -> int:
    from .hyperparameters import plain_text, shipped_weights  # no torch: help is instant
    from .sagemaker import TRAIN_USAGE

    if sys.argv[1:] == ["--hyperparameters"]:
        print(plain_text())
        return 0
    shipped = shipped_weights() if sys.argv[1:] in (["-h"], ["--help"]) else []
    models = (f"models with ImageNet weights in this image (model=...; any other needs the 'pretrained' channel): "
              f"{', '.join(shipped) if shipped else 'none'}")
    asked = _usage(f"{TRAIN_USAGE}\n\n{models}")
    if asked is not None:
        return asked
    # SageMaker runs the image's `train` as PID 1, for which the kernel drops any signal without a handler: a
    # StopTrainingJob (or spot interruption) during the imports or the data scan, minutes for a large data set,
    # went unheard until training began, or until SIGKILL 120 s later. Nothing is written before training starts,
    # so stopping then is immediate; training installs its own handler, which saves a checkpoint first.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_during_start_up)
    from .train import main

    return main()


def predict() -> int:
    # Before the imports, as for train: a Ctrl-C while torch loads ends the command with a line, not a traceback.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_before_predicting)
    from .predict import STOP, main

    STOP.install()  # from here on a stop ends it between batches, removing a half-written CSV
    return main()


def export_onnx() -> int:
    from .export_onnx import main

    return main()


def serve() -> int:
    from .sagemaker import SERVE_USAGE

    asked = _usage(SERVE_USAGE)
    if asked is not None:
        return asked
    for signum in STOP_SIGNALS:  # until gunicorn installs its own, which stop the workers gracefully
        signal.signal(signum, _stop_before_serving)
    from .serve import main

    return main()


def _stop_during_start_up(signum: int, _frame) -> None:
    exit_now(f"Stopped by {signal.Signals(signum).name} during start-up, before training began: nothing to save.", 0)


def _stop_before_predicting(signum: int, _frame) -> None:
    exit_now(f"Stopped by {signal.Signals(signum).name} before any image was read: nothing written.", 128 + signum)


def _stop_before_serving(signum: int, _frame) -> None:
    exit_now(f"Stopped by {signal.Signals(signum).name} while starting, before serving.", 0)
