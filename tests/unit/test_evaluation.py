"""The evaluation's figures on hand-made predictions, where the right answer is known."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tlops.config.settings import EvaluationConfig
from tlops.evaluation import evaluate as evaluation
from tlops.evaluation import report

CLASSES = ["cat", "dog", "fox"]


def test_top_k_counts_the_true_class_among_the_k_most_probable_and_caps_k() -> None:
    proba = np.array([[0.6, 0.3, 0.1],   # true cat: top-1
                      [0.5, 0.4, 0.1],   # true dog: top-2
                      [0.5, 0.4, 0.1]])  # true fox: top-3 only
    out = evaluation.top_k_accuracy(["cat", "dog", "fox"], proba, CLASSES, [2, 5])
    assert out == {"top_2": pytest.approx(2 / 3), "top_3": 1.0}  # k=5 is capped at the 3 classes
    # A label the model does not know is never in its top k.
    assert evaluation.top_k_accuracy(["wolf"], proba[:1], CLASSES, [2]) == {"top_2": 0.0}


def test_per_class_metrics_and_lowest_recall() -> None:
    y_true = ["cat", "cat", "cat", "cat", "dog", "dog", "fox"]
    y_pred = ["cat", "cat", "cat", "dog", "dog", "dog", "dog"]
    per = evaluation.per_class_metrics(y_true, y_pred, CLASSES)
    assert per["cat"] == {"precision": 1.0, "recall": 0.75, "f1": pytest.approx(6 / 7), "support": 4}
    assert per["dog"]["precision"] == pytest.approx(0.5) and per["dog"]["recall"] == 1.0
    assert per["fox"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert evaluation.min_recall(per) == (0.0, "fox")
    # A class with no test images does not count as a recall of zero.
    per_no_fox = evaluation.per_class_metrics(y_true[:6], y_pred[:6], CLASSES)
    assert evaluation.min_recall(per_no_fox) == (0.75, "cat")


def test_confusion_matrix_rows_are_true_columns_predicted_and_unknown_labels_appended() -> None:
    y_true = ["cat", "dog", "dog", "wolf"]
    y_pred = ["cat", "cat", "dog", "fox"]
    cats = evaluation.categories_for(y_true, CLASSES)
    assert cats == ["cat", "dog", "fox", "wolf"]
    assert evaluation.confusion(y_true, y_pred, cats) == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]


def test_expected_calibration_error_with_equal_width_bins() -> None:
    # Four images at confidence 0.9 (three right) and two at 0.55 (both right).
    proba = np.array([[0.9, 0.05, 0.05]] * 4 + [[0.55, 0.45, 0.0]] * 2)
    y_true = ["cat", "cat", "cat", "dog", "cat", "cat"]
    calib = evaluation.calibration(y_true, proba, CLASSES, bins=10)
    # |0.75 - 0.9| * 4/6 + |1.0 - 0.55| * 2/6
    assert calib["ece"] == pytest.approx(0.15 * 4 / 6 + 0.45 * 2 / 6)
    by_bin = {round(b["hi"], 1): b for b in calib["bins"] if b["n"]}
    assert set(by_bin) == {0.9, 0.6} and by_bin[0.9]["n"] == 4 and by_bin[0.9]["accuracy"] == 0.75
    assert len(calib["bins"]) == 10
    # A perfectly confident, always right model is perfectly calibrated; confidence 1.0 falls in the last bin.
    perfect = evaluation.calibration(["cat", "dog"], np.array([[1.0, 0, 0], [0, 1.0, 0]]), CLASSES, 5)
    assert perfect["ece"] == 0.0 and perfect["bins"][-1]["n"] == 2


@pytest.mark.parametrize(("w", "h", "bucket"), [(8, 8, "<=32 px"), (32, 20, "<=32 px"), (33, 10, "33-64 px"),
                                                (600, 40, "513-1024 px"), (2000, 30, ">1024 px"),
                                                (float("nan"), 8, "unknown size")])
def test_size_bucket_by_longer_side(w: float, h: float, bucket: str) -> None:
    assert evaluation.size_bucket(w, h, [32, 64, 128, 256, 512, 1024]) == bucket


def test_slices_per_class_size_and_source_with_the_champion_beside() -> None:
    rows = pd.DataFrame({"label": ["cat", "cat", "dog", "dog"], "width": [8, 100, 8, 100],
                         "height": [8, 100, 8, 100], "source": ["phone", "phone", "scanner", None]})
    out = evaluation.slice_metrics(rows, [True, False, True, True], [True, True, False, True], [32, 64, 128])
    assert out["class"] == [{"slice": "cat", "n": 2, "accuracy": 0.5, "champion_accuracy": 1.0},
                            {"slice": "dog", "n": 2, "accuracy": 1.0, "champion_accuracy": 0.5}]
    assert [(s["slice"], s["n"], s["accuracy"]) for s in out["size"]] == [("<=32 px", 2, 1.0),
                                                                         ("65-128 px", 2, 0.5)]
    assert {s["slice"]: s["n"] for s in out["source"]} == {"(none)": 1, "phone": 2, "scanner": 1}
    without_source = evaluation.slice_metrics(rows.drop(columns="source"), [True] * 4, None, [32])
    assert set(without_source) == {"class", "size"} and "champion_accuracy" not in without_source["class"][0]


def test_paired_bootstrap_is_seeded_and_brackets_the_difference() -> None:
    rng = np.random.default_rng(1)
    champion = rng.random(400) < 0.80
    candidate = champion | (rng.random(400) < 0.5)  # fixes about half of the champion's mistakes
    a = evaluation.paired_bootstrap(list(candidate), list(champion), 1000, 0.95, seed=7)
    b = evaluation.paired_bootstrap(list(candidate), list(champion), 1000, 0.95, seed=7)
    assert a == b
    assert a["difference"] == pytest.approx(candidate.mean() - champion.mean())
    assert 0 < a["ci_low"] < a["difference"] < a["ci_high"]
    same = evaluation.paired_bootstrap([True, False] * 50, [True, False] * 50, 200)
    assert (same["difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    worse = evaluation.paired_bootstrap(list(champion), list(candidate), 1000)
    assert worse["ci_high"] < 0
    assert evaluation.mcnemar_p(list(candidate), list(champion)) < 1e-6
    assert evaluation.mcnemar_p([True, False], [True, False]) == 1.0


def synthetic_result(n: int = 60, with_champion: bool = True, classes: list[str] | None = None) -> dict:
    """An evaluation record built from random but fixed predictions, as ``evaluation.evaluate`` returns it."""
    classes = classes or CLASSES
    rng = np.random.default_rng(0)
    y_true = [classes[i % len(classes)] for i in range(n)]
    logits = rng.normal(size=(n, len(classes)))
    for i, y in enumerate(y_true):
        logits[i, classes.index(y)] += 2.0
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = evaluation.Predictions([classes[i] for i in proba.argmax(axis=1)], proba, classes)
    cfg = EvaluationConfig()
    cand = evaluation.score(pred, y_true, cfg)
    cand["latency"] = {"n": 30, "p50_ms": 4.2, "p95_ms": 6.1, "mean_ms": 4.5, "threads": 1}
    cand["model_size_bytes"] = 13_667_860
    cats = evaluation.categories_for(y_true, classes)
    result = {"candidate": cand, "model_uri": "models:/m-test", "evaluated_at": "2026-01-01T00:00:00+00:00",
              "confusion_matrix": {"categories": cats, "matrix": evaluation.confusion(y_true, pred.labels, cats)}}
    correct = [p == t for p, t in zip(pred.labels, y_true, strict=True)]
    champ_correct = None
    if with_champion:
        champ_pred = evaluation.Predictions([y if i % 4 else classes[0] for i, y in enumerate(y_true)],
                                            np.roll(proba, 1, axis=0), classes)
        champ = evaluation.score(champ_pred, y_true, cfg)
        champ.update({"version": "3", "model_size_bytes": 13_667_860})
        champ_correct = [p == t for p, t in zip(champ_pred.labels, y_true, strict=True)]
        comp = evaluation.paired_bootstrap(correct, champ_correct, 500)
        comp.update({"mcnemar_p": evaluation.mcnemar_p(correct, champ_correct), "only_candidate_right": 1,
                     "only_champion_right": 2})
        result.update({"champion": champ, "comparison": comp, "mcnemar_p": comp["mcnemar_p"]})
    rows = pd.DataFrame({"label": y_true, "width": [8] * n, "height": [8] * n})
    result["slices"] = evaluation.slice_metrics(rows, correct, champ_correct, cfg.size_buckets)
    return result


def test_figures_are_real_pngs() -> None:
    pngs = report.figures(synthetic_result())
    assert set(pngs) == {"confusion_matrix.png", "reliability.png", "per_class_recall.png"}
    for data in pngs.values():
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.width > 200 and img.height > 200
        assert np.asarray(img.convert("L")).std() > 10  # something is drawn


def test_report_is_self_contained_and_escapes_names() -> None:
    result = synthetic_result(classes=["<script>alert(1)</script>", "dog", "fox"])
    page = report.report_html(result, report.figures(result), "report & co")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "report &amp; co" in page
    embedded = re.findall(r"src=[\"']data:image/png;base64,([A-Za-z0-9+/=]+)[\"']", page)
    assert len(embedded) == 3
    assert all(Image.open(io.BytesIO(base64.b64decode(e))).format == "PNG" for e in embedded)
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere
    for needle in ("Headline", "Against the champion", "paired bootstrap", "McNemar", "Per class",
                   "Slices by image size", "Calibration", "latency per image, p95", "champion (version 3)"):
        assert needle in page, needle
    alone = report.report_html(synthetic_result(with_champion=False), {}, "t")
    assert "No champion yet" in alone and "Against the champion" not in alone


def test_scalars_are_flat_numbers() -> None:
    out = evaluation.scalars(synthetic_result())
    assert all(isinstance(v, float) for v in out.values())
    assert {"accuracy", "macro_f1", "top_2", "top_3", "ece", "min_class_recall", "latency_p95_ms",
            "model_size_bytes", "champion_accuracy", "accuracy_difference_ci_low", "mcnemar_p"} <= set(out)
    assert "champion_accuracy" not in evaluation.scalars(synthetic_result(with_champion=False))
