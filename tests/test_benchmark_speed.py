"""benchmarks/benchmark_speed.py --quick end to end, measure_clipping.py and measure_first_passes.py, so the
benchmarks keep working as the product changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def write_jpegs(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def test_quick_benchmark_measures_every_part(tmp_path):
    for split, count in (("train", 8), ("val", 4)):
        for index, label in enumerate(("ants", "bees")):
            write_jpegs(tmp_path / "data" / split / label, count, seed=index + 10 * (split == "val"))
    # One thread: the numbers do not matter here, and OpenMP threads fighting other tests for the cores
    # can make a 2-core machine ten times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark_speed.py"), "--quick",
                             "--data", str(tmp_path / "data"), "--json", str(tmp_path / "speed.json"),
                             "--parts", "model,loader,job,scan,loop"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["model"]["images_per_s"] > 0 and speed["model"]["ops_per_step"] > 100
    assert speed["model"]["warmup_s"] > 0 and speed["model"]["cudnn_benchmark"] is False  # no GPU here
    clip = speed["model"]["clip"]  # the default clipping's cost: the same steps without it, fewer operations
    assert clip["mode"] == "agc" and clip["unclipped_images_per_s"] > 0
    assert clip["unclipped_ops_per_step"] < speed["model"]["ops_per_step"]
    assert [row["workers"] for row in speed["loader"]["rows"]] == [0, 1]
    assert all(row["images_per_s"] > 0 for row in speed["loader"]["rows"])
    assert speed["job"]["images_per_s"] > 0 and speed["job"]["vs_model"] > 0
    assert speed["job"]["peak_tree_rss_gib"] > 0.1  # torch alone takes more
    assert speed["job"]["first_step_source"] == "log line" and speed["job"]["first_step_s"] > 0
    phases = speed["job"]["first_step_phases_s"]
    assert "first step" in phases and sum(phases.values()) == pytest.approx(speed["job"]["first_step_s"], abs=0.35)
    assert speed["job"]["last_epoch_data_wait_s"] >= 0 and speed["job"]["last_epoch_training_s"] >= 0
    assert set(speed["job"]["last_epoch_cpu_cores"]) == {"main_thread", "main_process", "workers",
                                                         "main_thread_waiting_for_a_core"}
    assert speed["scan"][0]["found"] == 1000
    for source in ("device_batch", "pinned_batch", "loader", "loader_unpinned"):
        row = speed["loop"][source]
        assert row["images_per_s"] > 0 and row["data_wait_s"] >= 0 and 0 < row["main_thread_cpu"] <= 1.5
    assert speed["environment"]["cpu_count"] == os.cpu_count()
    for heading in ("(a) model step", "(b) loader", "(c) job", "scan_channel", "(d) the job's step"):
        assert heading in result.stdout
    # Runs pile up in /tmp: only the logs stay, not ~200 MB of weights, checkpoints and model.
    logs = Path(result.stdout.split("job logs: ")[1].split()[0])
    assert sorted(path.name for path in logs.iterdir()) == ["train.log"]
    shutil.rmtree(logs)


# Stands in for pytorch-image-models' train.py (not shipped here): the same two device defaults and no
# --device, so it only runs on a CPU if the benchmark's shim points it there; it logs timm's Train: lines.
FAKE_TIMM_TRAIN = '''
import argparse, json, os, sys, torch

def _parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--epochs", type=int)
    args, _ = parser.parse_known_args()
    return args, ""

def train_one_epoch(epoch, device=torch.device("cuda")):
    return device

def validate(device=torch.device("cuda")):
    return device

def main():
    args, _ = _parse_args()
    assert getattr(args, "device", "cuda") == "cpu" and train_one_epoch(0) == validate() == torch.device("cpu")
    print("ARGV " + json.dumps(sys.argv[1:]))
    print("SPLITS " + json.dumps(sorted(os.listdir(args.data))))
    for epoch in range(args.epochs):
        for step in range(2):
            print(f"Train: {epoch} [   {step}/2 ( {50 * step}%)]  Loss: 0.693 (0.693)  Time: 0.500s,   64.00/s  "
                  f"({0.5 - 0.1 * epoch:.3f}s,   {64 + 16 * epoch:.2f}/s)  LR: 1.000e-03  Data: 0.010 (0.020)")

if __name__ == "__main__":
    main()
'''


def test_timms_train_script_runs_on_the_jobs_images_with_the_jobs_settings(tmp_path):
    for split, count in (("train", 8), ("val", 4)):
        for index, label in enumerate(("ants", "bees")):
            write_jpegs(tmp_path / "data" / split / label, count, seed=index + 10 * (split == "val"))
    (tmp_path / "train.py").write_text(FAKE_TIMM_TRAIN)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark_speed.py"), "--quick", "--epochs", "2",
                             "--data", str(tmp_path / "data"), "--json", str(tmp_path / "speed.json"),
                             "--parts", "timm", "--timm-train", str(tmp_path / "train.py")],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    timm = json.loads((tmp_path / "speed.json").read_text())["timm"]
    assert timm["images_per_s"] == 80.0 and timm["data_wait_per_step_s"] == 0.02  # the last epoch's averages
    assert timm["first_step_s"] > 0 and timm["job_vs_timm"] is None  # no (c) in this run
    log = {key: json.loads(value) for key, value in (line.split(" ", 1) for line in
                                                   Path(timm["log"]).read_text().splitlines()
                                                   if line.startswith(("ARGV ", "SPLITS ")))}
    argv = log["ARGV"]
    assert Path(argv[0]).parts[-3:] == ("opt_ml", "input", "data") and log["SPLITS"] == ["train", "val"]
    flags = {flag: value for flag, value in zip(argv[1:], argv[2:] + [""]) if flag.startswith("-")}
    # The product's defaults as the job resolves them before a probe: sgd at 0.064 per 256 images scaled to --quick's
    # batch of 8, adaptive clipping, and the strongest augmentation auto may choose.
    assert flags["--model"] == "test_efficientnet" and flags["-b"] == "8" and flags["--lr"] == "0.002"
    assert flags["--clip-grad"] == "0.01" and flags["--clip-mode"] == "agc"
    assert flags["--opt"] == "sgd" and flags["--layer-decay"] == "0.85" and flags["--aa"] == "rand-m9-mstd0.5"
    assert flags["--scale"] == "0.25" and flags["--hflip"] == "0.5" and flags["--drop"] == "0.3"
    assert "--no-prefetcher" in argv and "--amp" not in argv  # float32 on a CPU, as the job
    assert "timm's train.py, same images and settings: last epoch 80.0 images/s" in result.stdout
    shutil.rmtree(Path(timm["log"]).parent)


def test_clipping_measurement_compares_the_jobs_clipping_with_timms():
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "measure_clipping.py"), "--model",
                          "test_efficientnet", "--batch-size", "2", "--img-size", "32", "--calls", "2"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    changed = int(run.stdout.split(" tensors, ")[1].split()[0])  # timm clipped some: the two had work to agree on
    difference = float(run.stdout.split("largest element: ")[1].split()[0])
    assert changed > 0 and difference < 1e-5 and "the job clips 0 of these" in run.stdout  # a CPU: timm's loop


def test_first_passes_measurement_times_each_probe_pass_first_and_again_with_cudnn_on_and_off(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "measure_first_passes.py"), "--quick",
                          "--json", str(tmp_path / "passes.json")], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "passes.json").read_text())
    assert [r["cudnn_benchmark"] for r in results] == ["on", "off"]
    for result in results:
        assert [row["pass"] for row in result["rows"]] == [
            "features of the probe's images (evaluation view)", "BatchNorm measurement (batch statistics)",
            "view measurements (evaluation size)", "validation (image and mirror)", "first training step"]
        assert all(row["first_s"] > 0 and row["again_s"] > 0 for row in result["rows"])
    assert run.stdout.count("| all |") == 2 and run.stdout.count("| first training step |") == 2  # a table each
    assert results[0]["train_size"] == 48 and results[0]["images"]["val"] == 6  # what was timed, kept with it
