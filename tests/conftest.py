"""Shared fixtures: tiny real data sets, an isolated work dir per test, the CLI as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real digits, three classes, 30 images each: enough for every split and a meaningful probe."""
    from tlops.data import export_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    export_digits(root, classes=[0, 1, 7], per_class=30)
    return root


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
