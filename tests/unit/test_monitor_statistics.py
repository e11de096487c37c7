"""tlops monitor's statistics on real digit scans through a real model (the tiny probe of the session): held-out
digits of the same classes are quiet and their accuracy is estimated closely; inverted and blurred digits are
flagged, out of distribution, with a lower estimate."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter, ImageOps

from tlops.monitoring.monitor import assess, atc_estimate
from tlops.monitoring.reference import Reference, build_reference
from tlops.serving.predlog import Served, to_row

CLASSES = (0, 1, 7)


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def digits(tiny_digits: Path) -> dict[str, Any]:
    """The sklearn digits of the tiny set's classes that the tiny model never saw, as the data export draws them."""
    from sklearn.datasets import load_digits

    seen = {int(p.stem.split("_")[1]) for p in tiny_digits.rglob("*.png")}
    d = load_digits()
    rows = [(i, int(t)) for i, t in enumerate(d.target) if int(t) in CLASSES and i not in seen]
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    images = [Image.fromarray((255.0 - d.images[i] * (255.0 / 16.0)).round().astype("uint8")) for i, _ in rows]
    return {"images": images, "labels": [str(t) for _, t in rows]}


@pytest.fixture(scope="module")
def setup(tiny_models: dict[str, Path], tiny_digits: Path, digits: dict[str, Any],
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tlops.serving.pyfunc import Predictor, load_model_dir

    model, spec, classes = load_model_dir(tiny_models["good"])
    predictor = Predictor(model, spec, classes)
    train = pd.DataFrame({"path": [str(p) for p in sorted(tiny_digits.rglob("*.png"))],
                          "label": [p.parent.name for p in sorted(tiny_digits.rglob("*.png"))]})
    root = tmp_path_factory.mktemp("held-out")
    held = []
    for i, (img, label) in enumerate(zip(digits["images"][:150], digits["labels"][:150], strict=True)):
        path = root / f"{i}.png"
        path.write_bytes(_png(img))
        held.append({"path": str(path), "label": label})
    reference = build_reference(predictor, train, pd.DataFrame(held), "val", sample=500)
    info = {"name": "digits", "version": "1", "classes": classes, "preprocess_fingerprint": spec.fingerprint}
    return {"predictor": predictor, "reference": reference, "info": info}


def _window(setup: dict[str, Any], images: list[Image.Image]) -> tuple[pd.DataFrame, np.ndarray]:
    """The prediction log's rows for these images as served, and the predicted class indexes."""
    predictor = setup["predictor"]
    files = [_png(img) for img in images]
    proba, emb = predictor.proba_embed(predictor.tensors(files))
    now = time.time()
    rows = [to_row(Served(now, setup["info"], f, proba[i], emb[i]), 5, False) for i, f in enumerate(files)]
    return pd.DataFrame(rows), proba.argmax(axis=1)


def _accuracy(predicted: np.ndarray, labels: list[str], classes: list[str]) -> float:
    return float(np.mean([classes[p] == y for p, y in zip(predicted, labels, strict=True)]))


def test_reference_record_round_trips(setup: dict[str, Any], tmp_path: Path) -> None:
    ref = setup["reference"]
    back = Reference.load(ref.save(tmp_path / "r.npz"), "test record")
    assert list(back.classes) == list(ref.classes) and np.array_equal(back.val_embeddings, ref.val_embeddings)
    assert back.train_embeddings.shape == (90, 1280) and back.train_class_counts.tolist() == [30, 30, 30]
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    from tlops.errors import TlopsError

    with pytest.raises(TlopsError, match="cannot be read as a monitoring reference"):
        Reference.load(tmp_path / "bad.npz", "bad.npz")


def test_held_out_digits_are_quiet_and_their_accuracy_is_estimated(setup: dict[str, Any],
                                                                   digits: dict[str, Any]) -> None:
    images, labels = digits["images"][150:], digits["labels"][150:]
    frame, predicted = _window(setup, images)
    truth = _accuracy(predicted, labels, setup["info"]["classes"])
    report = assess(setup["reference"], frame, floor=0.5, resamples=300)
    assert report["verdict"] == "quiet", report["checks"]
    est = report["estimate"]
    assert abs(est["accuracy"] - truth) < 0.05, (est, truth)
    assert est["low"] <= truth <= est["high"]
    assert report["ood_rate"] < 0.15


@pytest.fixture(scope="module")
def quiet(setup: dict[str, Any], digits: dict[str, Any]) -> dict[str, Any]:
    return assess(setup["reference"], _window(setup, digits["images"][150:350])[0], floor=0.5, resamples=300)


def _photos(n: int) -> list[Image.Image]:
    """Crops of scikit-image's photographs (a camera man, coins, the moon, a cat...): images of another kind."""
    from skimage import data as sk

    names = ("camera", "coins", "moon", "page", "text", "clock", "horse", "chelsea", "coffee", "astronaut")
    photos = [Image.fromarray(np.asarray(getattr(sk, name)())).convert("L") for name in names]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        box = 64 + 8 * (i // len(photos))
        out.append(photo.crop((0, 0, min(box * 3, photo.width), min(box * 3, photo.height))).resize((8, 8)))
    return out


@pytest.mark.parametrize("shift", ["inverted", "blurred", "other kinds"])
def test_shifted_traffic_is_flagged(setup: dict[str, Any], digits: dict[str, Any], quiet: dict[str, Any],
                                    shift: str) -> None:
    images, labels = digits["images"][150:350], digits["labels"][150:350]
    if shift == "inverted":
        moved = [ImageOps.invert(img) for img in images]
    elif shift == "blurred":
        moved = [img.resize((32, 32), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(3)) for img in images]
    else:  # a quarter of the traffic is not digits at all
        moved = images[:150] + _photos(50)
    frame, predicted = _window(setup, moved)
    report = assess(setup["reference"], frame, floor=0.5, resamples=300)
    flagged = {c["name"] for c in report["checks"] if c["flagged"]}
    assert report["verdict"] == "drift" and "feature drift (MMD)" in flagged, report["checks"]
    estimate = report["estimate"]["accuracy"]
    if shift == "inverted":  # this backbone's features barely change: the model still reads them, and ATC says so
        truth = _accuracy(predicted, labels, setup["info"]["classes"])
        assert abs(estimate - truth) < 0.05 and "brightness" in flagged
    elif shift == "blurred":
        truth = _accuracy(predicted, labels, setup["info"]["classes"])
        assert estimate < quiet["estimate"]["accuracy"] - 0.05 and "image sizes" in flagged
        assert abs(estimate - truth) < 0.1, (estimate, truth)
    else:
        assert "out of distribution" in flagged and report["ood_rate"] > 0.2, report["checks"]
        assert estimate < quiet["estimate"]["accuracy"] - 0.05  # no photo is a right answer


def test_atc_on_known_values() -> None:
    val_conf = np.linspace(0.5, 1.0, 101)
    val_correct = val_conf > 0.6  # 80 of 101 right: the threshold sits near 0.6
    est, low, high = atc_estimate(val_conf, val_correct, np.full(50, 0.55), 200)
    assert est == 0.0 and low == 0.0
    est, low, high = atc_estimate(val_conf, val_correct, np.full(50, 0.95), 200)
    assert est == 1.0
    mixed = np.concatenate([np.full(30, 0.9), np.full(70, 0.55)])
    est, low, high = atc_estimate(val_conf, val_correct, mixed, 200)
    assert est == pytest.approx(0.3) and low <= 0.3 <= high
