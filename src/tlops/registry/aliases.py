"""Moving the aliases: the gate's decision applied (``champion`` and ``challenger``), ``tlops promote`` and
``tlops rollback``, each under the promotion lock and recorded in the history."""

from __future__ import annotations

import logging

from tlops.errors import GateFailed, TlopsError
from tlops.registry.evidence import add_to_description, describe
from tlops.registry.history import HistoryEvent, append_history, champion_stack, history
from tlops.registry.lock import DEFAULT_LOCK, LockSettings, promotion_lock
from tlops.registry.policy import PASSING, Decision
from tlops.registry.store import (
    CHALLENGER,
    CHAMPION,
    TAG_VALUE_LIMIT,
    alias_version,
    client,
    current_user,
    get_version,
    require_model,
)

log = logging.getLogger(__name__)

def _stale(decision: Decision, current: str | None) -> Decision:
    return Decision(
        "reject",
        [*decision.reasons,
         f"champion moved from version {decision.compared_with or 'none'} to {current or 'none'} during this run; "
         "the comparison is stale, re-run to compare against the new champion"],
        decision.compared_with, decision.extra, stale=True,
    )


def _retire_challenger(name: str, champion: str) -> None:
    """A challenger at or below the new champion has been decided: the alias goes."""
    challenger = alias_version(name, CHALLENGER)
    if challenger is not None and int(challenger) <= int(champion):
        client().delete_registered_model_alias(name, CHALLENGER)


def apply_decision(name: str, version: str, decision: Decision, who: str | None = None, via: str = "",
                   lock: LockSettings = DEFAULT_LOCK, notes: list[str] | None = None) -> Decision:
    """Record the decision on the version (tags, and the description with ``notes`` under the reasons); for a
    passing one, under the lock: re-read the champion, refuse a stale comparison, then on promote move
    ``champion`` (retiring a challenger at or below it) and append the history event, and on needs-approval move
    ``challenger`` (only ever to a newer version)."""
    c = client()
    who = who or current_user()
    if decision.passed:
        with promotion_lock(name, f"gate of version {version}", lock):
            current = alias_version(name, CHAMPION)
            if current != decision.compared_with:
                decision = _stale(decision, current)
            else:
                if decision.decision == "promote":
                    c.set_registered_model_alias(name, CHAMPION, version)
                    _retire_challenger(name, version)
                    headline = [r for r in decision.reasons
                                if r.startswith(("accuracy", "not worse", "improves", "no champion"))]
                    append_history(name, "promote", current, version, who,
                                   f"gate passed in {decision.extra.get('mode', 'auto')} mode: " + "; ".join(headline),
                                   via)
                else:
                    challenger = alias_version(name, CHALLENGER)
                    if challenger is None or int(challenger) < int(version):
                        c.set_registered_model_alias(name, CHALLENGER, version)
                    decision.reasons.append(f"approve with: tlops promote {name} {version}")
    c.set_model_version_tag(name, version, "gate.decision", decision.decision)
    c.set_model_version_tag(name, version, "gate.reasons", "; ".join(decision.reasons)[:TAG_VALUE_LIMIT])
    c.set_model_version_tag(name, version, "gate.compared_with", decision.compared_with or "none")
    c.set_model_version_tag(name, version, "gate.stale", "true" if decision.stale else "false")
    for key, value in decision.extra.items():
        c.set_model_version_tag(name, version, f"gate.{key}", str(value)[:TAG_VALUE_LIMIT])
    c.update_model_version(name, version, description=describe(decision, notes))
    return decision


def promote(name: str, version: str, reason: str = "", force: bool = False, who: str | None = None,
            lock: LockSettings = DEFAULT_LOCK) -> HistoryEvent | None:
    """A person's promotion of ``version`` to champion. Returns None when it already is the champion.

    Without ``force`` the version must have passed its gate (decision promote or needs-approval, not
    stale) against the version that is the champion now; otherwise its evidence does not cover this move.
    """
    mv = get_version(name, version)
    version = str(mv.version)
    who = who or current_user()
    with promotion_lock(name, f"promote version {version}", lock):
        current = alias_version(name, CHAMPION)
        if current == version:
            return None
        tags = mv.tags
        decision = tags.get("gate.decision", "none recorded")
        compared = tags.get("gate.compared_with", "none")
        if not force:
            if decision not in PASSING or tags.get("gate.stale") == "true":
                raise GateFailed(f"model {name} version {version} did not pass its gate (decision {decision}"
                                 f"{', stale' if tags.get('gate.stale') == 'true' else ''}); "
                                 "pass --force with --reason to promote it anyway")
            if compared != (current or "none"):
                raise GateFailed(f"model {name} version {version} was compared with champion version {compared}, "
                                 f"but the champion is now version {current or 'none'}: its evidence is stale; "
                                 "re-run the pipeline, or pass --force with --reason")
        action = "force-promote" if force else "approve"
        c = client()
        c.set_registered_model_alias(name, CHAMPION, version)
        _retire_challenger(name, version)
        event = append_history(name, action, current, version, who, reason or f"approved by {who}", "cli")
        c.set_model_version_tag(name, version, "promotion.by", who)
        c.set_model_version_tag(name, version, "promotion.at", event.at)
        c.set_model_version_tag(name, version, "promotion.reason", event.reason[:TAG_VALUE_LIMIT])
        add_to_description(name, version, f"**Champion** from {event.at} by {who} ({action}, `tlops promote`): "
                                           f"{event.reason}")
    return event


def rollback(name: str, reason: str = "", who: str | None = None, lock: LockSettings = DEFAULT_LOCK) -> HistoryEvent:
    """Move ``champion`` back to the champion before the current one."""
    from mlflow.exceptions import MlflowException

    require_model(name)
    who = who or current_user()
    with promotion_lock(name, "rollback", lock):
        current = alias_version(name, CHAMPION)
        if current is None:
            raise TlopsError(f"model {name} has no champion to roll back")
        events = history(name)
        stack = champion_stack(events)
        if events:
            if not stack or stack[-1] != current:
                raise TlopsError(f"the champion of {name} is version {current} but its promotion history ends at "
                                 f"version {stack[-1] if stack else 'none'} (the alias was moved outside tlops); "
                                 f"choose the version yourself: tlops promote {name} VERSION --force --reason ...")
            if len(stack) < 2:
                raise TlopsError(f"version {current} is the first champion of {name}: there is no earlier "
                                 "champion to roll back to")
            target = stack[-2]
        else:
            # A store from before the history was kept: the newest earlier version the gate promoted.
            earlier = [int(mv.version) for mv in client().search_model_versions(f"name='{name}'")
                       if mv.tags.get("gate.decision") == "promote" and int(mv.version) < int(current)]
            if not earlier:
                raise TlopsError(f"model {name} has no earlier champion than version {current} to roll back to")
            target = str(max(earlier))
        try:
            client().get_model_version(name, target)
        except MlflowException:
            raise TlopsError(f"the previous champion, {name} version {target}, no longer exists in the registry; "
                             f"choose another: tlops promote {name} VERSION --force --reason ...") from None
        client().set_registered_model_alias(name, CHAMPION, target)
        return append_history(name, "rollback", current, target, who, reason or f"rolled back by {who}", "cli")
