"""What each registered version carries for an audit: the evidence tags (where it came from, what was measured)
and the gate's decision as its description."""

from __future__ import annotations

import logging
from typing import Any

from tlops.registry.policy import Decision
from tlops.registry.store import client, code_version

log = logging.getLogger(__name__)

def evidence_tags(run_tags: dict[str, str], evaluation: dict[str, Any], backbone: str, run_id: str,
                  config_hash: str) -> dict[str, str]:
    """The tags every registered version carries: where it came from and what was measured."""
    cand = evaluation["candidate"]
    tags = {
        "preprocess.fingerprint": run_tags.get("preprocess.fingerprint", ""),
        "preprocess.reference_fingerprint": run_tags.get("preprocess.reference_fingerprint", ""),
        "parity": run_tags.get("parity", "unknown"),
        "parity.serving": run_tags.get("parity.serving", "unknown"),
        "preprocess.declared": run_tags.get("preprocess.declared", "none"),
        "validation": run_tags.get("validation", "unknown"),
        "data.manifest_hash": run_tags.get("data.manifest_hash", ""),
        "config.hash": run_tags.get("config.hash") or config_hash,
        "git.commit": code_version(),
        "backbone": backbone,
        "test_accuracy": f"{cand['accuracy']:.6f}",
        "test_macro_f1": f"{cand['macro_f1']:.6f}",
        "mlflow.run_id": run_id,
        "tlops.pipeline_run": run_tags.get("tlops.pipeline_run", ""),
    }
    if "min_class_recall" in cand:
        tags["test_min_class_recall"] = f"{cand['min_class_recall']:.6f}"
    if "ece" in cand:
        tags["test_ece"] = f"{cand['ece']:.6f}"
    for k, v in (cand.get("top_k") or {}).items():
        tags[f"test_{k}"] = f"{v:.6f}"
    if (cand.get("latency") or {}).get("p95_ms") is not None:
        tags["latency_p50_ms"] = f"{cand['latency']['p50_ms']:.3f}"
        tags["latency_p95_ms"] = f"{cand['latency']['p95_ms']:.3f}"
    if cand.get("model_size_bytes") is not None:
        tags["model_size_bytes"] = str(int(cand["model_size_bytes"]))
    comp = evaluation.get("comparison")
    if comp:
        tags["comparison.accuracy_difference"] = f"{comp['difference']:+.6f}"
        tags["comparison.ci"] = f"[{comp['ci_low']:+.6f}, {comp['ci_high']:+.6f}] at {comp['confidence']:g}"
        tags["comparison.mcnemar_p"] = f"{comp['mcnemar_p']:.6f}"
    return tags




DESCRIPTION_LIMIT = 4900  # MLflow's SQL stores hold 5000 characters per model version description


def describe(decision: Decision, notes: list[str] | None = None) -> str:
    """The version's description: the gate's decision as a heading, then each reason, then ``notes`` (where the
    evidence is). Markdown, as the MLflow UI renders it."""
    head = {"promote": "PROMOTE", "reject": "REJECT", "needs-approval": "NEEDS APPROVAL"}.get(
        decision.decision, decision.decision.upper())
    against = (f"compared with champion version {decision.compared_with}" if decision.compared_with
               else "no champion to compare with")
    lines = [f"**Gate: {head}** ({against}; {decision.extra.get('mode', 'auto')} mode)"
             + (", stale comparison" if decision.stale else ""), ""]
    lines += [f"- {r}" for r in decision.reasons]
    if notes:
        lines += ["", *notes]
    text = "\n".join(lines)
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


def add_to_description(name: str, version: str, line: str) -> None:
    c = client()
    old = c.get_model_version(name, version).description or ""
    text = f"{old}\n\n{line}" if old else line
    c.update_model_version(name, version, description=text[-DESCRIPTION_LIMIT:])
