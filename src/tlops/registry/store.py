"""The MLflow registry as the gate uses it: the client, versions and aliases read, versions registered, who
acts and which code runs."""

from __future__ import annotations

import getpass
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from tlops.errors import TlopsError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_VALUE_LIMIT = 4900  # MLflow's SQL stores hold 5000 characters per tag value




def client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def alias_version(name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion_version(name: str) -> Any | None:
    """The version the ``champion`` alias points at, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def register(model_uri: str, name: str, tags: dict[str, str]) -> Any:
    import mlflow

    return mlflow.register_model(model_uri, name, tags=tags)


def require_model(name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client().get_registered_model(name)
    except MlflowException as exc:
        from tlops.tracking import unreachable_error

        raise (unreachable_error(exc) or TlopsError(
            f"registered model {name!r} does not exist in the MLflow registry")) from None


def get_version(name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    require_model(name)
    if not re.fullmatch(r"[1-9][0-9]*", str(version)):
        raise TlopsError(f"version {version!r}: expected a version number such as 3")
    try:
        return client().get_model_version(name, str(version))
    except MlflowException:
        raise TlopsError(f"model {name!r} has no version {version}") from None


def current_user() -> str:
    """Who acts: ``$USER``, else the login name, else "unknown"."""
    if os.environ.get("USER"):
        return os.environ["USER"]
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def code_version() -> str:
    """The git commit of the code that runs: ``$TLOPS_GIT_COMMIT`` (set it in images built without .git),
    else ``git rev-parse HEAD`` where the package lives, else in the working directory, else "unknown"."""
    if os.environ.get("TLOPS_GIT_COMMIT"):
        return os.environ["TLOPS_GIT_COMMIT"]
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    return "unknown"
