"""Every gradient strategy on tiny real digits (32 px, a few steps): what trains, what stays frozen."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import run_cli
from tlops.config.settings import AugmentConfig, TrainConfig, load_config
from tlops.data.discovery import class_names
from tlops.errors import TlopsError
from tlops.training.finetune import fine_tune
from tlops.training.optim import class_weights, make_plan, param_groups, warmup_cosine
from tlops.training.state import FitResult
from tlops.vision.backbones import build_classifier, feature_extractor
from tlops.vision.preprocessing import PreprocessSpec, build_transform
from tlops.vision.stages import Stage, split_stages

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def pretrained_stages() -> list[dict[str, torch.Tensor]]:
    """Every tensor of every stage of the pre-trained backbone (weights and BatchNorm statistics)."""
    return [st.state() for st in split_stages(feature_extractor(BACKBONE))]


def quick(**overrides: object) -> TrainConfig:
    # head_init random: these tests look at the gradient mechanics, not at LP-FT (tests/unit/test_lpft.py)
    base: dict[str, object] = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "num_threads": 2, "resume": False,
                               "patience": None, "warmup_epochs": 0.0, "head_init": "random"}
    return TrainConfig(**{**base, **overrides})


def train(manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path, **overrides: object) -> FitResult:
    return fine_tune(BACKBONE, manifest, class_names(manifest), spec, quick(**overrides), workdir=tmp_path)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stage_states(result: FitResult) -> list[dict[str, torch.Tensor]]:
    return [st.state() for st in split_stages(result.model.backbone)]


def running_means(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith("running_mean")}


def test_full_trains_every_stage_and_the_loss_falls(manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path,
                                                    pretrained_stages: list[dict[str, torch.Tensor]]) -> None:
    result = train(manifest, spec, tmp_path, strategy="full")
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    for before, after in zip(pretrained_stages, stage_states(result), strict=True):
        assert not same(before, after)
        # BatchNorm in train mode: its running statistics moved too.
        assert not same(running_means(before), running_means(after))
    assert result.strategy == "full" and result.environment["device"] == "cpu"


def test_partial_keeps_the_frozen_stages_bit_for_bit(manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path,
                                                     pretrained_stages: list[dict[str, torch.Tensor]]) -> None:
    result = train(manifest, spec, tmp_path, strategy="partial", frozen_stages=4)
    after = stage_states(result)
    for i in range(4):  # weights and BatchNorm running statistics (eval mode), exactly as pre-trained
        assert same(pretrained_stages[i], after[i]), f"frozen stage {i} changed"
    for i in range(4, len(after)):
        assert not same(pretrained_stages[i], after[i]), f"trained stage {i} did not change"
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]


def test_gradual_trains_the_head_first_then_unfreezes_from_the_top(
        manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path,
        pretrained_stages: list[dict[str, torch.Tensor]]) -> None:
    result = train(manifest, spec, tmp_path, strategy="gradual", epochs=3, gradual_head_epochs=1,
                   gradual_unfreeze_every=1)
    n = len(pretrained_stages)
    assert [h["frozen_stages"] for h in result.history] == [n, n - 1, n - 2]
    # The weights after the last epoch (the returned model is the best epoch's, which may be earlier).
    last = build_classifier(BACKBONE, 3, pretrained=False)
    last.load_state_dict(torch.load(Path(str(result.checkpoint_dir)) / "last.pt", weights_only=True)["model"])
    after = [st.state() for st in split_stages(last.backbone)]
    for i in range(n - 2):
        assert same(pretrained_stages[i], after[i]), f"stage {i} should still be frozen"
    assert not same(pretrained_stages[n - 1], after[n - 1])
    assert not same(pretrained_stages[n - 2], after[n - 2])


def test_gradual_head_epoch_changes_nothing_but_the_head(manifest: pd.DataFrame, spec: PreprocessSpec,
                                                         tmp_path: Path,
                                                         pretrained_stages: list[dict[str, torch.Tensor]]) -> None:
    result = train(manifest, spec, tmp_path, strategy="gradual", epochs=1)
    assert all(same(b, a) for b, a in zip(pretrained_stages, stage_states(result), strict=True))
    assert result.model.head.weight.abs().sum() > 0


def test_scratch_starts_from_random_weights(manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path,
                                            pretrained_stages: list[dict[str, torch.Tensor]]) -> None:
    result = train(manifest, spec, tmp_path, strategy="scratch", epochs=1)
    stem = stage_states(result)[0]
    weight = next(k for k in stem if k.endswith("weight") and stem[k].ndim == 4)
    # Far from the pre-trained stem: random init plus a few steps, not pre-trained plus a few steps.
    assert (stem[weight] - pretrained_stages[0][weight]).abs().mean() > 0.1
    plan = make_plan(build_classifier(BACKBONE, 3, pretrained=False), quick(strategy="scratch", lr=0.01))
    assert set(plan.stage_lrs) == {0.01} and plan.head_lr == 0.01


def test_freeze_bn_stats_keeps_running_statistics_while_weights_train(
        manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path,
        pretrained_stages: list[dict[str, torch.Tensor]]) -> None:
    result = train(manifest, spec, tmp_path, strategy="full", epochs=1, freeze_bn_stats=True)
    for before, after in zip(pretrained_stages, stage_states(result), strict=True):
        assert same(running_means(before), running_means(after))
        assert not same(before, after)


def test_param_groups_layer_decay_and_no_weight_decay_on_norms() -> None:
    model = build_classifier(BACKBONE, 3, pretrained=False)
    cfg = quick(strategy="full", lr=0.1, backbone_lr_factor=0.5, layer_decay=0.5, weight_decay=0.05)
    plan = make_plan(model, cfg)
    n = len(plan.stages)
    assert plan.stage_lrs == pytest.approx([0.1 * 0.5 * 0.5 ** (n - 1 - i) for i in range(n)])
    groups = param_groups(model, plan, cfg.weight_decay)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == 0.1 and by_name["head"]["weight_decay"] == 0.05
    assert by_name["head.no_decay"]["weight_decay"] == 0.0  # the bias
    assert by_name["stem.no_decay"]["lr"] == pytest.approx(0.1 * 0.5 * 0.5 ** (n - 1))
    assert all(p.ndim <= 1 for p in by_name["stem.no_decay"]["params"])  # BatchNorm scale and shift


def test_stage_split_of_a_torchvision_resnet_and_a_refusal() -> None:
    from torchvision.models import resnet18

    backbone = resnet18()
    backbone.fc = torch.nn.Identity()  # as tlops builds it: the classifier replaced by a new head
    names = [s.name for s in split_stages(backbone)]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    with pytest.raises(TlopsError, match="cannot split a Sequential"):
        split_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))


def test_partial_freezing_every_stage_is_refused() -> None:
    model = build_classifier(BACKBONE, 3, pretrained=False)
    with pytest.raises(TlopsError, match="frozen_stages is 9 but the backbone has 9 stages"):
        make_plan(model, quick(strategy="partial", frozen_stages=9))


def test_stage_state_covers_batchnorm_buffers() -> None:
    stage = Stage("x", [torch.nn.BatchNorm2d(4)])
    assert {"0.running_mean", "0.running_var", "0.num_batches_tracked", "0.weight", "0.bias"} == set(stage.state())


def test_warmup_then_cosine_to_zero() -> None:
    f = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0, abs=1e-12)


def test_class_weights_balance_counts() -> None:
    w = class_weights([0, 0, 0, 1], 3)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])


def test_class_weighted_loss_and_sgd_train(manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path) -> None:
    result = train(manifest, spec, tmp_path, strategy="partial", frozen_stages=8, optimizer="sgd", lr=0.05,
                   class_weighted_loss=True, label_smoothing=0.0, grad_clip_norm=None, channels_last=False)
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]


def test_early_stopping_keeps_the_best_epoch(manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path) -> None:
    # A learning rate of ~0 and frozen BatchNorm statistics: validation accuracy never improves after epoch 1.
    result = train(manifest, spec, tmp_path, strategy="partial", frozen_stages=8, epochs=6, lr=1e-12, patience=2,
                   freeze_bn_stats=True)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 0
    best = torch.load(Path(str(result.checkpoint_dir)) / "best.pt", weights_only=True)
    assert best["epoch"] == 0 and same(best["model"], result.model.state_dict())


def test_augmentation_changes_training_inputs_but_never_the_eval_spec(
        manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path) -> None:
    from tlops.serving.pyfunc import load_model_dir, save_model_dir
    from tlops.training.loaders import build_train_transform

    path = manifest["path"].iloc[0]
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(build_train_transform(spec, AugmentConfig())(path, gen), build_transform(spec)(path))
    aug = AugmentConfig(random_resized_crop=True, crop_scale=(0.3, 0.6), hflip=True)
    augmented = build_train_transform(spec, aug)
    a = augmented(path, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32) and not torch.equal(a, build_transform(spec)(path))
    assert torch.equal(a, augmented(path, torch.Generator().manual_seed(1)))  # seeded: reproducible
    # The normalisation is the spec's: pixels of a digit scan (0..255) map into [-1, 1] with mean = std = 0.5.
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6
    fingerprint = spec.fingerprint
    result = train(manifest, spec, tmp_path, strategy="partial", frozen_stages=8, epochs=1, augment=aug)
    assert spec.fingerprint == fingerprint
    save_model_dir(tmp_path / "m", result.model, BACKBONE, class_names(manifest), spec)
    assert load_model_dir(tmp_path / "m")[1].fingerprint == fingerprint


def test_epochs_default_by_strategy_and_a_bad_strategy_is_named() -> None:
    assert TrainConfig().epochs == 200  # linear probe: L-BFGS iterations
    assert TrainConfig(strategy="full").epochs == 10
    assert TrainConfig(strategy="full", epochs=3).epochs == 3
    assert load_config(overrides=["train.strategy=gradual"]).train.epochs == 10
    with pytest.raises(TlopsError, match="field train.strategy: Input should be 'linear-probe', 'partial', 'full', "
                                         "'gradual', 'scratch', 'adabn', 'self-training', 'mcc' or 'auto'"):
        load_config(overrides=["train.strategy=bogus"])


def test_cli_rejects_a_bad_strategy_in_one_line(tmp_path: Path) -> None:
    result = run_cli("run", "--set", "train.strategy=bogus", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config: field train.strategy:"), result.stderr
    assert "'scratch'" in lines[0]


def test_autocast_and_channels_last_paths_run_on_cpu(manifest: pd.DataFrame, spec: PreprocessSpec,
                                                      tmp_path: Path) -> None:
    # The GPU code paths (autocast, channels_last) exercised on the CPU: bf16 autocast, NHWC tensors.
    result = train(manifest, spec, tmp_path, strategy="partial", frozen_stages=7, epochs=1, amp=True,
                   channels_last=True)
    assert result.environment["amp_dtype"] == "bfloat16" and result.environment["channels_last"] is True
    assert 0 < result.history[0]["train_loss"] < 5
    assert result.model.head.weight.dtype == torch.float32  # autocast never changes the stored weights
