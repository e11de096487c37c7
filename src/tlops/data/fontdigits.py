"""Digits rendered from the machine's own fonts: a real domain shift from scikit-learn's handwritten scans.

The fonts are those fontconfig knows (``fc-list``), else the TrueType/OpenType files under
/usr/share/fonts. Each image is one digit, dark on light like the exported scans (``tlops demo-data``),
at a varied size, position and stroke, rendered at 32 px and reduced to the scans' 8x8 grid of 17 grey
levels.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tlops.errors import TlopsError


def system_fonts() -> list[Path]:
    """Scalable font files on this machine, sorted; none: a one-line error."""
    found: set[Path] = set()
    if shutil.which("fc-list"):
        out = subprocess.run(["fc-list", "--format", "%{file}\\n"], capture_output=True, text=True,
                             timeout=60, check=False).stdout
        found = {Path(line.strip()) for line in out.splitlines() if line.strip()}
    if not found:
        found = {p for ext in ("*.ttf", "*.otf") for p in Path("/usr/share/fonts").rglob(ext)}
    fonts = sorted(p for p in found if p.suffix.lower() in (".ttf", ".otf") and p.is_file())
    if not fonts:
        raise TlopsError("no fonts found (fc-list, /usr/share/fonts): install one, e.g. apt-get install fonts-dejavu")
    return fonts


def render_digit(digit: int, font: Path, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One 8x8 digit: font size, stroke width and offset drawn from ``rng``, drawn at ``size`` px, then
    reduced to the scans' 8x8 grid of 17 grey levels, dark ink on light."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    face = ImageFont.truetype(str(font), int(rng.integers(int(size * 0.55), int(size * 0.95))))
    stroke = int(rng.integers(0, 3))
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=face, stroke_width=stroke)
    w, h = right - left, bottom - top
    x = (size - w) / 2 - left + rng.uniform(-0.15, 0.15) * size
    y = (size - h) / 2 - top + rng.uniform(-0.15, 0.15) * size
    draw.text((x, y), str(digit), fill=255, font=face, stroke_width=stroke, stroke_fill=255)
    small = canvas.resize((8, 8), Image.Resampling.BOX)
    levels = 255 - np.round(np.asarray(small, dtype=np.float32) / 255 * 16) / 16 * 255
    return Image.fromarray(levels.astype(np.uint8))


def export_font_digits(out_dir: str | Path, per_class: int, classes: list[int] | None = None, seed: int = 0,
                       fonts: list[Path] | None = None) -> int:
    """``out_dir/<digit>/font_<n>.png`` for each digit; returns how many images were written."""
    fonts = fonts or system_fonts()
    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    n = 0
    for digit in classes if classes is not None else list(range(10)):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = render_digit(digit, fonts[int(rng.integers(len(fonts)))], rng)
            img.save(root / str(digit) / f"font_{i:04d}.png")
            n += 1
    return n
