"""The gradient strategies' training loop, in the shape of torchvision's classification reference recipe and
timm's train.py: :func:`train_one_epoch`, :func:`evaluate`, a :class:`~tlops.training.state.TrainState` that
saves and restores itself, the optimiser and schedule from :mod:`tlops.training.optim`, the hardware and DDP
context from :mod:`tlops.training.hardware`.

- ``partial``: the first ``frozen_stages`` stages frozen (their BatchNorm in eval mode), the rest trained.
- ``full``: every layer trained; backbone lr = head lr x ``backbone_lr_factor``, optionally decayed layer-wise.
- ``gradual``: the head alone first, then one more stage from the top every ``gradual_unfreeze_every`` epochs.
- ``scratch``: the same architecture from random initialisation, every layer at the head's lr: the baseline.

AdamW or SGD, warm-up then cosine, label smoothing, optional class weights, gradient clipping, early stopping on
validation accuracy with the best weights kept, checkpoints every N steps and at each epoch end (resumed by a
rerun, mid-epoch exactly), bf16/fp16 autocast, channels_last and ``torch.compile`` on GPU, and DDP (see
:mod:`tlops.training.ddp`). The linear probe is :mod:`tlops.training.probe`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from tlops.config.settings import AugmentConfig, TrainConfig
from tlops.errors import TlopsError
from tlops.training.checkpoints import CheckpointStore
from tlops.training.hardware import DistContext, Hardware, configure, environment, wrap
from tlops.training.loaders import ManifestImages, ResumableSampler, split_items
from tlops.training.optim import Plan, apply_frozen, build_optimizer, build_scheduler, class_weights, make_plan
from tlops.training.state import FitResult, TrainState, checkpoint_location, module_state, run_key
from tlops.vision.backbones import build_classifier
from tlops.vision.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)


class _Progress:
    """Batch progress: a tqdm bar on a terminal, else ``tlops.progress`` (a line for the launcher's live bar,
    or a log line every ``every`` seconds)."""

    def __init__(self, total: int, desc: str, enabled: bool, every: float = 10.0) -> None:
        from tlops import progress

        self.bar = None
        self.counter: progress.Counter | None = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty() and not progress.structured():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        elif enabled:
            self.counter = progress.Counter(desc, total, "batches",
                                            every_s=None if progress.structured() else every)

    def step(self, n_images: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.counter is not None:
            self.counter.advance(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Run:
    """What stays fixed for the whole of one gradient run (and what this process has done of it)."""

    cfg: TrainConfig
    hw: Hardware
    ctx: DistContext
    plan: Plan
    criterion: nn.Module
    train_set: ManifestImages
    sampler: ResumableSampler
    loader: DataLoader
    val_set: ManifestImages
    store: CheckpointStore
    train_images: int
    batch: int  # the global batch: every rank takes batch / world of it
    steps_per_epoch: int
    process_steps: int = 0  # optimiser steps this process took (train.stop_after_steps)

    @property
    def per_rank(self) -> int:
        return self.batch // self.ctx.world


def _batches(x: list[torch.Tensor], y: list[int], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(x), size):
        yield torch.stack(x[start : start + size]), torch.tensor(y[start : start + size], dtype=torch.long)


@torch.no_grad()
def evaluate(model: nn.Module, x: list[torch.Tensor], y: list[int], hw: Hardware, batch: int) -> tuple[float, float]:
    """(summed cross-entropy, number correct) on this rank's share of the validation images."""
    model.eval()
    loss_sum, correct = 0.0, 0.0
    for xb, yb in _batches(x, y, batch):
        xb = hw.inputs(xb)
        yb = yb.to(hw.device)
        with hw.autocast():
            logits = model(xb).float()
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += float((logits.argmax(1) == yb).sum())
    return loss_sum, correct


def train_step(run: Run, state: TrainState, model: nn.Module, trainable: list[nn.Parameter], xb: torch.Tensor,
               yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on one batch (autocast, loss scaling, clipping, the schedule); (logits, loss)."""
    with run.hw.autocast():
        logits = model(xb)
    loss = run.criterion(logits.float(), yb)
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    if run.cfg.grad_clip_norm is not None and trainable:
        nn.utils.clip_grad_norm_(trainable, run.cfg.grad_clip_norm)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()
    return logits, loss


def _crash_drill(cfg: TrainConfig, steps: int) -> None:
    """Tests and drills only (train.stop_after_steps): die as a crash would, without cleaning up."""
    if cfg.stop_after_steps is not None and steps >= cfg.stop_after_steps:
        log.warning("train.stop_after_steps=%d reached: killing this process (SIGKILL)", steps)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def train_one_epoch(run: Run, state: TrainState, model: nn.Module) -> tuple[list[float], int, float]:
    """The epoch ``state.epoch`` from batch ``state.step_in_epoch`` on, with a mid-epoch checkpoint every
    ``train.checkpoint_every_steps``. Returns the whole epoch's (loss sum, correct, images) over every rank, the
    images this rank took now, and the seconds it took."""
    cfg, hw, ctx = run.cfg, run.hw, run.ctx
    trainable = [p for p in state.model.parameters() if p.requires_grad]
    run.train_set.set_epoch(state.epoch)
    run.sampler.set_epoch(state.epoch, skip=state.step_in_epoch * run.per_rank)
    loss_sum = torch.zeros((), dtype=torch.float64, device=hw.device)
    correct = torch.zeros((), dtype=torch.long, device=hw.device)
    seen = 0
    sums0 = state.epoch_sums  # the batches before a mid-epoch resume
    progress = _Progress(run.steps_per_epoch - state.step_in_epoch, f"epoch {state.epoch + 1}/{cfg.epochs}",
                         ctx.main)
    t0 = time.perf_counter()
    for xb, yb in run.loader:
        xb, yb = hw.inputs(xb), yb.to(hw.device, non_blocking=True)
        logits, loss = train_step(run, state, model, trainable, xb, yb)
        loss_sum += loss.detach().double() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
        state.global_step += 1
        state.step_in_epoch += 1
        run.process_steps += 1
        progress.step(run.batch)
        if (cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0
                and state.step_in_epoch < run.steps_per_epoch):
            sums = ctx.all_sum([float(loss_sum), float(correct), float(seen)])
            if ctx.main:
                state.epoch_sums = [a + b for a, b in zip(sums0, sums, strict=True)]
                state.save(run.store)
        _crash_drill(cfg, run.process_steps)
    progress.close()
    seconds = time.perf_counter() - t0
    totals = ctx.all_sum([float(loss_sum), float(correct), float(seen)])
    return [a + b for a, b in zip(sums0, totals, strict=True)], seen, seconds


def _sizes(n: int, cfg: TrainConfig, ctx: DistContext) -> tuple[int, int]:
    """(global batch, steps per epoch) for ``n`` training images, checked against the DDP world."""
    if n < 2 * ctx.world:
        raise TlopsError(f"the train split has {n} usable image(s): too few to train {cfg.strategy}")
    if cfg.batch_size % ctx.world:
        raise TlopsError(f"train.batch_size {cfg.batch_size} must be a multiple of the {ctx.world} DDP processes")
    batch = cfg.batch_size
    if n < batch:  # drop_last would leave no step at all
        batch = max((n // ctx.world) * ctx.world, ctx.world)
        log.warning("train.batch_size %d exceeds the %d training images; using %d", cfg.batch_size, n, batch)
    return batch, n // batch


def _start(backbone_name: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec, cfg: TrainConfig,
           workdir: str | Path, ctx: DistContext, hw: Hardware,
           head: dict[str, torch.Tensor] | None = None) -> tuple[Run, TrainState]:
    """The model, optimiser, schedule, data and checkpoint store of a run, resumed from its last checkpoint
    when there is one. The order is that of every earlier version (the RNG draws, and so the results, stay).
    ``head``: the head's starting weights (the linear probe's, for LP-FT)."""
    train_paths, train_labels, _ = split_items(manifest, classes, "train")
    val_paths, val_labels, _ = split_items(manifest, classes, "val")
    batch, steps_per_epoch = _sizes(len(train_paths), cfg, ctx)
    model = build_classifier(backbone_name, num_classes=len(classes), pretrained=cfg.strategy != "scratch")
    if head is not None:
        model.head.load_state_dict(head)
    plan = make_plan(model, cfg)
    model.to(hw.device)
    if hw.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, plan, cfg)
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg, steps_per_epoch), hw.grad_scaler(),
                       run_key(backbone_name, spec, classes, manifest, cfg), cfg.strategy, steps_per_epoch)
    weight = class_weights(train_labels, len(classes)).to(hw.device) if cfg.class_weighted_loss else None
    store = CheckpointStore(checkpoint_location(cfg, workdir, state.key), Path(workdir) / "cache")
    if cfg.resume:
        store.sync_down()  # every rank: on several machines each needs its own mirror of an s3:// store
        ctx.barrier()
        if state.restore(store, ctx.main):
            log.info("resuming %s from %s: epoch %d, step %d of %d%s", cfg.strategy, store.location,
                     state.epoch + 1, state.step_in_epoch, steps_per_epoch, " (finished)" if state.finished else "")
    train_set = ManifestImages(train_paths, train_labels, spec, cfg.augment, cfg.seed,
                               cache_bytes=cfg.input_cache_mb * 2**20 if hw.workers == 0 else 0)
    sampler = ResumableSampler(train_set, ctx.world, ctx.rank, cfg.seed)
    loader = DataLoader(train_set, batch_size=batch // ctx.world, sampler=sampler, num_workers=hw.workers,
                        pin_memory=hw.pin_memory, drop_last=True)
    val_set = ManifestImages(val_paths[ctx.rank :: ctx.world], val_labels[ctx.rank :: ctx.world], spec,
                             AugmentConfig())  # evaluation: the spec's transform, never augmented
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    return Run(cfg, hw, ctx, plan, criterion, train_set, sampler, loader, val_set, store, len(train_paths), batch,
               steps_per_epoch), state


def _epoch_row(run: Run, state: TrainState, sums: list[float], seen: int, seconds: float, frozen: int,
               val_x: list[torch.Tensor]) -> dict[str, float]:
    """The epoch's line of the history: training figures, validation (every rank's share), lr, speed."""
    tot_loss, tot_correct, tot_seen = sums
    v_loss, v_correct, v_n = run.ctx.all_sum(
        [*evaluate(state.model, val_x, run.val_set.labels, run.hw, max(run.per_rank * 2, 32)), float(len(val_x))])
    train_acc = tot_correct / max(tot_seen, 1)
    val_acc = v_correct / v_n if v_n else train_acc  # no validation split: select on training accuracy
    return {"epoch": state.epoch, "train_loss": tot_loss / max(tot_seen, 1), "train_accuracy": train_acc,
            "val_loss": v_loss / v_n if v_n else float("nan"), "val_accuracy": val_acc,
            "lr": state.optimizer.param_groups[-1]["lr"], "frozen_stages": frozen, "seconds": seconds,
            "images_per_second": (seen * run.ctx.world) / max(seconds, 1e-9)}


def fit(run: Run, state: TrainState) -> None:
    """Epochs until the last or an early stop: freeze as the plan says, train, validate, checkpoint."""
    cfg, ctx = run.cfg, run.ctx
    val_x: list[torch.Tensor] | None = None
    wrapped: nn.Module = state.model
    frozen_now = -1
    while state.epoch < cfg.epochs and not state.finished:
        frozen = run.plan.frozen_at(state.epoch)
        apply_frozen(state.model, run.plan, frozen, cfg.bn_stats_frozen)
        if frozen != frozen_now:
            wrapped, frozen_now = wrap(state.model, ctx, run.hw), frozen
            if frozen and ctx.main:
                log.info("epoch %d: %d of %d backbone stages frozen", state.epoch + 1, frozen, len(run.plan.stages))
        sums, seen, seconds = train_one_epoch(run, state, wrapped)
        if val_x is None:
            val_x = [run.val_set[i][0] for i in range(len(run.val_set))]
        row = _epoch_row(run, state, sums, seen, seconds, frozen, val_x)
        improved = state.end_epoch(row, cfg.patience, cfg.epochs)
        if ctx.main:
            log.info("epoch %d/%d: train loss %.4f accuracy %.4f, val loss %.4f accuracy %.4f (best %.4f at epoch "
                     "%d), lr %.2e, %.1f images/s", state.epoch, cfg.epochs, row["train_loss"],
                     row["train_accuracy"], row["val_loss"], row["val_accuracy"], state.best_val_accuracy,
                     state.best_epoch + 1, row["lr"], row["images_per_second"])
            state.save(run.store)
            if improved:
                state.save_best(run.store)
        if state.stopped_early:
            log.info("early stop: no better validation accuracy for %d epochs", cfg.patience)


def train_gradient(backbone_name: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec,
                   cfg: TrainConfig, workdir: str | Path = ".tlops", dist: DistContext | None = None,
                   head: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Train with a gradient strategy (partial, full, gradual, scratch); resumes from its last checkpoint.

    Under DDP every rank calls this with its ``dist``; only rank 0 writes checkpoints, and every rank
    returns the same best model. ``head``: the head's starting weights (the linear probe's, for LP-FT).
    """
    if not cfg.is_gradient:
        raise TlopsError(f"train_gradient: strategy {cfg.strategy} is not trained by gradient descent")
    ctx = dist or DistContext()
    hw = configure(cfg, ctx)
    run, state = _start(backbone_name, manifest, classes, spec, cfg, workdir, ctx, hw, head)
    fit(run, state)
    ctx.barrier()
    model = state.model
    # no epoch ran (epochs already done in a checkpoint without a best): keep last
    model.load_state_dict(state.best_model if state.best_model is not None else module_state(model))
    model.to(memory_format=torch.contiguous_format)  # as it will be served: the saved model is rebuilt NCHW
    env = environment(hw.device, ctx.world, hw.amp_dtype, hw.channels_last, hw.compile)
    env.update({"train_images": run.train_images, "batch_size": run.batch, "steps_per_epoch": run.steps_per_epoch,
                "checkpoint_dir": run.store.location})
    return FitResult(model=model.cpu().eval(), history=state.history, best_epoch=state.best_epoch,
                     best_val_accuracy=state.best_val_accuracy, strategy=cfg.strategy, environment=env,
                     checkpoint_dir=run.store.location, resumed_at_step=state.resumed_at,
                     stopped_early=state.stopped_early)
