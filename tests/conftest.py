"""Shared fixtures: tiny real data sets, an isolated work dir per test, the CLI as a user runs it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers.processes import free_port, stop, wait_until_up

__all__ = ["free_port", "stop", "wait_until_up"]  # tests import them from here too

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real digits, three classes, 30 images each: enough for every split and a meaningful probe."""
    from tlops.data.discovery import export_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    export_digits(root, classes=[0, 1, 7], per_class=30)
    return root


def ir_tasks(ir: dict) -> dict[str, dict]:
    """Every task of a compiled pipeline by name, those inside condition branches (dsl.If/Else) included."""
    found: dict[str, dict] = {}

    def walk(dag: dict) -> None:
        for name, task in dag.get("tasks", {}).items():
            component = ir["components"].get(task["componentRef"]["name"], {})
            if "dag" in component:  # a condition branch: its tasks are one level down
                walk(component["dag"])
            else:
                found[name] = task

    walk(ir["root"]["dag"])
    return found


@pytest.fixture(scope="session")
def font_targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A target domain for adaptation tests: digits 0, 1 and 7 printed in the machine's fonts, 8 unlabelled and
    10 labelled images per class, as class folders (read-only: a test that changes them copies them first)."""
    from tlops.data.fontdigits import export_font_digits

    root = tmp_path_factory.mktemp("font-targets")
    export_font_digits(root / "unlabelled", per_class=8, classes=[0, 1, 7], seed=3)
    export_font_digits(root / "labelled", per_class=10, classes=[0, 1, 7], seed=11)
    return {"unlabelled": root / "unlabelled", "labelled": root / "labelled"}


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uris_stay_with_their_module() -> Iterator[None]:
    """mlflow.set_tracking_uri / set_registry_uri are process-wide: a module (or the CLI run in process) that sets
    them (MLflow also writes them into os.environ) would point every later module of the session at its store.
    Each module starts from the environment the session started with; within a module, its fixtures' stores
    stay set for all its tests."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "mlflow" in sys.modules:
        import mlflow.tracking._model_registry.utils as registry_utils
        import mlflow.tracking._tracking_service.utils as tracking_utils

        tracking_utils._tracking_uri = None
        registry_utils._registry_uri = None


def write_config(path: Path, workdir: Path, **overrides: object) -> Path:
    """A fast test config: 32 px (declared), small grid, low accuracy floor for tiny data."""
    cfg: dict = {
        "workdir": str(workdir),
        "backbone": "efficientnet_lite0",
        "validation": {"min_images_per_class": 2},
        "preprocess": {"image_size": 32, "allow_resolution_change": True},
        "train": {"l2_grid": [1e-3], "epochs": 100, "num_threads": 2},
        "gate": {"min_accuracy": 0.5},
        "registry": {"model_name": "tiny-digits"},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / ".tlops"


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """The ``tlops`` command as a user runs it: a separate process, stdout and stderr captured."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tlops", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path) -> dict[str, Path]:
    """A real linear probe on the tiny digits ("good") and the same with two classes swapped ("worse")."""
    from tests.helpers.registry import degrade, train_tiny_model

    root = tmp_path_factory.mktemp("models")
    good = train_tiny_model(tiny_digits, root / "good")
    return {"good": good, "worse": degrade(good, root / "worse")}


@contextlib.contextmanager
def running_mlflow_server(root: Path, artifacts_destination: str | None = None, env: dict[str, str] | None = None,
                          port: int | None = None, crash_on_exit: bool = False) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend under ``root``, HTTP, artifacts proxied to ``artifacts_destination``,
    default ``root/artifacts``) on loopback; yields its URL. On exit the server and its workers stop (SIGTERM), or
    with ``crash_on_exit`` are killed at once (SIGKILL), as a server that crashes.

    Started again on the same ``root`` and ``port`` it serves the same store (a server that came back)."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "a")  # noqa: SIM115 - the server writes to it until the end
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         artifacts_destination or str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(f"{url}/health", proc, 90):
            pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
        yield url
    finally:
        stop(proc, group=True, abrupt=crash_on_exit)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on loopback for the whole session; yields its URL."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url
