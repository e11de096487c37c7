"""Digits printed in the machine's own fonts, read the way scikit-learn's handwritten digits were: a real
domain shift (print against handwriting) through the same acquisition.

scikit-learn's digits are the UCI "optdigits" forms: each handwritten digit was normalised by NIST's
programs into a 32x32 bitmap, and each 4x4 block's count of inked pixels became one of 8x8 grey levels
(0-16). ``render_digit`` does the same to a digit printed in a font: drawn large, binarised, its ink
scaled to the bitmap's height (aspect kept, so a printed 1 stays narrow where a handwritten one is
not), slightly moved, rotated and thickened, then counted into the 8x8 grid of 17 levels, dark on
light like the exported scans (``tlops demo-data``). The fonts are those fontconfig knows
(``fc-list``), else the TrueType/OpenType files under /usr/share/fonts.

``style="print"`` keeps the printed digit at ``size`` px in anti-aliased grey instead (no 8x8
reduction): the same shift plus a change of resolution.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tlops.errors import TlopsError

STYLES = ("scan", "print")


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


def _ink(digit: int, font: Path, rng: np.random.Generator) -> Image.Image:
    """The digit's ink (255 on 0), drawn at 96 px, thickened by up to two pixels at that size, rotated by
    up to 8 degrees, cropped to its bounding box."""
    face = ImageFont.truetype(str(font), 96)
    canvas = Image.new("L", (192, 192), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = int(rng.integers(0, 3))
    draw.text((48, 24), str(digit), fill=255, font=face, stroke_width=stroke, stroke_fill=255)
    canvas = canvas.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR)
    box = canvas.getbbox()
    if box is None:  # a font without the glyph draws nothing
        raise TlopsError(f"{font}: the font draws no ink for the digit {digit}; remove it from the font list")
    return canvas.crop(box)


def render_digit(digit: int, font: Path, rng: np.random.Generator, size: int = 32, style: str = "scan") -> Image.Image:
    """One digit printed in ``font``, dark on light; its height, offset, rotation and stroke drawn from ``rng``.

    ``scan``: the optdigits reading: the ink binarised into a ``size`` x ``size`` bitmap (height 85-100%
    of it, aspect kept, centred to within a sixteenth of the side), then each (size/8)-pixel block's inked
    share as one of 17 grey levels: an 8x8 image. ``print``: the same placement in anti-aliased grey at
    ``size`` px."""
    if style not in STYLES:
        raise TlopsError(f"unknown font-digit style {style!r}; choose one of {', '.join(STYLES)}")
    ink = _ink(digit, font, rng)
    h = int(round(size * rng.uniform(0.85, 1.0)))
    w = max(1, min(size, int(round(ink.width * h / ink.height))))
    ink = ink.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    jitter = size / 16
    x = int(round((size - w) / 2 + rng.uniform(-jitter, jitter)))
    y = int(round((size - h) / 2 + rng.uniform(-jitter / 2, jitter / 2)))
    canvas.paste(ink, (min(max(x, 0), size - w), min(max(y, 0), size - h)))
    if style == "print":
        return Image.fromarray(255 - np.asarray(canvas, dtype=np.uint8))
    if size % 8:
        raise TlopsError(f"style scan needs a bitmap side divisible by 8, not {size}")
    bits = (np.asarray(canvas, dtype=np.float32) >= 128).astype(np.float32)
    block = size // 8
    share = bits.reshape(8, block, 8, block).mean(axis=(1, 3))
    levels = np.round(share * 16)
    return Image.fromarray((255.0 - levels * (255.0 / 16.0)).round().astype(np.uint8))


def export_font_digits(out_dir: str | Path, per_class: int, classes: list[int] | None = None, seed: int = 0,
                       fonts: list[Path] | None = None, style: str = "scan", size: int = 32) -> int:
    """``out_dir/<digit>/font_<n>.png`` for each digit; returns how many images were written."""
    fonts = fonts or system_fonts()
    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    n = 0
    for digit in classes if classes is not None else list(range(10)):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = render_digit(digit, fonts[int(rng.integers(len(fonts)))], rng, size=size, style=style)
            img.save(root / str(digit) / f"font_{i:04d}.png")
            n += 1
    return n
