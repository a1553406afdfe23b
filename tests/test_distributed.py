"""Distributed training on CPUs with gloo: two processes on one machine, and two "hosts" each in its own
network namespace, joined by a veth pair, meeting as SageMaker's instances do."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import TRAIN_COMMAND, failure_reason, make_job, read_summary, run_train

EXPECTED_OUTPUTS = {"args.yml", "labels.json", "model_best.pth.tar", "summary.csv", "metrics.png",
                    "confusion_matrix.csv", "model.tar.gz"}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture
def learning_hyperparameters(tiny_hyperparameters) -> dict[str, str]:
    # A model that has learned something, so that the accuracies compared are not ties between classes.
    return {**tiny_hyperparameters, "epochs": "2", "batch_size": "4", "opt": "adamw", "lr": "0.2", "aa": "none",
            "reprob": "0", "layer_decay": "1", "drop": "0", "drop_connect": "0", "warmup_epochs": "0",
            "early_stopping": "false"}


def evaluate_alone(model_dir: Path, val_dir: Path):
    """The saved model evaluated in this one process on the whole val set, as validation does it."""
    import torch

    from efficientnet_train.channels import scan_channel
    from efficientnet_train.data import ModelInput, dataset_of, eval_transform
    from efficientnet_train.model import autocast_for, load_trained_model
    from efficientnet_train.engine import evaluate

    model, checkpoint = load_trained_model(model_dir / "model_best.pth.tar")
    channel = scan_channel("val", val_dir, classes=checkpoint["labels"])
    loader = torch.utils.data.DataLoader(dataset_of(channel, eval_transform(checkpoint["data_config"])),
                                         batch_size=5)
    device = torch.device("cpu")
    return evaluate({"saved": model}, loader, ModelInput(checkpoint["data_config"], device), autocast_for(device)[0],
                    len(checkpoint["labels"]), checkpoint["eval_hflip"])["saved"]


def check_outputs_agree_with_one_process(base: Path, processes: int) -> None:
    model_dir = base / "model"
    assert EXPECTED_OUTPUTS <= {p.name for p in model_dir.iterdir()}
    args = yaml.safe_load((model_dir / "args.yml").read_text())
    assert args["processes"] == processes
    assert args["global_batch_size"] == processes * args["batch_size"]
    rows = read_summary(model_dir)
    best = rows[args["best_epoch"]]  # row 0: the linear probe
    alone = evaluate_alone(model_dir, base / "input" / "data" / "val")
    # The distributed figure is over the whole val set, each image once: the same as one process's.
    assert float(best["eval_top1"]) == pytest.approx(alone.top1, abs=1e-4)
    assert float(best["eval_loss"]) == pytest.approx(alone.loss, abs=1e-4)
    assert sum(map(sum, alone.confusion)) == args["val_images"]
    assert alone.top1 > 50, "the test model should have learned something"


def test_two_processes_train_one_model(tmp_path, learning_hyperparameters):
    base = make_job(tmp_path / "ml", learning_hyperparameters)
    result = run_train(base, TRAIN_PROCESSES_PER_HOST="2", MASTER_PORT=free_port())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Distributed training: 2 processes (1 hosts x 2 per host)" in result.stdout
    # Metric lines once, from rank 0: SageMaker would otherwise record every value twice.
    assert result.stdout.count("validation:acc_1=") == 3  # epochs 0 (the linear probe), 1 and 2
    assert "[rank 1]" not in result.stdout  # nor rank 1's copy of a warning every rank meets, such as this one
    assert result.stdout.count("Recipe (auto): freeze_batchnorm=") == 1
    assert re.search(r"First training step done .*, starting training process 1 of 2 [\d.]+ s, building the model",
                     result.stdout)
    check_outputs_agree_with_one_process(base, 2)
    checkpoint_args = sorted(p.name for p in (base / "checkpoints").iterdir())
    assert checkpoint_args == ["checkpoint-00002-0000000.pth.tar", "checkpoint-00003-0000000.pth.tar"]


def start_train(base: Path, **env: str) -> subprocess.Popen:
    environ = {key: value for key, value in os.environ.items() if key != "TRAINING_JOB_NAME"}
    environ.update(SAGEMAKER_BASE_DIR=str(base), **env)
    return subprocess.Popen([TRAIN_COMMAND], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(process: subprocess.Popen, text: str, lines: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n" + "".join(lines[-40:])
    raise AssertionError(f"train ended before {text!r}:\n" + "".join(lines[-40:]))


def test_a_killed_rank_ends_the_job_at_once_with_its_reason(tmp_path, learning_hyperparameters):
    base = make_job(tmp_path / "ml", {**learning_hyperparameters, "epochs": "50"})
    process, lines = start_train(base, TRAIN_PROCESSES_PER_HOST="2", MASTER_PORT=free_port()), []
    read_until(process, "Started rank 1 (pid", lines)
    rank_1 = int(lines[-1].rsplit("pid ", 1)[1].rstrip(")\n"))
    read_until(process, "epoch 2/50", lines)
    killed = time.monotonic()
    os.kill(rank_1, signal.SIGKILL)
    lines.extend(process.stdout)
    assert process.wait(timeout=60) == 1
    assert time.monotonic() - killed < 30, "the job must not wait for the lost rank"
    reason = failure_reason(base)
    assert "Rank 1 of 2" in reason and "SIGKILL" in reason, reason
    # What was written before is kept: the first epochs' model and checkpoint.
    assert (base / "model" / "model_best.pth.tar").exists()
    assert list((base / "checkpoints").glob("checkpoint-*.pth.tar"))


def test_sigterm_stops_all_ranks_at_the_same_batch_and_the_run_resumes(tmp_path, learning_hyperparameters):
    hyperparameters = {**learning_hyperparameters, "epochs": "2"}
    base = make_job(tmp_path / "ml", hyperparameters)
    port = free_port()
    process, lines = start_train(base, TRAIN_PROCESSES_PER_HOST="2", MASTER_PORT=port), []
    read_until(process, "epoch 1/2", lines)
    process.send_signal(signal.SIGTERM)
    lines.extend(process.stdout)
    assert process.wait(timeout=120) == 0, "".join(lines[-40:])
    log = "".join(lines)
    assert "Stopped by SIGTERM" in log
    assert yaml.safe_load((base / "model" / "args.yml").read_text())["stop_reason"] == "stopped by SIGTERM"
    result = run_train(base, TRAIN_PROCESSES_PER_HOST="2", MASTER_PORT=port)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Resuming from checkpoint" in result.stdout
    assert [row["epoch"] for row in read_summary(base / "model")] == ["0", "1", "2"]
    # Another number of processes would change every step: refused, with the reason.
    result = run_train(base, TRAIN_PROCESSES_PER_HOST="3", MASTER_PORT=port)
    assert result.returncode == 1
    assert "2 training processes there, 3 here" in failure_reason(base)


def test_sigterm_in_the_linear_probe_stops_every_rank_together(tmp_path, learning_hyperparameters):
    """The probe's phases, whose shares differ between the ranks by an image, stop at a batch all of them reach."""
    base = make_job(tmp_path / "ml", {**learning_hyperparameters, "aa": "auto", "epochs": "3"})
    process, lines = start_train(base, TRAIN_PROCESSES_PER_HOST="2", MASTER_PORT=free_port()), []
    read_until(process, "Linear probe: the frozen features of", lines)
    process.send_signal(signal.SIGTERM)
    lines.extend(process.stdout)
    assert process.wait(timeout=120) == 0, "".join(lines[-40:])
    log = "".join(lines)
    assert "Stopped by SIGTERM in epoch 0 (the linear probe)" in log, log[-3000:]  # seconds of probe were left
    assert not (base / "output" / "failure").exists()
    assert yaml.safe_load((base / "model" / "args.yml").read_text())["stop_reason"] == "stopped by SIGTERM"


def test_a_host_that_never_comes_fails_the_job_with_a_reason(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path / "ml", tiny_hyperparameters)
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "localhost", "hosts": ["localhost", "127.0.0.1"], "network_interface_name": "lo"}))
    started = time.monotonic()
    result = run_train(base, TRAIN_PEER_TIMEOUT_S="3", MASTER_PORT=free_port())
    assert result.returncode == 1
    assert time.monotonic() - started < 60
    reason = failure_reason(base)
    assert "did not all meet" in reason and "within 3 s" in reason and "1/2 clients joined" in reason, reason


def test_a_broken_resourceconfig_is_named(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path / "ml", tiny_hyperparameters, with_data=False)
    (base / "input" / "config" / "resourceconfig.json").write_text('{"hosts": ["algo-1"], "current_host": "algo-9"}')
    result = run_train(base)
    assert result.returncode == 1
    assert "current_host 'algo-9' is not one of the hosts ['algo-1']" in failure_reason(base)


# -- two hosts, each in its own network namespace ----------------------------------------------------------

def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture
def two_hosts():
    """Network namespaces algo-1 and algo-2 joined by a veth pair named eth9 on both sides (as every
    SageMaker instance has the same interface name), each resolving both host names via /etc/netns."""
    if not _can_make_namespaces():
        pytest.skip("needs root and iproute2 to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    names = [f"algo-1-{tag}", f"algo-2-{tag}"]
    addresses = ["10.213.7.1", "10.213.7.2"]
    hosts_file = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(addresses, names))

    def ip(*args: str, namespace: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

    try:
        ip("link", "add", f"v1{tag}", "type", "veth", "peer", "name", f"v2{tag}")
        for index, (name, address) in enumerate(zip(names, addresses), start=1):
            ip("netns", "add", name)
            Path(f"/etc/netns/{name}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{name}/hosts").write_text(hosts_file)
            ip("link", "set", f"v{index}{tag}", "netns", name)
            ip("link", "set", f"v{index}{tag}", "name", "eth9", namespace=name)
            ip("addr", "add", f"{address}/24", "dev", "eth9", namespace=name)
            ip("link", "set", "eth9", "up", namespace=name)
            ip("link", "set", "lo", "up", namespace=name)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def start_on_host(namespace: str, base: Path, hosts: list[str], **env: str) -> subprocess.Popen:
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(
        {"current_host": namespace, "hosts": hosts, "network_interface_name": "eth9"}))
    environ = {key: value for key, value in os.environ.items() if key != "TRAINING_JOB_NAME"}
    environ.update(SAGEMAKER_BASE_DIR=str(base), **env)
    return subprocess.Popen(["ip", "netns", "exec", namespace, TRAIN_COMMAND], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_hosts_in_their_own_network_namespaces_train_one_model(tmp_path, two_hosts, learning_hyperparameters):
    bases = [make_job(tmp_path / name, learning_hyperparameters) for name in two_hosts]
    processes = [start_on_host(name, base, two_hosts) for name, base in zip(two_hosts, bases)]
    logs = [process.communicate(timeout=400)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"this is host {two_hosts[1]} (node rank 1); meeting at {two_hosts[0]}:29500 over eth9" in logs[1]
    check_outputs_agree_with_one_process(bases[0], 2)
    assert not (bases[1] / "model").exists() or not list((bases[1] / "model").iterdir()), "only rank 0 writes"
    assert "validation:acc_1=" not in logs[1]


def test_a_failure_on_one_host_ends_the_other_with_its_reason(tmp_path, two_hosts, learning_hyperparameters):
    bases = [make_job(tmp_path / name, {**learning_hyperparameters, "epochs": "50"}) for name in two_hosts]
    # The second host's previous model is of another architecture: its process fails while starting to train.
    (bases[1] / "input" / "data" / "model").mkdir()
    import torch
    torch.save({"arch": "efficientnet_b0", "state_dict": {}, "labels": ["ants", "bees", "wasps"]},
               bases[1] / "input" / "data" / "model" / "model_best.pth.tar")
    processes = [start_on_host(name, base, two_hosts) for name, base in zip(two_hosts, bases)]
    logs = [process.communicate(timeout=400)[0] for process in processes]
    assert [process.returncode for process in processes] == [1, 1], logs[0][-3000:] + logs[1][-3000:]
    reasons = [failure_reason(base) for base in bases]
    assert reasons[1].startswith(f"Rank 1 of 2 (host {two_hosts[1]}) failed:"), reasons[1]
    assert "efficientnet_b0" in reasons[1]
    # The first host names the second host's reason, not just a broken connection.
    assert f"another process failed first, rank 1 (host {two_hosts[1]})" in reasons[0], reasons[0]
    assert "efficientnet_b0" in reasons[0]


HOST_SCRIPT = '''
import sys, time
from pathlib import Path
from efficientnet_train.distributed import Cluster, launch
from efficientnet_train.sagemaker import Hosts

def target(done, rank):
    if rank.is_main:  # rank 0 still writing model/ after the last collective, as after an early stop
        time.sleep(3)
        Path(done).write_text("written")

if __name__ == "__main__":
    names, current, port, done = ("localhost", "127.0.0.1"), sys.argv[1], int(sys.argv[2]), sys.argv[3]
    launch(Cluster(Hosts(names, current, "lo"), 1, 60, port), target, done)
    print("rank 0 had written:", Path(done).exists(), flush=True)
'''


def test_no_host_ends_before_rank_0_has_written(tmp_path):
    """docker compose --abort-on-container-exit (the SDK's local mode) stops the job when any host's train exits."""
    script, done, port = tmp_path / "host.py", tmp_path / "done", free_port()
    script.write_text(HOST_SCRIPT)
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    hosts = [subprocess.Popen([sys.executable, str(script), name, port, str(done)], env=environ, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for name in ("localhost", "127.0.0.1")]
    try:
        second = hosts[1].communicate(timeout=120)[0]
        assert hosts[1].returncode == 0, second
        assert "rank 0 had written: True" in second, second
        assert hosts[0].wait(timeout=60) == 0, hosts[0].communicate()[0]
    finally:
        for host in hosts:
            host.kill()


def test_sigterm_while_waiting_for_the_other_hosts_stops_at_once(tmp_path, tiny_hyperparameters):
    """train is PID 1 in the container, which ignores a signal without a handler: StopTrainingJob must work
    before training starts too."""
    base = make_job(tmp_path / "ml", tiny_hyperparameters)
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "localhost", "hosts": ["localhost", "algo-2.invalid"], "network_interface_name": "lo"}))
    process, lines = start_train(base, MASTER_PORT=free_port()), []
    read_until(process, "channel 'val'", lines)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    lines.extend(process.stdout)
    assert process.wait(timeout=30) == 0, "".join(lines[-20:])
    assert "Stopped by SIGTERM while waiting for the other hosts" in "".join(lines)
    assert not (base / "output" / "failure").exists()


STOPPABLE_SCRIPT = '''
import sys
from datetime import timedelta

import torch.distributed as dist

from efficientnet_train import distributed
from efficientnet_train.stopping import Interrupted, StopRequest

rank, port, asked_at = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=30))
request, seen = StopRequest(), []
stop = distributed.AgreedStop(request)
try:
    for batch in distributed.stoppable(list(range(5 - rank)), stop):  # rank 0's share has a batch more
        seen.append(batch)
        if rank == 1 and batch == asked_at:  # the signal reaches one process only
            request.signal_name = "SIGTERM"
    print("finished", seen, "stop:", bool(stop), flush=True)
except Interrupted:
    print("interrupted after", seen, flush=True)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.parametrize("asked_at, said", [(1, "interrupted after [0, 1]"), (3, "stop: True")])
def test_processes_whose_shares_differ_by_a_batch_stop_at_the_same_one_or_all_finish_it(tmp_path, asked_at, said):
    """Validation and the linear probe's phases: each process's share of a set may hold a batch more than another's,
    and a stop that all processes check at every batch would wait forever for the one that has no batch left."""
    script, port = tmp_path / "stoppable.py", free_port()
    script.write_text(STOPPABLE_SCRIPT)
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), port, str(asked_at)], env=environ, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert all(said in output for output in outputs), outputs
    if asked_at == 3:  # asked at rank 1's last batch: rank 0 ends its own last one, unchecked, and both see the stop
        assert "finished [0, 1, 2, 3, 4]" in outputs[0] and "finished [0, 1, 2, 3]" in outputs[1], outputs
