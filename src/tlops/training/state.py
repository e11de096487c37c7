"""What a gradient run carries from step to step and across a restart: :class:`TrainState` saves itself as the
``last.pt`` checkpoint and restores itself from it (model, optimiser, schedule, scaler, RNG, where in which
epoch, the history and the best epoch so far); the key that says which run a checkpoint belongs to; what a fit
returns (:class:`FitResult`)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from tlops.config.settings import TrainConfig
from tlops.errors import TlopsError
from tlops.training.checkpoints import BEST, LAST, CheckpointStore, rng_state, set_rng_state
from tlops.vision.backbones import ImageClassifier
from tlops.vision.features import weights_identity
from tlops.vision.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    model: ImageClassifier
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    strategy: str = "linear-probe"
    environment: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    resumed_at_step: int | None = None  # the global step a rerun resumed from; None: started afresh
    stopped_early: bool = False
    kept_over: str | None = None  # the fine-tuning strategy whose model lost to this probe's on validation
    # Adaptation strategies: the source model's weights before adaptation (the gate's source-only reference).
    source_only: dict[str, torch.Tensor] | None = None


def run_key(backbone_name: str, spec: PreprocessSpec, classes: list[str], manifest: pd.DataFrame,
            cfg: TrainConfig) -> str:
    """What a checkpoint belongs to: weights, preprocessing, data (content, labels, split) and the training
    config's result fields (every field not marked runtime, :meth:`TrainConfig.result_fields`)."""
    from tlops.data.manifest import usable

    rows = sorted(f"{r.sha256}\t{r.label}\t{r.split}" for r in usable(manifest).itertuples()
                  if r.split in ("train", "val"))
    ident = {"weights": weights_identity(backbone_name), "preprocess": spec.fingerprint, "classes": classes,
             "data": hashlib.sha256("\n".join(rows).encode()).hexdigest(), "train": cfg.result_fields(),
             "backbone": backbone_name}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def checkpoint_location(cfg: TrainConfig, workdir: str | Path, key: str, state_uri: str | None = None) -> str:
    if cfg.checkpoint_dir:
        return cfg.checkpoint_dir
    if state_uri:
        return f"{state_uri.rstrip('/')}/checkpoints/{key[:16]}"
    return str(Path(workdir) / "checkpoints" / key[:16])


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights (the best epoch's are kept this way)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class TrainState:
    """The objects a step changes and where the run stands. ``epoch`` and ``step_in_epoch`` say what comes next:
    the batches of ``epoch`` already taken (a mid-epoch checkpoint), and ``epoch_sums`` the loss sum, correct
    count and images of those batches, so the resumed epoch reports what one uninterrupted epoch would."""

    model: ImageClassifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    key: str
    strategy: str
    steps_per_epoch: int
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    finished: bool = False
    stopped_early: bool = False
    best_model: dict[str, torch.Tensor] | None = None  # in best.pt, not in last.pt
    resumed_at: int | None = None  # the global step this process resumed from

    def save(self, store: CheckpointStore) -> None:
        """``last.pt``: this state, whole (the format is that of every earlier version)."""
        store.save(LAST, {
            "key": self.key, "model": module_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
            "rng": rng_state(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "epoch_sums": self.epoch_sums, "history": self.history,
            "best_val_accuracy": self.best_val_accuracy, "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs, "finished": self.finished, "stopped_early": self.stopped_early,
            "strategy": self.strategy, "steps_per_epoch": self.steps_per_epoch,
        })

    def save_best(self, store: CheckpointStore) -> None:
        store.save(BEST, {"model": self.best_model, "epoch": self.best_epoch, "val_accuracy": self.best_val_accuracy})

    def restore(self, store: CheckpointStore, main: bool) -> bool:
        """Continue from ``last.pt`` (and ``best.pt``) when there is one; False when there is none. Only the main
        rank keeps the partial epoch's sums: the others' were summed into them when they were saved."""
        last = store.load(LAST)
        if last is None:
            return False
        if last.get("key") != self.key:
            raise TlopsError(f"checkpoint {store.dir / LAST} belongs to another run (data, preprocessing or "
                             "training config differ); point train.checkpoint_dir elsewhere or delete it")
        self.model.load_state_dict(last["model"])
        self.optimizer.load_state_dict(last["optimizer"])
        self.scheduler.load_state_dict(last["scheduler"])
        if self.scaler is not None and last.get("scaler"):
            self.scaler.load_state_dict(last["scaler"])
        set_rng_state(last["rng"])
        self.epoch, self.step_in_epoch = int(last["epoch"]), int(last["step_in_epoch"])
        self.global_step, self.history = int(last["global_step"]), list(last["history"])
        self.best_val_accuracy, self.best_epoch = float(last["best_val_accuracy"]), int(last["best_epoch"])
        self.bad_epochs = int(last["bad_epochs"])
        self.epoch_sums = [float(v) for v in last["epoch_sums"]] if main else [0.0, 0.0, 0.0]
        self.finished, self.stopped_early = bool(last["finished"]), bool(last["stopped_early"])
        self._restore_best(store, last, main)
        self.resumed_at = self.global_step
        return True

    def _restore_best(self, store: CheckpointStore, last: dict[str, Any], main: bool) -> None:
        best = store.load(BEST)
        if best is not None and int(best["epoch"]) == self.best_epoch:
            self.best_model = best["model"]
        elif self.best_epoch >= 0:
            # Killed between the epoch-end last.pt and best.pt: that last.pt holds the best epoch's weights
            # (a mid-epoch last.pt cannot follow it without best.pt having been repaired here first).
            self.best_model = last["model"]
            if main:
                self.save_best(store)

    def end_epoch(self, row: dict[str, float], patience: int | None, epochs: int) -> bool:
        """Record an epoch's row; keep the weights when validation improved; decide early stopping and the end.
        Returns whether validation improved."""
        epoch = int(row["epoch"])
        self.history.append(row)
        improved = row["val_accuracy"] > self.best_val_accuracy
        if improved:
            self.best_val_accuracy, self.best_epoch, self.bad_epochs = row["val_accuracy"], epoch, 0
            self.best_model = module_state(self.model)
        else:
            self.bad_epochs += 1
        self.stopped_early = patience is not None and self.bad_epochs >= patience and epoch + 1 < epochs
        self.finished = self.stopped_early or epoch + 1 == epochs
        self.epoch, self.step_in_epoch, self.epoch_sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        return improved
