"""``tlops validate`` as a user runs it, and the validate step's MLflow record."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _check_lines(stdout: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in stdout.splitlines()
            if line.split() and line.split()[0] in ("PASS", "FAIL", "WARN", "SKIP")}


def test_clean_data_exits_0_with_a_line_per_check(tmp_path: Path, tiny_digits: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops")
    result = run_cli("validate", "--data", str(tiny_digits), "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _check_lines(result.stdout)
    assert lines["decodable"] == "PASS" and lines["min_images_per_class"] == "PASS" and len(lines) == 13
    assert result.stderr == ""
    out = tmp_path / ".tlops" / "validation"
    assert (out / "data_docs" / "index.html").is_file() and (out / "report.html").is_file()
    assert len((out / "manifest.csv").read_text().splitlines()) == 91


def test_failed_checks_exit_1_and_input_is_untouched(tmp_path: Path, tiny_digits: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    (data / "7" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "1" / "relabelled.png").write_bytes((data / "0" / "digit_0000.png").read_bytes())
    before = _snapshot(data)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops")
    result = run_cli("validate", "--data", str(data), "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = _check_lines(result.stdout)
    assert lines["decodable"] == "FAIL" and lines["same_content_two_labels"] == "FAIL"
    assert lines["min_images_per_class"] == "PASS"
    fail_line = next(x for x in result.stdout.splitlines() if x.startswith("FAIL decodable"))
    assert "broken.png" in fail_line
    assert result.stderr.strip().splitlines() == [
        "error: data validation failed: 2 error-level check(s): decodable, same_content_two_labels"]
    quarantine = (tmp_path / ".tlops" / "validation" / "quarantine.csv").read_text()
    assert "broken.png" in quarantine and "relabelled.png" in quarantine
    # Quarantined files may be left out of training instead: the same data then passes.
    again = run_cli("validate", "--data", str(data), "--config", str(cfg),
                    "--set", "validation.exclude_quarantined=true", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 left out of training" in again.stdout
    assert _snapshot(data) == before  # never modified, never deleted


@pytest.mark.parametrize("case", ["missing", "empty", "bad-config"])
def test_unusable_input_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    args = {"missing": ["--data", str(tmp_path / "nope")],
            "empty": ["--data", str(tmp_path / "empty")],
            "bad-config": ["--data", str(tmp_path / "empty"), "--set", "validation.severity.nonsense=error"]}[case]
    result = run_cli("validate", *args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ")
    assert {"missing": "does not exist", "empty": "no images found", "bad-config": "unknown check"}[case] in line


def test_drift_against_a_reference_manifest(tmp_path: Path, tiny_digits: Path) -> None:
    from tlops.data.discovery import export_digits

    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops")
    first = run_cli("validate", "--data", str(tiny_digits), "--config", str(cfg), "-o", str(tmp_path / "v1"),
                    cwd=tmp_path)
    assert first.returncode == 0
    grown = tmp_path / "grown"
    shutil.copytree(tiny_digits, grown)
    export_digits(grown, classes=[0], per_class=120)  # class 0 grows from 30 to 120 images
    result = run_cli("validate", "--data", str(grown), "--config", str(cfg),
                     "--set", f"validation.reference_manifest={tmp_path / 'v1' / 'manifest.csv'}",
                     "--set", "validation.severity.class_drift=error", cwd=tmp_path)
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if " class_drift " in x)
    assert line.startswith("FAIL class_drift [error]: total-variation distance of class shares 0.333")


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite tracking store for the validate-step tests that only read their own run (creating one
    costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


def test_validate_step_logs_results_to_mlflow(tmp_path: Path, tiny_digits: Path, tracking_db: str) -> None:
    import mlflow

    from tlops.config.plan import RunPlan
    from tlops.config.settings import load_config
    from tlops.steps import validate_step

    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / ".tlops",
                                   tracking__uri=tracking_db))
    decision = validate_step(str(tiny_digits), cfg.to_json(), str(tmp_path / "manifest.csv"),
                             str(tmp_path / "report.json"), "t", str(tmp_path / "report.html"),
                             str(tmp_path / "run_plan.json"))
    plan = RunPlan.read(tmp_path / "run_plan.json")
    assert decision == plan.decision == "train" and plan.validation_ok and plan.config == cfg
    run_id = plan.run_id
    assert "PASS" in (tmp_path / "report.html").read_text()
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id, "validation")}
    assert {"validation/manifest.csv", "validation/gx_result.json", "validation/report.html",
            "validation/summary.md", "validation/quarantine.csv", "validation/data_docs"} <= names
    docs = {a.path for a in client.list_artifacts(run_id, "validation/data_docs")}
    assert "validation/data_docs/index.html" in docs
    run = client.get_run(run_id)
    assert run.data.tags["validation"] == "pass" and run.data.tags["validation.failed"] == "none"
    assert run.data.metrics["data.quarantined"] == 0


def test_drift_against_the_champions_manifest(tmp_path: Path, tiny_digits: Path) -> None:
    import mlflow

    from tlops.config.plan import RunPlan
    from tlops.config.settings import load_config
    from tlops.fileio import read_json
    from tlops.selection.planner import load_reference
    from tlops.steps import validate_step

    cfg_path = write_config(tmp_path / "c.yaml", tmp_path / ".tlops",
                            tracking__uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            validation__reference_manifest="champion")
    cfg = load_config(cfg_path)
    assert load_reference(cfg) == (None, "")  # no champion yet: no drift checks
    validate_step(str(tiny_digits), cfg.to_json(), str(tmp_path / "m1.csv"), str(tmp_path / "r1.json"),
                  plan_path=str(tmp_path / "p1.json"))
    run_id = RunPlan.read(tmp_path / "p1.json").run_id
    client = mlflow.MlflowClient()
    client.create_registered_model("tiny-digits")
    mv = client.create_model_version("tiny-digits", f"runs:/{run_id}/validation", run_id=run_id)
    client.set_registered_model_alias("tiny-digits", "champion", mv.version)
    reference, where = load_reference(cfg)
    assert where == "champion tiny-digits version 1" and reference is not None and len(reference) == 90
    two_classes = tmp_path / "two"
    shutil.copytree(tiny_digits / "0", two_classes / "0")
    shutil.copytree(tiny_digits / "1", two_classes / "1")
    validate_step(str(two_classes), cfg.to_json(), str(tmp_path / "m2.csv"), str(tmp_path / "r2.json"))
    checks = {c["name"]: c for c in read_json(tmp_path / "r2.json")["checks"]}
    assert checks["class_drift"]["status"] == "WARN" and "0.333" in checks["class_drift"]["detail"]
    assert checks["size_drift"]["status"] == "PASS"


def test_failed_validation_is_recorded_in_mlflow_before_the_step_stops(tmp_path: Path, tiny_digits: Path,
                                                                       tracking_db: str) -> None:
    """The pipeline stops at this step; the reason is on the run (tags, status, quarantine) as well as raised."""
    import csv

    import mlflow

    from tlops.config.settings import load_config
    from tlops.errors import GateFailed
    from tlops.steps import validate_step

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    (data / "7" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / ".tlops", tracking__uri=tracking_db))
    with pytest.raises(GateFailed, match=r"data validation failed: decodable: .*broken\.png"):
        validate_step(str(data), cfg.to_json(), str(tmp_path / "m.csv"), str(tmp_path / "r.json"), "stopped")
    mlflow.set_tracking_uri(tracking_db)
    (run,) = mlflow.search_runs(experiment_names=["tlops"], filter_string="tags.`tlops.pipeline_run` = 'stopped'",
                                output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.tags["validation"] == "fail" and run.data.tags["validation.failed"] == "decodable"
    assert run.data.metrics["data.quarantined"] == 1
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="validation/quarantine.csv",
                                                dst_path=str(tmp_path / "dl"))
    with open(local, encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["uri"].endswith("7/broken.png") and row["reason"] == "not decodable: OSError: Truncated File Read"
