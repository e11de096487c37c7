"""The whole pipeline with target data through kfp.local, as `tlops run` does it: digits scans as the source, digits
from the machine's fonts as the target (unlabelled, and a small labelled set whose test split the gate judges on)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config
from tlops.data.fontdigits import export_font_digits

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # one whole pipeline run with adaptation: about 100 s on 2 busy cores
def test_adabn_run_scores_both_domains_and_the_gate_holds_the_source(tmp_path: Path, tiny_digits: Path) -> None:
    import mlflow

    export_font_digits(tmp_path / "unlabelled", per_class=8, classes=[0, 1, 7], seed=3)
    export_font_digits(tmp_path / "labelled", per_class=10, classes=[0, 1, 7], seed=11)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops", train__strategy="adabn",
                       train__adaptation={"base": "linear-probe"}, gate__min_accuracy=0.0,
                       gate__max_source_regression=0.02, data__target_uri=str(tmp_path / "unlabelled"),
                       data__target_labelled_uri=str(tmp_path / "labelled"))
    # This checkout's components and pipelines, not whichever the environment would find first.
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    out = result.stdout
    assert "domains        target test: candidate" in out and "source test: candidate" in out
    assert "source-only" in out
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.tlops' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs(client.get_experiment_by_name("tlops").experiment_id)
    m = run.data.metrics
    assert {"target.candidate.test_accuracy", "source.candidate.test_accuracy", "source.source_only.test_accuracy",
            "target.source_only.test_accuracy", "data.target_images", "data.target_labelled_test"} <= set(m)
    assert m["test_images"] == m["data.target_labelled_test"]  # the headline figures are the target test split's
    # the adaptation phase's own row of the history: source and labelled-target validation accuracy
    assert {"adapt_unit", "adapt_images", "target_val_accuracy", "adaptation.target_images"} <= set(m)
    assert m["adaptation.target_images"] == m["data.target_images"] + m["data.target_labelled_train"] + \
        m["data.target_labelled_val"]  # the pool: unlabelled, and the labelled set's train and val, no test
    assert run.data.params["train.strategy"] == "adabn" and run.data.params["train.adaptation.base"] == "linear-probe"
    assert run.data.tags["train.adaptation_base"] == "linear-probe"
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "gate/decision.json", str(tmp_path)))
                         .read_text())
    src = summary["domains"]["source"]
    loss = src["source_only"]["accuracy"] - src["candidate"]["accuracy"]
    said = [r for r in summary["reasons"] if r.startswith("source test accuracy")]
    assert len(said) == 1 and (summary["decision"] == "reject") == (loss > 0.02), (loss, summary["reasons"])
    page = Path(client.download_artifacts(run.info.run_id, "evaluation/report.html", str(tmp_path))).read_text()
    assert "Target and source domains" in page and "source-only model" in page
