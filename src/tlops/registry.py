"""The registry gate: register every candidate, decide, and move the ``champion`` alias only on promote."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tlops.config import GateConfig
from tlops.errors import TlopsError

CHAMPION = "champion"


@dataclass
class Decision:
    decision: str  # "promote" or "reject"
    reasons: list[str]
    compared_with: str | None = None  # champion version the candidate was measured against
    extra: dict[str, Any] = field(default_factory=dict)


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


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, gate: GateConfig,
           validation_ok: bool, parity_ok: bool, preprocess: PreprocessEvidence | None = None) -> Decision:
    """Every gate must pass to promote; the reasons list says what passed and what did not."""
    reasons: list[str] = []
    ok = True
    if preprocess is not None:
        problem = preprocess.problem()
        if problem:
            ok = False
            reasons.append(problem)
        elif preprocess.fingerprint == preprocess.reference_fingerprint:
            reasons.append("preprocessing is the backbone's reference")
        else:
            reasons.append(f"preprocessing differs from the reference as declared: {preprocess.declared}")
    if validation_ok:
        reasons.append("data validation passed")
    else:
        ok = False
        reasons.append("data validation failed")
    if parity_ok:
        reasons.append("preprocessing parity passed")
    else:
        ok = False
        reasons.append("preprocessing parity failed")
    acc = candidate["accuracy"]
    if acc >= gate.min_accuracy:
        reasons.append(f"accuracy {acc:.4f} >= minimum {gate.min_accuracy:.4f}")
    else:
        ok = False
        reasons.append(f"accuracy {acc:.4f} < minimum {gate.min_accuracy:.4f}")
    compared_with = None
    if champion is None:
        reasons.append("no champion yet: absolute thresholds only")
    else:
        compared_with = str(champion["version"])
        floor = champion["accuracy"] - gate.max_regression
        what = f"champion version {compared_with} accuracy {champion['accuracy']:.4f} on the same test set"
        if acc >= floor:
            reasons.append(f"not worse than {what} (allowed regression {gate.max_regression:.4f})")
        else:
            ok = False
            reasons.append(f"worse than {what} by {champion['accuracy'] - acc:.4f} "
                           f"(allowed regression {gate.max_regression:.4f})")
    return Decision("promote" if ok else "reject", reasons, compared_with)


def client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def champion_version(name: str) -> Any | None:
    """The version the ``champion`` alias points at, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def register(model_uri: str, name: str, tags: dict[str, str]) -> Any:
    import mlflow

    return mlflow.register_model(model_uri, name, tags=tags)


def apply_decision(name: str, version: str, decision: Decision) -> Decision:
    """Move ``champion`` on promote, unless another run moved it since this one compared against it."""
    c = client()
    if decision.decision == "promote":
        current = champion_version(name)
        current_v = None if current is None else str(current.version)
        if current_v != decision.compared_with:
            decision = Decision(
                "reject",
                [*decision.reasons,
                 f"champion moved from version {decision.compared_with} to {current_v} during this run; "
                 "the comparison is stale, re-run to compare against the new champion"],
                decision.compared_with,
            )
        else:
            c.set_registered_model_alias(name, CHAMPION, version)
    c.set_model_version_tag(name, version, "gate.decision", decision.decision)
    c.set_model_version_tag(name, version, "gate.reasons", "; ".join(decision.reasons)[:4900])
    c.set_model_version_tag(name, version, "gate.compared_with", decision.compared_with or "none")
    return decision


def require_model(name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().get_registered_model(name)
    except MlflowException:
        raise TlopsError(f"registered model {name!r} does not exist in the MLflow registry") from None
