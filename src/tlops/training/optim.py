"""What a gradient strategy trains and how fast: the stages frozen at each epoch and their learning rates
(:class:`Plan`), the optimiser's parameter groups, and the optimiser and schedule factories."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tlops.config.settings import TrainConfig
from tlops.errors import TlopsError
from tlops.vision.backbones import ImageClassifier
from tlops.vision.stages import Stage, split_stages, stages_or_whole

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Which stages are frozen at each epoch, and each stage's learning rate."""

    stages: list[Stage]
    stage_lrs: list[float]
    head_lr: float
    frozen_at: Callable[[int], int]  # epoch -> number of leading stages frozen (len(stages): head only)


def make_plan(model: ImageClassifier, cfg: TrainConfig) -> Plan:
    strategy = cfg.strategy
    stages = split_stages(model.backbone) if strategy in ("partial", "gradual") else stages_or_whole(model.backbone)
    n = len(stages)
    if strategy == "scratch":
        return Plan(stages, [cfg.lr] * n, cfg.lr, lambda epoch: 0)
    if cfg.layer_decay < 1.0 and n == 1:
        log.warning("train.layer_decay ignored: %s has no known stage split", type(model.backbone).__name__)
    lrs = [cfg.lr * cfg.backbone_lr_factor * cfg.layer_decay ** (n - 1 - i) for i in range(n)]
    if strategy == "partial":
        if cfg.frozen_stages >= n:
            raise TlopsError(f"train.frozen_stages is {cfg.frozen_stages} but the backbone has {n} stages "
                             f"({', '.join(s.name for s in stages)}); freezing all of them is "
                             "train.strategy=linear-probe")
        k = cfg.frozen_stages
        return Plan(stages, lrs, cfg.lr, lambda epoch: k)
    if strategy == "gradual":
        head, every = cfg.gradual_head_epochs, cfg.gradual_unfreeze_every

        def gradual(epoch: int) -> int:
            if epoch < head:
                return n
            return max(n - 1 - (epoch - head) // every, 0)

        return Plan(stages, lrs, cfg.lr, gradual)
    return Plan(stages, lrs, cfg.lr, lambda epoch: 0)


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases and normalisation scales/shifts (1-D tensors) take no weight decay."""
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(model: ImageClassifier, plan: Plan, weight_decay: float) -> list[dict[str, Any]]:
    """One (decay, no-decay) pair of groups per stage, then the head's; each group carries its base lr.

    Every parameter is in a group from the start, frozen or not: unfreezing (gradual) only flips
    ``requires_grad``, so the optimizer's and the checkpoint's structure never change.
    """
    groups: list[dict[str, Any]] = []
    named = {id(p): n for n, p in model.named_parameters()}

    def add(name: str, params: list[nn.Parameter], lr: float) -> None:
        decay = [p for p in params if not _no_decay(named[id(p)], p)]
        rest = [p for p in params if _no_decay(named[id(p)], p)]
        for suffix, ps, wd in (("", decay, weight_decay), (".no_decay", rest, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": wd, "name": name + suffix})

    for st, lr in zip(plan.stages, plan.stage_lrs, strict=True):
        add(st.name, st.parameters(), lr)
    add("head", list(model.head.parameters()), plan.head_lr)
    covered = sum(len(g["params"]) for g in groups)
    if covered != len(list(model.parameters())):
        raise TlopsError(f"internal: {covered} of {len(list(model.parameters()))} parameters in optimizer groups")
    return groups


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """lr multiplier: linear from 1/(warmup+1) to 1 over the warm-up, then cosine down to zero at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup_steps) / span, 1.0)))

    return factor


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """n / (k * count_c): the usual 'balanced' weights; a class absent from training gets weight 0."""
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
    w = len(labels) / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w))


def apply_frozen(model: ImageClassifier, plan: Plan, frozen: int, freeze_bn_stats: bool) -> None:
    """Train mode, except frozen stages (and every BatchNorm with freeze_bn_stats): eval mode, no grads."""
    model.train()
    for i, st in enumerate(plan.stages):
        st.set_frozen(i < frozen)
        if i < frozen:
            st.eval()
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def build_optimizer(model: ImageClassifier, plan: Plan, cfg: TrainConfig) -> torch.optim.Optimizer:
    return make_optimizer(param_groups(model, plan, cfg.weight_decay), cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch: warm-up over ``train.warmup_epochs``, then cosine to zero at the last step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch))
