"""Preprocessing as data: a frozen spec, its fingerprint, and the one transform built from it.

Training-eval, evaluation and serving all call :func:`build_transform` on the spec logged with the
model, so their tensors can only differ if their specs differ, and specs are compared by fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from tlops.data.images import to_mode
from tlops.errors import TlopsError

Interpolation = Literal["nearest", "bilinear", "bicubic"]
ResizeRule = Literal["shorter-side-then-crop", "direct"]


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that turns an image file into the input tensor of a backbone."""

    crop_size: int
    resize_size: int
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_rule: ResizeRule = "shorter-side-then-crop"
    crop: Literal["center"] = "center"
    antialias: bool = True
    scale: float = 1.0 / 255.0
    decoder: Literal["pillow"] = "pillow"
    exif_transpose: bool = True
    color_mode: Literal["RGB"] = "RGB"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["CHW"] = "CHW"
    dtype: Literal["float32"] = "float32"
    source: str = ""  # where the reference came from, e.g. "timm pretrained_cfg tf_efficientnet_lite0"

    def semantic_dict(self) -> dict[str, Any]:
        """The fields that change the tensor; ``source`` is provenance and stays out of the hash."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d["mean"] = [float(x) for x in self.mean]
        d["std"] = [float(x) for x in self.std]
        return d

    def canonical_json(self) -> str:
        return json.dumps(self.semantic_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def to_record(self) -> dict[str, Any]:
        """The spec as logged: semantic fields, fingerprint, provenance and library versions."""
        return {
            "spec": self.semantic_dict(),
            "fingerprint": self.fingerprint,
            "source": self.source,
            "library_versions": library_versions(),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PreprocessSpec:
        fields = dict(record["spec"])
        fields["mean"] = tuple(fields["mean"])
        fields["std"] = tuple(fields["std"])
        spec = cls(**fields, source=record.get("source", ""))
        if record.get("fingerprint") and record["fingerprint"] != spec.fingerprint:
            raise TlopsError("preprocessing record is inconsistent: its fingerprint does not match its fields")
        return spec

    def replace(self, **changes: Any) -> PreprocessSpec:
        return dataclasses.replace(self, **changes)


def library_versions() -> dict[str, str]:
    import PIL
    import torchvision

    return {"pillow": PIL.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__}


def spec_from_timm_cfg(cfg: dict[str, Any], source: str) -> PreprocessSpec:
    """timm's eval transform: resize the shorter side to floor(size / crop_pct), then centre-crop."""
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct", 0.875))
    if cfg.get("crop_mode", "center") != "center":
        raise TlopsError(f"{source}: crop_mode {cfg.get('crop_mode')!r} is not supported yet (only 'center')")
    return PreprocessSpec(
        crop_size=size,
        resize_size=math.floor(size / crop_pct),
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
        source=source,
    )


def spec_from_torchvision_weights(weights: Any) -> PreprocessSpec:
    """torchvision's preset (``weights.transforms()``): ImageClassification with its own sizes."""
    t = weights.transforms()
    return PreprocessSpec(
        crop_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
        antialias=bool(t.antialias),
        mean=tuple(float(x) for x in t.mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in t.std),  # type: ignore[arg-type]
        source=f"torchvision {weights}",
    )


def with_resolution(spec: PreprocessSpec, size: int) -> PreprocessSpec:
    """The same spec at another input size, keeping the reference crop ratio."""
    crop_pct = spec.crop_size / spec.resize_size
    return spec.replace(crop_size=size, resize_size=math.floor(size / crop_pct))


def _to_pil(data: bytes | str | Path | Image.Image) -> Image.Image:
    if isinstance(data, Image.Image):
        return data
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)
    img.load()
    return img


def decode(data: bytes | str | Path | Image.Image, spec: PreprocessSpec) -> Image.Image:
    """File bytes to an RGB image, as the spec says (decoder, EXIF orientation, colour conversion)."""
    return to_mode(_to_pil(data), spec.color_mode, spec.exif_transpose)


def build_transform(spec: PreprocessSpec):  # noqa: ANN201 - returns a closure
    """The eval transform for ``spec``: decoded image (or bytes/path) to a float CHW tensor."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    interp = InterpolationMode(spec.interpolation)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def transform(data: bytes | str | Path | Image.Image) -> torch.Tensor:
        img = decode(data, spec)
        if spec.resize_rule == "shorter-side-then-crop":
            img = F.resize(img, spec.resize_size, interpolation=interp, antialias=spec.antialias)
            img = F.center_crop(img, [spec.crop_size, spec.crop_size])
        else:
            img = F.resize(img, [spec.crop_size, spec.crop_size], interpolation=interp, antialias=spec.antialias)
        arr = np.asarray(img, dtype=np.float32)
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous() * spec.scale
        x = (x - mean) / std
        if spec.channel_order == "BGR":
            x = x.flip(0)
        return x

    return transform


def spec_diff(reference: PreprocessSpec, candidate: PreprocessSpec) -> dict[str, tuple[Any, Any]]:
    """Fields that differ: name -> (reference value, candidate value)."""
    ref, cand = reference.semantic_dict(), candidate.semantic_dict()
    return {k: (ref[k], cand[k]) for k in ref if ref[k] != cand[k]}

