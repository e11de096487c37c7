"""Your own backbone: a checkpoint directory whose metadata is the reference preprocessing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tlops.config.settings import PreprocessConfig
from tlops.errors import TlopsError
from tlops.vision import backbones
from tlops.vision.parity import check_parity, edge_case_images

PREPROCESS = {"crop_size": 64, "resize_size": 73, "interpolation": "bilinear",
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def make_checkpoint(root: Path, built_with: str = "timm:mobilenetv3_small_050", **meta_overrides) -> Path:
    """Random weights of ``built_with``, and metadata that says so unless ``meta_overrides`` lie."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = backbones._build_architecture(built_with)
    torch.save(model.state_dict(), root / "weights.pt")
    digest = hashlib.sha256((root / "weights.pt").read_bytes()).hexdigest()
    meta = {"architecture": built_with, "weights": "weights.pt", "sha256": digest, "preprocess": PREPROCESS}
    meta.update(meta_overrides)
    (root / "backbone.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("architecture", ["timm:mobilenetv3_small_050", "torchvision:mobilenet_v3_small"])
def test_checkpoint_loads_with_its_own_reference(tmp_path: Path, architecture: str) -> None:
    name = f"checkpoint:{make_checkpoint(tmp_path / 'ckpt', architecture)}"
    info = backbones.get_info(name)
    assert info.family == "custom" and info.feature_dim > 0
    spec = backbones.reference_spec(name)
    assert (spec.crop_size, spec.interpolation, spec.mean) == (64, "bilinear", (0.485, 0.456, 0.406))
    assert "checkpoint metadata" in spec.source
    model = backbones.build_classifier(name, num_classes=3)
    saved = torch.load(tmp_path / "ckpt" / "weights.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.backbone.state_dict().items())
    # The checkpoint's own preprocessing passes parity; a 0.5/0.5 normalisation does not.
    assert check_parity(name, PreprocessConfig(), edge_case_images()).passed
    wrong = check_parity(name, PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), edge_case_images())
    assert not wrong.passed and any(e.startswith("mean") for e in wrong.errors)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"sha256": "0" * 64}, "sha256"),
        ({"architecture": "keras:resnet"}, "timm:<name> or torchvision:<name>"),
        ({"architecture": "timm:resnet18"}, "lacks"),  # weights of another architecture
        ({"weights": "../outside.pt"}, "inside"),
        ({"preprocess": {"crop_size": 64}}, "not a valid preprocessing spec"),
    ],
)
def test_bad_checkpoints_are_clear_errors(tmp_path: Path, meta: dict, message: str) -> None:
    backbones._custom_info.cache_clear()
    name = f"checkpoint:{make_checkpoint(tmp_path / 'ckpt', **meta)}"
    with pytest.raises(TlopsError, match=message):
        backbones.feature_extractor(name)


def test_missing_metadata(tmp_path: Path) -> None:
    with pytest.raises(TlopsError, match="backbone.json"):
        backbones.get_info(f"checkpoint:{tmp_path}")
