"""Evaluation on the held-out split, through the same predictor that serves the model.

The candidate and the current champion are scored on the same test images, as raw bytes through
their pyfunc models: accuracy, macro-F1, per-class precision/recall/F1, top-k, a confusion matrix,
calibration (ECE, reliability diagram), slices (class, image size, source), latency at batch size 1
and the size of the weights. The paired comparison is McNemar's exact test and a seeded paired
bootstrap interval of the accuracy difference. Everything lands in one JSON record and one
self-contained HTML report (figures embedded as base64 PNG).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlops.config.settings import EvaluationConfig
from tlops.errors import TlopsError

log = logging.getLogger(__name__)


def test_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    from tlops.data.manifest import split_rows

    return split_rows(manifest, "test")


def read_images(paths: list[str]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


# --------------------------------------------------------------------------------------------- metrics


def classification_metrics(y_true: list[str], y_pred: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "n": len(y_true),
    }


def categories_for(y_true: list[str], classes: list[str]) -> list[str]:
    """The model's classes, then any test label the model does not know (always predicted wrong)."""
    return [*classes, *sorted(set(y_true) - set(classes))]


def per_class_metrics(y_true: list[str], y_pred: list[str], classes: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support for every class present in the test labels or the model."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = categories_for(y_true, classes)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(labels)}


def min_recall(per_class: dict[str, dict[str, float]]) -> tuple[float, str]:
    """Lowest recall over the classes that have test images, and which class it is."""
    present = {c: m for c, m in per_class.items() if m["support"] > 0}
    if not present:
        return 0.0, ""
    worst = min(present, key=lambda c: (present[c]["recall"], c))
    return float(present[worst]["recall"]), worst


def top_k_accuracy(y_true: list[str], proba: np.ndarray, classes: list[str], ks: list[int]) -> dict[str, float]:
    """Share of images whose true class is among the k most probable; k is capped by the class count.

    Not scikit-learn's ``top_k_accuracy_score``: it refuses two-column scores for a two-class problem, true labels
    outside the model's classes (a champion trained on other classes scores them as misses here), and ranks ties
    by the later class where this ranks them, as argmax does, by the earlier."""
    index = {c: i for i, c in enumerate(classes)}
    true_idx = np.array([index.get(y, -1) for y in y_true])
    order = np.argsort(-proba, axis=1, kind="stable") if len(proba) else np.zeros((0, len(classes)), dtype=int)
    out: dict[str, float] = {}
    for k in sorted({min(k, len(classes)) for k in ks}):
        hit = (order[:, :k] == true_idx[:, None]).any(axis=1) if len(proba) else np.zeros(0, dtype=bool)
        out[f"top_{k}"] = float(hit.mean()) if len(hit) else 0.0
    return out


def confusion(y_true: list[str], y_pred: list[str], categories: list[str]) -> list[list[int]]:
    """Counts, rows the true class and columns the predicted one, in the order of ``categories``."""
    from sklearn.metrics import confusion_matrix

    return [[int(v) for v in row] for row in confusion_matrix(y_true, y_pred, labels=categories)]


def calibration(y_true: list[str], proba: np.ndarray, classes: list[str], bins: int) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins: sum of |B|/n * |accuracy(B) - confidence(B)|.

    Confidence is the top probability; bin i holds confidences in (i/bins, (i+1)/bins] (the first bin also 0).
    """
    n = len(y_true)
    if n == 0:
        return {"ece": 0.0, "bins": []}
    conf = proba.max(axis=1)
    pred = [classes[i] for i in proba.argmax(axis=1)]
    correct = np.array([p == t for p, t in zip(pred, y_true, strict=True)], dtype=float)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else 0.0
        mean_conf = float(conf[mask].mean()) if count else 0.0
        ece += count / n * abs(acc - mean_conf)
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "n": count, "accuracy": acc, "confidence": mean_conf})
    return {"ece": float(ece), "bins": rows}


def size_bucket(width: float, height: float, edges: list[int]) -> str:
    """The bucket of an image's longer side: ``<=32 px``, ``33-64 px``, ..., ``>1024 px``."""
    if width is None or height is None or pd.isna(width) or pd.isna(height):
        return "unknown size"
    side = max(int(width), int(height))
    lower = 0
    for edge in edges:
        if side <= edge:
            return f"<={edge} px" if lower == 0 else f"{lower + 1}-{edge} px"
        lower = edge
    return f">{edges[-1]} px"


def slice_metrics(rows: pd.DataFrame, correct: list[bool], champion_correct: list[bool] | None,
                  edges: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Accuracy per slice: per class, per image-size bucket (manifest width/height), per source if any."""
    frame = pd.DataFrame({"correct": np.asarray(correct, dtype=bool)})
    frame["class"] = rows["label"].astype(str).to_numpy()
    if {"width", "height"} <= set(rows.columns):
        frame["size"] = [size_bucket(w, h, edges) for w, h in zip(rows["width"], rows["height"], strict=True)]
    if "source" in rows.columns and rows["source"].notna().any():
        frame["source"] = rows["source"].fillna("(none)").astype(str).to_numpy()
    if champion_correct is not None:
        frame["champion_correct"] = np.asarray(champion_correct, dtype=bool)
    order = {f"<={edges[0]} px": 0, **{f"{lo + 1}-{hi} px": i + 1 for i, (lo, hi) in enumerate(zip(edges, edges[1:],
                                                                                                       strict=False))},
             f">{edges[-1]} px": len(edges) + 1, "unknown size": len(edges) + 2}
    out: dict[str, list[dict[str, Any]]] = {}
    for column in ("class", "size", "source"):
        if column not in frame.columns:
            continue
        items = []
        for value, group in frame.groupby(column, sort=False):
            item: dict[str, Any] = {"slice": str(value), "n": len(group), "accuracy": float(group["correct"].mean())}
            if champion_correct is not None:
                item["champion_accuracy"] = float(group["champion_correct"].mean())
            items.append(item)
        key = (lambda i: order.get(i["slice"], 99)) if column == "size" else (lambda i: i["slice"])
        out[column] = sorted(items, key=key)
    return out


def mcnemar_p(candidate_correct: list[bool], champion_correct: list[bool]) -> float:
    """Exact two-sided McNemar test on paired outcomes: is the accuracy difference more than chance?"""
    from scipy.stats import binomtest

    a = np.asarray(candidate_correct, dtype=bool)
    b = np.asarray(champion_correct, dtype=bool)
    only_candidate = int((a & ~b).sum())
    only_champion = int((~a & b).sum())
    n = only_candidate + only_champion
    return 1.0 if n == 0 else float(binomtest(only_candidate, n, 0.5).pvalue)


def paired_bootstrap(candidate_correct: list[bool], champion_correct: list[bool], resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Percentile interval of accuracy(candidate) - accuracy(champion), resampling images (pairs kept together)."""
    a = np.asarray(candidate_correct, dtype=np.int8)
    b = np.asarray(champion_correct, dtype=np.int8)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("paired bootstrap needs two equally long, non-empty outcome lists")
    d = (a - b).astype(np.float64)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(d))  # bound the index matrix to about 16 MB
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, len(d), size=(stop - start, len(d)))
        diffs[start:stop] = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return {"difference": float(d.mean()), "ci_low": float(np.quantile(diffs, tail)),
            "ci_high": float(np.quantile(diffs, 1.0 - tail)), "confidence": confidence,
            "resamples": resamples, "seed": seed}


# ------------------------------------------------------------------------------------ models and scoring


@dataclass
class Predictions:
    labels: list[str]
    proba: np.ndarray  # rows: images; columns: ``classes``
    classes: list[str]


def load_model(model_uri: str) -> Any:
    from tlops.tracking import load_pyfunc

    return load_pyfunc(model_uri)


def _python_model(model: Any) -> Any:
    inner = model.unwrap_python_model()
    if not hasattr(inner, "predictor"):
        raise TlopsError(f"model {model.metadata.model_uri if model.metadata else ''} is not a tlops image "
                         "classifier (no predictor after loading)")
    return inner


def model_classes(model: Any) -> list[str]:
    """The class names stored in the model files (model.json), in the order of the probabilities."""
    return list(_python_model(model).classes)


def weights_bytes(model: Any) -> int:
    """Bytes of the model's weights: every tensor of its state dict (backbone and head)."""
    state = _python_model(model).predictor.model.state_dict()
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def predict(model: Any, images: list[bytes], batch: int = 64, name: str = "model") -> Predictions:
    """Raw image bytes through the pyfunc model, as serving does: labels and class probabilities."""
    from tlops.progress import Counter

    classes = model_classes(model)
    labels: list[str] = []
    proba: list[np.ndarray] = []
    counter = Counter(f"predicting with the {name}", len(images), "images")
    for start in range(0, len(images), batch):
        out = model.predict(pd.DataFrame({"image": images[start : start + batch]}))
        labels.extend(str(x) for x in out["label"])
        proba.append(np.asarray([np.asarray(p, dtype=np.float64) for p in out["probabilities"]]))
        counter.advance(len(out))
    matrix = np.concatenate(proba) if proba else np.zeros((0, len(classes)))
    if matrix.shape[1] != len(classes):
        raise TlopsError(f"{name}: {matrix.shape[1]} probabilities per image but {len(classes)} class names")
    return Predictions(labels, matrix, classes)


def predict_features(model: Any, paths: list[str], image_sha256: list[str], cache: Any, batch: int = 64,
                     name: str = "model") -> Predictions:
    """The predictions of :func:`predict`, from the model's backbone features: read from the feature cache
    (keyed by the backbone's weights, the model's preprocessing and the images' content) or computed once and
    stored there, then through the model's head. The same transform and forward pass as serving, split in two;
    a linear-probe candidate and an unchanged champion share their backbone, so their features are one file."""
    import torch

    from tlops.progress import phase

    phase(f"predicting with the {name} from its backbone features (the feature cache)")
    inner = _python_model(model)
    predictor = inner.predictor
    classifier, spec, classes = predictor.model, predictor.spec, list(inner.classes)
    feats = cache.features_of(classifier.backbone, paths, image_sha256, spec, batch, torch.device("cpu"), name)
    with torch.no_grad():
        proba = torch.softmax(classifier.head(feats), dim=1).numpy().astype(np.float64)
    if proba.shape[1] != len(classes):
        raise TlopsError(f"{name}: {proba.shape[1]} probabilities per image but {len(classes)} class names")
    labels = [classes[i] for i in proba.argmax(axis=1)] if len(proba) else []
    return Predictions(labels, proba, classes)


def measure_latency(model: Any, images: list[bytes], count: int, warmup: int, threads: int = 1) -> dict[str, Any]:
    """Milliseconds per image at batch size 1: one image per ``predict`` call (decode, preprocessing and
    forward pass), as a single request is served, on the CPU, with ``threads`` torch threads (0: as is)."""
    import torch

    if count <= 0 or not images:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None, "threads": threads}
    from tlops.progress import Counter

    sample = [images[i % len(images)] for i in range(count)]
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # Warm-up calls are not counted: the first call at a new batch shape builds kernels.
        counter = Counter("measuring latency at batch size 1", warmup + len(sample), "images")
        for b in sample[:warmup]:
            model.predict(pd.DataFrame({"image": [b]}))
            counter.advance()
        times = []
        for b in sample:
            t0 = time.perf_counter()
            model.predict(pd.DataFrame({"image": [b]}))
            times.append((time.perf_counter() - t0) * 1000.0)
            counter.advance()
    finally:
        torch.set_num_threads(before)
    return {"n": len(times), "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "mean_ms": float(np.mean(times)), "threads": threads or before}


def score(pred: Predictions, y_true: list[str], cfg: EvaluationConfig) -> dict[str, Any]:
    """Every accuracy-type figure of one model on the test labels."""
    out = classification_metrics(y_true, pred.labels)
    per_class = per_class_metrics(y_true, pred.labels, pred.classes)
    worst, worst_class = min_recall(per_class)
    calib = calibration(y_true, pred.proba, pred.classes, cfg.ece_bins)
    out.update({"per_class": per_class, "min_class_recall": worst, "min_recall_class": worst_class,
                "top_k": top_k_accuracy(y_true, pred.proba, pred.classes, cfg.top_k), "ece": calib["ece"],
                "calibration": calib, "classes": pred.classes})
    return out


def champion_load_error(name: str, version: str, exc: BaseException) -> TlopsError:
    detail = " ".join(str(exc).split())[:200]
    where = ""
    try:
        from mlflow import MlflowClient

        where = f" ({MlflowClient().get_model_version_download_uri(name, version)})"
    except Exception:  # the location is a courtesy; the message stands without it
        pass
    return TlopsError(f"champion {name} version {version} cannot be loaded for comparison "
                      f"({type(exc).__name__}: {detail}); its files may be missing from the artifact store"
                      f"{where}: restore them, or run 'tlops rollback {name}'")


# Over 60 lines: the candidate and the champion scored on the same images, and the record both feed;
# the scoring, comparison and slicing are calls.
def evaluate(candidate_uri: str, rows: pd.DataFrame, images: list[bytes], cfg: EvaluationConfig,
             champion: tuple[str, str] | None = None, features: Any = None,
             loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the candidate (and the champion, ``(name, version)``, when there is one) on the same images.

    The champion is loaded first: a champion that cannot be loaded stops the evaluation before any work.
    With ``features`` (a :class:`tlops.vision.features.FeatureCache`) both are scored from backbone features
    (:func:`predict_features`; ``rows`` then needs ``path`` and ``sha256``), else from the image bytes through
    the pyfunc (:func:`predict`). Latency is always measured through the pyfunc, one image per call.
    ``loaded``: a dict that receives the loaded candidate (``candidate``), for the caller's further use.
    """
    from tlops.progress import phase

    labels = [str(x) for x in rows["label"]]

    def predictions(model: Any, name: str) -> Predictions:
        if features is None:
            return predict(model, images, cfg.batch_size, name)
        return predict_features(model, [str(p) for p in rows["path"]], [str(s) for s in rows["sha256"]], features,
                                cfg.batch_size, name)

    champ_model = None
    if champion is not None:
        name, version = champion
        phase(f"loading champion {name} version {version}")
        try:
            champ_model = load_model(f"models:/{name}/{version}")
            model_classes(champ_model)
        except Exception as exc:  # any failure to load means the same thing: no comparison possible
            raise champion_load_error(name, version, exc) from None
    phase("loading the candidate")
    model = load_model(candidate_uri)
    if loaded is not None:
        loaded["candidate"] = model
    pred = predictions(model, "candidate")
    cand = score(pred, labels, cfg)
    correct = [p == t for p, t in zip(pred.labels, labels, strict=True)]
    cand["latency"] = measure_latency(model, images, min(cfg.latency_images, len(images)), cfg.latency_warmup,
                                      cfg.latency_threads)
    cand["model_size_bytes"] = weights_bytes(model)
    categories = categories_for(labels, pred.classes)
    result: dict[str, Any] = {
        "candidate": cand,
        "confusion_matrix": {"categories": categories, "matrix": confusion(labels, pred.labels, categories)},
        "evaluated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model_uri": candidate_uri,
    }
    champ_correct = None
    if champ_model is not None and champion is not None:
        try:
            champ_pred = predictions(champ_model, f"champion version {champion[1]}")
        except Exception as exc:
            raise champion_load_error(*champion, exc) from None
        champ = score(champ_pred, labels, cfg)
        champ["version"] = champion[1]
        champ["model_size_bytes"] = weights_bytes(champ_model)
        champ_correct = [p == t for p, t in zip(champ_pred.labels, labels, strict=True)]
        phase(f"comparing with the champion ({cfg.bootstrap_resamples} paired bootstrap resamples, McNemar)")
        comparison = paired_bootstrap(correct, champ_correct, cfg.bootstrap_resamples, cfg.confidence, cfg.seed)
        comparison["mcnemar_p"] = mcnemar_p(correct, champ_correct)
        comparison["only_candidate_right"] = int(sum(a and not b for a, b in zip(correct, champ_correct,
                                                                                 strict=True)))
        comparison["only_champion_right"] = int(sum(b and not a for a, b in zip(correct, champ_correct,
                                                                                strict=True)))
        result["champion"] = champ
        result["comparison"] = comparison
        result["mcnemar_p"] = comparison["mcnemar_p"]
    phase("scoring slices by image size")
    result["slices"] = slice_metrics(rows, correct, champ_correct, cfg.size_buckets)
    return result


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers as flat name -> number (kfp Metrics, MLflow metrics)."""
    cand = result["candidate"]
    out: dict[str, float] = {"accuracy": cand["accuracy"], "macro_f1": cand["macro_f1"], "n": cand["n"],
                             "min_class_recall": cand["min_class_recall"], "ece": cand["ece"],
                             "model_size_bytes": cand["model_size_bytes"], **cand["top_k"]}
    if cand["latency"]["n"]:
        out.update({"latency_p50_ms": cand["latency"]["p50_ms"], "latency_p95_ms": cand["latency"]["p95_ms"]})
    if "champion" in result:
        comp = result["comparison"]
        out.update({"champion_accuracy": result["champion"]["accuracy"], "accuracy_difference": comp["difference"],
                    "accuracy_difference_ci_low": comp["ci_low"], "accuracy_difference_ci_high": comp["ci_high"],
                    "mcnemar_p": comp["mcnemar_p"]})
    return {k: float(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ figures


