"""The evaluation report rendered in a real browser: headless Chromium takes a screenshot, PIL looks at it.

Needs a Chromium binary (Debian: `apt-get install -y chromium`); skipped with that reason without one.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import CHROMIUM, MISSING
from tests.unit.test_evaluation import synthetic_result
from tlops.evaluation import report

WIDTH, HEIGHT = 1200, 1600


pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=MISSING)


def screenshot(page: Path, out: Path) -> np.ndarray:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="tlops-chromium-") as profile:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={WIDTH},{HEIGHT}",
             page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert out.is_file(), result.stderr[-2000:]
    img = Image.open(out)
    assert img.size == (WIDTH, HEIGHT)
    return np.asarray(img.convert("RGB")).astype(int)


def _figure_pixels(rgb: np.ndarray) -> int:
    """Pixels of the figures' saturated colours: the dark blues of the confusion matrix and the candidate's
    bars, and the champion's orange. Text and table borders are grey or black and do not count."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    blue = (b > 100) & (b - r > 60) & (b - g > 20)
    orange = (r > 180) & (r - b > 100) & (g > 70) & (g < 150)
    return int((blue | orange).sum())


def test_report_renders_with_its_figures(tmp_path: Path) -> None:
    result = synthetic_result()
    page = tmp_path / "report.html"
    page.write_text(report.report_html(result, report.figures(result), "tlops evaluation"), encoding="utf-8")
    rgb = screenshot(page, tmp_path / "report.png")
    non_white = (rgb.min(axis=2) < 235).mean()
    assert non_white > 0.05, f"only {non_white:.1%} of the page is not white"
    assert rgb.std() > 20
    drawn = _figure_pixels(rgb)
    assert drawn > 20_000, f"{drawn} figure pixels: the embedded PNGs did not render"

    # The same page with the images' data broken: the check above must notice.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text(encoding="utf-8").replace("base64,", "base64,AAAA"), encoding="utf-8")
    assert _figure_pixels(screenshot(broken, tmp_path / "broken.png")) < drawn / 10


def test_report_with_the_gate_decision_and_curves(tmp_path: Path) -> None:
    """The gate's report: decision badge, version, fingerprint, data summary and curves, and its KFP Markdown."""
    from tlops.training.curves import plot_history

    result = synthetic_result()
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1), "train_accuracy": 0.5 + e / 20,
                "val_accuracy": 0.45 + e / 20} for e in range(8)]
    release = {"decision": "reject", "reasons": ["accuracy 0.6000 < minimum 0.9000"], "compared_with": "3",
               "model_name": "digits", "version": "4", "fingerprint": "f" * 64, "reference_fingerprint": "f" * 64,
               "declared": "none", "data": {"uri": "s3://data/digits", "manifest_hash": "a" * 64, "files": 90,
                                            "classes": 3, "splits": {"train": 53, "val": 17, "test": 20}},
               "curves": plot_history(history, "full")}
    text = report.report_html(result, report.figures(result), "tlops evaluation", release)
    for expected in ("REJECT", "digits version <b>4</b>", "compared with champion version 3", "f" * 64,
                     "s3://data/digits", "53 images", "Training curves", "accuracy 0.6000 &lt; minimum 0.9000"):
        assert expected in text, expected
    page = tmp_path / "report.html"
    page.write_text(text, encoding="utf-8")
    rgb = screenshot(page, tmp_path / "report.png")
    badge = (np.abs(rgb - np.array([254, 215, 215])).sum(axis=2) < 20).sum()  # the REJECT badge's pale red
    assert badge > 1500, badge
    markdown = report.release_markdown(release, result, "run123")
    assert markdown.startswith("## Gate: REJECT — digits version 4\n") and "- accuracy 0.6000 < minimum" in markdown
    assert "| test accuracy |" in markdown and "train 53, val 17, test 20 images" in markdown
