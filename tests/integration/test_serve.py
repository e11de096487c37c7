"""`tlops serve` as a real process on loopback, serving the champion of a real `mlflow server` registry:
real images get the predictions of the offline evaluation, bad requests get a 4xx with a message, and the
server keeps answering; SIGTERM stops it cleanly."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import free_port, run_cli
from tests.helpers.registry import log_model_run, new_version, use_store

pytestmark = pytest.mark.integration
NAME = "serve-it"
MAX_BYTES = 1_000_000
TIMEOUT = 30  # seconds, for any one HTTP exchange


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    png = _png(np.zeros((1, 1, 3), dtype=np.uint8))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


@pytest.fixture(scope="module")
def images(tiny_digits: Path) -> dict[str, bytes]:
    """Real files: two digit scans per class as exported, and scikit-image's photo of a cat as PNG."""
    from skimage import data

    picked = {f"{d.name}/{p.name}": p.read_bytes()
              for d in sorted(tiny_digits.iterdir()) for p in sorted(d.glob("*.png"))[:2]}
    return {**picked, "chelsea.png": _png(data.chelsea())}


@contextlib.contextmanager
def running_serve(mlflow_server: str, model_dir: Path, name: str, root: Path, *args: str) -> Iterator[dict]:
    """``model_dir`` registered as ``name`` and aliased champion, and `tlops serve` on it as a subprocess (with
    ``args``), answering /ping; yields its port, process, log, version, environment and working directory."""
    from tlops import registry

    _run, model_uri = log_model_run(use_store(mlflow_server, experiment=name), model_dir)
    version = new_version(model_uri, name)
    registry.client().set_registered_model_alias(name, "champion", version)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    log_path = root / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tlops", "serve", "--model", f"models:/{name}@champion", "--port", str(port),
             *args], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _status(port, "GET", "/ping") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tlops serve did not start (exit {proc.poll()}): {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"port": port, "proc": proc, "log": log_path, "version": version, "env": env, "root": root}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(mlflow_server: str, tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The tiny model registered and aliased champion, and `tlops serve` on it as a subprocess."""
    with running_serve(mlflow_server, tiny_models["good"], NAME, tmp_path_factory.mktemp("serve"),
                       "--max-bytes", str(MAX_BYTES), "--max-instances", "16") as started:
        yield started


def _status(port: int, method: str, path: str) -> int | None:
    try:
        return _request(port, method, path)[0]
    except OSError:
        return None


def _request(port: int, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw.strip() else None
    finally:
        conn.close()


def _invoke(port: int, payload: Any) -> tuple[int, Any]:
    return _request(port, "POST", "/invocations", json.dumps(payload).encode())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _payloads(files: list[bytes]) -> dict[str, Any]:
    """The same images in each of MLflow's four JSON input formats, and TF Serving's {"b64": ...} objects."""
    b64 = [_b64(f) for f in files]
    return {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}},
        "dataframe_records": {"dataframe_records": [{"image": b} for b in b64]},
        "instances": {"instances": [{"image": b} for b in b64]},
        "inputs": {"inputs": {"image": b64}},
        "instances of b64 objects": {"instances": [{"b64": b} for b in b64]},
    }


def test_served_predictions_equal_the_offline_evaluation(server: dict, images: dict[str, bytes],
                                                         mlflow_server: str) -> None:
    import mlflow
    from mlflow.pyfunc import scoring_server

    from tlops.evaluation.evaluate import predict

    use_store(mlflow_server)
    files = list(images.values())
    offline_model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    offline = predict(offline_model, files)
    assert len(set(offline.labels)) > 1  # the digits are told apart: a meaningful comparison
    # MLflow's own scoring server function, on the same requests: the pyfunc speaks MLflow's protocol.
    schema = offline_model.metadata.get_input_schema()
    for fmt, payload in _payloads(files).items():
        status, body = _invoke(server["port"], payload)
        assert status == 200, (fmt, body)
        served = body["predictions"]
        assert [p["label"] for p in served] == offline.labels, fmt
        # Within the serving parity tolerance: the server folds BatchNorm into the convolutions (float32 rounding,
        # measured up to 1.1e-5 on the demo digits; the same labels above).
        np.testing.assert_allclose([p["probabilities"] for p in served], offline.proba, rtol=0, atol=1e-4)
        assert all(abs(p["score"] - max(p["probabilities"])) < 1e-12 for p in served)
        if fmt in scoring_server.SUPPORTED_FORMATS:  # {"b64": ...} objects are not MLflow's
            mlflow_out = scoring_server.invocations(json.dumps(payload), "application/json", offline_model, schema)
            assert mlflow_out.status == 200, (fmt, mlflow_out.response[:300])
            assert [p["label"] for p in json.loads(mlflow_out.response)["predictions"]] == offline.labels, fmt
    # KServe's v1 protocol: the same bodies under its paths.
    status, body = _request(server["port"], "POST", f"/v1/models/{NAME}:predict",
                            json.dumps(_payloads(files)["instances"]).encode())
    assert status == 200 and [p["label"] for p in body["predictions"]] == offline.labels
    assert _request(server["port"], "GET", f"/v1/models/{NAME}") == (200, {"name": NAME, "ready": True})
    status, version = _request(server["port"], "GET", "/version")
    assert status == 200 and version["version"] == server["version"] and version["classes"] == ["0", "1", "7"]


@pytest.mark.parametrize(("payload", "message"), [
    ({"dataframe_split": {"columns": ["path"], "data": [["x"]]}}, "no 'image' column"),
    ({"dataframe_split": {"columns": ["image", "id"], "data": [["x", 1], ["y"]]}}, "instance 1: a dataframe_split row"),
    ({"inputs": []}, "no instances"),
    ({"inputs": {"image": ["eA=="]}, "instances": []}, "exactly one of"),
    ({"instances": [7]}, "instance 0: no 'image' field"),
    ({"dataframe_records": [{"image": 7}]}, "instance 0: 'image' must be base64 text, not int"),
    ({"inputs": {"image": [""]}}, "instance 0: 'image' is empty"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_request_shapes_refused_with_the_instance_and_the_fix(payload: dict | bytes, message: str) -> None:
    from tlops.serving.server import RequestError, ServeLimits, decode_request

    with pytest.raises(RequestError, match=message) as refused:
        decode_request(payload if isinstance(payload, bytes) else json.dumps(payload).encode(), ServeLimits())
    assert 400 <= refused.value.status < 500


def _raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> tuple[int, dict, int]:
    """Send the headers, then body chunks until the server answers; returns (status, JSON body, body bytes sent)."""
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0.05)[0]:
                break  # the server has answered: a client stops sending
            sock.sendall(chunk)
            sent += len(chunk)
        try:
            while more := sock.recv(65536):
                reply += more
        except ConnectionResetError:  # the rest of the body was refused unread; the answer came before
            pass
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2]), sent


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_lives_on(server: dict,
                                                                       images: dict[str, bytes]) -> None:
    port = server["port"]
    digit, photo = next(v for k, v in images.items() if k.startswith("7/")), images["chelsea.png"]
    text = b"this is a text file, not a picture\n" * 3
    status, before = _invoke(port, {"inputs": {"image": [_b64(digit)]}})
    assert status == 200

    # Oversized, declared: refused from the headers, before the body is sent (Expect: 100-continue).
    head = (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10 * MAX_BYTES}\r\nExpect: 100-continue\r\n\r\n").encode()
    status, body, sent = _raw_exchange(port, head, [])
    assert status == 413 and "--max-bytes" in body["message"], (status, body)
    # Oversized, streamed without a length: cut off once past the limit, not read to its end.
    head = (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
    status, body, sent = _raw_exchange(port, head, [chunk] * 160)
    assert status == 413 and "exceeds the limit" in body["message"] and sent < 3 * MAX_BYTES, (status, body, sent)

    truncated = photo[: len(photo) // 2]
    cases = [
        ({"inputs": {"image": [_b64(digit), _b64(text)]}}, 422, ["instance 1", "not an image",
                                                                 "send the bytes of an image file"]),
        ({"dataframe_split": {"columns": ["image"], "data": [[_b64(truncated)]]}}, 422,
         ["instance 0", "not a readable image"]),
        ({"dataframe_records": [{"image": "%%% not base64"}]}, 422, ["instance 0", "not valid base64"]),
        ({"inputs": {"image": [_b64(digit), _b64(_png_declaring(100_000, 100_000))]}}, 422,
         ["instance 1", "10000000000 pixels exceeds", "not decoded"]),
        ({"inputs": {"image": [_b64(_png_declaring(10_000, 10_000))]}}, 422,
         ["instance 0", "10000x10000 = 100000000 pixels exceeds", "not decoded"]),
        ({"instances": [{"img": _b64(digit)}]}, 400, ["instance 0", "no 'image' field"]),
        ({"inputs": {"image": [_b64(digit)] * 17}}, 413, ["17 instances", "--max-instances"]),
        ({"predict": [_b64(digit)]}, 400, ["dataframe_split", "inputs"]),
    ]
    for payload, expected, words in cases:
        status, body = _invoke(port, payload)
        assert status == expected and all(w in body["message"] for w in words), (payload.keys(), status, body)
    status, body = _request(port, "POST", "/invocations", b'{"inputs": {"image": [')
    assert status == 400 and "not valid JSON" in body["message"]
    status, body = _request(port, "POST", "/invocations", b"image\n" + text, content_type="text/csv")
    assert status == 415 and "application/json" in body["message"]

    assert server["proc"].poll() is None
    assert _status(port, "GET", "/ping") == 200
    status, after = _invoke(port, {"inputs": {"image": [_b64(digit)]}})
    assert status == 200 and after == before
    log = server["log"].read_text()
    assert "POST /invocations 413" in log and "POST /invocations 422" in log and "Traceback" not in log
    assert _b64(text)[:40] not in log and _b64(digit)[:40] not in log  # requests are logged, payloads never


def test_cli_refuses_a_port_in_use_a_missing_model_and_a_tracking_server_down(server: dict) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    runs = {"in use": (["--model", f"models:/{NAME}@champion", "--port", str(server["port"])], {}),
            "missing": (["--model", "models:/no-such-model@champion", "--port", str(free_port())], {}),
            "down": (["--model", f"models:/{NAME}@champion", "--port", str(free_port())],
                     {"MLFLOW_TRACKING_URI": down, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})}
    with ThreadPoolExecutor(3) as pool:  # the CLI processes at once: each spends its time importing
        done = dict(zip(runs, pool.map(lambda run: run_cli("serve", *run[0], cwd=server["root"],
                                                           env={**server["env"], **run[1]}, timeout=120),
                                       runs.values()), strict=True))
    port = server["port"]
    expected = {
        "in use": f"error: --port {port}: 127.0.0.1:{port} is already in use; stop what listens there or pick "
                  "another port",
        "missing": "error: --model models:/no-such-model@champion: registered model 'no-such-model' does not exist "
                   "in the MLflow registry",
        "down": f"error: --model models:/{NAME}@champion: the MLflow tracking server at {down} did not answer after "
                "0 retries; start it, or point MLFLOW_TRACKING_URI at a running one",
    }
    for case, line in expected.items():
        assert (done[case].returncode, done[case].stderr.strip()) == (2, line), (case, done[case].stderr)


def test_sigterm_finishes_the_request_in_flight_then_exits_0(server: dict, images: dict[str, bytes]) -> None:
    proc, port = server["proc"], server["port"]
    digit = next(v for k, v in images.items() if k.startswith("0/"))
    body = json.dumps({"inputs": {"image": [_b64(digit)]}}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        # "100 Continue" comes once the server reads the body: from then on the request is in flight.
        sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _status(port, "GET", "/ping") is not None:  # no new connections once shutting down
            assert time.monotonic() < deadline, "still accepting connections 20 s after SIGTERM"
            time.sleep(0.1)
        sock.sendall(body)
        reply = b""
        while more := sock.recv(65536):
            reply += more
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"predictions"' in reply, reply[:300]
    assert proc.wait(timeout=30) == 0
    assert server["log"].read_text().rstrip().endswith("stopped by SIGTERM")
