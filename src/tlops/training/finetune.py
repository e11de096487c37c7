"""The fine-tune step's entry: the training mode chosen from the config and the environment.

The linear probe on cached features; a gradient strategy in this process, on ``train.processes`` DDP workers
spawned here, or as one rank of a group ``torchrun`` (or a PyTorchJob) started. It sits above both the loop
(:mod:`tlops.training.loop`) and DDP (:mod:`tlops.training.ddp`), which never import it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from tlops.config.settings import DEFAULT_EPOCHS, TrainConfig
from tlops.training import ddp
from tlops.training.loop import train_gradient
from tlops.training.probe import linear_probe
from tlops.training.state import FitResult, checkpoint_location, run_key
from tlops.vision.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)


def fine_tune(backbone_name: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec,
              cfg: TrainConfig, workdir: str | Path = ".tlops", state_uri: str | None = None,
              target: pd.DataFrame | None = None, target_val: pd.DataFrame | None = None,
              target_test_sha256: list[str] | None = None) -> FitResult:
    """Train with ``cfg.strategy``: the entry point of the fine-tune step.

    With ``state_uri`` the feature cache and the checkpoints live there (as well as in ``workdir``), so a step
    that runs again on a fresh disk resumes. An adaptation strategy (adabn, self-training, mcc) trains the source
    model with ``train.adaptation.base`` first, then adapts it to ``target`` (the target pool, rows with ``path``;
    ``target_val``: labelled target rows for validation; ``target_test_sha256``: content the pool may not hold)."""
    if cfg.is_adaptation:
        from tlops.errors import TlopsError
        from tlops.training.adapt_run import adapt_source_model

        if ddp.launched_by_torchrun():  # every rank would adapt and write adapt.pt on its own
            raise TlopsError(f"train.strategy {cfg.strategy} does not run under torchrun (its adaptation phase is one "
                             "process); use train.processes for DDP on one machine")

        base_cfg = cfg.model_copy(update={"strategy": cfg.adaptation.base})
        if base_cfg.strategy == "linear-probe":  # L-BFGS iterations, not the gradient epochs of train.epochs
            base_cfg = base_cfg.model_copy(update={"epochs": DEFAULT_EPOCHS["linear-probe"]})
        base = fine_tune(backbone_name, manifest, classes, spec, base_cfg, workdir, state_uri)
        empty = pd.DataFrame(columns=["sha256", "label", "path"])
        return adapt_source_model(base, backbone_name, manifest, classes, spec, cfg,
                                  target if target is not None else empty,
                                  target_val if target_val is not None else empty, list(target_test_sha256 or []),
                                  workdir, state_uri)
    cache_dir = Path(workdir) / "cache" / "features" if cfg.feature_cache else None
    remote = f"{state_uri.rstrip('/')}/features" if state_uri else None
    if cfg.strategy == "linear-probe":
        return linear_probe(backbone_name, manifest, classes, spec, cfg, cache_dir=cache_dir, cache_remote=remote)
    probe = None
    if cfg.starts_from_probe:  # LP-FT: the probe first (from the feature cache), its head the starting point
        probe = linear_probe(backbone_name, manifest, classes, spec, cfg.model_copy(update={
            "strategy": "linear-probe", "epochs": DEFAULT_EPOCHS["linear-probe"]}),
            cache_dir=cache_dir, cache_remote=remote)
        log.info("%s starts from the linear probe's head (validation accuracy %.4f)", cfg.strategy,
                 probe.best_val_accuracy)
    head = {k: v.detach().clone() for k, v in probe.model.head.state_dict().items()} if probe else None
    if state_uri and not cfg.checkpoint_dir:
        # checkpoint_dir is a runtime field: the key (and so the checkpoint's identity) does not change.
        key = run_key(backbone_name, spec, classes, manifest, cfg)
        cfg = cfg.model_copy(update={"checkpoint_dir": checkpoint_location(cfg, workdir, key, state_uri)})

    if ddp.launched_by_torchrun():
        result = ddp.fit_under_torchrun(backbone_name, manifest, classes, spec, cfg, workdir, head)
    elif cfg.processes > 1:
        result = ddp.spawn_fit(backbone_name, manifest, classes, spec, cfg, workdir, cfg.processes, head)
    else:
        result = train_gradient(backbone_name, manifest, classes, spec, cfg, workdir, head=head)
    if probe is None:
        return result
    result.environment["probe_val_accuracy"] = probe.best_val_accuracy
    if cfg.keep_better_probe and result.best_val_accuracy < probe.best_val_accuracy:
        log.warning("%s: best validation accuracy %.4f is below the linear probe's %.4f; the probe's model is kept "
                    "(train.keep_better_probe: false keeps the fine-tuned one)", cfg.strategy,
                    result.best_val_accuracy, probe.best_val_accuracy)
        probe.environment.update(result.environment)
        probe.kept_over = cfg.strategy
        return probe
    return result
