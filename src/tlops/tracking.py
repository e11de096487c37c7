"""MLflow set-up: where runs and the registry live (embedded SQLite by default), and run helpers."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tlops.config import Config
from tlops.errors import TlopsError

ENV_URI = "MLFLOW_TRACKING_URI"
RETRY_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
# What MLflow's REST client says once its retries are spent, or when the connection cannot even be made.
_UNREACHABLE = re.compile(r"API request to .* failed with exception|Max retries exceeded|Connection refused|"
                          r"Failed to establish a new connection|Read timed out|RemoteDisconnected")


def env_uri_set() -> bool:
    return bool(os.environ.get(ENV_URI))


def resolve_tracking_uri(cfg: Config) -> str:
    """config > MLFLOW_TRACKING_URI > ``sqlite:///<workdir>/mlflow.db`` (the embedded default)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get(ENV_URI):
        return os.environ[ENV_URI]
    return f"sqlite:///{(Path(cfg.workdir) / 'mlflow.db').resolve()}"


def redact(uri: str) -> str:
    """A URI fit for logs: any password replaced."""
    return re.sub(r"(//[^:/@]+):[^@/]+@", r"\1:***@", uri)


def apply_retry_policy(cfg: Config) -> None:
    """Retries, back-off and timeout for every request to a tracking server (the environment wins)."""
    values = (cfg.tracking.retries, cfg.tracking.backoff_factor, cfg.tracking.timeout_s)
    for name, value in zip(RETRY_ENV, values, strict=True):
        os.environ.setdefault(name, str(value))


def unreachable_error(exc: BaseException) -> TlopsError | None:
    """A one-line error when ``exc`` means the tracking server stopped answering; None for anything else."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from_client = isinstance(exc, MlflowException) or type(exc).__module__.split(".")[0] in ("requests", "urllib3")
    if not from_client or not _UNREACHABLE.search(f"{type(exc).__name__}: {exc}"):
        return None

    uri = redact(mlflow.get_tracking_uri())
    retries = os.environ.get(RETRY_ENV[0], "?")
    return TlopsError(f"the MLflow tracking server at {uri} did not answer after {retries} retries with back-off; "
                      "start it (or point MLFLOW_TRACKING_URI at a running one) and run again: checkpoints and "
                      "cached features already written are kept and the rerun resumes from them")


def setup(cfg: Config) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

    apply_retry_policy(cfg)
    uri = resolve_tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        # Keep the embedded default's artifacts beside its database, not in ./mlruns.
        location = (Path(cfg.workdir) / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except Exception:
        # Another process created it first.
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out
