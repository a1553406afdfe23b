"""What the machine does to a job (GPU memory, dying data-loading workers), told as the buyer's fix.

A full disk is explained where files are written (outputs.atomic_write), which knows the folder.
"""

from __future__ import annotations

import re
import traceback
import torch

from .errors import JobError

# How torch's DataLoader re-raises an exception from a worker process: the worker's traceback is the message.
_FROM_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\s+Original Traceback")
_WORKER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|"
                          r"exited unexpectedly)")


def explained(exc: Exception, batch_size: int, workers: int, datasets) -> Exception:
    """A JobError saying what to change for running out of memory or a crashed data-loading worker; any
    other exception as it is."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        reason = out_of_memory_reason(batch_size, phase_of(exc), "GPU")
    elif isinstance(exc, MemoryError):
        reason = out_of_memory_reason(batch_size, phase_of(exc), "CPU")
    elif isinstance(exc, RuntimeError):
        reason = _runtime_reason(exc, batch_size, workers, datasets)
    elif isinstance(exc, ConnectionResetError):  # a worker died while the loader was taking a batch from it
        reason = worker_crash_reason(str(exc), workers, datasets)
    elif isinstance(exc, JobError):
        reason = worker_message(exc)  # the worker's traceback stays in the log, with the cause
    else:
        reason = None
    if reason is None:
        return exc
    error = JobError(reason)
    error.__cause__ = exc
    return error


def _runtime_reason(exc: RuntimeError, batch_size: int, workers: int, datasets) -> str | None:
    text = str(exc)
    if "DefaultCPUAllocator: can't allocate memory" in text:
        return out_of_memory_reason(batch_size, phase_of(exc), "CPU")
    if _WORKER_DIED.search(text) or "shared memory" in text or "/torch_" in text:
        return worker_crash_reason(text, workers, datasets)
    if _FROM_WORKER.search(text):
        return (f"A data-loading worker failed: {_last_line(text)}. The full traceback is in the log. Setting "
                f"workers=0 loads images in the training process, which may show the cause more plainly.")
    return None


def phase_of(exc: BaseException) -> str:
    frames = {frame.f_code.co_name for frame, _ in traceback.walk_tb(exc.__traceback__)}
    return "validation" if "evaluate" in frames else "training"


def out_of_memory_reason(batch_size: int, phase: str, device: str) -> str:
    memory = "GPU memory" if device == "GPU" else "memory (RAM)"
    extra = (" (validation evaluates each image at eval_img_size, and with eval_hflip also its mirror image, so it "
             "needs more memory per batch than training)" if phase == "validation" else "")
    if batch_size > 1:
        fix = (f"Set batch_size to {batch_size // 2} (half of {batch_size}) or lower and start the job again; lr "
               f"follows the batch size on its own.")
    else:
        fix = "Not even one image fits: choose a smaller img_size or model."
    bigger = "an instance type with more GPU memory" if device == "GPU" else "an instance type with more memory"
    return (f"Out of {memory} in {phase} with batch_size={batch_size}{extra}. {fix} A smaller img_size or model, "
            f"or {bigger}, also helps.")


def worker_crash_reason(text: str, workers: int, datasets) -> str:
    died = _WORKER_DIED.search(text)
    pids = [int(pid) for pid in re.findall(r"\d+", died.group(1))] if died else []
    signal = (died.group(2) or "").strip() if died else ""
    files = [path for dataset in datasets for path in dataset.being_read(pids)]
    reading = f" while reading {', '.join(files[:3])}" if files else ""
    how = f"was killed by signal {signal}" if signal else "died"
    if "Bus error" in signal or "shared memory" in text or "/torch_" in text:
        advice = (f"The shared memory (/dev/shm) that workers pass batches through is too small: lower workers "
                  f"(now {workers}) or batch_size.")
    elif signal in ("Killed", ""):
        advice = (f"Most likely the machine ran out of memory and the system killed it: lower workers (now "
                  f"{workers}) or batch_size, or choose an instance type with more memory. If it always happens "
                  f"on the same file, remove that file.")
    else:
        advice = (f"If it happens again on the same file, remove that file; otherwise lower workers (now {workers}) "
                  f"or set workers=0 to load images in the training process.")
    return f"A data-loading worker process{f' (pid {pids[0]})' if pids else ''} {how}{reading}. {advice}"


def worker_message(exc: BaseException) -> str | None:
    """The original message of a JobError that a data-loading worker raised, without the worker's traceback."""
    text = str(exc)
    return _last_line(text) if _FROM_WORKER.search(text) else None


def _last_line(text: str) -> str:
    """"package.module.Error: message" (a traceback's last line) -> "message"."""
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last
