"""Feature drift (MMD with a permutation test) and the skip decision of a scheduled run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers.registry import log_model_run, new_version, restored_mlflow_uris, use_store
from tlops.config.settings import Config
from tlops.data.discovery import build_manifest, manifest_hash, write_manifest
from tlops.selection.drift import SKIP_REASON_TAG, SKIP_TAG, decide_skip, feature_drift, mmd_test
from tlops.selection.similarity import reference_images


def test_mmd_permutation_test_on_gaussians() -> None:
    rng = np.random.default_rng(0)
    same = mmd_test(rng.normal(size=(60, 5)), rng.normal(size=(60, 5)), permutations=200, seed=1)
    shifted = mmd_test(rng.normal(size=(60, 5)), rng.normal(0.8, 1.0, size=(60, 5)), permutations=200, seed=1)
    assert same.p_value > 0.05 and shifted.p_value < 0.01
    assert shifted.statistic > same.statistic
    assert shifted.p_value >= 1 / 201  # the observed split counts as one permutation: never exactly 0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("drift")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with restored_mlflow_uris():
        use_store(uri, root / "artifacts")
        yield uri, root


@pytest.fixture(scope="module")
def manifests(tiny_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    root = tmp_path_factory.mktemp("drift-data")
    photos = root / "photos"
    for p in reference_images(root / "crops", per_photo=8, seed=3):
        dest = photos / p.name.split("-")[0]
        dest.mkdir(parents=True, exist_ok=True)
        (dest / p.name).write_bytes(p.read_bytes())
    digits = build_manifest(str(tiny_digits), root / "cache")
    order = np.random.default_rng(0).permutation(len(digits))
    half = len(digits) // 2
    return {"digits": digits, "photos": build_manifest(str(photos), root / "cache"),
            "half_a": digits.iloc[np.sort(order[:half])], "half_b": digits.iloc[np.sort(order[half:])]}


def config(uri: str, root: Path, **selection: object) -> Config:
    return Config.model_validate({
        "workdir": str(root / "work"), "preprocess": {"image_size": 32, "allow_resolution_change": True},
        "tracking": {"uri": uri}, "registry": {"model_name": "drift-digits"},
        "selection": {"drift_permutations": 200, **selection}})


def test_drift_between_digits_and_photos_not_between_halves_of_digits(
        store: tuple[str, Path], manifests: dict[str, pd.DataFrame]) -> None:
    cfg = config(*store)
    photos = feature_drift(cfg, manifests["photos"], manifests["digits"])
    halves = feature_drift(cfg, manifests["half_a"], manifests["half_b"])
    assert photos.p_value < 0.01, photos
    assert halves.p_value > 0.05, halves
    assert photos.statistic > 10 * max(halves.statistic, 1e-3)
    assert (halves.n_new, halves.n_reference) == (len(manifests["half_a"]), len(manifests["half_b"]))


def test_scheduled_run_skips_only_without_new_data_or_drift(store: tuple[str, Path], tiny_models: dict[str, Path],
                                                            manifests: dict[str, pd.DataFrame]) -> None:
    import mlflow

    uri, root = store
    digits = manifests["digits"]
    exp = use_store(uri)
    run_id, model_uri = log_model_run(exp, tiny_models["good"], {"data.manifest_hash": manifest_hash(digits)})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(write_manifest(digits, root / "champion" / "manifest.csv")), "validation")
    version = new_version(model_uri, "drift-digits")
    mlflow.MlflowClient().set_registered_model_alias("drift-digits", "champion", version)

    def decide(data: pd.DataFrame, **selection: object) -> tuple[dict, str | None]:
        cfg = config(uri, root, **selection)
        with mlflow.start_run(experiment_id=exp) as run:
            out = decide_skip(cfg, data)
        tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags  # what the run records for a person
        return out, (tags.get(SKIP_REASON_TAG) if tags.get(SKIP_TAG) == "true" else None)

    same, why = decide(digits.copy(), skip_when="unchanged")
    assert same["skipped"] and not same["new_data"] and why and "equals the training data" in why
    quiet, why = decide(manifests["half_a"], skip_when="no-drift", drift=True)
    assert quiet["new_data"] and quiet["drift"] == "no drift" and quiet["skipped"] and "no feature drift" in why
    shifted, why = decide(manifests["photos"], skip_when="no-drift", drift=True)
    assert shifted["drift"] == "drift" and not shifted["skipped"] and why is None
    assert shifted["mmd"]["p_value"] < 0.05
    changed, why = decide(manifests["half_a"], skip_when="unchanged")
    assert not changed["skipped"] and why is None
    tags = mlflow.MlflowClient().search_runs([exp], max_results=1, order_by=["attributes.start_time DESC"])[0]
    assert tags.data.tags["run.skipped"] == "false" and tags.data.tags["data.new"] == "true"


def test_skipped_run_registers_nothing_and_records_why(store: tuple[str, Path], tmp_path: Path) -> None:
    """The pipeline's skip branch (instead of fine-tune, evaluate, gate), given a run the validate step marked
    skipped: no model, champion unchanged, the decision and its reason recorded."""
    import json

    import mlflow

    from tlops.cli import format_summary
    from tlops.config.plan import RunPlan
    from tlops.steps import skip_step

    uri, root = store
    cfg = config(uri, root, skip_when="unchanged").model_copy(
        update={"registry": Config().registry.model_copy(update={"model_name": "skip-digits"})})
    with mlflow.start_run(experiment_id=use_store(uri)) as run:
        mlflow.set_tags({"run.skipped": "true", "run.skip_reason": "the data equals the training data of champion",
                         "validation": "pass", "data.manifest_hash": "f" * 64, "drift.status": "not measured"})
    run_id = run.info.run_id
    plan = RunPlan(run_id=run_id, config=cfg, decision="skip",
                   reasons=["the data equals the training data of champion"], manifest_hash="f" * 64,
                   validation={"status": "pass"}, choices={"drift": "not measured"})
    summary = json.loads(skip_step(str(plan.write(tmp_path / "run_plan.json")), str(tmp_path / "decision.json")))
    assert summary["decision"] == "skipped" and summary["champion_now"] is None
    assert summary["reasons"] == ["the data equals the training data of champion"]
    assert json.loads((tmp_path / "decision.json").read_text()) == summary
    assert not mlflow.MlflowClient().search_registered_models("name = 'skip-digits'")
    assert mlflow.MlflowClient().get_run(run_id).data.tags["gate.decision"] == "skipped"
    assert "training skipped" in format_summary({**summary, "log": "x.log"}, 3.0)
