"""Preprocessing mismatches caught end to end: through the pipeline, the gate, `tlops parity` and `tlops audit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path) -> dict:
    """One good run: version 1 is the champion every bad run below must leave in place."""
    cwd = tmp_path_factory.mktemp("parity")
    cfg = write_config(cwd / "c.yaml", cwd / ".tlops", registry__model_name="parity-digits")
    result = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    return {"cwd": cwd, "cfg": cfg, "data": tiny_digits, "uri": f"sqlite:///{cwd / '.tlops' / 'mlflow.db'}"}


def _client(store: dict):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=store["uri"], registry_uri=store["uri"])


@pytest.mark.parametrize(
    ("override", "field"),
    # Every field's mismatch is caught by check_parity in tests/unit/test_preprocessing.py; one goes end to end in
    # the default suite (about 20 s each), the rest with the slow tests.
    [
        ("preprocess.mean=0.485,0.456,0.406", "mean"),  # ImageNet statistics on a 0.5/0.5 backbone
        pytest.param("preprocess.channel_order=BGR", "channel_order", marks=pytest.mark.slow),
        pytest.param("preprocess.interpolation=bilinear", "interpolation", marks=pytest.mark.slow),
        pytest.param("preprocess.scale=1.0", "scale", marks=pytest.mark.slow),  # the missing /255
        # resize-then-crop replaced by a direct resize
        pytest.param("preprocess.resize_rule=direct", "resize_rule", marks=pytest.mark.slow),
        pytest.param("preprocess.exif_transpose=false", "exif_transpose", marks=pytest.mark.slow),
    ],
)
def test_mismatch_is_stopped_and_champion_unchanged(store: dict, override: str, field: str) -> None:
    result = run_cli("run", "--config", str(store["cfg"]), "--data", str(store["data"]), "--set", override,
                     cwd=store["cwd"])
    assert result.returncode == 1, result.stdout[-1500:]
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.stderr
    assert line.startswith(f"error: parity: preprocessing parity failed: {field} is"), line
    assert "golden images differ" in line  # the numbers confirm what the fields say
    client = _client(store)
    assert str(client.get_model_version_by_alias("parity-digits", "champion").version) == "1"
    assert len(client.search_model_versions("name='parity-digits'")) == 1
    failed = client.search_runs([client.get_experiment_by_name("tlops").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert failed.data.tags["parity"] == "fail" and failed.info.status == "FAILED"


@pytest.mark.slow  # a pipeline run; allow_resolution_change is checked in tests/unit/test_preprocessing.py
def test_undeclared_resolution_change_is_refused(store: dict) -> None:
    result = run_cli("run", "--config", str(store["cfg"]), "--data", str(store["data"]),
                     "--set", "preprocess.allow_resolution_change=false", cwd=store["cwd"])
    assert result.returncode == 1 and "allow_resolution_change" in result.stderr


def test_fingerprint_is_the_same_on_run_version_and_audit(store: dict) -> None:
    client = _client(store)
    mv = client.get_model_version("parity-digits", "1")
    run = client.get_run(mv.run_id or mv.tags["mlflow.run_id"])
    result = run_cli("audit", "--model", "parity-digits", "--format", "json", "--config", str(store["cfg"]),
                     cwd=store["cwd"])
    assert result.returncode == 0, result.stderr
    audit = json.loads(result.stdout)["versions"][0]
    assert audit["fingerprint"] == mv.tags["preprocess.fingerprint"] == run.data.tags["preprocess.fingerprint"]
    assert audit["stored_fingerprint"] == audit["fingerprint"] and audit["consistent"]
    assert "champion" in audit["aliases"] and audit["parity"] == "pass"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "preprocess")}
    assert {"preprocess/preprocess.json", "preprocess/parity_report.json", "preprocess/parity_report.html",
            "preprocess/serving_parity.json"} <= artifacts
    rerun = run_cli("parity", "--model", "models:/parity-digits@champion", "--config", str(store["cfg"]),
                    cwd=store["cwd"])
    assert rerun.returncode == 0 and "parity PASS" in rerun.stdout and "serving path: pass" in rerun.stdout


def test_audit_flags_an_alias_on_an_inconsistent_version(store: dict) -> None:
    client = _client(store)
    good = client.get_model_version("parity-digits", "1").tags["preprocess.fingerprint"]
    client.set_model_version_tag("parity-digits", "1", "preprocess.fingerprint", "0" * 64)
    try:
        audit = run_cli("audit", "--model", "parity-digits", "--config", str(store["cfg"]), cwd=store["cwd"])
        assert audit.returncode == 1
        assert "INCONSISTENT" in audit.stdout and "does not match the stored spec" in audit.stdout
        assert "champion -> version 1" in audit.stderr
        rerun = run_cli("parity", "--model", "models:/parity-digits/1", "--config", str(store["cfg"]),
                        cwd=store["cwd"])
        assert rerun.returncode == 1 and "does not match its stored spec" in rerun.stdout
    finally:
        client.set_model_version_tag("parity-digits", "1", "preprocess.fingerprint", good)


@pytest.mark.parametrize("uri", ["parity-digits", "models:/parity-digits/99", "models:/nope@champion"])
def test_parity_on_a_missing_model_is_a_clear_error(store: dict, uri: str) -> None:
    result = run_cli("parity", "--model", uri, "--config", str(store["cfg"]), cwd=store["cwd"])
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.startswith("error: ")


@pytest.mark.slow  # a whole pipeline run (about 60 s); its parts are in tests/unit/test_custom_backbone.py
def test_own_checkpoint_end_to_end_and_served_without_it(tmp_path: Path, tiny_digits: Path) -> None:
    """A custom backbone's metadata is its reference; the registered model needs nothing of it to serve."""
    import shutil

    import mlflow
    import pandas as pd

    from tests.unit.test_custom_backbone import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops", registry__model_name="own-backbone",
                       preprocess__image_size=None, preprocess__allow_resolution_change=False,
                       gate__min_accuracy=0.0)
    result = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), "--backbone", f"checkpoint:{ckpt}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert "parity pass" in result.stdout and "PROMOTE" in result.stdout
    shutil.rmtree(ckpt)
    store = f"sqlite:///{tmp_path / '.tlops' / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)  # an earlier test in this process may have pointed the registry elsewhere
    mv = mlflow.MlflowClient().get_model_version_by_alias("own-backbone", "champion")
    assert mv.tags["preprocess.fingerprint"] == mv.tags["preprocess.reference_fingerprint"]
    model = mlflow.pyfunc.load_model("models:/own-backbone@champion")
    out = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in sorted(tiny_digits.glob("0/*.png"))[:2]]}))
    assert len(out) == 2 and set(out["label"]) <= {"0", "1", "7"}
    audit = run_cli("audit", "--model", "own-backbone", "--config", str(cfg), cwd=tmp_path)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    rerun = run_cli("parity", "--model", "models:/own-backbone@champion", "--config", str(cfg), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
