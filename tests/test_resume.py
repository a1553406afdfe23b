"""Checkpoints, resuming and clean stops: a job that is stopped or killed at any moment carries on."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import COLOURS, TINY_MODEL, TRAIN_COMMAND, make_channels, make_job, read_summary, run_train

# batch_size 2: 18 batches an epoch, so a signal sent mid-epoch lands between batches, not after them.
RESUMABLE = {"epochs": "3", "batch_size": "2", "warmup_epochs": "1", "early_stopping": "false"}


def start_train(base, **env) -> subprocess.Popen:
    """The job in a process group of its own, as a terminal or `timeout` starts a command."""
    environ = {key: value for key, value in os.environ.items() if key != "TRAINING_JOB_NAME"}
    return subprocess.Popen([TRAIN_COMMAND], env={**environ, "SAGEMAKER_BASE_DIR": str(base), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_until(job: subprocess.Popen, pattern: str) -> str:
    """The log up to the first line matching `pattern`."""
    lines = []
    for line in job.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return "".join(lines)
    raise AssertionError(f"the job ended before '{pattern}':\n{''.join(lines)[-3000:]}")


def checkpoints(folder):
    return sorted(path.name for path in folder.glob("checkpoint-*.pth.tar"))


def final_state(base) -> dict:
    return torch.load(base / "checkpoints" / checkpoints(base / "checkpoints")[-1], weights_only=True)


def assert_same_run(base, reference):
    """Same summary rows (each epoch once, in order), same best model, same final weights and EMA."""
    assert read_summary(base / "model") == read_summary(reference / "model")
    best = torch.load(base / "model" / "model_best.pth.tar", weights_only=True)
    best_reference = torch.load(reference / "model" / "model_best.pth.tar", weights_only=True)
    assert best["epoch"] == best_reference["epoch"] and best["metric"] == best_reference["metric"]
    for key, value in best_reference["state_dict"].items():
        assert torch.equal(best["state_dict"][key], value), f"best model's {key} differs after resuming"
    state, state_reference = final_state(base), final_state(reference)
    for part in ("model", "ema"):
        for key, value in state_reference[part].items():
            assert torch.equal(state[part][key], value), f"{part} {key} differs after resuming"


def resume_and_compare(base, reference) -> str:
    """Start the job again on the same tree; it must finish as the uninterrupted run did. Returns its log."""
    resumed = run_train(base)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(base, reference)
    return resumed.stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_weights):
    base = make_job(tmp_path_factory.mktemp("uninterrupted"),
                    {"model": TINY_MODEL, "pretrained_path": str(tiny_weights["pth"]), "img_size": "32",
                     "workers": "0", **RESUMABLE})
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base, json.loads((base / "input" / "config" / "hyperparameters.json").read_text())


def copy_job(uninterrupted, tmp_path, **overrides):
    reference, hyperparameters = uninterrupted
    return make_job(tmp_path / "job", {**hyperparameters, **overrides})


def test_sigterm_at_any_instant_of_start_up_stops_at_once_and_cleanly(tmp_path, tiny_hyperparameters):
    """As PID 1 in the container, a signal without a handler is dropped: the handler is the command's first act.
    Raising from it was not safe: landing while torch imported a C++ extension, the exception became
    std::terminate and SIGABRT. So signals go in at many instants, from the interpreter's start through the
    imports, the data scan and the model's creation, into training; each job must end at once with exit 0,
    having written nothing if training had not begun (or, outside a container, be killed before its first line,
    when no handler can exist yet)."""
    base = make_job(tmp_path, tiny_hyperparameters)
    outcomes = []
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2):
        shutil.rmtree(base / "model", ignore_errors=True)
        shutil.rmtree(base / "checkpoints", ignore_errors=True)
        job = start_train(base)
        time.sleep(delay)
        job.send_signal(signal.SIGTERM)
        log, _ = job.communicate(timeout=120)
        if job.returncode == -signal.SIGTERM and not log:  # before Python ran the command's first line
            outcomes.append("before the handler")
            continue
        if job.returncode == -signal.SIGTERM and "Packed" in log:  # after the job's last line, as Python exits
            outcomes.append("finished")
            continue
        assert job.returncode == 0, (delay, log)
        assert "Traceback" not in log and "terminate called" not in log, (delay, log)
        assert not (base / "output" / "failure").exists()
        if "during start-up, before training began: nothing to save." in log:
            outcomes.append("start-up")
            assert not (base / "model").exists() and not (base / "checkpoints").exists(), delay
        else:
            assert re.search(r"Stopped by SIGTERM (in|after) epoch", log), (delay, log)
            outcomes.append("training")
    assert outcomes.count("start-up") >= 5, outcomes  # most instants land before training, on any machine


PROBE_PHASES = (r"Linear probe: the frozen features", r"Linear probe: fitting the classifier",
                r"Linear probe: measuring", r"Linear probe \(epoch 0\)")


@pytest.mark.parametrize("phase", PROBE_PHASES)
def test_sigterm_in_each_phase_of_the_probe_stops_at_once_and_says_what_was_saved(tmp_path, tiny_hyperparameters,
                                                                                  phase):
    """A stop during a 1,000-class probe was ignored for 8 minutes, until SIGKILL, while the log said a checkpoint
    was being saved. Each phase's own log line, then SIGTERM: the job ends within seconds, exit 0, and says truly
    whether it saved anything (nothing before training began; the probe's checkpoint once epoch 0 is done)."""
    base = make_job(tmp_path, {**tiny_hyperparameters, "batch_size": "2", "epochs": "3"})
    job = start_train(base)
    log = run_until(job, phase)
    started = time.monotonic()
    job.send_signal(signal.SIGTERM)
    log += job.communicate(timeout=120)[0]
    assert job.returncode == 0 and time.monotonic() - started < 30, log[-3000:]
    assert "Traceback" not in log and "epoch 1/3" not in log, log[-3000:]
    assert log.count("SIGTERM received") == 1
    if "before training began: nothing to save" in log:
        assert not checkpoints(base / "checkpoints")
        assert yaml.safe_load((base / "model" / "args.yml").read_text())["stop_reason"] == "stopped by SIGTERM"
    else:  # landed after epoch 0's validation: its checkpoint is the probe's
        assert "Stopped by SIGTERM after epoch 0" in log, log[-3000:]
        assert checkpoints(base / "checkpoints") == ["checkpoint-00001-0000000.pth.tar"]


# Each signal on a line of its phase, sent to the whole process group as Ctrl-C, `timeout` and `kill -- -PGID` send
# it: the job's data-loading workers (workers=2) get it too.
GROUP_STOPS = [("SIGTERM", r"Linear probe: the frozen features", "the probe's features"),
               ("SIGINT", r"Linear probe: measuring", "the probe's measurements and its validation"),
               ("SIGTERM", r"First training step", "training"), ("SIGINT", r"First training step", "training")]


@pytest.mark.parametrize("name, line, phase", GROUP_STOPS, ids=[f"{n} in {p}" for n, _, p in GROUP_STOPS])
def test_a_stop_sent_to_the_whole_process_group_stops_the_job_cleanly(tmp_path, tiny_hyperparameters, name, line,
                                                                      phase):
    """A worker killed by the group's SIGTERM failed the job, blaming a file, with no model.tar.gz. The workers now
    leave the stop to the job, which stops as for a signal to itself."""
    base = make_job(tmp_path, {**tiny_hyperparameters, "batch_size": "2", "epochs": "3", "workers": "2"})
    job = start_train(base)
    log = run_until(job, line)
    started = time.monotonic()
    os.killpg(job.pid, getattr(signal, name))
    log += job.communicate(timeout=120)[0]
    assert job.returncode == 0 and time.monotonic() - started < 30, log[-3000:]
    assert "Traceback" not in log and "Training failed" not in log and "worker process" not in log, log[-3000:]
    assert log.count(f"{name} received") == 1 and "already stopping" not in log
    assert yaml.safe_load((base / "model" / "args.yml").read_text())["stop_reason"] == f"stopped by {name}"
    if phase == "training":  # the probe is the best model so far: packed, as at the end of a job
        assert re.search(rf"Stopped by {name} (in|after) epoch 1", log), log[-3000:]
        assert (base / "model" / "model.tar.gz").exists()


def test_a_group_stop_landing_while_a_loader_worker_starts_is_left_to_the_main_process(monkeypatch):
    """torch gives a new worker a SIGTERM handler that ends it, replaced only by the worker_init_fn: a group stop
    landing in between killed the worker and failed the job (seen in CI, in a predict test). Here
    every worker gets SIGTERM at that very instant: the loader still yields every item, where a plain one
    failed."""
    from torch.utils.data._utils import signal_handling

    from efficientnet_train.data import Loader
    from efficientnet_train.stopping import ignore_stop_signals

    torch_handlers = signal_handling._set_worker_signal_handlers

    def then_a_stop():
        torch_handlers()
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", then_a_stop)  # the workers are forked
    assert [int(x) for x in Loader(list(range(8)), num_workers=2, batch_size=1)] == list(range(8))
    with pytest.raises(RuntimeError, match="DataLoader worker .* (is killed by signal|exited unexpectedly)"):
        list(torch.utils.data.DataLoader(list(range(8)), num_workers=2, batch_size=1,
                                         worker_init_fn=ignore_stop_signals))


def test_a_process_exits_while_a_loader_with_persistent_workers_is_still_referenced():
    """Its workers ignore SIGTERM, the signal multiprocessing's exit hook stops them with; unless the loader tells
    them to end first, the process waits for them forever after its job is done."""
    script = textwrap.dedent("""
        import sys
        from efficientnet_train.data import Loader
        class Cycle:
            pass
        held = Cycle()
        held.me = held  # freed only by the garbage collector, which exit does not wait for
        held.loader = Loader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
        print(sum(len(batch) for batch in held.loader), flush=True)
        del held
        sys.exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "8", "")


@pytest.mark.parametrize("at_once", [True, False])
def test_a_second_ctrl_c_stops_at_once_saying_so(at_once):
    """The way out of a stop that takes too long; not in a distributed job's training processes, which hear one
    Ctrl-C twice (from the terminal, and passed on by the launcher)."""
    program = textwrap.dedent(f"""
        import logging, signal, sys
        from efficientnet_train.stopping import StopRequest
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
        stop = StopRequest(at_once_on_second_interrupt={at_once}).install()
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        print("still stopping: stopped", bool(stop))
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr
    if at_once:
        assert result.returncode == 130 and "SIGINT received again: stopping at once, without saving" in result.stdout
        assert "still stopping" not in result.stdout
    else:
        assert result.returncode == 0 and "still stopping: stopped True" in result.stdout
        assert "SIGINT received while already stopping: nothing changes" in result.stdout


def test_a_second_ctrl_c_to_a_distributed_launcher_ends_its_training_processes_too():
    """The first is passed on (a training process stops at its next batch); the second kills them and ends."""
    program = textwrap.dedent("""
        import multiprocessing, signal, sys, time
        from efficientnet_train.distributed import _Stopper

        def training():  # a training process busy with its stop: deaf to more signals
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            time.sleep(600)

        child = multiprocessing.get_context("fork").Process(target=training)
        child.start()
        time.sleep(1)
        stopper = _Stopper()
        stopper.forward_to([child])
        print(child.pid, flush=True)
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.5)
        print("alive after one:", child.is_alive(), flush=True)
        signal.raise_signal(signal.SIGINT)
        print("not reached")
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and "not reached" not in result.stdout, result
    assert "alive after one: True" in result.stdout
    assert "SIGINT received again: stopping every training process at once" in result.stdout
    child, deadline = int(result.stdout.split()[0]), time.monotonic() + 10
    while time.monotonic() < deadline and not finished(child):
        time.sleep(0.1)
    assert finished(child)


def finished(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_each_long_loop_of_the_probe_stops_at_its_next_step_once_a_stop_is_asked_for():
    from efficientnet_train import linear_probe
    from efficientnet_train.stopping import Interrupted, StopRequest

    stop = StopRequest()
    stop.signal_name = "SIGTERM"
    model = torch.nn.Linear(4, 3)
    model.forward_features, model.forward_head = (lambda x: x), (lambda x, pre_logits: x)
    model.get_classifier = lambda: model
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))] * 3
    steps = (lambda: linear_probe.features_of(model, batches, lambda x: x, contextlib.nullcontext, stop),
             lambda: linear_probe.fit_head(torch.randn(6, 4), torch.tensor([0, 1, 2] * 2), 3,
                                           torch.nn.CrossEntropyLoss(), stop),
             lambda: linear_probe.probe_top1(model, batches, lambda x: x, contextlib.nullcontext, stop=stop))
    for step in steps:
        with pytest.raises(Interrupted):
            step()
    stop.signal_name = None
    assert linear_probe.probe_top1(model, batches, lambda x: x, contextlib.nullcontext, stop=stop) is not None


def test_each_epoch_leaves_a_checkpoint_and_old_ones_are_pruned(uninterrupted):
    base, _ = uninterrupted
    assert checkpoints(base / "checkpoints") == ["checkpoint-00003-0000000.pth.tar", "checkpoint-00004-0000000.pth.tar"]
    state = final_state(base)
    assert state["progress"]["epoch"] == 4 and state["best"]["epoch"] == int(state["best_model"]["epoch"])
    assert [row["epoch"] for row in state["summary"]] == [0, 1, 2, 3]  # 0: the linear probe
    assert {"optimizer", "scheduler", "rng", "ema"} <= set(state)
    assert not list((base / "checkpoints").glob(".*"))  # no temporary files left behind


def test_sigterm_mid_epoch_stops_cleanly_and_a_restart_finishes_the_same_run(uninterrupted, tmp_path):
    base = copy_job(uninterrupted, tmp_path)
    job = start_train(base)
    log = run_until(job, r"epoch 1/3 ")
    epoch_2_started = base / "checkpoints" / "checkpoint-00002-0000000.pth.tar"  # the last thing epoch 1 does
    while not epoch_2_started.exists():
        time.sleep(0.02)
    # Into epoch 2's 18 batches, whatever this machine's speed: a quarter of epoch 1's training time (which had the
    # warm-up too, so epoch 2 is no slower). A fixed 0.3 s overshot the whole epoch on an idle machine.
    epoch_1_seconds = 36 / float(re.search(r"epoch 1/3 .* images/s=([\d.]+)", log)[1])
    time.sleep(min(max(epoch_1_seconds / 4, 0.02), 0.3))
    started = time.monotonic()
    job.send_signal(signal.SIGTERM)
    log = "".join(job.stdout) + job.communicate(timeout=120)[0]
    assert job.returncode == 0, log
    assert time.monotonic() - started < 60  # a batch and a save; far less when the machine is not shared
    stopped = re.search(r"Stopped by SIGTERM in epoch 2 after (\d+) of 18 batches; saved (\S+),", log)
    assert stopped and 0 < int(stopped[1]) < 18, log[-2000:]
    assert (base / "checkpoints" / f"checkpoint-00002-{int(stopped[1]):07d}.pth.tar").exists()
    # model/ holds the best model so far, and says why it stopped; the checkpoint carries that same model
    best = torch.load(base / "model" / "model_best.pth.tar", weights_only=True)
    carried = torch.load(stopped[2], weights_only=True)["best_model"]
    assert best["epoch"] == carried["epoch"] in (0, 1)  # 0: the linear probe
    assert all(torch.equal(carried["state_dict"][key], value) for key, value in best["state_dict"].items())
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert args["stop_reason"] == "stopped by SIGTERM" and args["epochs_completed"] == 1

    resumed_log = resume_and_compare(base, uninterrupted[0])
    assert f"Resuming from checkpoint {stopped[2]}: epoch 2, after {stopped[1]} of its 18 batches; " \
           f"best so far top-1" in resumed_log
    assert "Linear probe" not in resumed_log


def test_a_job_killed_after_its_probe_resumes_without_fitting_it_again(uninterrupted, tmp_path):
    base = copy_job(uninterrupted, tmp_path)
    job = start_train(base)
    run_until(job, r"Linear probe \(epoch 0\)")
    probe_done = base / "checkpoints" / "checkpoint-00001-0000000.pth.tar"
    while not probe_done.exists():
        time.sleep(0.02)
    job.kill()
    job.wait(timeout=30)
    reference = yaml.safe_load((uninterrupted[0] / "model" / "args.yml").read_text())
    assert reference["linear_probe"]["recipe"]["freeze_batchnorm"] == 1.0
    state = torch.load(probe_done, weights_only=True)
    state["linear_probe"]["recipe"]["freeze_batchnorm"] = True  # as a version before BatchNorm's shares wrote it
    batchnorm_step = next(step for step in state["linear_probe"]["measured"] if step["part"] == "freeze_batchnorm")
    assert batchnorm_step["setting"] == 0.0
    batchnorm_step["setting"] = False
    torch.save(state, probe_done)
    log = resume_and_compare(base, uninterrupted[0])
    assert "Resuming from checkpoint" in log and "Linear probe" not in log and "epoch 0/3" not in log
    args = yaml.safe_load((base / "model" / "args.yml").read_text())
    assert {**args["linear_probe"], "seconds": 0} == {**reference["linear_probe"], "seconds": 0}  # carried over
    assert type(args["linear_probe"]["recipe"]["freeze_batchnorm"]) is float  # read as the share it means
    assert all(type(step["setting"]) is float for step in args["linear_probe"]["measured"]
               if step["part"] == "freeze_batchnorm")
    recipe = [key for key in reference if key.startswith("effective_")] + ["data_config"]
    assert {key: args[key] for key in recipe} == {key: reference[key] for key in recipe}  # chosen as by the probe


def test_sigkill_at_any_moment_loses_at_most_the_epoch_in_progress(uninterrupted, tmp_path):
    base = copy_job(uninterrupted, tmp_path)
    job = start_train(base)
    run_until(job, r"epoch 2/3 ")
    time.sleep(0.2)
    job.kill()
    job.wait(timeout=30)
    assert "Resuming from checkpoint" in resume_and_compare(base, uninterrupted[0])


def test_a_second_signal_while_stopping_changes_nothing(uninterrupted, tmp_path):
    base = copy_job(uninterrupted, tmp_path)
    job = start_train(base)
    run_until(job, r"epoch 1/3 ")
    job.send_signal(signal.SIGTERM)
    job.send_signal(signal.SIGINT)
    job.send_signal(signal.SIGTERM)
    log = job.communicate(timeout=60)[0]
    assert job.returncode == 0 and re.search(r"Stopped by SIG(TERM|INT)", log), log  # Python handles SIGINT first
    assert "received while already stopping" in log and "Traceback" not in log
    resume_and_compare(base, uninterrupted[0])


def test_an_unreadable_newest_checkpoint_is_reported_and_the_one_before_used(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    base = copy_job(uninterrupted, tmp_path)
    shutil.copytree(reference / "checkpoints", base / "checkpoints")
    newest = base / "checkpoints" / "checkpoint-00004-0000000.pth.tar"
    newest.write_bytes(newest.read_bytes()[:10_000])  # what a kill during an S3 sync might leave
    log = resume_and_compare(base, reference)
    assert f"Checkpoint {newest} is unreadable" in log
    assert "Resuming from checkpoint" in log and "checkpoint-00003-0000000.pth.tar: epoch 3" in log


def test_a_checkpoint_of_another_run_is_refused(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    base = copy_job(uninterrupted, tmp_path, lr="0.01", workers="1")  # workers may change, lr may not
    shutil.copytree(reference / "checkpoints", base / "checkpoints")
    result = run_train(base)
    assert result.returncode != 0
    reason = (base / "output" / "failure").read_text()
    assert "is from a different training run: lr='auto' there, 0.01 here" in reason
    assert "workers" not in reason and "checkpoint_s3_uri" in reason
    assert len(checkpoints(base / "checkpoints")) == 2  # nothing deleted


def test_a_checkpoint_with_other_classes_is_refused(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    base = copy_job(uninterrupted, tmp_path)
    shutil.rmtree(base / "input" / "data")
    make_channels(base / "input" / "data", classes=("ants", "bees"))
    shutil.copytree(reference / "checkpoints", base / "checkpoints")
    assert run_train(base).returncode != 0
    assert "classes ['ants', 'bees', 'wasps'] there, ['ants', 'bees'] here" in (base / "output" / "failure").read_text()


def test_a_checkpoint_with_another_val_channel_is_refused(uninterrupted, tmp_path):
    """The best model so far was chosen on the val images, and balance_classes=auto weighs the loss by their shares:
    a changed val channel is another run."""
    reference, _ = uninterrupted
    base = copy_job(uninterrupted, tmp_path)
    for extra in sorted((base / "input" / "data" / "val" / "bees").iterdir())[:2]:
        extra.unlink()
    shutil.copytree(reference / "checkpoints", base / "checkpoints")
    assert run_train(base).returncode != 0
    reason = (base / "output" / "failure").read_text()
    assert "18 validation images there, 16 here (by class: 'bees' 6 there, 4 here)" in reason, reason
    assert len(checkpoints(base / "checkpoints")) == 2  # nothing deleted


def test_resume_compares_the_val_images_only_where_the_checkpoint_kept_them():
    """Checkpoints from before the val images were kept resume as before; a long class name is cut in the reason,
    and a count that changed in many classes lists three; a label-free image of a multi-label val counts too."""
    from efficientnet_train.checkpoints import check_resumable
    from efficientnet_train.errors import JobError

    classes = ["a" * 100] + [f"c{index}" for index in range(5)]
    counts = dict.fromkeys(classes, 4)
    old = {"hyperparameters": {}, "classes": classes, "train_images": 10}
    check_resumable(Path("ckpt"), old, {}, classes, 10, 1, 20, {name: 1 for name in classes})  # nothing to compare
    state = {**old, "val_images": 24, "val_images_per_class": counts}
    check_resumable(Path("ckpt"), state, {}, classes, 10, 1, 24, dict(counts))
    with pytest.raises(JobError) as refused:
        check_resumable(Path("ckpt"), state, {}, classes, 10, 1, 18, {**counts, **dict.fromkeys(classes[:5], 3)})
    reason = str(refused.value)
    assert "24 validation images there, 18 here (by class: '" + "a" * 60 + "... (100 characters in all)' 4 there, " \
        "3 here, 'c0' 4 there, 3 here, 'c1' 4 there, 3 here, ...)" in reason, reason
    with pytest.raises(JobError, match=r"24 validation images there, 25 here\. "):
        check_resumable(Path("ckpt"), state, {}, classes, 10, 1, 25, dict(counts))


def test_checkpointconfig_local_path_is_where_checkpoints_go(tiny_hyperparameters, tmp_path):
    base = make_job(tmp_path / "job", tiny_hyperparameters)
    (base / "input" / "config" / "checkpointconfig.json").write_text(
        json.dumps({"LocalPath": str(tmp_path / "synced"), "S3Uri": "s3://bucket/checkpoints"}))
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert checkpoints(tmp_path / "synced") == ["checkpoint-00001-0000000.pth.tar", "checkpoint-00002-0000000.pth.tar"]
    assert not (base / "checkpoints").exists()


def test_a_finished_run_restarted_rewrites_its_model_without_training(uninterrupted, tmp_path):
    """A spot job restarted after its last checkpoint: model/ is empty on the new machine."""
    reference, _ = uninterrupted
    base = copy_job(uninterrupted, tmp_path)
    shutil.copytree(reference / "checkpoints", base / "checkpoints")
    log = resume_and_compare(base, reference)
    assert "epoch 1/3" not in log and "Done in" in log


# -- incremental training: the optional 'model' channel

def model_channel_job(uninterrupted, tmp_path, hyperparameters=None, classes=tuple(COLOURS)):
    reference, reference_hyperparameters = uninterrupted
    base = make_job(tmp_path / "job", {**reference_hyperparameters, "epochs": "1", **(hyperparameters or {})},
                    with_data=False)
    make_channels(base / "input" / "data", classes=classes)
    (base / "input" / "data" / "model").mkdir()
    shutil.copy(reference / "model" / "model.tar.gz", base / "input" / "data" / "model")
    return base


def test_model_channel_continues_training_a_previous_model(uninterrupted, tmp_path):
    base = model_channel_job(uninterrupted, tmp_path)
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Starting from the model in \S+model.tar.gz \(epoch \d, top-1 [\d.]+%\), same labels",
                     result.stdout)
    assert "Linear probe" not in result.stdout and "epoch 0/1" not in result.stdout  # its trained head is kept


def test_model_channel_with_new_labels_gets_a_new_head(uninterrupted, tmp_path):
    base = model_channel_job(uninterrupted, tmp_path, classes=("ants", "bees"))
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("WARNING The 'model' channel's model" in result.stdout and "was trained on other labels (3 there, 2 here; "
            "gone 1: wasps): it continues with a new classifier head" in result.stdout)
    assert "Linear probe (epoch 0)" in result.stdout


def test_model_channel_of_another_architecture_is_refused(uninterrupted, tmp_path):
    base = model_channel_job(uninterrupted, tmp_path, {"model": "efficientnet_b0"})
    assert run_train(base).returncode != 0
    reason = (base / "output" / "failure").read_text()
    assert "holds a 'test_efficientnet' model" in reason and "Set model=test_efficientnet" in reason
