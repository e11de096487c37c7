"""Fixtures of the reliability suites."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def data(tmp_path: Path, tiny_digits: Path) -> Path:
    """The tiny digits (three classes, 30 images each): they pass validation as they are."""
    root = tmp_path / "data"
    shutil.copytree(tiny_digits, root)
    return root
