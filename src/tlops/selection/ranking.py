"""Choosing the backbone: LogME, a cross-validated linear probe, speed and size for each candidate.

``tlops select`` ranks candidates on a stratified sample of the train split; ``backbone: auto`` picks the best
one within the latency and size budgets of the ``selection`` config and records why. Features come from (and
go to) the feature cache of :mod:`tlops.vision.features`: when the sample is the whole train split, the linear probe
of the fine-tune step reads the very tensors computed here.

LogME follows You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning" (ICML
2021): for each class, a Bayesian linear regression from the features to the class's one-hot column, whose
prior precision alpha and noise precision beta maximise the marginal likelihood (the evidence), found by the
paper's fixed-point iteration on the singular values of the feature matrix. The score is the mean over
classes of the maximised log evidence divided by the number of images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlops.errors import TlopsError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from tlops.config.settings import Config, SelectionConfig
    from tlops.vision.features import FeatureCache
    from tlops.vision.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)
VARIANTS = ("random", "shuffled")
SELECTED_TAG = "backbone.selected"
REASON_TAG = "backbone.selection_reason"
STRATEGY_TAG = "train.strategy.selected"


# ---------------------------------------------------------------------------------------------------- LogME


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Small dense algebra on one BLAS thread. Trap: on a loaded machine a multi-threaded BLAS spins and an
    SVD of 500 x 1280 takes seconds instead of tens of milliseconds."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield



def _class_evidence(u_t_y: np.ndarray, y_sq: float, sigma: np.ndarray, n: int, d: int, max_iter: int,
                    tol: float) -> tuple[float, float, float]:
    """Maximised log evidence of one target column, from x = U^T y and the squared singular values sigma."""
    x2 = u_t_y**2
    rest = max(y_sq - float(x2.sum()), 0.0)  # the part of y outside the column space of F
    k = len(sigma)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())  # |m|^2, m the posterior mean of the weights
        res2 = float((x2 / (1.0 + sigma / t) ** 2).sum()) + rest  # |F m - y|^2
        alpha = gamma / max(m2, 1e-12)
        beta = max(n - gamma, 1e-12) / max(res2, 1e-12)
        if abs(alpha / beta - t) / t <= tol:
            break
    t = alpha / beta
    m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
    res2 = float((x2 / (1.0 + sigma / t) ** 2).sum()) + rest
    # log|A| with A = alpha I + beta F^T F (D x D): the D - k zero singular values each add log(alpha).
    logdet = float(np.log(alpha + beta * sigma).sum()) + (d - k) * math.log(alpha)
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - logdet / 2 - beta / 2 * res2 - alpha / 2 * m2
                - n / 2 * math.log(2 * math.pi))
    return evidence / n, alpha, beta


def logme(features: np.ndarray | torch.Tensor, labels: np.ndarray | list[int], max_iter: int = 100,
          tol: float = 1e-6) -> float:
    """LogME score of features (N x D) for integer class labels: higher means the features transfer better."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise TlopsError(f"LogME needs an N x D feature matrix and N labels with N >= 2, got {f.shape}, {y.shape}")
    if not np.isfinite(f).all():
        raise TlopsError("LogME: the features hold NaN or infinite values")
    n, d = f.shape
    scores = []
    with one_blas_thread():
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        keep = s > s.max() * 1e-10 if s.size and s.max() > 0 else np.zeros_like(s, dtype=bool)
        u, sigma = u[:, keep], s[keep] ** 2
        for c in np.unique(y):
            target = (y == c).astype(np.float64)
            scores.append(_class_evidence(u.T @ target, float(target @ target), sigma, n, d, max_iter, tol)[0])
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------- candidates


def parse_candidate(name: str) -> tuple[str, str]:
    """``NAME`` or ``NAME:random`` / ``NAME:shuffled`` -> (backbone name, variant or "")."""
    base, sep, variant = name.rpartition(":")
    if sep and variant in VARIANTS:
        return base, variant
    return name, ""


def shuffle_across_layers(model: nn.Module, seed: int) -> nn.Module:
    """The same tensors in the wrong places: each parameter and statistic moves to another layer of the same
    kind and shape; a tensor whose kind and shape are unique has its values permuted instead."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for key, tensor in state.items():
        if tensor.is_floating_point():
            groups.setdefault((key.rsplit(".", 1)[-1], tuple(tensor.shape)), []).append(key)
    shuffled = dict(state)
    for keys in groups.values():
        if len(keys) == 1:
            t = state[keys[0]]
            shuffled[keys[0]] = t.flatten()[torch.randperm(t.numel(), generator=gen)].reshape(t.shape)
            continue
        # A rotation by a random offset moves every tensor of the group (no fixed point).
        order = torch.randperm(len(keys), generator=gen).tolist()
        for i, src in enumerate(order):
            shuffled[keys[order[(i + 1) % len(keys)]]] = state[keys[src]].clone()
    model.load_state_dict(shuffled)
    return model.eval()


def build_candidate(name: str, seed: int = 0) -> nn.Module:
    """The feature extractor of a candidate; ``:random`` and ``:shuffled`` are controls for the ranking."""
    import torch

    from tlops.vision.backbones import feature_extractor

    base, variant = parse_candidate(name)
    if variant == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return feature_extractor(base, pretrained=False).eval()
    model = feature_extractor(base, pretrained=True)
    return shuffle_across_layers(model, seed) if variant == "shuffled" else model.eval()


def candidate_key(name: str, spec: PreprocessSpec, image_sha256: list[str], seed: int) -> str:
    """Feature cache key: the backbone's own key, or for a control variant that key with the variant in it."""
    from tlops.vision.features import feature_key

    base, variant = parse_candidate(name)
    key = feature_key(base, spec, image_sha256)
    if not variant:
        return key
    return hashlib.sha256(f"{key}|{variant}|seed={seed}".encode()).hexdigest()


def candidate_features(name: str, model: nn.Module, paths: list[str], shas: list[str], spec: PreprocessSpec,
                       cache: FeatureCache, batch_size: int, device: torch.device, seed: int) -> tuple[torch.Tensor,
                                                                                                      bool]:
    """(features, read from the cache?) of the sample images."""
    from tlops.vision.features import extract_features

    base, variant = parse_candidate(name)
    hits = cache.hits
    if not variant:
        return cache.features(base, model, paths, shas, spec, batch_size, device, f"select {name}"), cache.hits > hits
    key = candidate_key(name, spec, shas, seed)
    feats = cache.load(key, shas)
    if feats is not None:
        return feats, True
    feats = extract_features(model, paths, spec, batch_size, device, desc=f"select {name}")
    cache.save(key, feats, shas, {"backbone": name, "preprocess": spec.fingerprint})
    return feats, False


# -------------------------------------------------------------------------------------------------- scoring


def stratified_sample(manifest: pd.DataFrame, size: int, seed: int = 0) -> pd.DataFrame:
    """Rows of the train split, at most ``size``, each class in its share, kept in manifest order.

    A train split no larger than ``size`` is returned whole and in order: the linear probe's feature
    cache key is then the same.
    """
    from tlops.data.manifest import split_rows

    train = split_rows(manifest, "train")
    if len(train) <= size:
        return train
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for _, rows in train.groupby("label", sort=True):
        k = max(2, round(size * len(rows) / len(train)))
        keep.extend(rng.choice(rows.index.to_numpy(), size=min(k, len(rows)), replace=False).tolist())
    return train.loc[sorted(keep, key=train.index.get_loc)]


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> tuple[float, float, int]:
    """Mean and spread of k-fold logistic-regression accuracy on standardised features, and k."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())
    k = min(folds, smallest)
    if k < 2:
        raise TlopsError(f"the sample has a class with {smallest} image(s): the linear probe needs at least 2 "
                         "per class; raise --sample or add images")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200, C=1.0))
    with warnings.catch_warnings(), one_blas_thread():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped fit still measures the features
        scores = cross_val_score(probe, features, labels, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return float(scores.mean()), float(scores.std()), k


def measure_speed(model: nn.Module, paths: list[str], spec: PreprocessSpec, batch_size: int,
                  device: torch.device) -> tuple[float, float]:
    """(images/s decoding, preprocessing and running batches, median ms per image at batch size 1)."""
    import torch

    with torch.no_grad():
        return _measure_speed(model, paths, spec, batch_size, device)


def _measure_speed(model: nn.Module, paths: list[str], spec: PreprocessSpec, batch_size: int,
                   device: torch.device) -> tuple[float, float]:
    import torch

    from tlops.vision.preprocessing import build_transform

    transform = build_transform(spec)
    model.eval().to(device)
    subset = paths[: min(len(paths), max(batch_size, 32))]
    model(torch.stack([transform(p) for p in subset[:4]]).to(device))  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(subset), batch_size):
        model(torch.stack([transform(p) for p in subset[start : start + batch_size]]).to(device))
    rate = len(subset) / max(time.perf_counter() - t0, 1e-9)
    single = []
    for p in subset[:8]:
        t = time.perf_counter()
        model(transform(p).unsqueeze(0).to(device))
        single.append((time.perf_counter() - t) * 1000)
    return rate, float(np.median(single))


def size_mb(model: nn.Module) -> float:
    """Bytes of the backbone's parameters and buffers, in MB (10^6 bytes)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


@dataclass
class CandidateScore:
    name: str
    status: str = "ok"  # ok, or failed (reason says why)
    reason: str = ""
    logme: float | None = None
    probe_accuracy: float | None = None
    probe_std: float | None = None
    folds: int = 0
    images_per_s: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    feature_dim: int = 0
    from_cache: bool = False
    seconds: float = 0.0


def score_candidates(cfg: Config, sample: pd.DataFrame, candidates: list[str]) -> list[CandidateScore]:
    """Every candidate scored on the same sample; a candidate that cannot be built fails alone."""
    from tlops.data.discovery import class_names
    from tlops.training.hardware import resolve_device
    from tlops.vision.features import FeatureCache
    from tlops.vision.parity import eval_spec

    sel = cfg.selection
    cache = FeatureCache(Path(cfg.workdir) / "cache" / "features")
    device = resolve_device(cfg.train.device)
    classes = class_names(sample)
    labels = np.array([classes.index(str(lab)) for lab in sample["label"]])
    paths, shas = [str(p) for p in sample["path"]], [str(s) for s in sample["sha256"]]
    out = []
    for name in candidates:
        t0 = time.perf_counter()
        score = CandidateScore(name=name)
        try:
            spec = eval_spec(parse_candidate(name)[0], cfg.preprocess)
            model = build_candidate(name, sel.seed)
            feats, score.from_cache = candidate_features(name, model, paths, shas, spec, cache,
                                                         cfg.train.batch_size, device, sel.seed)
            x = feats.numpy().astype(np.float64)
            score.feature_dim = int(x.shape[1])
            score.logme = logme(x, labels)
            score.probe_accuracy, score.probe_std, score.folds = probe_accuracy(x, labels, sel.folds, sel.seed)
            score.images_per_s, score.latency_ms = measure_speed(model, paths, spec, cfg.train.batch_size, device)
            score.size_mb = size_mb(model)
        except TlopsError as exc:
            score.status, score.reason = "failed", str(exc)
            log.warning("select: candidate %s failed: %s", name, exc)
        except (RuntimeError, ValueError, OSError) as exc:  # a broken checkpoint or image: this candidate only
            score.status, score.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log.warning("select: candidate %s failed: %s", name, exc)
        score.seconds = time.perf_counter() - t0
        out.append(score)
    key = "logme" if sel.rank_by == "logme" else "probe_accuracy"
    return sorted(out, key=lambda s: (s.status != "ok", -(getattr(s, key) or 0.0), s.name))


def choose(scores: list[CandidateScore], sel: SelectionConfig) -> tuple[str, str]:
    """The best candidate within the budgets, and one line saying why."""
    budget = []
    if sel.max_latency_ms is not None:
        budget.append(f"latency <= {sel.max_latency_ms:g} ms")
    if sel.max_size_mb is not None:
        budget.append(f"size <= {sel.max_size_mb:g} MB")
    ok = [s for s in scores if s.status == "ok"]
    within = [s for s in ok if (sel.max_latency_ms is None or (s.latency_ms or 0) <= sel.max_latency_ms)
              and (sel.max_size_mb is None or (s.size_mb or 0) <= sel.max_size_mb)]
    if not within:
        failed = "; ".join(f"{s.name}: {s.reason}" for s in scores if s.status != "ok")
        raise TlopsError("backbone auto: no candidate of selection.candidates is usable"
                         + (f" within {' and '.join(budget)}" if budget else "")
                         + (f" ({failed})" if failed else "") + ": widen the budgets or add candidates")
    best = within[0]
    metric = "LogME" if sel.rank_by == "logme" else "linear-probe accuracy"
    value = best.logme if sel.rank_by == "logme" else best.probe_accuracy
    left_out = [s.name for s in ok if s not in within]
    why = (f"{best.name}: highest {metric} ({value:.4f}) of {len(ok)} usable candidate(s)"
           + (f" within {' and '.join(budget)}" if budget else "")
           + (f"; over budget: {', '.join(left_out)}" if left_out else "")
           + "".join(f"; {s.name} unavailable" for s in scores if s.status != "ok"))
    return best.name, why


# ------------------------------------------------------------------------------------------------- reports


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def format_table(scores: list[CandidateScore]) -> str:
    head = f"{'rank':<5}{'candidate':<28}{'LogME':>9}{'probe acc':>14}{'images/s':>10}{'ms/image':>10}{'MB':>7}  note"
    lines = [head, "-" * len(head)]
    for i, s in enumerate(scores, 1):
        probe = "-" if s.probe_accuracy is None else f"{s.probe_accuracy:.3f}±{s.probe_std or 0:.3f}"
        note = s.reason if s.status != "ok" else ("features from cache" if s.from_cache else "")
        lines.append(f"{i if s.status == 'ok' else '-':<5}{s.name:<28}{_fmt(s.logme, '.4f'):>9}{probe:>14}"
                     f"{_fmt(s.images_per_s, '.0f'):>10}{_fmt(s.latency_ms, '.1f'):>10}{_fmt(s.size_mb, '.1f'):>7}"
                     f"  {note}")
    return "\n".join(lines)


def metric_name(candidate: str) -> str:
    """MLflow allows letters, digits, _ - . / and spaces in metric names."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", candidate)


def log_ranking(scores: list[CandidateScore], prefix: str = "select") -> None:
    """Metrics per candidate and the table (text and JSON) as artifacts of the active MLflow run."""
    import mlflow

    metrics = {}
    for s in scores:
        for field in ("logme", "probe_accuracy", "images_per_s", "latency_ms", "size_mb"):
            value = getattr(s, field)
            if value is not None:
                metrics[f"{prefix}.{metric_name(s.name)}.{field}"] = float(value)
    mlflow.log_metrics(metrics)
    mlflow.log_text(format_table(scores), f"{prefix}/ranking.txt")
    mlflow.log_dict({"ranking": [asdict(s) for s in scores]}, f"{prefix}/ranking.json")


# ------------------------------------------------------------------------------------------ the command


def select(cfg: Config, data_uri: str, candidates: list[str] | None = None, sample: int | None = None,
           output_format: str = "table") -> str:
    """``tlops select``: rank the candidates on a sample of the data, log it to MLflow, return the report."""
    import mlflow

    from tlops import tracking
    from tlops.data.discovery import build_manifest

    if output_format not in ("table", "json"):
        raise TlopsError(f"--format {output_format!r}: choose table or json")
    if sample is not None and sample < 10:
        raise TlopsError(f"--sample {sample}: pass at least 10 images (a few per class)")
    names = candidates or cfg.selection.candidates
    size = sample or cfg.selection.sample
    t0 = time.perf_counter()
    manifest = build_manifest(data_uri, Path(cfg.workdir) / "cache", cfg.data.val_fraction, cfg.data.test_fraction,
                              cfg.data.split_salt, max_pixels=cfg.validation.max_pixels,
                              workers=cfg.data.manifest_workers, use_cache=cfg.data.manifest_cache,
                              stratified=cfg.data.split == "stratified")
    rows = stratified_sample(manifest, size, cfg.selection.seed)
    if rows.empty:
        raise TlopsError(f"{data_uri}: no decodable labelled image in the train split to select a backbone with")
    scores = score_candidates(cfg, rows, names)
    seconds = time.perf_counter() - t0
    if all(s.status != "ok" for s in scores):
        raise TlopsError("no candidate could be scored: " + "; ".join(f"{s.name}: {s.reason}" for s in scores))
    try:
        best, why = choose(scores, cfg.selection)
    except TlopsError as exc:
        best, why = "", str(exc)
    with mlflow.start_run(experiment_id=tracking.setup(cfg), run_name="select") as run:
        mlflow.log_params({"select.data": data_uri, "select.candidates": ",".join(names),
                           "select.sample": len(rows), "select.rank_by": cfg.selection.rank_by})
        mlflow.set_tags({"tlops.command": "select", SELECTED_TAG: best or "none", REASON_TAG: why[:5000]})
        log_ranking(scores)
        mlflow.log_metric("select.seconds", seconds)
    if output_format == "json":
        return json.dumps({"data": data_uri, "images": len(rows), "classes": int(rows["label"].nunique()),
                           "best": best or None, "why": why, "seconds": round(seconds, 2),
                           "mlflow_run": run.info.run_id, "ranking": [asdict(s) for s in scores]}, indent=2)
    return "\n".join([
        f"tlops select: {len(rows)} images of {rows['label'].nunique()} classes from the train split of {data_uri}",
        format_table(scores),
        f"best: {why}" if best else f"no choice: {why}",
        f"finished in {seconds:.0f}s; mlflow run {run.info.run_id}",
    ])


