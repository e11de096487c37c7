"""Storage for real: the pipeline with its data on S3 and MLflow as a real `mlflow server` whose artifacts go
to S3, the S3 endpoint being moto's server mode; every process on 127.0.0.1.

The server proxies artifacts (``--artifacts-destination s3://...``), as the cluster's MLflow Deployment in
infra/ does, so the pipeline needs S3 credentials for its data only, never for the tracking store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, running_mlflow_server, write_config
from tests.helpers.registry import restored_mlflow_uris
from tests.integration.conftest import S3_SECRET

pytestmark = pytest.mark.integration
ARTIFACT_BUCKET = "mlflow"
ARTIFACT_PREFIX = "mlartifacts"
MODEL_NAME = "s3-digits"


@pytest.fixture(scope="module")
def s3_mlflow_server(s3_endpoint: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with a SQLite backend and its artifacts proxied to s3://mlflow/mlartifacts on moto."""
    from tlops.data.storage import s3_client

    s3_client().create_bucket(Bucket=ARTIFACT_BUCKET)
    root = tmp_path_factory.mktemp("mlflow-s3")
    # The server's S3 client: boto3 honours AWS_ENDPOINT_URL; MLflow's own variable is set too, as on a cluster.
    env = {**s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint["AWS_ENDPOINT_URL"]}
    with restored_mlflow_uris(), running_mlflow_server(root, f"s3://{ARTIFACT_BUCKET}/{ARTIFACT_PREFIX}", env) as url:
        yield url
    # After the server stopped: the credentials it used never reached its log or its database.
    for path in (root / "server.log", root / "mlflow.db"):
        assert S3_SECRET.encode() not in path.read_bytes(), path


def _artifact_keys() -> list[str]:
    from tlops.data.storage import s3_client

    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=ARTIFACT_BUCKET, Prefix=ARTIFACT_PREFIX)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# The one whole pipeline of the default run against real storage services: it stands for the pipeline tests of
# test_s3.py (data from s3://) and test_mlflow_server.py (a tracking server), which are marked slow.
def test_pipeline_with_s3_data_and_mlflow_artifacts_on_s3(bucket: str, s3_endpoint: dict[str, str],
                                                          s3_mlflow_server: str, tiny_digits: Path,
                                                          tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    from tlops.data.storage import list_s3, materialize

    # Every step in a fresh work directory of its own, removed when it ends, as a pod's: a step that reads a file
    # another step left on its disk (outside the declared outputs) fails here as it would on a cluster.
    pods = tmp_path / "pods"
    pods.mkdir()
    state = "s3://images/state"
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops", registry__model_name=MODEL_NAME, state_uri=state)
    result = run_cli("run", "--config", str(cfg), "--data", bucket, cwd=tmp_path,
                     env={**s3_endpoint, "MLFLOW_TRACKING_URI": s3_mlflow_server, "TLOPS_PRIVATE_WORKDIR": str(pods)})
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert bucket in result.stdout and s3_mlflow_server in result.stdout and "PROMOTE" in result.stdout
    assert not (tmp_path / ".tlops" / "mlflow.db").exists()
    assert not list(pods.iterdir())  # every step's disk is gone
    assert not (tmp_path / ".tlops" / "cache").exists()  # nothing was shared through the run's work dir
    # The feature cache outlives the steps: it is in the object store.
    assert [rel for rel, _, _ in list_s3(state) if rel.startswith("features/")]

    mlflow.set_tracking_uri(s3_mlflow_server)
    mlflow.set_registry_uri(s3_mlflow_server)
    champion = mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    # MLflow 3 registers a logged model: the version's source is models:/<model id>, its files live under
    # <artifact root>/<experiment>/models/<model id>/artifacts/.
    run_id, model_id = champion.tags["mlflow.run_id"], champion.source.removeprefix("models:/")
    assert model_id.startswith("m-"), champion.source
    assert str(champion.version) == "1" and champion.tags["parity"] == "pass"
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags["preprocess.fingerprint"] == champion.tags["preprocess.fingerprint"]

    # The run's artifacts and the registered model's files are objects in the moto bucket.
    keys = _artifact_keys()
    run_keys = [k for k in keys if f"/{run_id}/artifacts/" in k]
    assert {k.split(f"/{run_id}/artifacts/", 1)[1].split("/", 1)[0] for k in run_keys} >= {
        "config", "validation", "preprocess", "evaluation", "gate"}
    model_files = [k for k in keys if k.endswith("/MLmodel") and f"/{model_id}/" in k]
    assert len(model_files) == 1, (model_id, [k for k in keys if k.endswith("/MLmodel")])
    model_prefix = model_files[0].rsplit("/", 1)[0]
    assert any(k.startswith(model_prefix + "/") and k.endswith((".pt", ".pth", ".safetensors")) for k in keys), \
        [k for k in keys if k.startswith(model_prefix)]
    # No S3 secret in any object the run stored.
    from tlops.data.storage import s3_client

    for key in run_keys:
        body = s3_client().get_object(Bucket=ARTIFACT_BUCKET, Key=key)["Body"].read()
        assert S3_SECRET.encode() not in body, key

    # The registered version loads back through the server (models:/NAME@champion) and predicts the same as a
    # copy fetched from the bucket directly, without MLflow in between.
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    direct = mlflow.pyfunc.load_model(str(materialize(f"s3://{ARTIFACT_BUCKET}/{model_prefix}", tmp_path / "direct")))
    images = sorted(tiny_digits.rglob("*.png"))[::6]
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images]})
    got, expected = served.predict(frame), direct.predict(frame)
    assert list(got["label"]) == list(expected["label"])
    truth = [p.parent.name for p in images]
    accuracy = sum(str(a) == b for a, b in zip(got["label"], truth, strict=True)) / len(images)
    assert accuracy >= 0.8, (accuracy, list(got["label"]), truth)


def test_minio_bucket_job_creates_the_configured_buckets(s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    """infra/minio's bucket Job, its script and environment taken from the rendered local overlay, run against
    the S3 endpoint twice: it creates the data and artifact buckets, and a second run is harmless."""
    import subprocess
    import sys

    from tests.infra.conftest import INFRA, render, resolve_env
    from tlops.data.storage import s3_client

    objects = {(d["kind"], d["metadata"]["name"]): d for d in render(INFRA / "overlays" / "local")}
    (container,) = objects[("Job", "tlops-minio-buckets")]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    env = resolve_env(container, objects, s3_endpoint)
    wanted = {uri.removeprefix("s3://").split("/", 1)[0] for uri in (env["TLOPS_DATA_URI"],
                                                                     env["MLFLOW_ARTIFACTS_DESTINATION"])}
    assert wanted == {"tlops-data", "tlops-mlflow"}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", container["args"][0]], env={**s3_endpoint, **env}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert all(f"bucket {b}" in done.stdout for b in wanted), done.stdout
    assert wanted <= {b["Name"] for b in s3_client().list_buckets()["Buckets"]}
