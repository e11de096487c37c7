"""How close the new images are to the backbone's source domain, and the fine-tuning strategy that follows.

Two measurements on a sample of the train split:

- **prediction entropy**: the pre-trained ImageNet classifier's mean entropy on the new images, divided by
  log(1000) so that 0 means every image looks like one ImageNet class for sure and 1 means the classifier has
  no idea (uniform over the 1000 classes). Only for backbones that have their ImageNet head.
- **feature distance**: the MMD^2 (RBF kernel, median heuristic; see :mod:`tlops.selection.drift`) between the new
  images' features and those of a reference sample of natural photos (crops of scikit-image's photographs,
  a stand-in for ImageNet), in the backbone's feature space.

Verdict thresholds (set on this project's data: digits scans are far, photo crops close):

| verdict | entropy | and | distance |
|---|---|---|---|
| close | < 0.3 | and | < 0.1 |
| far | >= 0.6 | or | >= 0.3 |
| moderate | otherwise | | |

Recommended strategy by verdict and labelled images per class (median over classes of the train split):

| verdict | few (< 50) | some (50-499) | many (>= 500) |
|---|---|---|---|
| close | linear-probe | linear-probe | partial |
| moderate | linear-probe | partial | full |
| far | partial | full | full |
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd

    from tlops.config.settings import Config

log = logging.getLogger(__name__)
ENTROPY_CLOSE, ENTROPY_FAR = 0.3, 0.6
DISTANCE_CLOSE, DISTANCE_FAR = 0.1, 0.3
FEW, MANY = 50, 500
STRATEGIES = {
    "close": ("linear-probe", "linear-probe", "partial"),
    "moderate": ("linear-probe", "partial", "full"),
    "far": ("partial", "full", "full"),
}
REFERENCE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle")
SAMPLE = 200


def reference_images(directory: str | Path, per_photo: int = 8, seed: int = 0) -> list[Path]:
    """Square crops of scikit-image's photographs as PNG files (written once, atomically): natural photos."""
    from PIL import Image
    from skimage import data

    from tlops.fileio import atomic_write

    out = Path(directory)
    rng = np.random.default_rng(seed)
    paths = []
    for name in REFERENCE_PHOTOS:
        img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        for i in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.35, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            path = out / f"{name}-{seed}-{i}.png"
            if not path.is_file():
                crop = Image.fromarray(np.ascontiguousarray(img[top : top + side, left : left + side]))
                atomic_write(path, lambda tmp, c=crop: c.save(tmp, format="PNG"))  # type: ignore[misc]
            paths.append(path)
    return paths


def verdict(entropy: float | None, distance: float) -> str:
    if (entropy is not None and entropy >= ENTROPY_FAR) or distance >= DISTANCE_FAR:
        return "far"
    if (entropy is None or entropy < ENTROPY_CLOSE) and distance < DISTANCE_CLOSE:
        return "close"
    return "moderate"


def recommend(verdict_: str, per_class: float) -> str:
    column = 0 if per_class < FEW else (2 if per_class >= MANY else 1)
    return STRATEGIES[verdict_][column]


@dataclass
class Similarity:
    backbone: str
    entropy: float | None
    distance: float
    verdict: str
    per_class: float
    strategy: str
    images: int

    @property
    def why(self) -> str:
        ent = "no ImageNet head" if self.entropy is None else f"prediction entropy {self.entropy:.3f}"
        return (f"{self.verdict} to the source domain of {self.backbone} ({ent}, feature MMD^2 to natural photos "
                f"{self.distance:.3f}); {self.per_class:.0f} labelled images per class: {self.strategy}")

    def log_to_mlflow(self) -> None:
        import mlflow

        metrics = {"similarity.distance": self.distance, "similarity.per_class": self.per_class}
        if self.entropy is not None:
            metrics["similarity.entropy"] = self.entropy
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"similarity.verdict": self.verdict, "similarity.why": self.why})
        mlflow.log_dict({**asdict(self), "why": self.why}, "selection/similarity.json")


@torch.no_grad()
def mean_entropy(model: torch.nn.Module, paths: list[str], spec: Any, batch_size: int = 64) -> float:
    """Mean prediction entropy of an ImageNet classifier, divided by log(number of classes)."""
    from tlops.vision.preprocessing import build_transform

    transform = build_transform(spec)
    model.eval()
    total, n_classes = 0.0, 1
    for start in range(0, len(paths), batch_size):
        logits = model(torch.stack([transform(p) for p in paths[start : start + batch_size]])).float()
        n_classes = logits.shape[1]
        logp = torch.log_softmax(logits, 1)
        total += float(-(logp.exp() * logp).sum(1).sum())
    return total / max(len(paths), 1) / math.log(n_classes)


def task_similarity(cfg: Config, manifest: pd.DataFrame) -> Similarity:
    """Entropy, distance, verdict and recommended strategy for ``cfg.backbone`` on the train split."""
    from tlops.data.manifest import split_rows
    from tlops.selection.drift import mmd_test
    from tlops.selection.ranking import stratified_sample
    from tlops.training.hardware import resolve_device
    from tlops.vision.backbones import feature_extractor, get_info, imagenet_model
    from tlops.vision.features import FeatureCache
    from tlops.vision.parity import eval_spec

    rows = stratified_sample(manifest, SAMPLE, cfg.selection.seed)
    train = split_rows(manifest, "train")
    per_class = float(train["label"].value_counts().median()) if len(train) else 0.0
    paths, shas = [str(p) for p in rows["path"]], [str(s) for s in rows["sha256"]]
    spec = eval_spec(cfg.backbone, cfg.preprocess)
    entropy = None
    if get_info(cfg.backbone).family != "custom":
        entropy = mean_entropy(imagenet_model(cfg.backbone), paths, spec)
    ref_paths = [str(p) for p in reference_images(Path(cfg.workdir) / "cache" / "reference")]
    ref_shas = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in ref_paths]
    cache = FeatureCache(Path(cfg.workdir) / "cache" / "features")
    model, device = feature_extractor(cfg.backbone), resolve_device(cfg.train.device)
    new = cache.features(cfg.backbone, model, paths, shas, spec, cfg.train.batch_size, device, "similarity")
    ref = cache.features(cfg.backbone, model, ref_paths, ref_shas, spec, cfg.train.batch_size, device, "reference")
    distance = mmd_test(new, ref, permutations=0).statistic
    v = verdict(entropy, distance)
    return Similarity(cfg.backbone, entropy, distance, v, per_class, recommend(v, per_class), len(rows))
