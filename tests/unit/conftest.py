"""Fixtures the unit tests of training share: the tiny digits' manifest and EfficientNet-Lite0's reference
preprocessing at 32 px. Module-scoped, as each test module had them; a module may define its own to override."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tlops.data.discovery import build_manifest
from tlops.vision.backbones import reference_spec
from tlops.vision.preprocessing import PreprocessSpec, with_resolution

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def manifest(tiny_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return build_manifest(str(tiny_digits), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def spec() -> PreprocessSpec:
    return with_resolution(reference_spec(BACKBONE), 32)
