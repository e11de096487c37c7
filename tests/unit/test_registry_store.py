"""Aliases, history, promotion, rollback and the promotion lock against a temporary SQLite MLflow store.

Versions are registered from one real logged tlops model (tests/helpers/registry.py); the gate's
decisions are given, so these tests are about what the registry does with them.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from tests.helpers.registry import new_version, race_worker, use_store
from tlops import registry
from tlops.errors import GateFailed, TlopsError
from tlops.registry import Decision, LockSettings

# A lease write must come back within settle_s; on a loaded 2-core machine a SQLite write can take 100 ms.
FAST = LockSettings(settle_s=0.3, timeout_s=20, poll_s=0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict) -> dict:
    from tests.helpers.registry import log_model_run

    root = tmp_path_factory.mktemp("registry-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp = use_store(uri, root / "artifacts")
    _run_id, model_uri = log_model_run(exp, tiny_models["good"])
    return {"uri": uri, "root": root, "model_uri": model_uri}


@pytest.fixture
def name(store: dict, request: pytest.FixtureRequest) -> str:
    """A registered model of its own for each test, in the shared store."""
    use_store(store["uri"])
    return request.node.name.replace("[", "-").replace("]", "")[:80]


def _aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in registry.client().get_registered_model(name).aliases.items()}


def _promote(compared_with: str | None) -> Decision:
    return Decision("promote", ["accuracy 0.9500 >= minimum 0.9000"], compared_with, {"mode": "auto"})


def test_first_promotion_sets_both_aliases_and_one_history_event(store: dict, name: str) -> None:
    v1 = new_version(store["model_uri"], name)
    out = registry.apply_decision(name, v1, _promote(None), who="alice", via="pipeline run-1", lock=FAST)
    assert out.decision == "promote" and not out.stale
    assert _aliases(name) == {"champion": v1}
    [event] = registry.history(name)
    assert (event.seq, event.who, event.action, event.from_version, event.to_version) == (1, "alice", "promote",
                                                                                          None, v1)
    assert event.at.endswith("+00:00") and event.via == "pipeline run-1" and "accuracy 0.9500" in event.reason
    tags = registry.client().get_model_version(name, v1).tags
    assert tags["gate.decision"] == "promote" and tags["gate.stale"] == "false"
    assert tags["gate.compared_with"] == "none" and tags["gate.mode"] == "auto"
    assert registry.LOCK_TAG not in registry.client().get_registered_model(name).tags  # the lease was released


def test_reject_moves_nothing(store: dict, name: str) -> None:
    v1 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST)
    v2 = new_version(store["model_uri"], name)
    out = registry.apply_decision(name, v2, Decision("reject", ["accuracy 0.5 < minimum 0.9"], v1), lock=FAST)
    assert out.decision == "reject"
    assert _aliases(name) == {"champion": v1}
    assert len(registry.history(name)) == 1
    assert registry.client().get_model_version(name, v2).tags["gate.decision"] == "reject"


def test_needs_approval_sets_the_challenger_only(store: dict, name: str) -> None:
    v1 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST)
    v2 = new_version(store["model_uri"], name)
    out = registry.apply_decision(name, v2, Decision("needs-approval", ["manual mode"], v1, {"mode": "manual"}),
                                  lock=FAST)
    assert out.decision == "needs-approval" and out.reasons[-1] == f"approve with: tlops promote {name} {v2}"
    assert _aliases(name) == {"champion": v1, "challenger": v2}
    assert len(registry.history(name)) == 1


def test_stale_comparison_is_rejected_and_recorded(store: dict, name: str) -> None:
    v1 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST)
    v2 = new_version(store["model_uri"], name)
    # This candidate compared itself with "no champion", but version 1 became the champion meanwhile.
    out = registry.apply_decision(name, v2, _promote(None), lock=FAST)
    assert out.decision == "reject" and out.stale
    assert "comparison is stale" in out.reasons[-1] and f"to {v1}" in out.reasons[-1]
    assert _aliases(name) == {"champion": v1}
    tags = registry.client().get_model_version(name, v2).tags
    assert tags["gate.decision"] == "reject" and tags["gate.stale"] == "true"


def test_challenger_only_moves_forward_and_goes_when_overtaken(store: dict, name: str) -> None:
    v1, v2, v3 = (new_version(store["model_uri"], name) for _ in range(3))
    registry.apply_decision(name, v2, Decision("needs-approval", [], None), lock=FAST)
    registry.apply_decision(name, v1, Decision("needs-approval", [], None), lock=FAST)  # finished later, older
    assert _aliases(name) == {"challenger": v2}
    # Approving an older candidate leaves the newer challenger waiting.
    registry.promote(name, v1, lock=FAST)
    assert _aliases(name) == {"champion": v1, "challenger": v2}
    # A newer version promoted by the gate has overtaken the challenger: the alias goes.
    registry.apply_decision(name, v3, _promote(v1), lock=FAST)
    assert _aliases(name) == {"champion": v3}


def test_manual_promote_checks_the_gate_and_records_who_and_why(store: dict, name: str) -> None:
    v1 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST)
    v2 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v2, Decision("needs-approval", [], v1), lock=FAST)
    v3 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v3, Decision("reject", ["accuracy too low"], v1), lock=FAST)
    with pytest.raises(GateFailed, match=f"version {v3} did not pass its gate"):
        registry.promote(name, v3, lock=FAST)
    event = registry.promote(name, v2, reason="checked the report", who="bob", lock=FAST)
    assert event is not None and (event.action, event.from_version, event.to_version) == ("approve", v1, v2)
    assert _aliases(name) == {"champion": v2}  # the approved challenger is the champion now
    tags = registry.client().get_model_version(name, v2).tags
    assert tags["promotion.by"] == "bob" and tags["promotion.reason"] == "checked the report"
    assert registry.promote(name, v2, lock=FAST) is None  # already the champion: nothing recorded
    assert [e.action for e in registry.history(name)] == ["promote", "approve"]
    forced = registry.promote(name, v3, reason="hotfix, accepted risk", force=True, who="carol", lock=FAST)
    assert forced is not None and forced.action == "force-promote" and _aliases(name)["champion"] == v3


def test_manual_promote_refuses_evidence_against_an_older_champion(store: dict, name: str) -> None:
    v1 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST)
    v2 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v2, Decision("needs-approval", [], v1), lock=FAST)
    v3 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v3, _promote(v1), lock=FAST)  # auto-promoted meanwhile
    with pytest.raises(GateFailed, match=f"compared with champion version {v1}, but the champion is now version {v3}"):
        registry.promote(name, v2, lock=FAST)
    assert _aliases(name)["champion"] == v3


def test_rollback_walks_back_through_the_champions(store: dict, name: str) -> None:
    versions = [new_version(store["model_uri"], name) for _ in range(3)]
    previous = None
    for v in versions:
        registry.apply_decision(name, v, _promote(previous), lock=FAST)
        previous = v
    first = registry.rollback(name, reason="v3 misbehaves", who="dave", lock=FAST)
    assert (first.action, first.from_version, first.to_version, first.who) == ("rollback", versions[2], versions[1],
                                                                               "dave")
    second = registry.rollback(name, lock=FAST)
    assert (second.from_version, second.to_version) == (versions[1], versions[0])
    assert _aliases(name)["champion"] == versions[0]
    with pytest.raises(TlopsError, match="first champion"):
        registry.rollback(name, lock=FAST)
    events = registry.history(name)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [(e.action, e.to_version) for e in events] == [("promote", versions[0]), ("promote", versions[1]),
                                                          ("promote", versions[2]), ("rollback", versions[1]),
                                                          ("rollback", versions[0])]
    # A promotion after a rollback is rolled back to the champion before it, not to an older one.
    registry.promote(name, versions[2], reason="fixed", force=True, lock=FAST)
    assert registry.rollback(name, lock=FAST).to_version == versions[0]


def test_rollback_refuses_a_champion_moved_outside_tlops(store: dict, name: str) -> None:
    v1, v2 = new_version(store["model_uri"], name), new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST)
    registry.client().set_registered_model_alias(name, "champion", v2)  # by hand, in the MLflow UI
    with pytest.raises(TlopsError, match="moved outside tlops"):
        registry.rollback(name, lock=FAST)
    assert _aliases(name)["champion"] == v2


def test_rollback_without_history_uses_the_gate_tags(store: dict, name: str) -> None:
    """A store from before the history: the newest earlier version the gate promoted."""
    v1, v2, v3 = (new_version(store["model_uri"], name, **{"gate.decision": d}) for d in ("promote", "reject",
                                                                                         "promote"))
    registry.client().set_registered_model_alias(name, "champion", v3)
    assert registry.rollback(name, lock=FAST).to_version == v1
    assert _aliases(name)["champion"] == v1


def test_history_is_append_only_and_prints(store: dict, name: str) -> None:
    v1 = new_version(store["model_uri"], name)
    with registry.promotion_lock(name, "test", FAST):
        a = registry.append_history(name, "promote", None, v1, "erin", "first")
        b = registry.append_history(name, "promote", None, v1, "erin", "again")
    # Tags of the version that became the champion; none on the registered model, whose page lists the versions.
    assert not any(k.startswith(registry.HISTORY_PREFIX) for k in registry.client().get_registered_model(name).tags)
    tags = registry.client().get_model_version(name, v1).tags
    keys = sorted(k for k in tags if k.startswith(registry.HISTORY_PREFIX))
    assert keys == sorted([a.key, b.key]) and a.key != b.key
    assert json.loads(tags[a.key])["reason"] == "first"
    table = registry.format_history(name, registry.history(name))
    assert "erin" in table and "first" in table and table.index("first") < table.index("again")
    record = json.loads(registry.format_history(name, registry.history(name), "json"))
    assert [e["seq"] for e in record["events"]] == [1, 2] and record["champion"] is None


def test_history_written_on_the_registered_model_is_still_read(store: dict, name: str) -> None:
    """Stores from before the history moved to version tags: their events count, and new ones follow them."""
    v1 = new_version(store["model_uri"], name)
    old = registry.HistoryEvent(seq=1, at="2026-01-01T00:00:00+00:00", who="erin", action="promote",
                                from_version=None, to_version=v1, reason="older store")
    registry.client().set_registered_model_tag(name, f"{registry.HISTORY_PREFIX}000001.0000abcd", old.to_json())
    with registry.promotion_lock(name, "test", FAST):
        new = registry.append_history(name, "promote", v1, v1, "erin", "newer")
    assert new.seq == 2
    assert [(e.seq, e.reason) for e in registry.history(name)] == [(1, "older store"), (2, "newer")]


def test_the_decision_is_the_versions_description(store: dict, name: str) -> None:
    v1 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST, notes=["Evidence: the tags."])
    text = registry.client().get_model_version(name, v1).description
    assert text.splitlines()[0] == "**Gate: PROMOTE** (no champion to compare with; auto mode)"
    assert "- accuracy 0.9500 >= minimum 0.9000" in text and text.endswith("Evidence: the tags.")
    v2 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v2, Decision("reject", ["accuracy 0.5000 < minimum 0.9000"], v1,
                                               {"mode": "auto"}), lock=FAST)
    registry.promote(name, v2, reason="hotfix", force=True, who="erin", lock=FAST)
    text = registry.client().get_model_version(name, v2).description
    assert text.startswith(f"**Gate: REJECT** (compared with champion version {v1}; auto mode)")
    assert "**Champion** from" in text and "by erin (force-promote, `tlops promote`): hotfix" in text


@pytest.mark.parametrize("call", [
    lambda: registry.history("no-such-model"),
    lambda: registry.rollback("no-such-model"),
    lambda: registry.promote("no-such-model", "1"),
])
def test_unknown_model_is_a_clear_error(store: dict, call) -> None:
    use_store(store["uri"])
    with pytest.raises(TlopsError, match="'no-such-model' does not exist"):
        call()


def test_unknown_version_is_a_clear_error(store: dict, name: str) -> None:
    new_version(store["model_uri"], name)
    with pytest.raises(TlopsError, match="has no version 7"):
        registry.promote(name, "7", lock=FAST)
    with pytest.raises(TlopsError, match="expected a version number"):
        registry.promote(name, "latest", lock=FAST)


def test_a_live_lease_blocks_and_names_its_holder(store: dict, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.lock, "_sqlite_path", lambda: None)  # the lease alone, as against a server
    new_version(store["model_uri"], name)
    lease = {"token": "other", "owner": "someone@elsewhere pid 1: gate of version 9", "expires": time.time() + 60}
    registry.client().set_registered_model_tag(name, registry.LOCK_TAG, json.dumps(lease))
    t0 = time.monotonic()
    with pytest.raises(TlopsError, match="held by someone@elsewhere"), \
            registry.promotion_lock(name, "test", LockSettings(settle_s=0.05, timeout_s=1, poll_s=0.05)):
        pass
    assert time.monotonic() - t0 >= 1
    # The other holder's lease is left alone.
    assert json.loads(registry.client().get_registered_model(name).tags[registry.LOCK_TAG])["token"] == "other"


def test_an_expired_lease_is_taken_over_and_released(store: dict, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.lock, "_sqlite_path", lambda: None)
    new_version(store["model_uri"], name)
    dead = {"token": "dead", "owner": "crashed pipeline", "expires": time.time() - 1}
    registry.client().set_registered_model_tag(name, registry.LOCK_TAG, json.dumps(dead))
    with registry.promotion_lock(name, "test", FAST):
        held = json.loads(registry.client().get_registered_model(name).tags[registry.LOCK_TAG])
        assert held["token"] != "dead" and "test" in held["owner"]
    assert registry.LOCK_TAG not in registry.client().get_registered_model(name).tags


def test_the_sqlite_file_lock_excludes_another_process(store: dict, name: str) -> None:
    """While a process holds the lock file, another's attempt waits, then gives up with a clear error."""
    import subprocess
    import sys

    new_version(store["model_uri"], name)
    lock_file = Path(store["uri"][len("sqlite:///"):] + ".tlops-lock")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(lock_file)!r}, 'a+'); fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TlopsError, match="holds the registry lock file"), \
                registry.promotion_lock(name, "test", LockSettings(settle_s=0.05, timeout_s=1)):
            pass
    finally:
        holder.kill()
        holder.wait()
    with registry.promotion_lock(name, "test", FAST):  # free again once the holder is gone
        pass


def test_a_store_another_program_holds_ends_in_bounded_time(store: dict, name: str) -> None:
    """Another program holds the SQLite database's write lock (BEGIN IMMEDIATE; readers still read): every lease
    write is refused with "database is locked". The wait ends after ``refused_s`` with one line naming the
    store and the cause, not after the 300 s a live holder gets."""
    import subprocess
    import sys

    new_version(store["model_uri"], name)
    db = store["uri"][len("sqlite:///"):]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, time\n"
        f"c = sqlite3.connect({db!r}, isolation_level=None); c.execute('BEGIN IMMEDIATE')\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(TlopsError) as info, registry.promotion_lock(
                name, "test", LockSettings(settle_s=0.05, timeout_s=300, poll_s=0.05, refused_s=2)):
            pass
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    message = str(info.value)
    assert "\n" not in message and "refused every lease write for 2s" in message and "database is locked" in message
    assert store["root"].name in message and took < 60, (took, message)


@pytest.mark.parametrize("file_lock", [True, False], ids=["file-lock-and-lease", "lease-only"])
def test_two_pipelines_promoting_at_once_move_the_champion_once(store: dict, name: str, file_lock: bool) -> None:
    """Both candidates compared against version 1 and both would promote: only one may move the champion
    from version 1; the other sees that its comparison is stale and is recorded as a stale reject."""
    v1 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST)
    v2, v3 = new_version(store["model_uri"], name), new_version(store["model_uri"], name)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=race_worker, args=(store["uri"], name, v, v1, file_lock, barrier, results))
             for v in (v2, v3)]
    for p in procs:
        p.start()
    outcomes = {}
    for _ in procs:
        version, decision, stale = results.get(timeout=240)
        outcomes[version] = (decision, stale)
    for p in procs:
        p.join(timeout=60)
    assert sorted(outcomes.values()) == [("promote", False), ("reject", True)], outcomes
    winner = next(v for v, (d, _) in outcomes.items() if d == "promote")
    loser = next(v for v, (d, _) in outcomes.items() if d == "reject")
    assert _aliases(name)["champion"] == winner
    moves_from_v1 = [e for e in registry.history(name) if e.from_version == v1]
    assert [(e.to_version, e.via) for e in moves_from_v1] == [(winner, f"race {winner}")]
    tags = registry.client().get_model_version(name, loser).tags
    assert tags["gate.decision"] == "reject" and tags["gate.stale"] == "true"
    assert f"from version {v1} to {winner}" in tags["gate.reasons"]


def test_an_unknown_alias_is_named_as_an_alias_with_the_ones_there(store: dict, name: str) -> None:
    from tlops.registry.uri import parse_model_uri

    v1 = new_version(store["model_uri"], name)
    registry.apply_decision(name, v1, _promote(None), lock=FAST)
    assert parse_model_uri(f"models:/{name}@champion") == (name, v1)
    with pytest.raises(TlopsError) as err:
        parse_model_uri(f"models:/{name}@champoin")
    assert str(err.value) == (f"--model models:/{name}@champoin: no alias 'champoin' on model {name}; "
                              "aliases: champion; did you mean @champion?")
    with pytest.raises(TlopsError, match="registered model 'no-such-model' does not exist"):
        parse_model_uri("models:/no-such-model@champion")
