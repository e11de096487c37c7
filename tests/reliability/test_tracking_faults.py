"""Faults during a pipeline run against a real `mlflow server`: the fine-tune process killed mid-epoch, then the
tracking server stopped in the middle of a run. Nothing already written is lost, the registry is left unchanged,
and the rerun resumes from the last checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, running_mlflow_server, write_config
from tlops.tracking import RETRY_ENV

MODEL = "faults-digits"


def _versions(url: str) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))


def _tlops_run(cwd: Path, cfg: Path, data: Path, url: str, *extra: str,
               on_line: tuple[str, threading.Event] | None = None, timeout: int = 400) -> tuple[int, str, str]:
    """``tlops run`` as a subprocess; ``on_line`` sets an event when a line of its output contains a text."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    for name in RETRY_ENV:  # the config's retry policy applies, not the caller's
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "tlops", "run", "--config", str(cfg), "--data", str(data), *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []

    def pump() -> None:  # the only reader of stdout, so that no line reaches the event late
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if on_line and on_line[0] in line:
                on_line[1].set()

    readers = [threading.Thread(target=pump, daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    for reader in readers:
        reader.join(timeout=10)
    return proc.returncode, "".join(out), "".join(err)


def _config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tlops.yaml", tmp_path / ".tlops", registry__model_name=MODEL,
                        train__strategy="full", train__head_init="random", train__epochs=2, train__batch_size=8,
                        train__patience=None,
                        train__checkpoint_every_steps=2, tracking__retries=1, tracking__backoff_factor=1,
                        tracking__timeout_s=5)


def _stop_server_during_fine_tune(tmp_path: Path, cfg: Path, data: Path, server_root: Path, port: int) -> str:
    """Start the server, start a run, stop the server once the fine-tune step runs; returns the run's stderr."""
    fine_tune_started = threading.Event()
    result: dict[str, tuple[int, str, str]] = {}
    with running_mlflow_server(server_root, port=port, crash_on_exit=True) as url:
        runner = threading.Thread(target=lambda: result.setdefault("run", _tlops_run(
            tmp_path, cfg, data, url, on_line=("fine-tune", fine_tune_started))), daemon=True)
        runner.start()
        deadline = time.monotonic() + 400
        while not fine_tune_started.wait(timeout=1) and runner.is_alive() and time.monotonic() < deadline:
            pass
        assert fine_tune_started.is_set(), f"the fine-tune step never started: {result.get('run')}"
    # Leaving the block killed the server (and its workers) as the fine-tune step started.
    runner.join(timeout=400)
    rc, out, err = result["run"]
    assert rc == 2, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert f"fine-tune: the MLflow tracking server at {url} did not answer after 1 retries" in err, err
    return err


def _registry(server_root: Path) -> object:
    import mlflow

    uri = f"sqlite:///{server_root / 'mlflow.db'}"  # the server's own store, read while it is down
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.integration
def test_tracking_server_stopped_mid_run_fails_clearly_and_loses_nothing(tmp_path: Path, tiny_digits: Path) -> None:
    cfg, server_root = _config(tmp_path), tmp_path / "mlflow"
    _stop_server_during_fine_tune(tmp_path, cfg, tiny_digits, server_root, free_port())
    # The checkpoint written while the server was down is complete: training ran on to its end.
    (last,) = (tmp_path / ".tlops" / "checkpoints").glob("*/last.pt")
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] > 2
    # What the earlier steps logged is still there; the registry holds no version.
    client = _registry(server_root)
    (run,) = client.search_runs([client.get_experiment_by_name("tlops").experiment_id])  # type: ignore[attr-defined]
    assert run.data.tags["validation"] == "pass" and run.data.tags["parity"] == "pass"
    logged = {p.name for p in (server_root / "artifacts").rglob("*") if p.is_file()}
    assert any(name.endswith(".html") for name in logged), logged
    assert client.search_registered_models() == []  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.integration
def test_killed_fine_tune_then_stopped_tracking_server_then_resume(tmp_path: Path, tiny_digits: Path) -> None:
    cfg, server_root, port = _config(tmp_path), tmp_path / "mlflow", free_port()
    checkpoints = tmp_path / ".tlops" / "checkpoints"

    # 1. The fine-tune process dies (SIGKILL) in its first epoch, after the checkpoint of step 2.
    with running_mlflow_server(server_root, port=port) as url:
        rc, out, err = _tlops_run(tmp_path, cfg, tiny_digits, url, "--set", "train.stop_after_steps=3")
        assert rc != 0, out[-2000:]
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
        assert "fine-tune" in err, err
        assert _versions(url) == []
    (last,) = checkpoints.glob("*/last.pt")
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)

    # 2. The tracking server stops while the rerun trains (from step 2) to its end.
    _stop_server_during_fine_tune(tmp_path, cfg, tiny_digits, server_root, port)
    state = torch.load(last, map_location="cpu", weights_only=True)
    finished_at = int(state["global_step"])
    assert finished_at > 2

    # 3. The server is back: the registry was left unchanged, and the rerun resumes from the last checkpoint.
    with running_mlflow_server(server_root, port=port) as url:
        assert _versions(url) == []
        rc, out, err = _tlops_run(tmp_path, cfg, tiny_digits, url)
        assert rc == 0, out[-3000:] + err[-2000:]
        assert _versions(url) == ["1"]
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        run = client.get_run(client.get_model_version(MODEL, "1").run_id)
        assert run.data.tags["train.resumed_at_step"] == str(finished_at)
