"""The whole pipeline through the CLI, as `make run` does it, on a tiny real data set."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import browser
from tests.conftest import run_cli, running_mlflow_server, write_config

# Credentials in the environment of every run: none may reach the tracking store, an artifact or a log.
# (A user name is no secret: MLflow records MLFLOW_TRACKING_USERNAME as the run's user, on purpose.)
CANARY = "tlops-canary-3c9d7a41"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": f"AKIA{CANARY}", "AWS_SECRET_ACCESS_KEY": CANARY, "AWS_SESSION_TOKEN": CANARY,
               "MLFLOW_TRACKING_USERNAME": "ci-runner", "MLFLOW_TRACKING_PASSWORD": CANARY,
               "MLFLOW_TRACKING_TOKEN": CANARY, "KF_PIPELINES_TOKEN": CANARY}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path) -> dict:
    cwd = tmp_path_factory.mktemp("e2e")
    cfg = write_config(cwd / "tlops.yaml", cwd / ".tlops")
    first = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=cwd, env=CREDENTIALS)
    second = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=cwd, env=CREDENTIALS)
    return {"cwd": cwd, "first": first, "second": second}


def test_first_run_promotes_version_1(two_runs: dict) -> None:
    first = two_runs["first"]
    assert first.returncode == 0, first.stderr[-2000:] + first.stdout[-2000:]
    out = first.stdout
    for expected in ("validation pass", "parity pass", "fingerprint", "test accuracy", "tiny-digits version 1",
                     "PROMOTE", "no champion yet"):
        assert expected in out, expected
    # Each step's wall time, in the order the steps ran.
    import re

    steps = re.search(r"^  steps +(.+)$", out, re.M)
    assert steps, out[-2000:]
    assert [part.split()[0] for part in steps.group(1).split(", ")] == ["validate", "parity", "fine-tune",
                                                                        "evaluate", "compress", "gate"]


def test_second_run_registers_version_2_compared_with_version_1(two_runs: dict) -> None:
    second = two_runs["second"]
    assert second.returncode == 0, second.stderr[-2000:] + second.stdout[-2000:]
    assert "tiny-digits version 2" in second.stdout
    assert "compared with champion version 1" in second.stdout


def test_registry_holds_both_versions_with_evidence(two_runs: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{two_runs['cwd'] / '.tlops' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    versions = {str(v.version): v for v in client.search_model_versions("name='tiny-digits'")}
    assert set(versions) == {"1", "2"}
    champion = client.get_model_version_by_alias("tiny-digits", "champion")
    assert str(champion.version) == "2"
    v2 = client.get_model_version("tiny-digits", "2")
    assert v2.tags["gate.compared_with"] == "1" and v2.tags["gate.decision"] == "promote"
    assert v2.tags["preprocess.fingerprint"] == versions["1"].tags["preprocess.fingerprint"]
    run = client.get_run(v2.tags["mlflow.run_id"])
    assert run.data.tags["preprocess.fingerprint"] == v2.tags["preprocess.fingerprint"]
    assert run.data.tags["validation"] == "pass" and run.data.tags["parity"] == "pass"
    assert "test_accuracy" in run.data.metrics and "champion.test_accuracy" in run.data.metrics
    # The embedded default keeps artifacts under the work dir, not in ./mlruns.
    assert (two_runs["cwd"] / ".tlops" / "mlartifacts").is_dir()
    assert not (two_runs["cwd"] / "mlruns").exists()


def test_the_registered_champion_serves_raw_image_bytes(two_runs: dict, tiny_digits: Path) -> None:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{two_runs['cwd'] / '.tlops' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/tiny-digits@champion")
    files = sorted(tiny_digits.glob("7/*.png"))[:3]
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert list(out["label"]) == ["7", "7", "7"]


def test_no_credential_reaches_the_store_artifacts_or_logs(two_runs: dict) -> None:
    work = two_runs["cwd"] / ".tlops"
    files = [p for p in work.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".log" for p in files)
    # One run log per run: what people (and the container tests) list as runs; the step server's is apart.
    assert len(list((work / "logs").glob("run-*.log"))) == 2
    assert len(list((work / "logs").glob("stepserver-*.log"))) == 2
    leaked = [str(p) for p in files if CANARY.encode() in p.read_bytes()]
    assert leaked == []
    for run in (two_runs["first"], two_runs["second"]):
        assert CANARY not in run.stdout + run.stderr


def _store(two_runs: dict) -> Any:
    import mlflow

    uri = f"sqlite:///{two_runs['cwd'] / '.tlops' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient()


def test_the_run_says_what_trained_it_in_mlflow(two_runs: dict, tiny_digits: Path) -> None:
    """Datasets per split (source, content hash as digest), a readable name, params a person can scan, the
    experiment's kind, the logged model named after the registered one, system metrics from the fine-tune step."""
    client = _store(two_runs)
    v2 = client.get_model_version_by_alias("tiny-digits", "champion")
    run = client.get_run(v2.run_id)
    digest = run.data.tags["data.manifest_hash"][:12]
    assert run.info.run_name == f"efficientnet_lite0 linear-probe on digits@{digest}"
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    for split, dataset in inputs.items():
        assert dataset.name == f"digits-{split}" and dataset.digest == digest
        assert str(tiny_digits) in dataset.source
        rows = json.loads(dataset.profile)["num_rows"]
        assert rows == run.data.metrics[f"data.split.{split}"]
    params = run.data.params
    assert params["backbone"] == "efficientnet_lite0" and params["train.strategy"] == "linear-probe"
    assert params["preprocess.image_size"] == "32" and params["train.l2_grid"] == "[0.001]" and "data.uri" in params
    assert "train.lr" not in params  # the linear probe has no learning rate
    assert len(params) < 40 and not any(k.startswith(("cluster.", "tracking.", "selection.")) for k in params)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_logged_model(v2.model_id or v2.source.removeprefix("models:/")).name == "tiny-digits"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    # The whole config, cluster section included, is the artifact.
    assert "cluster" in mlflow_json(client, run.info.run_id, "config/config.json")


def mlflow_json(client: Any, run_id: str, path: str) -> dict:
    import mlflow

    return json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)).read_text())


def test_the_decision_is_where_people_look(two_runs: dict) -> None:
    """The version's description, the report, the KFP Markdown; the history off the registered model's page."""
    import mlflow

    from tlops import registry

    client = _store(two_runs)
    v2 = client.get_model_version("tiny-digits", "2")
    assert v2.description.startswith("**Gate: PROMOTE** (compared with champion version 1; auto mode)")
    assert "- data validation passed" in v2.description and v2.tags["preprocess.fingerprint"] in v2.description
    model = client.get_registered_model("tiny-digits")
    assert not any(k.startswith(registry.HISTORY_PREFIX) for k in model.tags) and not model.description
    events = registry.history("tiny-digits")
    assert [(e.action, e.from_version, e.to_version) for e in events] == [("promote", None, "1"),
                                                                          ("promote", "1", "2")]
    page = Path(mlflow.artifacts.download_artifacts(run_id=v2.run_id, artifact_path="evaluation/report.html"))
    text = page.read_text(encoding="utf-8")
    for expected in ("Gate decision", "PROMOTE", "tiny-digits version <b>2</b>", v2.tags["preprocess.fingerprint"],
                     "Training curves", "content hash (images, labels, splits)", "train split"):
        assert expected in text, expected
    (markdown,) = [p for p in (two_runs["cwd"] / ".tlops" / "pipeline_root").rglob("gate/decision_markdown")
                   if "PROMOTE — tiny-digits version 2" in p.read_text()]
    assert "| test accuracy |" in markdown.read_text()


def _shots(tmp_path: Path) -> Path:
    """Where the screenshots go: ``$TLOPS_SCREENSHOTS`` (to look at them), else the test's own folder."""
    out = Path(os.environ.get("TLOPS_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.skipif(browser.CHROMIUM is None, reason=browser.MISSING)
def test_report_and_data_docs_render_offline_in_a_browser(two_runs: dict, tmp_path: Path) -> None:
    import mlflow

    client = _store(two_runs)
    run_id = client.get_model_version("tiny-digits", "2").run_id
    shots = _shots(tmp_path)
    report = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluation/report.html"))
    rgb = browser.screenshot(report.as_uri(), shots / "evaluation-report.png", height=1600)
    badge = (abs(rgb - np.array([198, 246, 213])).sum(axis=2) < 20).sum()  # the PROMOTE badge's pale green
    assert badge > 1500, badge
    assert (rgb.min(axis=2) < 235).mean() > 0.05

    docs = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="validation/data_docs"))
    pages = [p.read_text(encoding="utf-8") for p in docs.rglob("*.html")]
    assert pages and not any(re.search(r"<(script|link|img)\b[^>]*(src|href)=[\"']https?://", p) for p in pages)
    index = browser.dom(docs.joinpath("index.html").as_uri())
    assert re.search(r"Showing 1 to [0-9]+ of [0-9]+ rows", index)  # drawn by bootstrap-table, offline
    rgb = browser.screenshot(docs.joinpath("index.html").as_uri(), shots / "data-docs-index.png", height=800)
    assert browser.green_pixels(rgb) > 100  # the passed checks' icons (Font Awesome, Bootstrap's colours)
    (files,) = docs.glob("validations/tlops_files/*/*/*.html")
    rgb = browser.screenshot(files.as_uri(), shots / "data-docs-files.png")
    assert browser.green_pixels(rgb) > 500
    # The same page without its vendored files (as with a CDN out of reach) loses its styles: the check can fail.
    shutil.rmtree(docs / "static" / "vendor")
    bare = browser.screenshot(files.as_uri(), tmp_path / "bare.png")
    assert browser.green_pixels(bare) < browser.green_pixels(rgb) / 10


@pytest.mark.slow
@pytest.mark.skipif(browser.CHROMIUM is None, reason=browser.MISSING)
def test_mlflow_ui_shows_datasets_and_the_decision(two_runs: dict, tmp_path: Path) -> None:
    """The MLflow UI itself (`mlflow server` on the run's store) in headless Chromium: the run page lists its
    datasets, the version page shows the gate's decision as its description."""
    client = _store(two_runs)
    v2 = client.get_model_version("tiny-digits", "2")
    run = client.get_run(v2.run_id)
    shots = _shots(tmp_path)
    with running_mlflow_server(two_runs["cwd"] / ".tlops") as url:
        # MLflow 3.17's UI also has a per-browser "GenAI / Model training" switch (default GenAI): set it as a link can.
        run_page = f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
        html = browser.dom(run_page, wait_ms=20000)
        # The panel names the first dataset with its digest and context, and counts the others.
        assert run.info.run_name in html and "digits-train" in html and "+2" in html, html[-3000:]
        browser.screenshot(run_page, shots / "mlflow-run.png", height=1400, wait_ms=20000)
        version_page = f"{url}/#/models/tiny-digits/versions/2"
        html = browser.dom(version_page, wait_ms=20000)
        assert "Gate: PROMOTE" in html and "data validation passed" in html, html[-3000:]
        browser.screenshot(version_page, shots / "mlflow-model-version.png", height=1200, wait_ms=20000)
        model_page = f"{url}/#/models/tiny-digits"
        html = browser.dom(model_page, wait_ms=20000)
        assert "Version 2" in html and "Version 1" in html, html[-3000:]
        browser.screenshot(model_page, shots / "mlflow-model.png", height=900, wait_ms=20000)


def test_progress_reaches_the_terminal_with_no_silent_minute(two_runs: dict) -> None:
    """Piped (not a terminal): each step's progress as plain lines, the evaluate step's phases included, and
    never a minute without a line."""
    import re

    first, second = two_runs["first"].stdout, two_runs["second"].stdout
    # The first run computes the features (the second finds them in the feature cache).
    assert re.search(r"fine-tune: features train: \d+/\d+ images \([\d.]+ images/s", first)
    for expected in ("fine-tune: linear probe: L2 sweep", "evaluate: loading champion tiny-digits version 1",
                     "evaluate: loading the candidate", "evaluate: predicting with the candidate",
                     "evaluate: measuring latency at batch size 1", "gate: registering the candidate"):
        assert expected in second, expected
    assert "evaluate: predicting with the champion version 1" in second
    for out in (first, second):
        assert "[tlops-progress]" not in out
        stamps = [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in
                  re.findall(r"^(?:\[tlops\] )?(\d\d):(\d\d):(\d\d(?:\.\d+)?) ", out, re.M)]
        assert len(stamps) > 20
        # A step's lines carry whole seconds, kfp's milliseconds: a step's first line can read up to a second
        # before the "Executing task" line printed just ahead of it (steps start at once from the step server).
        gaps = [(b - a + 1) % 86400 - 1 for a, b in zip(stamps, stamps[1:], strict=False)]
        assert max(gaps) < 60, max(gaps)


def test_the_live_view_draws_a_real_run(two_runs: dict) -> None:
    """The first run's own log (what its steps streamed) replayed through the live display of a terminal."""
    import io
    import re

    from rich.console import Console

    from pipelines.local import _Tee
    from pipelines.view import LiveView

    log = Path(two_runs["first"].stdout.rsplit("log            ", 1)[1].strip())
    screen = io.StringIO()
    view = LiveView(screen, console=Console(file=screen, force_terminal=True, width=160))
    tee = _Tee(io.StringIO(), view, verbose=False)
    for line in log.read_text(encoding="utf-8").splitlines(keepends=True):
        tee.write(line)
        view.progress.refresh()
    view.close()
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    for expected in ("step 1/6 validate", "step 3/6 fine-tune", "step 6/6 gate", "fine-tune: features train",
                     "evaluate: loading the candidate", "done: evaluate in"):
        assert expected in drawn, expected
    assert re.search(r"\d+/\d+ images · [\d.]+ images/s", drawn)
    assert list(tee.seconds) == ["validate", "parity", "fine-tune", "evaluate", "compress", "gate"]


@pytest.mark.slow
def test_fail_on_reject_exits_1_when_the_gate_rejects(two_runs: dict, tiny_digits: Path) -> None:
    """For CI: a run whose candidate the gate rejects (weights over a 1 MB budget) exits 1 with one line; the
    champion stays. Runs after the tests above, which count the versions."""
    import mlflow

    cfg = two_runs["cwd"] / "tlops.yaml"
    result = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), "--set", "gate.max_model_size_mb=1",
                     "--fail-on-reject", cwd=two_runs["cwd"])
    assert result.returncode == 1, result.stderr[-2000:] + result.stdout[-2000:]
    assert "gate           REJECT" in result.stdout and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: gate: tiny-digits version 3 rejected (--fail-on-reject)"
    client = mlflow.MlflowClient(f"sqlite:///{two_runs['cwd'] / '.tlops' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("tiny-digits", "champion").version) == "2"
