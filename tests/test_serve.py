"""`serve` as SageMaker runs it: a subprocess on a free port, with a model a tiny `train` job wrote, over HTTP.

Also `predict`, the serving settings, and the image decoding both share.
"""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import COLOURS, TINY_MODEL, make_job, run_train
from efficientnet_train import spec
from efficientnet_train.data import ModelInput, eval_transform
from efficientnet_train.decoding import UnreadableImage, decode_image, load_image
from efficientnet_train.errors import JobError
from efficientnet_train.model import load_trained_model, predict_log_probabilities
from efficientnet_train.sagemaker import ServingEnvironment

BIN = Path(sys.executable).parent
SERVE_COMMAND = shutil.which("serve", path=str(BIN)) or "serve"
PREDICT_COMMAND = shutil.which("predict", path=str(BIN)) or "predict"
CLASSES = sorted(COLOURS)
SIX_MB = 6 * 1024 * 1024


# --- fixtures: one tiny trained model, and servers on it ------------------------------------------------

@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_weights) -> Path:
    """A finished tiny job: <base>/model holds what SageMaker would extract from model.tar.gz."""
    base = make_job(tmp_path_factory.mktemp("opt_ml"), {
        "epochs": "1", "batch_size": "8", "model": TINY_MODEL, "pretrained_path": str(tiny_weights["pth"]),
        "img_size": "32", "workers": "0", "lr": "0.1", "opt": "sgd"})
    result = run_train(base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, log_dir: Path, **env: str):
        self.port = free_port()
        environ = {key: value for key, value in os.environ.items()
                   if not key.startswith(("SAGEMAKER_", "SERVE_"))}
        environ.update(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_BIND_TO_PORT=str(self.port), SERVE_THREADS="4", **env)
        self.log = log_dir / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([SERVE_COMMAND], env=environ, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # its own group, as a terminal starts it

    def wait_until_ready(self, timeout: float = 60) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if self.request("GET", "/ping", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"serve did not answer /ping within {timeout} s:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def invoke(self, body: bytes, content_type: str = "image/png", path: str = "/invocations", **headers):
        return self.request("POST", path, body, {"Content-Type": content_type, **headers})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="module")
def server(job, tmp_path_factory):
    running = Server(job, tmp_path_factory.mktemp("logs")).wait_until_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def batch_server(job, tmp_path_factory):
    running = Server(job, tmp_path_factory.mktemp("logs"), SAGEMAKER_BATCH="true", SERVE_TOP_K="1").wait_until_ready()
    yield running
    running.stop()


# --- images ---------------------------------------------------------------------------------------------

def encoded(colour: tuple[int, int, int], fmt: str = "PNG", size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: what a decompression bomb looks like to a decoder."""
    data = bytearray(encoded((0, 0, 0)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def val_image(job: Path, label: str, suffix: str) -> Path:
    return next(p for p in sorted((job / "input" / "data" / "val" / label).iterdir()) if p.suffix == suffix)


def validation_probabilities(job: Path, path: Path) -> list[float]:
    """What validation computes for this image: the package's own loader, transform and prediction."""
    model, checkpoint = load_trained_model(job / "model" / "model_best.pth.tar")
    image = eval_transform(checkpoint["data_config"])(load_image(str(path))).unsqueeze(0)
    image = ModelInput(checkpoint["data_config"], torch.device("cpu"))(image)
    with torch.no_grad():
        return predict_log_probabilities(model, image, checkpoint["eval_hflip"],
                                         checkpoint["temperature"]).exp()[0].tolist()


def predictions(response) -> list[dict]:
    status, headers, body = response
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    return json.loads(body)["predictions"]


# --- hosting --------------------------------------------------------------------------------------------

def test_ping_is_ok_and_fast_once_loaded(server):
    start = time.monotonic()
    status, headers, body = server.request("GET", "/ping")
    assert status == 200 and json.loads(body) == {"status": "ok"} and time.monotonic() - start < 2


@pytest.mark.parametrize("content_type, fmt", [("image/jpeg", "JPEG"), ("image/png", "PNG"),
                                               ("application/x-image", "JPEG"), ("image/webp", "WEBP"),
                                               ("image/png; charset=binary", "PNG")])
def test_one_image_in_each_content_type(server, content_type, fmt):
    [prediction] = predictions(server.invoke(encoded(COLOURS["bees"], fmt), content_type))
    assert sorted(prediction["labels"]) == CLASSES  # default k=5, clamped to the 3 classes
    assert prediction["probabilities"] == sorted(prediction["probabilities"], reverse=True)
    assert sum(prediction["probabilities"]) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("label, suffix", [("ants", ".jpg"), ("bees", ".png"), ("wasps", ".webp")])
def test_served_probabilities_are_validations(server, job, label, suffix):
    path = val_image(job, label, suffix)
    [prediction] = predictions(server.invoke(path.read_bytes(), "application/x-image"))
    expected = validation_probabilities(job, path)
    served = dict(zip(prediction["labels"], prediction["probabilities"]))
    assert served == pytest.approx(dict(zip(CLASSES, expected)), rel=1e-5, abs=1e-7)
    assert prediction["labels"][0] == CLASSES[max(range(len(expected)), key=expected.__getitem__)]


def test_json_with_several_base64_images_answers_each_in_order(server):
    images = [encoded(COLOURS[name]) for name in ("wasps", "ants", "bees")]
    body = json.dumps({"images": [base64.b64encode(image).decode() for image in images]}).encode()
    several = predictions(server.invoke(body, "application/json"))
    singles = [predictions(server.invoke(image))[0] for image in images]
    assert len(several) == 3
    for one, alone in zip(several, singles):
        assert one["labels"] == alone["labels"]
        assert one["probabilities"] == pytest.approx(alone["probabilities"], rel=1e-5)


def test_top_k_per_request_by_query_or_custom_attributes(server):
    image = encoded(COLOURS["ants"])
    assert len(predictions(server.invoke(image, path="/invocations?top_k=1"))[0]["labels"]) == 1
    custom = {"X-Amzn-SageMaker-Custom-Attributes": "trace=abc, top_k=2"}
    assert len(predictions(server.invoke(image, **custom))[0]["labels"]) == 2
    assert len(predictions(server.invoke(image, path="/invocations?top_k=50"))[0]["labels"]) == 3
    for bad in ("0", "-1", "two"):
        status, _, body = server.invoke(image, path=f"/invocations?top_k={bad}")
        assert status == 400 and "top_k" in json.loads(body)["error"]


def test_accept_chooses_json_or_json_lines(server):
    image = encoded(COLOURS["ants"])
    status, headers, body = server.invoke(image, Accept="application/jsonlines")
    assert status == 200 and headers["content-type"] == "application/jsonlines"
    assert len(body.decode().splitlines()) == 1 and set(json.loads(body)) == {"labels", "probabilities"}
    assert len(predictions(server.invoke(image, Accept="*/*"))) == 1
    assert len(predictions(server.invoke(image, Accept="text/html, application/json;q=0.9"))) == 1
    # q-values: q=0 refuses a type; the higher q wins, whatever the order
    for accept, answered in (("application/json;q=0, application/jsonlines", "application/jsonlines"),
                             ("application/jsonlines;q=0.5, application/json", "application/json"),
                             ("application/json;q=0.2, application/jsonlines;q=0.8", "application/jsonlines")):
        status, headers, _ = server.invoke(image, Accept=accept)
        assert status == 200 and headers["content-type"] == answered, accept
    assert server.invoke(image, Accept="application/json;q=0, application/jsonlines;q=0")[0] == 406


def test_a_normal_image_beside_the_costliest_accepted_one_is_answered_within_seconds(server):
    """Two 555 KB scan bombs in flight made a normal 8 KB JPEG wait 40 s while /ping stayed 200. The costliest
    image the endpoint still decodes (a progressive JPEG at the scan limit: about 2 s of a core) is sent with a
    normal one beside it; a bomb beyond the limit is refused at once."""
    from concurrent.futures import ThreadPoolExecutor

    from measure_decode_cost import scan_bomb

    at_the_limit = scan_bomb(4096, 108)  # 114 scans of 262,144 blocks: 29.9 million, under the 30 million
    normal = encoded(COLOURS["bees"], "JPEG", size=200)

    def timed(body: bytes) -> tuple[int, float]:
        started = time.monotonic()
        status = server.invoke(body, "image/jpeg")[0]
        return status, time.monotonic() - started

    with ThreadPoolExecutor(2) as pool:
        costly = pool.submit(timed, at_the_limit)
        normal_status, normal_seconds = pool.submit(timed, normal).result()
        costly_status, _ = costly.result()
    assert normal_status == 200 and normal_seconds < 10, normal_seconds
    assert costly_status == 200
    status, seconds = timed(scan_bomb(4096, 2000))
    assert status == 400 and seconds < 5, seconds


def truncated_jpeg() -> bytes:
    data = encoded((10, 200, 30), "JPEG", size=200)
    return data[: len(data) // 2]


BAD_REQUESTS = {
    "empty body": (b"", "image/jpeg", {}, 400, "empty"),
    "not an image": (b"hello, world", "image/jpeg", {}, 400, "not an image"),
    "truncated image": (truncated_jpeg(), "image/jpeg", {}, 400, "truncated"),
    "decompression bomb": (png_claiming(20000, 20000), "image/png", {}, 400, "too large"),
    "bomb under Pillow's error limit": (png_claiming(10000, 10000), "image/png", {}, 400, "too large"),
    "unsupported content type": (b"a,b\n1,2\n", "text/csv", {}, 415, "Content-Type text/csv"),
    "unsupported accept": (encoded((1, 2, 3)), "image/png", {"Accept": "text/csv"}, 406, "text/csv"),
    "malformed JSON": (b'{"images": [', "application/json", {}, 400, "not valid JSON"),
    "JSON without images": (b'{"instances": []}', "application/json", {}, 400, '"images"'),
    "JSON with bad base64": (b'{"images": ["not base64!"]}', "application/json", {}, 400, "base64"),
    "too many images": (json.dumps({"images": [base64.b64encode(encoded((1, 2, 3), "GIF", 1)).decode()] * 65}).encode(),
                        "application/json", {}, 413, "at most 64"),
    "JSON with a text": (json.dumps({"images": [base64.b64encode(b"text").decode()]}).encode(),
                         "application/json", {}, 400, "Image 0 cannot be read"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_a_json_4xx_and_the_server_stays_up(server, name):
    body, content_type, headers, expected_status, message = BAD_REQUESTS[name]
    status, response_headers, response = server.invoke(body, content_type, **headers)
    assert status == expected_status, response
    assert response_headers["content-type"] == "application/json"
    error = json.loads(response)["error"]
    assert message in error and "Traceback" not in error
    assert server.request("GET", "/ping")[0] == 200


def test_body_over_six_megabytes_is_refused_before_it_is_read(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "image/jpeg")
    connection.putheader("Content-Length", str(SIX_MB + 1))
    connection.endheaders()  # and no body: the answer must not wait for it
    response = connection.getresponse()
    assert response.status == 413 and "6 MB" in json.loads(response.read())["error"]
    connection.close()


def test_chunked_body_over_six_megabytes_is_refused(server):
    chunks = [b"\xff" * (1024 * 1024)] * 6 + [b"\xff" * 16]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", "/invocations", body=iter(chunks), headers={"Content-Type": "image/jpeg"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413
    connection.close()
    assert server.request("GET", "/ping")[0] == 200


def test_unknown_routes_and_methods(server):
    status, _, body = server.request("GET", "/predict")
    assert status == 404 and "/invocations" in json.loads(body)["error"]
    status, headers, _ = server.request("GET", "/invocations")
    assert status == 405 and headers["allow"] == "POST"


# --- batch transform ------------------------------------------------------------------------------------

def test_batch_transform_answers_json_lines_with_the_environments_top_k(batch_server):
    status, headers, body = batch_server.invoke(encoded(COLOURS["wasps"]))
    assert status == 200 and headers["content-type"] == "application/jsonlines"
    [line] = body.decode().splitlines()
    assert len(json.loads(line)["labels"]) == 1  # SERVE_TOP_K=1
    several = json.dumps({"images": [base64.b64encode(encoded(COLOURS[c])).decode() for c in CLASSES]}).encode()
    status, _, body = batch_server.invoke(several, "application/json")
    assert status == 200 and len(body.decode().splitlines()) == 3
    status, _, body = batch_server.invoke(encoded(COLOURS["wasps"]), path="/invocations?top_k=2",
                                          Accept="application/json")
    assert json.loads(body)["predictions"][0]["labels"].__len__() == 2


def test_execution_parameters(batch_server):
    status, _, body = batch_server.request("GET", "/execution-parameters")
    parameters = json.loads(body)
    assert status == 200 and parameters["BatchStrategy"] == "SINGLE_RECORD" and parameters["MaxPayloadInMB"] == 6
    assert 1 <= parameters["MaxConcurrentTransforms"] <= 4  # no more than its threads can take at once


# --- lifecycle ------------------------------------------------------------------------------------------

def test_sigterm_finishes_the_request_in_flight_then_exits(job, tmp_path):
    running = Server(job, tmp_path).wait_until_ready()
    try:
        image = encoded(COLOURS["bees"])
        connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=20)
        # A first request on the same connection makes sure the worker holds it, however slow the machine.
        connection.request("GET", "/ping")
        assert connection.getresponse().read()
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "image/png")
        connection.putheader("Content-Length", str(len(image)))
        connection.endheaders(image[:10])  # the request has started, its body is still coming
        time.sleep(0.5)
        running.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert running.process.poll() is None, "serve quit with a request in flight"
        connection.send(image[10:])
        response = connection.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["predictions"]) == 1
        connection.close()
        assert running.process.wait(timeout=20) == 0
    finally:
        running.stop()
    log = running.log.read_text()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_sent_to_the_whole_process_group_ends_serve_cleanly_at_any_moment(job, tmp_path, name):
    """Ctrl-C in a terminal reaches gunicorn's master and its workers: while Python starts, while the model loads,
    and while serving, serve ends with exit 0 and no traceback."""
    for delay in (0.3, 1.5, None):  # None: once it answers
        running = Server(job, tmp_path)
        try:
            if delay is None:
                running.wait_until_ready()
            else:
                time.sleep(delay)
            os.killpg(running.process.pid, getattr(signal, name))
            assert running.process.wait(timeout=30) == 0, running.log.read_text()
        finally:
            running.stop()
        log = running.log.read_text()
        assert "Traceback" not in log and "Error" not in log, (delay, log)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_sent_to_predicts_process_group_ends_it_without_a_traceback_or_a_half_written_csv(job, tmp_path,
                                                                                                  name):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(400):
        Image.new("RGB", (8, 8), (index % 256, 0, 0)).save(images / f"{index:03d}.png")
    output = tmp_path / "out" / "predictions.csv"
    output.parent.mkdir()
    process = subprocess.Popen([PREDICT_COMMAND, str(images), "--model-dir", str(job / "model"), "-o", str(output),
                                "--workers", "2", "--batch-size", "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(output.parent.iterdir()) and time.monotonic() < deadline:  # its temporary file: predicting
        time.sleep(0.05)
    os.killpg(process.pid, getattr(signal, name))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + getattr(signal, name), stderr
    assert f"Stopped by {name} before every image was classified: {output} was not written" in stderr
    assert "Traceback" not in stderr and list(output.parent.iterdir()) == []


def test_predict_to_a_pipe_its_reader_closes_ends_at_once_without_a_traceback(job, tmp_path):
    """`predict photos/ -o - | head`: a traceback, then a hang on the loader's workers, until this was handled."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(1000):  # rows of more bytes than a pipe holds: the writer meets the closed end
        Image.new("RGB", (8, 8), (index % 256, 0, 0)).save(images / f"{index:04d}.png")
    process = subprocess.Popen([PREDICT_COMMAND, str(images), "--model-dir", str(job / "model"), "-o", "-",
                                "--workers", "2", "--batch-size", "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout.readline().startswith("image,label_1,probability_1")
    process.stdout.close()  # as `head -1` does once it has its line
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGPIPE, stderr
    assert "Traceback" not in stderr and "Standard output was closed before every image was classified" in stderr


def test_serve_without_a_model_says_what_is_missing(tmp_path):
    result = subprocess.run([SERVE_COMMAND], env={**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"No trained model in {tmp_path / 'model'}" in result.stdout and "model_best.pth.tar" in result.stdout


# --- predict --------------------------------------------------------------------------------------------

def test_predict_writes_a_csv_that_matches_the_server(server, job, tmp_path):
    val = job / "input" / "data" / "val"
    (val / "ants" / "broken.jpg").write_bytes(b"not really a jpeg")
    try:
        result = subprocess.run([PREDICT_COMMAND, str(val), "--model-dir", str(job / "model"), "--top-k", "2",
                                 "--batch-size", "4", "--workers", "0", "--output", str(tmp_path / "new" / "out.csv")],
                                capture_output=True, text=True, timeout=60)
    finally:
        (val / "ants" / "broken.jpg").unlink()
    assert result.returncode == 0, result.stderr
    assert "Skipped" in result.stderr and "broken.jpg" in result.stderr and "18 predictions" in result.stderr
    with open(tmp_path / "new" / "out.csv", newline="") as f:  # the folder made for it
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and list(rows[0]) == ["image", "label_1", "probability_1", "label_2", "probability_2"]
    for row in rows[::5]:
        [served] = predictions(server.invoke(Path(row["image"]).read_bytes(), "application/x-image",
                                             path="/invocations?top_k=2"))
        assert [row["label_1"], row["label_2"]] == served["labels"]
        assert [float(row["probability_1"]), float(row["probability_2"])] == pytest.approx(
            served["probabilities"], rel=1e-5, abs=1e-7)


def test_predict_reads_a_model_tar_gz_and_writes_to_standard_output(job, tmp_path):
    archive = job / "model" / "model.tar.gz"  # packed as SageMaker would: the job ran outside it
    image = val_image(job, "ants", ".png")
    result = subprocess.run([PREDICT_COMMAND, str(image), "--model-dir", str(archive), "-o", "-", "--workers", "0"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:3] == ["image", "label_1", "probability_1"] and rows[1][0] == str(image)
    assert list(tmp_path.iterdir()) == []  # nothing written beside it, the archive's files gone with their scratch
    help_text = " ".join(subprocess.run([PREDICT_COMMAND, "--help"], capture_output=True, text=True,
                                        timeout=60).stdout.split())  # argparse wraps at the terminal's width
    assert "predictions.csv in the current folder" in help_text and "model.tar.gz of a `train` job" in help_text
    assert "images classified at once" in help_text and "--version" in help_text


def test_predict_into_a_folder_says_so_before_reading_any_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"never read")
    result = subprocess.run([PREDICT_COMMAND, str(tmp_path / "a.jpg"), "--model-dir", str(tmp_path / "no-model"),
                             "--output", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"--output {tmp_path} is a folder; give a file name, such as {tmp_path / 'predictions.csv'}." in result.stderr


# --- the pieces -----------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused all the same
def test_decode_image_refuses_bombs_truncation_and_non_images():
    assert decode_image(encoded((1, 2, 3), "JPEG")).mode == "RGB"
    for data, message in ((png_claiming(20000, 20000), "too large"), (png_claiming(10000, 10000), "too large"),
                          (truncated_jpeg(), "truncated"), (b"", "not an image")):
        with pytest.raises(UnreadableImage, match=message):
            decode_image(data)


def test_load_image_names_the_file_it_cannot_read(tmp_path):
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    with pytest.raises(UnreadableImage, match=r"cut\.jpg: the image is truncated"):
        load_image(str(tmp_path / "cut.jpg"))


def test_serving_environment_defaults_and_sagemaker_variables(tmp_path):
    defaults = ServingEnvironment.from_environ({})
    assert (defaults.port, defaults.batch, defaults.payload_limit_mb, defaults.top_k, defaults.workers) == \
        (8080, False, 6, 5, 1)
    assert defaults.model_dir == Path("/opt/ml/model")
    settings = ServingEnvironment.from_environ({
        "SAGEMAKER_BASE_DIR": str(tmp_path), "SAGEMAKER_BIND_TO_PORT": "9000", "SAGEMAKER_BATCH": "True",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20", "SERVE_TOP_K": "2", "SAGEMAKER_MODEL_SERVER_WORKERS": "3"})
    assert (settings.model_dir, settings.port, settings.batch, settings.payload_limit_mb, settings.top_k,
            settings.workers) == (tmp_path / "model", 9000, True, 20, 2, 3)
    with pytest.raises(JobError, match="SERVE_TOP_K='none'"):
        ServingEnvironment.from_environ({"SERVE_TOP_K": "none"})


def test_spec_declares_inference():
    inference = spec.algorithm_spec()["InferenceSpecification"]
    assert {"image/jpeg", "image/png", "application/x-image", "application/json"} <= \
        set(inference["SupportedContentTypes"])
    assert inference["SupportedResponseMIMETypes"] == ["application/json", "application/jsonlines",
                                                      "application/json;verbose"]
    assert inference["Containers"] == [{"Image": spec.INFERENCE_IMAGE_PLACEHOLDER}]
    assert inference["SupportedRealtimeInferenceInstanceTypes"] and inference["SupportedTransformInstanceTypes"]


def test_image_declares_the_serving_port():
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in dockerfile
    assert "\nEXPOSE 8080\n" in dockerfile


# --- hostile and careless clients -------------------------------------------------------------------------

def ping_seconds(server: Server, times: int = 5) -> list[float]:
    """How long /ping takes, over several instants."""
    seconds = []
    for _ in range(times):
        started = time.monotonic()
        status, _, _ = server.request("GET", "/ping", timeout=10)
        assert status == 200
        seconds.append(time.monotonic() - started)
        time.sleep(0.1)
    return seconds


def raw_connection(server: Server, first_bytes: bytes = b"") -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    if first_bytes:
        connection.sendall(first_bytes)
    return connection


def raw_answer(connection: socket.socket) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of the answer on a raw connection (waits until the server closes it)."""
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.fixture
def fresh_server(job, tmp_path):
    running = Server(job, tmp_path).wait_until_ready()
    yield running
    running.stop()


def test_ping_answers_within_two_seconds_while_slow_and_idle_clients_hold_connections(fresh_server):
    """16 clients that sent their headers and 2 of 5,000 body bytes kept /ping timing out for 157 s; 100 idle
    connections took it down for ~25 s."""
    slow = [raw_connection(fresh_server, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                         b"Content-Length: 5000\r\n\r\n\x89P") for _ in range(16)]
    idle = [raw_connection(fresh_server) for _ in range(100)]
    try:
        seconds = ping_seconds(fresh_server, times=8)
        assert max(seconds) < 2, seconds
        # Those beyond what the server reads at once were told to come back, at once.
        busy = 0
        for connection in slow:
            connection.settimeout(0.5)
            try:
                status, headers, body = raw_answer(connection)
            except TimeoutError:
                continue  # being read, until its body deadline
            assert status == 503 and "busy" in body["error"], body
            busy += 1
        assert busy >= 16 - 2  # the test server runs 4 threads, 2 of them kept for /ping
    finally:
        for connection in slow + idle:
            connection.close()
    assert max(ping_seconds(fresh_server)) < 2


def test_a_client_that_stalls_in_its_headers_gets_a_json_408_and_frees_its_thread(fresh_server):
    stalled = [raw_connection(fresh_server, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Le") for _ in range(2)]
    try:
        assert max(ping_seconds(fresh_server, times=3)) < 2
        for connection in stalled:
            started = time.monotonic()
            status, headers, body = raw_answer(connection)
            assert status == 408 and headers["content-type"] == "application/json", body
            assert "did not arrive within" in body["error"] and time.monotonic() - started < 30
    finally:
        for connection in stalled:
            connection.close()
    assert "Traceback" not in fresh_server.log.read_text()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
])
def test_the_servers_own_errors_are_json_too(server, request_bytes, status):
    connection = raw_connection(server, request_bytes)
    try:
        answer_status, headers, body = raw_answer(connection)
    finally:
        connection.close()
    assert answer_status == status and headers["content-type"] == "application/json" and body["error"]


@pytest.mark.parametrize("query, attribute", [("%C2%B2", None), ("%D9%A3", None), ("-1", None), ("1.5", None),
                                               (None, "9" * 5000), (None, "\u00b2")])
def test_a_top_k_that_is_no_plain_number_is_a_400_not_a_500(server, query, attribute):
    """A 5,000-digit top_k does not fit in a URL (414): InvokeEndpoint's CustomAttributes header carries it."""
    headers = {} if attribute is None else {"X-Amzn-SageMaker-Custom-Attributes": f"top_k={attribute}"}
    path = "/invocations" if query is None else f"/invocations?top_k={query}"
    status, _, body = server.invoke(encoded(COLOURS["ants"]), path=path, **headers)
    assert status == 400 and "top_k must be a whole number" in json.loads(body)["error"]
    assert len(json.loads(body)["error"]) < 200


def test_a_huge_16_bit_png_is_refused_and_the_worker_stays_small(server):
    image = io.BytesIO()
    Image.new("I;16", (9400, 9400)).save(image, "PNG")
    assert len(image.getvalue()) < 200_000
    status, _, body = server.invoke(image.getvalue())
    assert status == 400 and "more than the 16,777,216 accepted here" in json.loads(body)["error"]
    workers = [int(pid) for pid in Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
               .read_text().split()]
    for pid in workers:
        resident_kb = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                               if line.startswith("VmHWM:")))  # the worker's peak, ever
        assert resident_kb < 1_500_000, resident_kb


# --- answers JumpStart's clients parse ----------------------------------------------------------------------

def test_verbose_json_answers_every_label_and_the_predicted_one_as_jumpstart_does(server):
    image = encoded(COLOURS["bees"])
    status, headers, body = server.invoke(image, "application/x-image", Accept="application/json;verbose")
    assert status == 200 and headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert set(answer) == {"labels", "probabilities", "predicted_label"}  # the object itself, not wrapped
    assert answer["labels"] == CLASSES  # every label, in the model's order
    assert abs(sum(answer["probabilities"]) - 1) < 1e-5
    assert answer["predicted_label"] == CLASSES[answer["probabilities"].index(max(answer["probabilities"]))]
    for accept in ("application/json;verbose=true", "application/json; verbose=1", 'application/json;Verbose="True"'):
        assert json.loads(server.invoke(image, "application/x-image", Accept=accept)[2]) == answer, accept
    [plain] = predictions(server.invoke(image, "application/x-image", Accept="application/json"))
    assert plain["labels"][0] == answer["predicted_label"]  # application/json is as it was
    assert predictions(server.invoke(image, "application/x-image", Accept="application/json;verbose=false")) == [plain]
    assert abs(plain["probabilities"][0] - max(answer["probabilities"])) < 1e-6


def test_verbose_json_of_several_images_and_verbose_json_lines(server):
    images = [base64.b64encode(encoded(COLOURS[name])).decode() for name in ("ants", "wasps")]
    status, _, body = server.invoke(json.dumps({"images": images}).encode(), "application/json",
                                    Accept="application/json; verbose")
    answers = json.loads(body)["predictions"]
    assert status == 200 and len(answers) == 2 and all(a["labels"] == CLASSES for a in answers)
    status, headers, body = server.invoke(encoded(COLOURS["ants"]), "image/png", Accept="application/jsonlines;verbose")
    [line] = body.decode().splitlines()
    assert status == 200 and headers["content-type"] == "application/jsonlines"
    assert json.loads(line)["labels"] == CLASSES and "predicted_label" in json.loads(line)


def test_a_connection_that_never_sends_anything_is_closed_by_the_server(server):
    """gunicorn stops accepting at 1,000 open connections: silent ones must not hold them for long."""
    silent = raw_connection(server)
    started = time.monotonic()
    try:
        assert silent.recv(1) == b""  # closed by the server (recv would raise TimeoutError after 60 s)
    finally:
        silent.close()
    assert time.monotonic() - started < 45
    assert server.request("GET", "/ping")[0] == 200


def test_a_refused_request_leaves_one_escaped_line_in_the_log(fresh_server):
    server = fresh_server  # the shared one may have used up its lines for the minute on the other bad requests
    assert server.invoke(b"not an image", "text/plain")[0] == 415
    assert server.invoke(b"{}", "application/json", path="/x%0Avalidation:acc_1=99")[0] == 404
    wanted = ("Refused POST /invocations: 415 Unsupported Media Type, body 12 bytes: Content-Type text/plain",
              "Refused POST /x\\nvalidation:acc_1\\x3d99: 404 Not Found, body 2 bytes")
    deadline = time.monotonic() + 10
    while not all(text in server.log.read_text() for text in wanted) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(text in server.log.read_text() for text in wanted), server.log.read_text()[-3000:]


def test_refused_requests_are_logged_at_most_so_many_a_window(caplog):
    from efficientnet_train.serve import RejectionLog

    now = [0.0]
    rejections = RejectionLog(lines=3, window_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="efficientnet_train.serve"):
        for second in range(100):  # a flood: 100 bad requests in 100 s
            now[0] = float(second)
            rejections("400 Bad Request", "POST", "/invocations", "5", "bad\nline")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3 + 1 + 3 and all("\n" not in line for line in lines)
    assert lines[0] == "Refused POST /invocations: 400 Bad Request, body 5 bytes: bad\\nline"
    assert lines[3] == "57 more requests were refused in the last 60 s without a line each"
