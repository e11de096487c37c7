"""The gate's policy: a candidate against the absolute floors and the champion, to promote, reject or
needs-approval, with every reason (no registry call here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tlops.config.settings import GateConfig

log = logging.getLogger(__name__)

PASSING = ("promote", "needs-approval")


@dataclass
class Decision:
    decision: str  # "promote", "reject" or "needs-approval"
    reasons: list[str]
    compared_with: str | None = None  # champion version the candidate was measured against
    extra: dict[str, Any] = field(default_factory=dict)
    stale: bool = False  # the champion moved between the comparison and the decision

    @property
    def passed(self) -> bool:
        return self.decision in PASSING


@dataclass
class PreprocessEvidence:
    """What the run recorded about its preprocessing, as the gate needs it."""

    fingerprint: str
    reference_fingerprint: str
    declared: str  # declared differences from the reference, "none" when there are none

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> PreprocessEvidence:
        return cls(tags.get("preprocess.fingerprint", ""), tags.get("preprocess.reference_fingerprint", ""),
                   tags.get("preprocess.declared", "none"))

    def problem(self) -> str | None:
        if not self.fingerprint or not self.reference_fingerprint:
            return "no preprocessing fingerprint recorded"
        if self.fingerprint != self.reference_fingerprint and self.declared in ("", "none"):
            return (f"preprocessing fingerprint {self.fingerprint[:12]} differs from the backbone's reference "
                    f"{self.reference_fingerprint[:12]} with no declared override")
        return None






@dataclass
class _Checks:
    """The reasons so far, and whether every required check passed."""

    reasons: list[str] = field(default_factory=list)
    ok: bool = True

    def check(self, passed: bool, good: str, bad: str, required: bool = True) -> None:
        if passed:
            self.reasons.append(good)
        elif required:
            self.ok = False
            self.reasons.append(bad)
        else:
            self.reasons.append(f"{bad} (not required by the gate policy)")


def _evidence(c: _Checks, gate: GateConfig, validation_ok: bool, parity_ok: bool,
              preprocess: PreprocessEvidence | None) -> None:
    if preprocess is not None:
        problem = preprocess.problem()
        if problem:
            c.check(False, "", problem, gate.require_parity)
        elif preprocess.fingerprint == preprocess.reference_fingerprint:
            c.reasons.append("preprocessing is the backbone's reference")
        else:
            c.reasons.append(f"preprocessing differs from the reference as declared: {preprocess.declared}")
    c.check(validation_ok, "data validation passed", "data validation failed", gate.require_validation)
    c.check(parity_ok, "preprocessing parity passed", "preprocessing parity failed", gate.require_parity)


def _floors(c: _Checks, candidate: dict[str, Any], gate: GateConfig) -> None:
    acc = candidate["accuracy"]
    c.check(acc >= gate.min_accuracy, f"accuracy {acc:.4f} >= minimum {gate.min_accuracy:.4f}",
            f"accuracy {acc:.4f} < minimum {gate.min_accuracy:.4f}")
    if gate.min_class_recall > 0:
        worst = candidate.get("min_class_recall")
        if worst is None:
            c.check(False, "", "per-class recall was not measured")
        else:
            which = f" (class {candidate.get('min_recall_class', '?')})"
            c.check(worst >= gate.min_class_recall,
                    f"lowest class recall {worst:.4f}{which} >= minimum {gate.min_class_recall:.4f}",
                    f"lowest class recall {worst:.4f}{which} < minimum {gate.min_class_recall:.4f}")
    if gate.max_latency_p95_ms is not None:
        p95 = (candidate.get("latency") or {}).get("p95_ms")
        if p95 is None:
            c.check(False, "", "latency was not measured (evaluation.latency_images is 0)")
        else:
            c.check(p95 <= gate.max_latency_p95_ms,
                    f"latency p95 {p95:.1f} ms <= maximum {gate.max_latency_p95_ms:g} ms",
                    f"latency p95 {p95:.1f} ms > maximum {gate.max_latency_p95_ms:g} ms")
    if gate.max_model_size_mb is not None:
        size = candidate.get("model_size_bytes")
        if size is None:
            c.check(False, "", "model size was not measured")
        else:
            c.check(size / 1e6 <= gate.max_model_size_mb,
                    f"weights {size / 1e6:.2f} MB <= maximum {gate.max_model_size_mb:g} MB",
                    f"weights {size / 1e6:.2f} MB > maximum {gate.max_model_size_mb:g} MB")


def _against_champion(c: _Checks, acc: float, champion: dict[str, Any], gate: GateConfig,
                      comparison: dict[str, Any] | None) -> str:
    """The regression allowance and, when the policy asks, a significant improvement; the champion's version."""
    compared_with = str(champion["version"])
    gain = acc - champion["accuracy"]
    what = f"champion version {compared_with} accuracy {champion['accuracy']:.4f} on the same test set"
    c.check(acc >= champion["accuracy"] - gate.max_regression,
            f"not worse than {what} (allowed regression {gate.max_regression:.4f})",
            f"worse than {what} by {-gain:.4f} (allowed regression {gate.max_regression:.4f})")
    stats = ""
    if comparison is not None:
        stats = (f"{comparison['confidence']:.0%} paired bootstrap CI [{comparison['ci_low']:+.4f}, "
                 f"{comparison['ci_high']:+.4f}], McNemar p={comparison['mcnemar_p']:.3f}")
    if gate.min_improvement is not None:
        if comparison is None:
            c.check(False, "", "a significant improvement is required but no paired comparison was recorded")
        else:
            significant = gain >= gate.min_improvement and comparison["ci_low"] > 0
            c.check(significant,
                    f"improves on champion version {compared_with} by {gain:+.4f} (at least "
                    f"{gate.min_improvement:+.4f} required), {stats} above zero",
                    f"no significant improvement on champion version {compared_with}: {gain:+.4f} (at least "
                    f"{gate.min_improvement:+.4f} with the interval above zero required), {stats}")
    elif stats:
        c.reasons.append(f"accuracy difference {gain:+.4f}, {stats}")
    return compared_with


def _source_regression(c: _Checks, domains: dict[str, Any], gate: GateConfig) -> None:
    """With a target test split (``domains``, the evaluate step's): the candidate may lose at most
    ``gate.max_source_regression`` accuracy on the source test split against the champion, or, with none, against
    the source-only model the adaptation started from."""
    source = domains.get("source") or {}
    cand = (source.get("candidate") or {}).get("accuracy")
    if source.get("champion"):
        ref, what = source["champion"]["accuracy"], f"champion version {source['champion'].get('version', '?')}"
    elif source.get("source_only"):
        ref, what = source["source_only"]["accuracy"], "the source-only model"
    else:
        c.reasons.append("no champion and no source-only model: the source test split is reported, not compared")
        return
    if cand is None:
        c.check(False, "", "the source test split was not scored")
        return
    loss = ref - cand
    c.check(loss <= gate.max_source_regression + 1e-12,
            f"source test accuracy {cand:.4f} against {what}'s {ref:.4f}: {cand - ref:+.4f} (at most "
            f"{gate.max_source_regression:.4f} loss allowed)",
            f"source test accuracy {cand:.4f} loses {loss:.4f} against {what}'s {ref:.4f}, more than "
            f"gate.max_source_regression {gate.max_source_regression:.4f}")


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, gate: GateConfig,
           validation_ok: bool, parity_ok: bool, preprocess: PreprocessEvidence | None = None,
           comparison: dict[str, Any] | None = None, domains: dict[str, Any] | None = None) -> Decision:
    """Every check of the policy must pass; the reasons list says what passed and what did not.

    ``candidate``/``champion`` are the evaluation's records (``accuracy`` at least; ``min_class_recall``,
    ``latency`` and ``model_size_bytes`` when the policy limits them); ``comparison`` is the paired
    bootstrap record. With ``domains`` (a labelled target test split) ``candidate``/``champion`` are the target's,
    and the source test split is held to ``gate.max_source_regression``. A passing candidate is ``promote`` in auto
    mode and ``needs-approval`` in manual mode.
    """
    c = _Checks()
    _evidence(c, gate, validation_ok, parity_ok, preprocess)
    _floors(c, candidate, gate)
    compared_with = None
    if champion is None:
        c.reasons.append("no champion yet: absolute thresholds only")
    else:
        compared_with = _against_champion(c, candidate["accuracy"], champion, gate, comparison)
    if domains:
        _source_regression(c, domains, gate)
    decision = "reject"
    if c.ok:
        decision = "promote" if gate.mode == "auto" else "needs-approval"
        if gate.mode == "manual":
            c.reasons.append("manual mode: every check passed; the version becomes the challenger and waits "
                             "for a person's approval")
    return Decision(decision, c.reasons, compared_with, {"mode": gate.mode, "policy": gate.policy_source})
