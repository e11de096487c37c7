"""The registry gate against a real `mlflow server` (SQL backend, HTTP, proxied artifacts) on loopback:
aliases, manual approval, history, rollback and the CLI commands over HTTP, the promotion race with the
registry lease as the only lock, and a champion whose files were deleted from the server."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers.registry import log_model_run, new_version, race_worker, use_store
from tlops import registry
from tlops.errors import TlopsError
from tlops.registry import Decision, LockSettings

pytestmark = pytest.mark.integration
LOCK = LockSettings(settle_s=0.3, timeout_s=60, poll_s=0.1)


@pytest.fixture(scope="module")
def server(mlflow_server: str, tiny_models: dict) -> dict:
    experiment = use_store(mlflow_server, experiment="registry-it")
    _run_id, model_uri = log_model_run(experiment, tiny_models["good"])
    return {"url": mlflow_server, "experiment": experiment, "model_uri": model_uri}


def _aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in registry.client().get_registered_model(name).aliases.items()}


def test_gate_aliases_and_cli_over_http(server: dict, tmp_path: Path) -> None:
    use_store(server["url"])
    name = "it-flow"
    v1 = new_version(server["model_uri"], name)
    registry.apply_decision(name, v1, Decision("promote", ["accuracy ok"], None, {"mode": "auto"}), lock=LOCK)
    v2 = new_version(server["model_uri"], name)
    out = registry.apply_decision(name, v2, Decision("needs-approval", ["manual"], v1, {"mode": "manual"}), lock=LOCK)
    assert out.decision == "needs-approval" and _aliases(name) == {"champion": v1, "challenger": v2}
    env = {"MLFLOW_TRACKING_URI": server["url"], "USER": "it-reviewer"}
    promoted = run_cli("promote", name, v2, "--reason", "approved over http", cwd=tmp_path, env=env)
    assert promoted.returncode == 0, promoted.stderr
    assert _aliases(name)["champion"] == v2
    rolled = run_cli("rollback", name, cwd=tmp_path, env=env)
    assert rolled.returncode == 0 and f"version {v2} -> version {v1}" in rolled.stdout, rolled.stderr
    shown = run_cli("history", name, "--format", "json", cwd=tmp_path, env=env)
    events = json.loads(shown.stdout)["events"]
    assert [(e["action"], e["to_version"], e["who"]) for e in events[1:]] == [
        ("approve", v2, "it-reviewer"), ("rollback", v1, "it-reviewer")]
    assert events[1]["reason"] == "approved over http"
    unknown = run_cli("promote", name, "42", cwd=tmp_path, env=env)
    assert unknown.returncode == 2 and unknown.stderr.strip() == f"error: model '{name}' has no version 42"
    # Nothing of this went to an embedded store.
    assert not (tmp_path / ".tlops").exists()


def test_two_promotions_at_once_through_the_server(server: dict) -> None:
    use_store(server["url"])
    name = "it-race"
    v1 = new_version(server["model_uri"], name)
    registry.apply_decision(name, v1, Decision("promote", [], None), lock=LOCK)
    v2, v3 = new_version(server["model_uri"], name), new_version(server["model_uri"], name)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=race_worker, args=(server["url"], name, v, v1, False, barrier, results))
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
    assert _aliases(name)["champion"] == winner
    assert [e.to_version for e in registry.history(name) if e.from_version == v1] == [winner]


def test_a_champion_deleted_from_the_server_is_a_clear_error(server: dict, tiny_models: dict,
                                                             tiny_digits: Path) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from tlops.config.settings import EvaluationConfig
    from tlops.data.discovery import build_manifest
    from tlops.evaluation import evaluate as evaluation

    use_store(server["url"])
    name = "it-lost"
    _run, own_uri = log_model_run(server["experiment"], tiny_models["good"])  # files of its own, deleted below
    v1 = new_version(own_uri, name)
    registry.apply_decision(name, v1, Decision("promote", [], None), lock=LOCK)
    get_artifact_repository(registry.client().get_model_version_download_uri(name, v1)).delete_artifacts()
    rows = evaluation.test_rows(build_manifest(str(tiny_digits), tiny_digits.parent / "it-cache"))
    with pytest.raises(TlopsError, match=f"champion {name} version {v1} cannot be loaded for comparison"):
        evaluation.evaluate(server["model_uri"], rows, evaluation.read_images(list(rows["path"])),
                            EvaluationConfig(latency_images=0), (name, v1))
    assert _aliases(name)["champion"] == v1
