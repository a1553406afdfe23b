"""What a careless or hostile user, file or client can do, and what the job and the endpoint do about it."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from efficientnet_train import checkpoints
from efficientnet_train.checkpoints import REQUIRED_KEYS, load_latest_state
from efficientnet_train.errors import JobError
from efficientnet_train.model import read_model_channel


class Foreign:
    """A type a weights-only load refuses: what a checkpoint of another program or version may hold."""


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def two_checkpoints(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch in (3, 4):
        state = {key: None for key in REQUIRED_KEYS} | {"version": 1, "progress": {"epoch": epoch}}
        paths.append(folder / f"checkpoint-{epoch:05d}-0000000.pth.tar")
        torch.save(state, paths[-1])
    return paths[0], paths[1]


# ---- checkpoints: nothing good is ever deleted ----------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 94371840 bytes"),
                                   MemoryError(), OSError(5, "Input/output error")])
def test_memory_and_io_errors_fail_the_job_and_touch_no_checkpoint(tmp_path, monkeypatch, error):
    two_checkpoints(tmp_path)
    before = digests(tmp_path)

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoints.torch, "load", failing_load)
    with pytest.raises(JobError, match="could not be loaded .* nothing was changed"):
        load_latest_state(tmp_path)
    assert digests(tmp_path) == before


def test_a_checkpoint_holding_a_foreign_type_is_refused_not_deleted(tmp_path):
    older, newest = two_checkpoints(tmp_path)
    torch.save({"version": 1, "model": Foreign()}, newest)
    before = digests(tmp_path)
    with pytest.raises(JobError, match=f"{newest.name} could not be loaded .*UnpicklingError.*move it out"):
        load_latest_state(tmp_path)
    assert digests(tmp_path) == before


def test_a_checkpoint_of_another_shape_is_refused_not_deleted(tmp_path):
    _, newest = two_checkpoints(tmp_path)
    torch.save({"state_dict": {}}, newest)
    before = digests(tmp_path)
    with pytest.raises(JobError, match="not a training state of this algorithm"):
        load_latest_state(tmp_path)
    assert digests(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a zip"])
def test_a_damaged_checkpoint_is_set_aside_under_a_new_name_and_the_one_before_used(tmp_path, damage):
    older, newest = two_checkpoints(tmp_path)
    data = newest.read_bytes()
    damaged = {"truncated": data[:len(data) // 2], "empty": b"", "not a zip": b"<html>"}[damage]
    newest.write_bytes(damaged)
    path, state = load_latest_state(tmp_path)
    assert path == older and state["progress"]["epoch"] == 3
    kept = tmp_path / f"{newest.name}.unreadable"
    assert kept.read_bytes() == damaged and not newest.exists()
    # Set aside, it is neither loaded again nor rotated away by the next save.
    assert checkpoints.checkpoint_files(tmp_path) == [older]
    checkpoints.save_state(tmp_path, {"progress": {"epoch": 5, "step": 0}})
    checkpoints.save_state(tmp_path, {"progress": {"epoch": 6, "step": 0}})
    assert kept.read_bytes() == damaged


def test_a_second_damaged_copy_does_not_overwrite_the_first(tmp_path):
    older, newest = two_checkpoints(tmp_path)
    (tmp_path / f"{newest.name}.unreadable").write_bytes(b"first")
    newest.write_bytes(b"second")
    assert load_latest_state(tmp_path)[0] == older
    assert (tmp_path / f"{newest.name}.unreadable").read_bytes() == b"first"
    assert (tmp_path / f"{newest.name}.unreadable-1").read_bytes() == b"second"


# ---- the 'model' channel: a reason, never "Unexpected error" --------------------------------------------

def test_a_model_channel_file_that_is_a_folder_a_link_or_a_pickle_gets_a_reason(tmp_path):
    cases = {}
    folder = tmp_path / "folder"
    (folder / "model_best.pth.tar").mkdir(parents=True)
    (folder / "model_best.pth.tar" / "x.bin").write_bytes(b"x")
    cases["folder"] = (folder, "holds neither model_best.pth.tar nor a model.tar.gz")
    link = tmp_path / "link"
    link.mkdir()
    (link / "model_best.pth.tar").symlink_to("/etc/hostname")
    cases["link"] = (link, "cannot be read as a model of this algorithm")
    pickled = tmp_path / "pickle"
    pickled.mkdir()
    (pickled / "model_best.pth.tar").write_bytes(pickle.dumps({"arch": Foreign}))
    cases["pickle"] = (pickled, "cannot be read as a model of this algorithm")
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"weights": {}}, other / "model_best.pth.tar")
    cases["other"] = (other, "is not a model saved by this algorithm")
    tarred = tmp_path / "tarred"
    tarred.mkdir()
    with tarfile.open(tarred / "model.tar.gz", "w:gz") as tar:
        member = tarfile.TarInfo("model_best.pth.tar")
        member.type = tarfile.DIRTYPE
        tar.addfile(member)
    cases["tar with a folder"] = (tarred, "holds no model_best.pth.tar file")
    for name, (channel, reason) in cases.items():
        with pytest.raises(JobError, match=reason):
            read_model_channel(channel)


# ---- a stop during start-up -----------------------------------------------------------------------------

def test_a_stop_landing_in_python_called_back_from_native_code_still_stops_the_process():
    """Where the start-up handler raised, an exception inside a native callback is swallowed (ctypes) or becomes
    std::terminate (pybind11, as torch imports its extensions): the stop was lost, or the process aborted."""
    program = textwrap.dedent("""
        import ctypes, signal
        from efficientnet_train import commands
        signal.signal(signal.SIGTERM, commands._stop_during_start_up)
        ctypes.CFUNCTYPE(None)(lambda: signal.raise_signal(signal.SIGTERM))()
        print("still starting up")
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    assert result.stdout == "Stopped by SIGTERM during start-up, before training began: nothing to save.\n"
    assert "Exception ignored" not in result.stderr
