"""The run plan: what the validate step decided, handed to every later step as a declared input.

It holds the resolved config (``backbone: auto`` and ``train.strategy: auto`` replaced by what was chosen),
whether the run trains or skips and why, the MLflow run every step logs into, the data's content hash and the
validation verdict. Later steps read their config from here and nowhere else: MLflow tags record the same
story for people, but no step reads them back to learn what to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tlops.config.settings import Config
from tlops.errors import TlopsError
from tlops.fileio import read_json, write_json

FORMAT = "tlops-run-plan/1"


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    config: Config
    decision: Literal["train", "skip"]
    reasons: list[str]
    pipeline_run: str = ""
    manifest_hash: str = ""
    validation: dict[str, Any] = field(default_factory=dict)  # status, failed, warnings
    choices: dict[str, Any] = field(default_factory=dict)  # backbone and strategy chosen, drift, why

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"] = self.config.model_dump(mode="json")
        return {"format": FORMAT, **out}

    def write(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> RunPlan:
        try:
            record = read_json(path)
        except (OSError, ValueError) as exc:
            why = type(exc).__name__
            raise TlopsError(f"run plan {path} cannot be read ({why}); the validate step writes it") from None
        if record.get("format") != FORMAT:
            raise TlopsError(f"run plan {path} is not a {FORMAT} record (format {record.get('format')!r})")
        record.pop("format")
        record["config"] = Config.model_validate(record["config"])
        return cls(**record)

    @property
    def validation_ok(self) -> bool:
        return self.validation.get("status") == "pass"
