"""``backbone: auto`` and a quiet scheduled night through the whole pipeline (slow: two pipeline runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.slow


def test_auto_backbone_run_then_a_skipped_run_on_the_same_data(tmp_path: Path, tiny_digits: Path) -> None:
    import mlflow

    cfg = write_config(tmp_path / "tlops.yaml", tmp_path / ".tlops", backbone="auto",
                       selection__candidates=["efficientnet_lite0", "efficientnet_lite0:shuffled", "resnet50"],
                       selection__skip_when="unchanged", registry__model_name="auto-digits")
    first = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:] + first.stdout[-2000:]
    assert "backbone       efficientnet_lite0: highest LogME" in first.stdout
    assert "resnet50 unavailable" in first.stdout and "auto-digits version 1" in first.stdout

    second = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:] + second.stdout[-2000:]
    assert "training skipped" in second.stdout
    assert "the data equals the training data of champion auto-digits version 1" in second.stdout
    assert "auto-digits version 1 (unchanged)" in second.stdout
    # The skipped branch ran instead of training: no fine-tune (no GPU pod on a cluster), no evaluate, no gate.
    assert "Executing task 'skip'" in second.stdout
    assert not any(f"Executing task '{t}'" in second.stdout for t in ("fine-tune", "evaluate", "gate"))
    assert "Executing task 'fine-tune'" in first.stdout

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / '.tlops' / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name = 'auto-digits'")] == ["1"]
    runs = client.search_runs(client.get_experiment_by_name("tlops").experiment_id,
                              order_by=["attributes.start_time ASC"])
    assert runs[0].data.tags["backbone.selected"] == "efficientnet_lite0"
    assert runs[-1].data.tags["run.skipped"] == "true" and runs[-1].data.tags["gate.decision"] == "skipped"
