"""Preprocessing parity: the fine-tuning eval spec against the backbone's reference, in fields and numbers."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from tlops.config.settings import PreprocessConfig
from tlops.vision.backbones import CHECKPOINT_PREFIX, get_info, reference_spec
from tlops.vision.preprocessing import PreprocessSpec, build_transform, spec_diff, with_resolution

# Fields whose difference from the reference is never acceptable: the backbone's weights assume them.
STRICT_FIELDS = ("mean", "std", "scale", "channel_order", "color_mode", "layout", "dtype", "interpolation",
                 "resize_rule", "crop", "exif_transpose", "antialias", "decoder")
# Fields that may differ when the config declares it (preprocess.allow_resolution_change).
RESOLUTION_FIELDS = ("crop_size", "resize_size")
GOLDEN_ATOL = 1e-4  # max |difference| between our transform and the weights' own, per tensor element
SERVING_ATOL = 1e-4  # max |difference| between served and in-memory class probabilities


def eval_spec(backbone: str, pcfg: PreprocessConfig) -> PreprocessSpec:
    """The spec fine-tuning, evaluation and serving will use: the reference plus declared overrides."""
    spec = reference_spec(backbone)
    if pcfg.image_size is not None:
        spec = with_resolution(spec, pcfg.image_size)
    changes = {
        k: getattr(pcfg, k)
        for k in ("interpolation", "channel_order", "scale", "resize_rule", "exif_transpose")
        if getattr(pcfg, k) is not None
    }
    if pcfg.mean is not None:
        changes["mean"] = tuple(pcfg.mean)
    if pcfg.std is not None:
        changes["std"] = tuple(pcfg.std)
    return spec.replace(**changes) if changes else spec


def independent_reference_transform(backbone: str, spec: PreprocessSpec,
                                    stored_reference: PreprocessSpec | None = None):  # noqa: ANN201
    """The weights' own eval transform, built by timm or torchvision, at ``spec``'s resolution.

    A custom checkpoint's reference is its metadata; ``stored_reference`` (the copy saved with a model)
    stands in when the checkpoint directory is no longer there.
    """
    if backbone.startswith(CHECKPOINT_PREFIX):
        return _torchvision_compose(stored_reference or reference_spec(backbone), spec)
    info = get_info(backbone)
    if info.family == "timm-wheel":
        import timm
        from timm.data import create_transform, resolve_data_config

        pretrained = timm.get_pretrained_cfg(info.arch)
        assert pretrained is not None, info.arch  # reference_spec() already required it
        cfg = resolve_data_config({"input_size": (3, spec.crop_size, spec.crop_size)},
                                  pretrained_cfg=pretrained.to_dict())
        return create_transform(**cfg)
    from torchvision.models import get_model_weights
    from torchvision.transforms._presets import ImageClassification

    weights = get_model_weights(info.arch)[info.weights]
    preset = weights.transforms()
    return ImageClassification(crop_size=spec.crop_size, resize_size=spec.resize_size, mean=preset.mean,
                               std=preset.std, interpolation=preset.interpolation, antialias=preset.antialias)


def _torchvision_compose(reference: PreprocessSpec, spec: PreprocessSpec):  # noqa: ANN202
    """A custom checkpoint's reference as classic torchvision transforms, written from its metadata alone."""
    from torchvision import transforms as T

    interp = T.InterpolationMode(reference.interpolation)
    steps: list[Any] = (
        [T.Resize(spec.resize_size, interpolation=interp, antialias=reference.antialias),
         T.CenterCrop(spec.crop_size)]
        if reference.resize_rule == "shorter-side-then-crop"
        else [T.Resize((spec.crop_size, spec.crop_size), interpolation=interp, antialias=reference.antialias)]
    )
    steps += [T.PILToTensor(), T.Lambda(lambda x: x.float() * reference.scale),
              T.Normalize(reference.mean, reference.std)]
    if reference.channel_order == "BGR":
        steps.append(T.Lambda(lambda x: x.flip(0)))
    return T.Compose(steps)


def reference_decode(data: bytes) -> Image.Image:
    """An independent decode of a file as the reference pipelines expect it: EXIF upright, RGB."""
    img = Image.open(io.BytesIO(data))
    return ImageOps.exif_transpose(img).convert("RGB")


def edge_case_images() -> list[tuple[str, bytes]]:
    """Files that trip preprocessing code, all from one real photo (scikit-image's ``chelsea``)."""
    from skimage import data as skdata

    photo = Image.fromarray(skdata.chelsea())  # 451 x 300, RGB

    def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rotated = photo.transpose(Image.Transpose.ROTATE_90)  # stored sideways; EXIF says turn it upright
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation: rotate 90 clockwise to display
    return [
        ("photo.jpg", encode(photo, "JPEG", quality=92)),
        ("greyscale.png", encode(photo.convert("L"), "PNG")),
        ("rgba.png", encode(rgba, "PNG")),
        ("cmyk.jpg", encode(photo.convert("CMYK"), "JPEG", quality=92)),
        ("palette.gif", encode(photo.convert("P"), "GIF")),
        ("exif-rotated.jpg", encode(rotated, "JPEG", quality=92, exif=exif)),
        ("wide.png", encode(photo.resize((600, 40)), "PNG")),
        ("tall.png", encode(photo.resize((40, 600)), "PNG")),
        ("tiny.png", encode(photo.resize((3, 2)), "PNG")),
    ]


def golden_set(data_images: list[str]) -> list[tuple[str, bytes]]:
    """Images drawn from the data set plus the edge cases, as (name, file bytes)."""
    return [(str(p), Path(p).read_bytes()) for p in data_images] + edge_case_images()


@dataclass
class ParityReport:
    backbone: str
    reference: dict[str, Any]
    candidate: dict[str, Any]
    differences: dict[str, list[Any]]
    errors: list[str]
    declared: list[str]
    golden: list[dict[str, Any]] = field(default_factory=list)
    decoder: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"status": "pass" if self.passed else "fail", "tolerance": GOLDEN_ATOL, **self.__dict__}

    def short_reason(self) -> str:
        """One line: the field differences, then how far the golden images moved."""
        fields = [e for e in self.errors if not e.startswith("golden image")]
        bad = [g for g in self.golden if not g["ok"]]
        if bad:
            worst = max(bad, key=lambda g: g["max_abs_diff"])
            fields.append(f"{len(bad)} of {len(self.golden)} golden images differ from the weights' own "
                          f"transform (worst {Path(worst['image']).name}: {worst['max_abs_diff']:.2e})")
        return "; ".join(fields)


def golden_check(backbone: str, spec: PreprocessSpec, golden: list[tuple[str, bytes]],
                 stored_reference: PreprocessSpec | None = None) -> list[dict[str, Any]]:
    """Push the same files through our transform and the weights' own; record the largest difference."""
    ours = build_transform(spec)
    theirs = independent_reference_transform(backbone, spec, stored_reference)
    out = []
    for name, data in golden:
        a = ours(data)
        b = theirs(reference_decode(data))
        diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
        out.append({"image": name, "max_abs_diff": diff, "shape": list(a.shape), "ok": bool(diff <= GOLDEN_ATOL)})
    return out


def decoder_check(golden: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Pillow against torchvision.io on the same files: the pixel difference a decoder swap would cause."""
    from torchvision.io import ImageReadMode, decode_image

    out: list[dict[str, Any]] = []
    for name, data in golden:
        pil = torch.from_numpy(np.asarray(reference_decode(data), dtype=np.int16)).permute(2, 0, 1)
        try:
            tv = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                              apply_exif_orientation=True).to(torch.int16)
        except RuntimeError as exc:
            out.append({"image": name, "torchvision_io": f"cannot decode: {str(exc).splitlines()[0][:120]}"})
            continue
        if tv.shape != pil.shape:
            out.append({"image": name, "torchvision_io": f"shape {list(tv.shape)} vs pillow {list(pil.shape)}"})
            continue
        out.append({"image": name, "max_abs_pixel_diff": int((tv - pil).abs().max()),
                    "mean_abs_pixel_diff": float((tv - pil).abs().float().mean())})
    return out


def check_parity(backbone: str, pcfg: PreprocessConfig, golden: list[tuple[str, bytes]]) -> ParityReport:
    """Spec check field by field, then the golden images through both transforms, then the decoders."""
    reference = reference_spec(backbone)
    candidate = eval_spec(backbone, pcfg)
    diff = spec_diff(reference, candidate)
    errors, declared = [], []
    for name, (ref, cand) in diff.items():
        if name in RESOLUTION_FIELDS and pcfg.allow_resolution_change:
            declared.append(f"{name}: {ref} -> {cand} (declared by preprocess.allow_resolution_change)")
        elif name in RESOLUTION_FIELDS:
            errors.append(f"{name} is {cand}, the backbone's reference is {ref}: set "
                          "preprocess.allow_resolution_change=true to declare a resolution change")
        else:
            errors.append(f"{name} is {cand}, the backbone's reference is {ref}")
    # Run the numbers even when a field already failed: they show how large the mismatch is.
    results = golden_check(backbone, candidate, golden)
    errors += [f"golden image {g['image']}: max difference {g['max_abs_diff']:.2e} > {GOLDEN_ATOL:g}"
               for g in results if not g["ok"]]
    return ParityReport(backbone=backbone, reference=reference.to_record(), candidate=candidate.to_record(),
                        differences={k: list(v) for k, v in diff.items()}, errors=errors, declared=declared,
                        golden=results, decoder=decoder_check(golden))


def serving_check(model: torch.nn.Module, spec: PreprocessSpec, served: Any,
                  golden: list[tuple[str, bytes]]) -> dict[str, Any]:
    """The logged model, raw bytes in, against the in-memory model on the training eval transform."""
    import pandas as pd

    transform = build_transform(spec)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(torch.stack([transform(d) for _, d in golden])), dim=1).numpy()
    got = np.asarray([list(p) for p in served.predict(pd.DataFrame({"image": [d for _, d in golden]}))
                      ["probabilities"]], dtype=np.float64)
    rows = []
    for (name, _), e, g in zip(golden, expected, got, strict=True):
        diff = float(np.abs(e - g).max())
        same = int(e.argmax()) == int(g.argmax())
        rows.append({"image": name, "max_abs_prob_diff": diff, "same_argmax": same,
                     "ok": bool(same and diff <= SERVING_ATOL)})
    errors = [f"served model differs on {r['image']}: max probability difference {r['max_abs_prob_diff']:.2e}"
              + ("" if r["same_argmax"] else ", different class") for r in rows if not r["ok"]]
    return {"status": "fail" if errors else "pass", "tolerance": SERVING_ATOL, "images": rows, "errors": errors}


def report_html(report: dict[str, Any], serving: dict[str, Any] | None = None) -> str:
    """The parity report for a person: the verdict, the spec side by side, the worst images first."""
    from tlops.reports import render

    return render("parity.html.j2", title="tlops parity report", report=report, serving=serving)
