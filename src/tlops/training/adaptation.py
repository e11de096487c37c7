"""Domain adaptation: a model trained on labelled source images, adapted to unlabelled target images.

Three strategies, over preprocessed image tensors (N, 3, H, W) so that the pipeline, the tests and the
benchmark share them:

- ``adabn``: BatchNorm statistics re-estimated on the target images (Li et al. 2016). No gradients; only
  the BatchNorm running means and variances change.
- ``self-training``: rounds of pseudo-labels on the target's training pool, kept above a confidence
  threshold (or each class's most confident share) and balanced across classes, read from a weak view of
  each image with the target's BatchNorm statistics and learnt from a strong one (FixMatch-style
  consistency), beside the labelled source.
- ``mcc``: fine-tuning on the source with Minimum Class Confusion on the target (Jin et al. 2020): the
  target predictions' class-correlation matrix is pushed towards the diagonal; then the target's
  BatchNorm statistics.

Target-test images never reach any of them: ``tlops.data.target.target_pool`` takes the target manifest's non-test rows
only, and ``self_train`` refuses a pool that shares content with the target test split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tlops.data.target import disjoint_or_fail
from tlops.errors import TlopsError

log = logging.getLogger(__name__)

ADAPTATION_STRATEGIES = ("adabn", "self-training", "mcc")


@dataclass(frozen=True)
class AdaptConfig:
    """What each strategy needs (``bench/bench_adapt.py`` sets its own: 10 epochs, lr 3e-3, backbone x0.3,
    two self-training rounds of 3 epochs at threshold 0.9)."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_factor: float = 0.1
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    seed: int = 0
    # self-training
    rounds: int = 3
    round_epochs: int | None = None  # epochs of each self-training round; None: ``epochs``
    threshold: float = 0.8
    # class-balanced self-training: round r (from 1) pseudo-labels each predicted class's most confident
    # min(r * portion, 1); None: the fixed ``threshold``
    portion: float | None = None
    unlabelled_weight: float = 1.0
    # mcc
    mcc_weight: float = 1.0
    mcc_temperature: float = 2.5


@dataclass
class AdaptResult:
    strategy: str
    history: list[dict[str, float]] = field(default_factory=list)
    pseudo_labelled: list[int] = field(default_factory=list)  # pool indices labelled in the last round


# ---------------------------------------------------------------------------------------------- the data


# ---------------------------------------------------------------------------------------------- helpers


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _batches(n: int, size: int, gen: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, size):
        yield order[i:i + size]


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([F.softmax(model(x[idx]), dim=1) for idx in _batches(len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_proba(model, x).argmax(1) == y).float().mean()) if len(x) else float("nan")


def _shift(x: torch.Tensor, gen: torch.Generator, frac: float) -> torch.Tensor:
    """Each image moved by up to ``frac`` of its side (edge padding), independently."""
    n, _, h, w = x.shape
    pad = max(1, round(frac * max(h, w)))
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w] for i in range(n)])


def weak_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A small shift: what the pseudo-label is read from."""
    return _shift(x, gen, 0.0625)


def strong_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A larger shift, contrast and brightness jitter, noise and a random erased box: what is learnt from."""
    n, _, h, w = x.shape
    out = _shift(x, gen, 0.125)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    bright = 0.4 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    out = (out - mean) * contrast + mean + bright + 0.1 * torch.randn(out.shape, generator=gen)
    eh, ew = max(1, h // 4), max(1, w // 4)
    ys = torch.randint(0, h - eh + 1, (n,), generator=gen)
    xs = torch.randint(0, w - ew + 1, (n,), generator=gen)
    for i in range(n):
        out[i, :, int(ys[i]):int(ys[i]) + eh, int(xs[i]):int(xs[i]) + ew] = mean[i]
    return out


def _optimizer(model: nn.Module, cfg: AdaptConfig) -> torch.optim.Optimizer:
    head = [p for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    return torch.optim.AdamW([{"params": head, "lr": cfg.lr},
                              {"params": body, "lr": cfg.lr * cfg.backbone_lr_factor}],
                             weight_decay=cfg.weight_decay)


EpochHook = Callable[[int, dict[str, float], dict[str, Any]], None]


def _fit(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, cfg: AdaptConfig, gen: torch.Generator,
         extra: Callable[[torch.Tensor], torch.Tensor] | None = None, what: str = "source",
         epochs: int | None = None, start: dict[str, Any] | None = None,
         on_epoch: EpochHook | None = None) -> list[dict[str, float]]:
    """Cross-entropy on source batches (weakly shifted), plus ``extra(step)`` per step, for ``epochs``
    (default ``cfg.epochs``). ``on_epoch(epoch, row, state)`` after each epoch: ``state`` (optimizer, schedule,
    the batch generator, the epoch and step) is what ``start`` takes to continue from there with the model's
    weights of that moment, exactly as if never stopped."""
    epochs = cfg.epochs if epochs is None else epochs
    opt = _optimizer(model, cfg)
    steps = epochs * max(1, math.ceil(len(xs) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history = []
    step, first = 0, 0
    if start is not None:
        opt.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["scheduler"])
        gen.set_state(start["generator"])
        first, step = int(start["epoch"]), int(start["step"])
    for epoch in range(first, epochs):
        model.train()
        total, seen = 0.0, 0
        for idx in _batches(len(xs), cfg.batch_size, gen):
            if len(idx) < 2:  # BatchNorm needs two images
                continue
            loss = F.cross_entropy(model(weak_view(xs[idx], gen)), ys[idx], label_smoothing=cfg.label_smoothing)
            if extra is not None:
                loss = loss + extra(torch.tensor(step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1)})
        log.info("%s epoch %d/%d: loss %.4f", what, epoch + 1, epochs, total / max(seen, 1))
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1], {"epoch": epoch + 1, "step": step, "optimizer": opt.state_dict(),
                                              "scheduler": sched.state_dict(), "generator": gen.get_state()})
    model.eval()
    return history


def fine_tune_source(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, cfg: AdaptConfig) -> AdaptResult:
    """Plain fine-tuning on the labelled source: the source-only baseline, and where the others start."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return AdaptResult("source-only", _fit(model, xs, ys, cfg, gen, what="source-only"))


# ---------------------------------------------------------------------------------------------- strategies


@torch.no_grad()
def adabn(model: nn.Module, xt: torch.Tensor, batch_size: int = 64) -> AdaptResult:
    """Re-estimate every BatchNorm layer's running mean and variance on the target images.

    A cumulative average over the target batches (momentum None), no gradients, every other layer in eval
    mode: weights, biases, scales and shifts stay as they are."""
    layers = batchnorm_layers(model)
    if not layers:
        raise TlopsError("adabn: the model has no BatchNorm layer to re-estimate")
    if len(xt) < 2:
        raise TlopsError(f"adabn: {len(xt)} target image(s); BatchNorm statistics need at least two")
    model.eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for idx in _batches(len(xt), batch_size):
        if len(idx) >= 2:
            model(xt[idx])
    for m, mom in zip(layers, momenta, strict=True):
        m.momentum = mom
    model.eval()
    return AdaptResult("adabn", [{"target_images": float(len(xt))}])


def select_pseudo_labels(probs: torch.Tensor, threshold: float,
                         portion: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, labels) of the confident predictions, balanced across classes.

    Above ``threshold``; then each class keeps at most as many as the class with the fewest confident
    images (at least one), its most confident first, so that an easy class cannot crowd out the others.

    With ``portion`` (class-balanced self-training, Zou et al. 2018) the threshold is each class's own
    instead: of the images predicted as a class, its most confident ``portion`` (at least one), whatever
    the absolute confidence. A calibration-free rule: label smoothing or a hard domain can hold every
    confidence below a fixed threshold, and a class the model finds hard still gets its share."""
    conf, label = probs.max(1)
    if portion is not None:
        chosen = []
        for c in range(probs.shape[1]):
            mine = torch.nonzero(label == c).flatten()
            if len(mine):
                take = max(1, round(portion * len(mine)))
                chosen.append(mine[conf[mine].argsort(descending=True)[:take]])
        idx = torch.cat(chosen).sort().values
        return idx, label[idx]
    keep = torch.nonzero(conf >= threshold).flatten()
    if keep.numel() == 0:
        return keep, keep
    counts = torch.bincount(label[keep], minlength=probs.shape[1])
    present = counts[counts > 0]
    cap = max(int(present.min()), 1) if len(present) > 1 else int(present.max())
    # Classes with confident images: at least `cap` each, and never fewer than a tenth of the pool's even share.
    cap = max(cap, math.ceil(len(probs) / probs.shape[1] / 10))
    chosen = []
    for c in range(probs.shape[1]):
        mine = keep[label[keep] == c]
        chosen.append(mine[conf[mine].argsort(descending=True)[:cap]])
    idx = torch.cat(chosen).sort().values
    return idx, label[idx]


def self_train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, cfg: AdaptConfig,
               pool_sha256: list[str] | None = None, test_sha256: list[str] | None = None,
               target_statistics: bool = True) -> AdaptResult:
    """Rounds of confident, class-balanced pseudo-labels on the target pool (read from a weak view),
    learnt from a strong view of the same images beside the labelled source.

    With ``target_statistics`` (the default) the BatchNorm statistics are re-estimated on the target pool
    (``adabn``) before each round's pseudo-labels are read and once more at the end: the pseudo-labels
    come from, and the adapted model keeps, the target's statistics rather than the mix of both domains
    that training leaves in the running averages. The first round thus starts from the AdaBN model."""
    if pool_sha256 is not None and test_sha256 is not None:
        disjoint_or_fail(pool_sha256, test_sha256)
    if len(xt) == 0:
        raise TlopsError("self-training: no target images to pseudo-label")
    gen = torch.Generator().manual_seed(cfg.seed)
    result = AdaptResult("self-training")
    for r in range(cfg.rounds):
        if target_statistics:
            adabn(model, xt, cfg.batch_size)
        with torch.no_grad():
            model.eval()
            probs = torch.cat([F.softmax(model(weak_view(xt[i], gen)), 1) for i in _batches(len(xt), 256)])
        portion = None if cfg.portion is None else min(cfg.portion * (r + 1), 1.0)
        idx, labels = select_pseudo_labels(probs, cfg.threshold, portion)
        result.pseudo_labelled = [int(i) for i in idx]
        log.info("self-training round %d/%d: %d of %d target images pseudo-labelled", r + 1, cfg.rounds,
                 len(idx), len(xt))
        if len(idx) < 2:
            break
        xp = xt[idx]

        def consistency(step: torch.Tensor, xp: torch.Tensor = xp, labels: torch.Tensor = labels) -> torch.Tensor:
            pick = torch.randint(0, len(xp), (min(cfg.batch_size, len(xp)),), generator=gen)
            return cfg.unlabelled_weight * F.cross_entropy(model(strong_view(xp[pick], gen)), labels[pick])

        hist = _fit(model, xs, ys, cfg, gen, consistency, what=f"self-training round {r + 1}",
                    epochs=cfg.round_epochs)
        result.history += [{**h, "round": r + 1, "pseudo_labels": float(len(idx))} for h in hist]
    if target_statistics:
        adabn(model, xt, cfg.batch_size)
    return result


def mcc_loss(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum Class Confusion: the off-diagonal mass of the target batch's class-correlation matrix, each
    image weighted by how sure the model is of it, each row normalised; divided by the number of classes."""
    n, k = logits.shape
    p = F.softmax(logits / temperature, dim=1)
    entropy = -(p * torch.log(p + 1e-5)).sum(1)
    w = 1 + torch.exp(-entropy)
    w = (n * w / w.sum()).unsqueeze(1)
    confusion = (p * w).t() @ p
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / k


def mcc(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, cfg: AdaptConfig,
        target_statistics: bool = True, start: dict[str, Any] | None = None,
        on_epoch: EpochHook | None = None) -> AdaptResult:
    """Fine-tuning on the source with the MCC loss on target batches (each step one of each); with
    ``target_statistics`` (the default) the BatchNorm statistics are then re-estimated on the target
    images (``adabn``), which the target batches were normalised with during training. ``on_epoch`` and
    ``start``: a checkpoint after every epoch and the continuation from one (:func:`_fit`)."""
    if len(xt) < 2:
        raise TlopsError(f"mcc: {len(xt)} target image(s); a target batch needs at least two")
    gen = torch.Generator().manual_seed(cfg.seed)

    def confusion(step: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(0, len(xt), (min(cfg.batch_size, len(xt)),), generator=gen)
        return cfg.mcc_weight * mcc_loss(model(weak_view(xt[pick], gen)), cfg.mcc_temperature)

    result = AdaptResult("mcc", _fit(model, xs, ys, cfg, gen, confusion, what="mcc", start=start, on_epoch=on_epoch))
    if target_statistics:
        adabn(model, xt, cfg.batch_size)
    return result


def adapt(strategy: str, model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor | None,
          cfg: AdaptConfig) -> AdaptResult:
    """Run ``strategy`` on ``model`` (already fine-tuned on the source for adabn and self-training; the
    pre-trained start for mcc, which fine-tunes itself)."""
    if strategy not in ADAPTATION_STRATEGIES:
        raise TlopsError(f"unknown adaptation strategy {strategy!r}; choose one of {', '.join(ADAPTATION_STRATEGIES)}")
    if xt is None or len(xt) == 0:
        raise TlopsError(f"train.strategy {strategy} adapts to target images, but there are none: "
                         "set data.target_uri to a folder or bucket of unlabelled target images")
    if strategy == "adabn":
        return adabn(model, xt, cfg.batch_size)
    if strategy == "self-training":
        return self_train(model, xs, ys, xt, cfg)
    return mcc(model, xs, ys, xt, cfg)
