"""The served model: an MLflow pyfunc that takes raw image bytes and applies the spec logged with it.

It is logged as "models from code" (``pyfunc_entry.py``), so loading it never unpickles anything;
the weights are a plain state dict read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from tlops.backbones import ImageClassifier, classifier_from_architecture, get_info, reference_spec
from tlops.data import DEFAULT_MAX_PIXELS
from tlops.errors import TlopsError
from tlops.fileio import read_json, write_json
from tlops.preprocessing import PreprocessSpec, build_transform

WEIGHTS = "weights.pt"
SPEC = "preprocess.json"
META = "model.json"


def save_model_dir(out_dir: str | Path, model: ImageClassifier, backbone: str, classes: list[str],
                   spec: PreprocessSpec) -> Path:
    """The model as files: state dict, preprocessing record, and what is needed to rebuild it."""
    from tlops.fileio import save_torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(out / WEIGHTS, state)
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


SEND = "send the bytes of an image file (PNG, JPEG, BMP, GIF, TIFF or WebP), base64-encoded"
# Base64 text that arrives as bytes: MLflow's ``instances``/``inputs`` parsing hands the column over undecoded.
# An image file never matches: every format's signature has a byte outside this alphabet (or a NUL).
_BASE64_BYTES = re.compile(rb"[A-Za-z0-9+/\r\n]+={0,2}\s*")


class ImageInputError(ValueError):
    """One instance of a request is not a usable image; the message names the instance and what to send."""

    def __init__(self, index: int, problem: str, hint: str = SEND) -> None:
        super().__init__(f"instance {index}: {problem}; {hint}")
        self.index = index


def image_bytes(value: Any, index: int = 0) -> bytes:
    """An ``image`` cell to file bytes: raw bytes, or base64 as text or as bytes."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value)
        if _BASE64_BYTES.fullmatch(value):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                pass  # not base64 after all: the file's own bytes
        return value
    if not isinstance(value, str):
        raise ImageInputError(index, f"'image' must be base64 text, not {type(value).__name__}")
    if not value.strip():
        raise ImageInputError(index, "'image' is empty")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(index, f"'image' is not valid base64 ({exc})") from None


# What a decoder raises on a bad file: truncated (OSError), broken headers (SyntaxError), bad data (zlib).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)


def check_header(data: bytes, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse what is no image, or too many pixels, from the header alone: a decompression bomb is never decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageInputError(index, f"not an image: {len(data)} bytes in no format the decoder knows") from None
    except Image.DecompressionBombError as exc:  # over twice PIL's own limit: refused by PIL at open
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageInputError(index, f"{found.group(1) if found else 'more'} pixels exceeds the limit of {max_pixels}; "
                                     "not decoded", "send a smaller image") from None
    except DECODE_ERRORS as exc:
        raise ImageInputError(index, f"not a readable image ({type(exc).__name__}: {exc})") from None
    with img:
        if img.width * img.height > max_pixels:
            raise ImageInputError(index, f"{img.width}x{img.height} = {img.width * img.height} pixels exceeds "
                                         f"the limit of {max_pixels}; not decoded", "send a smaller image")


class Predictor:
    """Batched prediction from raw image bytes, with the model's own preprocessing."""

    def __init__(self, model: ImageClassifier, spec: PreprocessSpec, classes: list[str],
                 batch_size: int = 32) -> None:
        self.model, self.spec, self.classes, self.batch_size = model, spec, classes, batch_size
        self.transform = build_transform(spec)

    def _tensor(self, data: bytes, index: int) -> torch.Tensor:
        check_header(data, index)
        try:
            return self.transform(data)
        except DECODE_ERRORS as exc:  # a truncated or corrupt file fails at decoding, past its header
            raise ImageInputError(index, f"not a readable image ({type(exc).__name__}: {exc})") from None

    @torch.no_grad()
    def predict_proba(self, images: list[bytes]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.stack([self._tensor(b, i) for i, b in enumerate(images[start : start + self.batch_size], start)])
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
        if isinstance(model_input, dict):  # MLflow passes a dict for ``inputs`` when no signature applies
            model_input = pd.DataFrame({k: list(np.atleast_1d(v)) for k, v in model_input.items()})
        if "image" not in model_input.columns:
            raise ValueError("input needs a column named 'image' holding the image file bytes")
        images = [image_bytes(v, i) for i, v in enumerate(model_input["image"])]
        return self.predictor.predict_frame(images)
