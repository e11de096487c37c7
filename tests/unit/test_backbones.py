from pathlib import Path

import pytest
import torch
from PIL import Image

from tlops.errors import TlopsError
from tlops.vision import backbones
from tlops.vision.preprocessing import build_transform


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return backbones.imagenet_model("efficientnet_lite0")


def _top(model: torch.nn.Module, image: Image.Image, k: int) -> list[str]:
    x = build_transform(backbones.reference_spec("efficientnet_lite0"))(image).unsqueeze(0)
    with torch.no_grad():
        idx = model(x).softmax(-1)[0].topk(k).indices
    from torchvision.models import ResNet18_Weights

    cats = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])  # ImageNet-1k's class names, in order
    return [cats[i] for i in idx]


def test_real_imagenet_weights_know_a_photo_of_coffee_and_a_cat(lite0: torch.nn.Module) -> None:
    from skimage import data

    assert _top(lite0, Image.fromarray(data.coffee()), 1) == ["espresso"]
    assert {"tiger cat", "Egyptian cat", "tabby"} & set(_top(lite0, Image.fromarray(data.chelsea()), 3))


def test_weights_checksum_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "efficientnet-lite0.pth"
    torch.save({"x": torch.zeros(1)}, fake)
    monkeypatch.setattr(backbones, "_lite0_weights_path", lambda: fake)
    with pytest.raises(TlopsError, match="sha256"):
        backbones.imagenet_model("efficientnet_lite0")


def test_unknown_backbone_lists_the_catalogue() -> None:
    with pytest.raises(TlopsError, match="efficientnet_lite0, resnet18, resnet50"):
        backbones.get_info("vgg99")


def test_torchvision_weights_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(TlopsError, match=r"resnet18 needs its IMAGENET1K_V1 weights at .*resnet18-f37072fd\.pth"):
        backbones.feature_extractor("resnet18")


def test_torchvision_weights_load_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in the torch cache is used, and its name's hash prefix is checked."""
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = backbones.torchvision_weights_path(backbones.get_info("resnet18"))
    path.parent.mkdir(parents=True)
    torch.save(resnet18(weights=None).state_dict(), path)  # right shapes, wrong content
    with pytest.raises(TlopsError, match="sha256"):
        backbones.feature_extractor("resnet18")


def test_classifier_shapes() -> None:
    model = backbones.build_classifier("efficientnet_lite0", num_classes=4, pretrained=False)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
