"""``tlcli serve``: a local prediction server for a bundle.

Endpoints (``NAME`` defaults to the bundle folder's name; the one version served is ``1``):

* ``GET /``: a page to pick or drop images and see the top-k labels; inline HTML, CSS and
  script, nothing fetched from elsewhere, so it works offline.
* ``POST /explain``: one image (a multipart upload of one file, or the raw bytes as the body);
  answers the PNG of its saliency overlay (``saliency``; header ``X-Explained-Class``: the index
  of the label explained), or a 404 when the bundle has no SavedModel (the page then hides it).
* ``POST /predict[?top_k=K]``: a multipart upload of one or more files (any field names), or the
  raw bytes of one image as the body. Answers a JSON array of the objects ``tlcli predict
  --json`` prints (``path`` is the upload's file name; of a multi-label model, ``labels``: those
  at or above their thresholds; ``unknown`` and ``unknown_score`` with the bundle's unknown
  detector). When a file cannot be used: 400 with
  ``{"error": <its decoder message>, "results": [...]}``. The ``Server-Timing`` header has the
  time spent decoding and classifying.
* TF Serving's REST API, so a client written for one works against the other:
  ``GET /v1/models/NAME[/versions/1]`` (status), ``GET .../metadata`` (signature defs) and
  ``POST /v1/models/NAME[/versions/1]:predict`` with ``serving_default`` (float images, input
  ``images``) or ``serving_bytes`` (encoded files, input ``image_bytes``, as ``{"b64": ...}``),
  in the row (``instances`` -> ``predictions``) or columnar (``inputs`` -> ``outputs``) form.
  Errors are ``{"error": "..."}``.

Every request goes through the project's one decoder (``images.model_input_from_bytes``, so the
``serving_bytes`` answers are ``tlcli predict``'s, whatever the engine) and the engine that
``inference.resolve_engine`` picks; with LiteRT nothing imports TensorFlow.

Status codes: 400 a malformed request (bad JSON, an unknown signature or input, a file that is
not an image or is over the pixel limit, with the decoder's reason, more than ``max_images``
images), 404 an unknown model or path, 405 a known path with the wrong method, 408 headers or a
body not received in time, 413 a body over ``max_body_bytes``. A client's mistake never gets a
500; a 500 (one line, no traceback) means the model itself failed.

Bounds, so that no client holds the server or its memory: the body's size (``max_body_bytes``),
the images in one request (``max_images``, decoded and classified ``BATCH`` at a time, so a
request holds at most ``BATCH`` model inputs), the time to send the headers (``serve``'s
``header_seconds``, see ``receipt``) and the body (``body_seconds``), and JSON nesting (Python's
recursion limit: deeper is a 400).

Why Starlette on uvicorn: a maintained, small ASGI stack with no TensorFlow in it (it starts in
about 0.2 s, so a LiteRT server answers within a second), multipart parsing through
python-multipart, a thread pool for blocking work, and graceful shutdown on SIGINT/SIGTERM
built in (in-flight requests finish, then the process exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli import strict_json
from tlcli.bundle.graphcheck import SAVED_MODEL_FILE
from tlcli.config import (
    DEFAULT_MODEL_DIR,
    PREDICT_ENGINE,
    PREDICT_TOP_K,
    SERVE_BODY_SECONDS,
    SERVE_HEADER_SECONDS,
    SERVE_HOST,
    SERVE_MAX_BODY_BYTES,
    SERVE_MAX_IMAGES,
    SERVE_PORT,
    check_max_pixels,
)
from tlcli.data import images
from tlcli.deploy import inference, saliency
from tlcli.deploy.tf_serving import (
    BATCH,
    VERSION,
    ClientError,
    model_metadata,
    model_status,
    rest_predict,
    signature_defs,
)
from tlcli.errors import ImageError, TlcliError, UsageError
from tlcli.progress import Callback, Info, Warn, silent

GRACE_SECONDS = 4.0  # in-flight requests get this long after SIGINT/SIGTERM (exit within 5 s)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---- the served model -------------------------------------------------------------------------


class ServedModel:
    """One bundle being served: ``name``, ``engine`` ("tf" or a format), ``workers`` (how many
    requests run the model at once), ``max_pixels`` (the decoder's limit), ``max_images`` (the
    most images one request may hold), ``unknown_threshold`` (``predict``'s: for /predict only).

    LiteRT interpreters and OpenVINO infer requests are not thread-safe, so each request borrows
    an engine (any but TensorFlow) from a pool that grows on demand up to ``workers`` (only the
    first is loaded before the server is ready), each with an equal share of the CPUs. TensorFlow
    runs concurrent calls of one SavedModel itself: one engine is shared."""

    def __init__(self, b: bundles.Bundle, *, name: str, engine: str, workers: int, max_pixels: int | None,
                 max_images: int = SERVE_MAX_IMAGES, threshold: float | None = None,
                 unknown_threshold: float | str | None = None):
        self.bundle, self.name, self.workers, self.max_images = b, name, workers, max_images
        self.cuts = inference.thresholds(b, threshold)  # a multi-label model's; None for one label
        self.engine = inference.resolve_engine(b, engine)
        self.max_pixels = max_pixels or b.max_pixels
        self.signatures = signature_defs(b)
        self._threads = max(1, (os.cpu_count() or 1) // workers)
        self._pool, self._lock, self._made = queue.Queue(), threading.Lock(), 1
        self._shared = self._open()
        self._pool.put(self._shared)
        self.unknown_threshold = inference.unknown_threshold_for(b, unknown_threshold, self._shared)
        self.explanations = saliency.Explanations(b, engine=self._shared if self.engine == "tf" else None,
                                                  max_pixels=self.max_pixels)

    def _open(self):
        return inference.open_engine(self.bundle, self.engine, num_threads=self._threads)

    def _borrow(self):
        if self.engine == "tf":
            return self._shared  # TensorFlow runs concurrent calls of one function itself
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = self._made < self.workers
            self._made += grow
        return self._open() if grow else self._pool.get()

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, S, S, 3] in [0, 1] -> float32 [n, labels] probabilities; ``BundleError``."""
        return self.outputs(batch)["probabilities"]

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The engine's outputs (``inference.engine_outputs``) of float32 [n, S, S, 3] in [0, 1]."""
        engine = self._borrow()
        try:
            parts = [inference.engine_outputs(engine, batch[i:i + BATCH]) for i in range(0, len(batch), BATCH)]
        finally:
            if self.engine != "tf":  # every other engine is one per request at a time
                self._pool.put(engine)
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def decode(self, data: bytes, path: str) -> np.ndarray:
        """The model input for one encoded file; raises ``ImageError`` (named ``path``)."""
        return images.model_input_from_bytes(data, self.bundle.image_size, path=path, max_pixels=self.max_pixels)

    def check_count(self, n: int, what: str) -> None:
        """Refuse (400) a request of more than ``max_images`` images."""
        if n > self.max_images:
            raise ClientError(400, f"{what}: {n} images in one request, over the limit of {self.max_images}; "
                                   "send them in several requests")

    def predict_files(self, uploads: list[tuple[str, bytes]], top_k: int) -> list[inference.Prediction]:
        """``tlcli predict``'s result for each (name, bytes), in order; bad files get ``error``.
        Decoded and classified ``BATCH`` at a time: the model inputs held stay bounded."""
        self.check_count(len(uploads), "upload")
        k = max(1, min(top_k, len(self.bundle.labels)))
        results = []
        for start in range(0, len(uploads), BATCH):
            part = uploads[start:start + BATCH]
            x, errors = images.decode_batch(part, lambda upload: self.decode(upload[1], upload[0]))
            rows, scores = inference.paired_outputs({} if x is None else self.outputs(x), errors,
                                                    self.unknown_threshold)
            results += [inference.Prediction(name, [], str(err), None if self.cuts is None else []) if err else
                        inference.prediction(name, row, self.bundle.labels, k, self.cuts, score, self.unknown_threshold)
                        for (name, _), err, row, score in zip(part, errors, rows, scores)]
        return results


# ---- the ASGI app -----------------------------------------------------------------------------

_PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:([A-Za-z]+)")
_STATUS_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?")


def _json(data, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(strict_json.dumps(data), status_code=status, headers=headers, media_type="application/json")


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x00``): a request's path or
    query can carry them, and an error message stays one line."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: m[0].encode("unicode_escape").decode(), text)


async def _limited(stream, limit: int):
    """``stream``'s chunks, refusing (413) once more than ``limit`` bytes have come."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"request body over the limit of {limit} bytes; send fewer or smaller images")
        yield chunk


async def _in_time(read, seconds: float):
    """The result of awaiting ``read`` (the reading of a request's body), refused with 408 after
    ``seconds`` (a client that sends its body slowly, or stops), or 400 when the client went away."""
    from starlette.requests import ClientDisconnect

    try:
        async with asyncio.timeout(seconds):
            return await read
    except TimeoutError:
        raise ClientError(408, f"request body not received within {seconds:g} s; send it at once",
                          {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientError(400, "the client closed the connection before sending the whole body") from None


def _declared(request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"request body of {declared} bytes is over the limit of {limit} bytes; "
                               "send fewer or smaller images", {"Connection": "close"})


async def _body(request, limit: int, seconds: float) -> bytes:
    _declared(request, limit)

    async def read():
        return b"".join([chunk async for chunk in _limited(request.stream(), limit)])

    return await _in_time(read(), seconds)


async def _uploads(request, limit: int, seconds: float, max_files: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file of a multipart upload, or the raw body as one file."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [(request.query_params.get("name") or "<body>", await _body(request, limit, seconds))]
    _declared(request, limit)
    try:
        form = await _in_time(MultiPartParser(request.headers, _limited(request.stream(), limit),
                                              max_files=max_files, max_part_size=limit).parse(), seconds)
    except MultiPartException as exc:
        raise ClientError(400, f"multipart upload: {exc.message}") from None
    files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    await form.close()
    if not files:
        raise ClientError(400, "no file in the upload: send images as multipart file fields, or one image as the body")
    return files


def _top_k(request) -> int:
    """The request's ``top_k``: ASCII digits, >= 1; a huge one means every label."""
    raw = request.query_params.get("top_k", str(PREDICT_TOP_K))
    if not re.fullmatch(r"[0-9]+", raw) or not raw.strip("0"):
        raise ClientError(400, f"top_k={raw[:40]}: must be a whole number >= 1")
    return int(raw) if len(raw) <= 9 else 10 ** 9


def _explain_endpoint(model: ServedModel, max_body_bytes: int, body_seconds: float):
    """The handler of ``POST /explain`` (see the module docstring)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    async def explain(request):
        if not model.explanations.available:
            raise ClientError(404, f"POST /explain: the bundle has no {SAVED_MODEL_FILE}, whose gradients "
                                   "a saliency map needs")
        (name, data), = await _uploads(request, max_body_bytes, body_seconds, 1)
        start = time.perf_counter()
        try:
            png, c = await run_in_threadpool(model.explanations.overlay_png, data, name)
        except ImageError as exc:
            raise ClientError(400, str(exc)) from None
        return Response(png, media_type="image/png", headers={
            "X-Explained-Class": str(c), "Server-Timing": f"explain;dur={1000 * (time.perf_counter() - start):.1f}"})

    return explain


def build_app(model: ServedModel, *, max_body_bytes: int = SERVE_MAX_BODY_BYTES, top_k: int = PREDICT_TOP_K,
              body_seconds: float = SERVE_BODY_SECONDS):
    """The Starlette app serving ``model`` (see the module docstring for the endpoints and bounds)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from tlcli.deploy.server_page import page

    html = page(name=model.name, labels=model.bundle.labels, engine=model.engine, top_k=top_k,
                explain=model.explanations.available)

    async def home(request):
        return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'none'; img-src blob:; "
                                           "style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                           "connect-src 'self'"})

    async def predict(request):
        k = _top_k(request)
        uploads = await _uploads(request, max_body_bytes, body_seconds, model.max_images)
        start = time.perf_counter()
        results = [p.to_dict() for p in await run_in_threadpool(model.predict_files, uploads, k)]
        timing = {"Server-Timing": f"predict;dur={1000 * (time.perf_counter() - start):.1f}"}
        failed = [r for r in results if r["error"]]
        if failed:
            return _json({"error": one_line(failed[0]["error"]), "results": results}, 400, timing)
        return _json(results, 200, timing)

    def served(name: str, version: str | None, what: str) -> None:
        if name != model.name or (version is not None and version != VERSION):
            spec = f"Specific({name}, {version})" if version else f"Latest({name})"
            raise ClientError(404, f"Could not find any versions of model {name}" if what == "status" and not version
                              else f"Servable not found for request: {spec}")

    async def tf_serving(request):
        path, method = request.url.path, request.method
        if m := _PREDICT_PATH.fullmatch(path):
            if method != "POST":
                raise ClientError(405, f"{method} {path}: use POST", {"Allow": "POST"})
            served(m[1], m[2], "predict")
            if m[3] != "predict":
                raise ClientError(400, f":{m[3]}: not served; the bundle's signatures answer :predict")
            body = await _body(request, max_body_bytes, body_seconds)
            return _json(await run_in_threadpool(rest_predict, model, body))
        if m := _STATUS_PATH.fullmatch(path):
            if method not in ("GET", "HEAD"):
                raise ClientError(405, f"{method} {path}: use GET", {"Allow": "GET"})
            served(m[1], m[2], "status")
            return _json(model_metadata(model) if m[3] else model_status())
        raise ClientError(404, f"Malformed request: {method} {path}")

    async def client_error(request, exc: ClientError):
        return _json({"error": one_line(exc.message)}, exc.status, exc.headers)

    async def http_error(request, exc: HTTPException):  # Starlette's own 404 / 405
        words = {404: "no such endpoint", 405: "method not allowed"}.get(exc.status_code, exc.detail)
        return _json({"error": one_line(f"{request.method} {request.url.path}: {words}")}, exc.status_code,
                     exc.headers)

    async def server_error(request, exc: Exception):  # the model failed: one line, no traceback
        message = str(exc) if isinstance(exc, TlcliError) else f"internal error ({type(exc).__name__})"
        return _json({"error": one_line(message)}, 500)

    every = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    app = Starlette(routes=[Route("/", home, methods=["GET"]), Route("/predict", predict, methods=["POST"]),
                            Route("/explain", _explain_endpoint(model, max_body_bytes, body_seconds),
                                  methods=["POST"]),
                             Route("/v1/{rest:path}", tf_serving, methods=every)],
                     exception_handlers={ClientError: client_error, HTTPException: http_error,
                                         Exception: server_error})
    app.state.model = model
    return app


def make_app(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, name: str | None = None,
             engine: str = PREDICT_ENGINE, workers: int | None = None, max_pixels: int | None = None,
             max_body_bytes: int = SERVE_MAX_BODY_BYTES, max_images: int = SERVE_MAX_IMAGES,
             body_seconds: float = SERVE_BODY_SECONDS, threshold: float | None = None,
             unknown_threshold: float | str | None = None):
    """Load the bundle and its engine and return the ASGI app (for uvicorn, or tests). ``name``
    defaults to the bundle folder's name, ``workers`` to the number of CPUs; ``threshold``: a
    multi-label model's, for every label (default: each label's own); ``unknown_threshold`` as
    ``predict``'s. Raises ``BundleError`` / ``UsageError``."""
    workers = check_options(workers=workers, max_pixels=max_pixels, max_body_bytes=max_body_bytes)
    if max_images < 1 or not body_seconds > 0:
        raise UsageError(f"max_images {max_images}, body_seconds {body_seconds}: both must be positive")
    b = bundles.load(model_dir)
    inference.unknown_threshold_for(b, unknown_threshold)  # a bad option fails before the engine loads
    name = name if name is not None else Path(os.path.abspath(model_dir)).name
    if not re.fullmatch(r"[^/:\s]+", name):
        raise UsageError(f"--name {name!r}: a model name cannot be empty or hold '/', ':' or spaces")
    model = ServedModel(b, name=name, engine=engine, workers=workers, max_pixels=max_pixels, max_images=max_images,
                        threshold=threshold, unknown_threshold=unknown_threshold)
    return build_app(model, max_body_bytes=max_body_bytes, body_seconds=body_seconds)


def check_options(*, workers: int | None, max_pixels: int | None, max_body_bytes: int) -> int:
    """The number of workers to use; raises ``UsageError`` for a value that cannot work."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be >= 1")
    check_max_pixels(max_pixels)
    if max_body_bytes < 1:
        raise UsageError(f"max_body_bytes {max_body_bytes}: must be >= 1")
    return workers


# ---- running it -------------------------------------------------------------------------------

@dataclass
class ServeResult:
    """A server that has stopped: what it served, where, and for how long."""

    name: str
    url: str
    engine: str
    workers: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port). Raises ``UsageError``."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be in 0..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                         "choose another --port (0 picks a free one)") from None
    return sock


def serve(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, host: str = SERVE_HOST, port: int = SERVE_PORT,
          name: str | None = None, engine: str = PREDICT_ENGINE, workers: int | None = None,
          max_pixels: int | None = None, max_body_bytes: int = SERVE_MAX_BODY_BYTES,
          threshold: float | None = None, unknown_threshold: float | str | None = None,
          progress: Callback = silent) -> ServeResult:
    """Serve the bundle over HTTP (see the module docstring) until SIGINT or SIGTERM, then finish
    the requests in flight (up to ``GRACE_SECONDS``) and return. Emits ``Info`` with the URL once
    it accepts connections, and ``Warn`` first when ``host`` is not a loopback address (anyone on
    the network can then use it; there is no authentication). Raises ``BundleError`` /
    ``UsageError`` before it starts."""
    from tlcli.deploy.receipt import uvicorn_server

    app = make_app(model_dir, name=name, engine=engine, workers=workers, max_pixels=max_pixels,
                   max_body_bytes=max_body_bytes, threshold=threshold, unknown_threshold=unknown_threshold)
    if host not in LOOPBACK:
        progress(Warn(f"--host {host}: the server is unauthenticated and reachable from the network; anyone who "
                      "can connect can use the model"))
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/"
    model: ServedModel = app.state.model
    server = uvicorn_server(app, header_seconds=SERVE_HEADER_SECONDS, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=GRACE_SECONDS, server_header=False)
    started = time.monotonic()

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.005)
        if server.started:
            progress(Info(f"serving {model.name} at {url} (engine {model.engine}, {model.workers} workers; "
                          f"TF Serving REST API at {url}v1/models/{model.name}); Ctrl-C to stop"))

    threading.Thread(target=announce, daemon=True).start()
    with _signals_end_quietly():
        server.run(sockets=[sock])
    return ServeResult(model.name, url, model.engine, model.workers, time.monotonic() - started)


@contextlib.contextmanager
def _signals_end_quietly():
    """uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again for the
    handler it found; with these no-op handlers in place, that ends ``serve`` normally (exit 0)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
