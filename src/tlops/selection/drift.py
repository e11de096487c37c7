"""Drift in the frozen backbone's feature space, and whether a scheduled run needs to train at all.

The validate step compares the new data's features with those of the champion's training data by the maximum
mean discrepancy (MMD) with an RBF kernel whose width is the median pairwise distance (the median heuristic),
and a permutation test: the labels "new" and "champion" are shuffled many times, and the p-value is the share
of shuffles whose MMD is at least the observed one. ``selection.skip_when`` then decides whether to train.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tlops.data.manifest import localize, usable
from tlops.selection.ranking import one_blas_thread

if TYPE_CHECKING:
    import pandas as pd

    from tlops.config.settings import Config

log = logging.getLogger(__name__)
SKIP_TAG = "run.skipped"
SKIP_REASON_TAG = "run.skip_reason"


@dataclass
class MMDResult:
    statistic: float  # unbiased MMD^2
    p_value: float
    bandwidth: float  # the median squared distance the kernel divides by
    n_new: int
    n_reference: int
    permutations: int


def _mmd2(k: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 between the rows ``a`` and the rows ``b`` of the pooled kernel matrix ``k``."""
    kaa, kbb, kab = k[np.ix_(a, a)], k[np.ix_(b, b)], k[np.ix_(a, b)]
    na, nb = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (na * (na - 1)) + (kbb.sum() - np.trace(kbb)) / (nb * (nb - 1))
                 - 2 * kab.mean())


def mmd_test(new: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, permutations: int = 200,
             seed: int = 0) -> MMDResult:
    """MMD two-sample test of two feature matrices (rows are images)."""
    x = np.asarray(new, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the MMD test needs at least 2 images on each side, got {len(x)} and {len(y)}")
    z = np.concatenate([x, y])
    with one_blas_thread():
        sq = (z * z).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    off = d2[np.triu_indices(len(z), 1)]
    bandwidth = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    k = np.exp(-d2 / bandwidth)
    n = len(x)
    idx = np.arange(len(z))
    observed = _mmd2(k, idx[:n], idx[n:])
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(permutations):
        perm = rng.permutation(len(z))
        exceed += _mmd2(k, perm[:n], perm[n:]) >= observed
    return MMDResult(observed, (1 + exceed) / (1 + permutations), bandwidth, n, len(y), permutations)


def _sample(manifest: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    rows = usable(manifest)
    if len(rows) <= size:
        return rows
    return rows.sample(n=size, random_state=seed).sort_index()


def reference_pixels(cfg: Config, reference: pd.DataFrame) -> pd.DataFrame:
    """A sample of an earlier run's training data, fetched by URI; files gone or changed since are left out."""
    sample = _sample(reference, cfg.selection.drift_sample, cfg.selection.seed)
    return localize(sample, Path(cfg.workdir) / "cache", strict=False)


def feature_drift(cfg: Config, new: pd.DataFrame, reference: pd.DataFrame) -> MMDResult:
    """MMD test between samples of two manifests in ``cfg.backbone``'s feature space (features cached)."""
    from tlops.training.hardware import resolve_device
    from tlops.vision.backbones import feature_extractor
    from tlops.vision.features import FeatureCache
    from tlops.vision.parity import eval_spec

    sel = cfg.selection
    spec = eval_spec(cfg.backbone, cfg.preprocess)
    model = feature_extractor(cfg.backbone)
    cache = FeatureCache(Path(cfg.workdir) / "cache" / "features")
    device = resolve_device(cfg.train.device)
    feats = []
    # ``new`` is the validate step's own manifest (its files are at hand); ``reference`` is already localized.
    for what, rows in (("new", _sample(new, sel.drift_sample, sel.seed)), ("reference", reference)):
        paths, shas = [str(p) for p in rows["path"]], [str(s) for s in rows["sha256"]]
        feats.append(cache.features(cfg.backbone, model, paths, shas, spec, cfg.train.batch_size, device,
                                    f"drift {what}"))
    return mmd_test(feats[0], feats[1], sel.drift_permutations, sel.seed)


def _champion_reference(cfg: Config) -> tuple[pd.DataFrame | None, str, str]:
    """(the champion's training manifest, its manifest hash, which champion) or (None, "", why there is none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tlops import registry
    from tlops.data.discovery import read_manifest
    from tlops.data.validation import MANIFEST_ARTIFACT

    champ = registry.champion_version(cfg.registry.model_name)
    if champ is None or not champ.run_id:
        return None, "", f"no champion of {cfg.registry.model_name} yet"
    where = f"champion {cfg.registry.model_name} version {champ.version}"
    try:
        tags = mlflow.MlflowClient().get_run(champ.run_id).data.tags
        local = mlflow.artifacts.download_artifacts(run_id=champ.run_id, artifact_path=MANIFEST_ARTIFACT)
    except (MlflowException, OSError) as exc:
        return None, "", f"{where} has no readable {MANIFEST_ARTIFACT} ({type(exc).__name__})"
    return read_manifest(local), tags.get("data.manifest_hash", ""), where


def decide_skip(cfg: Config, manifest: pd.DataFrame) -> dict[str, Any]:
    """Feature drift against the champion's training data and the skip decision, recorded in the active run."""
    import mlflow

    from tlops.data.discovery import manifest_hash

    sel = cfg.selection
    reference, champion_hash, where = _champion_reference(cfg)
    new_data = reference is None or manifest_hash(manifest) != champion_hash
    out: dict[str, Any] = {"drift": "not measured", "new_data": new_data, "reference": where}
    if reference is not None and sel.drift:
        reference = reference_pixels(cfg, reference)
        if reference.shape[0] < 2:
            out["drift"] = "not measured"
            out["drift_reason"] = f"the files of {where}'s training data are no longer readable"
        else:
            result = feature_drift(cfg, manifest, reference)
            out["drift"] = "drift" if result.p_value < sel.drift_alpha else "no drift"
            out["mmd"] = asdict(result)
            mlflow.log_metrics({"drift.mmd2": result.statistic, "drift.p_value": result.p_value})
            log.info("drift against %s: MMD^2 %.5f, p = %.4f (%d permutations): %s", where, result.statistic,
                     result.p_value, result.permutations, out["drift"])
    if sel.skip_when == "no-served-drift":  # tlops monitor's verdict on the champion's served traffic
        from tlops.selection.served import served_decision

        skip, reason, out["served"] = served_decision(cfg)
    elif reference is None:
        skip, reason = False, f"{where}: training"
    elif sel.skip_when in ("unchanged", "no-drift") and not new_data:
        skip, reason = True, f"the data equals the training data of {where} (manifest {champion_hash[:12]})"
    elif sel.skip_when == "no-drift" and out["drift"] == "no drift":
        skip, reason = True, (f"new data but no feature drift against {where} "
                              f"(p = {out['mmd']['p_value']:.3f} >= {sel.drift_alpha})")
    else:
        skip, reason = False, (f"new data against {where}" if new_data else f"same data as {where}") + (
            f", feature drift: {out['drift']}" if sel.drift else "") + f"; skip_when {sel.skip_when}"
    out.update(skipped=skip, skip_reason=reason)
    mlflow.set_tags({SKIP_TAG: str(skip).lower(), SKIP_REASON_TAG: reason[:5000], "drift.status": out["drift"],
                     "data.new": str(new_data).lower()})
    mlflow.log_dict(out, "validation/drift.json")
    log.info("%s: %s", "skipping training" if skip else "training", reason)
    return out


