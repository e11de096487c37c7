"""The served model: an MLflow pyfunc that takes raw image bytes and applies the spec logged with it.

It is logged as "models from code" (``pyfunc_entry.py``), so loading it never unpickles anything;
the weights are a plain state dict read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tlops.backbones import ImageClassifier, classifier_from_architecture, get_info, reference_spec
from tlops.errors import TlopsError
from tlops.fileio import read_json, write_json
from tlops.preprocessing import PreprocessSpec, build_transform

WEIGHTS = "weights.pt"
SPEC = "preprocess.json"
META = "model.json"


def save_model_dir(out_dir: str | Path, model: ImageClassifier, backbone: str, classes: list[str],
                   spec: PreprocessSpec) -> Path:
    """The model as files: state dict, preprocessing record, and what is needed to rebuild it."""
    from tlops.fileio import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda tmp: torch.save(state, tmp))
    write_json(out / SPEC, spec.to_record())
    info = get_info(backbone)
    # Enough to rebuild the model anywhere: the architecture, not the backbone's weights or metadata file.
    write_json(out / META, {"backbone": backbone, "architecture": info.builder, "feature_dim": info.feature_dim,
                            "classes": classes, "reference_preprocess": reference_spec(backbone).to_record(),
                            "format": "tlops-image-classifier/1"})
    return out


def load_model_dir(model_dir: str | Path) -> tuple[ImageClassifier, PreprocessSpec, list[str]]:
    d = Path(model_dir)
    for name in (WEIGHTS, SPEC, META):
        if not (d / name).is_file():
            raise TlopsError(f"model directory {d} lacks {name}: it is not a complete tlops model")
    meta = read_json(d / META)
    spec = PreprocessSpec.from_record(read_json(d / SPEC))
    if "architecture" not in meta:  # models saved by tlops before 0.1.0's model.json named the catalogue entry only
        info = get_info(meta["backbone"])
        meta.update(architecture=info.builder, feature_dim=info.feature_dim)
    model = classifier_from_architecture(meta["architecture"], int(meta["feature_dim"]), len(meta["classes"]))
    model.load_state_dict(torch.load(d / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval(), spec, list(meta["classes"])


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image must be raw bytes or base64 text") from None
    raise ValueError(f"image must be raw bytes or base64 text, not {type(value).__name__}")


class Predictor:
    """Batched prediction from raw image bytes, with the model's own preprocessing."""

    def __init__(self, model: ImageClassifier, spec: PreprocessSpec, classes: list[str],
                 batch_size: int = 32) -> None:
        self.model, self.spec, self.classes, self.batch_size = model, spec, classes, batch_size
        self.transform = build_transform(spec)

    @torch.no_grad()
    def predict_proba(self, images: list[bytes]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.stack([self.transform(b) for b in images[start : start + self.batch_size]])
            out.append(torch.softmax(self.model(x), dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def predict_frame(self, images: list[bytes]) -> pd.DataFrame:
        proba = self.predict_proba(images)
        idx = proba.argmax(axis=1) if len(proba) else np.zeros(0, dtype=int)
        return pd.DataFrame({
            "label": [self.classes[i] for i in idx],
            "score": [float(proba[r, i]) for r, i in enumerate(idx)],
            "probabilities": [row.tolist() for row in proba],
        })


try:
    import mlflow.pyfunc

    _PythonModel: Any = mlflow.pyfunc.PythonModel
except ImportError:  # serving is optional for the core; training and evaluation do not need MLflow
    _PythonModel = object


class ImageClassifierPyfunc(_PythonModel):
    """pyfunc model: DataFrame column ``image`` (bytes, or base64 text) to label, score, probabilities."""

    def load_context(self, context: Any) -> None:
        model_dir = Path(context.artifacts["model_dir"])
        model, spec, classes = load_model_dir(model_dir)
        self.predictor = Predictor(model, spec, classes)
        self.classes = classes

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None):  # noqa: ANN201
        if "image" not in model_input.columns:
            raise ValueError("input needs a column named 'image' holding the image file bytes")
        images = [_as_bytes(v) for v in model_input["image"]]
        return self.predictor.predict_frame(images)
