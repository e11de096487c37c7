"""MLflow set-up: where runs and the registry live (embedded SQLite by default), and run helpers."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tlops.config import Config

ENV_URI = "MLFLOW_TRACKING_URI"


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


def setup(cfg: Config) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

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
