"""The stores in containers as infra/ deploys them (infra/overlays/podman through `podman kube play`): the MLflow
tracking server answers, an artifact logged through it from this machine is read back through it and lies in
the S3 bucket, the run is in PostgreSQL, and a container on the stores' network reaches them by Service name."""

from __future__ import annotations

import os
import subprocess
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.containers

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_mlflow_answers_health(stores: Any) -> None:
    with urllib.request.urlopen(stores.mlflow_url + "/health", timeout=10) as response:
        assert response.status == 200


def test_artifact_round_trip_through_the_server_lands_in_the_bucket(stores: Any, stores_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    import boto3
    import mlflow
    import psycopg
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(stores.mlflow_url)
    payload = f"hello from the host {uuid.uuid4().hex}\n"
    source = tmp_path / "hello.txt"
    source.write_text(payload)
    mlflow.set_experiment(f"containers-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(source), "probe")
        mlflow.log_metric("answer", 42.0)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # proxied, no host

    back = MlflowClient().download_artifacts(run.info.run_id, "probe/hello.txt", str(tmp_path / "back"))
    assert Path(back).read_text() == payload

    s3 = boto3.client("s3", endpoint_url=stores.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=stores.aws_access_key_id,
                      aws_secret_access_key=stores.aws_secret_access_key)
    prefix = stores.artifacts_destination.removeprefix(f"s3://{stores.artifact_bucket}/").rstrip("/")
    key = f"{prefix}/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}/probe/hello.txt"
    assert s3.get_object(Bucket=stores.artifact_bucket, Key=key)["Body"].read().decode() == payload

    with psycopg.connect(host=stores.postgres_host, port=stores.postgres_port, user=stores.postgres_user,
                         password=stores.postgres_password, dbname=stores.postgres_db, connect_timeout=10) as conn:
        row = conn.execute("select status from runs where run_uuid = %s", (run.info.run_id,)).fetchone()
    assert row == ("FINISHED",)


def test_presigned_downloads_name_the_in_cluster_s3_host(stores: Any, stores_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """Why host_env() turns MLflow's proxy multipart switches off: the server hands out presigned URLs for the
    S3 endpoint it sees, a name only the stores' network resolves."""
    import mlflow
    import requests

    mlflow.set_tracking_uri(stores.mlflow_url)
    source = tmp_path / "p.txt"
    source.write_text("x")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(source))
    path = run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
    response = requests.get(f"{stores.mlflow_url}/api/2.0/mlflow-artifacts/presigned/{path}/p.txt", timeout=30)
    assert response.status_code == 200, response.text
    host = urlparse(response.json()["url"]).hostname
    assert host in stores.hosts and host.startswith("tlops-minio"), host
    info = requests.get(f"{stores.mlflow_url}/api/3.0/mlflow/server-info", timeout=30).json()
    assert info.get("multipart_downloads_enabled") is True  # what an MLflow client without the switch follows
    assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"


def test_a_container_on_the_network_reaches_the_stores_by_service_name(stores: Any, run_in_image: Run) -> None:
    """The project image on the stores' network, read-only, with the pods' environment (no proxy switches, as
    the pods run): MLflow at http://tlops-mlflow:5000, artifacts through it (and presigned downloads from
    tlops-minio.tlops.svc.cluster.local, which resolves here), the bucket itself at tlops-minio:9000."""
    script = (
        "import os, pathlib, tempfile, boto3, mlflow\n"
        "from mlflow.tracking import MlflowClient\n"
        "src = pathlib.Path(tempfile.mkdtemp()) / 'in.txt'; src.write_text('from a pod')\n"
        "mlflow.set_experiment('containers-in-network')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_artifact(str(src))\n"
        "back = MlflowClient().download_artifacts(run.info.run_id, 'in.txt', tempfile.mkdtemp())\n"
        "assert pathlib.Path(back).read_text() == 'from a pod'\n"
        "buckets = [b['Name'] for b in boto3.client('s3', region_name='us-east-1').list_buckets()['Buckets']]\n"
        "print(os.environ['MLFLOW_TRACKING_URI'], run.info.run_id, sorted(buckets))\n"
    )
    proc = run_in_image("python", "-c", script, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri, run_id, buckets = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert uri == "http://tlops-mlflow:5000"
    assert stores.artifact_bucket in buckets and stores.data_bucket in buckets
    assert len(run_id) == 32
