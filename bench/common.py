"""Shared set-up for the fine-tuning benchmarks: the demo digits as a manifest, medians, a machine line."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

DEMO_DATA = Path(".tlops/data/digits")


def digits_manifest(data: Path | None = None) -> pd.DataFrame:
    """The demo digits (exported to a temporary directory when ``.tlops/data/digits`` is absent)."""
    from tlops.data.discovery import build_manifest, export_digits

    root = data or DEMO_DATA
    if not root.is_dir():
        root = Path(tempfile.mkdtemp(prefix="tlops-bench-")) / "digits"
        export_digits(root)
    with tempfile.TemporaryDirectory(prefix="tlops-bench-manifest-") as cache:  # local files: paths stay theirs
        return build_manifest(str(root), Path(cache))


def split(manifest: pd.DataFrame, name: str, classes: list[str]) -> tuple[list[str], list[int]]:
    part = manifest[(manifest["split"] == name) & manifest["decodable"].astype(bool)]
    index = {c: i for i, c in enumerate(classes)}
    return list(part["path"]), [index[str(x)] for x in part["label"]]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {load:.1f} at start")


class Files(Dataset):
    """ImageFolder-like: a file path and a label per item, decoded and transformed on every access (as the
    tutorial and reference loops do)."""

    def __init__(self, paths: list[str], labels: list[int], transform) -> None:  # noqa: ANN001
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.paths[i]), self.labels[i]
