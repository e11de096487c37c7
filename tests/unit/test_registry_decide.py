from tlops.config.settings import GateConfig
from tlops.registry import decide

GATE = GateConfig(min_accuracy=0.9, max_regression=0.01)


def test_first_model_promoted_on_absolute_threshold() -> None:
    d = decide({"accuracy": 0.95}, None, GATE, True, True)
    assert d.decision == "promote" and d.compared_with is None
    assert any("no champion yet" in r for r in d.reasons)


def test_below_minimum_rejected() -> None:
    d = decide({"accuracy": 0.8}, None, GATE, True, True)
    assert d.decision == "reject" and any("< minimum" in r for r in d.reasons)


def test_regression_beyond_allowance_rejected_and_names_the_champion() -> None:
    d = decide({"accuracy": 0.93}, {"version": "3", "accuracy": 0.95}, GATE, True, True)
    assert d.decision == "reject" and d.compared_with == "3"
    assert any("worse than champion version 3" in r for r in d.reasons)
    assert decide({"accuracy": 0.945}, {"version": "3", "accuracy": 0.95}, GATE, True, True).decision == "promote"


def test_failed_validation_or_parity_blocks_promotion() -> None:
    assert decide({"accuracy": 0.99}, None, GATE, False, True).decision == "reject"
    assert decide({"accuracy": 0.99}, None, GATE, True, False).decision == "reject"


def test_fingerprint_off_reference_needs_a_declared_override() -> None:
    from tlops.registry import PreprocessEvidence

    same = PreprocessEvidence("a" * 64, "a" * 64, "none")
    undeclared = PreprocessEvidence("b" * 64, "a" * 64, "none")
    declared = PreprocessEvidence("b" * 64, "a" * 64, "crop_size: 224 -> 96")
    assert decide({"accuracy": 0.99}, None, GATE, True, True, same).decision == "promote"
    refused = decide({"accuracy": 0.99}, None, GATE, True, True, undeclared)
    assert refused.decision == "reject" and "no declared override" in refused.reasons[0]
    assert decide({"accuracy": 0.99}, None, GATE, True, True, declared).decision == "promote"
    assert decide({"accuracy": 0.99}, None, GATE, True, True, PreprocessEvidence("", "", "none")).decision == "reject"
