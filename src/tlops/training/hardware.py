"""The device a run asks for (``train.device``: auto, cpu or cuda), resolved against the machine."""

from __future__ import annotations

import torch

from tlops.errors import TlopsError


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TlopsError("train.device is cuda but no CUDA device is available; use auto or cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
