"""How many labels do I need? The linear probe on growing shares of the training labels.

For each fraction (1, 2, 5, 10, 25, 50 and 100% by default) and each seed, a class-stratified subset of the
train split (at least one image of each class) fits the probe exactly as the fine-tune step does (L-BFGS,
the L2 strength chosen on the validation split), from the feature cache, and is scored on the test split.
The curve is the mean test accuracy per fraction with a Student-t interval over the seeds.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tlops.config.settings import Config
from tlops.errors import TlopsError
from tlops.fileio import atomic_write

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class CurvePoint:
    fraction: float
    labels: int  # training labels used (the same for every seed)
    mean: float
    low: float
    high: float
    accuracies: tuple[float, ...]  # one per seed


def parse_fractions(text: str | None) -> tuple[float, ...]:
    if not text:
        return DEFAULT_FRACTIONS
    try:
        values = tuple(float(v.rstrip("%")) / (100 if v.strip().endswith("%") else 1) for v in text.split(","))
    except ValueError:
        raise TlopsError(f"--fractions {text!r}: give comma-separated fractions, e.g. 0.01,0.1,1 or 1%,10%,100%")\
            from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise TlopsError(f"--fractions {text!r}: every fraction must be in (0, 1]")
    return tuple(sorted(set(values)))


def subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-stratified ``fraction`` of ``labels``: ceil(fraction x class size), at least one."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        mine = np.flatnonzero(labels == c)
        k = min(len(mine), max(1, math.ceil(fraction * len(mine))))
        chosen.append(rng.choice(mine, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1) * stats.sem(values))
    if not math.isfinite(half):
        half = 0.0
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def curve_from_features(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                        test: tuple[torch.Tensor, torch.Tensor], num_classes: int, cfg: Config,
                        fractions: tuple[float, ...], seeds: int) -> list[CurvePoint]:
    from torch import nn

    from tlops.training.probe import fit_head

    points = []
    y_np = train[1].numpy()
    for fraction in fractions:
        accs, used = [], 0
        for seed in range(seeds):
            idx = torch.from_numpy(subset(y_np, fraction, seed))
            used = len(idx)
            head = nn.Linear(train[0].shape[1], num_classes)
            fit_head(head, train[0][idx], train[1][idx], *val, cfg.train)
            with torch.no_grad():
                accs.append(float((head(test[0]).argmax(1) == test[1]).float().mean()))
        mean, low, high = t_interval(accs)
        points.append(CurvePoint(fraction, used, mean, low, high, tuple(accs)))
        log.info("labels curve: %5.1f%% (%d labels): test accuracy %.4f [%.4f, %.4f] over %d seed(s)",
                 100 * fraction, used, mean, low, high, seeds)
    return points


def labels_curve(cfg: Config, data_uri: str, fractions: tuple[float, ...], seeds: int) -> list[CurvePoint]:
    """The curve for ``data_uri`` with the config's backbone and preprocessing, features from the cache."""
    from tlops.data.discovery import build_manifest, class_names
    from tlops.training.hardware import resolve_device
    from tlops.training.loaders import split_items
    from tlops.vision.backbones import build_classifier
    from tlops.vision.features import FeatureCache
    from tlops.vision.parity import eval_spec

    if seeds < 1:
        raise TlopsError(f"--seeds {seeds}: pass at least 1")
    if cfg.backbone == "auto":
        raise TlopsError("backbone auto: name one backbone for the labels curve (--set backbone=NAME)")
    manifest = build_manifest(data_uri, Path(cfg.workdir) / "cache", cfg.data.val_fraction, cfg.data.test_fraction,
                              cfg.data.split_salt, max_pixels=cfg.validation.max_pixels,
                              workers=cfg.data.manifest_workers, use_cache=cfg.data.manifest_cache,
                              stratified=cfg.data.split == "stratified")
    classes = class_names(manifest)
    spec = eval_spec(cfg.backbone, cfg.preprocess)
    device = resolve_device(cfg.train.device)
    model = build_classifier(cfg.backbone, num_classes=max(len(classes), 1))
    cache = FeatureCache(Path(cfg.workdir) / "cache" / "features")
    feats = {}
    for split in ("train", "val", "test"):
        paths, labels, shas = split_items(manifest, classes, split)
        if not paths:
            raise TlopsError(f"{data_uri}: the {split} split has no usable labelled image; the labels curve needs "
                             "train, val and test images")
        x = cache.features(cfg.backbone, model.backbone, paths, shas, spec, cfg.train.batch_size, device, split)
        feats[split] = (x, torch.tensor(labels, dtype=torch.long))
    return curve_from_features(feats["train"], feats["val"], feats["test"], len(classes), cfg, fractions, seeds)


def format_table(points: list[CurvePoint], output_format: str = "table") -> str:
    if output_format == "json":
        return json.dumps([asdict(p) for p in points], indent=2)
    lines = [f"{'labels':>8} {'share':>7} {'accuracy':>9}  95% interval over seeds"]
    for p in points:
        lines.append(f"{p.labels:>8} {100 * p.fraction:>6.1f}% {p.mean:>9.4f}  [{p.low:.4f}, {p.high:.4f}]")
    return "\n".join(lines)


def plot(points: list[CurvePoint], path: str | Path, title: str) -> Path:
    """Accuracy against labels (log scale), the interval shaded, each seed's point drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p.labels for p in points]
    ax.plot(x, [p.mean for p in points], marker="o", label="mean test accuracy")
    ax.fill_between(x, [p.low for p in points], [p.high for p in points], alpha=0.25, label="95% interval")
    for p in points:
        ax.scatter([p.labels] * len(p.accuracies), p.accuracies, s=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("training labels")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    atomic_write(Path(path), write)
    plt.close(fig)
    return Path(path)


def table_frame(points: list[CurvePoint]) -> pd.DataFrame:
    return pd.DataFrame([{**asdict(p), "accuracies": list(p.accuracies)} for p in points])
