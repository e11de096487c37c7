"""The retraining story, four scheduled cycles end to end (slow: about 5-10 minutes; `make scenario`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scenarios.retraining import run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_four_cycles_tell_the_whole_story(tmp_path: Path) -> None:
    r = run_scenario(tmp_path / "scenario", log=lambda *_: None)
    first, second, poisoned, parity = r["cycles"]

    assert first.returncode == 0, first.stdout[-2000:] + first.stderr
    assert r["v1"] == "1" and first.champion_after == "1"

    assert second.returncode == 0, second.stdout[-2000:] + second.stderr
    assert r["versions"] == [1, 2]
    promoted = "gate           PROMOTE" in second.stdout
    assert second.champion_after == ("2" if promoted else "1"), second.stdout
    # Hash splits: every image that was in test when v1 was trained is still in test for v2.
    assert r["test_v1"] and r["test_v1"] <= r["test_v2"]

    assert poisoned.returncode == 1 and "decodable" in poisoned.stderr, poisoned.stderr
    assert poisoned.champion_after == second.champion_after
    assert parity.returncode == 1 and parity.stderr.startswith("error: parity:"), parity.stderr
    assert parity.champion_after == second.champion_after
    # No cycle registered a version past the gate's evidence: still two versions.
    assert r["versions"] == [1, 2]

    history = json.loads(r["history"].stdout)
    assert history["champion"] == second.champion_after
    moves = [(e["from_version"], e["to_version"]) for e in history["events"]]
    assert moves[0] == (None, "1") and (("1", "2") in moves) is promoted
    audit = json.loads(r["audit"].stdout)
    assert r["audit"].returncode == 0 and {str(v["version"]) for v in audit["versions"]} == {"1", "2"}
    assert all(v["consistent"] for v in audit["versions"])

    # The champion, served over HTTP now, predicts what it predicted when it was promoted.
    assert len(r["probe"]) >= 10 and r["served"] == r["at_promotion"]
    labels = [Path(p).parent.name for p in r["probe"]]
    assert sum(a == b for a, b in zip(r["served"], labels, strict=True)) >= 0.8 * len(labels)
