"""The registry gate: register every candidate, decide, move aliases, keep the promotion history.

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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import random
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tlops.config.settings import GateConfig
from tlops.errors import GateFailed, TlopsError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PASSING = ("promote", "needs-approval")
LOCK_TAG = "tlops.lock"
HISTORY_PREFIX = "tlops.history."
TAG_VALUE_LIMIT = 4900  # MLflow's SQL stores hold 5000 characters per tag value


@dataclass
class Decision:
    decision: str  # "promote", "reject" or "needs-approval"
    reasons: list[str]
    compared_with: str | None = None  # champion version the candidate was measured against
    extra: dict[str, Any] = field(default_factory=dict)
    stale: bool = False  # the champion moved between the comparison and the decision

    @property
    def passed(self) -> bool:
        return self.decision in PASSING


@dataclass
class PreprocessEvidence:
    """What the run recorded about its preprocessing, as the gate needs it."""

    fingerprint: str
    reference_fingerprint: str
    declared: str  # declared differences from the reference, "none" when there are none

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> PreprocessEvidence:
        return cls(tags.get("preprocess.fingerprint", ""), tags.get("preprocess.reference_fingerprint", ""),
                   tags.get("preprocess.declared", "none"))

    def problem(self) -> str | None:
        if not self.fingerprint or not self.reference_fingerprint:
            return "no preprocessing fingerprint recorded"
        if self.fingerprint != self.reference_fingerprint and self.declared in ("", "none"):
            return (f"preprocessing fingerprint {self.fingerprint[:12]} differs from the backbone's reference "
                    f"{self.reference_fingerprint[:12]} with no declared override")
        return None


# ------------------------------------------------------------------------------------------------ policy


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, gate: GateConfig,
           validation_ok: bool, parity_ok: bool, preprocess: PreprocessEvidence | None = None,
           comparison: dict[str, Any] | None = None) -> Decision:
    """Every check of the policy must pass; the reasons list says what passed and what did not.

    ``candidate``/``champion`` are the evaluation's records (``accuracy`` at least; ``min_class_recall``,
    ``latency`` and ``model_size_bytes`` when the policy limits them); ``comparison`` is the paired
    bootstrap record. A passing candidate is ``promote`` in auto mode and ``needs-approval`` in manual mode.
    """
    reasons: list[str] = []
    ok = True

    def check(passed: bool, good: str, bad: str, required: bool = True) -> None:
        nonlocal ok
        if passed:
            reasons.append(good)
        elif required:
            ok = False
            reasons.append(bad)
        else:
            reasons.append(f"{bad} (not required by the gate policy)")

    if preprocess is not None:
        problem = preprocess.problem()
        if problem:
            check(False, "", problem, gate.require_parity)
        elif preprocess.fingerprint == preprocess.reference_fingerprint:
            reasons.append("preprocessing is the backbone's reference")
        else:
            reasons.append(f"preprocessing differs from the reference as declared: {preprocess.declared}")
    check(validation_ok, "data validation passed", "data validation failed", gate.require_validation)
    check(parity_ok, "preprocessing parity passed", "preprocessing parity failed", gate.require_parity)
    acc = candidate["accuracy"]
    check(acc >= gate.min_accuracy, f"accuracy {acc:.4f} >= minimum {gate.min_accuracy:.4f}",
          f"accuracy {acc:.4f} < minimum {gate.min_accuracy:.4f}")
    if gate.min_class_recall > 0:
        worst = candidate.get("min_class_recall")
        if worst is None:
            check(False, "", "per-class recall was not measured")
        else:
            which = f" (class {candidate.get('min_recall_class', '?')})"
            check(worst >= gate.min_class_recall,
                  f"lowest class recall {worst:.4f}{which} >= minimum {gate.min_class_recall:.4f}",
                  f"lowest class recall {worst:.4f}{which} < minimum {gate.min_class_recall:.4f}")
    if gate.max_latency_p95_ms is not None:
        p95 = (candidate.get("latency") or {}).get("p95_ms")
        if p95 is None:
            check(False, "", "latency was not measured (evaluation.latency_images is 0)")
        else:
            check(p95 <= gate.max_latency_p95_ms,
                  f"latency p95 {p95:.1f} ms <= maximum {gate.max_latency_p95_ms:g} ms",
                  f"latency p95 {p95:.1f} ms > maximum {gate.max_latency_p95_ms:g} ms")
    if gate.max_model_size_mb is not None:
        size = candidate.get("model_size_bytes")
        if size is None:
            check(False, "", "model size was not measured")
        else:
            check(size / 1e6 <= gate.max_model_size_mb,
                  f"weights {size / 1e6:.2f} MB <= maximum {gate.max_model_size_mb:g} MB",
                  f"weights {size / 1e6:.2f} MB > maximum {gate.max_model_size_mb:g} MB")
    compared_with = None
    if champion is None:
        reasons.append("no champion yet: absolute thresholds only")
    else:
        compared_with = str(champion["version"])
        gain = acc - champion["accuracy"]
        what = f"champion version {compared_with} accuracy {champion['accuracy']:.4f} on the same test set"
        check(acc >= champion["accuracy"] - gate.max_regression,
              f"not worse than {what} (allowed regression {gate.max_regression:.4f})",
              f"worse than {what} by {-gain:.4f} (allowed regression {gate.max_regression:.4f})")
        stats = ""
        if comparison is not None:
            stats = (f"{comparison['confidence']:.0%} paired bootstrap CI [{comparison['ci_low']:+.4f}, "
                     f"{comparison['ci_high']:+.4f}], McNemar p={comparison['mcnemar_p']:.3f}")
        if gate.min_improvement is not None:
            if comparison is None:
                check(False, "", "a significant improvement is required but no paired comparison was recorded")
            else:
                significant = gain >= gate.min_improvement and comparison["ci_low"] > 0
                check(significant,
                      f"improves on champion version {compared_with} by {gain:+.4f} (at least "
                      f"{gate.min_improvement:+.4f} required), {stats} above zero",
                      f"no significant improvement on champion version {compared_with}: {gain:+.4f} (at least "
                      f"{gate.min_improvement:+.4f} with the interval above zero required), {stats}")
        elif stats:
            reasons.append(f"accuracy difference {gain:+.4f}, {stats}")
    decision = "reject"
    if ok:
        decision = "promote" if gate.mode == "auto" else "needs-approval"
        if gate.mode == "manual":
            reasons.append("manual mode: every check passed; the version becomes the challenger and waits "
                           "for a person's approval")
    return Decision(decision, reasons, compared_with, {"mode": gate.mode, "policy": gate.policy_source})


# --------------------------------------------------------------------------------------------- registry


def client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def alias_version(name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion_version(name: str) -> Any | None:
    """The version the ``champion`` alias points at, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def register(model_uri: str, name: str, tags: dict[str, str]) -> Any:
    import mlflow

    return mlflow.register_model(model_uri, name, tags=tags)


def require_model(name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client().get_registered_model(name)
    except MlflowException as exc:
        from tlops.tracking import unreachable_error

        raise (unreachable_error(exc) or TlopsError(
            f"registered model {name!r} does not exist in the MLflow registry")) from None


def get_version(name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    require_model(name)
    if not re.fullmatch(r"[1-9][0-9]*", str(version)):
        raise TlopsError(f"version {version!r}: expected a version number such as 3")
    try:
        return client().get_model_version(name, str(version))
    except MlflowException:
        raise TlopsError(f"model {name!r} has no version {version}") from None


def current_user() -> str:
    """Who acts: ``$USER``, else the login name, else "unknown"."""
    if os.environ.get("USER"):
        return os.environ["USER"]
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def code_version() -> str:
    """The git commit of the code that runs: ``$TLOPS_GIT_COMMIT`` (set it in images built without .git),
    else ``git rev-parse HEAD`` where the package lives, else in the working directory, else "unknown"."""
    if os.environ.get("TLOPS_GIT_COMMIT"):
        return os.environ["TLOPS_GIT_COMMIT"]
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    return "unknown"


def evidence_tags(run_tags: dict[str, str], evaluation: dict[str, Any], backbone: str, run_id: str,
                  config_hash: str) -> dict[str, str]:
    """The tags every registered version carries: where it came from and what was measured."""
    cand = evaluation["candidate"]
    tags = {
        "preprocess.fingerprint": run_tags.get("preprocess.fingerprint", ""),
        "preprocess.reference_fingerprint": run_tags.get("preprocess.reference_fingerprint", ""),
        "parity": run_tags.get("parity", "unknown"),
        "parity.serving": run_tags.get("parity.serving", "unknown"),
        "preprocess.declared": run_tags.get("preprocess.declared", "none"),
        "validation": run_tags.get("validation", "unknown"),
        "data.manifest_hash": run_tags.get("data.manifest_hash", ""),
        "config.hash": run_tags.get("config.hash") or config_hash,
        "git.commit": code_version(),
        "backbone": backbone,
        "test_accuracy": f"{cand['accuracy']:.6f}",
        "test_macro_f1": f"{cand['macro_f1']:.6f}",
        "mlflow.run_id": run_id,
        "tlops.pipeline_run": run_tags.get("tlops.pipeline_run", ""),
    }
    if "min_class_recall" in cand:
        tags["test_min_class_recall"] = f"{cand['min_class_recall']:.6f}"
    if "ece" in cand:
        tags["test_ece"] = f"{cand['ece']:.6f}"
    for k, v in (cand.get("top_k") or {}).items():
        tags[f"test_{k}"] = f"{v:.6f}"
    if (cand.get("latency") or {}).get("p95_ms") is not None:
        tags["latency_p50_ms"] = f"{cand['latency']['p50_ms']:.3f}"
        tags["latency_p95_ms"] = f"{cand['latency']['p95_ms']:.3f}"
    if cand.get("model_size_bytes") is not None:
        tags["model_size_bytes"] = str(int(cand["model_size_bytes"]))
    comp = evaluation.get("comparison")
    if comp:
        tags["comparison.accuracy_difference"] = f"{comp['difference']:+.6f}"
        tags["comparison.ci"] = f"[{comp['ci_low']:+.6f}, {comp['ci_high']:+.6f}] at {comp['confidence']:g}"
        tags["comparison.mcnemar_p"] = f"{comp['mcnemar_p']:.6f}"
    return tags


# ------------------------------------------------------------------------------------------------ lock


@dataclass(frozen=True)
class LockSettings:
    ttl_s: float = 120.0  # a holder that died frees the lease after this long
    settle_s: float = 1.0  # wait between writing the lease and re-reading it (see promotion_lock)
    timeout_s: float = 300.0  # give up waiting for another holder after this long
    refused_s: float = 30.0  # give up after the store refused every lease write (e.g. "database is locked") this long
    poll_s: float = 0.25


DEFAULT_LOCK = LockSettings()


def _registry_uri() -> str:
    import mlflow

    return str(mlflow.get_registry_uri())


def _sqlite_path() -> Path | None:
    import mlflow

    uri = mlflow.get_registry_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the registry lease alone
        yield
        return
    try:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed below, after the lock is released
    except OSError as exc:
        raise TlopsError(f"cannot open the registry lock file {path} ({exc.strerror or exc}): the MLflow store's "
                         "folder must be writable to promote, roll back or register") from None
    with fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TlopsError(f"another tlops process holds the registry lock file {path}; "
                                     "try again when it has finished") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_lease(c: Any, name: str) -> dict[str, Any] | None:
    raw = c.get_registered_model(name).tags.get(LOCK_TAG)
    if not raw:
        return None
    try:
        lease = json.loads(raw)
        float(lease["expires"])
        return dict(lease)
    except (ValueError, KeyError, TypeError):
        return {"token": "", "owner": "unreadable lease", "expires": 0.0}  # garbage: treated as expired


@contextlib.contextmanager
def promotion_lock(name: str, purpose: str, settings: LockSettings = DEFAULT_LOCK) -> Iterator[None]:
    """Hold the right to move ``name``'s aliases and append to its history.

    MLflow has no compare-and-set on aliases, so this is built from what it has:

    1. On a SQLite store (one machine) an OS file lock (``flock``) beside the database serialises every
       tlops process on that host: there the exclusion is strict.
    2. On any store, a lease in the registered-model tag ``tlops.lock`` (token, owner, expiry in UTC
       seconds). It is Fischer's timed mutual exclusion: read the tag; when it is free or expired, write
       our lease; wait ``settle_s``; read again and hold the lock only if our token is still there. Two
       processes that both saw the lease free both write it, and the later write wins: the earlier
       writer sees the other token after its wait and backs off.

    Limits of (2): it is correct only while every process completes its write within ``settle_s`` of
    reading the lease free (1 s against a few milliseconds on loopback; a process that is paused longer
    between the two, e.g. a stalled HTTP request, can break it), while each holder finishes within
    ``ttl_s`` (its work here is a few registry calls), and while host clocks agree to well within
    ``ttl_s``. A crashed holder blocks others until its lease expires. Inside the lock the caller still
    re-reads the champion before moving it, so a broken lease needs a second coincidence to matter.
    """
    from mlflow.exceptions import MlflowException

    from tlops.tracking import redact, store_error

    c = client()
    sqlite = _sqlite_path()
    if sqlite is not None:
        # A store this process may not write fails the lease write below; say so before waiting on anything.
        # (The superuser passes os.access whatever the mode bits; SQLite's own error is caught below.)
        for what in (sqlite, sqlite.parent):
            if what.exists() and not os.access(what, os.W_OK):
                raise TlopsError(f"the MLflow store {redact(_registry_uri())} is read-only for this "
                                 f"user ({what} is not writable): the file and its folder must be writable to "
                                 "promote, roll back or register")
    file_lock = _file_lock(sqlite.with_name(sqlite.name + ".tlops-lock"), settings.timeout_s) if sqlite \
        else contextlib.nullcontext()
    with file_lock:
        token = uuid.uuid4().hex
        refused = "no answer"
        owner = f"{current_user()}@{socket.gethostname()} pid {os.getpid()}: {purpose}"[:400]
        deadline = time.monotonic() + settings.timeout_s
        refused_since: float | None = None
        while True:
            t_read = time.monotonic()
            lease = _read_lease(c, name)
            if lease is None or float(lease["expires"]) < time.time():
                if lease is not None:
                    log.warning("registry lock on %s: taking over the expired lease of %s", name, lease.get("owner"))
                try:
                    c.set_registered_model_tag(name, LOCK_TAG, json.dumps(
                        {"token": token, "owner": owner, "expires": time.time() + settings.ttl_s}))
                    wrote, refused_since = True, None
                except MlflowException as exc:
                    fault = store_error(exc, _registry_uri())
                    if fault is not None and "database is locked" not in str(exc):
                        raise fault from None  # read-only, corrupt, full: waiting changes nothing
                    # A SQL store inserts a new tag after looking for it: two writers inserting at once
                    # make one fail on the unique key. That one lost this round; so does a write that found
                    # the database locked by another writer.
                    refused = str(exc).splitlines()[0][:160]
                    log.info("registry lock on %s: lease write refused (%s); trying again", name, refused)
                    wrote = False
                    refused_since = t_read if refused_since is None else refused_since
                    if time.monotonic() - refused_since > settings.refused_s:
                        raise TlopsError(f"registry lock on {name}: the MLflow store {redact(_registry_uri())} "
                                         f"refused every lease write for {settings.refused_s:.0f}s (last: "
                                         f"{refused}); another program holds the store: try again when it has "
                                         "finished") from None
                if wrote:
                    in_time = time.monotonic() - t_read < settings.settle_s
                    time.sleep(settings.settle_s)
                    lease = _read_lease(c, name)
                    mine = lease is not None and lease.get("token") == token
                    if mine and in_time:
                        break
                    if mine:  # our own write came too late to trust: give the lease back and try again
                        c.delete_registered_model_tag(name, LOCK_TAG)
                        lease = None
                        refused = (f"each lease write took longer than the {settings.settle_s:g}s it may take; the "
                                   "store answers too slowly")
            if time.monotonic() > deadline:
                if lease is None or float(lease["expires"]) < time.time():
                    # Nobody holds it: our own writes kept failing.
                    raise TlopsError(f"registry lock on {name}: the MLflow store {redact(_registry_uri())} refused "
                                     f"the lease write for {settings.timeout_s:.0f}s (last: {refused}); no "
                                     "other process holds the lock")
                raise TlopsError(f"registry lock on {name} is held by {lease.get('owner', '?')}; gave up after "
                                 f"{settings.timeout_s:.0f}s (a lease expires {settings.ttl_s:.0f}s after it was "
                                 "taken)")
            time.sleep(settings.poll_s * (1 + random.random()))
        try:
            yield
        finally:
            try:
                lease = _read_lease(c, name)
                if lease is not None and lease.get("token") == token:
                    c.delete_registered_model_tag(name, LOCK_TAG)
            except Exception as exc:  # the lease expires on its own; never hide the real outcome
                log.warning("registry lock on %s: could not release the lease (%s)", name, exc)


# --------------------------------------------------------------------------------------------- history


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


DESCRIPTION_LIMIT = 4900  # MLflow's SQL stores hold 5000 characters per model version description


def describe(decision: Decision, notes: list[str] | None = None) -> str:
    """The version's description: the gate's decision as a heading, then each reason, then ``notes`` (where the
    evidence is). Markdown, as the MLflow UI renders it."""
    head = {"promote": "PROMOTE", "reject": "REJECT", "needs-approval": "NEEDS APPROVAL"}.get(
        decision.decision, decision.decision.upper())
    against = (f"compared with champion version {decision.compared_with}" if decision.compared_with
               else "no champion to compare with")
    lines = [f"**Gate: {head}** ({against}; {decision.extra.get('mode', 'auto')} mode)"
             + (", stale comparison" if decision.stale else ""), ""]
    lines += [f"- {r}" for r in decision.reasons]
    if notes:
        lines += ["", *notes]
    text = "\n".join(lines)
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


def _add_to_description(name: str, version: str, line: str) -> None:
    c = client()
    old = c.get_model_version(name, version).description or ""
    text = f"{old}\n\n{line}" if old else line
    c.update_model_version(name, version, description=text[-DESCRIPTION_LIMIT:])


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


# -------------------------------------------------------------------------------------- moving aliases


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
        _add_to_description(name, version, f"**Champion** from {event.at} by {who} ({action}, `tlops promote`): "
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
