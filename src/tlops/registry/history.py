"""The promotion history: one model-version tag per move of ``champion``, only ever added; read back, printed,
and the stack of champions a rollback walks down."""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from tlops.registry.store import CHALLENGER, CHAMPION, alias_version, client, require_model

log = logging.getLogger(__name__)

HISTORY_PREFIX = "tlops.history."




@dataclass
class HistoryEvent:
    seq: int
    at: str  # UTC, ISO 8601
    who: str
    action: str  # "promote" (the gate), "approve" (tlops promote), "force-promote", "rollback"
    from_version: str | None
    to_version: str
    reason: str
    via: str = ""  # pipeline run, or "cli"
    key: str = ""

    def to_json(self) -> str:
        record = {k: v for k, v in asdict(self).items() if k != "key"}
        return json.dumps(record, sort_keys=True)


def _history_tags(name: str) -> Iterator[tuple[str, str]]:
    """Every history tag of the model: on its versions, and on the registered model itself in older stores."""
    yield from require_model(name).tags.items()
    for mv in client().search_model_versions(f"name='{name}'"):
        yield from mv.tags.items()


def history(name: str) -> list[HistoryEvent]:
    """Every recorded move of ``champion``, oldest first."""
    events = []
    for key, raw in _history_tags(name):
        if not key.startswith(HISTORY_PREFIX):
            continue
        try:
            record = json.loads(raw)
            events.append(HistoryEvent(**record, key=key))
        except (ValueError, TypeError) as exc:
            log.warning("history of %s: unreadable event %s (%s)", name, key, exc)
    return sorted(events, key=lambda e: (e.seq, e.at, e.key))


def append_history(name: str, action: str, from_version: str | None, to_version: str, who: str, reason: str,
                   via: str = "") -> HistoryEvent:
    """Add one event under a key no other event has. Call it holding ``promotion_lock``."""
    seq = 1 + max((e.seq for e in history(name)), default=0)
    event = HistoryEvent(seq=seq, at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), who=who,
                         action=action, from_version=from_version, to_version=str(to_version),
                         reason=reason[:1500], via=via[:200])
    event.key = f"{HISTORY_PREFIX}{seq:06d}.{uuid.uuid4().hex[:8]}"
    client().set_model_version_tag(name, event.to_version, event.key, event.to_json())
    return event


def champion_stack(events: list[HistoryEvent]) -> list[str]:
    """Champions in order, as the history left them: a promotion pushes, a rollback pops."""
    stack: list[str] = []
    for e in events:
        if e.action == "rollback":
            if stack:
                stack.pop()
        else:
            if not stack and e.from_version:  # the champion before the first recorded promotion
                stack.append(e.from_version)
            stack.append(e.to_version)
    return stack




def format_history(name: str, events: list[HistoryEvent], fmt: str = "table") -> str:
    champion = alias_version(name, CHAMPION)
    challenger = alias_version(name, CHALLENGER)
    if fmt == "json":
        return json.dumps({"model": name, "champion": champion, "challenger": challenger,
                           "events": [json.loads(e.to_json()) for e in events]}, indent=2)
    lines = [f"model {name}: champion version {champion or 'none'}, challenger version {challenger or 'none'}"]
    if not events:
        lines.append("no promotions recorded")
        return "\n".join(lines)
    lines.append(f"{'#':>4}  {'when (UTC)':<25} {'who':<14} {'action':<13} {'from':>5} {'to':>5}  reason")
    for e in events:
        lines.append(f"{e.seq:>4}  {e.at:<25} {e.who[:14]:<14} {e.action:<13} {e.from_version or '-':>5} "
                     f"{e.to_version:>5}  {e.reason[:160]}")
    return "\n".join(lines)
