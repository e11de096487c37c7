"""The reference record ``tlops monitor`` compares served traffic with, logged by the evaluate step with each
candidate: what the model saw in training and how it behaved on held-out data, in the same terms as the
prediction log (embeddings from the same backbone, image properties, confidences).

One ``.npz`` artifact (``monitoring/reference.npz`` of the candidate's run; plain arrays, read with
``allow_pickle=False``): a sample of the training images' embeddings, sizes, modes and brightness, the class
counts of the training split, and for the validation split (the test split where there is none) each image's
embedding, confidence, whether the prediction was right, the predicted class and its distance to the nearest
training embedding (the out-of-distribution yardstick).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlops.errors import TlopsError

if TYPE_CHECKING:
    import pandas as pd

    from tlops.config.settings import Config

log = logging.getLogger(__name__)

ARTIFACT = "monitoring/reference.npz"
FORMAT = "tlops-monitor-reference/1"


@dataclass
class Reference:
    classes: np.ndarray  # str
    split: np.ndarray  # str, 0-d: which split the held-out figures come from
    preprocess_fingerprint: np.ndarray  # str, 0-d
    train_class_counts: np.ndarray  # int, per class, the whole training split
    train_embeddings: np.ndarray  # float32 (n, d), a stratified sample
    train_width: np.ndarray
    train_height: np.ndarray
    train_mode: np.ndarray  # str
    train_brightness: np.ndarray
    val_confidence: np.ndarray
    val_correct: np.ndarray  # bool
    val_predicted: np.ndarray  # int, class index
    val_nn_distance: np.ndarray  # distance of each held-out embedding to the nearest training one
    val_embeddings: np.ndarray  # float32 (m, d): what served traffic is compared with (unseen in training, too)

    def save(self, path: str | Path) -> Path:
        from tlops.fileio import atomic_write

        arrays = {f.name: getattr(self, f.name) for f in fields(self)}

        def _write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, format=np.array(FORMAT), **arrays)

        return atomic_write(path, _write)

    @classmethod
    def load(cls, path: str | Path, what: str) -> Reference:
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT:
                    raise TlopsError(f"{what} is a {data['format']} record, not {FORMAT}")
                return cls(**{f.name: data[f.name] for f in fields(cls)})
        except TlopsError:
            raise
        except Exception as exc:
            raise TlopsError(f"{what} cannot be read as a monitoring reference ({type(exc).__name__}: "
                             f"{str(exc)[:120]}); evaluate the model again to record it") from None


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nn_distance(queries: np.ndarray, reference: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distance of each L2-normalised query row to the nearest L2-normalised reference row
    (sqrt(2 - 2 cos): 0 for the same direction, 2 for opposite ones)."""
    q, r = unit_rows(queries), unit_rows(reference)
    out = np.empty(len(q), dtype=np.float32)
    for start in range(0, len(q), chunk):
        cos = q[start : start + chunk] @ r.T
        out[start : start + chunk] = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cos.max(axis=1)))
    return out


def _embed(predictor: Any, images: list[bytes], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    probs, feats = [], []
    for start in range(0, len(images), batch):
        proba, features = predictor.proba_embed(predictor.tensors(images[start : start + batch], start))
        probs.append(proba)
        feats.append(features)
    return np.concatenate(probs), np.concatenate(feats)


def cached_embeddings(predictor: Any, cache: Any, train: pd.DataFrame, held_out: pd.DataFrame,
                      whole_train: tuple[list[str], np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The embeddings :func:`build_reference` computes (the training sample's; the held-out split's with its
    class probabilities), from the feature cache (:class:`tlops.vision.features.FeatureCache`): the backbone's
    features of these images, read where an earlier step stored them (the fine-tune step's, for a backbone it
    did not change) or computed once, then the model's head. The training sample is taken from the whole
    split's stored features when they are there: ``whole_train`` is the split's sha256 list and the sample's
    positions in it."""
    import torch

    from tlops.vision.features import state_digest

    backbone, head, spec = predictor.model.backbone, predictor.model.head, predictor.spec
    digest = state_digest(backbone)

    def shas(rows: pd.DataFrame) -> list[str]:
        return [str(x) for x in rows["sha256"]]

    train_emb = None
    if whole_train is not None:
        whole = cache.lookup_of(backbone, whole_train[0], spec, digest)
        if whole is not None:
            train_emb = whole[torch.as_tensor(whole_train[1], dtype=torch.long)]
    if train_emb is None:
        train_emb = cache.features_of(backbone, [str(p) for p in train["path"]], shas(train), spec, 64,
                                      torch.device("cpu"), "reference training sample")
    held_emb = cache.features_of(backbone, [str(p) for p in held_out["path"]], shas(held_out), spec, 64,
                                 torch.device("cpu"), "reference held-out images")
    with torch.inference_mode():
        proba = torch.softmax(head(held_emb), dim=1)
    return train_emb.float().numpy(), proba.numpy(), held_emb.float().numpy()


def build_reference(predictor: Any, train: pd.DataFrame, held_out: pd.DataFrame, split: str,
                    sample: int = 500, seed: int = 0,
                    embeddings: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Reference:
    """The record from the manifest rows of the training split (``path`` readable here; a stratified sample of
    ``sample`` images is embedded) and of the held-out split (every image). ``embeddings``: those of
    :func:`cached_embeddings` for exactly these rows, instead of running the model on the images."""
    from tlops.serving.predlog import image_properties

    classes = list(predictor.classes)
    labels = train["label"].astype(str)
    counts = np.array([int((labels == c).sum()) for c in classes], dtype=np.int64)
    if len(train) > sample:
        from sklearn.model_selection import train_test_split

        try:
            train, _ = train_test_split(train, train_size=sample, stratify=labels, random_state=seed)
        except ValueError:  # a class too small to stratify
            train = train.sample(n=sample, random_state=seed)
    train_images = [Path(p).read_bytes() for p in train["path"]]
    if embeddings is not None:
        train_emb, proba, held_emb = embeddings
    else:
        _, train_emb = _embed(predictor, train_images)
    props = [image_properties(b) for b in train_images]
    if embeddings is None:
        held_images = [Path(p).read_bytes() for p in held_out["path"]]
        proba, held_emb = _embed(predictor, held_images)
    predicted = proba.argmax(axis=1)
    truth = np.array([classes.index(str(y)) if str(y) in classes else -1 for y in held_out["label"]])
    return Reference(
        classes=np.array(classes, dtype=str), split=np.array(split),
        preprocess_fingerprint=np.array(str(predictor.spec.fingerprint)),
        train_class_counts=counts, train_embeddings=train_emb.astype(np.float32),
        train_width=np.array([p[0] for p in props], dtype=np.int32),
        train_height=np.array([p[1] for p in props], dtype=np.int32),
        train_mode=np.array([p[2] for p in props], dtype=str),
        train_brightness=np.array([p[4] for p in props], dtype=np.float32),
        val_confidence=proba.max(axis=1).astype(np.float32), val_correct=predicted == truth,
        val_predicted=predicted.astype(np.int32), val_nn_distance=nn_distance(held_emb, train_emb),
        val_embeddings=held_emb.astype(np.float32),
    )


def log_reference(cfg: Config, model_uri: str, manifest: pd.DataFrame,
                  localize: Callable[[pd.DataFrame], pd.DataFrame], predictor: Any = None,
                  features: Any = None) -> str | None:
    """Build the candidate's record and log it to the active MLflow run; the artifact's URI, or None (with a
    warning: the candidate is still evaluated) when it cannot be built. ``predictor``: the candidate's, already
    loaded (else loaded from ``model_uri``); ``features``: a feature cache to take the embeddings from
    (:func:`cached_embeddings`)."""
    import tempfile

    import mlflow

    from tlops import tracking
    from tlops.data.manifest import split_rows

    try:
        train = split_rows(manifest, "train")
        split = "val" if not split_rows(manifest, "val").empty else "test"
        held_out = split_rows(manifest, split)
        if train.empty or held_out.empty:
            raise TlopsError(f"the manifest has no {'train' if train.empty else split} images")
        if predictor is None:
            predictor = tracking.load_pyfunc(model_uri).unwrap_python_model().predictor
        if not hasattr(predictor, "proba_embed"):
            raise TlopsError("the model's predictor gives no embeddings")
        sample = cfg.monitoring.reference_sample
        if len(train) > sample:  # fetch only the images the sample embeds
            from sklearn.model_selection import train_test_split

            try:
                train, _ = train_test_split(train, train_size=sample, stratify=train["label"].astype(str),
                                            random_state=cfg.selection.seed)
            except ValueError:
                train = train.sample(n=sample, random_state=cfg.selection.seed)
            counts_from = split_rows(manifest, "train")
        else:
            counts_from = train
        whole_train = None
        if counts_from is not train:  # a sample: where its rows are in the whole split
            positions = counts_from.index.get_indexer(train.index)
            if (positions >= 0).all():
                whole_train = ([str(x) for x in counts_from["sha256"]], positions)
        train, held_out = localize(train), localize(held_out)
        embeddings = None
        if features is not None and hasattr(predictor, "model"):
            embeddings = cached_embeddings(predictor, features, train, held_out, whole_train)
        record = build_reference(predictor, train, held_out, split, sample, cfg.selection.seed, embeddings)
        labels = counts_from["label"].astype(str)
        record.train_class_counts = np.array([int((labels == c).sum()) for c in record.classes], dtype=np.int64)
        with tempfile.TemporaryDirectory(prefix="tlops-reference-") as tmp:
            path = record.save(Path(tmp) / Path(ARTIFACT).name)
            mlflow.log_artifact(str(path), str(Path(ARTIFACT).parent))
        mlflow.set_tag("monitoring.reference", ARTIFACT)
        log.info("monitoring reference: %d training embeddings, %d %s images (accuracy %.4f)",
                 len(record.train_embeddings), len(record.val_correct), split, float(record.val_correct.mean()))
        return str(mlflow.get_artifact_uri(ARTIFACT))
    except Exception as exc:  # the evaluation stands; tlops monitor will say the record is missing
        log.warning("monitoring reference not recorded (%s); tlops monitor cannot watch this version",
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return None
