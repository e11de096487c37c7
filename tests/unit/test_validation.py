"""The GX suite over the manifest: each check caught on a small crafted data set, and real digits pass."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from tlops.config.settings import CHECK_SEVERITIES, ValidationConfig
from tlops.data.discovery import build_manifest
from tlops.data.validation import drift, ks_statistic, training_manifest, validate_manifest, write_outputs


def picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random greyscale picture: distinct seeds give unrelated perceptual hashes."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def save(img: Image.Image, path: Path, fmt: str = "PNG", **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def split_set(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("a", "b"),
              splits: tuple[str, ...] = ("train", "val", "test")) -> Path:
    """ROOT/<split>/<class>/<n>.png, every image unrelated to every other."""
    seed = 0
    for split in splits:
        for label in classes:
            for i in range(per_class):
                seed += 1
                save(picture(seed), root / split / label / f"{i}.png")
    return root


def check(report, name: str):  # noqa: ANN001, ANN201
    return next(c for c in report.checks if c.name == name)


CFG = ValidationConfig(min_images_per_class=1)


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    return split_set(tmp_path / "data")


def run(root: Path, cfg: ValidationConfig = CFG, reference: pd.DataFrame | None = None, **kw: object):  # noqa: ANN201
    df = build_manifest(str(root), root.parent / "cache")
    return df, validate_manifest(df, cfg, reference, **kw)  # type: ignore[arg-type]


def test_clean_digits_pass_with_the_demo_defaults(tmp_path: Path, tiny_digits: Path) -> None:
    df = build_manifest(str(tiny_digits), tmp_path / "c")
    report = validate_manifest(df, ValidationConfig(min_images_per_class=2))
    assert report.success, report.summary_lines()
    assert {c.name for c in report.checks} == set(CHECK_SEVERITIES)
    assert report.gx_result["files"]["success"] is True
    assert {c.status for c in report.checks} <= {"PASS", "SKIP"}
    assert not report.quarantine


def test_clean_crafted_set_passes_every_check(clean: Path) -> None:
    _, report = run(clean)
    assert report.success and not report.warnings(), report.summary_lines()
    near = check(report, "near_duplicates_across_splits")
    assert near.status == "PASS" and "18 of 18 images" in near.detail  # they were really compared


def test_corrupt_and_unlabelled_files_are_named_and_quarantined(tmp_path: Path, tiny_digits: Path) -> None:
    df = build_manifest(str(tiny_digits), tmp_path / "c")
    df.loc[0, "decodable"] = False
    df.loc[0, "error"] = "OSError: truncated"
    df.loc[1, "label"] = None
    report = validate_manifest(df, ValidationConfig(min_images_per_class=50))
    assert not report.success
    failed = {c.name: c.detail for c in report.failures()}
    assert df.loc[0, "uri"] in failed["decodable"] and "OSError: truncated" in failed["decodable"]
    assert df.loc[1, "uri"] in failed["labels_not_null"]
    assert "fewer than 50 images" in failed["min_images_per_class"]
    assert {q["uri"] for q in report.quarantine} == {df.loc[0, "uri"], df.loc[1, "uri"]}
    assert report.gx_result["files"]["success"] is False


def test_truncated_file_on_disk_fails_decodable(clean: Path) -> None:
    target = clean / "train" / "a" / "0.png"
    buf = io.BytesIO()
    picture(99).save(buf, format="JPEG")
    (clean / "train" / "a" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _, report = run(clean)
    c = check(report, "decodable")
    assert c.status == "FAIL" and c.files == [f"{clean}/train/a/cut.jpg"]
    assert target.is_file()  # untouched


def test_exact_copy_in_another_split_is_leakage(clean: Path) -> None:
    (clean / "test" / "a" / "copy.png").write_bytes((clean / "train" / "b" / "1.png").read_bytes())
    _, report = run(clean)
    c = check(report, "exact_duplicates_across_splits")
    assert c.status == "FAIL" and c.files == [f"{clean}/test/a/copy.png"]
    assert f"= {clean}/train/b/1.png" in c.detail
    # The same bytes under a second label are caught as well, every copy named.
    labels = check(report, "same_content_two_labels")
    assert labels.status == "FAIL"
    assert set(labels.files) == {f"{clean}/test/a/copy.png", f"{clean}/train/b/1.png"}


def test_same_content_under_two_labels_in_one_split(clean: Path) -> None:
    (clean / "train" / "b" / "again.png").write_bytes((clean / "train" / "a" / "0.png").read_bytes())
    _, report = run(clean)
    assert check(report, "same_content_two_labels").status == "FAIL"
    assert check(report, "exact_duplicates_across_splits").status == "PASS"  # same split: no leak


def test_copy_under_the_same_label_and_split_is_fine(clean: Path) -> None:
    (clean / "train" / "a" / "again.png").write_bytes((clean / "train" / "a" / "0.png").read_bytes())
    _, report = run(clean)
    assert report.success and check(report, "same_content_two_labels").status == "PASS"


@pytest.mark.parametrize("kind", ["brightened", "jpeg"])
def test_near_duplicate_across_splits_is_reported(clean: Path, kind: str) -> None:
    original = Image.open(clean / "train" / "b" / "0.png")
    if kind == "brightened":
        save(ImageEnhance.Brightness(original).enhance(1.3), clean / "test" / "b" / "lookalike.png")
    else:
        save(original.convert("RGB"), clean / "test" / "b" / "lookalike.jpg", "JPEG", quality=50)
    _, report = run(clean)
    c = check(report, "near_duplicates_across_splits")
    assert c.status == "WARN" and report.success  # a warning by default
    assert c.files == [str(next((clean / "test" / "b").glob("lookalike.*")))]
    # Neither byte-identical nor hash-identical: a real near duplicate, found by distance.
    found = re.search(rf"~ {re.escape(str(clean))}/train/b/0.png \(d=(\d)\)", c.detail)
    assert found and 1 <= int(found.group(1)) <= 4, c.detail
    strict = ValidationConfig(min_images_per_class=1, severity={"near_duplicates_across_splits": "error"})
    _, report = run(clean, strict)
    assert not report.success and check(report, "near_duplicates_across_splits").status == "FAIL"


def test_near_duplicates_are_not_judged_on_tiny_images(tmp_path: Path, tiny_digits: Path) -> None:
    df = build_manifest(str(tiny_digits), tmp_path / "c")
    # On 8x8 scans distinct digits share hashes; with no minimum side they would all be "near duplicates".
    loose = validate_manifest(df, ValidationConfig(min_images_per_class=2, near_duplicate_min_side=1))
    assert check(loose, "near_duplicates_across_splits").status == "WARN"
    assert check(validate_manifest(df, ValidationConfig(min_images_per_class=2)),
                 "near_duplicates_across_splits").status == "PASS"


def test_single_class_split(tmp_path: Path) -> None:
    root = split_set(tmp_path / "data", classes=("a", "b"), splits=("train", "val"))
    split_set(tmp_path / "more", classes=("a",), splits=("test",))
    (tmp_path / "more" / "test").rename(root / "test")
    _, report = run(root)
    c = check(report, "single_class_split")
    assert c.status == "FAIL" and "test (1)" in c.detail


def test_single_class_data_set(tmp_path: Path) -> None:
    _, report = run(split_set(tmp_path / "data", classes=("only",)))
    assert check(report, "single_class_split").status == "FAIL"


def test_min_images_per_class_and_imbalance(tmp_path: Path) -> None:
    root = split_set(tmp_path / "data", per_class=1)
    for i in range(12):
        save(picture(1000 + i), root / "train" / "a" / f"extra{i}.png")
    cfg = ValidationConfig(min_images_per_class=2)
    _, report = run(root, cfg)
    assert "b/train=1" in check(report, "min_images_per_class").detail
    imbalance = check(report, "class_imbalance")
    assert imbalance.status == "WARN" and "train 13.0 (13/1)" in imbalance.detail
    strict = ValidationConfig(min_images_per_class=1, max_imbalance_ratio=20)
    assert check(run(root, strict)[1], "class_imbalance").status == "PASS"
    as_error = ValidationConfig(min_images_per_class=1, severity={"class_imbalance": "error"})
    assert check(run(root, as_error)[1], "class_imbalance").status == "FAIL"


def test_too_small_images_and_disallowed_modes(clean: Path) -> None:
    save(picture(500, size=4), clean / "train" / "a" / "tiny.png")
    sixteen = Image.fromarray((np.arange(64 * 64, dtype=np.uint16) * 13).reshape(64, 64))
    save(sixteen, clean / "train" / "b" / "deep.png")
    # 8-bit modes are accepted by default (the preprocessing spec converts them to RGB): not flagged.
    photo = picture(501).convert("RGB")
    save(photo.convert("CMYK"), clean / "train" / "b" / "cmyk.jpg", "JPEG")
    save(picture(502).convert("RGBA"), clean / "train" / "b" / "rgba.png")
    save(picture(503).convert("P"), clean / "val" / "b" / "palette.png")
    manifest, report = run(clean)
    assert {"CMYK", "RGBA", "P", "L", "I;16"} <= set(manifest["mode"])
    small = check(report, "min_size")
    assert small.status == "FAIL" and small.files == [f"{clean}/train/a/tiny.png"] and "(4x4)" in small.detail
    modes = check(report, "allowed_modes")
    assert modes.status == "FAIL" and modes.files == [f"{clean}/train/b/deep.png"] and "I;16" in modes.detail
    allowed = ValidationConfig(min_images_per_class=1, min_width=2, min_height=2,
                               allowed_modes=["L", "I;16", "CMYK", "RGBA", "P"])
    assert run(clean, allowed)[1].success


def test_labels_outside_the_class_list_and_missing_classes(clean: Path) -> None:
    cfg = ValidationConfig(min_images_per_class=1, classes=["a", "c"])
    _, report = run(clean, cfg)
    c = check(report, "labels_in_class_list")
    assert c.status == "FAIL" and len(c.files) == 9 and "(b)" in c.detail
    # A configured class with no images at all (an empty class folder) is short in every split.
    assert "c/train=0" in check(report, "min_images_per_class").detail


def test_drift_against_a_previous_manifest(clean: Path, tmp_path: Path) -> None:
    reference, _ = run(clean)
    assert check(run(clean, reference=reference)[1], "class_drift").status == "PASS"
    for i in range(12):
        save(picture(2000 + i, size=96), clean / "train" / "a" / f"new{i}.png")
    _, report = run(clean, reference=reference)
    classes, sizes = check(report, "class_drift"), check(report, "size_drift")
    assert classes.status == "WARN" and sizes.status == "WARN" and report.success
    tvd = report.tables["drift"][0]["class_tvd"]
    assert tvd == pytest.approx(0.5 * (abs(21 / 30 - 0.5) + abs(9 / 30 - 0.5)))
    gated = ValidationConfig(min_images_per_class=1, severity={"class_drift": "error"})
    assert not run(clean, gated, reference=reference)[1].success


def test_ks_statistic_and_drift_table() -> None:
    assert ks_statistic(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == 0.0
    assert ks_statistic(np.array([1.0, 1]), np.array([5.0, 5])) == 1.0
    a = pd.DataFrame({"label": ["x", "y"], "decodable": [True, True], "width": [8, 8], "height": [8, 8]})
    b = pd.DataFrame({"label": ["x", "x"], "decodable": [True, True], "width": [8, 16], "height": [8, 8]})
    row = drift(a, b).iloc[0]
    assert row["class_tvd"] == pytest.approx(0.5) and row["width_ks"] == pytest.approx(0.5)


def test_exclude_quarantined_drops_bad_files_from_training_only(clean: Path) -> None:
    (clean / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (clean / "test" / "b" / "leak.png").write_bytes((clean / "train" / "b" / "0.png").read_bytes())
    df, failing = run(clean)
    assert not failing.success and not failing.excluded
    cfg = ValidationConfig(min_images_per_class=1, exclude_quarantined=True)
    df, report = run(clean, cfg)
    assert report.success, report.summary_lines()
    assert {c.name for c in report.checks if c.status == "WARN"} == {"decodable", "exact_duplicates_across_splits"}
    assert set(report.excluded) == {f"{clean}/train/a/broken.png", f"{clean}/test/b/leak.png"}
    used = training_manifest(df, report)
    assert len(used) == len(df) - 2 and not used["uri"].isin(report.excluded).any()
    assert (clean / "train" / "a" / "broken.png").is_file() and (clean / "test" / "b" / "leak.png").is_file()
    # Too few files left is still a failure: exclusion never hides a data-set-level problem.
    thin = ValidationConfig(min_images_per_class=3, min_held_out_per_class=3, exclude_quarantined=True)
    assert check(run(clean, thin)[1], "min_images_per_class").status == "PASS"
    (clean / "val" / "a" / "0.png").write_bytes(b"")
    assert check(run(clean, thin)[1], "min_images_per_class").status == "FAIL"


def test_outputs_gx_result_data_docs_and_summaries(clean: Path, tmp_path: Path) -> None:
    (clean / "val" / "b" / "zero.png").write_bytes(b"")
    df, report = run(clean, docs_dir=tmp_path / "docs")
    paths = write_outputs(tmp_path / "out", df, report)
    index = (tmp_path / "docs" / "index.html").read_text()
    pages = list((tmp_path / "docs" / "validations").rglob("*.html"))
    assert len(pages) == 3  # files, class counts, splits
    suites = sorted(p.stem for p in (tmp_path / "docs" / "expectations").glob("*.html"))
    assert suites == ["tlops_class_counts", "tlops_files", "tlops_splits"]
    for page in pages:  # one site built once links every table's page
        assert str(page.relative_to(tmp_path / "docs")) in index
    gx = paths["gx_result"].read_text()
    assert '"critical"' in gx and '"check": "decodable"' in gx
    assert "FAIL | decodable" in paths["summary"].read_text()
    page = paths["html"].read_text()
    assert "zero.png" in page and "<script" not in page
    quarantine = pd.read_csv(paths["quarantine"])
    assert list(quarantine["uri"]) == [f"{clean}/val/b/zero.png"]
    assert quarantine["reason"][0].startswith("not decodable: UnidentifiedImageError")


def test_unknown_check_in_severity_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown check"):
        ValidationConfig(severity={"no_such_check": "error"})
