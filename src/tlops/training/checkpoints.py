"""Training checkpoints: atomic files in a local directory or under an ``s3://`` prefix.

A checkpoint holds the model, optimizer, scheduler (and AMP scaler) states, the RNG states and where the
run stands (epoch, step within it, history, best so far). Everything is stored as tensors and plain Python
values so that it loads with ``torch.load(..., weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlops.data.storage import is_s3, materialize, parse_s3, s3_client
from tlops.errors import TlopsError
from tlops.fileio import save_torch

log = logging.getLogger(__name__)
LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain values."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class CheckpointStore:
    """Checkpoint files under ``location``: a local directory, or ``s3://bucket/prefix`` mirrored into
    ``cache_root`` (written locally first, atomically, then uploaded)."""

    def __init__(self, location: str | Path, cache_root: str | Path) -> None:
        self.location = str(location)
        self.remote = is_s3(self.location)
        self.cache_root = Path(cache_root)
        if self.remote:
            bucket, prefix = parse_s3(self.location)
            self.dir = self.cache_root / "s3" / bucket / (prefix or "_root")
        else:
            self.dir = Path(location)

    def sync_down(self) -> None:
        if self.remote:
            materialize(self.location, self.cache_root)

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.dir / name
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TlopsError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
                             "delete it or set train.resume=false") from None

    def save(self, name: str, payload: dict[str, Any]) -> Path:
        path = save_torch(self.dir / name, payload)
        if self.remote:
            self._upload(path, name)
        return path

    def _upload(self, path: Path, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        from tlops.data.storage import _s3_error

        bucket, prefix = parse_s3(self.location)
        try:
            # One PUT: the object appears whole or not at all, as the local rename does.
            s3_client().upload_file(str(path), bucket, f"{prefix}/{name}" if prefix else name)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(self.location, exc) from None
