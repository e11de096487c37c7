"""The evaluate and gate steps, called as the components call them, with real models in a SQLite store.

A "good" linear probe and a "worse" copy (two classes swapped) are scored on the tiny digits' test split
through their pyfunc models; the gate registers, decides and moves the aliases.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
import torch

from tests.helpers.registry import EVIDENCE, gate_lab, log_model_run, step_inputs
from tlops import registry, tracking
from tlops.errors import TlopsError
from tlops.fileio import read_json
from tlops.steps import evaluate_step, gate_step


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path, tiny_models: dict) -> dict:
    return gate_lab(tmp_path_factory.mktemp("gate"), tiny_digits, tiny_models)


def run_tail(lab: dict, name: str, kind: str, model_uri: str | None = None, **gate: object) -> dict:
    """evaluate -> gate for one candidate, in a fresh MLflow run carrying the earlier steps' evidence."""
    cfg = lab["cfg"]
    cfg = cfg.model_copy(update={
        "registry": cfg.registry.model_copy(update={"model_name": name}),
        "gate": cfg.gate.model_validate({**cfg.gate.model_dump(), **gate}),
        "evaluation": cfg.evaluation.model_copy(update={"latency_images": 5, "bootstrap_resamples": 500}),
    })
    tracking.setup(cfg)
    with mlflow.start_run(experiment_id=lab["experiment"]) as run:
        mlflow.set_tags(EVIDENCE)
    out = lab["root"] / name / run.info.run_id
    model_uri = model_uri or lab["models"][kind]
    inputs = step_inputs(out, cfg, run.info.run_id)
    returned = evaluate_step(inputs["plan"], lab["manifest"], model_uri, str(out / "evaluation.json"),
                             str(out / "report.html"))
    summary = json.loads(gate_step(inputs["plan"], model_uri, str(out / "evaluation.json"), inputs["parity"],
                                   inputs["serving"], str(out / "decision.json")))
    return {"summary": summary, "returned": returned, "out": out, "run_id": run.info.run_id, "cfg": cfg}


def aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in registry.client().get_registered_model(name).aliases.items()}


def test_first_model_is_promoted_on_absolute_thresholds_with_full_evidence(lab: dict) -> None:
    first = run_tail(lab, "first", "good")
    s = first["summary"]
    assert s["decision"] == "promote" and s["compared_with"] is None and s["model_version"] == "1"
    assert "no champion yet: absolute thresholds only" in s["reasons"]
    assert aliases("first") == {"champion": "1"}
    record = read_json(first["out"] / "evaluation.json")
    cand = record["candidate"]
    assert cand["accuracy"] > 0.9 and set(cand["per_class"]) == {"0", "1", "7"}
    assert set(cand["top_k"]) == {"top_2", "top_3"} and 0 <= cand["ece"] < 0.5
    assert cand["latency"]["n"] == 5 and 0 < cand["latency"]["p50_ms"] <= cand["latency"]["p95_ms"]
    state = torch.load(lab["weights"], weights_only=True)
    assert cand["model_size_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert "champion" not in record and record["slices"]["size"][0]["slice"] == "<=32 px"
    # What the component passes on: headline numbers and the confusion matrix for ClassificationMetrics.
    returned = first["returned"]
    assert returned["metrics"]["accuracy"] == cand["accuracy"] and returned["categories"] == ["0", "1", "7"]
    assert sum(map(sum, returned["matrix"])) == cand["n"]
    page = (first["out"] / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3 and "No champion yet" in page
    client = registry.client()
    logged = {a.path for a in client.list_artifacts(first["run_id"], "evaluation")}
    assert {"evaluation/report.html", "evaluation/metrics.json", "evaluation/confusion_matrix.png",
            "evaluation/reliability.png", "evaluation/per_class_recall.png"} <= logged
    metrics = client.get_run(first["run_id"]).data.metrics
    assert {"test_accuracy", "test_macro_f1", "test_top_2", "test_ece", "test_min_class_recall", "latency_p95_ms",
            "model_size_bytes"} <= set(metrics)
    tags = client.get_model_version("first", "1").tags
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git.commit"])
    assert tags["config.hash"] == first["cfg"].config_hash() and tags["tlops.pipeline_run"] == "test-run"
    assert tags["gate.decision"] == "promote" and "no champion yet" in tags["gate.reasons"]
    assert tags["data.manifest_hash"] and tags["test_accuracy"] and tags["latency_p95_ms"]
    [event] = registry.history("first")
    assert event.to_version == "1" and event.via == "pipeline test-run"


def test_a_better_model_is_promoted_over_a_worse_champion(lab: dict) -> None:
    assert run_tail(lab, "better", "worse", min_accuracy=0.2)["summary"]["decision"] == "promote"
    second = run_tail(lab, "better", "good", min_accuracy=0.2, min_improvement=0.1)
    s = second["summary"]
    assert s["decision"] == "promote" and s["compared_with"] == "1", s["reasons"]
    comp = s["metrics"]["comparison"]
    assert comp["difference"] > 0.3 and comp["ci_low"] > 0 and comp["mcnemar_p"] < 0.01
    assert any(r.startswith("improves on champion version 1") for r in s["reasons"])
    assert aliases("better") == {"champion": "2"}
    record = read_json(second["out"] / "evaluation.json")
    assert record["champion"]["version"] == "1" and record["champion"]["accuracy"] < record["candidate"]["accuracy"]
    assert "champion_accuracy" in record["slices"]["class"][0]
    page = (second["out"] / "report.html").read_text(encoding="utf-8")
    assert "champion (version 1)" in page and "paired bootstrap" in page
    assert [(e.from_version, e.to_version) for e in registry.history("better")] == [(None, "1"), ("1", "2")]


def test_a_worse_model_is_rejected_and_the_champion_stays(lab: dict) -> None:
    run_tail(lab, "worse", "good")
    s = run_tail(lab, "worse", "worse", min_accuracy=0.2)["summary"]
    assert s["decision"] == "reject" and s["compared_with"] == "1"
    assert any(r.startswith("worse than champion version 1") for r in s["reasons"])
    assert aliases("worse") == {"champion": "1"}
    assert len(registry.history("worse")) == 1
    tags = registry.client().get_model_version("worse", "2").tags
    assert tags["gate.decision"] == "reject" and tags["gate.compared_with"] == "1"


def test_manual_mode_stops_at_challenger_until_a_person_promotes(lab: dict) -> None:
    run_tail(lab, "manual", "good")
    s = run_tail(lab, "manual", "good", mode="manual")["summary"]
    assert s["decision"] == "needs-approval" and s["reasons"][-1] == "approve with: tlops promote manual 2"
    assert aliases("manual") == {"champion": "1", "challenger": "2"}
    event = registry.promote("manual", "2", reason="report reviewed", who="reviewer")
    assert event is not None and (event.action, event.from_version, event.who) == ("approve", "1", "reviewer")
    assert aliases("manual") == {"champion": "2"}


@pytest.mark.parametrize(("gate", "kind", "reason"), [
    ({"max_latency_p95_ms": 0.001}, "good", "latency p95"),
    ({"max_model_size_mb": 1}, "good", "MB > maximum 1 MB"),
    ({"min_class_recall": 0.5, "min_accuracy": 0.0}, "worse", "lowest class recall 0.0000 (class 0) < minimum"),
])
def test_serving_and_per_class_limits_reject(lab: dict, gate: dict, kind: str, reason: str) -> None:
    name = "limit-" + next(iter(gate)).replace("_", "-")
    s = run_tail(lab, name, kind, **gate)["summary"]
    assert s["decision"] == "reject" and any(reason in r for r in s["reasons"]), s["reasons"]
    assert "champion" not in aliases(name)


def test_a_champion_whose_files_are_gone_stops_the_evaluation_and_stays(lab: dict) -> None:
    # A model of its own: the files deleted below are shared by every version registered from it.
    run_tail(lab, "lost", "good", model_uri=log_model_run(lab["experiment"], lab["model_dirs"]["good"])[1])
    uri = registry.client().get_model_version_download_uri("lost", "1")
    files = Path(urlparse(uri).path)
    assert (files / "MLmodel").is_file()
    shutil.rmtree(files)
    with pytest.raises(TlopsError) as caught:
        run_tail(lab, "lost", "good")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("champion lost version 1 cannot be loaded for comparison")
    assert "tlops rollback lost" in message
    assert aliases("lost") == {"champion": "1"}
    assert len(registry.client().search_model_versions("name='lost'")) == 1  # nothing registered
