"""Headless Chromium for the tests that look at pages as a person does: a screenshot, and the DOM after the page's
scripts ran. Every name lookup fails (``--host-resolver-rules``), so a page that needs the network shows it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return os.environ.get("CHROMIUM") if os.environ.get("CHROMIUM") and Path(os.environ["CHROMIUM"]).is_file() \
        else None


CHROMIUM = _chromium()
MISSING = "headless Chromium is not installed (Debian: apt-get install -y chromium)"


def _run(url: str, *what: str, wait_ms: int, offline: bool, timeout: int) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, MISSING
    rules = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"] if offline else []
    with tempfile.TemporaryDirectory(prefix="tlops-chromium-") as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}", *rules, *what, url],
            capture_output=True, text=True, timeout=timeout)


def screenshot(url: str, out: Path, width: int = 1280, height: int = 1400, wait_ms: int = 5000,
               offline: bool = True, timeout: int = 180) -> np.ndarray:
    """The page at ``url`` as ``out`` (PNG) after ``wait_ms`` of its own time; returns the RGB pixels."""
    result = _run(url, f"--screenshot={out}", f"--window-size={width},{height}", wait_ms=wait_ms, offline=offline,
                  timeout=timeout)
    assert out.is_file(), result.stderr[-2000:]
    img = Image.open(out)
    assert img.size == (width, height)
    return np.asarray(img.convert("RGB")).astype(int)


def dom(url: str, wait_ms: int = 5000, offline: bool = True, timeout: int = 180) -> str:
    """The page's DOM as HTML after its scripts ran for ``wait_ms``."""
    result = _run(url, "--dump-dom", wait_ms=wait_ms, offline=offline, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def green_pixels(rgb: np.ndarray) -> int:
    """Pixels of Bootstrap's success green (#28a745), as GX draws a passed check's icon."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((g > 130) & (g - r > 70) & (g - b > 50)).sum())
