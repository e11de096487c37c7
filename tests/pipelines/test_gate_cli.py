"""The gate end to end through the CLI: manual approval, promote, history, rollback, bad input, and a
champion whose files are gone. Two pipeline runs share one store; the last test makes a third."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import run_cli, write_config

NAME = "gate-digits"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path) -> dict:
    cwd = tmp_path_factory.mktemp("gate-cli")
    cfg = write_config(cwd / "c.yaml", cwd / ".tlops", registry__model_name=NAME)
    first = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=cwd)
    assert first.returncode == 0, first.stderr[-2000:] + first.stdout[-2000:]
    # --fail-on-reject: a candidate waiting for approval is no reject, the run exits 0.
    second = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), "--set", "gate.mode=manual",
                     "--fail-on-reject", cwd=cwd)
    return {"cwd": cwd, "cfg": cfg, "data": tiny_digits, "first": first, "second": second,
            "uri": f"sqlite:///{cwd / '.tlops' / 'mlflow.db'}"}


def _client(store: dict):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=store["uri"], registry_uri=store["uri"])


def _aliases(store: dict) -> dict[str, str]:
    return {k: str(v) for k, v in _client(store).get_registered_model(NAME).aliases.items()}


def _tlops(store: dict, *args: str):
    return run_cli(*args, "--config", str(store["cfg"]), cwd=store["cwd"])


def test_first_run_summary_shows_the_new_figures(store: dict) -> None:
    out = store["first"].stdout
    for expected in ("PROMOTE", "no champion yet", "top-2 ", "lowest class recall", "ECE ",
                     "serving        latency p50", "(batch size 1, CPU", "weights 13.7 MB",
                     "aliases        champion version 1, challenger version none", "report         file://"):
        assert expected in out, expected


def test_manual_mode_stops_at_challenger(store: dict) -> None:
    second = store["second"]
    assert second.returncode == 0, second.stderr[-2000:] + second.stdout[-2000:]
    out = second.stdout
    assert f"{NAME} version 2" in out and "NEEDS-APPROVAL (compared with champion version 1)" in out
    assert f"approve with: tlops promote {NAME} 2" in out and "paired bootstrap CI" in out
    assert "aliases        champion version 1, challenger version 2" in out
    assert _aliases(store) == {"champion": "1", "challenger": "2"}
    tags = _client(store).get_model_version(NAME, "2").tags
    assert tags["gate.decision"] == "needs-approval" and tags["gate.mode"] == "manual"
    assert tags["gate.compared_with"] == "1" and tags["tlops.pipeline_run"].startswith("tlops-")
    assert len(tags["config.hash"]) == 64 and tags["git.commit"]
    assert tags["comparison.mcnemar_p"] and tags["latency_p95_ms"]


def test_kubeflow_outputs_of_evaluate(store: dict) -> None:
    """The evaluate task's ClassificationMetrics (confusion matrix), Metrics and HTML report."""
    runs = sorted((store["cwd"] / ".tlops" / "pipeline_root").glob("tlops-transfer-learning-*/evaluate"))
    task = runs[-1]
    out = json.loads((task / "executor_output.json").read_text())["artifacts"]
    matrix = out["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [a["displayName"] for a in matrix["annotationSpecs"]] == ["0", "1", "7"]
    assert sum(sum(r["row"]) for r in matrix["rows"]) == out["metrics"]["artifacts"][0]["metadata"]["n"]
    assert {"accuracy", "top_2", "ece", "latency_p95_ms", "champion_accuracy"} <= set(
        out["metrics"]["artifacts"][0]["metadata"])
    page = Path(out["report_html"]["artifacts"][0]["uri"]).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "champion (version 1)" in page


def test_promote_history_rollback(store: dict) -> None:
    promoted = _tlops(store, "promote", NAME, "2", "--reason", "report reviewed")
    assert promoted.returncode == 0, promoted.stderr
    assert f"champion of {NAME}: version 1 -> version 2 (approve by" in promoted.stdout
    assert _aliases(store) == {"champion": "2"}
    rolled = _tlops(store, "rollback", NAME, "--reason", "latency complaints")
    assert rolled.returncode == 0, rolled.stderr
    assert f"champion of {NAME}: version 2 -> version 1 (rollback by" in rolled.stdout
    assert _aliases(store)["champion"] == "1"
    table = _tlops(store, "history", NAME)
    assert table.returncode == 0 and "report reviewed" in table.stdout and "latency complaints" in table.stdout
    events = json.loads(_tlops(store, "history", NAME, "--format", "json").stdout)["events"]
    assert [(e["action"], e["from_version"], e["to_version"]) for e in events] == [
        ("promote", None, "1"), ("approve", "1", "2"), ("rollback", "2", "1")]
    assert all(e["who"] and e["at"].endswith("+00:00") for e in events)


@pytest.mark.parametrize(("args", "needle"), [
    (["promote", "no-such-model", "1"], "'no-such-model' does not exist"),
    (["promote", NAME, "99"], "has no version 99"),
    (["promote", NAME, "two"], "expected a version number"),
    (["promote", NAME, "1", "--force"], "--force needs --reason"),
    (["rollback", "no-such-model"], "'no-such-model' does not exist"),
    (["history", "no-such-model"], "'no-such-model' does not exist"),
    (["history", NAME, "--format", "xml"], "choose table or json"),
])
def test_bad_registry_commands_are_one_line_errors(store: dict, args: list[str], needle: str) -> None:
    result = _tlops(store, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


@pytest.mark.slow  # a third pipeline run (about 35 s)
def test_a_champion_whose_files_are_gone_stops_the_run_and_stays(store: dict) -> None:
    client = _client(store)
    champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    files = Path(urlparse(client.get_model_version_download_uri(NAME, champion)).path)
    assert (files / "MLmodel").is_file()
    shutil.rmtree(files)
    result = run_cli("run", "--config", str(store["cfg"]), "--data", str(store["data"]), cwd=store["cwd"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: evaluate: champion {NAME} version {champion} cannot be loaded"), lines[0]
    assert _aliases(store)["champion"] == champion
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2  # the failed run registered nothing
