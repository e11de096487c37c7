"""What `tlops run` does before its first step: the step server starts first and stops at once when the launch
fails, the input check imports no torch, and a new SQLite store is made ahead, complete or not at all."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import local, stepserver
from tlops.config.settings import Config

REPO = Path(__file__).resolve().parents[2]


def test_the_step_server_stops_at_once_when_the_launch_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad input found before any step: the launcher does not wait for the server's import stage to end."""
    (tmp_path / "slow_stage.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), *sys.path]))
    monkeypatch.setenv(stepserver.PRELOAD_ENV, "slow_stage")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="bad input"), stepserver.running() as path:
        assert path is not None
        time.sleep(0.5)  # the server is inside the 60 s import
        raise RuntimeError("bad input")
    assert time.monotonic() - started < 20


def test_the_input_check_imports_no_torch(tiny_digits: Path) -> None:
    code = ("import sys; from tlops.cli import preflight; print(preflight(sys.argv[1], 'efficientnet_lite0')); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_digits)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])})
    assert out.stdout.split("\n")[-2:] == ["False", ""], out.stdout
    assert out.stdout.startswith(tuple("123456789")) and " files" in out.stdout


def _cfg(tmp_path: Path) -> Config:
    return Config().model_copy(update={"workdir": str(tmp_path / "work")})


def test_a_new_sqlite_store_is_made_ahead_with_the_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(stepserver.ENV, "0")  # the store alone
    cfg = _cfg(tmp_path)
    with local.launched(cfg) as launch:
        assert launch.store is not None
        launch.ready()
        db = tmp_path / "work" / "mlflow.db"
        with sqlite3.connect(db) as con:
            names = [r[0] for r in con.execute("select name from experiments order by experiment_id")]
            location = con.execute("select artifact_location from experiments where name = ?",
                                   (cfg.tracking.experiment,)).fetchone()[0]
        assert cfg.tracking.experiment in names
        assert location == (tmp_path / "work" / "mlartifacts").resolve().as_uri()  # as the steps' setup makes it
        assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith((".mlflow", "mlflow"))) == [
            "mlflow.db"]  # no temporary store left
    # A store that is there already is left to the steps.
    with local.launched(cfg) as launch:
        assert launch.store is None


def test_a_store_that_appeared_meanwhile_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(stepserver.ENV, "0")
    cfg = _cfg(tmp_path)
    with local.launched(cfg) as launch:
        assert launch.store is not None
        db = tmp_path / "work" / "mlflow.db"
        db.write_bytes(b"made by another process")
        launch.ready()
    assert db.read_bytes() == b"made by another process"
    assert [p.name for p in db.parent.iterdir() if p.name.endswith(".new")] == []


def test_a_store_that_cannot_be_made_ahead_is_left_to_the_steps(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The preparing process fails (here: an experiment name the store refuses): no store, no leftover; the first
    step makes the store itself and says what is wrong."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(stepserver.ENV, "0")
    cfg = _cfg(tmp_path)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"experiment": ""})})
    with local.launched(cfg) as launch:
        assert launch.store is not None
        launch.ready()
    work = tmp_path / "work"
    assert not (work / "mlflow.db").exists()
    assert [p.name for p in work.iterdir() if p.name.startswith(".mlflow")] == []


def test_a_step_body_is_profiled_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``TLOPS_PROFILE_DIR``: each step's body under cProfile, written to DIR/NAME.prof, readable by pstats."""
    import pstats

    from tlops.steps import PROFILE_ENV, step

    def busy_work() -> int:
        return sum(i * i for i in range(20_000))

    @step
    def probe_step() -> int:
        return busy_work()

    assert probe_step() > 0
    assert not (tmp_path / "prof").exists()
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "prof"))
    assert probe_step() > 0
    stats = pstats.Stats(str(tmp_path / "prof" / "probe.prof"))
    assert any(func[2] == "busy_work" for func in stats.stats)  # type: ignore[attr-defined]


def test_a_failed_launch_drops_the_store_being_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad input found before any step: nothing of the store is left, no step-server log, and no wait."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    started = time.monotonic()
    with pytest.raises(ValueError, match="bad input"), local.launched(cfg) as launch:
        assert launch.store is not None
        raise ValueError("bad input")
    assert time.monotonic() - started < 10
    work = tmp_path / "work"
    assert list(work.iterdir()) == []


def test_a_failed_launch_in_containers_leaves_nothing_either(tmp_path: Path) -> None:
    """With --image nothing is started here, and a bad input found before any step leaves no logs folder."""
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="bad input"), \
            local.launched(cfg, local.Containers(image="localhost/tlops:0.1.0")) as launch:
        assert launch.server is None and launch.store is None
        raise ValueError("bad input")
    assert list((tmp_path / "work").iterdir()) == []
