"""Each of the five components, run one by one through the real kfp.local subprocess runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl, local
from kfp.dsl import Artifact, Dataset, Model

from components import compress, evaluate, fine_tune, gate, parity, validate
from tests.conftest import write_config
from tlops.config.settings import load_config
from tlops.fileio import read_json


class StepRun:
    """One component run alone: its artifact inputs imported from earlier runs' files."""

    def __init__(self, root: Path, component, returns: type, artifacts: dict, **params) -> None:
        def one():
            kwargs = dict(params)
            for name, (uri, cls) in artifacts.items():
                kwargs[name] = dsl.importer(artifact_uri=uri, artifact_class=cls).output
            return component(**kwargs).outputs["Output"]

        one.__annotations__ = {"return": returns}
        name = f"step-{component.name.replace('_', '-')}"
        self.output = dsl.pipeline(name=name)(one)().output
        runs = sorted(root.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
        self.dir = runs[-1] / component.name.replace("_", "-")

    def path(self, output: str) -> str:
        return str(self.dir / output)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path) -> dict:
    root = tmp_path_factory.mktemp("components")
    cfg = load_config(write_config(root / "c.yaml", root / ".tlops",
                                   tracking__uri=f"sqlite:///{root / '.tlops' / 'mlflow.db'}"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "pipeline_root"))
    return {"cfg": cfg, "config_json": cfg.to_json(), "data": str(tiny_digits), "root": root / "pipeline_root"}


@pytest.fixture(scope="module")
def validated(env: dict):
    return StepRun(env["root"], validate, str, {}, data_uri=env["data"], config_json=env["config_json"],
                   pipeline_run="component-test")


def test_validate_builds_the_manifest_and_opens_the_run(validated) -> None:
    from tlops.config.plan import RunPlan
    from tlops.data.discovery import read_manifest

    report = read_json(validated.path("report"))
    assert report["success"] is True
    manifest = read_manifest(validated.path("manifest"))
    assert len(manifest) == 90
    # The declared manifest names files by URI only: nothing in it points into the validate step's own disk.
    assert manifest["path"].isna().all() and manifest["uri"].str.startswith("/").all()
    plan = RunPlan.read(validated.path("run_plan"))
    assert validated.output == plan.decision == "train"
    assert len(plan.run_id) == 32 and plan.validation_ok  # an MLflow run id


def plan_input(validated) -> dict:
    return {"run_plan": (validated.path("run_plan"), Artifact), "manifest": (validated.path("manifest"), Dataset),
            "target_manifest": (validated.path("target_manifest"), Dataset)}


@pytest.fixture(scope="module")
def checked(env: dict, validated):
    return StepRun(env["root"], parity, str, plan_input(validated))


def test_parity_records_spec_and_fingerprint(checked) -> None:
    spec = read_json(checked.path("spec"))
    assert checked.output == spec["fingerprint"]
    report = read_json(checked.path("report"))
    assert report["status"] == "pass" and report["declared"] and report["golden"]


@pytest.fixture(scope="module")
def trained(env: dict, validated, checked):
    return StepRun(env["root"], fine_tune, str, {**plan_input(validated), "spec": (checked.path("spec"), Artifact)})


def test_fine_tune_writes_model_files_and_logs_the_model(trained) -> None:
    model_dir = Path(trained.path("model"))
    assert {p.name for p in model_dir.iterdir()} >= {"weights.pt", "preprocess.json", "model.json"}
    assert trained.output.startswith("models:/")
    assert read_json(trained.path("serving_parity"))["status"] == "pass"
    assert not any(Path(trained.path("source_model")).iterdir())  # no adaptation: no source-only model


@pytest.fixture(scope="module")
def scored(env: dict, validated, trained):
    return StepRun(env["root"], evaluate, float, {**plan_input(validated),
                                                  "source_model": (trained.path("source_model"), Model)},
                   model_uri=trained.output)


def test_evaluate_scores_the_test_split(scored) -> None:
    evaluation = read_json(scored.path("evaluation"))
    assert 0.5 <= evaluation["candidate"]["accuracy"] <= 1.0 and evaluation["candidate"]["n"] > 0
    assert scored.output == pytest.approx(evaluation["candidate"]["accuracy"])
    assert "champion" not in evaluation


@pytest.fixture(scope="module")
def compressed(env: dict, validated, trained, scored):
    inputs = {k: v for k, v in plan_input(validated).items() if k != "target_manifest"}
    return StepRun(env["root"], compress, str, {**inputs, "evaluation": (scored.path("evaluation"), Artifact)},
                   model_uri=trained.output)


def test_compress_without_variants_writes_an_empty_record(compressed) -> None:
    assert compressed.output == ""
    assert read_json(compressed.path("compression"))["variants"] == {}


def test_gate_registers_and_promotes_the_first_version(env: dict, validated, checked, trained, scored,
                                                       compressed) -> None:
    import mlflow

    decided = StepRun(env["root"], gate, str, {
        "run_plan": (validated.path("run_plan"), Artifact), "evaluation": (scored.path("evaluation"), Artifact),
        "parity_report": (checked.path("report"), Artifact),
        "serving_parity": (trained.path("serving_parity"), Artifact),
        "compression": (compressed.path("compression"), Artifact)}, model_uri=trained.output)
    summary = json.loads(decided.output)
    assert read_json(decided.path("decision"))["decision"] == "promote"
    assert summary["decision"] == "promote" and summary["model_version"] == "1"
    # The KFP UI's view of the decision: a Markdown output and the report with the decision in it.
    assert Path(decided.path("decision_markdown")).read_text().startswith("## Gate: PROMOTE — tiny-digits version 1")
    assert "Gate decision" in Path(decided.path("report_html")).read_text()
    mlflow.set_tracking_uri(env["cfg"].tracking.uri)
    mv = mlflow.MlflowClient().get_model_version_by_alias("tiny-digits", "champion")
    assert str(mv.version) == "1"
    assert mv.tags["preprocess.fingerprint"] == summary["fingerprint"] == read_json(checked.path("spec"))["fingerprint"]
    assert mv.tags["gate.decision"] == "promote"
