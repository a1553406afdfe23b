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
    _install(_stop_during_start_up)
    from .train import main

    return main()


def predict() -> int:
    # Before the imports, as for train: a Ctrl-C while torch loads ends the command with a line, not a traceback.
    _install(_stop_before_predicting)
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
    _install(_stop_before_serving)  # until gunicorn installs its own, which stop the workers gracefully
    from .serve import main

    return main()


def _stopping_at_once(then: str, exit_code, stream=None):
    """A handler for a command's start-up, before it installs its own: a stop ends the process at once, saying
    "Stopped by SIGNAL " + `then`, with `exit_code(signum)`."""
    def stop(signum: int, _frame) -> None:
        exit_now(f"Stopped by {signal.Signals(signum).name} {then}", exit_code(signum), stream)

    return stop


def _install(handler) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


_stop_during_start_up = _stopping_at_once("during start-up, before training began: nothing to save.", lambda _: 0)
# predict's standard output may be its CSV (-o -): the message goes with its log, to standard error.
_stop_before_predicting = _stopping_at_once("before any image was read: nothing written.", lambda signum: 128 + signum,
                                            stream=sys.stderr)
_stop_before_serving = _stopping_at_once("while starting, before serving.", lambda _: 0)
