"""The model registry: the gate's policy, the store, the promotion lock, the history, the aliases and the
evidence on each version. The gate: register every candidate, decide, move aliases, keep the promotion history.

Aliases: ``champion`` is the version in production and moves only on ``promote`` (by the gate in auto
mode, by ``tlops promote`` after a person's approval, by ``tlops rollback``); ``challenger`` is the
newest candidate that passed every check and is not the champion yet: the one awaiting approval in
manual mode. It goes when a version at or above it becomes the champion.

History: every move of ``champion`` is one model-version tag ``tlops.history.<seq>.<random>`` on the version
that became the champion, whose value is the event as JSON (who, when in UTC, action, from version, to version,
reason, via). A new event always gets a new key, so events are only ever added, never rewritten, even if two
writers were to pick the same sequence number; each tag stays far below the 5000-character value limit of
MLflow's SQL stores. The history lives in the registry itself, beside the aliases it explains, on SQLite and on
an MLflow server alike, but off the registered model's own page (its tags stay empty, so the page opens on the
list of versions); stores written when the events were registered-model tags are still read.

The gate's decision and its reasons are also the version's description (Markdown), which the MLflow UI shows
on the version's page and in the versions list.

The package's names below are its API, used as ``from tlops import registry``; the modules depend on each
other in that order (policy and store at the bottom, aliases on top).
"""

from tlops.registry.aliases import apply_decision, promote, rollback
from tlops.registry.evidence import DESCRIPTION_LIMIT, describe, evidence_tags
from tlops.registry.history import HISTORY_PREFIX, HistoryEvent, append_history, champion_stack, format_history, history
from tlops.registry.lock import DEFAULT_LOCK, LOCK_TAG, LockSettings, promotion_lock
from tlops.registry.policy import PASSING, Decision, PreprocessEvidence, decide
from tlops.registry.store import (
    CHALLENGER,
    CHAMPION,
    TAG_VALUE_LIMIT,
    alias_version,
    champion_version,
    client,
    code_version,
    current_user,
    get_version,
    register,
    require_model,
)
from tlops.registry.uri import parse_model_uri

__all__ = [
    "CHALLENGER", "CHAMPION", "DEFAULT_LOCK", "DESCRIPTION_LIMIT", "HISTORY_PREFIX", "LOCK_TAG", "PASSING",
    "TAG_VALUE_LIMIT", "Decision", "HistoryEvent", "LockSettings", "PreprocessEvidence", "alias_version",
    "append_history", "apply_decision", "champion_stack", "champion_version", "client", "code_version",
    "current_user", "decide", "describe", "evidence_tags", "format_history", "get_version", "history",
    "parse_model_uri", "promote", "promotion_lock", "register", "require_model", "rollback",
]
