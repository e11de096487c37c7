"""Small data sets: stratified, stable splits and floors that scale with the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from tests.conftest import run_cli
from tlops.config.settings import ValidationConfig
from tlops.data.discovery import build_manifest, split_quotas, stratified_splits
from tlops.data.validation import validate_manifest

PHOTOS = ("chelsea", "coffee", "astronaut")


def photo_set(root: Path, per_class: int, classes: tuple[str, ...] = PHOTOS, seed: int = 0) -> Path:
    """ROOT/<photo>/<n>.jpg: real scikit-image photos, each copy a little different (crop, scale, light)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in classes:
        base = Image.fromarray(getattr(data, name)())
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = base.size
            cw, ch = int(w * rng.uniform(0.6, 0.95)), int(h * rng.uniform(0.6, 0.95))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = base.crop((x, y, x + cw, y + ch)).resize((48, 48))
            img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
            img.save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def test_quotas_round_and_keep_one_for_training() -> None:
    assert split_quotas(40, 0.15, 0.2) == (8, 6)
    assert split_quotas(20, 0.15, 0.2) == (4, 3)
    assert split_quotas(2, 0.15, 0.2) == (0, 0)
    assert split_quotas(3, 0.4, 0.4) == (1, 1)
    n_test, n_val = split_quotas(5, 0.45, 0.45)
    assert n_test + n_val == 4


def test_every_class_gets_its_share_and_copies_share_a_split() -> None:
    rng = np.random.default_rng(1)
    labels = [c for c in "abc" for _ in range(40)]
    shas = [f"{rng.integers(1 << 62):x}" for _ in labels]
    shas[5] = shas[4]  # an exact copy within class a
    splits = stratified_splits(labels, shas, 0.15, 0.2, "tlops")
    for c in "abc":
        mine = [s for lab, s in zip(labels, splits, strict=True) if lab == c]
        distinct = 39 if c == "a" else 40
        n_test, n_val = split_quotas(distinct, 0.15, 0.2)
        assert (mine.count("test"), mine.count("val")) == (n_test + (c == "a" and splits[4] == "test"),
                                                          n_val + (c == "a" and splits[4] == "val"))
    assert splits[4] == splits[5]


def test_splits_stay_stable_as_data_grows() -> None:
    """Adding one image to a class moves at most two of its others; other classes do not move."""
    rng = np.random.default_rng(2)
    labels = [c for c in "ab" for _ in range(30)]
    shas = [f"{rng.integers(1 << 62):x}" for _ in labels]
    before = dict(zip(shas, stratified_splits(labels, shas, 0.15, 0.2, "s"), strict=True))
    for _ in range(20):
        new = f"{rng.integers(1 << 62):x}"
        labels, shas = [*labels, "a"], [*shas, new]
        after = dict(zip(shas, stratified_splits(labels, shas, 0.15, 0.2, "s"), strict=True))
        moved = [s for s in before if before[s] != after[s]]
        assert len(moved) <= 2
        assert all(labels[shas.index(s)] == "a" for s in moved)
        before = after


def test_forty_photos_per_class_validate_by_default(tmp_path: Path) -> None:
    root = photo_set(tmp_path / "photos", 40)
    df = build_manifest(str(root), tmp_path / "cache")
    report = validate_manifest(df, ValidationConfig())
    assert report.success, report.summary_lines()
    counts = df.groupby(["label", "split"]).size()
    for name in PHOTOS:
        assert (counts[(name, "test")], counts[(name, "val")], counts[(name, "train")]) == (8, 6, 26)
    # The old content-hash split on the same photos: a class may fall short of its share by chance.
    hashed = build_manifest(str(root), tmp_path / "cache", stratified=False)
    assert set(hashed["sha256"]) == set(df["sha256"])


def test_floors_scale_and_a_too_small_set_says_so_in_one_line(tmp_path: Path) -> None:
    root = photo_set(tmp_path / "tiny", 6)
    df = build_manifest(str(root), tmp_path / "cache")
    report = validate_manifest(df, ValidationConfig(min_images_per_class=2))
    failed = {c.name: c.detail for c in report.failures()}
    detail = failed["min_images_per_class"]
    assert "too small for a held-out test" in detail and "class chelsea has 6 images" in detail
    assert "validation.min_held_out_per_class" in detail and "\n" not in detail
    # The same check passes once the floor for held-out splits is lowered to what the set can give.
    ok = validate_manifest(df, ValidationConfig(min_images_per_class=2, min_held_out_per_class=1))
    assert ok.success, ok.summary_lines()


def test_given_splits_keep_their_floors(tmp_path: Path) -> None:
    """Split folders are the user's: a class far below its share of val fails, naming it."""
    root = tmp_path / "split"
    photo_set(root / "train", 20)
    photo_set(root / "test", 6, seed=1)
    photo_set(root / "val", 6, classes=PHOTOS[:2], seed=2)
    photo_set(root / "val", 1, classes=PHOTOS[2:], seed=3)
    df = build_manifest(str(root), tmp_path / "cache")
    report = validate_manifest(df, ValidationConfig())
    failed = {c.name: c.detail for c in report.failures()}
    assert "fewer than 2 images: astronaut/val=1" in failed["min_images_per_class"]


def test_validate_cli_passes_forty_photos_per_class(tmp_path: Path) -> None:
    root = photo_set(tmp_path / "photos", 40)
    proc = run_cli("validate", "--data", str(root), "--set", f"workdir={tmp_path / '.tlops'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS min_images_per_class" in proc.stdout
