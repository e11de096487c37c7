"""The whole pipeline through the CLI, as `make run` does it, on a tiny real data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config

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
                                                                        "evaluate", "gate"]


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
    leaked = [str(p) for p in files if CANARY.encode() in p.read_bytes()]
    assert leaked == []
    for run in (two_runs["first"], two_runs["second"]):
        assert CANARY not in run.stdout + run.stderr


def test_progress_reaches_the_terminal_with_no_silent_minute(two_runs: dict) -> None:
    """Piped (not a terminal): each step's progress as plain lines, the evaluate step's phases included, and
    never a minute without a line."""
    import re

    first, second = two_runs["first"].stdout, two_runs["second"].stdout
    # The first run computes the features (the second finds them in the feature cache).
    assert re.search(r"fine-tune: features train: \d+/\d+ images \([\d.]+ images/s", first)
    for expected in ("fine-tune: linear probe: L2 sweep", "evaluate: loading champion tiny-digits version 1",
                     "evaluate: loading the candidate", "evaluate: predicting with the candidate: ",
                     "evaluate: measuring latency at batch size 1", "gate: registering the candidate"):
        assert expected in second, expected
    assert re.search(r"evaluate: predicting with the champion version 1: \d+/\d+ images \([\d.]+ images/s", second)
    for out in (first, second):
        assert "[tlops-progress]" not in out
        stamps = [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in
                  re.findall(r"^(?:\[tlops\] )?(\d\d):(\d\d):(\d\d(?:\.\d+)?) ", out, re.M)]
        assert len(stamps) > 20
        gaps = [(b - a) % 86400 for a, b in zip(stamps, stamps[1:], strict=False)]
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
    for expected in ("step 1/5 validate", "step 3/5 fine-tune", "step 5/5 gate", "fine-tune: features train",
                     "evaluate: loading the candidate", "done: evaluate in"):
        assert expected in drawn, expected
    assert re.search(r"\d+/\d+ images · [\d.]+ images/s", drawn)
    assert list(tee.seconds) == ["validate", "parity", "fine-tune", "evaluate", "gate"]


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
