"""Evaluation on the held-out split, through the same predictor that serves the model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def test_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    usable = manifest["decodable"].astype(bool) & manifest["label"].notna()
    return manifest[usable & (manifest["split"] == "test")].reset_index(drop=True)


def read_images(paths: list[str]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def classification_metrics(y_true: list[str], y_pred: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "n": len(y_true),
    }


def evaluate_pyfunc(model_uri: str, images: list[bytes], labels: list[str], batch: int = 64) -> dict[str, Any]:
    """Load a logged model exactly as serving does and score it on raw image bytes."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_uri)
    preds: list[str] = []
    for start in range(0, len(images), batch):
        frame = pd.DataFrame({"image": images[start : start + batch]})
        preds.extend(str(x) for x in model.predict(frame)["label"])
        log.info("evaluate %s: %d/%d images", model_uri, min(start + batch, len(images)), len(images))
    metrics = classification_metrics(labels, preds)
    metrics["correct"] = [bool(a == b) for a, b in zip(labels, preds, strict=True)]
    return metrics


def mcnemar_p(candidate_correct: list[bool], champion_correct: list[bool]) -> float:
    """Exact two-sided McNemar test on paired outcomes: is the accuracy difference more than chance?"""
    from scipy.stats import binomtest

    a = np.asarray(candidate_correct, dtype=bool)
    b = np.asarray(champion_correct, dtype=bool)
    only_candidate = int((a & ~b).sum())
    only_champion = int((~a & b).sum())
    n = only_candidate + only_champion
    return 1.0 if n == 0 else float(binomtest(only_candidate, n, 0.5).pvalue)
