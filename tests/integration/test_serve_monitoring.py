"""`tlops serve` with its prediction log in S3 (moto's server) and Prometheus metrics: what it answered is
counted at /metrics, and after SIGTERM every sampled image is in the log, one Parquet part per batch."""

from __future__ import annotations

import base64
import http.client
import json
import signal
from pathlib import Path

import pytest

from tests.integration.test_serve import running_serve

pytestmark = pytest.mark.integration


def test_served_images_reach_the_s3_log_and_the_metrics(mlflow_server: str, tiny_models: dict, tiny_digits: Path,
                                                        s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tlops.data.storage import s3_client
    from tlops.serving.predlog import read_log

    s3_client().create_bucket(Bucket="predictions")
    files = [p.read_bytes() for p in sorted(tiny_digits.rglob("*.png"))[::9]]
    with running_serve(mlflow_server, tiny_models["good"], "serve-monitored", tmp_path, "--sample-rate", "1",
                       "--log-uri", "s3://predictions/digits") as started:
        labels = []
        for i in range(0, len(files), 3):
            conn = http.client.HTTPConnection("127.0.0.1", started["port"], timeout=30)
            body = json.dumps({"instances": [{"image": base64.b64encode(f).decode()} for f in files[i : i + 3]]})
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            labels += [p["label"] for p in json.loads(resp.read())["predictions"]]
            conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", started["port"], timeout=30)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
        started["proc"].send_signal(signal.SIGTERM)
        assert started["proc"].wait(timeout=60) == 0
    served = {s.labels["class"]: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
              if s.name == "tlops_predictions_total"}
    assert served == {c: labels.count(c) for c in set(labels)}
    assert "tlops_request_duration_seconds_bucket" in metrics
    frame = read_log("s3://predictions/digits")
    assert len(frame) == len(files) and sorted(frame["predicted"]) == sorted(labels)
    assert set(frame["model_name"]) == {"serve-monitored"} and set(frame["model_version"]) == {started["version"]}
    assert len(frame["embedding"].iloc[0]) == 1280  # EfficientNet-Lite0's features
    assert f"prediction log: {len(files)} records written, 0 dropped" in started["log"].read_text()
