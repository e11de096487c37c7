"""The gate policy: every rule of GateConfig through decide(), and the policy as a YAML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlops.config.settings import Config, GateConfig, load_config
from tlops.errors import TlopsError
from tlops.registry import decide

CAND = {"accuracy": 0.95, "min_class_recall": 0.8, "min_recall_class": "8",
        "latency": {"p50_ms": 4.0, "p95_ms": 6.0}, "model_size_bytes": 13_700_000}
CHAMP = {"version": "4", "accuracy": 0.93}
SIGNIFICANT = {"difference": 0.02, "ci_low": 0.005, "ci_high": 0.035, "confidence": 0.95, "mcnemar_p": 0.01}
NOT_SIGNIFICANT = {"difference": 0.02, "ci_low": -0.01, "ci_high": 0.05, "confidence": 0.95, "mcnemar_p": 0.3}


def test_defaults_keep_the_old_behaviour() -> None:
    d = decide(CAND, CHAMP, GateConfig(), True, True, comparison=SIGNIFICANT)
    assert d.decision == "promote" and d.compared_with == "4"
    assert any(r.startswith("not worse than champion version 4") for r in d.reasons)
    assert any(r.startswith("accuracy difference +0.0200, 95% paired bootstrap CI [+0.0050, +0.0350]")
               for r in d.reasons)
    assert d.extra == {"mode": "auto", "policy": "config"}


def test_manual_mode_turns_a_pass_into_needs_approval_but_not_a_fail() -> None:
    manual = GateConfig(mode="manual")
    d = decide(CAND, CHAMP, manual, True, True)
    assert d.decision == "needs-approval" and d.passed and "manual mode" in d.reasons[-1]
    assert decide({**CAND, "accuracy": 0.5}, CHAMP, manual, True, True).decision == "reject"


def test_lowest_class_recall_has_a_floor() -> None:
    d = decide(CAND, None, GateConfig(min_class_recall=0.85), True, True)
    assert d.decision == "reject" and "lowest class recall 0.8000 (class 8) < minimum 0.8500" in d.reasons
    assert decide(CAND, None, GateConfig(min_class_recall=0.8), True, True).decision == "promote"
    unmeasured = decide({"accuracy": 0.99}, None, GateConfig(min_class_recall=0.5), True, True)
    assert unmeasured.decision == "reject" and "per-class recall was not measured" in unmeasured.reasons


def test_latency_and_size_limits() -> None:
    assert decide(CAND, None, GateConfig(max_latency_p95_ms=6.0, max_model_size_mb=14), True, True).passed
    slow = decide(CAND, None, GateConfig(max_latency_p95_ms=5.0), True, True)
    assert slow.decision == "reject" and "latency p95 6.0 ms > maximum 5 ms" in slow.reasons
    big = decide(CAND, None, GateConfig(max_model_size_mb=10), True, True)
    assert big.decision == "reject" and "weights 13.70 MB > maximum 10 MB" in big.reasons
    untimed = decide({**CAND, "latency": {"p95_ms": None}}, None, GateConfig(max_latency_p95_ms=50), True, True)
    assert untimed.decision == "reject" and any("not measured" in r for r in untimed.reasons)


def test_minimum_significant_improvement() -> None:
    gate = GateConfig(min_improvement=0.01)
    assert decide(CAND, CHAMP, gate, True, True, comparison=SIGNIFICANT).decision == "promote"
    noisy = decide(CAND, CHAMP, gate, True, True, comparison=NOT_SIGNIFICANT)
    assert noisy.decision == "reject" and any(r.startswith("no significant improvement") for r in noisy.reasons)
    small = decide(CAND, CHAMP, GateConfig(min_improvement=0.05), True, True, comparison=SIGNIFICANT)
    assert small.decision == "reject"
    assert decide(CAND, CHAMP, gate, True, True).decision == "reject"  # no comparison recorded
    # With no champion the improvement rule has nothing to compare with: absolute thresholds only.
    assert decide(CAND, None, gate, True, True).decision == "promote"


def test_required_passes_can_be_waived_and_say_so() -> None:
    lax = GateConfig(require_validation=False)
    d = decide(CAND, None, lax, False, True)
    assert d.decision == "promote" and "data validation failed (not required by the gate policy)" in d.reasons
    assert decide(CAND, None, lax, True, False).decision == "reject"  # parity is still required


def test_policy_file_with_overrides_from_the_config(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: manual\nmin_accuracy: 0.97\nmin_class_recall: 0.9\nmax_latency_p95_ms: 50\n")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"gate:\n  policy_file: {policy}\n  min_accuracy: 0.95\n")
    cfg = load_config(cfg_file, ["gate.max_model_size_mb=20"])
    g = cfg.gate
    assert (g.mode, g.min_accuracy, g.min_class_recall, g.max_latency_p95_ms, g.max_model_size_mb) == (
        "manual", 0.95, 0.9, 50, 20)  # the config section wins over the file
    assert g.policy_file is None and str(policy.resolve()) in g.policy_source and "sha256" in g.policy_source
    # The resolved policy travels with the run: a step re-reading the config never needs the file.
    policy.unlink()
    assert Config.from_json(cfg.to_json()).gate == g


@pytest.mark.parametrize(("text", "message"), [
    (None, "does not exist"),
    ("- a list\n", "must hold a mapping"),
    ("min_accuracy: 2\n", "min_accuracy"),
    ("mode: sometimes\n", "mode"),
    ("max_latency: 5\n", "max_latency"),
])
def test_bad_policy_file_names_the_problem(tmp_path: Path, text: str | None, message: str) -> None:
    policy = tmp_path / "policy.yaml"
    if text is not None:
        policy.write_text(text)
    with pytest.raises(TlopsError, match=message):
        load_config(None, [f"gate.policy_file={policy}"])
