"""``tlops serve``: a registered model behind MLflow's scoring protocol, with limits on what one request may ask.

Why not ``mlflow models serve``: its scoring server reads the whole body whatever its size, echoes the payload
in its error messages, and turns a bad image into a generic "unexpected error". This app keeps MLflow's
request and response shapes (``/invocations`` taking ``dataframe_split``, ``dataframe_records``, ``instances``
or ``inputs``; ``{"predictions": [...]}`` back; ``/ping``, ``/health``, ``/version``), so MLflow and KServe
clients work unchanged, and it answers a bad request with a 4xx and a message naming the instance and the fix.
KServe v1 clients find the same under ``/v1/models/NAME:predict`` and ``/v1/models/NAME``.
The model is the pyfunc itself (``mlflow.pyfunc.load_model``): served predictions are the evaluated ones (within
1e-4: :func:`prepare_for_serving` folds its BatchNorm layers into the convolutions).

Hostile clients (see :class:`ServeLimits`): silent and slow connections hold a socket, never a slot others need
(uvicorn's ``limit_concurrency`` counted them, so 64 of them made every other client get 503); the work of each
image and request is bounded from the image headers before anything is decoded or the model's lock is taken.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import http
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlops.errors import TlopsError

log = logging.getLogger("tlops.server")

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
SHAPES = ('{"dataframe_split": {"columns": ["image"], "data": [[B64]]}}, {"dataframe_records": [{"image": B64}]}, '
          '{"instances": [{"image": B64}]} or {"inputs": {"image": [B64]}}, B64 being the base64 of an image file')
JSON_TYPE = "application/json"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class ServeLimits:
    """What one request, one client and all of them together may ask for.

    The body limit is checked before reading (Content-Length) and while reading. The work of a request is bounded
    before any image is decoded: each image by its pixels and its aspect ratio, which bounds its resize by the
    model's input size (``max_aspect_ratio``, None: ``TLOPS_MAX_ASPECT_RATIO`` as for the data, see
    :func:`tlops.serving.check_work`), the request by the pixels of all its images. Connections that carry no
    request cost nothing but a socket, and are never why another client is refused: a request head must arrive
    within ``header_timeout_s`` of the connection (or of the previous response), and a new connection past
    ``max_connections`` (or ``max_connections_per_client`` from one address) closes the one that has waited
    longest without a request."""

    max_bytes: int = 16 * 1024 * 1024
    max_instances: int = 64
    read_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 1024
    max_connections_per_client: int = 128
    max_pending: int = 64  # requests whose body has arrived, decoding or waiting for the model
    max_buffered_bytes: int = 256 * 1024 * 1024  # request bodies held in memory at once, all requests together
    max_request_pixels: int = 2 * 89_478_485  # decoded pixels per request: twice the largest image (tlops.data)
    max_aspect_ratio: float | None = None


@dataclass
class ServedModel:
    """The loaded pyfunc, its predictor (what the batches run) and what ``/version`` tells about it."""

    pyfunc: Any
    info: dict[str, Any] = field(default_factory=dict)
    spec: Any = None  # its PreprocessSpec: the server bounds the work of each image by it before decoding
    predictor: Any = None  # its tlops.serving.Predictor: preprocessing per request, forward passes per batch

    def __post_init__(self) -> None:
        if self.predictor is None and self.pyfunc is not None:
            self.predictor = self.pyfunc.unwrap_python_model().predictor
        prepare_for_serving(self.predictor)

    @property
    def version(self) -> str | None:
        return self.info.get("version")

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Which model answered: the registered name and version, on every prediction."""
        out = []
        if "name" in self.info:
            out.append((b"x-model-name", str(self.info["name"]).encode("latin-1", "replace")))
        if self.version is not None:
            out.append((b"x-model-version", str(self.version).encode()))
        return out


def prepare_for_serving(predictor: Any) -> None:
    """The predictor's PyTorch model made ready to serve, once per loaded model, before it answers anything (so
    in the loading thread: at start-up, or in the background for a new version), the same for batching on and off.

    A copy of it (:func:`tlops.vision.inference.inference_copy`) is served, the model as loaded left as it is:

    - BatchNorm folded into the convolution before it (:func:`tlops.vision.inference.fold_batch_norm`): Lite0's 49
      BatchNorm layers are one op fewer each. One thread, per image (median of 5 rounds): batch 1 5.3 -> 4.3 ms,
      batch 8 3.0 -> 2.5 ms, batch 20 2.8 -> 1.4 ms. Kept only where the folded model's outputs are within 1e-4 of
      the model's on a check input (float32 rounding: up to 1.1e-5 on the probabilities of the 1,797 demo digits,
      every label the same); otherwise the layers are served unfolded.
    - Channels-last (NHWC) weights: oneDNN's NHWC kernels for EfficientNet's depthwise and pointwise convolutions
      take 0.6x the time per image of NCHW ones at batch 20 (one thread), about 0.9x at batch 1; probabilities
      within 2e-9 of NCHW's.

    A predictor without a PyTorch model (an ONNX variant's) is left as it is."""
    model = getattr(predictor, "model", None)
    torch = sys.modules.get("torch")  # a PyTorch model means torch is loaded; an ONNX variant never loads it
    if model is None or torch is None or getattr(predictor, "_tlops_served", False):
        return
    if isinstance(model, torch.nn.Module):
        from tlops.vision.inference import inference_copy

        size = int(getattr(getattr(predictor, "spec", None), "crop_size", 0) or 32)
        check = torch.Generator().manual_seed(0)
        predictor.model, _ = inference_copy(model, torch.randn(2, 3, size, size, generator=check))
    predictor._tlops_served = True


class ModelHolder:
    """The model served now. A request takes it once, at its start, and is answered by that model to its end;
    a new version is swapped in by one assignment (:meth:`swap`), so no request sees half of each."""

    def __init__(self, model: ServedModel) -> None:
        self.current = model

    def swap(self, model: ServedModel) -> ServedModel:
        old, self.current = self.current, model
        return old


@dataclass(eq=False)  # identity, never field equality: comparing two jobs would compare their tensors
class _Job:
    model: ServedModel
    x: Any  # torch.Tensor: the request's preprocessed images
    embed: bool = False  # also the backbone's features (for the prediction log), from the same forward pass
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """Dynamic batching: the preprocessed images of concurrent requests go through the model in one forward pass.

    One thread runs the model (torch already uses every thread it is given for one batch; two passes at once would
    only fight for the cores). It takes the oldest waiting request, then, while the batch holds fewer than
    ``max_batch`` images, adds the waiting requests for the same model version, and waits up to ``window_s`` for
    more only while other requests are on their way (past their body, being decoded): a lone client never waits.
    A request is never split; one larger than ``max_batch`` runs alone. ``max_batch`` 1 turns batching off: one
    request per forward pass, as a server with one lock. Each request gets its own rows back: a batched answer
    is the answer the request would get alone.

    ``workers``: threads that each take the next batch and run it (as a serving system's model instances): with
    one torch thread each, two workers keep two cores on forward passes (torch releases the GIL inside its ops)
    while one would leave the second core to the requests' decoding. 1: one forward pass at a time. The first
    idle worker (by number) takes the next batch: a later one only while those before it are busy, so a lone
    client's requests all run on one thread, as with one worker (taken in turns by two threads, they ran about
    7% slower: 0.92x the requests/s at one client)."""

    def __init__(self, max_batch: int = 32, window_s: float = 0.005, workers: int = 1) -> None:
        self.max_batch, self.window_s = max(1, max_batch), max(0.0, window_s)
        self.workers = max(1, workers)
        self._cv = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._upcoming = 0  # requests announced (expect) and not yet submitted or cancelled
        self._idle = [False] * self.workers  # which workers wait for a batch
        self._filling = False  # a worker is filling its batch (waiting its window)
        self.batches = self.requests = self.images = 0
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"tlops-batcher-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def expect(self) -> None:
        """A request is on its way: worth waiting a window for."""
        with self._cv:
            self._upcoming += 1

    def cancel(self) -> None:
        """An announced request will not come (refused, or failed while decoding)."""
        with self._cv:
            self._upcoming -= 1
            self._cv.notify_all()

    def submit(self, model: ServedModel, x: Any, embed: bool = False) -> concurrent.futures.Future:
        """Queue an announced request's input; the future gets its probabilities (or the forward pass's error);
        with ``embed``, (probabilities, backbone features or None where the runtime gives none)."""
        job = _Job(model, x, embed)
        with self._cv:
            self._upcoming -= 1
            self._queue.append(job)
            self._cv.notify_all()  # every waiting worker looks: only the first idle one takes it
        return job.future

    def _next_batch(self, batch: list[_Job], worker: int = 0) -> None:
        """Fill ``batch`` (empty) from the queue for worker number ``worker``, once no worker before it is idle and
        no other is filling a batch; a job leaves the queue only into ``batch``, so none is lost."""
        with self._cv:
            self._idle[worker] = True
            try:
                while not self._queue or self._filling or any(self._idle[:worker]):
                    self._cv.wait()
            finally:
                self._idle[worker] = False
            self._filling = True  # what comes within the window joins this batch, not a second worker's
            try:
                batch.append(self._queue.popleft())
                size = len(batch[0].x)
                deadline = time.monotonic() + self.window_s
                while size < self.max_batch:
                    kept: collections.deque[_Job] = collections.deque()
                    while self._queue:
                        job = self._queue.popleft()
                        if job.model is batch[0].model and size + len(job.x) <= self.max_batch:
                            batch.append(job)
                            size += len(job.x)
                        else:
                            kept.append(job)
                    self._queue.extendleft(reversed(kept))
                    left = deadline - time.monotonic()
                    if size >= self.max_batch or left <= 0 or self._upcoming <= 0:
                        break
                    self._cv.wait(left)
            finally:
                self._filling = False
                self._cv.notify_all()  # the next idle worker may take what is left

    def _run(self, worker: int = 0) -> None:
        while True:
            batch: list[_Job] = []
            try:
                self._next_batch(batch, worker)
                self._forward(batch)
            except BaseException as exc:  # never the end of the thread: every request of the batch gets an answer
                log.exception("batcher: a batch of %d requests failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def _forward(self, batch: list[_Job]) -> None:
        predictor = batch[0].model.predictor
        try:
            x = batch[0].x if len(batch) == 1 else predictor.concat([job.x for job in batch])
            step = max(self.max_batch, predictor.batch_size)
            embed = any(job.embed for job in batch) and hasattr(predictor, "proba_embed")
            proba, features = predictor.proba_embed(x, step) if embed else (predictor.proba(x, step), None)
        except Exception as exc:  # the requests get the error; the thread lives on
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        with self._cv:
            self.batches, self.requests, self.images = (self.batches + 1, self.requests + len(batch),
                                                        self.images + len(proba))
        start = 0
        for job in batch:
            if not job.future.done():  # a request whose client went away: its rows are dropped
                rows = slice(start, start + len(job.x))
                job.future.set_result((proba[rows], None if features is None else features[rows]) if job.embed
                                      else proba[rows])
            start += len(job.x)


class ImageSlots:
    """Images preprocessed and not yet answered, all requests together: their tensors are what a request holds
    in memory past its body. A request waits for room before it decodes (one larger than the limit takes all)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = max(1, limit), 0
        self._cond = asyncio.Condition()

    async def take(self, n: int) -> int:
        n = min(n, self.limit)
        async with self._cond:
            await self._cond.wait_for(lambda: self.held + n <= self.limit)
            self.held += n
        return n

    async def give(self, n: int) -> None:
        async with self._cond:
            self.held -= n
            self._cond.notify_all()


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _unwrap_b64(value: Any) -> Any:
    # TensorFlow Serving's (and KServe v1's) convention for binary values: {"b64": "..."}.
    return value["b64"] if isinstance(value, dict) and set(value) == {"b64"} else value


def _image_of_record(record: Any, index: int) -> Any:
    if isinstance(record, dict) and "image" in record:
        return _unwrap_b64(record["image"])
    if isinstance(record, str) or (isinstance(record, dict) and set(record) == {"b64"}):
        return _unwrap_b64(record)  # a single-input model: the instance is the image itself
    found = sorted(record)[:5] if isinstance(record, dict) else type(record).__name__
    raise RequestError(400, f"instance {index}: no 'image' field (found {found}); send {SHAPES}")


def image_values(payload: Any) -> list[Any]:
    """The ``image`` cells of an MLflow scoring request, in order, still as sent (base64 text)."""
    keys = [k for k in FORMATS if k in payload] if isinstance(payload, dict) else []
    if len(keys) != 1:
        found = sorted(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
        raise RequestError(400, f"the JSON body needs exactly one of {', '.join(FORMATS)} (found {found}); "
                                f"send {SHAPES}")
    key = keys[0]
    data = payload[key]
    if key == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise RequestError(400, f"dataframe_split needs 'columns' and 'data' lists; send {SHAPES}")
        columns = data.get("columns", ["image"])
        if not isinstance(columns, list) or "image" not in columns:
            raise RequestError(400, f"dataframe_split has no 'image' column (columns {columns!r:.100}); send {SHAPES}")
        col = columns.index("image")
        rows = data["data"]
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, list) or len(row) != len(columns)), None)
        if bad is not None:
            raise RequestError(400, f"instance {bad}: a dataframe_split row must be a list of {len(columns)} values")
        return [_unwrap_b64(row[col]) for row in rows]
    if isinstance(data, list):
        return [_image_of_record(record, i) for i, record in enumerate(data)]
    if key in ("instances", "inputs") and isinstance(data, dict) and "image" in data:
        column = data["image"]
        return [_unwrap_b64(v) for v in column] if isinstance(column, list) else [_unwrap_b64(column)]
    raise RequestError(400, f"{key} must be a list of records or a mapping with an 'image' column; send {SHAPES}")


def decode_request(body: bytes, limits: ServeLimits, spec: Any = None) -> list[bytes]:
    """The request body to image file bytes, one per instance; a bad request raises :class:`RequestError`.

    With the model's preprocessing ``spec``, every image's header is read and the work it asks for bounded
    (see :class:`ServeLimits`) before any of them is decoded: a refused request never takes the model's lock."""
    from tlops.data.images import ImageInputError, check_work, image_bytes

    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc}); send {SHAPES}") from None
    except RecursionError:  # a few kB of "[[[[..." would otherwise be a server error
        raise RequestError(400, f"the JSON is nested too deeply; send {SHAPES}") from None
    except ValueError as exc:  # valid JSON Python refuses to read: an integer over sys.get_int_max_str_digits()
        raise RequestError(400, f"the JSON holds a value that cannot be read ({str(exc).split(';')[0]:.160}); "
                                f"send {SHAPES}") from None
    values = image_values(payload)
    if not values:
        raise RequestError(400, f"the request holds no instances; send {SHAPES}")
    if len(values) > limits.max_instances:
        raise RequestError(413, f"{len(values)} instances in one request exceeds the limit of {limits.max_instances} "
                                "(--max-instances); split them over several requests")
    try:
        images = [image_bytes(v, i) for i, v in enumerate(values)]
        pixels = 0
        ratio = limits.max_aspect_ratio if limits.max_aspect_ratio is not None else _data_aspect_ratio()
        for i, data in enumerate(images if spec is not None else []):
            pixels += check_work(data, i, spec, ratio)
            if pixels > limits.max_request_pixels:
                raise RequestError(413, f"instance {i}: the images up to this one hold {pixels} pixels to decode, "
                                        f"over the limit of {limits.max_request_pixels} per request; split them "
                                        "over several requests")
    except ImageInputError as exc:
        raise RequestError(422, str(exc)) from None
    return images


def _data_aspect_ratio() -> float:
    from tlops.data.discovery import max_aspect_ratio

    return max_aspect_ratio()


class BodyBudget:
    """The bytes of request bodies held in memory at once, all requests together: counted as they arrive and
    until their request ends. A request that would pass the limit gets 503 rather than the server its memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise RequestError(503, f"the server holds {self.held} bytes of request bodies, near its limit of "
                                    f"{self.limit}; retry shortly")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


async def read_body(receive: Receive, headers: dict[str, str], limits: ServeLimits,
                    budget: BodyBudget | None = None) -> bytes:
    """The body, refused with 413 from its Content-Length before any of it is read, or as soon as the bytes
    streamed (chunked transfer) pass the limit; 408 when it does not arrive in time. The bytes are taken from
    ``budget`` as they arrive; on success the caller gives back ``len(body)`` once the request is done."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length {declared!r:.40} is not a number of bytes")
        if int(declared) > limits.max_bytes:
            raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {limits.max_bytes} "
                                    "bytes (--max-bytes); send fewer or smaller images per request")
        if budget is not None:  # refused now rather than part-way through
            budget.take(int(declared))
            budget.give(int(declared))
    body = io.BytesIO()
    try:
        async with asyncio.timeout(limits.read_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise RequestError(400, "the client went away before the body was complete")
                chunk = message.get("body", b"")
                if budget is not None:
                    budget.take(len(chunk))
                body.write(chunk)
                if body.tell() > limits.max_bytes:
                    raise RequestError(413, f"request body exceeds the limit of {limits.max_bytes} bytes "
                                            "(--max-bytes); send fewer or smaller images per request")
                if not message.get("more_body", False):
                    return body.getvalue()
    except TimeoutError:
        if budget is not None:
            budget.give(body.tell())
        raise RequestError(408, f"the body did not arrive within {limits.read_timeout_s:g} s") from None
    except BaseException:
        if budget is not None:
            budget.give(body.tell())
        raise


def _json_type(headers: dict[str, str]) -> None:
    content_type = headers.get("content-type", "")
    mime, *params = [p.strip().lower() for p in content_type.split(";")]
    charset = next((p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), "utf-8")
    if mime != JSON_TYPE or charset != "utf-8":
        raise RequestError(415, f"Content-Type {content_type or '(none)'!r:.80} is not supported; send the request "
                                f"as {JSON_TYPE} (UTF-8)")


ROUTES = {"/ping": "GET", "/health": "GET", "/version": "GET", "/invocations": "POST", "/v1/models": "GET",
          "/metrics": "GET"}
# KServe's v1 protocol, for its clients: the same request and response bodies under other paths.
_KSERVE_PREDICT = re.compile(r"/v1/models/[^/:]+:predict")
_KSERVE_MODEL = re.compile(r"/v1/models/[^/:]+")


def _route(path: str) -> str | None:
    if path in ROUTES and path != "/v1/models":
        return path
    if _KSERVE_PREDICT.fullmatch(path):
        return "/invocations"
    return "/v1/models" if _KSERVE_MODEL.fullmatch(path) else None


class ScoringApp:
    """The ASGI app: routes, limits, error bodies in MLflow's shape, one log line per request."""

    def __init__(self, model: ServedModel | ModelHolder, limits: ServeLimits, batcher: Batcher | None = None,
                 monitor: Any = None) -> None:
        from tlops.serving.metrics import ServingMonitor

        self.monitor = monitor if monitor is not None else ServingMonitor()  # /metrics, and the prediction log
        if limits.max_aspect_ratio is None:  # read once, at the start: a bad TLOPS_MAX_ASPECT_RATIO is one line
            limits = dataclasses.replace(limits, max_aspect_ratio=_data_aspect_ratio())
        self.holder = model if isinstance(model, ModelHolder) else ModelHolder(model)
        self.limits = limits
        self.batcher = batcher or Batcher()
        self.budget = BodyBudget(max(limits.max_buffered_bytes, limits.max_bytes))  # one request always fits
        # Preprocessed images held at once: a few batches' worth, and one whole request always fits.
        self.slots = ImageSlots(max(limits.max_instances, 4 * self.batcher.max_batch))
        self.pending = 0  # requests past their body: decoding, waiting for the model or predicting

    @property
    def model(self) -> ServedModel:
        return self.holder.current

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan (uvicorn runs with lifespan off) and no websockets
            return
        start = time.perf_counter()
        method, path = scope["method"], scope["path"]
        extra: list[tuple[bytes, bytes]] = []
        try:
            status, body, extra = await self._handle(method, path, scope, receive)
        except RequestError as exc:
            status, body = exc.status, _error(exc.status, str(exc))
        except Exception:  # a fault of the server, not of the request: logged with its traceback, never the payload
            log.exception("%s %s failed", method, path)
            status, body = 500, _error(500, "internal error while predicting; see the server log")
        # Content-Length always, and close after an error: the rest of a refused body is never read.
        if not any(k == b"content-type" for k, _ in extra):
            extra = [(b"content-type", JSON_TYPE.encode()), *extra]
        headers = [(b"content-length", str(len(body)).encode()), *extra]
        if status >= 400:
            headers.append((b"connection", b"close"))
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        seconds = time.perf_counter() - start
        self.monitor.observe(_route(path) or "other", method if method in ("GET", "HEAD", "POST") else "other",
                             status, seconds)
        log.info("%s %s %d %.1f ms", method, path, status, seconds * 1000)

    async def _handle(self, method: str, path: str, scope: Scope,
                      receive: Receive) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        route = _route(path)
        if route is None:
            raise RequestError(404, f"no such path {path!r:.80}; POST /invocations (or /v1/models/NAME:predict), "
                                    "GET /ping, /health or /version")
        if method != ROUTES[route] and not (method == "HEAD" and ROUTES[route] == "GET"):
            raise RequestError(405, f"{path} takes {ROUTES[route]}, not {method}")
        if route in ("/ping", "/health"):
            return 200, b"\n", []
        if route == "/metrics":
            text, content_type = self.monitor.exposition()
            return 200, text, [(b"content-type", content_type.encode())]
        model = self.holder.current  # this request's model, to its end, whatever is swapped in meanwhile
        if route == "/version":  # torch_loaded: whether this process imported torch (an ONNX variant does not)
            info = {**model.info, "torch_loaded": "torch" in sys.modules}
            return 200, json.dumps(info).encode(), model.headers()
        if route == "/v1/models":
            return 200, json.dumps({"name": path.rsplit("/", 1)[1], "ready": True}).encode(), []
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        _json_type(headers)
        self._not_busy()  # before reading a body that could not be served
        body = await read_body(receive, headers, self.limits, self.budget)
        try:
            self._not_busy()
            self.pending += 1
            self.batcher.expect()
            submitted = [False]
            try:
                proba = await self._predict(model, body, submitted)
            finally:
                if not submitted[0]:
                    self.batcher.cancel()
                self.pending -= 1
        finally:
            self.budget.give(len(body))
        # MLflow's response shape, {"predictions": [records]}, written directly: pandas per request cost more than
        # the forward pass of its image in a batch.
        return 200, json.dumps({"predictions": model.predictor.records(proba)}).encode(), model.headers()

    async def _predict(self, model: ServedModel, body: bytes, submitted: list[bool]) -> Any:
        from tlops.data.images import ImageInputError

        # JSON, base64, the image headers and the preprocessing off the event loop, each request on its own;
        # only the forward pass waits for the batch.
        images = await asyncio.to_thread(decode_request, body, self.limits, model.spec)
        sampled = self.monitor.sample(len(images))  # which images the prediction log keeps (None: none)
        held = await self.slots.take(len(images))
        try:
            try:
                x = await asyncio.to_thread(model.predictor.tensors, images)
            except ImageInputError as exc:
                raise RequestError(422, str(exc)) from None
            future = self.batcher.submit(model, x, embed=sampled is not None)
            submitted[0] = True
            result = await asyncio.wrap_future(future)
            proba, features = result if sampled is not None else (result, None)
            self.monitor.served(model.info, images, proba, features, sampled)
            return proba
        finally:
            await self.slots.give(held)

    def _not_busy(self) -> None:
        # Requests still sending their body do not count: a slow upload holds a socket, never the model.
        if self.pending >= self.limits.max_pending:
            raise RequestError(503, f"the server is busy: {self.pending} requests are waiting for the model, its "
                                    "limit; retry shortly")


def _error(status: int, message: str) -> bytes:
    # MLflow's error body: {"error_code": ..., "message": ...}.
    return json.dumps({"error_code": http.HTTPStatus(status).name, "message": message}).encode()


def _raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response, for a connection the server closes before any request of it is read."""
    body = _error(status, message)
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: {JSON_TYPE}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n")
    return (head + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n").encode() + body


class ConnectionGuard:
    """Every open connection, by client address, and who gives way when there are too many.

    A connection is idle from its start or the end of its last response until a whole request head has arrived;
    idle ones cost the event loop nothing but a socket, so they never make the server refuse anyone. A new
    connection past ``max_connections``, or past ``max_per_client`` from its address, closes the connection of
    that pool that has been idle longest (a slow or silent client, or a keep-alive one at rest); only when every
    connection of the pool carries a request in progress is the new one refused, with 503. Members need
    ``peer`` (the client address), ``idle_since`` (``loop.time()``, None while a request is in progress) and
    ``evict()``."""

    def __init__(self, max_connections: int, max_per_client: int, log_every_s: float = 10.0) -> None:
        self.max_connections, self.max_per_client, self.log_every_s = max_connections, max_per_client, log_every_s
        self.open: set[Any] = set()
        self.by_client: dict[str, set[Any]] = {}
        self._counts: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def admit(self, conn: Any) -> str | None:
        """Register ``conn``, closing idle ones to make room; None, or why it is refused (then unregistered)."""
        mine = self.by_client.get(conn.peer, set())
        if len(mine) >= self.max_per_client and not self._evict(mine, "per client"):
            return self._refuse(f"all {len(mine)} connections from {conn.peer}, its limit per client, carry a "
                                "request in progress; retry shortly")
        if len(self.open) >= self.max_connections and not self._evict(self.open, "in all"):
            return self._refuse(f"all {len(self.open)} connections, the server's limit, carry a request in "
                                "progress; retry shortly")
        self.open.add(conn)
        self.by_client.setdefault(conn.peer, set()).add(conn)
        return None

    def forget(self, conn: Any) -> None:
        self.open.discard(conn)
        mine = self.by_client.get(conn.peer)
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self.by_client[conn.peer]

    def _evict(self, pool: set[Any], which: str) -> bool:
        idle = [c for c in pool if c.idle_since is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        self.forget(oldest)
        oldest.evict()
        self._note(f"evict {which}", f"connection limit {which} reached ({self.max_per_client} per client, "
                                     f"{self.max_connections} in all): closed the longest idle connection, "
                                     f"from {oldest.peer}")
        return True

    def _refuse(self, why: str) -> str:
        self._note("refuse", f"refused a connection: {why}")
        return why

    def _note(self, kind: str, line: str) -> None:
        # One log line per kind of event every log_every_s at most, with the count: a flood is not a log flood.
        self._counts[kind] = self._counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(kind, -self.log_every_s) >= self.log_every_s:
            count = self._counts.pop(kind)
            log.warning("%s%s", line, f" ({count} times since the last such line)" if count > 1 else "")
            self._logged[kind] = now


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Send each write at once (TCP_NODELAY). asyncio sets it only on sockets whose protocol number says TCP, and
    ours (:func:`bind`) say 0: uvicorn writes a response's head and body separately, and Nagle's algorithm held the
    body until the client's delayed ACK of the head, 40 ms later, on every keep-alive request."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def guarded_protocol(guard: ConnectionGuard, limits: ServeLimits) -> type:
    """uvicorn's h11 protocol with the guard's limits and a deadline for each request head.

    uvicorn's own keep-alive timeout restarts at every byte, and nothing bounds a connection that never sent
    one: here a whole request head must arrive within ``limits.header_timeout_s`` of the connection's start or
    of the end of its previous response, however it trickles in; a connection that sent part of a head then
    gets 408, a silent one is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        peer = "unknown"
        idle_since: float | None = None
        _deadline: asyncio.TimerHandle | None = None
        _partial = False  # part of a request head has arrived
        _closing = False  # answered and half-closed: what still arrives is dropped

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            _no_delay(transport)
            super().connection_made(transport)
            self.peer = self.client[0] if self.client else "unknown"
            refused = guard.admit(self)
            if refused is not None:
                self._answer_and_close(503, refused)
            else:
                self._idle()

        def data_received(self, data: bytes) -> None:
            if self._closing:
                return
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:
                self._partial = self._partial or bool(data)
            elif self.idle_since is not None:
                self._busy()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request at once
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._idle()

        def connection_lost(self, exc: Exception | None) -> None:
            guard.forget(self)
            self._cancel()
            self.idle_since = None
            super().connection_lost(exc)

        def evict(self) -> None:
            self._cancel()
            self.idle_since = None
            self._closing = True
            self.transport.close()

        def _idle(self) -> None:
            self._cancel()
            self.idle_since, self._partial = self.loop.time(), False
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._head_timeout)

        def _busy(self) -> None:
            self._cancel()
            self.idle_since = None

        def _cancel(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_timeout(self) -> None:
            self._deadline = None
            if self.idle_since is None or self.transport.is_closing():
                return
            guard.forget(self)
            self.idle_since = None
            if self._partial:
                self._answer_and_close(408, f"the request head did not arrive within {limits.header_timeout_s:g} s")
            else:
                self._closing = True
                self.transport.close()

        def _answer_and_close(self, status: int, message: str) -> None:
            # Half-close, and read (dropping it) for a moment before closing: closing at once, while the client
            # still sends, would reset the connection and could destroy the answer before the client reads it.
            self._closing = True
            self.transport.write(_raw_response(status, message))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(1.0, self.transport.close)

    return GuardedH11Protocol


def _connection_limit(wanted: int) -> int:
    """``wanted``, or fewer where the process may not open that many files (sockets are files)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if soft == resource.RLIM_INFINITY else max(16, min(wanted, soft - 64))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so that a port in use fails at once."""
    if not 1 <= port <= 65535:  # getaddrinfo would take 70000 as 70000 % 65536
        raise TlopsError(f"--port {port}: expected a TCP port from 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TlopsError(f"--host {host}: cannot resolve it ({exc.strerror}); use 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TlopsError(f"--port {port}: {host}:{port} is already in use; stop what listens there or pick "
                             "another port") from None
        raise TlopsError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    return sock


def _unreachable(model_uri: str) -> TlopsError:
    import mlflow

    from tlops.tracking import RETRY_ENV, redact

    return TlopsError(f"--model {model_uri}: the MLflow tracking server at {redact(mlflow.get_tracking_uri())} did "
                      f"not answer after {os.environ.get(RETRY_ENV[0], '?')} retries; start it, or point "
                      "MLFLOW_TRACKING_URI at a running one")


def variant_model(model_dir: str | Path, info: dict[str, Any]) -> ServedModel:
    """A compressed serving variant's directory as the served model: ONNX Runtime, without torch."""
    from tlops.serving.compress.runtime import variant_predictor

    predictor, info = variant_predictor(model_dir, info)
    return ServedModel(None, info, spec=predictor.spec, predictor=predictor)


def load_served_model(model_uri: str, version: str | None = None, variant: bool = True) -> ServedModel:
    """Load the pyfunc, or the version's ONNX serving variant when it has one (and ``variant``: torch is then
    never imported); a ``models:/NAME@ALIAS`` URI is pinned to the version the alias names now (or to
    ``version``, already resolved). A local directory holding an ONNX variant's files (``model.onnx``,
    ``preprocess.json``, ``model.json``: a version's ``variants/NAME`` artifact as downloaded, e.g. by KServe's
    storage initializer) is served as it is, without MLflow or torch."""
    if not model_uri.startswith("models:/") and Path(model_uri).is_dir():
        from tlops import __version__
        try:
            return variant_model(model_uri, {"model": model_uri, "tlops": __version__})
        except TlopsError as exc:
            raise TlopsError(f"--model {model_uri}: {exc}; a directory is served as a downloaded ONNX variant "
                             "(variants/NAME of a run), else give models:/NAME@ALIAS") from None
    import mlflow

    from tlops import __version__, tracking
    from tlops.evaluation.evaluate import model_classes
    from tlops.registry.uri import parse_model_uri

    info: dict[str, Any] = {"model": model_uri, "tlops": __version__, "mlflow": mlflow.__version__}
    uri = model_uri
    try:
        if model_uri.startswith("models:/"):
            name, version = (alias_name(model_uri), version) if version is not None else parse_model_uri(model_uri)
            info.update(name=name, version=version)
            uri = f"models:/{name}/{version}"
            from tlops.serving.compress.step import serving_variant_dir

            found = serving_variant_dir(name, version) if variant else None
            if found is not None:
                return variant_model(found, info)
        pyfunc = tracking.load_pyfunc(uri)
    except TlopsError as exc:
        # parse_model_uri says "no such model version" for any registry error: tell an unreachable server apart.
        if exc.__context__ is not None and tracking.unreachable_error(exc.__context__) is not None:
            raise _unreachable(model_uri) from None
        raise
    except Exception as exc:  # whatever loading raises (registry, artifact store, model code): one line, no trace
        if tracking.unreachable_error(exc) is not None:
            raise _unreachable(model_uri) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TlopsError(f"--model {model_uri}: cannot load it ({first:.200}); check the URI with "
                         "'tlops audit --model NAME' and MLFLOW_TRACKING_URI") from None
    info["classes"] = model_classes(pyfunc)  # also refuses a pyfunc that is not a tlops image classifier
    predictor = pyfunc.unwrap_python_model().predictor
    info["preprocess_fingerprint"] = predictor.spec.fingerprint
    return ServedModel(pyfunc, info, spec=predictor.spec, predictor=predictor)


def alias_name(model_uri: str) -> str:
    """NAME of ``models:/NAME@ALIAS`` (or of ``models:/NAME/VERSION``)."""
    rest = model_uri[len("models:/") :]
    return rest.split("@", 1)[0] if "@" in rest else rest.partition("/")[0]


class AliasFollower:
    """Follows ``models:/NAME@ALIAS``: every ``poll_s`` seconds it asks the registry which version the alias names;
    when that changed (a promotion or a rollback), it loads that version in the background, then swaps it in
    (:meth:`ModelHolder.swap`). Requests in progress finish on the model they started with; none waits for the
    load and none is refused. A registry that does not answer, or a version that cannot be loaded, leaves the
    current version serving; the next poll tries again (one warning per distinct problem)."""

    def __init__(self, holder: ModelHolder, model_uri: str, poll_s: float, variant: bool = True) -> None:
        self.holder, self.model_uri, self.poll_s, self.variant = holder, model_uri, poll_s, variant
        self._stop = threading.Event()
        self._last_problem = ""
        self._thread = threading.Thread(target=self._run, name="tlops-alias-follower", daemon=True)

    def start(self) -> AliasFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> bool:
        """One look at the alias; True when another version was swapped in."""
        from tlops.registry.uri import parse_model_uri

        current = self.holder.current
        try:
            _name, version = parse_model_uri(self.model_uri)
            if version == current.version:
                self._last_problem = ""
                return False
            started = time.perf_counter()
            model = load_served_model(self.model_uri, version, self.variant)
        except Exception as exc:  # TlopsError or whatever else: the served version stays
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if problem != self._last_problem:
                log.warning("following %s: %s; still serving version %s, trying again every %g s", self.model_uri,
                            problem[:300], current.version, self.poll_s)
                self._last_problem = problem
            return False
        self.holder.swap(model)
        self._last_problem = ""
        log.info("%s now names version %s: serving it (loaded in %.1f s), was version %s", self.model_uri,
                 version, time.perf_counter() - started, current.version)
        return True


def _log_to_stderr() -> None:
    # One line per event on stderr, timestamped; the rest of tlops and the libraries keep their own settings.
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 8080, limits: ServeLimits | None = None,
          threads: int = 1, graceful_s: int = 10, max_batch: int = 32, batch_window_ms: float = 5.0,
          poll_s: float = 10.0, variant: bool = True, sample_rate: float = 0.0, log_uri: str | None = None,
          log_images: bool = False, batch_workers: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT; in-flight requests get ``graceful_s`` seconds to finish.

    ``threads``: torch CPU threads (0: torch's default, every core of the machine). One is the default, as the
    gate measures latency: torch does not see a container's CPU limit, and more threads than cores stall.
    ``max_batch``, ``batch_window_ms``, ``batch_workers``: dynamic batching (:class:`Batcher`; a ``max_batch`` of
    1 turns it off; ``batch_workers`` forward passes at once, each on ``threads`` threads, by default two with
    batching on, one with it off: a server with one lock). ``poll_s``: for a
    ``models:/NAME@ALIAS`` URI, how often the alias is looked up, a new version swapped in (0: never).
    ``variant``: serve a version's ONNX serving variant when it has one (False: its PyTorch model).
    ``sample_rate``, ``log_uri``, ``log_images``: the prediction log (:mod:`tlops.serving.predlog`; 0: none)."""
    import uvicorn

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in a server log
    _log_to_stderr()
    limits = limits or ServeLimits()
    if limits.max_bytes < 1 or limits.max_instances < 1:
        raise TlopsError("--max-bytes and --max-instances must be at least 1")
    if threads < 0:
        raise TlopsError(f"--threads {threads}: expected 0 (torch's default) or a number of threads")
    if max_batch < 1:
        raise TlopsError(f"--max-batch {max_batch}: expected a number of images, at least 1 (1: no batching)")
    if not 0 <= batch_window_ms <= 1000:
        raise TlopsError(f"--batch-window-ms {batch_window_ms:g}: expected milliseconds from 0 to 1000")
    if poll_s < 0:
        raise TlopsError(f"--poll-s {poll_s:g}: expected seconds between looks at the alias (0: never)")
    from tlops.serving.metrics import ServingMonitor

    monitor = ServingMonitor.create(sample_rate, log_uri, log_images)  # checks its options before the model loads
    sock = bind(host, port)
    holder = ModelHolder(load_served_model(model_uri, variant=variant))
    model = holder.current
    used_threads = 1  # an ONNX variant (tlops.compress.runtime) runs on one thread of its own, without torch
    if model.info.get("runtime") != "onnxruntime":
        import torch

        if threads:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
    follower = None
    if poll_s and model_uri.startswith("models:/") and "@" in model_uri:
        follower = AliasFollower(holder, model_uri, poll_s, variant).start()
    if batch_workers is None:
        batch_workers = 2 if max_batch > 1 else 1
    if batch_workers < 1:
        raise TlopsError(f"--batch-workers {batch_workers}: expected a number of forward passes at once, at least 1")
    batcher = Batcher(max_batch, batch_window_ms / 1000, batch_workers)
    # No uvicorn limit_concurrency: it counts idle connections, so 64 silent sockets made every client get 503.
    # The guard bounds connections, the app the requests past their body and the bytes held.
    max_connections = _connection_limit(limits.max_connections)
    guard = ConnectionGuard(max_connections, min(limits.max_connections_per_client, max_connections))
    app = ScoringApp(holder, limits, batcher, monitor)
    config = uvicorn.Config(app, http=guarded_protocol(guard, limits), ws="none",
                            log_config=None, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=graceful_s, limit_concurrency=None,
                            timeout_keep_alive=limits.keep_alive_s, lifespan="off")
    server = uvicorn.Server(config)
    stopped_by: list[str] = []
    # uvicorn catches SIGTERM/SIGINT, shuts down gracefully, then raises the signal again for the handler that
    # was there before: this one, so that a graceful stop ends with exit 0 rather than death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signal.Signals(signum).name))
    where = "loopback only" if host in ("127.0.0.1", "localhost", "::1") else "every client that can reach it"
    log.info("serving %s%s on http://%s:%d (%s): POST /invocations, GET /ping /health /version; "
             "limits %d bytes, %d instances, %d pixels per request; %d connections, %d per client, request heads "
             "within %g s; %d threads; batches of up to %d images within %g ms, %d at once; %s", model_uri,
             f" (version {model.info['version']})" if "version" in model.info else "", host, port, where,
             limits.max_bytes, limits.max_instances, limits.max_request_pixels, guard.max_connections,
             guard.max_per_client, limits.header_timeout_s, used_threads, batcher.max_batch,
             batch_window_ms, batcher.workers,
             f"following the alias every {poll_s:g} s" if follower else "version pinned")
    if monitor.log is not None:
        log.info("prediction log: %g of the images to %s%s; metrics at GET /metrics", sample_rate, log_uri,
                 ", image bytes kept" if log_images else "")
    try:
        server.run(sockets=[sock])
    finally:
        if follower is not None:
            follower.stop()
        monitor.close()  # what the prediction log still holds is written
    log.info("answered %d requests in %d forward passes (%.1f images per pass)", batcher.requests, batcher.batches,
             batcher.images / max(1, batcher.batches))
    if monitor.log is not None:
        log.info("prediction log: %d records written, %d dropped (queue full %d, store failed %d)",
                 monitor.log.written, sum(monitor.log.dropped.values()), monitor.log.dropped["queue_full"],
                 monitor.log.dropped["store_error"])
    log.info("stopped%s", f" by {stopped_by[0]}" if stopped_by else "")
