"""Stopping on a signal: SIGTERM (StopTrainingJob, a spot interruption, `docker stop`, `timeout`) or SIGINT
(Ctrl-C), sent to the job's main process or to its whole process group.

The main process owns the stop. Processes it starts to load data ignore both signals (`ignore_stop_signals`, their
first act): a terminal's Ctrl-C, `timeout` and `kill -- -PGID` reach every process of the group, and a loader
worker killed by one made the job fail, blaming a file, instead of stopping. No torch here: `commands` installs
the start-up handler before anything heavy is imported.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import contextmanager

log = logging.getLogger("efficientnet_train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A stop asked for by a signal. The handler only sets a flag, which every long phase checks between batches
    (the linear probe's features, its fit and measurements, training, validation): nothing is ever half-written.
    A repeated signal changes nothing, but for a second Ctrl-C in a process a terminal signals (`at_once_on_second_
    interrupt`), which ends it at once, without saving: the way out of a stop that takes too long."""

    def __init__(self, at_once_on_second_interrupt: bool = True) -> None:
        self.signal_name: str | None = None
        self.repeats = 0
        self.at_once_on_second_interrupt = at_once_on_second_interrupt

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._received)
        return self

    def _received(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name:
            if signum == signal.SIGINT and self.signal_name == "SIGINT" and self.at_once_on_second_interrupt:
                exit_now("SIGINT received again: stopping at once, without saving; a restarted job resumes from "
                         "the last checkpoint, if any.", 128 + signal.SIGINT)
            self.repeats += 1
            if self.repeats == 1:  # said once: a sender that repeats itself would fill the log
                log.warning("%s received while already stopping: nothing changes%s", name,
                            " (press Ctrl-C again to stop at once, without saving)"
                            if self.signal_name == "SIGINT" and self.at_once_on_second_interrupt else "")
            return
        self.signal_name = name
        log.warning("%s received: stopping at the next batch (training's progress is saved in a checkpoint once "
                    "training has begun)", name)

    def __bool__(self) -> bool:
        return self.signal_name is not None


class Interrupted(Exception):
    """Raised at a safe point (between batches) once a stop was requested."""


def stop_here(stop) -> None:
    """Raise Interrupted if a stop was asked for (`stop` may be None: not interruptible there)."""
    if stop:
        raise Interrupted


@contextmanager
def stop_signals_held():
    """Hold SIGTERM and SIGINT back (blocked, not lost) while processes are started: they inherit the block, so a
    stop sent to the group waits in each until it has run `ignore_stop_signals`; the main process gets its own on
    leaving. torch gives a new loader worker a SIGTERM handler that ends it, and a group stop landing before its
    worker_init_fn killed it, failing the job instead of stopping it (seen on a loaded 2-core machine)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """A child's first act (a DataLoader's worker_init_fn): leave SIGTERM and SIGINT to the main process, which
    stops the child itself. It still ends when the main process does: the loader tells it to, or it sees its
    parent gone. A stop held back while it started (`stop_signals_held`) is dropped here, once ignored."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def exit_now(message: str, code: int, stream=None) -> None:
    """Write `message` to `stream` (standard output, the log, unless said) and end the process here and now. Not by
    raising: a handler runs wherever the main thread is, which may be Python called back from a C++ extension, where
    an exception becomes std::terminate and SIGABRT."""
    stream = stream or sys.stdout
    try:
        stream.flush()  # the lines so far; may be refused if the signal landed inside a write
    except BaseException:  # noqa: BLE001 - a reentrant write: those lines are lost, the message below is not
        pass
    os.write(stream.fileno(), f"{message}\n".encode())
    os._exit(code)


class Stopped(BaseException):
    """A stop signal in a command that has nothing to save (`predict`), raised at its next safe point
    (`StopFlag.check`): it ends the command through its cleanup (a half-written output is removed), and its caller
    says so, without a traceback. A BaseException, like KeyboardInterrupt: no `except Exception` swallows it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name, self.exit_code = signal_name, 128 + signal.Signals[signal_name]


class StopFlag:
    """The handler only notes the signal (raising from it would lose the stop wherever it lands in code that
    swallows exceptions, such as an at-fork callback); the command checks between its batches."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> "StopFlag":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._received)
        return self

    def _received(self, signum: int, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def check(self) -> None:
        if self.signal_name:
            raise Stopped(self.signal_name)
