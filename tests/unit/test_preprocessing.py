import io

import numpy as np
import pytest
import torch
from PIL import Image

from tlops.config.settings import PreprocessConfig
from tlops.vision.backbones import reference_spec
from tlops.vision.parity import check_parity, eval_spec, independent_reference_transform
from tlops.vision.preprocessing import PreprocessSpec, build_transform, decode, spec_diff, with_resolution


def _photo(w: int = 300, h: int = 200, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def test_lite0_reference_comes_from_timm_pretrained_cfg() -> None:
    import timm

    spec = reference_spec("efficientnet_lite0")
    cfg = timm.get_pretrained_cfg("tf_efficientnet_lite0").to_dict()
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    assert spec.interpolation == cfg["interpolation"]
    assert spec.crop_size == cfg["input_size"][-1] and spec.resize_size == int(224 / cfg["crop_pct"])
    assert "tf_efficientnet_lite0" in spec.source


def test_torchvision_reference_comes_from_the_weights_enum() -> None:
    from torchvision.models import ResNet50_Weights

    spec = reference_spec("resnet50")
    preset = ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert spec.resize_size == preset.resize_size[0] and spec.crop_size == preset.crop_size[0]
    assert spec.mean == tuple(preset.mean) and spec.interpolation == preset.interpolation.value


def test_fingerprint_is_stable_and_sensitive() -> None:
    spec = reference_spec("efficientnet_lite0")
    again = PreprocessSpec.from_record(spec.to_record())
    assert again.fingerprint == spec.fingerprint
    for change in ({"mean": (0.485, 0.456, 0.406)}, {"channel_order": "BGR"}, {"interpolation": "bilinear"},
                   {"scale": 1.0}, {"resize_rule": "direct"}, {"exif_transpose": False}):
        assert spec.replace(**change).fingerprint != spec.fingerprint, change
    # Provenance is not part of the identity.
    assert spec.replace(source="elsewhere").fingerprint == spec.fingerprint


def test_tampered_record_is_refused() -> None:
    rec = reference_spec("efficientnet_lite0").to_record()
    rec["spec"]["mean"] = [0.4, 0.4, 0.4]
    with pytest.raises(Exception, match="fingerprint"):
        PreprocessSpec.from_record(rec)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50"])
def test_transform_matches_the_weights_own_transform(backbone: str) -> None:
    spec = reference_spec(backbone)
    ours = build_transform(spec)(_photo())
    theirs = independent_reference_transform(backbone, spec)(_photo())
    assert ours.shape == (3, spec.crop_size, spec.crop_size)
    assert float((ours - theirs).abs().max()) < 1e-4


def test_decode_handles_modes_and_exif_rotation() -> None:
    spec = reference_spec("efficientnet_lite0")
    for mode in ("L", "RGBA", "P", "CMYK"):
        assert decode(_photo(mode=mode), spec).mode == "RGB"
    img = _photo(300, 200)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode(buf.getvalue(), spec).size == (200, 300)
    assert decode(buf.getvalue(), spec.replace(exif_transpose=False)).size == (300, 200)


def test_bgr_is_a_channel_flip() -> None:
    spec = reference_spec("efficientnet_lite0")
    rgb = build_transform(spec)(_photo())
    bgr = build_transform(spec.replace(channel_order="BGR"))(_photo())
    assert torch.equal(rgb.flip(0), bgr)


def test_eval_spec_applies_declared_overrides_and_parity_reports_them() -> None:
    spec = eval_spec("efficientnet_lite0", PreprocessConfig(image_size=96, allow_resolution_change=True))
    assert (spec.crop_size, spec.resize_size) == (96, 109)
    assert set(spec_diff(reference_spec("efficientnet_lite0"), spec)) == {"crop_size", "resize_size"}
    assert with_resolution(reference_spec("efficientnet_lite0"), 224) == reference_spec("efficientnet_lite0")


def test_parity_refuses_undeclared_or_forbidden_changes(tmp_path) -> None:
    from tlops.vision.parity import golden_set

    img = tmp_path / "a.png"
    _photo().save(img)
    golden = golden_set([str(img)])
    ok = check_parity("efficientnet_lite0", PreprocessConfig(image_size=64, allow_resolution_change=True), golden)
    assert ok.passed and ok.declared and ok.golden and ok.golden[0]["max_abs_diff"] < 1e-4
    undeclared = check_parity("efficientnet_lite0", PreprocessConfig(image_size=64), golden)
    assert not undeclared.passed and "allow_resolution_change" in undeclared.errors[0]
    imagenet = check_parity("efficientnet_lite0", PreprocessConfig(mean=(0.485, 0.456, 0.406)), golden)
    assert not imagenet.passed and any(e.startswith("mean") for e in imagenet.errors)
    bgr = check_parity("efficientnet_lite0", PreprocessConfig(channel_order="BGR"), golden)
    assert not bgr.passed


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}, "mean"),
        ({"channel_order": "BGR"}, "channel_order"),
        ({"interpolation": "bilinear"}, "interpolation"),
        ({"scale": 1.0}, "scale"),
        ({"resize_rule": "direct"}, "resize_rule"),
        ({"exif_transpose": False}, "exif_transpose"),
    ],
)
def test_each_classic_mismatch_is_caught_by_fields_and_by_numbers(override: dict, field: str) -> None:
    from tlops.vision.parity import edge_case_images

    report = check_parity("efficientnet_lite0", PreprocessConfig(**override), edge_case_images())
    assert not report.passed
    assert any(e.startswith(field) for e in report.errors)
    assert any(not g["ok"] for g in report.golden)  # the golden images move, not only the spec


def test_correct_spec_passes_on_every_edge_case() -> None:
    from tlops.vision.parity import edge_case_images

    cases = edge_case_images()
    assert {"greyscale.png", "rgba.png", "cmyk.jpg", "exif-rotated.jpg", "wide.png", "tall.png",
            "tiny.png"} <= {n for n, _ in cases}
    report = check_parity("efficientnet_lite0", PreprocessConfig(), cases)
    assert report.passed, report.errors
    assert max(g["max_abs_diff"] for g in report.golden) < 1e-4
    assert {d["image"] for d in report.decoder} == {n for n, _ in cases}


def test_serving_path_that_drops_exif_transpose_is_caught() -> None:
    import pandas as pd

    from tlops.config.settings import GateConfig
    from tlops.registry import decide
    from tlops.serving.pyfunc import Predictor
    from tlops.vision.backbones import build_classifier
    from tlops.vision.parity import edge_case_images, serving_check

    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", num_classes=3, pretrained=False).eval()
    spec = with_resolution(reference_spec("efficientnet_lite0"), 64)

    class Served:
        def __init__(self, serving_spec: PreprocessSpec) -> None:
            self.predictor = Predictor(model, serving_spec, ["a", "b", "c"])

        def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
            return self.predictor.predict_frame(list(frame["image"]))

    cases = edge_case_images()
    assert serving_check(model, spec, Served(spec), cases)["status"] == "pass"
    broken = serving_check(model, spec, Served(spec.replace(exif_transpose=False)), cases)
    assert broken["status"] == "fail"
    assert [r["image"] for r in broken["images"] if not r["ok"]] == ["exif-rotated.jpg"]
    gate = decide({"accuracy": 1.0}, None, GateConfig(), validation_ok=True, parity_ok=broken["status"] == "pass")
    assert gate.decision == "reject" and "preprocessing parity failed" in gate.reasons
