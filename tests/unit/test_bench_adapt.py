"""The domain-adaptation benchmark's core on tiny data (three digits, 16 px, one epoch), so that it cannot rot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.bench_adapt import METHODS, build_data, run_seed, summarise
from tlops.training.adaptation import AdaptConfig


class Recording(dict):
    """The benchmark's tensors, noting each key read (and each line logged) in order."""

    def __init__(self, data: dict, events: list[str]) -> None:
        super().__init__(data)
        self.events = events

    def __getitem__(self, key: str):  # noqa: ANN204
        self.events.append(key)
        return super().__getitem__(key)


def test_every_strategy_runs_and_only_the_ceiling_reads_target_labels(tmp_path: Path) -> None:
    data = build_data(tmp_path, size=16, source_per_class=6, target_per_class=4, source_test=9, classes=[0, 1, 7],
                      scans_per_class=9)
    assert len(data["xs"]) == len(data["xs_test"]) * 2 == 18
    assert len(data["xt"]) == len(data["xt_val"]) == len(data["xt_test"]) == 12
    assert set(data["ys"].tolist()) == set(data["yt"].tolist()) == {0, 1, 2}
    events: list[str] = []
    found = run_seed(0, Recording(data, events), AdaptConfig(epochs=1, batch_size=8, rounds=1, threshold=0.0),
                     classes=3, log=lambda line: events.append("log " + line.split()[2]), threads=1)
    assert set(found) == set(METHODS)
    for row in found.values():
        assert all(0.0 <= row[k] <= 1.0 for k in ("target", "val", "source")), row
    # The pool's labels are read once, after every unsupervised strategy has been scored: by the ceiling.
    assert events.count("yt") == 1
    assert events.index("yt") > events.index("log mcc") and events.index("log target-supervised") > events.index("yt")
    # Validation and test labels are read only to score (right before each strategy's line).
    for key in ("yt_val", "yt_test"):
        assert events.count(key) == len(METHODS)


def test_summary_is_the_share_of_the_gap_closed() -> None:
    def row(target: float) -> dict[str, float]:
        return {"target": target, "val": target, "source": 0.9}

    seeds = [{"source-only": row(base), "adabn": row(base + 0.1), "self-training": row(base + 0.2),
              "mcc": row(base), "target-supervised": row(base + 0.4)} for base in (0.5, 0.4, 0.6)]
    out = summarise(seeds)
    assert out["source-only"]["target"] == pytest.approx(0.5) and out["source-only"]["gap_closed"] == 0
    assert out["self-training"]["gap_closed"] == pytest.approx(0.5)
    assert out["adabn"]["gap_closed"] == pytest.approx(0.25)
    assert out["target-supervised"]["gap_closed"] == pytest.approx(1.0)
    flat = [{name: row(0.5) for name in METHODS}]
    assert math.isnan(summarise(flat)["adabn"]["gap_closed"])
