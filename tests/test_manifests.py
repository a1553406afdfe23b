"""Ground Truth manifests: streamed in Pipe mode (RecordIO records through a FIFO, as SageMaker writes them), or a
manifest file in the channel, beside its images (File mode, local runs)."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
from pathlib import Path

import pytest

from conftest import COLOURS, TINY_MODEL, make_job, read_summary, run_train
from efficientnet_train.errors import JobError
from efficientnet_train.manifests import RECORDIO_MAGIC, records, spool

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20  # only its signature matters to the spool


def recordio(*payloads: bytes, split_at_magic: bool = True) -> bytes:
    """MXNet RecordIO as dmlc writes it: a record whose data holds the magic number is split there, with
    continuation flags 1 (first), 2 (middle), 3 (last); each part padded to 4 bytes."""
    magic = struct.pack("<I", RECORDIO_MAGIC)
    out = b""
    for payload in payloads:
        parts = payload.split(magic) if split_at_magic else [payload]
        for index, part in enumerate(parts):
            flag = 0 if len(parts) == 1 else 1 if index == 0 else 3 if index == len(parts) - 1 else 2
            out += magic + struct.pack("<I", (flag << 29) | len(part)) + part + b"\x00" * (-len(part) % 4)
    return out


def ground_truth(images: list[tuple[bytes, int, str]], metadata: bool = True) -> bytes:
    """The stream of a single-label image classification job's output manifest with AttributeNames
    ["source-ref", "animal"(, "animal-metadata")]: the image's bytes, its class index, its metadata."""
    payloads = []
    for data, index, name in images:
        payloads += [data, json.dumps(index).encode()]
        if metadata:
            payloads.append(json.dumps({"class-name": name, "confidence": 0.95,
                                        "type": "groundtruth/image-classification", "job-name": "labeling-job/animals",
                                        "human-annotated": "yes",
                                        "creation-date": "2026-11-30T10:00:00.000000"}).encode())
    return recordio(*payloads)


def test_records_are_read_whole_across_padding_and_continuations():
    magic = struct.pack("<I", RECORDIO_MAGIC)
    payloads = [b"a", b"", b"four", b"x" * 7 + magic + b"y" + magic + b"z", magic]
    assert list(records(io.BytesIO(recordio(*payloads)), "test")) == payloads


@pytest.mark.parametrize("stream, reason", [
    (b"\x00" * 8, "does not start with RecordIO's magic number"),
    (recordio(b"abcdef")[:-4], "ended in the middle of a record"),
])
def test_a_stream_that_is_not_recordio_says_so(stream, reason):
    with pytest.raises(JobError, match=reason):
        list(records(io.BytesIO(stream), "test"))


def test_a_single_label_stream_is_spooled_into_class_folders_named_by_its_metadata(tmp_path):
    counts = spool(io.BytesIO(ground_truth([(PNG, 1, "bees"), (PNG, 0, "ants"), (PNG, 1, "bees")])), "test", tmp_path)
    assert counts == {"ants": 1, "bees": 2}
    assert sorted(p.name for p in (tmp_path / "bees").iterdir()) == ["00000001.png", "00000003.png"]


def test_a_multi_label_stream_is_spooled_as_images_and_a_manifest_of_their_labels(tmp_path):
    metadata = {"class-map": {"0": "ants", "2": "wasps"}, "type": "groundtruth/image-classification-multilabel"}
    stream = recordio(PNG, b"[0, 2]", json.dumps(metadata).encode(), PNG, b"[]", PNG, b"[2]",
                      json.dumps({"class-map": {"2": "wasps"}}).encode())
    assert spool(io.BytesIO(stream), "test", tmp_path) == {"ants": 1, "wasps": 2}
    lines = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert lines == [{"source-ref": "images/00000001.png", "labels": ["ants", "wasps"]},
                     {"source-ref": "images/00000002.png", "labels": []},
                     {"source-ref": "images/00000003.png", "labels": ["wasps"]}]


def test_without_metadata_the_classes_are_named_by_their_indices(tmp_path, caplog):
    assert spool(io.BytesIO(ground_truth([(PNG, 1, ""), (PNG, 0, "")], metadata=False)), "test", tmp_path) == \
        {"0": 1, "1": 1}
    assert "Add the label attribute's '-metadata' to AttributeNames" in caplog.text


@pytest.mark.parametrize("stream, reason", [
    (recordio(PNG, b"[0, 2]", PNG, b"1"), "record 4 is a JSON int .* where the images before it had lists"),
    (recordio(PNG, b"1", PNG, b"[0, 2]"), "image 2's label \\(record 4\\) is a list of classes, the images before"),
    (recordio(PNG, PNG, b"0"), "has no label record after it"),
    (recordio(b"0", PNG), "where an image \\(the bytes of source-ref\\) was expected"),
    (recordio(PNG), "the last image \\(record 1\\) has no label record"),
    (recordio(PNG, b"\"cat\""), "not a class index"),
    (recordio(b"GIF88\x00\xff\xfe"), "neither an image this job reads"),
    (ground_truth([(PNG, 0, "../escape")]), "cannot be a class name"),
    (ground_truth([(PNG, 0, "ants"), (PNG, 0, "bees")]), "earlier records 'ants'"),
    (ground_truth([(PNG, 0, "ants"), (PNG, 1, "ants")]), "two class indices are both named"),
    (recordio(), "held no images"),
])
def test_a_stream_that_is_no_single_label_manifest_fails_with_the_record_and_the_fix(tmp_path, stream, reason):
    with pytest.raises(JobError, match=reason) as info:
        spool(io.BytesIO(stream), "the 'train' channel", tmp_path / "spool")
    assert "the 'train' channel" in str(info.value)


def stream_into_fifo(path: Path, data: bytes) -> threading.Thread:
    """SageMaker's side of Pipe mode: the channel's FIFO, written as soon as the job opens it."""
    os.mkfifo(path)

    def write() -> None:
        with open(path, "wb") as fifo:  # blocks until the job opens its end
            fifo.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def folders_job(tmp_path_factory, tiny_weights) -> Path:
    """A tiny job trained from class folders, which the same images given by a manifest must match."""
    folders = make_job(tmp_path_factory.mktemp("folders"), tiny_job(tiny_weights))
    assert run_train(folders).returncode == 0
    return folders


def tiny_job(tiny_weights) -> dict[str, str]:
    return {"epochs": "1", "batch_size": "8", "model": TINY_MODEL, "pretrained_path": str(tiny_weights["pth"]),
            "img_size": "32", "workers": "0"}


def test_a_ground_truth_manifest_streamed_in_pipe_mode_trains_as_the_same_images_in_folders(tmp_path, folders_job,
                                                                                             tiny_hyperparameters):
    folders = folders_job
    piped = make_job(tmp_path / "piped", tiny_hyperparameters, with_data=False)
    classes = sorted(COLOURS)
    config = {channel: {"TrainingInputMode": "Pipe", "RecordWrapperType": "RecordIO",
                        "ContentType": "application/x-recordio", "S3DistributionType": "FullyReplicated"}
              for channel in ("train", "val")}
    (piped / "input" / "config" / "inputdataconfig.json").write_text(json.dumps(config))
    (piped / "input" / "data").mkdir(parents=True)
    writers = []
    for channel in ("train", "val"):  # manifest order: each class's images in their folder's order
        images = [(path.read_bytes(), index, name) for index, name in enumerate(classes)
                  for path in sorted((folders / "input" / "data" / channel / name).iterdir())]
        writers.append(stream_into_fifo(piped / "input" / "data" / f"{channel}_0", ground_truth(images)))
    result = run_train(piped)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "images of 3 classes spooled to" in result.stdout
    assert json.loads((piped / "model" / "labels.json").read_text()) == \
        json.loads((folders / "model" / "labels.json").read_text())
    assert read_summary(piped / "model") == read_summary(folders / "model")  # bit for bit on the CPU
    for writer in writers:
        writer.join(timeout=10)


def test_a_spool_folder_holding_someone_elses_files_is_left_alone(tmp_path, tiny_hyperparameters):
    base = make_job(tmp_path, tiny_hyperparameters, with_data=False)
    config = base / "input" / "config" / "inputdataconfig.json"
    config.write_text(json.dumps({"train": {"TrainingInputMode": "Pipe"}}))
    theirs = base / "input" / "spool" / "train" / "notes.txt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("mine")
    result = run_train(base)
    assert result.returncode == 1 and "already holds files this job did not write" in result.stdout
    assert theirs.read_text() == "mine"



def test_a_full_volume_while_spooling_names_the_channel_and_the_fix(tmp_path, monkeypatch):
    from efficientnet_train import manifests
    from efficientnet_train.sagemaker import SageMakerEnvironment

    base = tmp_path / "opt_ml"
    (base / "input" / "config").mkdir(parents=True)
    config = {"train": {"TrainingInputMode": "Pipe"}}
    (base / "input" / "config" / "inputdataconfig.json").write_text(json.dumps(config))
    (base / "input" / "data").mkdir()
    (base / "input" / "data" / "train_0").write_bytes(ground_truth([(PNG, 0, "ants")]))  # a file stands in for the FIFO

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(JobError, match="The training volume filled up while the 'train' channel") as info:
        manifests.images_folder(SageMakerEnvironment(base), "train")
    assert "VolumeSizeInGB" in str(info.value)


# --- a manifest file in the channel (File mode) ---------------------------------------------------------------

def test_a_manifest_beside_the_images_trains_as_the_same_images_in_folders(tmp_path, folders_job,
                                                                            tiny_hyperparameters):
    """train: a Ground Truth output.manifest whose S3 keys end in the copied photos/ folder; val: one written by hand,
    with class names and relative paths. Lines in the folders' order: the same samples, the same run."""
    labelled = make_job(tmp_path / "labelled", tiny_hyperparameters, with_data=False)
    classes = sorted(COLOURS)
    for channel, manifest in (("train", "output.manifest"), ("val", "labels.jsonl")):
        root = labelled / "input" / "data" / channel
        (root / "photos").mkdir(parents=True)
        lines = []
        for index, name in enumerate(classes):
            for number, path in enumerate(sorted((folders_job / "input" / "data" / channel / name).iterdir())):
                copy = root / "photos" / f"{name[0]}{number:03d}{path.suffix}"
                copy.write_bytes(path.read_bytes())
                lines.append({"source-ref": f"s3://bucket/labelling/{copy.relative_to(root)}", "animal": index,
                              "animal-metadata": {"class-name": name, "type": "groundtruth/image-classification",
                                                  "confidence": 0.9}} if channel == "train" else
                             {"source-ref": str(copy.relative_to(root)), "label": name})
        (root / manifest).write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_train(labelled)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "'train' channel is labelled by its manifest output.manifest (label attribute 'animal')" in result.stdout
    assert (labelled / "model" / "labels.json").read_text() == (folders_job / "model" / "labels.json").read_text()
    assert read_summary(labelled / "model") == read_summary(folders_job / "model")


def write_channel(root: Path, lines: list, images: tuple[str, ...] = ("a.png", "b.png", "c.png")) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (8, 8), (len(name) * 40, 0, 0)).save(root / name)
    (root / "output.manifest").write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                                  for line in lines))
    return root


@pytest.mark.parametrize("lines, reason", [
    ([{"source-ref": "a.png", "label": "x"}, {"source-ref": "b.png"}], "line 2 has no label attribute"),
    ([{"source-ref": "a.png", "label": "x", "other": "y"}], "line 1 has the label attributes label, other"),
    ([{"source-ref": "a.png", "label": "x"}, {"source-ref": "b.png", "kind": "y"}],
     "line 2 labels by 'kind', earlier lines by 'label'"),
    (["{not json"], "line 1 is not a JSON object"),
    ([{"label": "x"}], "line 1 has no 'source-ref'"),
    ([{"source-ref": "a.png", "label": {"x": 1}}], "line 1: its label .* is neither a class index nor a class name"),
    ([{"source-ref": "a.png", "label": 1, "label-metadata": {"class-name": "x\nvalidation:acc_1=99"}}],
     "names class 1 .*, which cannot be a class name"),
    ([{"source-ref": "a.png", "label": 0, "label-metadata": {"class-name": "x"}},
      {"source-ref": "b.png", "label": 0, "label-metadata": {"class-name": "y"}}], "line 2 names class 0 'y', earlier"),
    ([{"source-ref": "../a.png", "label": "x"}, {"source-ref": "s3://b/k/missing.png", "label": "y"}],
     "None of the 2 images .* can be used"),
    ([], "names no images: it is empty"),
    (["{" + " " * (2 << 20) + "}"], "line 1: longer than 1 MB"),
    ([{"source-ref": "s3://b/" + "d/" * 100 + "a.png", "label": "x"}], "None of the 1 images"),  # 100 folders deep
])
def test_a_manifest_that_cannot_label_the_channel_says_which_line_and_why(tmp_path, lines, reason):
    from efficientnet_train.label_manifest import scan

    with pytest.raises(JobError, match=reason):
        scan("train", write_channel(tmp_path / "train", lines))


def test_a_manifest_resolves_s3_keys_to_the_copied_images_and_counts_the_ones_it_lacks(tmp_path):
    from efficientnet_train.label_manifest import scan

    root = write_channel(tmp_path / "train", [
        {"source-ref": "s3://bucket/jobs/x/a.png", "animal": 1, "animal-metadata": {"class-name": "bees"}},
        {"source-ref": "s3://bucket/jobs/x/b.png", "animal": 0, "animal-metadata": {"class-name": "ants"}},
        {"source-ref": "c.png", "animal": 1}, {"source-ref": "s3://bucket/gone.png", "animal": 0},
        {"source-ref": "s3://bucket", "animal": 0},
        {"source-ref": "notes.txt", "animal": 0}])
    (root / "notes.txt").write_text("not an image")
    channel = scan("train", root)
    assert channel.classes == ["ants", "bees"]
    assert channel.samples == [(str(root / "a.png"), 1), (str(root / "b.png"), 0), (str(root / "c.png"), 1)]
    assert [(s.path, s.reason) for s in channel.skipped] == [("s3://bucket/gone.png", "not found"),
                                                             ("s3://bucket", "not found"),
                                                             ("notes.txt", "not an image file")]
    with pytest.raises(JobError, match="labels that are not in 'train': cats"):
        scan("val", write_channel(tmp_path / "val", [{"source-ref": "a.png", "label": "cats"}]), classes=["ants"])
    (root / "more.jsonl").write_text("")
    with pytest.raises(JobError, match="holds 2 manifests"):
        scan("train", root)
