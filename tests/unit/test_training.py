from pathlib import Path

import torch

from tlops.config.settings import TrainConfig
from tlops.data.discovery import build_manifest, class_names
from tlops.serving.pyfunc import Predictor, load_model_dir, save_model_dir
from tlops.training.probe import linear_probe
from tlops.vision.backbones import reference_spec
from tlops.vision.preprocessing import with_resolution


def test_linear_probe_learns_keeps_backbone_frozen_and_round_trips(tmp_path: Path, tiny_digits: Path) -> None:
    df = build_manifest(str(tiny_digits), tmp_path / "c")
    classes = class_names(df)
    spec = with_resolution(reference_spec("efficientnet_lite0"), 32)
    from tlops.vision.backbones import feature_extractor

    pretrained = {k: v.clone() for k, v in feature_extractor("efficientnet_lite0").state_dict().items()}
    result = linear_probe("efficientnet_lite0", df, classes, spec, TrainConfig(l2_grid=[1e-3, 1e-1], epochs=100))
    assert result.best_val_accuracy > 0.8
    assert len(result.history) == 2
    # Frozen: every backbone tensor (weights and BatchNorm statistics) is exactly the pre-trained one.
    for k, v in result.model.backbone.state_dict().items():
        assert torch.equal(v, pretrained[k]), k
    # Saved and loaded back (weights_only), the model predicts the same from raw bytes.
    save_model_dir(tmp_path / "m", result.model, "efficientnet_lite0", classes, spec)
    model, spec2, classes2 = load_model_dir(tmp_path / "m")
    assert spec2.fingerprint == spec.fingerprint and classes2 == classes
    images = [Path(p).read_bytes() for p in df["path"][:6]]
    a = Predictor(result.model, spec, classes).predict_proba(images)
    b = Predictor(model, spec2, classes2).predict_proba(images)
    assert abs(a - b).max() < 1e-5


def test_same_seed_same_head(tmp_path: Path, tiny_digits: Path) -> None:
    df = build_manifest(str(tiny_digits), tmp_path / "c")
    spec = with_resolution(reference_spec("efficientnet_lite0"), 32)
    cfg = TrainConfig(l2_grid=[1e-2], epochs=50)
    a = linear_probe("efficientnet_lite0", df, class_names(df), spec, cfg).model.head.weight
    b = linear_probe("efficientnet_lite0", df, class_names(df), spec, cfg).model.head.weight
    assert torch.allclose(a, b, atol=1e-5)


def test_the_l2_sweeps_fits_side_by_side_give_what_they_give_one_after_another() -> None:
    from torch import nn

    from tlops.training.hardware import torch_threads
    from tlops.training.probe import _sweep_l2

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 2
    y = torch.arange(160) % 4
    x = (centres[y] + torch.randn(160, 32, generator=g)).relu()  # pooled features are non-negative
    cfg = TrainConfig(epochs=50, l2_grid=[1e-4, 1e-2, 1.0, 10.0])
    heads, results = [], []
    with torch_threads(1):  # as fit_head runs it
        for workers in (1, 2, 4):
            head = nn.Linear(32, 4)
            results.append(_sweep_l2(head, x[:120], y[:120], x[120:], y[120:], cfg, workers))
            heads.append(head.state_dict())
    history, best, _ = results[0]
    assert [h["l2"] for h in history] == cfg.l2_grid and history[-1]["train_loss"] > history[0]["train_loss"]
    for result, state in zip(results[1:], heads[1:], strict=True):
        assert result == results[0]  # the same history, best fit and accuracy, in the grid's order
        for name, tensor in state.items():
            assert torch.equal(tensor, heads[0][name]), name
    assert 0 <= best < len(cfg.l2_grid)
