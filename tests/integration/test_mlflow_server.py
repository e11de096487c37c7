"""The pipeline against a real `mlflow server` process (SQL backend, HTTP, proxied artifacts) on loopback.

The server is the session fixture ``mlflow_server`` of tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.integration


# Covered in the default run by test_storage_real.py's pipeline test; kept for a focused check.
@pytest.mark.slow
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
