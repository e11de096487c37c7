"""The fine-tune step itself (as its component calls it) with each gradient adaptation strategy: the target manifest
read, only the adaptation pool fetched, the model and the source-only model written, the run tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tests.conftest import write_config
from tests.helpers.registry import step_inputs
from tlops import tracking
from tlops.config.settings import load_config
from tlops.data.discovery import build_manifest, write_manifest
from tlops.data.fontdigits import export_font_digits
from tlops.data.target import build_target_manifest, labelled_split, write_target_manifest
from tlops.fileio import write_json
from tlops.vision.parity import eval_spec


@pytest.mark.slow  # a step run each (the model logged and loaded back): about 40 s each under load
@pytest.mark.parametrize("strategy", ["self-training", "mcc"])
def test_the_fine_tune_step_adapts_and_tracks(strategy: str, tmp_path: Path, tiny_digits: Path) -> None:
    from tlops.steps import fine_tune_step

    export_font_digits(tmp_path / "unlabelled", per_class=6, classes=[0, 1, 7], seed=3)
    export_font_digits(tmp_path / "labelled", per_class=10, classes=[0, 1, 7], seed=11)
    cfg = load_config(write_config(
        tmp_path / "c.yaml", tmp_path / ".tlops", tracking__uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        data__target_uri=str(tmp_path / "unlabelled"), data__target_labelled_uri=str(tmp_path / "labelled"),
        train__strategy=strategy, train__epochs=1, train__batch_size=16, train__head_init="random",
        train__adaptation={"base": "linear-probe", "epochs": 1, "rounds": 2, "threshold": 0.05}))
    target = build_target_manifest(cfg, tmp_path / "cache")
    # The target test images vanish: a step that fetched one would stop on it (the data changed under the run).
    for uri in labelled_split(target, "test")["uri"]:
        Path(uri).unlink()
    write_manifest(build_manifest(str(tiny_digits), tmp_path / "cache"), tmp_path / "manifest.csv")
    write_target_manifest(target, tmp_path / "target.csv")
    write_json(tmp_path / "spec.json", eval_spec(cfg.backbone, cfg.preprocess).to_record())
    with mlflow.start_run(experiment_id=tracking.setup(cfg)) as run:
        pass
    inputs = step_inputs(tmp_path / "in", cfg, run.info.run_id)
    uri = fine_tune_step(inputs["plan"], str(tmp_path / "manifest.csv"), str(tmp_path / "spec.json"),
                         str(tmp_path / "model"), str(tmp_path / "serving.json"),
                         target_manifest_path=str(tmp_path / "target.csv"), reference_dir=str(tmp_path / "source"))
    assert uri.startswith("models:/")
    assert {p.name for p in (tmp_path / "source").iterdir()} >= {"weights.pt", "model.json"}
    client = mlflow.MlflowClient()
    data = client.get_run(run.info.run_id).data
    assert data.tags["train.strategy"] == strategy and data.tags["train.adaptation_base"] == "linear-probe"
    units = client.get_metric_history(run.info.run_id, "adapt_unit")
    assert [m.value for m in units] == ([1.0, 2.0] if strategy == "self-training" else [1.0])
    assert client.get_metric_history(run.info.run_id, "target_val_accuracy")
    if strategy == "self-training":
        assert len(client.get_metric_history(run.info.run_id, "pseudo_labels")) == 2
