"""tlops labels-curve: the probe on growing shares of the training labels, from the feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, write_config
from tlops.errors import TlopsError
from tlops.training.labels_curve import DEFAULT_FRACTIONS, parse_fractions, subset, t_interval


def test_subsets_are_stratified_nested_in_size_and_reproducible() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    one = subset(labels, 0.01, seed=0)
    assert sorted(np.bincount(labels[one]).tolist()) == [1, 1, 1]  # at least one of each class
    tenth = subset(labels, 0.1, seed=0)
    assert np.bincount(labels[tenth]).tolist() == [5, 3, 2]
    assert np.array_equal(tenth, subset(labels, 0.1, seed=0))
    assert not np.array_equal(tenth, subset(labels, 0.1, seed=1))
    assert len(subset(labels, 1.0, seed=3)) == 100


def test_fractions_and_intervals() -> None:
    assert parse_fractions(None) == DEFAULT_FRACTIONS
    assert parse_fractions("10%,1%,100%") == (0.01, 0.1, 1.0)
    with pytest.raises(TlopsError, match=r"every fraction must be in \(0, 1\]"):
        parse_fractions("0,0.5")
    with pytest.raises(TlopsError, match="comma-separated"):
        parse_fractions("half")
    mean, low, high = t_interval([0.8, 0.9, 0.85])
    assert low < mean < high and mean == pytest.approx(0.85)
    assert t_interval([0.7]) == (0.7, 0.7, 0.7)


def test_labels_curve_cli_on_real_digits(tmp_path: Path, workdir: Path, tiny_digits: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", workdir)
    proc = run_cli("labels-curve", "--config", str(cfg), "--data", str(tiny_digits), "--fractions", "0.05,0.25,1",
                   "--seeds", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((workdir / "labels_curve" / "labels_curve.json").read_text())
    assert [row["fraction"] for row in table] == [0.05, 0.25, 1.0]
    assert table[0]["labels"] == 3 and table[-1]["labels"] > table[1]["labels"] > 3  # one per class at 5%
    assert all(len(row["accuracies"]) == 3 and row["low"] <= row["mean"] <= row["high"] for row in table)
    assert table[-1]["mean"] > table[0]["mean"]  # more labels help on real digits
    assert table[-1]["low"] == table[-1]["high"]  # 100%: every seed fits the same images
    assert (workdir / "labels_curve" / "labels_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "plot:" in proc.stdout and "100.0%" in proc.stdout
    assert len(list((workdir / "cache" / "features").glob("*.pt"))) == 3  # train, val, test: the probe's cache
