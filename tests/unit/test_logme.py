"""LogME against an independent, straightforward evidence maximisation (direct inverse and determinant)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tlops.errors import TlopsError
from tlops.selection.ranking import logme


def log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of Bayesian linear regression, written out from its definition."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.inv(a) @ f.T @ y
    sign, logdet = np.linalg.slogdet(a)
    assert sign > 0
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - beta / 2 * float(np.sum((f @ m - y) ** 2))
            - alpha / 2 * float(m @ m) - logdet / 2 - n / 2 * math.log(2 * math.pi))


def maximise(f: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """MacKay's updates with the posterior computed by a matrix inverse, then the evidence per image."""
    n, d = f.shape
    alpha, beta = 1.0, 1.0
    for _ in range(1000):
        a_inv = np.linalg.inv(alpha * np.eye(d) + beta * f.T @ f)
        m = beta * a_inv @ f.T @ y
        gamma = d - alpha * np.trace(a_inv)
        new_alpha, new_beta = gamma / float(m @ m), (n - gamma) / float(np.sum((f @ m - y) ** 2))
        done = abs(new_alpha * beta - alpha * new_beta) <= 1e-12 * alpha * new_beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return log_evidence(f, y, alpha, beta) / n, alpha, beta


def reference_logme(f: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([maximise(f, (labels == c).astype(float))[0] for c in np.unique(labels)]))


@pytest.mark.parametrize("n,d", [(40, 6), (12, 20)])  # more images than dimensions, and fewer
def test_logme_matches_direct_evidence_maximisation(n: int, d: int) -> None:
    rng = np.random.default_rng(7)
    labels = np.arange(n) % 3
    f = rng.normal(size=(n, d)) + 1.5 * np.eye(3)[labels] @ rng.normal(size=(3, d))
    expected = reference_logme(f, labels)
    assert logme(f, labels) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_fixed_point_is_the_maximum_of_the_evidence() -> None:
    rng = np.random.default_rng(3)
    labels = np.arange(30) % 2
    f = rng.normal(size=(30, 5)) + np.outer(labels, rng.normal(size=5))
    y = (labels == 1).astype(float)
    best, alpha, beta = maximise(f, y)
    grid = [(alpha * a, beta * b) for a in (0.5, 0.9, 1.1, 2.0) for b in (0.5, 0.9, 1.1, 2.0)]
    assert all(log_evidence(f, y, a, b) / 30 < best for a, b in grid)
    # Two classes: the mean over the two one-hot columns.
    expected = np.mean([best, maximise(f, 1 - y)[0]])
    assert logme(f, labels) == pytest.approx(expected, rel=1e-6)


def test_informative_features_score_higher_than_noise() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    noise = rng.normal(size=(60, 8))
    informative = noise + 3 * np.eye(3)[labels] @ rng.normal(size=(3, 8))
    assert logme(informative, labels) > logme(noise, labels)


def test_bad_features_are_refused_with_a_reason() -> None:
    with pytest.raises(TlopsError, match="NaN"):
        logme(np.full((4, 2), np.nan), [0, 1, 0, 1])
    with pytest.raises(TlopsError, match="N x D"):
        logme(np.zeros((3, 2)), [0, 1])
