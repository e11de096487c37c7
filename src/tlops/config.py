"""Typed, validated run configuration: YAML file < ``--set`` overrides, saved with every run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tlops.errors import TlopsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    uri: str = ".tlops/data/digits"
    # Used only when the data has no split of its own: fractions of a hash of each file's content.
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_salt: str = "tlops"

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave images for training (sum < 1)")
        return self


class ValidationConfig(_Section):
    min_images_per_class: int = Field(5, ge=1)


class PreprocessConfig(_Section):
    """Deviations from the backbone's reference preprocessing. Empty means: exactly the reference."""

    image_size: int | None = Field(None, ge=8, le=1024)
    # A resolution different from the reference must be declared; it is then recorded, not refused.
    allow_resolution_change: bool = False
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    channel_order: Literal["RGB", "BGR"] | None = None
    scale: float | None = None
    resize_rule: Literal["shorter-side-then-crop", "direct"] | None = None
    exif_transpose: bool | None = None


class TrainConfig(_Section):
    strategy: Literal["linear-probe"] = "linear-probe"
    # Linear probe: L-BFGS iterations per fit, and the L2 strengths swept on the validation split.
    epochs: int = Field(200, ge=1)
    l2_grid: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1], min_length=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 means all cores")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class GateConfig(_Section):
    min_accuracy: float = Field(0.9, ge=0.0, le=1.0)
    # Largest accuracy drop against the champion that still promotes (0: must not be worse).
    max_regression: float = Field(0.0, ge=0.0, le=1.0)


class RegistryConfig(_Section):
    model_name: str = Field("tlops-digits", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TrackingConfig(_Section):
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under the work dir
    experiment: str = "tlops"


class Config(_Section):
    workdir: str = ".tlops"
    backbone: str = "efficientnet_lite0"
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.model_validate_json(text)


def _parse_value(raw: str) -> Any:
    """``--set`` values: YAML scalars, and comma lists for tuples (``0.485,0.456,0.406``)."""
    if "," in raw and not raw.strip().startswith("["):
        return [yaml.safe_load(part) for part in raw.split(",")]
    return yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TlopsError(f"--set {item!r}: expected KEY=VALUE, for example train.epochs=10")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TlopsError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TlopsError(f"config file {p} does not exist: pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise TlopsError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TlopsError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        src = f"config file {path}" if path else "config"
        raise TlopsError(f"{src}: field {where}: {err['msg']}") from None
