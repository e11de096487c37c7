"""The whole pipeline through the CLI, as `make run` does it, on a tiny real data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config

# Credentials in the environment of every run: none may reach the tracking store, an artifact or a log.
# (A user name is no secret: MLflow records MLFLOW_TRACKING_USERNAME as the run's user, on purpose.)
CANARY = "tlops-canary-3c9d7a41"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": f"AKIA{CANARY}", "AWS_SECRET_ACCESS_KEY": CANARY, "AWS_SESSION_TOKEN": CANARY,
               "MLFLOW_TRACKING_USERNAME": "ci-runner", "MLFLOW_TRACKING_PASSWORD": CANARY,
               "MLFLOW_TRACKING_TOKEN": CANARY, "KF_PIPELINES_TOKEN": CANARY}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path) -> dict:
    cwd = tmp_path_factory.mktemp("e2e")
    cfg = write_config(cwd / "tlops.yaml", cwd / ".tlops")
    first = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=cwd, env=CREDENTIALS)
    second = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=cwd, env=CREDENTIALS)
    return {"cwd": cwd, "first": first, "second": second}


def test_first_run_promotes_version_1(two_runs: dict) -> None:
    first = two_runs["first"]
    assert first.returncode == 0, first.stderr[-2000:] + first.stdout[-2000:]
    out = first.stdout
    for expected in ("validation pass", "parity pass", "fingerprint", "test accuracy", "tiny-digits version 1",
                     "PROMOTE", "no champion yet"):
        assert expected in out, expected
    # Each step's wall time, in the order the steps ran.
    import re

    steps = re.search(r"^  steps +(.+)$", out, re.M)
    assert steps, out[-2000:]
    assert [part.split()[0] for part in steps.group(1).split(", ")] == ["validate", "parity", "fine-tune",
                                                                        "evaluate", "gate"]


def test_second_run_registers_version_2_compared_with_version_1(two_runs: dict) -> None:
    second = two_runs["second"]
    assert second.returncode == 0, second.stderr[-2000:] + second.stdout[-2000:]
    assert "tiny-digits version 2" in second.stdout
    assert "compared with champion version 1" in second.stdout


def test_registry_holds_both_versions_with_evidence(two_runs: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{two_runs['cwd'] / '.tlops' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    versions = {str(v.version): v for v in client.search_model_versions("name='tiny-digits'")}
    assert set(versions) == {"1", "2"}
    champion = client.get_model_version_by_alias("tiny-digits", "champion")
    assert str(champion.version) == "2"
    v2 = client.get_model_version("tiny-digits", "2")
    assert v2.tags["gate.compared_with"] == "1" and v2.tags["gate.decision"] == "promote"
    assert v2.tags["preprocess.fingerprint"] == versions["1"].tags["preprocess.fingerprint"]
    run = client.get_run(v2.tags["mlflow.run_id"])
    assert run.data.tags["preprocess.fingerprint"] == v2.tags["preprocess.fingerprint"]
    assert run.data.tags["validation"] == "pass" and run.data.tags["parity"] == "pass"
    assert "test_accuracy" in run.data.metrics and "champion.test_accuracy" in run.data.metrics
    # The embedded default keeps artifacts under the work dir, not in ./mlruns.
    assert (two_runs["cwd"] / ".tlops" / "mlartifacts").is_dir()
    assert not (two_runs["cwd"] / "mlruns").exists()


def test_the_registered_champion_serves_raw_image_bytes(two_runs: dict, tiny_digits: Path) -> None:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{two_runs['cwd'] / '.tlops' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/tiny-digits@champion")
    files = sorted(tiny_digits.glob("7/*.png"))[:3]
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert list(out["label"]) == ["7", "7", "7"]


def test_no_credential_reaches_the_store_artifacts_or_logs(two_runs: dict) -> None:
    work = two_runs["cwd"] / ".tlops"
    files = [p for p in work.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".log" for p in files)
    leaked = [str(p) for p in files if CANARY.encode() in p.read_bytes()]
    assert leaked == []
    for run in (two_runs["first"], two_runs["second"]):
        assert CANARY not in run.stdout + run.stderr
