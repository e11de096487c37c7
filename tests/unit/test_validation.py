from pathlib import Path

from tlops.config import ValidationConfig
from tlops.data import build_manifest
from tlops.validation import validate_manifest


def test_clean_digits_pass(tmp_path: Path, tiny_digits: Path) -> None:
    df = build_manifest(str(tiny_digits), tmp_path / "c")
    report = validate_manifest(df, ValidationConfig(min_images_per_class=2))
    assert report.success, report.summary_lines()
    assert {c.name for c in report.checks} == {"decodable", "labels_not_null", "min_images_per_class"}
    assert report.gx_result["manifest"]["success"] is True


def test_each_failure_names_the_files_or_counts(tmp_path: Path, tiny_digits: Path) -> None:
    df = build_manifest(str(tiny_digits), tmp_path / "c")
    df.loc[0, "decodable"] = False
    df.loc[0, "error"] = "OSError: truncated"
    df.loc[1, "label"] = None
    report = validate_manifest(df, ValidationConfig(min_images_per_class=50))
    assert not report.success
    failed = {c.name: c.detail for c in report.checks if not c.success}
    assert df.loc[0, "uri"] in failed["decodable"]
    assert df.loc[1, "uri"] in failed["labels_not_null"]
    assert "fewer than 50 images" in failed["min_images_per_class"]
    assert {q["uri"] for q in report.quarantine} == {df.loc[0, "uri"], df.loc[1, "uri"]}
    assert report.gx_result["manifest"]["success"] is False
