"""The validate step's decisions, shared by the pipeline step and ``tlops validate``: the data checks against
their reference (a manifest CSV or the champion's), ``backbone: auto`` and ``train.strategy: auto``, feature drift
against the champion and whether to skip training.

The algorithms it calls (:mod:`tlops.selection.ranking`, :mod:`tlops.selection.similarity`,
:mod:`tlops.selection.drift`) never call back into it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from tlops.config.settings import Config
from tlops.data.discovery import build_manifest, read_manifest
from tlops.data.validation import MANIFEST_ARTIFACT, ValidationReport, validate_manifest
from tlops.errors import TlopsError
from tlops.selection.ranking import (
    REASON_TAG,
    SELECTED_TAG,
    STRATEGY_TAG,
    choose,
    log_ranking,
    score_candidates,
    stratified_sample,
)

log = logging.getLogger(__name__)


def load_reference(cfg: Config) -> tuple[pd.DataFrame | None, str]:
    """The previously accepted manifest for the drift checks, and where it came from.

    ``validation.reference_manifest`` is a CSV path, or ``champion``: the manifest logged by the run
    that produced the current champion model (none yet: no drift checks, said in the log).
    """
    ref = cfg.validation.reference_manifest
    if not ref:
        return None, ""
    if ref != "champion":
        path = Path(ref)
        if not path.is_file():
            raise TlopsError(f"validation.reference_manifest {ref} does not exist: pass a manifest CSV written "
                             "by an earlier validation, or 'champion'")
        return read_manifest(path), str(path)
    import mlflow
    from mlflow.exceptions import MlflowException

    from tlops import registry, tracking

    tracking.setup(cfg)
    champ = registry.champion_version(cfg.registry.model_name)
    if champ is None or not champ.run_id:
        log.info("validate: no champion for %s yet; drift checks skipped", cfg.registry.model_name)
        return None, ""
    where = f"champion {cfg.registry.model_name} version {champ.version}"
    try:
        local = mlflow.artifacts.download_artifacts(run_id=champ.run_id, artifact_path=MANIFEST_ARTIFACT)
    except (MlflowException, OSError) as exc:
        log.warning("validate: %s has no %s (%s); drift checks skipped", where, MANIFEST_ARTIFACT,
                    type(exc).__name__)
        return None, ""
    return read_manifest(local), where


def validate_data(data_uri: str, cfg: Config, docs_dir: str | Path | None = None) -> tuple[pd.DataFrame,
                                                                                          ValidationReport]:
    """Build the manifest of ``data_uri`` and run the suite on it: (full manifest, report)."""
    manifest = build_manifest(data_uri, Path(cfg.workdir) / "cache", cfg.data.val_fraction,
                              cfg.data.test_fraction, cfg.data.split_salt, max_pixels=cfg.validation.max_pixels,
                              workers=cfg.data.manifest_workers, use_cache=cfg.data.manifest_cache,
                              stratified=cfg.data.split == "stratified")
    if manifest.empty:  # nothing to check is no pass
        raise TlopsError(f"no files to validate in {data_uri}")
    from tlops.progress import phase

    reference, source = load_reference(cfg)
    if source:
        log.info("validate: drift measured against %s", source)
    phase(f"running the data checks (Great Expectations) on {len(manifest)} files")
    return manifest, validate_manifest(manifest, cfg.validation, reference, docs_dir)


def resolve_strategy(train: Any, strategy: str) -> Any:
    """``train`` with the strategy auto chose; an unset epochs takes that strategy's default."""
    from tlops.config.settings import DEFAULT_EPOCHS

    update: dict[str, Any] = {"strategy": strategy, "epochs_unset": False}
    if train.epochs_unset:
        update["epochs"] = DEFAULT_EPOCHS["linear-probe" if strategy == "linear-probe" else "gradient"]
    return train.model_copy(update=update)


def needs_plan(cfg: Config) -> bool:
    return (cfg.backbone == "auto" or cfg.train.strategy == "auto" or cfg.selection.drift
            or cfg.selection.skip_when != "never")


def plan_run(cfg: Config, manifest: pd.DataFrame, target: pd.DataFrame | None = None) -> dict[str, Any]:
    """The validate step's choices, recorded in the active MLflow run: ``backbone: auto``, ``train.strategy:
    auto``, feature drift against the champion and whether to skip training. Returns what was decided.

    With target data (``target``, the validate step's target manifest), ``auto`` picks an adaptation strategy
    (:func:`tlops.selection.domain.choose_adaptation`) on top of the source strategy the similarity recommends."""
    import mlflow

    plan: dict[str, Any] = {"backbone": cfg.backbone, "strategy": cfg.train.strategy}
    if not needs_plan(cfg):
        return plan
    if cfg.backbone == "auto":
        scores = score_candidates(cfg, stratified_sample(manifest, cfg.selection.sample, cfg.selection.seed),
                                  cfg.selection.candidates)
        log_ranking(scores)
        plan["backbone"], why = choose(scores, cfg.selection)
        mlflow.set_tags({SELECTED_TAG: plan["backbone"], REASON_TAG: why[:5000]})
        mlflow.log_param("backbone.selected", plan["backbone"])
        log.info("backbone auto: %s", why)
    cfg = cfg.model_copy(update={"backbone": plan["backbone"]})
    if cfg.train.strategy == "auto":
        from tlops.selection.similarity import task_similarity

        sim = task_similarity(cfg, manifest)
        plan["strategy"] = sim.strategy
        sim.log_to_mlflow()
        if target is not None and not target.empty:
            from tlops.selection.domain import choose_adaptation, labelled_per_class

            plan["strategy"], why = choose_adaptation(sim.verdict, sim.strategy, labelled_per_class(target))
            plan["adaptation_base"] = sim.strategy
            plan["adaptation_why"] = why
            mlflow.set_tag("adaptation.why", why[:5000])
            log.info("strategy auto: %s", why)
        mlflow.set_tag(STRATEGY_TAG, plan["strategy"])
        mlflow.log_param("train.strategy.selected", plan["strategy"])
        log.info("strategy auto: %s", sim.why)
    if cfg.selection.drift or cfg.selection.skip_when != "never":
        from tlops.selection.drift import decide_skip

        plan.update(decide_skip(cfg, manifest))
    return plan


def resolved_config(cfg: Config, choices: dict[str, Any]) -> Config:
    """The config with what ``plan_run`` chose in place of ``auto``: what every later step runs with."""
    update: dict[str, Any] = {}
    if cfg.backbone == "auto":
        update["backbone"] = choices["backbone"]
    if cfg.train.strategy == "auto":
        update["train"] = resolve_strategy(cfg.train, choices["strategy"])
        if choices.get("adaptation_base"):
            update["train"] = update["train"].model_copy(update={"adaptation": update["train"].adaptation.model_copy(
                update={"base": choices["adaptation_base"]})})
    return cfg.model_copy(update=update)
