"""`serve`: the trained model as a SageMaker endpoint, for real-time hosting and batch transform.

gunicorn (the production WSGI server of SageMaker's bring-your-own-container examples) runs this
module's WSGI app in threaded workers. Each worker process loads the model once; one thread of
it, the `MicroBatcher`, owns the model and runs every request that is waiting as one batch,
while the request threads decode images, answer /ping and write responses. There is no timer
that holds a request back to fill a batch: requests that arrive while a batch runs simply make
up the next one, so a lone request goes straight through and a busy GPU gets full batches.

On SIGTERM gunicorn stops accepting connections and lets requests in flight finish for up to
`GRACEFUL_TIMEOUT_S`, inside the 30 s SageMaker waits before SIGKILL.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import parse_qs

import torch

from .decoding import ENDPOINT, UnreadableImage, decode_image
from .errors import JobError
from .http_server import BODY_TIMEOUT_S, DeadlineSocket, RequestTimeout, json_body, thread_worker_class
from .inference import Classifier, check_model_dir
from .sagemaker import ServingEnvironment
from .untrusted import shown

log = logging.getLogger("efficientnet_train.serve")

GRACEFUL_TIMEOUT_S = 25  # SageMaker sends SIGKILL 30 s after SIGTERM
JSON, JSON_LINES = "application/json", "application/jsonlines"
RESPONSE_TYPES = (JSON, JSON_LINES)
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image", "image/*")
CUSTOM_ATTRIBUTES = "HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES"  # InvokeEndpoint's CustomAttributes
# 6 MB of tiny GIFs would be tens of thousands of images, each a full-size tensor once preprocessed.
MAX_IMAGES_PER_REQUEST = 64
# What one image may cost to decode is decoding.ENDPOINT's; a worker process decodes at most as many images at
# once as it has cores.
# Threads of each worker kept for /ping and quick answers: beyond threads - this many, /invocations are
# answered 503 at once rather than queued behind the others.
RESERVED_THREADS = 2
BODY_READ = "efficientnet_train.body_read"  # in a request's environ once its body was read to the end
# A batch running longer than this means a hung model: /ping turns 503 so that SageMaker replaces the instance,
# and the requests waiting for it get 503.
MODEL_STALL_S = 120.0
# Rejected requests are logged one line each, at most this many a window; a flood's rest is counted, not logged.
REJECTION_LINES, REJECTION_WINDOW_S = 20, 60.0


class HttpError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class MicroBatcher:
    """Runs the model on one thread, over every request waiting for it at once."""

    def __init__(self, classifier: Classifier, max_batch_size: int):
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self._waiting: queue.SimpleQueue[tuple[torch.Tensor, Future]] = queue.SimpleQueue()
        self.batch_started: float | None = None  # monotonic time the running batch began, None when idle
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def problem(self, stall_s: float = MODEL_STALL_S) -> str | None:
        """Why the model cannot answer, or None."""
        if not self._thread.is_alive():
            return "the model's thread has stopped"
        started = self.batch_started
        if started is not None and time.monotonic() - started > stall_s:
            return f"the model has been running one batch for {time.monotonic() - started:.0f} s (hung?)"
        return None

    def probabilities(self, images: torch.Tensor, timeout_s: float = MODEL_STALL_S) -> torch.Tensor:
        done: Future = Future()
        self._waiting.put((images, done))
        try:
            return done.result(timeout=timeout_s)
        except FutureTimeout:
            raise HttpError("503 Service Unavailable", f"The model did not answer within {timeout_s:.0f} s; "
                                                       f"try again.") from None

    def _run(self) -> None:
        while True:
            requests = [self._waiting.get()]
            self.batch_started = time.monotonic()
            count = len(requests[0][0])
            while count < self.max_batch_size:
                try:
                    requests.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
                count += len(requests[-1][0])
            try:
                batch = torch.cat([images for images, _ in requests])
                results = torch.cat([self.classifier.probabilities(chunk)
                                     for chunk in batch.split(self.max_batch_size)])
            except Exception as exc:  # noqa: BLE001 - the requests answer 500; the thread must live on
                for _, done in requests:
                    done.set_exception(exc)
                continue
            finally:
                self.batch_started = None
            for (_, done), result in zip(requests, results.split([len(images) for images, _ in requests])):
                done.set_result(result)


class RejectionLog:
    """One escaped line per refused request (status, method and path, body size, the reason it was given), at most
    REJECTION_LINES a window: a client sending bad requests in a loop cannot fill the endpoint's disk or CloudWatch
    bill. The first line of the next window says how many were left out."""

    def __init__(self, lines: int = REJECTION_LINES, window_s: float = REJECTION_WINDOW_S, clock=time.monotonic):
        self.lines, self.window_s, self.clock = lines, window_s, clock
        self.lock = threading.Lock()
        self.window_start, self.logged, self.left_out = -float("inf"), 0, 0

    def __call__(self, status: str, method: str, path: str, size: str, reason: str) -> None:
        with self.lock:
            now = self.clock()
            if now - self.window_start >= self.window_s:
                left_out, self.left_out = self.left_out, 0
                self.window_start, self.logged = now, 0
                if left_out:
                    log.warning("%d more requests were refused in the last %.0f s without a line each",
                                left_out, self.window_s)
            if self.logged >= self.lines:
                self.left_out += 1
                return
            self.logged += 1
        log.warning("Refused %s %s: %s, body %s bytes: %s", shown(method, 20), shown(path, 100), status,
                    shown(size, 20), shown(reason, 300))


class InferenceApp:
    """The WSGI app: SageMaker's three routes, content negotiation and errors as JSON."""

    def __init__(self, settings: ServingEnvironment, classifier: Classifier):
        self.settings = settings
        self.classifier = classifier
        self.batcher = MicroBatcher(classifier, settings.max_batch_size)
        self.payload_limit = settings.payload_limit_mb * 1024 * 1024
        # Never blocks: a request beyond capacity is answered 503 at once, so threads stay free for /ping.
        self.admitted = threading.BoundedSemaphore(max(1, settings.threads - RESERVED_THREADS))
        self.decoding = threading.BoundedSemaphore(max(1, torch.get_num_threads()))
        self.log_rejection = RejectionLog()

    def __call__(self, environ, start_response):
        route = (environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""))
        routes = {"/ping": ("GET", self.ping), "/execution-parameters": ("GET", self.execution_parameters),
                  "/invocations": ("POST", self.invocations)}
        headers = []
        try:
            if route[1] not in routes:
                raise HttpError("404 Not Found", f"No route {shown(route[1], 100)}; this server answers "
                                                 f"GET /ping, POST /invocations and GET /execution-parameters.")
            method, handler = routes[route[1]]
            if route[0] != method:
                headers.append(("Allow", method))
                raise HttpError("405 Method Not Allowed", f"{route[1]} takes {method}, not {shown(route[0], 20)}.")
            status, content_type, body = handler(environ)
        except HttpError as exc:
            status, content_type, body = exc.status, JSON, json_body({"error": str(exc)})
            self.log_rejection(status, *route, environ.get("CONTENT_LENGTH") or "-", str(exc))
        except Exception:  # noqa: BLE001 - the caller gets a message, the log gets the traceback
            log.exception("Failed to answer %s %s", shown(route[0], 20), shown(route[1], 100))
            status, content_type, body = "500 Internal Server Error", JSON, json_body(
                {"error": "The model failed on this request; the endpoint's log has the details."})
        connection = environ.get("gunicorn.socket")
        if isinstance(connection, DeadlineSocket) and route[0] == "POST" and not environ.get(BODY_READ):
            connection.close_after_answer = True  # the body may still be on its way: not worth a thread's wait
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        return [body]

    def ping(self, environ):
        # The app exists only once the model has loaded, so reaching it means ready, unless the model hangs.
        problem = self.batcher.problem()
        if problem:
            return "503 Service Unavailable", JSON, json_body({"status": problem})
        return "200 OK", JSON, json_body({"status": "ok"})

    def execution_parameters(self, environ):
        # An image file is one record (it can't be split), so one per request. Concurrency: on a GPU,
        # as many as make a full batch; on a CPU, about one per core, beyond which requests only queue.
        wanted = self.settings.max_batch_size if self.classifier.device.type == "cuda" else os.cpu_count() or 1
        capacity = self.settings.workers * max(1, self.settings.threads - RESERVED_THREADS)  # beyond: 503
        return "200 OK", JSON, json_body({"MaxConcurrentTransforms": max(1, min(wanted, capacity)),
                                           "BatchStrategy": "SINGLE_RECORD",
                                           "MaxPayloadInMB": self.settings.payload_limit_mb})

    def invocations(self, environ):
        if not self.admitted.acquire(blocking=False):
            raise HttpError("503 Service Unavailable", "The server is busy with as many requests as it takes at "
                                                       "once; try again in a moment.")
        try:
            return self._invocations(environ)
        finally:
            self.admitted.release()

    def _invocations(self, environ):
        content_type = _media_type(environ.get("CONTENT_TYPE", ""))
        response_type, verbose = self._response_type(environ.get("HTTP_ACCEPT", ""))
        if content_type not in ("", JSON, "application/x-image") and not content_type.startswith("image/"):
            raise HttpError("415 Unsupported Media Type",
                            f"Content-Type {shown(content_type, 100)} is not supported. Send one image as "
                            f"{', '.join(IMAGE_TYPES)}, or several as {JSON}: "
                            '{"images": ["<base64 image>", ...]}.')
        k = self._top_k(environ)
        body = self._read_body(environ)
        encoded = _json_images(body) if content_type == JSON else [body]
        images = []
        for index, data in enumerate(encoded):
            try:
                with self.decoding:
                    images.append(self.classifier.preprocess(
                        decode_image(data, self.classifier.decode_side, ENDPOINT)))
            except UnreadableImage as exc:
                where = f"Image {index}" if content_type == JSON else "The request body"
                raise HttpError("400 Bad Request", f"{where} cannot be read: {exc}.") from exc
        del encoded, body
        probabilities = self.batcher.probabilities(torch.stack(images))
        predictions = self.classifier.verbose(probabilities) if verbose else self.classifier.top_k(probabilities, k)
        if response_type == JSON_LINES:
            return "200 OK", JSON_LINES, b"".join(json_body(prediction) for prediction in predictions)
        if verbose and content_type != JSON:  # one image, answered as JumpStart answers it: the object itself
            return "200 OK", JSON, json_body(predictions[0])
        return "200 OK", JSON, json_body({"predictions": predictions})

    def _response_type(self, accept: str) -> tuple[str, bool]:
        """The media type to answer in, and whether verbosely (`application/json;verbose`: every label with its
        probability and the predicted label, as SageMaker JumpStart's image classifiers answer)."""
        default = JSON_LINES if self.settings.batch else JSON
        offered = [item for item in accept.split(",") if item.strip()]
        if not offered:
            return default, False
        # Most preferred first (RFC 9110's q, 1 when absent; ties in the client's order); q=0 means "not this".
        offered = [item for quality, item in sorted(((_quality(item), item) for item in offered),
                                                     key=lambda pair: -pair[0]) if quality > 0]
        for item in offered:
            media_type = _media_type(item)
            verbose = any(_is_verbose(part) for part in item.split(";")[1:])
            if media_type in RESPONSE_TYPES:
                return media_type, verbose
            if media_type in ("*/*", "application/*"):
                return default, verbose
        raise HttpError("406 Not Acceptable", f"Cannot answer in {shown(accept, 100)}: responses are "
                                              f"{' or '.join(RESPONSE_TYPES)}, each optionally ;verbose.")

    def _top_k(self, environ) -> int:
        """k from ?top_k=, else CustomAttributes "top_k=3" (what InvokeEndpoint can pass), else SERVE_TOP_K."""
        raw = parse_qs(environ.get("QUERY_STRING", "")).get("top_k", [None])[-1]
        if raw is None:
            attributes = dict(item.strip().partition("=")[::2]
                              for item in environ.get(CUSTOM_ATTRIBUTES, "").replace(";", ",").split(","))
            raw = attributes.get("top_k")
        if raw is None:
            return self.settings.top_k
        digits = raw.strip()
        # isdigit() alone takes "²" and "٣", which int() refuses; and int() of 5,000 digits raises.
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 9) or int(digits) < 1:
            raise HttpError("400 Bad Request", f"top_k must be a whole number from 1 to 999999999, not "
                                               f"'{shown(raw, 40)}'.")
        return int(digits)

    def _read_body(self, environ) -> bytes:
        limit_message = (f"The request body is larger than {self.settings.payload_limit_mb} MB, the most "
                         f"SageMaker sends to a model. Send smaller images, or fewer per request.")
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            raise HttpError("400 Bad Request", "Content-Length is not a number.") from None
        if length > self.payload_limit:
            raise HttpError("413 Content Too Large", limit_message)
        connection = environ.get("gunicorn.socket")
        if isinstance(connection, DeadlineSocket):
            connection.allow(BODY_TIMEOUT_S)
        # Without a length (chunked upload) read one byte past the limit to see whether it is over.
        try:
            body = environ["wsgi.input"].read(length if length >= 0 else self.payload_limit + 1)
        except RequestTimeout:
            raise HttpError("408 Request Timeout", f"The request body did not arrive within {BODY_TIMEOUT_S:.0f} "
                                                   f"s.") from None
        if len(body) > self.payload_limit:
            raise HttpError("413 Content Too Large", limit_message)
        environ[BODY_READ] = True
        if not body:
            raise HttpError("400 Bad Request", "The request body is empty: send an image.")
        return body


def _json_images(body: bytes) -> list[bytes]:
    usage = 'Send {"images": ["<base64 image>", ...]}.'
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep to parse
        raise HttpError("400 Bad Request", f"The body is not valid JSON ({shown(exc, 200)}). {usage}") from None
    images = request.get("images") if isinstance(request, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(image, str) for image in images):
        raise HttpError("400 Bad Request", f"The JSON must have a non-empty list of base64 strings "
                                           f"under \"images\". {usage}")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise HttpError("413 Content Too Large", f"{len(images)} images in one request; send at most "
                                                 f"{MAX_IMAGES_PER_REQUEST} per request.")
    decoded = []
    for index, text in enumerate(images):
        text = "".join(text.split())  # `base64` wraps lines
        if text.startswith("data:") and "," in text:  # a data URL, as browsers make them
            text = text.split(",", 1)[1]
        try:
            decoded.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise HttpError("400 Bad Request", f"Image {index} is not valid base64.") from None
    return decoded


def _is_verbose(parameter: str) -> bool:
    """`verbose`, `verbose=true` or `verbose=1` (JumpStart's clients send each); `verbose=false` or `=0` is not."""
    name, equals, value = (part.strip().lower() for part in parameter.partition("="))
    return name == "verbose" and (not equals or value.strip('"') in ("true", "1", "yes"))


def _quality(item: str) -> float:
    """An Accept entry's q parameter: 1 when absent, 0 when it is not a number from 0 to 1."""
    for parameter in item.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value.strip()[:10])
            except ValueError:
                return 0.0
            return quality if 0 <= quality <= 1 else 0.0
    return 1.0


def _media_type(header: str) -> str:
    return header.split(";", 1)[0].strip().lower()


def create_app(settings: ServingEnvironment) -> InferenceApp:
    # Processes share the cores; each one's PyTorch would otherwise start a thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    classifier = Classifier(settings.model_dir)
    log.info("Loaded %s (%d classes) on %s from %s", type(classifier.model).__name__, len(classifier.labels),
             classifier.device, settings.model_dir)
    return InferenceApp(settings, classifier)


def gunicorn_options(settings: ServingEnvironment) -> dict:
    return {
        "bind": f"0.0.0.0:{settings.port}",
        "workers": settings.workers,
        "worker_class": "efficientnet_train.serve.BoundedThreadWorker",
        "threads": settings.threads,
        # A worker that does not check in for this long is restarted; loading a large model counts.
        "timeout": 120,
        "graceful_timeout": GRACEFUL_TIMEOUT_S,
        # SageMaker's front end reuses connections; gunicorn's 2 s default would close them under it.
        "keepalive": 75,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "serve",
        # gunicorn >= 24 opens a control socket in $HOME: nothing here uses it, and servers side by side
        # (tests, several models on one host) would share its path.
        "control_socket_disable": True,
    }


def main() -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = ServingEnvironment.from_environ()
        check_model_dir(settings.model_dir)  # fail here, with the reason, before any worker starts
    except JobError as exc:
        log.error("Cannot serve: %s", exc)
        return 1
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self):
            for name, value in gunicorn_options(settings).items():
                if name in self.cfg.settings:  # older gunicorns lack the newer settings
                    self.cfg.set(name, value)

        def load(self):
            return create_app(settings)  # in each worker, after the fork: PyTorch does not survive forks

    log.info("Serving %s on port %d: %d worker(s) x %d threads, batches of up to %d images%s",
             settings.model_dir, settings.port, settings.workers, settings.threads, settings.max_batch_size,
             ", batch transform (JSON Lines)" if settings.batch else "")
    Server().run()
    return 0


def __getattr__(name: str):
    # gunicorn imports its worker class by name in the worker process; built on first use, so that importing
    # this module (the tests, `predict`) does not import gunicorn or patch it.
    if name == "BoundedThreadWorker":
        return thread_worker_class()
    raise AttributeError(name)


if __name__ == "__main__":  # python -m: as the installed command, offline and with its stop handling
    from efficientnet_train.commands import serve

    sys.exit(serve())
