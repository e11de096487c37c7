"""Compressed serving variants of a candidate model: ONNX, int8 and pruned (see ``variants``), and the
torch-free runtime that serves them (``runtime``).

This package's ``__init__`` imports nothing heavy: ``tlops.compress.runtime`` must load without torch.
"""

from __future__ import annotations

# The variants ``deploy.variants`` may name, in the order they are built.
VARIANTS: tuple[str, ...] = ("onnx", "int8", "pruned")
