"""The served model: an MLflow pyfunc that takes raw image bytes and applies the spec logged with it.

It is logged as "models from code" (``pyfunc_entry.py``), so loading it never unpickles anything;
the weights are a plain state dict read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tlops.data.images import (
    ImageInputError,
    _open,
    _refused,
    check_work,
    image_bytes,
)
from tlops.errors import TlopsError
from tlops.fileio import read_json, write_json
from tlops.vision.backbones import ImageClassifier, classifier_from_architecture, get_info, reference_spec
from tlops.vision.preprocessing import PreprocessSpec, build_transform

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


class Predictor:
    """Batched prediction from raw image bytes, with the model's own preprocessing.

    Each image is held to the server's limits before it is decoded (:func:`check_work`: the formats the pipeline
    decodes, ``max_pixels``, the aspect ratio ``TLOPS_MAX_ASPECT_RATIO``), wherever the model runs: ``tlops
    serve``, ``mlflow models serve``, a notebook. A hostile image is an :class:`ImageInputError`, never a hang."""

    def __init__(self, model: ImageClassifier, spec: PreprocessSpec, classes: list[str],
                 batch_size: int = 32) -> None:
        from tlops.data.discovery import max_aspect_ratio

        self.model, self.spec, self.classes, self.batch_size = model, spec, classes, batch_size
        self.transform = build_transform(spec)
        self.max_aspect_ratio = max_aspect_ratio()

    def _tensor(self, data: bytes, index: int) -> torch.Tensor:
        check_work(data, index, self.spec, self.max_aspect_ratio)
        img = _open(data, index)
        try:
            # Decoded here, then transformed as the bytes would be (the transform takes a loaded image as is):
            # a truncated or corrupt file fails at decoding, past its header, with whatever its plugin raises.
            img.load()
            return self.transform(img)
        except MemoryError:
            raise
        except Exception as exc:
            raise _refused(index, exc) from None
        finally:
            img.close()

    def tensors(self, images: list[bytes], first: int = 0) -> torch.Tensor:
        """The images decoded and preprocessed, stacked: the model's input, ``len(images)`` rows (errors name
        instance ``first + i``)."""
        if not images:
            return torch.zeros((0, 3, self.spec.crop_size, self.spec.crop_size))
        return torch.stack([self._tensor(b, i) for i, b in enumerate(images, first)])

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Several requests' preprocessed input as one batch (the server's batcher)."""
        return torch.cat(parts)

    @torch.inference_mode()
    def proba(self, x: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities of preprocessed input, ``batch_size`` rows per forward pass."""
        step = batch_size or self.batch_size
        out = [torch.softmax(self.model(x[start : start + step]), dim=1).numpy() for start in range(0, len(x), step)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    @torch.inference_mode()
    def proba_embed(self, x: torch.Tensor, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and the backbone's features the head saw, from the same forward pass (the
        server's prediction log keeps the features)."""
        step = batch_size or self.batch_size
        probs, feats = [], []
        for start in range(0, len(x), step):
            f = self.model.backbone(x[start : start + step])
            probs.append(torch.softmax(self.model.head(f), dim=1).numpy())
            feats.append(f.float().numpy())
        if not probs:
            return (np.zeros((0, len(self.classes)), dtype=np.float32),
                    np.zeros((0, self.model.head.in_features), dtype=np.float32))
        return np.concatenate(probs), np.concatenate(feats)

    def predict_proba(self, images: list[bytes]) -> np.ndarray:
        out = [self.proba(self.tensors(images[start : start + self.batch_size], start))
               for start in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def records(self, proba: np.ndarray) -> list[dict[str, Any]]:
        """The pyfunc's answer for these probabilities, one record per image: label, score and probabilities (the
        rows of :meth:`frame`, as MLflow's scoring server writes them)."""
        return [{"label": self.classes[i], "score": float(row[i]), "probabilities": row.tolist()}
                for row, i in zip(proba, proba.argmax(axis=1) if len(proba) else [], strict=True)]

    def frame(self, proba: np.ndarray) -> pd.DataFrame:
        """The pyfunc's answer for these probabilities: label, score and probabilities per image."""
        rows = self.records(proba)
        return pd.DataFrame({key: [r[key] for r in rows] for key in ("label", "score", "probabilities")})

    def predict_frame(self, images: list[bytes]) -> pd.DataFrame:
        return self.frame(self.predict_proba(images))


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
        try:
            images = [image_bytes(v, i) for i, v in enumerate(model_input["image"])]
            return self.predictor.predict_frame(images)
        except ImageInputError as exc:
            # The client's mistake, in MLflow's terms: ``mlflow models serve`` answers 400 with this one line.
            from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc


# What the logged model needs where it runs (``mlflow models serve``, ``build-docker``, KServe's MLflow runtime):
# the distributions the bundled code imports to load the model and predict (timm and torchvision to rebuild the
# architecture and the transform), pinned to the versions it was logged with. Not tlops: its code travels with the
# model (:func:`bundle_code`). MLflow adds its own pin.
PYFUNC_DISTRIBUTIONS = ("torch", "torchvision", "timm", "pillow", "numpy", "pandas")


def pyfunc_requirements() -> list[str]:
    from importlib.metadata import version

    # A local version label (torch's "+cpu", "+cu130") names a wheel index, not a release: left out, as MLflow does.
    return [f"{name}=={version(name).split('+')[0]}" for name in PYFUNC_DISTRIBUTIONS]


def _tlops_imports(path: Path, package: Path) -> set[str]:
    """The tlops modules ``path`` imports (dotted, below ``tlops``), at its top or inside a function."""
    import ast

    def is_module(dotted: str) -> bool:
        where = package.joinpath(*dotted.split("."))
        return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith("tlops."):
            base = node.module[len("tlops."):]
            if base:
                found.add(base)
            # ``from tlops.pkg import module``: the module too
            found |= {f"{base}.{a.name}".lstrip(".") for a in node.names if is_module(f"{base}.{a.name}".lstrip("."))}
        elif isinstance(node, ast.Import):
            found |= {a.name[len("tlops."):] for a in node.names if a.name.startswith("tlops.")}
    return found


def bundle_code(dest: str | Path) -> Path:
    """The tlops package as the logged model needs it: ``serving.pyfunc_entry`` and every tlops module it reaches
    (through imports at the top or inside functions, and the ``__init__`` of every package on the way), copied to
    ``dest/tlops``; returns that directory, for MLflow's ``code_paths``. Loading the model puts it on
    ``sys.path``, so the model loads where tlops is not installed."""
    import shutil

    package = Path(__file__).resolve().parents[1]
    out = Path(dest) / "tlops"
    out.mkdir(parents=True, exist_ok=False)
    shutil.copy2(package / "__init__.py", out / "__init__.py")
    seen: set[str] = set()
    todo = ["serving.pyfunc_entry"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        source = package.joinpath(*parts).with_suffix(".py")
        if not source.is_file():
            source = package.joinpath(*parts, "__init__.py")
        target = out / source.relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        todo.extend(_tlops_imports(source, package) - seen)
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in seen)
    return out
