"""Preprocessing parity: the fine-tuning eval spec against the backbone's reference, in fields and numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tlops.backbones import get_info, reference_spec
from tlops.config import PreprocessConfig
from tlops.preprocessing import PreprocessSpec, build_transform, decode, spec_diff, with_resolution

# Fields whose difference from the reference is never acceptable: the backbone's weights assume them.
STRICT_FIELDS = ("mean", "std", "scale", "channel_order", "color_mode", "layout", "dtype", "interpolation",
                 "resize_rule", "crop", "exif_transpose", "antialias", "decoder")
# Fields that may differ when the config declares it (preprocess.allow_resolution_change).
RESOLUTION_FIELDS = ("crop_size", "resize_size")
GOLDEN_ATOL = 1e-4  # max |difference| between our transform and the weights' own, per tensor element


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


def independent_reference_transform(backbone: str, spec: PreprocessSpec):  # noqa: ANN201
    """The weights' own eval transform, built by timm or torchvision, at ``spec``'s resolution."""
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


@dataclass
class ParityReport:
    backbone: str
    reference: dict[str, Any]
    candidate: dict[str, Any]
    differences: dict[str, list[Any]]
    errors: list[str]
    declared: list[str]
    golden: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"status": "pass" if self.passed else "fail", **self.__dict__}


def golden_check(backbone: str, spec: PreprocessSpec, images: list[str]) -> list[dict[str, Any]]:
    """Push the same files through our transform and the weights' own; record the largest difference."""
    ours = build_transform(spec)
    theirs = independent_reference_transform(backbone, spec)
    out = []
    for path in images:
        a = ours(path)
        # The reference transforms take a decoded RGB image: decoding is checked by its own fields.
        b = theirs(decode(path, spec))
        diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
        out.append({"image": str(path), "max_abs_diff": diff, "shape": list(a.shape),
                    "ok": bool(diff <= GOLDEN_ATOL)})
    return out


def check_parity(backbone: str, pcfg: PreprocessConfig, golden_images: list[str]) -> ParityReport:
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
    golden: list[dict[str, Any]] = []
    if not errors:
        golden = golden_check(backbone, candidate, golden_images)
        errors += [f"golden image {g['image']}: max difference {g['max_abs_diff']:.2e} > {GOLDEN_ATOL:g}"
                   for g in golden if not g["ok"]]
    return ParityReport(backbone=backbone, reference=reference.to_record(), candidate=candidate.to_record(),
                        differences={k: list(v) for k, v in diff.items()}, errors=errors, declared=declared,
                        golden=golden)

