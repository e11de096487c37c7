"""Domain adaptation on tiny real data: handwritten digits (source) and digits from the machine's fonts
(target), three classes, 32 px."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from tlops.data.discovery import build_manifest
from tlops.data.fontdigits import export_font_digits
from tlops.data.target import check_target_classes, cross_domain_leakage, target_pool
from tlops.errors import TlopsError
from tlops.training.adaptation import (
    AdaptConfig,
    adabn,
    adapt,
    batchnorm_layers,
    fine_tune_source,
    mcc,
    mcc_loss,
    select_pseudo_labels,
    self_train,
)
from tlops.vision.backbones import build_classifier, reference_spec
from tlops.vision.preprocessing import build_transform, with_resolution

CLASSES = ["0", "1", "7"]
CFG = AdaptConfig(epochs=1, batch_size=16, rounds=1, threshold=0.0, seed=0)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("target") / "fonts"
    export_font_digits(root, per_class=10, classes=[0, 1, 7], seed=3)
    return root


def tensors(manifest: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    transform = build_transform(with_resolution(reference_spec("efficientnet_lite0"), 32))
    x = torch.stack([transform(p) for p in manifest["path"]])
    return x, torch.tensor([CLASSES.index(str(lab)) for lab in manifest["label"]])


@pytest.fixture(scope="module")
def domains(tiny_digits: Path, target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    source = build_manifest(str(tiny_digits), cache)
    target = build_manifest(str(target_dir), cache)
    xs, ys = tensors(source[source["split"] == "train"].head(30))
    pool = target_pool(target)
    xt, _ = tensors(pool)
    return {"source": source, "target": target, "pool": pool, "xs": xs, "ys": ys, "xt": xt}


@pytest.fixture(scope="module")
def trained(domains: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", num_classes=3)
    fine_tune_source(model, domains["xs"], domains["ys"], CFG)
    return model


def test_adabn_changes_only_batchnorm_running_statistics(domains: dict) -> None:
    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adabn(model, domains["xt"], batch_size=16)
    after = model.state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "AdaBN changed nothing"
    assert all(k.endswith(stats) for k in changed), sorted(k for k in changed if not k.endswith(stats))[:5]
    assert {k for k in changed if k.endswith("running_mean")} == {
        f"{n}.running_mean" for n, m in model.named_modules() if m in batchnorm_layers(model)}
    assert not model.training and all(m.momentum is not None for m in batchnorm_layers(model))


@pytest.mark.slow
def test_self_training_and_mcc_train_on_tiny_data(trained: torch.nn.Module, domains: dict) -> None:
    model = copy.deepcopy(trained)
    result = self_train(model, domains["xs"], domains["ys"], domains["xt"], CFG)
    assert result.pseudo_labelled and max(result.pseudo_labelled) < len(domains["xt"])
    assert result.history and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                       trained.state_dict().values(), strict=True))
    # Class-balanced portions: about half the pool (each predicted class's most confident half) in round 1.
    half = AdaptConfig(**{**CFG.__dict__, "portion": 0.5, "threshold": 1.01})
    result = self_train(copy.deepcopy(trained), domains["xs"], domains["ys"], domains["xt"], half)
    assert 0.3 * len(domains["xt"]) <= len(result.pseudo_labelled) <= 0.7 * len(domains["xt"])
    torch.manual_seed(0)
    fresh = build_classifier("efficientnet_lite0", num_classes=3)
    result = mcc(fresh, domains["xs"], domains["ys"], domains["xt"], CFG)
    assert len(result.history) == 1 and result.history[0]["loss"] > 0


def test_pseudo_labels_never_include_target_test_images(domains: dict) -> None:
    target, pool = domains["target"], domains["pool"]
    test = target[target["split"] == "test"]
    assert len(test) > 0 and set(pool["sha256"]).isdisjoint(set(test["sha256"]))
    assert set(pool["split"]) <= {"train", "val"}
    # A pool that shares content with the test split is refused before any pseudo-label is drawn.
    leaky = list(pool["sha256"]) + [test["sha256"].iloc[0]]
    with pytest.raises(TlopsError, match="also in the target test split"):
        self_train(torch.nn.Linear(1, 1), domains["xs"], domains["ys"], domains["xt"], CFG,
                   pool_sha256=leaky, test_sha256=list(test["sha256"]))


def test_pseudo_labels_are_confident_and_class_balanced() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.85, 0.15], [0.99, 0.01], [0.1, 0.9], [0.5, 0.5]])
    idx, labels = select_pseudo_labels(probs, threshold=0.8)
    assert labels.tolist().count(0) == labels.tolist().count(1) == 1  # class 1 has one confident image
    assert set(idx.tolist()) == {3, 4}  # the most confident of class 0 kept
    none, _ = select_pseudo_labels(probs, threshold=0.999)
    assert none.numel() == 0


def test_mcc_loss_is_lower_for_confident_separate_predictions() -> None:
    confident = torch.eye(3).repeat(4, 1) * 10
    confused = torch.zeros(12, 3)
    assert mcc_loss(confident) < mcc_loss(confused)


def test_leakage_between_source_and_target_splits_is_caught(domains: dict, tiny_digits: Path,
                                                           tmp_path: Path) -> None:
    source, target = domains["source"], domains["target"]
    assert cross_domain_leakage(source, target, None).success
    # A source training image copied into the labelled target test set, and a target test image into the
    # unlabelled pool.
    labelled = target.copy()
    leaked = source[source["split"] == "train"].iloc[0]
    labelled.loc[labelled.index[0], ["sha256", "split"]] = [leaked["sha256"], "test"]
    result = cross_domain_leakage(source, target, labelled)
    assert not result.success and leaked["uri"] in result.detail and "source/train" in result.detail
    assert "\n" not in result.detail


def test_bad_target_input_is_one_line(domains: dict) -> None:
    with pytest.raises(TlopsError, match=r"class\(es\) 9 are not among the source's classes"):
        check_target_classes(CLASSES, pd.DataFrame({"label": ["0", "9"]}), "data.target_labelled_uri")
    with pytest.raises(TlopsError, match="set data.target_uri"):
        adapt("adabn", torch.nn.Linear(1, 1), domains["xs"], domains["ys"], None, CFG)


def test_self_training_reads_and_leaves_the_target_statistics(domains: dict) -> None:
    """Pseudo-labels are read with BatchNorm statistics re-estimated on the target pool, and the adapted
    model keeps them (not the mix of source and target batches that training leaves)."""
    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", num_classes=3)
    expected = copy.deepcopy(model)
    adabn(expected, domains["xt"], batch_size=16)
    nothing_confident = AdaptConfig(epochs=1, batch_size=16, rounds=1, threshold=1.01, seed=0)
    result = self_train(model, domains["xs"], domains["ys"], domains["xt"], nothing_confident)
    assert result.pseudo_labelled == [] and result.history == []
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_class_balanced_portion_is_each_class_own_threshold() -> None:
    """With a portion, every predicted class gets its most confident share, however low its confidence
    (here no image reaches 0.8, and class 1 is far less sure than class 0)."""
    probs = torch.tensor([[0.75, 0.25], [0.7, 0.3], [0.65, 0.35], [0.6, 0.4], [0.45, 0.55], [0.4, 0.6]])
    assert select_pseudo_labels(probs, threshold=0.8)[0].numel() == 0
    idx, labels = select_pseudo_labels(probs, threshold=0.8, portion=0.5)
    assert idx.tolist() == [0, 1, 5] and labels.tolist() == [0, 0, 1]
    idx, _ = select_pseudo_labels(probs, threshold=0.8, portion=0.01)  # at least one per predicted class
    assert idx.tolist() == [0, 5]
