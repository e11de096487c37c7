"""A compressed variant as it is served: ONNX Runtime, with the model's preprocessing spec in PIL and numpy.

Nothing here imports torch (a test checks it): ``tlops serve`` on a version with an ONNX serving variant loads
this, which starts in a fraction of the time torch takes. The preprocessing follows the spec logged with the
model (``preprocess.json``) field by field as ``tlops.preprocessing.build_transform`` does with torchvision on a
PIL image (which resizes with PIL itself), so the tensors agree to float rounding; parity checks it on the
golden images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlops.data.discovery import DEFAULT_MAX_PIXELS
from tlops.data.images import check_work, load_image, resized_size, to_mode
from tlops.errors import TlopsError

GRAPH = "model.onnx"
EMBEDDING = "embedding"  # the graph's second output, where it has one: the features the head sees
SPEC = "preprocess.json"
META = "model.json"
VARIANT = "variant.json"
FORMAT = "tlops-onnx-classifier/1"
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class SpecView:
    """The preprocessing spec read from its record without torch: the fields, and the fingerprint recomputed
    from them exactly as ``PreprocessSpec.fingerprint`` does (sha256 of the canonical JSON)."""

    fields: dict[str, Any]
    source: str = ""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SpecView:
        view = cls(dict(record["spec"]), str(record.get("source", "")))
        if record.get("fingerprint") and record["fingerprint"] != view.fingerprint:
            raise TlopsError("preprocessing record is inconsistent: its fingerprint does not match its fields")
        return view

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def __getattr__(self, name: str) -> Any:  # crop_size, resize_size, resize_rule... as on PreprocessSpec
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)


def decode(data: bytes, spec: SpecView, index: int = 0, max_pixels: int | None = None) -> Image.Image:
    """File bytes to the spec's colour mode: the decoders the pipeline reads, EXIF orientation, conversion."""
    return to_mode(load_image(data, index, max_pixels or DEFAULT_MAX_PIXELS), spec.color_mode, spec.exif_transpose)


def preprocess(data: bytes, spec: SpecView, index: int = 0) -> np.ndarray:
    """Image file bytes to the float32 CHW input of the graph, as the spec says."""
    img = decode(data, spec, index)
    resample = _RESAMPLE[spec.interpolation]
    w, h = resized_size(spec, img.width, img.height)
    if (w, h) != img.size:
        img = img.resize((w, h), resample)
    if spec.resize_rule == "shorter-side-then-crop":
        c = spec.crop_size
        # torchvision's center_crop: zero padding when the crop is larger, then the rounded centre offset.
        left = -((c - w) // 2) if c > w else int(round((w - c) / 2.0))
        top = -((c - h) // 2) if c > h else int(round((h - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))
    x: np.ndarray = np.asarray(img, dtype=np.float32) * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    x = np.ascontiguousarray(x.transpose(2, 0, 1))
    if spec.channel_order == "BGR":
        x = np.ascontiguousarray(x[::-1])
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    z = (logits - logits.max(axis=1, keepdims=True)).astype(np.float64)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


def session(graph: str | Path | bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (0: ONNX Runtime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    """Batched prediction from raw image bytes through an exported variant: the same interface and output as
    ``tlops.serving.Predictor`` (``predict_proba``, ``predict_frame``)."""

    def __init__(self, model_dir: str | Path, threads: int = 1, batch_size: int = 32) -> None:
        d = Path(model_dir)
        for name in (GRAPH, SPEC, META):
            if not (d / name).is_file():
                raise TlopsError(f"variant directory {d} lacks {name}: it is not a complete tlops ONNX variant")
        self.dir = d
        self.meta = json.loads((d / META).read_text(encoding="utf-8"))
        self.classes: list[str] = [str(c) for c in self.meta["classes"]]
        self.spec = SpecView.from_record(json.loads((d / SPEC).read_text(encoding="utf-8")))
        self.variant: dict[str, Any] = (json.loads((d / VARIANT).read_text(encoding="utf-8"))
                                        if (d / VARIANT).is_file() else {})
        self.session = session(d / GRAPH, threads)
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = outputs[0]
        # The backbone's features, where the graph has them (variants exported before, and pruned ones, do not).
        self.embedding_name = EMBEDDING if EMBEDDING in outputs[1:] else None
        self.batch_size = batch_size

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0], dtype=np.float32)

    def proba_embed(self, x: np.ndarray, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities and the backbone's features the head saw, from the same run (None where the graph
        has no ``embedding`` output): the server's prediction log keeps the features."""
        if self.embedding_name is None:
            return self.proba(x, batch_size), None
        step = batch_size or self.batch_size
        probs, feats = [], []
        for start in range(0, len(x), step):
            logits, features = self.session.run([self.output_name, self.embedding_name],
                                                {self.input_name: x[start : start + step]})
            probs.append(softmax(np.asarray(logits, dtype=np.float32)))
            feats.append(np.asarray(features, dtype=np.float32).reshape(len(features), -1))
        if not probs:
            return np.zeros((0, len(self.classes)), dtype=np.float32), None
        return np.concatenate(probs), np.concatenate(feats)

    def tensors(self, images: list[bytes], first: int = 0) -> np.ndarray:
        """The images decoded and preprocessed, stacked (errors name instance ``first + i``): the server's
        batcher takes them as ``tlops.serving.Predictor.tensors``."""
        if not images:
            return np.zeros((0, 3, self.spec.crop_size, self.spec.crop_size), dtype=np.float32)
        from tlops.data.discovery import max_aspect_ratio

        ratio = max_aspect_ratio()
        for i, b in enumerate(images, first):  # the server's limits, from the headers, before anything is decoded
            check_work(b, i, self.spec, ratio)
        return np.stack([preprocess(b, self.spec, i) for i, b in enumerate(images, first)])

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)

    def proba(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities of preprocessed input, ``batch_size`` rows per run."""
        step = batch_size or self.batch_size
        out = [softmax(self.logits(x[start : start + step])) for start in range(0, len(x), step)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def records(self, proba: np.ndarray) -> list[dict[str, Any]]:
        """One record per image: label, score and probabilities, as ``tlops.serving.Predictor.records``."""
        return [{"label": self.classes[i], "score": float(row[i]), "probabilities": row.astype(np.float64).tolist()}
                for row, i in zip(proba, proba.argmax(axis=1) if len(proba) else [], strict=True)]

    def predict_proba(self, images: list[bytes]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = np.stack([preprocess(b, self.spec, i) for i, b in enumerate(chunk, start)])
            out.append(softmax(self.logits(x)))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict_frame(self, images: list[bytes]) -> Any:
        import pandas as pd

        proba = self.predict_proba(images)
        idx = proba.argmax(axis=1) if len(proba) else np.zeros(0, dtype=int)
        return pd.DataFrame({
            "label": [self.classes[i] for i in idx],
            "score": [float(proba[r, i]) for r, i in enumerate(idx)],
            "probabilities": [row.astype(np.float64).tolist() for row in proba],
        })

    def predict(self, model_input: Any) -> Any:
        """The pyfunc's call: a DataFrame with an ``image`` column of file bytes."""
        return self.predict_frame([bytes(v) for v in model_input["image"]])


def variant_predictor(model_dir: str | Path, info: dict[str, Any],
                      threads: int = 1) -> tuple[OnnxPredictor, dict[str, Any]]:
    """The variant's predictor and what ``/version`` tells about it (``info`` with the classes, the fingerprint,
    the runtime and the variant's name); the server wraps them in its ``ServedModel``."""
    predictor = OnnxPredictor(model_dir, threads=threads)
    info = {**info, "classes": predictor.classes, "preprocess_fingerprint": predictor.spec.fingerprint,
            "runtime": "onnxruntime", "variant": predictor.variant.get("name", "onnx")}
    return predictor, info
