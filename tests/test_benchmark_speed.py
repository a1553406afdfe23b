"""scripts/benchmark_speed.py --quick end to end, so the benchmark keeps working as the product changes."""

from __future__ import annotations

import json
import os
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
            write_jpegs(tmp_path / "data" / split / label, count, seed=index)
    # One thread: the numbers do not matter here, and OpenMP threads fighting other tests for the cores
    # can make a 2-core machine ten times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_speed.py"), "--quick",
                             "--data", str(tmp_path / "data"), "--json", str(tmp_path / "speed.json"),
                             "--parts", "model,loader,job,scan,loop"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["model"]["images_per_s"] > 0 and speed["model"]["ops_per_step"] > 100
    assert speed["model"]["warmup_s"] > 0 and speed["model"]["cudnn_benchmark"] is False  # no GPU here
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
