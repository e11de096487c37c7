"""The validate step's part of domain adaptation: the target data's manifest and checks, and what ``auto`` picks.

The target images (``data.target_uri``, ``data.target_labelled_uri``) are checked like the source: every file
decodable, and no leakage between the three sets a run keeps apart, source (every split), target-train (the
unlabelled images and the labelled set's train and val) and target-test (the labelled set's test split): the same
content in two of them fails validation, naming the files. A labelled target set whose classes are not the
source's is a user error (exit 2) before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from tlops.config.settings import ADAPTATION_STRATEGIES, Config
from tlops.data.discovery import class_names
from tlops.data.target import (
    LABELLED,
    TARGET,
    build_target_manifest,
    check_target_classes,
    cross_domain_leakage,
    labelled,
)
from tlops.data.validation import CheckResult, ValidationReport

log = logging.getLogger(__name__)

# auto with target data: labelled target images per class (train and val of data.target_labelled_uri) from which
# self-training's pseudo-labels are preferred to MCC (enough labels to check them on).
SELF_TRAINING_MIN_LABELS = 5


def _decodable(target: pd.DataFrame) -> CheckResult:
    bad = target[~target["decodable"].astype(bool)]
    if bad.empty:
        return CheckResult("target_decodable", True, "error", f"all {len(target)} target images decode")
    shown = "; ".join(f"{u} ({e})" for u, e in zip(bad["uri"][:5], bad["error"][:5], strict=True))
    return CheckResult("target_decodable", False, "error",
                       f"{len(bad)} target file(s) cannot be read as images: {shown}", files=list(bad["uri"]))


def _roles(source: pd.DataFrame, target: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(role, rows): source, target-train, target-test: the three sets no content may be in twice."""
    lab = target[target["domain"] == LABELLED]
    train = pd.concat([target[target["domain"] == TARGET], lab[lab["split"] != "test"]])
    return [("source", source), ("target-train", train), ("target-test", lab[lab["split"] == "test"])]


def domain_overlap(source: pd.DataFrame, target: pd.DataFrame) -> CheckResult:
    """The same content (sha256) in two of source, target-train and target-test: an error naming the files."""
    roles = [(name, rows[rows["sha256"].fillna("").ne("")]) for name, rows in _roles(source, target)]
    found: list[str] = []
    files: list[str] = []
    for i, (name, rows) in enumerate(roles):
        by_sha = dict(zip(rows["sha256"], rows["uri"], strict=False))
        for other, others in roles[i + 1:]:
            for sha, uri in zip(others["sha256"], others["uri"], strict=True):
                if sha in by_sha:
                    files.append(str(uri))
                    found.append(f"{by_sha[sha]} ({name}) = {uri} ({other})")
    if not found:
        return CheckResult("domain_overlap", True, "error", "source, target-train and target-test share no image")
    shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
    return CheckResult("domain_overlap", False, "error",
                       f"{len(found)} image(s) in two of source, target-train, target-test: {shown}", files=files)


def validate_target(cfg: Config, source: pd.DataFrame, report: ValidationReport) -> tuple[pd.DataFrame,
                                                                                        ValidationReport]:
    """The target manifest (empty without target data) and the report with the target checks added.

    Raises (exit 2, nothing written yet) for a target URI with no images and for labelled target classes that
    are not the source's."""
    target = build_target_manifest(cfg, Path(cfg.workdir) / "cache")
    if target.empty:
        return target, report
    lab = labelled(target)
    if not lab.empty:
        check_target_classes(class_names(source), lab, f"data.target_labelled_uri {cfg.data.target_labelled_uri}")
    checks = [_decodable(target), domain_overlap(source, target),
              cross_domain_leakage(source, target[target["domain"] == TARGET],
                                   target[target["domain"] == LABELLED])]
    counts = target.groupby(["domain", "split"]).size().to_dict()
    log.info("validate: target images %s", ", ".join(f"{d}/{s} {n}" for (d, s), n in sorted(counts.items())))
    report = dataclasses.replace(report, checks=[*report.checks, *checks],
                                 success=report.success and not any(c.status == "FAIL" for c in checks))
    return target, report


def labelled_per_class(target: pd.DataFrame) -> float:
    """Median labelled target images per class in the labelled set's train and val splits (0 without any)."""
    rows = labelled(target)
    rows = rows[rows["split"] != "test"]
    return float(rows["label"].value_counts().median()) if not rows.empty else 0.0


def choose_adaptation(verdict: str, base: str, per_class: float) -> tuple[str, str]:
    """(strategy, why) for ``auto`` with target data, from the task-similarity verdict (and the source strategy it
    recommends, ``base``) and the labelled target images per class.

    - the source task is close to ImageNet (verdict ``close``): the features transfer, what shifts is their
      statistics: ``adabn`` (no gradient step);
    - otherwise, with at least SELF_TRAINING_MIN_LABELS labelled target images per class to check pseudo-labels
      on: ``self-training``;
    - otherwise ``mcc`` (fine-tuning with the class-confusion loss, needing no target label)."""
    if verdict == "close":
        strategy, because = "adabn", "the images are close to the backbone's pre-training, so re-estimating the " \
                                     "BatchNorm statistics on the target is the adaptation that fits"
    elif per_class >= SELF_TRAINING_MIN_LABELS:
        strategy, because = "self-training", (f"{per_class:.0f} labelled target images per class (at least "
                                              f"{SELF_TRAINING_MIN_LABELS}) validate confident pseudo-labels")
    else:
        strategy, because = "mcc", (f"{per_class:.0f} labelled target images per class (fewer than "
                                    f"{SELF_TRAINING_MIN_LABELS}): class-confusion minimisation needs no target "
                                    "label")
    assert strategy in ADAPTATION_STRATEGIES
    return strategy, f"target data given; task similarity {verdict}, source model by {base}; {strategy}: {because}"


def target_summary(target: pd.DataFrame) -> dict[str, Any]:
    """Counts for the run's metrics and the summary."""
    lab = labelled(target)
    return {"target_images": int((target["domain"] == TARGET).sum()),
            **{f"target_labelled_{s}": int((lab["split"] == s).sum()) for s in ("train", "val", "test")}}
