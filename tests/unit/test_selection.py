"""Backbone selection on real digits: the ranking, the feature cache it shares, budgets, task similarity and
the choices the validate step records for ``backbone: auto`` and ``train.strategy: auto``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.registry import restored_mlflow_uris
from tlops.cli import main
from tlops.config.settings import Config, SelectionConfig
from tlops.errors import TlopsError
from tlops.selection.planner import plan_run, resolved_config
from tlops.selection.ranking import CandidateScore, choose
from tlops.selection.similarity import recommend, reference_images, task_similarity, verdict

CANDIDATES = "efficientnet_lite0,efficientnet_lite0:random,efficientnet_lite0:shuffled,resnet18"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tlops.data.discovery import export_digits

    root = tmp_path_factory.mktemp("select") / "digits"
    export_digits(root, per_class=30)
    return root


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    root = tmp_path_factory.mktemp("select-work")
    with restored_mlflow_uris():
        yield Config.model_validate({
            "workdir": str(root), "preprocess": {"image_size": 96, "allow_resolution_change": True},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}, "train": {"num_threads": 2},
            "selection": {"candidates": CANDIDATES.split(","), "sample": 500, "folds": 3}})


@pytest.fixture(scope="module")
def ranking(digits: Path, cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``tlops select`` as a user runs it (in this process: the features stay in this module's cache)."""
    import contextlib
    import io

    import yaml

    path = tmp_path_factory.mktemp("select-cfg") / "tlops.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["select", "--data", str(digits), "--candidates", CANDIDATES, "--config", str(path), "--format", "json"])
    assert done.value.code == 0
    return json.loads(out.getvalue())


def test_imagenet_lite0_ranks_above_random_and_shuffled_weights(ranking: dict) -> None:
    rows = {r["name"]: r for r in ranking["ranking"]}
    real, random, shuffled = (rows[f"efficientnet_lite0{v}"] for v in ("", ":random", ":shuffled"))
    assert ranking["ranking"][0]["name"] == "efficientnet_lite0" == ranking["best"]
    assert real["logme"] > random["logme"] and real["logme"] > shuffled["logme"]
    assert real["probe_accuracy"] > shuffled["probe_accuracy"]
    for row in (real, random, shuffled):
        assert row["status"] == "ok" and row["images_per_s"] > 0 and row["latency_ms"] > 0
        assert 13 < row["size_mb"] < 15 and row["feature_dim"] == 1280
    # No torchvision weights offline: that candidate fails alone, saying why.
    assert rows["resnet18"]["status"] == "failed" and "IMAGENET1K_V1 weights" in rows["resnet18"]["reason"]
    assert ranking["ranking"][-1]["name"] == "resnet18"


def test_ranking_is_logged_to_mlflow(ranking: dict, cfg: Config) -> None:
    import mlflow

    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(ranking["mlflow_run"])
    assert run.data.tags["backbone.selected"] == "efficientnet_lite0"
    assert run.data.metrics["select.efficientnet_lite0.logme"] == pytest.approx(ranking["ranking"][0]["logme"])
    assert "select.efficientnet_lite0_random.probe_accuracy" in run.data.metrics
    table = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/select/ranking.txt")
    assert "efficientnet_lite0:shuffled" in table and "IMAGENET1K_V1" in table


def test_linear_probe_reads_the_features_select_computed(ranking: dict, digits: Path, cfg: Config) -> None:
    from tlops.data.discovery import build_manifest, class_names
    from tlops.training.probe import linear_probe
    from tlops.vision.parity import eval_spec

    manifest = build_manifest(str(digits), Path(cfg.workdir) / "cache")
    fit = linear_probe("efficientnet_lite0", manifest, class_names(manifest), eval_spec(cfg.backbone, cfg.preprocess),
                       cfg.train.model_copy(update={"l2_grid": [1e-2], "epochs": 30}),
                       cache_dir=Path(cfg.workdir) / "cache" / "features")
    assert fit.environment["feature_cache"]["hits"] == 1  # the train split; the val split is new


def test_choice_respects_latency_and_size_budgets() -> None:
    scores = [CandidateScore("big", logme=0.5, probe_accuracy=0.9, latency_ms=40.0, size_mb=90.0),
              CandidateScore("small", logme=0.3, probe_accuracy=0.8, latency_ms=8.0, size_mb=14.0),
              CandidateScore("gone", status="failed", reason="weights missing")]
    assert choose(scores, SelectionConfig())[0] == "big"
    name, why = choose(scores, SelectionConfig(max_latency_ms=20))
    assert name == "small" and "latency <= 20 ms" in why and "over budget: big" in why and "gone unavailable" in why
    with pytest.raises(TlopsError, match="no candidate .* within size <= 5 MB"):
        choose(scores, SelectionConfig(max_size_mb=5))


def test_verdict_and_strategy_tables() -> None:
    assert verdict(0.1, 0.05) == "close" and verdict(0.1, 0.2) == "moderate" and verdict(0.7, 0.0) == "far"
    assert verdict(None, 0.5) == "far"
    assert recommend("close", 20) == "linear-probe" and recommend("far", 600) == "full"
    assert recommend("far", 10) == "partial" and recommend("moderate", 100) == "partial"


def test_digits_are_far_from_imagenet_and_photo_crops_close(digits: Path, cfg: Config, tmp_path: Path) -> None:
    from tlops.data.discovery import build_manifest

    far = task_similarity(cfg, build_manifest(str(digits), Path(cfg.workdir) / "cache"))
    photos = tmp_path / "photos"
    for p in reference_images(tmp_path / "crops", per_photo=6, seed=5):  # other crops than the reference's
        (photos / p.name.split("-")[0]).mkdir(parents=True, exist_ok=True)
        (photos / p.name.split("-")[0] / p.name).write_bytes(p.read_bytes())
    close = task_similarity(cfg, build_manifest(str(photos), Path(cfg.workdir) / "cache"))
    assert far.verdict == "far" and close.verdict == "close", (far, close)
    assert far.distance > 3 * close.distance
    assert far.strategy == "partial"  # far, and about 18 labelled images per class
    assert "far to the source domain" in far.why


def test_validate_step_resolves_auto_choices_for_later_steps(ranking: dict, digits: Path, cfg: Config) -> None:
    import mlflow

    from tlops import tracking
    from tlops.data.discovery import build_manifest

    two = cfg.selection.model_copy(update={"candidates": ["efficientnet_lite0:shuffled", "efficientnet_lite0"]})
    auto = cfg.model_copy(update={"backbone": "auto", "selection": two, "train": Config.model_validate(
        {"train": {"strategy": "auto"}}).train})
    manifest = build_manifest(str(digits), Path(cfg.workdir) / "cache")
    with mlflow.start_run(experiment_id=tracking.setup(auto)) as run:
        plan = plan_run(auto, manifest)
    assert plan == {"backbone": "efficientnet_lite0", "strategy": "partial"}
    resolved = resolved_config(auto, plan)
    assert resolved.backbone == "efficientnet_lite0" and resolved.train.strategy == "partial"
    assert resolved.train.epochs == 10  # epochs left unset: the default of the chosen strategy
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert "highest LogME" in tags["backbone.selection_reason"] and tags["similarity.verdict"] == "far"


def test_select_with_no_usable_candidate_is_one_line_error(digits: Path, cfg: Config,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = ["select", "--data", str(digits), "--set", f"workdir={cfg.workdir}", "--set", "preprocess.image_size=64",
            "--set", "preprocess.allow_resolution_change=true", "--set", f"tracking.uri={cfg.tracking.uri}"]
    assert main([*args, "--candidates", "vgg99,resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no candidate could be scored: ") and "\n" not in err
    assert "vgg99: unknown backbone 'vgg99'" in err
    assert "resnet18: backbone resnet18 needs its IMAGENET1K_V1 weights" in err
    assert main([*args, "--format", "xml"]) == 2
    assert "error: --format 'xml': choose table or json" in capsys.readouterr().err
    assert main([*args, "--sample", "3"]) == 2
    assert "--sample 3: pass at least 10 images" in capsys.readouterr().err
