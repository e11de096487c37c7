"""The MLflow tracking server as the rendered overlays run it, its command line and environment parsed by
`mlflow server`'s own option parser: PostgreSQL through psycopg, artifacts proxied to S3 (so no client, in the
cluster or outside it, is ever sent to the bucket or to a host name only the cluster knows), allowed hosts."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest

from tests.infra.conftest import Objects, containers, env_of, expand_args, pod_spec, resolve_env

SECRETS = {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": "pw123", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://tlops-minio.tlops.svc.cluster.local:9000",
           "MLFLOW_TRACKING_URI": "http://tlops-mlflow.tlops.svc.cluster.local:5000"}
# Where clients reach the server: in the cluster by the Service's name, from a workstation by a port-forward.
IN_CLUSTER = "http://tlops-mlflow.tlops.svc.cluster.local:5000"
OUTSIDE = "http://127.0.0.1:5000"
# Client-side switches that make the server hand out presigned S3 URLs (naming its S3 endpoint) for transfers.
PRESIGNED_SWITCHES = {"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"}


def server_params(objects: Objects, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, str],
                                                                               dict[str, Any]]:
    """(`mlflow server`'s parsed options, the container's environment, the container) of the MLflow Deployment."""
    from mlflow.cli import server

    (container,) = objects[("Deployment", "tlops-mlflow")]["spec"]["template"]["spec"]["containers"]
    env = resolve_env(container, objects, SECRETS)
    assert container["command"] == ["mlflow", "server"]
    for name in [p.envvar for p in server.params if isinstance(p.envvar, str)]:
        monkeypatch.delenv(name, raising=False)  # only the container's environment counts
    for k, value in env.items():
        monkeypatch.setenv(k, value)
    return server.make_context("server", expand_args(container, env)).params, env, container


def proxied_artifact_problems(params: dict[str, Any]) -> list[str]:
    """What would send a client to the bucket or to an in-cluster host instead of through the server it asked."""
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
    from mlflow.utils.server_cli_utils import resolve_default_artifact_root

    problems = []
    if not params["serve_artifacts"]:
        problems.append("--serve-artifacts is off: clients would read and write the bucket themselves")
    if params["artifacts_only"]:
        problems.append("--artifacts-only: no tracking, no registry")
    if not str(params["artifacts_destination"]).startswith("s3://"):
        problems.append(f"--artifacts-destination {params['artifacts_destination']} is not in S3")
    root = resolve_default_artifact_root(params["serve_artifacts"], params["default_artifact_root"],
                                         params["backend_store_uri"])
    parsed = urlparse(root)
    if parsed.scheme != "mlflow-artifacts":
        problems.append(f"--default-artifact-root {root}: new experiments would store {parsed.scheme}:// URIs that "
                        "clients open directly")
    elif parsed.netloc:
        problems.append(f"--default-artifact-root {root} names the host {parsed.netloc}: clients outside the "
                        "cluster would be sent there")
    else:
        # A run's artifacts, as each client resolves them: through the very server it talks to.
        run_artifacts = root.rstrip("/") + "/1/0123abcd/artifacts"
        for tracking in (IN_CLUSTER, OUTSIDE):
            resolved = urlparse(MlflowArtifactsRepository.resolve_uri(run_artifacts, tracking))
            if resolved.netloc != urlparse(tracking).netloc or "/mlflow-artifacts/artifacts/" not in resolved.path:
                problems.append(f"a client of {tracking} would fetch artifacts from {resolved.geturl()}")
    return problems


def test_mlflow_server_reads_postgres_and_s3_from_its_environment(
        overlay: tuple[str, Objects], monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend store is PostgreSQL through psycopg (installed from the lock), the password stays out of the
    process arguments, artifacts go to the overlay's bucket, and the Host header check lets in-cluster names
    (and the probes) through."""
    import sqlalchemy
    from mlflow.server.security_utils import is_allowed_host_header

    name, objects = overlay
    settings = objects[("ConfigMap", "tlops-settings")]["data"]
    params, env, container = server_params(objects, monkeypatch)
    assert not any("pw123" in a for a in expand_args(container, env)), "the password stays out of the arguments"
    assert params["backend_store_uri"] == (
        f"postgresql+psycopg://mlflow:pw123@{settings['MLFLOW_DB_HOST']}:5432/{settings['MLFLOW_DB_NAME']}")
    assert params["artifacts_destination"] == settings["MLFLOW_ARTIFACTS_DESTINATION"]
    assert params["serve_artifacts"] is True and params["host"] == "0.0.0.0" and params["port"] == 5000
    workers = {"local": "1", "aws": "2"}.get(name, env["MLFLOW_WORKERS"])
    assert str(params["workers"]) == env["MLFLOW_WORKERS"] == workers
    assert sqlalchemy.create_engine(params["backend_store_uri"]).dialect.driver == "psycopg"  # no connection made
    assert env["MLFLOW_S3_ENDPOINT_URL"] == SECRETS["AWS_ENDPOINT_URL"]
    if name == "local":
        assert params["artifacts_destination"] == "s3://tlops-mlflow/mlartifacts"
        assert params["backend_store_uri"] == "postgresql+psycopg://mlflow:pw123@tlops-postgres:5432/mlflow"
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in ("tlops-mlflow:5000", "tlops-mlflow.tlops:5000", "tlops-mlflow.tlops.svc.cluster.local:5000",
                 "localhost:5000", "localhost", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    assert "readinessProbe" in container
    for probe in {"readinessProbe", "livenessProbe"} & set(container):  # an overlay may drop the liveness probe
        (header,) = container[probe]["httpGet"]["httpHeaders"]
        assert is_allowed_host_header(allowed, header["value"])


def test_mlflow_proxies_artifacts_with_no_in_cluster_host_in_their_uris(
        overlay: tuple[str, Objects], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--serve-artifacts`, `--artifacts-destination s3://…` and `--default-artifact-root mlflow-artifacts:/` are
    on the command line (not left to defaults or the environment), and a run's artifact URI resolves, for a client
    in the cluster and for one behind a port-forward, to the server that client talks to."""
    _, objects = overlay
    params, _, container = server_params(objects, monkeypatch)
    args = container["args"]
    assert "--serve-artifacts" in args
    assert args[args.index("--artifacts-destination") + 1] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert urlparse(args[args.index("--default-artifact-root") + 1]).scheme == "mlflow-artifacts"
    assert proxied_artifact_problems(params) == []
    # No workload turns on the transfers for which the server hands out presigned S3 URLs.
    for doc in objects.values():
        for c in containers(doc) if pod_spec(doc) is not None else []:
            on = {n for n in PRESIGNED_SWITCHES & set(env_of(c)) if env_of(c)[n].get("value", "").lower() == "true"}
            assert not on, f"{doc['kind']}/{doc['metadata']['name']}: {sorted(on)}"


@pytest.mark.parametrize(("args", "problem"), [
    (["--no-serve-artifacts", "--default-artifact-root", "s3://tlops-mlflow/mlartifacts"], "--serve-artifacts is off"),
    (["--default-artifact-root", "s3://tlops-mlflow/mlartifacts"], "clients open directly"),
    (["--default-artifact-root", "mlflow-artifacts://tlops-mlflow.tlops.svc.cluster.local:5000/"],
     "names the host tlops-mlflow.tlops.svc.cluster.local:5000"),
    (["--artifacts-destination", "./mlartifacts"], "is not in S3"),
])
def test_proxied_artifact_check_can_fail(args: list[str], problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.cli import server

    for name in [p.envvar for p in server.params if isinstance(p.envvar, str)]:
        monkeypatch.delenv(name, raising=False)
    base = ["--backend-store-uri", "postgresql+psycopg://u:p@db:5432/mlflow", "--serve-artifacts",
            "--artifacts-destination", "s3://tlops-mlflow/mlartifacts"]
    assert proxied_artifact_problems(server.make_context("server", list(base)).params) == []
    if args[0] == "--no-serve-artifacts":
        base.remove("--serve-artifacts")
    problems = proxied_artifact_problems(server.make_context("server", [*base, *args]).params)
    assert any(problem in p for p in problems), problems
