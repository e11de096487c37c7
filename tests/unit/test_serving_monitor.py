"""The serving app's /metrics and its prediction log, on a real model and real digits: the metrics count what
was answered, the log keeps what was predicted with the embedding the head saw, from the same forward pass."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tlops.serving.metrics import ServingMonitor
from tlops.serving.predlog import PredictionLog, read_log


def _call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through the ASGI app, as uvicorn would make it."""
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    asyncio.run(app({"type": "http", "method": method, "path": path, "headers": headers}, receive, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path]) -> Any:
    from tlops.serving.pyfunc import Predictor, load_model_dir
    from tlops.serving.server import ServedModel

    model, spec, classes = load_model_dir(tiny_models["good"])
    info = {"name": "digits", "version": "4", "classes": classes, "preprocess_fingerprint": spec.fingerprint}
    return ServedModel(None, info, spec=spec, predictor=Predictor(model, spec, classes))


def test_metrics_count_requests_errors_and_classes_and_the_log_keeps_embeddings(
        served: Any, tiny_digits: Path, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tlops.serving.server import Batcher, ScoringApp, ServeLimits

    files = [p.read_bytes() for p in sorted(tiny_digits.rglob("*.png"))[::10]]
    monitor = ServingMonitor(1.0, PredictionLog(str(tmp_path / "log"), batch_records=100, flush_s=60), seed=0)
    app = ScoringApp(served, ServeLimits(), Batcher(8, 0.0), monitor)
    payload = json.dumps({"instances": [{"image": base64.b64encode(f).decode()} for f in files]}).encode()
    status, _headers, body = _call(app, "POST", "/invocations", payload)
    assert status == 200
    labels = [p["label"] for p in json.loads(body)["predictions"]]
    assert _call(app, "POST", "/invocations", b"{not json")[0] == 400
    assert _call(app, "GET", "/nowhere")[0] == 404

    status, headers, text = _call(app, "GET", "/metrics")
    assert status == 200 and headers[b"content-type"].startswith(b"text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    assert samples[("tlops_requests_total", (("method", "POST"), ("route", "/invocations"), ("status", "200")))] == 1
    assert samples[("tlops_request_errors_total", (("status", "400"),))] == 1
    assert samples[("tlops_request_errors_total", (("status", "404"),))] == 1
    assert samples[("tlops_request_duration_seconds_count", (("route", "/invocations"),))] == 2
    per_class = {dict(k[1])["class"]: v for k, v in samples.items() if k[0] == "tlops_predictions_total"}
    assert per_class == {c: labels.count(c) for c in set(labels)}
    assert samples[("tlops_prediction_log_records_dropped_total", (("reason", "queue_full"),))] == 0

    monitor.close()
    frame = read_log(str(tmp_path / "log"))
    assert sorted(frame["predicted"]) == sorted(labels) and len(frame) == len(files)
    # The embedding is the backbone's output for the served input: the head applied to it gives the answer.
    x = served.predictor.tensors(files)
    with torch.inference_mode():
        features = served.predictor.model.backbone(x).numpy()
    import hashlib

    order = [next(i for i, f in enumerate(files) if hashlib.sha256(f).hexdigest() == sha)
             for sha in frame["image_sha256"]]
    np.testing.assert_allclose(np.stack(frame["embedding"].to_numpy()), features[order], rtol=1e-4, atol=1e-4)
    _status, _h, text = _call(app, "GET", "/metrics")
    assert b"tlops_prediction_log_records_written_total " + str(float(len(files))).encode() in text


def test_sampling_off_logs_nothing_and_asks_for_no_embedding(served: Any, tiny_digits: Path) -> None:
    monitor = ServingMonitor(0.0, None)
    assert monitor.sample(10) is None and monitor.log is None
    half = ServingMonitor(0.5, PredictionLog("/nonexistent-never-written", flush_s=60), seed=1)
    masks = [half.sample(1) for _ in range(400)]
    share = sum(m is not None for m in masks) / len(masks)
    assert 0.4 < share < 0.6
    half.log.close() if half.log else None  # nothing was offered: nothing written


def test_proba_embed_is_the_forward_pass(served: Any, tiny_digits: Path) -> None:
    files = [p.read_bytes() for p in sorted(tiny_digits.rglob("*.png"))[:7]]
    x = served.predictor.tensors(files)
    proba, features = served.predictor.proba_embed(x, 4)
    np.testing.assert_allclose(proba, served.predictor.proba(x, 4), rtol=0, atol=1e-6)
    assert features.shape == (7, served.predictor.model.head.in_features)


def test_bad_monitoring_options_are_one_line() -> None:
    from tlops.errors import TlopsError

    with pytest.raises(TlopsError, match="--sample-rate 1.5"):
        ServingMonitor.create(1.5, "x")
    with pytest.raises(TlopsError, match="needs --log-uri"):
        ServingMonitor.create(0.1, None)
