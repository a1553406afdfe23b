"""The `train` command's first lines: what has to happen before torch and the rest are imported."""

from __future__ import annotations

import signal


class StoppedDuringStartUp(BaseException):
    """Not an Exception: train.main's catch-all must not report a requested stop as a failure."""


def train() -> int:
    # SageMaker runs the image's `train` as PID 1, for which the kernel drops any signal without a handler: a
    # StopTrainingJob (or spot interruption) during the imports or the data scan, minutes for a large data set,
    # went unheard until training began, or until SIGKILL 120 s later. Nothing is written before training starts,
    # so stopping then is immediate; training installs its own handler, which saves a checkpoint first.
    signal.signal(signal.SIGTERM, _stop)
    try:
        from .train import main

        return main()
    except StoppedDuringStartUp as stop:
        print(f"Stopped by {stop} during start-up, before training began: nothing to save.", flush=True)
        return 0


def _stop(signum: int, _frame) -> None:
    raise StoppedDuringStartUp(signal.Signals(signum).name)
