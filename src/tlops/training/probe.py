"""The linear probe: the frozen backbone's features (from the feature cache, computed once per backbone,
preprocessing and data), then an L-BFGS logistic-regression head fit with an L2 sweep on the validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from tlops.config.settings import TrainConfig
from tlops.errors import TlopsError
from tlops.training.hardware import environment, resolve_device, seed_everything, torch_threads
from tlops.training.loaders import split_items
from tlops.training.state import FitResult
from tlops.vision import features
from tlops.vision.backbones import build_classifier
from tlops.vision.features import FeatureCache
from tlops.vision.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                  max_iter: int) -> nn.Linear:
    """Multinomial logistic regression, full batch with L-BFGS: mean cross-entropy + l2/2 * |W|^2."""
    lin = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(lin(x), y) + 0.5 * l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def fit_head(head: nn.Linear, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
              y_val: torch.Tensor, cfg: TrainConfig) -> tuple[list[dict[str, float]], int, float]:
    """Sweep the L2 strength on the validation split (the usual linear-probe protocol); keep the best.

    Each fit on one torch thread: the matrices are small (images x feature dimension x classes), so a second
    thread inside a fit gains little and, on cores other processes share, its barrier waits cost more than the
    work (measured 17x slower under load). The fits are independent, so they run side by side instead, as many
    at once as torch had threads (each fit's result the same as alone: one thread, the same operations; the demo's
    four fits 2.5 -> 0.8 s on 2 cores)."""
    workers = max(1, min(torch.get_num_threads(), len(cfg.l2_grid)))
    with torch_threads(1):
        return _sweep_l2(head, x_train, y_train, x_val, y_val, cfg, workers)


def _sweep_l2(head: nn.Linear, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
              y_val: torch.Tensor, cfg: TrainConfig, workers: int = 1) -> tuple[list[dict[str, float]], int, float]:
    from concurrent.futures import ThreadPoolExecutor

    from tlops.progress import Counter

    history: list[dict[str, float]] = []
    best: tuple[float, int, nn.Linear | None] = (-1.0, 0, None)
    loss_fn = nn.CrossEntropyLoss()
    fits = Counter(f"linear probe: L2 sweep on {len(x_train)} feature vectors", len(cfg.l2_grid), "fits")

    def fit(l2: float) -> nn.Linear:
        lin = _fit_logistic(x_train, y_train, head.out_features, l2, cfg.epochs)
        fits.advance()
        return lin

    with ThreadPoolExecutor(workers, thread_name_prefix="probe-fit") as pool:
        lins = list(pool.map(fit, cfg.l2_grid))
    for i, (l2, lin) in enumerate(zip(cfg.l2_grid, lins, strict=True)):
        with torch.no_grad():
            train_loss = float(loss_fn(lin(x_train), y_train))
            train_acc = float((lin(x_train).argmax(1) == y_train).float().mean())
            val_acc = float((lin(x_val).argmax(1) == y_val).float().mean()) if len(x_val) else train_acc
        history.append({"epoch": i, "l2": l2, "train_loss": train_loss, "train_accuracy": train_acc,
                        "val_accuracy": val_acc})
        log.info("linear probe: l2=%g train accuracy %.4f, val accuracy %.4f", l2, train_acc, val_acc)
        if val_acc > best[0]:
            best = (val_acc, i, lin)
    best_acc, best_i, best_lin = best
    assert best_lin is not None
    head.load_state_dict(best_lin.state_dict())
    return history, best_i, best_acc


def linear_probe(backbone_name: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec,
                 cfg: TrainConfig, cache_dir: str | Path | None = None, cache_remote: str | None = None) -> FitResult:
    """Train a new head on frozen pre-trained features of the train split; select on val.

    With ``cache_dir`` the features are read from (or written to) the feature cache there.
    """
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    if cfg.augment.active:
        log.warning("linear probe: train.augment is ignored (features are computed once, without augmentation)")
    model = build_classifier(backbone_name, num_classes=len(classes), pretrained=True)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    cache = FeatureCache(cache_dir, cache_remote) if cache_dir is not None else None
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split in ("train", "val"):
        paths, labels, shas = split_items(manifest, classes, split)
        if cache is not None:
            x = cache.features(backbone_name, model.backbone, paths, shas, spec, cfg.batch_size, device, split)
        else:
            x = features.extract_features(model.backbone, paths, spec, cfg.batch_size, device, desc=split)
        feats[split] = (x, torch.tensor(labels, dtype=torch.long))
    if not len(feats["train"][1]):
        raise TlopsError("the train split has no usable labelled image: nothing to fit the probe on")
    history, best_epoch, best_acc = fit_head(model.head, *feats["train"], *feats["val"], cfg)
    log.info("linear probe: best val accuracy %.4f at epoch %d", best_acc, best_epoch)
    env = environment(device, 1, None, False, False)
    if cache is not None:
        env["feature_cache"] = {"hits": cache.hits, "misses": cache.misses, "dir": str(cache.root)}
    return FitResult(model=model.cpu().eval(), history=history, best_epoch=best_epoch,
                     best_val_accuracy=best_acc, strategy="linear-probe", environment=env)
