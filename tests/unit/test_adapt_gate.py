"""The evaluate and gate steps with a labelled target test split, as the components call them, on real tiny models
in a SQLite store: judged on the target, the source beside it, the source-only model as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tests.helpers.registry import EVIDENCE, gate_lab, step_inputs
from tlops import tracking
from tlops.config.settings import Config
from tlops.data.fontdigits import export_font_digits
from tlops.data.target import build_target_manifest, write_target_manifest
from tlops.fileio import read_json
from tlops.steps import evaluate_step, gate_step


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path, tiny_models: dict) -> dict:
    lab = gate_lab(tmp_path_factory.mktemp("adapt-gate"), tiny_digits, tiny_models)
    root = lab["root"]
    export_font_digits(root / "unlabelled", per_class=4, classes=[0, 1, 7], seed=3)
    export_font_digits(root / "labelled", per_class=10, classes=[0, 1, 7], seed=11)
    cfg = Config.model_validate({"data": {"target_uri": str(root / "unlabelled"),
                                          "target_labelled_uri": str(root / "labelled")}})
    lab["target"] = str(write_target_manifest(build_target_manifest(cfg, root / "cache"), root / "target.csv"))
    return lab


def run_tail(lab: dict, name: str, kind: str, reference: str) -> dict:
    cfg = lab["cfg"]
    cfg = cfg.model_copy(update={
        "registry": cfg.registry.model_copy(update={"model_name": name}),
        "gate": cfg.gate.model_copy(update={"min_accuracy": 0.0, "max_source_regression": 0.02}),
        "evaluation": cfg.evaluation.model_copy(update={"latency_images": 0, "bootstrap_resamples": 200}),
    })
    tracking.setup(cfg)
    with mlflow.start_run(experiment_id=lab["experiment"]) as run:
        mlflow.set_tags(EVIDENCE)
    out = lab["root"] / name
    inputs = step_inputs(out, cfg, run.info.run_id)
    evaluate_step(inputs["plan"], lab["manifest"], lab["models"][kind], str(out / "evaluation.json"),
                  str(out / "report.html"), target_manifest_path=lab["target"],
                  reference_dir=str(lab["model_dirs"][reference]))
    summary = json.loads(gate_step(inputs["plan"], lab["models"][kind], str(out / "evaluation.json"),
                                   inputs["parity"], inputs["serving"], str(out / "decision.json")))
    return {"summary": summary, "record": read_json(out / "evaluation.json"), "out": out, "run_id": run.info.run_id}


def test_judged_on_the_target_with_the_source_beside_it(lab: dict) -> None:
    done = run_tail(lab, "same", "good", reference="good")
    record, s = done["record"], done["summary"]
    assert record["domain"] == "target" and record["candidate"]["n"] == 6  # the labelled target's test split
    src = record["domains"]["source"]
    assert src["candidate"]["n"] == 18 and src["source_only"]["accuracy"] == pytest.approx(src["candidate"]["accuracy"])
    assert any(r.startswith("source test accuracy") and "+0.0000" in r for r in s["reasons"]), s["reasons"]
    assert s["decision"] == "promote" and s["domains"] == record["domains"]
    assert "Target and source domains" in (done["out"] / "report.html").read_text()
    metrics = mlflow.MlflowClient().get_run(done["run_id"]).data.metrics
    assert metrics["source.source_only.test_accuracy"] == pytest.approx(src["source_only"]["accuracy"])


def test_a_candidate_losing_the_source_is_rejected_with_its_reason(lab: dict) -> None:
    done = run_tail(lab, "lost", "worse", reference="good")  # two classes swapped: a third of the source lost
    s = done["summary"]
    assert s["decision"] == "reject"
    assert any("against the source-only model's" in r and "more than gate.max_source_regression 0.0200" in r
               for r in s["reasons"]), s["reasons"]
