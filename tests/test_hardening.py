"""What a careless or hostile user, file or client can do, and what the job and the endpoint do about it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import write_files, write_images
from efficientnet_train import checkpoints, hyperparameters, outputs, untrusted
from efficientnet_train.checkpoints import REQUIRED_KEYS, load_latest_state
from efficientnet_train.channels import Skip, scan_channel
from efficientnet_train.decoding import UnreadableImage, check_image, decode_image
from efficientnet_train.errors import JobError
from efficientnet_train.metrics import metric_definitions
from efficientnet_train.model import archive_member, read_model_channel
from efficientnet_train.sagemaker import SageMakerEnvironment
from efficientnet_train.serve import HttpError, MicroBatcher
from efficientnet_train.untrusted import LABEL_RULE, shown, shown_lines
from measure_decode_cost import decode_cost as measured_decode_cost, saved, scan_bomb  # benchmarks/ (pythonpath)

REPO = Path(__file__).resolve().parents[1]


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


# ---- names and values from outside: one escaped, bounded line in the log, never a metric -----------------

@pytest.mark.parametrize("name", ["ants\nvalidation:acc_1=99.999999", "bees\u202eseeb", "wasps\x1b[31m", "zero\u200bwidth",
                                  "validation:acc_1", "Train:Loss", "line\u2028separator"])
def test_class_names_that_could_forge_a_log_line_or_a_metric_are_refused_naming_them_escaped(tmp_path, name):
    write_images(tmp_path / "train" / "ordinary", (200, 0, 0), 2, seed=0)
    write_images(tmp_path / "train" / name, (0, 0, 200), 2, seed=1)
    with pytest.raises(JobError) as refused:
        scan_channel("train", tmp_path / "train")
    message = str(refused.value)
    assert "cannot be labels" in message and LABEL_RULE in message and shown(name) in message
    assert not any(untrusted.is_unsafe(c) for c in message)
    assert not any(re.search(d["Regex"], message) for d in metric_definitions())


def test_class_names_in_any_script_with_spaces_punctuation_and_emoji_are_labels(tmp_path):
    names = ["abeilles à miel", "猫", "🐝 bees", "size=large", "a:b", "C++ (v2)"]
    for index, name in enumerate(names):
        write_images(tmp_path / "train" / name, (index * 40, 0, 0), 1, seed=index)
    assert scan_channel("train", tmp_path / "train").classes == sorted(names)


def test_shown_escapes_controls_bidi_and_bad_bytes_and_says_how_long_a_cut_value_was():
    assert shown("a\nb\tc\x1b\u202e\u2028") == "a\\nb\\tc\\x1b\\u202e\\u2028"
    assert shown(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert shown("validation:acc_1=99.9 train:loss=1.0") == "validation:acc_1\\x3d99.9 train:loss\\x3d1.0"
    assert shown("x" * 10_000, 50) == "x" * 50 + "... (10,000 characters in all)"
    assert shown_lines("- 'a\n\n  validation:acc_5=99.0'\n- b\u202ec") == "- 'a\n\n  validation:acc_5\\x3d99.0'\n- b\\u202ec"
    assert shown_lines("short\n" + "y" * 5000, 100) == "short\n" + "y" * 100 + "... (5,000 characters in all)"


def test_a_huge_hyperparameter_value_or_name_is_echoed_short_and_the_fix_survives():
    for raw in ({"aa": "rand-m9" + "x" * 500_000, "y" * 100_000: "1"}, {"epochs": "9" * 5000, "lr": "1" * 9000}):
        with pytest.raises(JobError) as refused:
            hyperparameters.parse(raw)
        message = str(refused.value)
        assert len(message) < 1000, len(message)  # SageMaker's failure reason keeps 1,024 characters
        assert "characters in all" in message and "allowed:" in message and "default" in message


def test_an_oversized_hyperparameters_file_is_refused_before_it_is_parsed(tmp_path):
    (tmp_path / "input" / "config").mkdir(parents=True)
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"aa": "x" * 2_000_000}))
    with pytest.raises(JobError, match="more than the 1,000,000"):
        SageMakerEnvironment(tmp_path).read_hyperparameters()


# ---- odd channel contents ----------------------------------------------------------------------------------

def test_a_named_pipe_called_like_an_image_is_skipped_not_waited_on(tmp_path):
    write_images(tmp_path / "train" / "ants", (200, 0, 0), 2, seed=0)
    write_images(tmp_path / "train" / "bees", (0, 0, 200), 2, seed=1)
    os.mkfifo(tmp_path / "train" / "ants" / "pipe.png")
    finished = {}
    scan = threading.Thread(target=lambda: finished.update(channel=scan_channel("train", tmp_path / "train")),
                            daemon=True)
    scan.start()
    scan.join(timeout=30)
    assert "channel" in finished, "the scan waited on the pipe"
    skipped = {s.path: s for s in finished["channel"].skipped}
    assert skipped["ants/pipe.png"].reason == Skip.UNREADABLE and "named pipe" in skipped["ants/pipe.png"].detail


def test_a_class_folder_linked_to_another_class_is_refused_naming_both(tmp_path):
    write_images(tmp_path / "train" / "ants", (200, 0, 0), 2, seed=0)
    write_images(tmp_path / "train" / "bees", (0, 0, 200), 2, seed=1)
    os.symlink(tmp_path / "train" / "ants", tmp_path / "train" / "wasps")
    with pytest.raises(JobError, match="class folders 'ants' and 'wasps' both lead to the folder .*two labels"):
        scan_channel("train", tmp_path / "train")


def test_a_class_folder_linked_to_a_system_folder_does_not_list_its_files_in_the_reason(tmp_path):
    write_images(tmp_path / "train" / "ants", (200, 0, 0), 2, seed=0)
    system = tmp_path / "etc"
    write_files(system, {"passwd": b"root:x:0:0", "shadow": b"secret", "hosts": b"127.0.0.1"})
    os.symlink(system, tmp_path / "train" / "bees")
    with pytest.raises(JobError) as refused:
        scan_channel("train", tmp_path / "train")
    reason = str(refused.value)
    assert "bees: 3 files skipped, none of them named as an image" in reason
    assert not any(name in reason for name in ("passwd", "shadow", "hosts"))


def test_half_written_files_of_a_killed_save_are_removed_at_start_and_nothing_else(tmp_path, monkeypatch):
    model, checkpoints_dir = tmp_path / "model", tmp_path / "checkpoints"
    leftovers = [model / ".model_best.pth.tar.tmp", model / ".args.yml.tmp", model / ".model.tar.gz.tmp",
                 checkpoints_dir / ".checkpoint-00003-0000012.pth.tar.tmp"]
    users = [model / ".notes.tmp", model / "model_best.pth.tar.tmp", checkpoints_dir / ".checkpoint-old.tmp",
             checkpoints_dir / "keep.txt"]
    for path in leftovers + users:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
    os.symlink("/dev/full", checkpoints_dir / ".checkpoint-00004-0000000.pth.tar.tmp")
    assert outputs.remove_leftover_temporaries(model, outputs.MODEL_OUTPUT_NAMES) == sorted(
        p.name for p in leftovers if p.parent == model)
    assert outputs.remove_leftover_temporaries(checkpoints_dir, checkpoints.CHECKPOINT_NAME) == [
        ".checkpoint-00003-0000012.pth.tar.tmp"]
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in users)
    assert (checkpoints_dir / ".checkpoint-00004-0000000.pth.tar.tmp").is_symlink()


# ---- serving: what a small upload may cost ---------------------------------------------------------------

def decode_cost(data: bytes, tmp_path: Path) -> tuple[int, float, str]:
    """What decoding `data` as the endpoint does costs a fresh process: MB of peak memory added, seconds, outcome."""
    path = tmp_path / "upload"
    path.write_bytes(data)
    return measured_decode_cost(path)


def claiming_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height: what the decoder sizes its buffers by."""
    frame = next(jpeg.find(marker) for marker in (b"\xff\xc2", b"\xff\xc0") if jpeg.find(marker) > 0)
    return jpeg[:frame + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[frame + 9:]


def test_a_small_upload_of_a_huge_16_bit_png_is_refused_without_decoding_it(tmp_path):
    """172 KB, 9400x9400 pixels: it took a worker from 577 MB to 5.3 GB."""
    megabytes, _, outcome = decode_cost(saved(Image.new("I;16", (9400, 9400)), "PNG"), tmp_path)
    assert outcome.startswith("refused") and "9400x9400 pixels" in outcome and "resized" in outcome
    assert megabytes < 50, megabytes


def test_a_16_bit_png_at_the_serving_limit_decodes_without_float64_copies(tmp_path):
    megabytes, _, outcome = decode_cost(saved(Image.new("I;16", (4096, 4096)), "PNG"), tmp_path)
    assert outcome == "decoded" and megabytes < 256, megabytes  # 416 MB with float64 copies


def test_a_transparent_png_at_the_serving_limit_decodes_in_the_memory_it_is_allowed(tmp_path):
    gradient = Image.linear_gradient("L").resize((4096, 4096))
    rgba = Image.merge("RGBA", (gradient, gradient, gradient, gradient.transpose(Image.Transpose.ROTATE_90)))
    megabytes, _, outcome = decode_cost(saved(rgba, "PNG"), tmp_path)  # 76 KB
    assert outcome == "decoded" and megabytes < 256, megabytes  # 415 MB with alpha_composite's copies


def test_a_progressive_jpeg_repeating_a_scan_is_refused_in_milliseconds_wherever_it_arrives(tmp_path):
    """2,000 repeats of one 120-byte scan took 13 s of a core to decode, 10,000 over a minute."""
    bomb = scan_bomb(4096, 300)  # 306 scans of 262,144 blocks: 80 million, about 6 s to decode
    _, seconds, outcome = decode_cost(bomb, tmp_path)
    assert outcome.startswith("refused") and "306 scans" in outcome and "baseline JPEG" in outcome
    assert seconds < 1, seconds
    (tmp_path / "ants").mkdir()
    (tmp_path / "ants" / "bomb.jpg").write_bytes(bomb)
    reason, detail = check_image(str(tmp_path / "ants" / "bomb.jpg"))  # training's header check, as predict's load
    assert reason == Skip.TOO_LARGE and "306 scans" in detail
    assert decode_image(saved(Image.new("RGB", (640, 480), (9, 99, 199)), "JPEG", progressive=True)).size == (640, 480)


@pytest.mark.parametrize("mode, side, reason", [("CMYK", 9400, "scans"), ("RGB", 7000, "MB of memory")])
def test_a_progressive_jpeg_sized_far_beyond_what_it_decodes_to_is_refused_from_its_header(tmp_path, mode, side,
                                                                                             reason):
    """A progressive JPEG keeps coefficients of its full size even when it decodes at 1/8: a 1.4 MB CMYK one of
    9400x9400 cost 0.9 GB. (Small files whose header claims the size: only the header is read.)"""
    jpeg = claiming_size(saved(Image.new(mode, (64, 64)), "JPEG", progressive=True, subsampling=0), side, side)
    megabytes, _, outcome = decode_cost(jpeg, tmp_path)
    assert outcome.startswith("refused") and reason in outcome and megabytes < 50, (megabytes, outcome)


def test_only_the_formats_training_reads_are_decoded():
    icns = io.BytesIO()
    Image.new("RGB", (64, 64)).save(icns, "ICNS")  # Pillow would decode a 1 KB ICNS to 1024x1024
    with pytest.raises(UnreadableImage, match="not an image in a format this model takes"):
        decode_image(icns.getvalue(), 320)


def test_a_hung_model_turns_ping_red_and_its_callers_get_503():
    release = threading.Event()

    class HungClassifier:
        def probabilities(self, images):
            release.wait(30)
            return torch.zeros(len(images), 2)

    batcher = MicroBatcher(HungClassifier(), max_batch_size=4)
    assert batcher.problem() is None
    with pytest.raises(HttpError) as waited:
        batcher.probabilities(torch.zeros(1, 3, 8, 8), timeout_s=0.3)
    assert waited.value.status.startswith("503")
    assert batcher.problem(stall_s=0.01).startswith("the model has been running one batch for")
    release.set()
    deadline = time.monotonic() + 30
    while batcher.problem(stall_s=0.01) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.problem(stall_s=0.01) is None


# ---- scripts: nothing a user wrote is deleted -------------------------------------------------------------

def fresh_run_dir(path: Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", 'source scripts/run_dir.sh && fresh_run_dir "$1"', "-", str(path)],
                          cwd=REPO, env={**os.environ, "HOME": str(home)}, capture_output=True, text=True)


def test_scripts_empty_only_folders_they_made(tmp_path):
    home = tmp_path / "home"
    users = tmp_path / "my photos"
    write_files(users, {"holiday.jpg": b"precious"})
    for path in (users, home, Path("/"), tmp_path / "link"):
        if path.name == "link":
            path.symlink_to(users)
        result = fresh_run_dir(path, home)
        assert result.returncode == 2 and "Refusing to empty" in result.stderr, (path, result)
    assert (users / "holiday.jpg").read_bytes() == b"precious"
    run = tmp_path / "run"
    assert fresh_run_dir(run, home).returncode == 0  # missing: made, and marked as the script's
    (run / "model").mkdir()
    assert fresh_run_dir(run, home).returncode == 0 and list(run.iterdir()) == [run / ".efficientnet-train-run"]
    earlier = tmp_path / "earlier" / "opt_ml"  # an /opt/ml tree from before the mark existed
    write_files(earlier / "input" / "config", {"hyperparameters.json": b"{}"})
    assert fresh_run_dir(earlier, home).returncode == 0


def test_no_script_puts_a_shell_variable_into_python_source_or_unescaped_json():
    for script in sorted([*(REPO / "scripts").glob("*.sh"), *(REPO / "benchmarks").glob("*.sh")]):
        text = script.read_text()
        for snippet in re.findall(r"""-c\s+"([^"]*)\"""", text):
            assert "$" not in snippet, (script.name, snippet)  # pass values as sys.argv instead
        assert not re.search(r'<<\s*JSON', text), script.name


# ---- command-line manners -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "serve"])
def test_help_prints_usage_and_starts_nothing(command, tmp_path):
    executable = Path(sys.executable).with_name(command)
    result = subprocess.run([str(executable), "--help"], env={**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {command} [-h | --version"), result
    assert "SAGEMAKER_BASE_DIR" in result.stdout and "exit status" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written
    wrong = subprocess.run([str(executable), "--epochs", "3"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unexpected arguments: --epochs 3" in wrong.stderr


@pytest.mark.parametrize("command", ["train", "serve", "predict", "export-onnx"])
def test_every_command_says_its_version(command):
    from efficientnet_train import __version__

    result = subprocess.run([str(Path(sys.executable).with_name(command)), "--version"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"{command} {__version__}", result


def test_train_lists_its_hyperparameters_and_the_models_the_image_has_weights_for(tmp_path):
    from efficientnet_train.hyperparameters import SCHEMA

    train = str(Path(sys.executable).with_name("train"))
    listing = subprocess.run([train, "--hyperparameters"], capture_output=True, text=True, timeout=60).stdout
    assert all(f"\n{hp.name} (default " in listing for hp in SCHEMA) and "The listing" in listing
    hub = tmp_path / "hub" / "models--timm--efficientnet_b3.ra2_in1k" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    (hub / "model.safetensors").write_bytes(b"x")
    (tmp_path / "hub" / "models--timm--efficientnet_b3.ra2_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--efficientnet_b3.ra2_in1k" / "refs" / "main").write_text("abc")
    result = subprocess.run([train, "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_HOME": str(tmp_path)})
    assert "models with ImageNet weights in this image" in result.stdout and "efficientnet_b3.ra2_in1k" in result.stdout


def test_a_user_error_prints_its_reason_alone_unless_debugging(tmp_path):
    train = Path(sys.executable).with_name("train")
    (tmp_path / "input" / "config").mkdir(parents=True)
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text('{"epochs": "zero"}')
    for debug, traceback in (("", False), ("1", True)):
        result = subprocess.run([str(train)], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path), "EFFICIENTNET_DEBUG": debug})
        console = result.stdout + result.stderr
        assert result.returncode == 1 and "Training failed: Bad hyperparameters" in console
        assert ("Traceback" in console) == traceback, console
        assert "hyperparameter 'epochs'" in (tmp_path / "output" / "failure").read_text()


def test_a_model_archive_is_read_by_name_within_bounds(tmp_path):
    def archive(path: Path, members: list[tuple[str, bytes]]) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return path

    good = archive(tmp_path / "good.tar.gz", [("model/labels.json", b'{"0": "a"}')])
    assert archive_member(good, "labels.json") == b'{"0": "a"}'
    with pytest.raises(JobError, match="a file of 10 bytes, more than any model of this algorithm has"):
        archive_member(good, "labels.json", max_bytes=5)
    padded = archive(tmp_path / "padded.tar.gz", [(f"junk{i}", b"") for i in range(1000)] + [("labels.json", b"{}")])
    with pytest.raises(JobError, match="holds no labels.json file"):  # not among the first 1,000 members
        archive_member(padded, "labels.json")
    # A gzip bomb: zeros before the file asked for, which reaching it would decompress (a 100 GB member: minutes)
    bomb = archive(tmp_path / "bomb.tar.gz", [("zeros", bytes(200_000)), ("labels.json", b"{}")])
    with pytest.raises(JobError, match="200,000 bytes of other files before its labels.json"):
        archive_member(bomb, "labels.json", max_bytes=100_000)


# ---- files buyers open: no formula runs, no file of theirs is destroyed ------------------------------------

HOSTILE_CELLS = ["=1+1", "@SUM(1+1)*cmd|' ", "+3", "-2+3.jpg", "\tx", "\rx"]


def test_no_csv_cell_we_write_runs_as_a_formula_in_a_spreadsheet(tmp_path):
    from efficientnet_train import predict, report

    rows = [(Path("=HYPERLINK(\"x\").jpg"), {"labels": HOSTILE_CELLS[:2], "probabilities": [0.75, 0.25]}),
            (Path("-2+3.jpg"), {"labels": ["ok", "=1+1"], "probabilities": [0.5, 0.5]})]
    buffer = io.StringIO()
    predict.write_csv(rows, buffer, 2)
    report.write_confusion_csv(tmp_path / "confusion.csv", HOSTILE_CELLS, [[1] * 6] * 6)
    for text in (buffer.getvalue(), (tmp_path / "confusion.csv").read_text()):
        cells = [cell for row in csv.reader(io.StringIO(text)) for cell in row]
        assert not [cell for cell in cells if cell.startswith(untrusted.FORMULA_STARTS)], cells
        assert "'=1+1" in cells and "'@SUM(1+1)*cmd|' " in cells
    assert list(csv.reader(io.StringIO(buffer.getvalue())))[1][:2] == ["'=HYPERLINK(\"x\").jpg", "'=1+1"]


def test_a_confusion_matrix_of_many_classes_lists_only_the_pairs_that_occur(tmp_path):
    from efficientnet_train import report

    classes = [f"c{i}" for i in range(1000)]
    confusion = [[0] * 1000 for _ in classes]
    for i in range(1000):
        confusion[i][i] = 1
    confusion[3][7] = 2
    report.write_confusion_csv(tmp_path / "confusion.csv", classes, confusion)
    rows = list(csv.reader(open(tmp_path / "confusion.csv", newline="")))
    assert rows[:2] == [["true", "predicted", "images"], ["c3", "c7", "2"]] and len(rows) == 1002
    assert (tmp_path / "confusion.csv").stat().st_size < 20_000  # the full matrix: 2 MB


def run_predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efficientnet_train.predict", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_predict_refuses_an_output_that_would_destroy_a_file_before_reading_any_image(tmp_path):
    photos = tmp_path / "photos"
    write_files(photos, {"keep.jpg": saved(Image.new("RGB", (32, 32), (10, 20, 30)), "JPEG")})
    notes, target = tmp_path / "notes.csv", tmp_path / "target.txt"
    notes.write_text("my own notes\n")
    target.write_text("linked\n")
    (tmp_path / "link.csv").symlink_to(target)
    before = digests(photos) | {p.name: p.read_text() for p in (notes, target)}
    for output, reason in ((photos / "keep.jpg", "is one of the images to classify"),
                           (tmp_path / "link.csv", "is a symbolic link"),
                           (notes, "exists and is not a predictions CSV this command wrote")):
        result = run_predict(str(photos), "--model-dir", str(tmp_path / "no-model"), "-o", str(output), cwd=tmp_path)
        assert result.returncode == 1 and reason in result.stderr, result.stderr
    assert digests(photos) | {p.name: p.read_text() for p in (notes, target)} == before
    assert (tmp_path / "link.csv").is_symlink()


def test_predictions_replace_the_previous_file_only_when_complete(tmp_path):
    from efficientnet_train import predict

    output = tmp_path / "predictions.csv"
    output.write_text(predict.HEADER_START + "\nold.jpg,a,1.0\n")

    def crash_midway(f):
        f.write(predict.HEADER_START + "\nnew.jpg,b,")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict.write_atomically(output, crash_midway)
    assert output.read_text() == predict.HEADER_START + "\nold.jpg,a,1.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no temporary file left
    predict.write_atomically(output, lambda f: f.write("image,label_1,probability_1\nnew.jpg,b,1.0\n"))
    assert output.read_text().endswith("new.jpg,b,1.0\n")
    predict.check_output(output, [tmp_path], [], overwrite=False)  # a CSV it wrote may be replaced


def test_at_a_thousand_classes_the_log_lists_a_few_dozen_entries_and_args_yml_every_one(tmp_path):
    """The log grew about 4 lines a class (3,101 lines of settings at 1,000 classes, 10 KB lines listing every
    class); each list the log shows now stops after a few dozen entries and says how many there are."""
    from efficientnet_train import report
    from efficientnet_train.channels import Channel

    classes = [f"class{i:04d}" for i in range(1000)]
    args = {"classes": classes, "train_images_per_class": {name: 2 for name in classes}, "lr": 0.016}
    text = yaml.safe_dump(report.capped(args), sort_keys=False)
    assert len(text.splitlines()) < 60 and "976 more in args.yml" in text and "lr: 0.016" in text
    confusion = [[2 if i == j else 0 for j in range(1000)] for i in range(1000)]
    confusion[7] = [1 if j in (7, 9) else 0 for j in range(1000)]
    table = report.per_class_table(classes, confusion, [0.9] * 1000)
    assert len(table.splitlines()) == 26 and table.splitlines()[1].startswith("class0007")  # the lowest F1 first
    channel = Channel("train", tmp_path, classes, [(str(tmp_path / f"{i}.jpg"), i % 1000) for i in range(2000)])
    assert max(len(line) for line in channel.inventory().splitlines()) < 600
    assert "(1,000 in all, each in args.yml)" in channel.inventory()


def test_precision_recall_and_f1_per_class_match_their_definitions():
    from efficientnet_train import report

    # rows: true class; a: 3 of 4 right, one taken for b; b: 2 of 2 right; c: never predicted; d: no images.
    confusion = [[3, 1, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    scores = report.class_scores(confusion)
    assert scores[0] == pytest.approx({"precision": 75.0, "recall": 75.0, "f1": 75.0})
    assert scores[1] == pytest.approx({"precision": 50.0, "recall": 100.0, "f1": 200 / 3})
    assert scores[2] == {"precision": None, "recall": 0.0, "f1": 0.0}
    assert scores[3] == {"precision": None, "recall": None, "f1": None}
    assert report.macro_f1(scores) == pytest.approx((75 + 200 / 3 + 0) / 3)
    table = report.per_class_table(["a", "b", "c", "d"], confusion, [0.9, 0.8, 0.7, 0.0]).splitlines()
    assert table[2].split()[3:6] == ["100.0%", "50.0%", "66.7%"] and table[3].split()[3:6] == ["0.0%", "-", "0.0%"]
