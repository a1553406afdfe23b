"""The commands' first lines: what has to happen before torch and the rest are imported (the stop
signal's handler, `--help`)."""

from __future__ import annotations

import os
import signal
import sys


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
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_during_start_up)
    from .train import main

    return main()


def serve() -> int:
    from .sagemaker import SERVE_USAGE

    asked = _usage(SERVE_USAGE)
    if asked is not None:
        return asked
    from .serve import main

    return main()


def _stop_during_start_up(signum: int, _frame) -> None:
    """Exit here and now. Not by raising: the handler runs wherever the main thread is, which may be Python called
    back from a C++ extension being imported, where an exception becomes std::terminate and SIGABRT."""
    try:
        sys.stdout.flush()  # the log lines so far; may be refused if the signal landed inside a write
    except BaseException:  # noqa: BLE001 - a reentrant write: those lines are lost, the message below is not
        pass
    name = signal.Signals(signum).name
    os.write(sys.stdout.fileno(), f"Stopped by {name} during start-up, before training began: nothing to "
                                  f"save.\n".encode())
    os._exit(0)
