"""Every GPU of every instance: one training process per GPU, joined by torch.distributed.

`train` starts the processes itself (the buyer only picks an instance type and count): on each host
`launch` spawns one process per GPU; all of them meet at the first host of resourceconfig.json, and
each runs the same training loop under DistributedDataParallel (NCCL on GPUs, gloo on CPUs). Rank 0
alone writes outputs, checkpoints and metric lines. A process that fails leaves its reason where its
host's `train` finds it and, through the rendezvous store, where the other hosts do: the whole job
ends within seconds with that reason, instead of the others waiting on it until the job's time limit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

from .errors import JobError
from .sagemaker import Hosts, SageMakerEnvironment
from .stopping import exit_now, stop_here

log = logging.getLogger("efficientnet_train")
FAILURE_KEY = "first-failure"


@dataclass(frozen=True)
class Rank:
    """Which of the job's processes this is."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host: str = "localhost"
    per_host: int = 1  # processes on this host, which share its CPU cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Rank()


@dataclass(frozen=True)
class Cluster:
    hosts: Hosts
    processes_per_host: int
    timeout_s: int
    port: int

    @classmethod
    def of(cls, env: SageMakerEnvironment) -> "Cluster":
        gpus = torch.cuda.device_count()  # NVML's count: does not initialise CUDA in this parent process
        return cls(env.hosts, env.processes_per_host or max(gpus, 1), env.peer_timeout_s, env.rendezvous_port)

    @property
    def world_size(self) -> int:
        return len(self.hosts.names) * self.processes_per_host

    def rank(self, local_rank: int) -> Rank:
        return Rank(self.hosts.rank * self.processes_per_host + local_rank, self.world_size, local_rank,
                    self.hosts.current, self.processes_per_host)

    @property
    def master(self) -> str:
        return self.hosts.names[0] if self.hosts.interface else "127.0.0.1"


def launch(cluster: Cluster, target: Callable, *args) -> None:
    """Run `target(*args, rank)` in one process per GPU of this host; return when all of them are done (or
    stopped), raise a JobError with the first failure's reason when any of them (here or on another host) fails."""
    stopper = _Stopper()
    try:
        if not _wait_until_resolvable(cluster, stopper):
            return
        # Without these, gloo and NCCL pick an interface by themselves, which in a SageMaker container may be
        # one the other hosts cannot reach.
        interface = cluster.hosts.interface or "lo"
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
        log.info("Distributed training: %d processes (%d hosts x %d per host), this is host %s (node rank %d); "
                 "meeting at %s:%d over %s", cluster.world_size, len(cluster.hosts.names), cluster.processes_per_host,
                 cluster.hosts.current, cluster.hosts.rank, cluster.master, cluster.port, interface)
        with tempfile.TemporaryDirectory(prefix="failures-") as failures:
            context = torch.multiprocessing.start_processes(
                _process, args=(cluster, Path(failures), target, args), nprocs=cluster.processes_per_host,
                join=False, start_method="spawn")
            for local_rank, process in enumerate(context.processes):
                log.info("Started rank %d (pid %d)", cluster.rank(local_rank).rank, process.pid)
            stopper.forward_to(context.processes)
            try:
                # grace_period=0: once one process has failed, the job has; the others are stopped at once.
                while not context.join(timeout=1, grace_period=0):
                    pass
            except ProcessException as exc:
                if stopper.signal_name and getattr(exc, "signal_name", None) == stopper.signal_name:
                    # Stopped while still meeting the others, before training (which saves its place) began.
                    log.info("Stopped by %s before training started: nothing to save.", stopper.signal_name)
                    return
                raise JobError(_first_failure(cluster, Path(failures), exc)) from None
    finally:
        stopper.restore()


def _wait_until_resolvable(cluster: Cluster, stopper: "_Stopper") -> bool:
    """SageMaker's host names may take a moment to appear in DNS after the container starts. False: stopped."""
    deadline, pending = time.monotonic() + cluster.timeout_s, list(cluster.hosts.names)
    next_note = time.monotonic() + 10
    while pending:
        if stopper.signal_name:
            log.info("Stopped by %s while waiting for the other hosts: nothing to save.", stopper.signal_name)
            return False
        try:
            socket.getaddrinfo(pending[0], cluster.port)
            pending.pop(0)
            continue
        except socket.gaierror as exc:
            if time.monotonic() > deadline:
                raise JobError(f"The host name {pending[0]!r} (from resourceconfig.json) did not resolve within "
                               f"{cluster.timeout_s} s ({exc}), so this host cannot reach the others of the job. "
                               f"If the job runs in a VPC, check that its DNS resolution is enabled.") from None
            if time.monotonic() > next_note:
                log.info("Waiting for the host name %s to resolve (%s)", pending[0], exc)
                next_note = time.monotonic() + 30
        time.sleep(1)
    return True


class _Stopper:
    """SageMaker stops a job by sending SIGTERM to this process only, PID 1 of the container, which ignores a
    signal it has no handler for: from the start, a stop is noted and passed on to the training processes,
    which save their place and end cleanly."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.processes: list = []
        self.previous = {signum: signal.signal(signum, self._received) for signum in (signal.SIGTERM, signal.SIGINT)}

    def forward_to(self, processes: list) -> None:
        self.processes = processes
        if self.signal_name:  # arrived while they were being started
            self._send(signal.Signals[self.signal_name])

    def _received(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":  # a second Ctrl-C: the way out of a slow stop
            self._send(signal.SIGKILL)
            exit_now("SIGINT received again: stopping every training process at once, without saving; a restarted "
                     "job resumes from the last checkpoint, if any.", 128 + signal.SIGINT)
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: %s", self.signal_name,
                    "passing it on to the training processes" if self.processes else "stopping")
        self._send(signum)

    def _send(self, signum: int) -> None:
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def _process(local_rank: int, cluster: Cluster, failures: Path, target: Callable, args: tuple) -> None:
    """One training process: join the others, train, and on failure leave the reason for the host's `train`."""
    rank = cluster.rank(local_rank)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO if rank.is_main else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {rank.rank}] %(message)s")
    store = None
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        store = _join(cluster, rank)
        target(*args, rank)
        # Rank 0 writes model/ after the last gradient exchange (the best model, the checkpoint, args.yml): no
        # host's `train` may end before that is done. The SDK's local mode (docker compose
        # --abort-on-container-exit) stops every container of the job as soon as one of them exits.
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every way of failing must reach output/failure
        reason, caused_here = _reason(exc, rank, store)
        log.error("Rank %d failed: %s", rank.rank, reason, exc_info=caused_here)
        (failures / f"rank-{rank.rank}.json").write_text(json.dumps({"reason": reason, "caused_here": caused_here}))
        sys.stdout.flush()
        # Not sys.exit: interpreter shutdown can wait forever on a process group whose peers are gone.
        os._exit(1)


def _join(cluster: Cluster, rank: Rank):
    """Meet the other processes at the first host; a peer that never comes fails the job after the timeout."""
    timeout = timedelta(seconds=cluster.timeout_s)
    try:
        store = dist.TCPStore(cluster.master, cluster.port, cluster.world_size, is_master=rank.is_main,
                              timeout=timeout, wait_for_workers=True)
    except (RuntimeError, dist.DistError) as exc:
        raise JobError(f"The {cluster.world_size} processes of this job did not all meet at {cluster.master}:"
                       f"{cluster.port} within {cluster.timeout_s} s (hosts {', '.join(cluster.hosts.names)}; "
                       f"{type(exc).__name__}: {_first_line(exc)}). A host did not start, or the hosts cannot reach "
                       f"each other on port {cluster.port} over {cluster.hosts.interface or 'lo'}.") from None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank.rank, world_size=rank.world_size, timeout=timeout,
                            device_id=torch.device("cuda", rank.local_rank) if backend == "nccl" else None)
    return store


def _reason(exc: BaseException, rank: Rank, store) -> tuple[str, bool]:
    """(the reason, whether it happened here): a process that only lost its peers reports the peer's reason."""
    if not _lost_contact(exc) or store is None:
        reason = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
        _tell_the_others(store, f"rank {rank.rank} (host {rank.host}): {reason}")
        return reason, True
    try:  # a collective broke: most likely another process failed first and said why
        store.set_timeout(timedelta(seconds=5))
        return f"another process failed first, {store.get(FAILURE_KEY).decode()}", False
    except Exception:  # noqa: BLE001 - the store lives in rank 0: gone if rank 0's host is
        return (f"lost contact with the other processes ({type(exc).__name__}: {_first_line(exc)}); the first "
                f"failure is in another host's log"), False


def _lost_contact(exc: BaseException) -> bool:
    """A broken collective (a peer gone), as opposed to a failure of this process's own."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and not isinstance(exc, JobError) and any(
        word in text for word in ("gloo", "nccl", "connection", "peer", "socket", "timed out"))


def _tell_the_others(store, reason: str) -> None:
    if store is not None:
        try:
            store.compare_set(FAILURE_KEY, "", reason)  # the first failure wins
        except Exception:  # noqa: BLE001 - best effort: the store may be gone with rank 0
            pass


def _first_failure(cluster: Cluster, failures: Path, exc: ProcessException) -> str:
    reports = {int(path.stem.split("-")[1]): json.loads(path.read_text()) for path in failures.glob("rank-*.json")}
    first = cluster.rank(exc.error_index).rank
    killed_by = getattr(exc, "signal_name", None)
    if killed_by and first not in reports:
        return (f"Rank {first} of {cluster.world_size} (host {cluster.hosts.current}) was killed by "
                f"{killed_by}. If nobody stopped it, the host most likely ran out of memory: lower "
                f"batch_size or workers, or choose an instance type with more memory.")
    caused_here = [rank for rank, report in sorted(reports.items()) if report["caused_here"]]
    chosen = caused_here[0] if caused_here else first if first in reports else min(reports, default=first)
    reason = reports.get(chosen, {}).get("reason") or _first_line(exc)
    return f"Rank {chosen} of {cluster.world_size} (host {cluster.hosts.current}) failed: {reason}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


class AgreedStop:
    """A stop request all processes act on at the same batch: one that stopped alone would leave the
    others waiting for it in their next gradient exchange."""

    def __init__(self, stop) -> None:
        self.stop, self.group = stop, dist.new_group(backend="gloo")  # on the CPU: never waits for the GPU

    @property
    def signal_name(self) -> str | None:
        return self.stop.signal_name or "SIGTERM"

    def __bool__(self) -> bool:
        flag = torch.tensor([1 if self.stop else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def fewest(self, count: int) -> int:
        """The smallest `count` of any process."""
        least = torch.tensor([count])
        dist.all_reduce(least, op=dist.ReduceOp.MIN, group=self.group)
        return int(least.item())


def stoppable(loader, stop):
    """`loader`'s batches, with Interrupted raised before one once `stop` is asked for (never where it is None). An
    AgreedStop, which every process must check together, is checked before each batch that every process has: their
    shares of a set may differ by a batch."""
    batches = stop.fewest(len(loader)) if isinstance(stop, AgreedStop) else math.inf
    for index, batch in enumerate(loader):
        if index < batches:
            stop_here(stop)
        yield batch


def own_request(stop):
    """This process's own stop request, for work that processes may stop at different points: then all stop
    together at the AgreedStop checked next."""
    return stop.stop if isinstance(stop, AgreedStop) else stop


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sums over all processes, in place; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def max_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The largest value of any process, in place; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Make batch-norm statistics those of rank 0: each process updated them on its own batches, and the model
    evaluated (and saved) must be one model."""
    broadcast_tensors(module.buffers())


def broadcast_tensors(tensors) -> None:
    """Rank 0's values in these tensors on every process, in place."""
    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def rows_of_all(rows: torch.Tensor, share: torch.utils.data.Dataset) -> torch.Tensor:
    """Every process's rows for its share of `share.dataset` (one row per item, in share order), put in their
    places among all the items and summed over the processes: each process gets all the rows. A dataset that
    is no Subset is all of itself."""
    if not isinstance(share, torch.utils.data.Subset):
        return sum_over_ranks(rows)
    whole = rows.new_zeros((len(share.dataset), *rows.shape[1:]))
    whole[torch.as_tensor(list(share.indices), dtype=torch.long, device=rows.device)] = rows
    return sum_over_ranks(whole)


def broadcast_object(value, rank: Rank):
    """Rank 0's `value` on every process."""
    if not rank.distributed:
        return value
    holder = [value if rank.is_main else None]
    dist.broadcast_object_list(holder, 0, device=torch.device("cpu") if not torch.cuda.is_available() else None)
    return holder[0]
