"""Domain adaptation as a fine-tune strategy (``train.strategy`` adabn, self-training, mcc): the source model, then
the algorithms of :mod:`tlops.training.adaptation` on the target images, checkpointed and resumable.

The source model comes first, trained by ``train.adaptation.base`` through the usual machinery
(:func:`tlops.training.finetune.fine_tune`): resumable mid-epoch from its own checkpoints, under the same key as a
plain run of that strategy. Then the adaptation phase, on the evaluation tensors of the source's train split and
of the target pool (:func:`tlops.data.target.adaptation_pool`: never a target test image), on the CPU:

- adabn: the BatchNorm statistics re-estimated (seconds, no gradient); saved when done;
- self-training: ``rounds`` rounds, each one :func:`~tlops.training.adaptation.self_train` round; the model,
  the round and the history are saved after every round, and a rerun resumes at the next round;
- mcc: :func:`~tlops.training.adaptation.mcc` for ``train.adaptation.epochs`` epochs; the model, the optimizer,
  the schedule and the batch generator are saved after every epoch, and a rerun continues at the next epoch.

The checkpoint (``adapt.pt``, beside the key's other files) is keyed by the source model's key, the target
pool's content and the adaptation settings; it loads with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tlops.config.settings import TrainConfig
from tlops.errors import TlopsError
from tlops.training.adaptation import AdaptConfig, accuracy, adabn, mcc, self_train
from tlops.training.checkpoints import CheckpointStore, rng_state, set_rng_state
from tlops.training.loaders import split_items
from tlops.training.state import FitResult, checkpoint_location, module_state, run_key
from tlops.vision.preprocessing import PreprocessSpec, build_transform

log = logging.getLogger(__name__)
ADAPT = "adapt.pt"


def adapt_config(cfg: TrainConfig) -> AdaptConfig:
    """The algorithms' settings from the run's train section."""
    a = cfg.adaptation
    return AdaptConfig(epochs=a.epochs, batch_size=cfg.batch_size, lr=cfg.lr, backbone_lr_factor=cfg.backbone_lr_factor,
                       weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing, seed=cfg.seed,
                       rounds=a.rounds, threshold=a.threshold, unlabelled_weight=a.unlabelled_weight,
                       mcc_weight=a.mcc_weight, mcc_temperature=a.mcc_temperature)


def _tensors(paths: list[str], spec: PreprocessSpec) -> torch.Tensor:
    transform = build_transform(spec)
    if not paths:
        return torch.empty(0, 3, spec.crop_size, spec.crop_size)
    return torch.stack([transform(p) for p in paths])


def adapt_key(source_key: str, pool: pd.DataFrame, target_val: pd.DataFrame, cfg: TrainConfig) -> str:
    ident = {"source": source_key, "pool": sorted(str(s) for s in pool["sha256"]),
             "target_val": sorted(f"{s}\t{lab}" for s, lab in zip(target_val["sha256"], target_val["label"],
                                                                   strict=True)),
             "strategy": cfg.strategy, "adaptation": cfg.adaptation.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _labels(rows: pd.DataFrame, classes: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[str(lab)] for lab in rows["label"]], dtype=torch.long)


def adapt_source_model(base: FitResult, backbone_name: str, manifest: pd.DataFrame, classes: list[str],
                       spec: PreprocessSpec, cfg: TrainConfig, pool: pd.DataFrame, target_val: pd.DataFrame,
                       target_test_sha256: list[str], workdir: str | Path = ".tlops",
                       state_uri: str | None = None) -> FitResult:
    """Adapt ``base`` (the source model) to the target ``pool`` (rows with ``path``; their labels are never read)
    with ``cfg.strategy``. ``target_val``: labelled target rows (not test) whose accuracy is recorded each round;
    ``target_test_sha256``: the target test split's content, which the pool may not share (checked)."""
    if pool.empty:
        raise TlopsError(f"train.strategy {cfg.strategy} adapts to target images, but the run has none: set "
                         "data.target_uri to a folder or s3:// prefix of unlabelled images of the new domain")
    shared = set(pool["sha256"]) & set(target_test_sha256)
    if shared:
        raise TlopsError(f"{len(shared)} target image(s) given to adaptation are target test images "
                         f"(sha256 {sorted(shared)[0][:12]}...): adaptation may never see the target test split")
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    model = base.model.cpu()
    base_cfg = cfg.model_copy(update={"strategy": cfg.adaptation.base})
    source_key = run_key(backbone_name, spec, classes, manifest, base_cfg)
    key = adapt_key(source_key, pool, target_val, cfg)
    store = CheckpointStore(checkpoint_location(cfg, workdir, key, state_uri), Path(workdir) / "cache")
    acfg = adapt_config(cfg)
    train_paths, train_labels, _ = split_items(manifest, classes, "train")
    val_paths, val_labels, _ = split_items(manifest, classes, "val")
    t0 = time.perf_counter()
    xs, ys = _tensors(train_paths, spec), torch.tensor(train_labels, dtype=torch.long)
    xv, yv = _tensors(val_paths, spec), torch.tensor(val_labels, dtype=torch.long)
    xt = _tensors([str(p) for p in pool["path"]], spec)
    xtv, ytv = _tensors([str(p) for p in target_val["path"]], spec), _labels(target_val, classes)
    log.info("%s: %d source training images, %d target images to adapt to (%d labelled target for validation), "
             "decoded in %.1fs", cfg.strategy, len(xs), len(xt), len(xtv), time.perf_counter() - t0)

    source_only = module_state(model)  # the source model before adaptation: the gate's reference without champion
    done, history, resumed = 0, [], None
    fit_state: dict[str, Any] | None = None
    pseudo: list[str] = []  # content of the images pseudo-labelled in the last round
    if cfg.resume:
        store.sync_down()
        saved = store.load(ADAPT)
        if saved is not None:
            if saved.get("key") != key:
                raise TlopsError(f"checkpoint {store.dir / ADAPT} belongs to another run (data, target images or "
                                 "adaptation settings differ); point train.checkpoint_dir elsewhere or delete it")
            model.load_state_dict(saved["model"])
            set_rng_state(saved["rng"])
            done, history, resumed = int(saved["done"]), list(saved["history"]), int(saved["done"])
            fit_state = saved.get("fit_state")  # mcc stopped between two of its epochs
            log.info("resuming %s from %s: %d of %d %s done", cfg.strategy, store.location, done,
                     _units(cfg), {"self-training": "rounds", "mcc": "epochs"}.get(cfg.strategy, "phase"))
    last_epoch = max((int(h["epoch"]) for h in base.history), default=0)

    def record(unit: int, row: dict[str, float], fit_state: dict[str, Any] | None = None) -> None:
        row = {"epoch": last_epoch + unit, "adapt_unit": float(unit),
               "val_accuracy": accuracy(model, xv, yv) if len(xv) else float("nan"),
               **({"target_val_accuracy": accuracy(model, xtv, ytv)} if len(xtv) else {}), **row}
        history.append(row)
        store.save(ADAPT, {"key": key, "model": module_state(model), "rng": rng_state(), "done": unit,
                           "history": history, "strategy": cfg.strategy,
                           **({"fit_state": fit_state} if fit_state is not None else {})})
        log.info("%s %d/%d: source val accuracy %.4f%s", cfg.strategy, unit, _units(cfg), row["val_accuracy"],
                 f", target val accuracy {row['target_val_accuracy']:.4f}" if "target_val_accuracy" in row else "")

    while done < _units(cfg):
        unit = done + 1
        if cfg.strategy == "adabn":
            adabn(model, xt, acfg.batch_size)
            record(unit, {"adapt_images": float(len(xt))})
        elif cfg.strategy == "self-training":
            # One round of self_train per checkpoint; each round draws from its own seed.
            out = self_train(model, xs, ys, xt, dataclasses.replace(acfg, rounds=1, seed=acfg.seed + done),
                             pool_sha256=[str(s) for s in pool["sha256"]], test_sha256=target_test_sha256)
            losses = [h["loss"] for h in out.history]
            pseudo = [str(pool["sha256"].iloc[i]) for i in out.pseudo_labelled]
            record(unit, {"pseudo_labels": float(len(out.pseudo_labelled)),
                          "adapt_loss": losses[-1] if losses else float("nan")})
        else:
            # Every epoch is a checkpoint (the model, the optimizer, the schedule and the batch generator); the
            # last one is recorded once the target's BatchNorm statistics are in.
            def epoch_done(epoch: int, row: dict[str, float], state: dict[str, Any]) -> None:
                if epoch < _units(cfg):
                    model.eval()
                    record(epoch, {"adapt_loss": row["loss"]}, state)
                    model.train()

            out = mcc(model, xs, ys, xt, acfg, start=fit_state, on_epoch=epoch_done)
            unit = _units(cfg)
            record(unit, {"adapt_loss": out.history[-1]["loss"] if out.history else float("nan")})
        done = unit
    model.eval()
    final = history[-1] if history else {}
    env = dict(base.environment)
    env.update({"adaptation": cfg.strategy, "adaptation_base": base.strategy, "target_images": len(xt),
                "source_val_accuracy_before": base.best_val_accuracy,
                "adaptation_checkpoint_dir": store.location,
                **({"pseudo_labelled_sha256": pseudo} if cfg.strategy == "self-training" else {})})
    return FitResult(model=model, history=[*base.history, *history], best_epoch=base.best_epoch,
                     best_val_accuracy=float(final.get("val_accuracy", base.best_val_accuracy)),
                     strategy=cfg.strategy, environment=env, checkpoint_dir=store.location,
                     resumed_at_step=resumed, stopped_early=base.stopped_early, kept_over=base.kept_over,
                     source_only=source_only)


def _units(cfg: TrainConfig) -> int:
    """Checkpoints of the adaptation: self-training's rounds, mcc's epochs, adabn's one pass."""
    if cfg.strategy == "self-training":
        return cfg.adaptation.rounds
    return cfg.adaptation.epochs if cfg.strategy == "mcc" else 1

