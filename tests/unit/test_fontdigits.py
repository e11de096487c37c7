"""Digits printed in the machine's fonts, read the way scikit-learn's handwritten digits were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlops.data.fontdigits import export_font_digits, render_digit, system_fonts
from tlops.errors import TlopsError


def levels(img: Image.Image) -> np.ndarray:
    """Ink per cell, 0-16, as scikit-learn's ``load_digits().images`` holds it."""
    return (255 - np.asarray(img, dtype=np.float64)) / 255 * 16


def test_scan_style_is_the_optdigits_grid() -> None:
    rng = np.random.default_rng(0)
    fonts = system_fonts()
    for digit in range(10):
        ink = levels(render_digit(digit, fonts[digit % len(fonts)], rng))
        assert ink.shape == (8, 8)
        assert np.abs(ink - ink.round()).max() < 0.05 and ink.min() >= 0 and ink.max() <= 16  # 17 levels
        rows = np.nonzero(ink.sum(1) > 0)[0]
        assert rows.max() - rows.min() >= 6, f"digit {digit} spans rows {rows.tolist()}: not height-normalised"


def test_printed_digits_stay_legible() -> None:
    """Nearest class mean on one rendering, scored on another: far above chance (0.1), so the target's
    variation (size, offset, rotation, stroke, 22 fonts) leaves digits a model can learn to read."""
    fonts = system_fonts()

    def rendered(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        x = [levels(render_digit(d, fonts[int(rng.integers(len(fonts)))], rng)).ravel()
             for d in range(10) for _ in range(20)]
        return np.array(x), np.repeat(np.arange(10), 20)

    xa, ya = rendered(1)
    xb, yb = rendered(2)
    means = np.stack([xa[ya == c].mean(0) for c in range(10)])
    pred = ((xb[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yb).mean() > 0.8


def test_export_and_print_style(tmp_path: Path) -> None:
    assert export_font_digits(tmp_path / "scan", per_class=2, classes=[3, 5], seed=0) == 4
    assert sorted(p.relative_to(tmp_path / "scan").as_posix() for p in (tmp_path / "scan").rglob("*.png")) == [
        "3/font_0000.png", "3/font_0001.png", "5/font_0000.png", "5/font_0001.png"]
    export_font_digits(tmp_path / "print", per_class=1, classes=[8], style="print", size=40)
    img = Image.open(tmp_path / "print" / "8" / "font_0000.png")
    assert img.size == (40, 40) and len(np.unique(np.asarray(img))) > 17  # anti-aliased grey, not 8x8 levels
    with pytest.raises(TlopsError, match="unknown font-digit style"):
        render_digit(1, system_fonts()[0], np.random.default_rng(0), style="ink")
