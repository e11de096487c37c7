"""Kubeflow components: each one imports a core step from ``tlops.steps`` and calls it, nothing else."""

from components.steps import compress, evaluate, fine_tune, gate, parity, skip, validate

__all__ = ["compress", "evaluate", "fine_tune", "gate", "parity", "skip", "validate"]
