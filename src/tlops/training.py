"""Fine-tuning. Linear probe: the frozen backbone's features are computed once, then a head is fit on them."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tlops.backbones import ImageClassifier, build_classifier
from tlops.config import TrainConfig
from tlops.preprocessing import PreprocessSpec, build_transform

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def extract_features(backbone: nn.Module, paths: list[str], spec: PreprocessSpec, batch_size: int,
                     device: torch.device, desc: str = "features") -> torch.Tensor:
    """Pooled backbone features for each image, in order, with a progress line every few seconds."""
    transform = build_transform(spec)
    backbone.eval().to(device)
    out = []
    t0 = last = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([transform(p) for p in paths[start : start + batch_size]]).to(device)
        out.append(backbone(batch).float().cpu())
        now = time.perf_counter()
        if now - last > 5 or start + batch_size >= len(paths):
            last = now
            done = min(start + batch_size, len(paths))
            log.info("%s: %d/%d images (%.1f images/s)", desc, done, len(paths),
                     done / max(time.perf_counter() - t0, 1e-9))
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class FitResult:
    model: ImageClassifier
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float


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


def _fit_head(head: nn.Linear, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
              y_val: torch.Tensor, cfg: TrainConfig) -> tuple[list[dict[str, float]], int, float]:
    """Sweep the L2 strength on the validation split (the usual linear-probe protocol); keep the best."""
    history: list[dict[str, float]] = []
    best: tuple[float, int, nn.Linear | None] = (-1.0, 0, None)
    loss_fn = nn.CrossEntropyLoss()
    for i, l2 in enumerate(cfg.l2_grid):
        lin = _fit_logistic(x_train, y_train, head.out_features, l2, cfg.epochs)
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
                 cfg: TrainConfig) -> FitResult:
    """Train a new head on frozen pre-trained features of the train split; select on val."""
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    model = build_classifier(backbone_name, num_classes=len(classes), pretrained=True)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    index = {c: i for i, c in enumerate(classes)}
    usable = manifest[manifest["decodable"].astype(bool) & manifest["label"].notna()]
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split in ("train", "val"):
        part = usable[usable["split"] == split]
        x = extract_features(model.backbone, list(part["path"]), spec, cfg.batch_size, device, desc=split)
        y = torch.tensor([index[str(lab)] for lab in part["label"]], dtype=torch.long)
        feats[split] = (x, y)
    history, best_epoch, best_acc = _fit_head(model.head, *feats["train"], *feats["val"], cfg)
    log.info("linear probe: best val accuracy %.4f at epoch %d", best_acc, best_epoch)
    return FitResult(model=model.cpu().eval(), history=history, best_epoch=best_epoch,
                     best_val_accuracy=best_acc)


def checkpoint_payload(model: ImageClassifier) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
