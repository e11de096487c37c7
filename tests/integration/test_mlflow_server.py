"""The pipeline against a real `mlflow server` process (SQL backend, HTTP, proxied artifacts) on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_pipeline_tracks_and_registers_through_the_server(mlflow_server: str, tmp_path: Path,
                                                          tiny_digits: Path) -> None:
    import mlflow

    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops", registry__model_name="served-digits")
    result = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert mlflow_server in result.stdout and "PROMOTE" in result.stdout
    # Nothing went to the embedded default when MLFLOW_TRACKING_URI said otherwise.
    assert not (tmp_path / ".tlops" / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    champion = client.get_model_version_by_alias("served-digits", "champion")
    assert str(champion.version) == "1" and champion.tags["parity"] == "pass"
    run = client.get_run(champion.tags["mlflow.run_id"])
    assert run.data.tags["preprocess.fingerprint"] == champion.tags["preprocess.fingerprint"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "validation", "preprocess", "evaluation", "gate"} <= artifacts
