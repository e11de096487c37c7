"""The step server (pipelines.stepserver): a step forked from it runs as the same command started afresh would
(arguments, environment, working directory, standard streams, exit status), and a step still runs when there is
no server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import stepserver

REPO = Path(__file__).resolve().parents[2]
MODULE = """
import gc, os, sys
data = sys.stdin.read()
print("argv", sys.argv[1:], "cwd", os.getcwd(), "var", os.environ.get("STEP_VAR"), "main", __name__,
      "stdin", data.strip(), "gc", gc.isenabled())
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), *sys.path]),
            stepserver.PRELOAD_ENV: "0", **extra}


def _run(cmd: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input="hello\n", capture_output=True, text=True, cwd=tmp_path / "work", env=env,
                          timeout=120)


@pytest.mark.parametrize("code", ["0", "3"])
def test_a_step_through_the_server_runs_as_the_same_command_started_afresh(tmp_path: Path, code: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "step_module.py").write_text(MODULE)
    (tmp_path / "work").mkdir()
    monkeypatch.setenv(stepserver.PRELOAD_ENV, "0")
    monkeypatch.setenv("PYTHONPATH", _env(tmp_path)["PYTHONPATH"])
    env = _env(tmp_path, STEP_VAR="given to the step")
    direct = _run([sys.executable, "-m", "step_module", code, "x y"], tmp_path, env)
    with stepserver.running() as path:
        assert path is not None
        served = _run([sys.executable, "-m", "pipelines.stepserver", path, "step_module", code, "x y"], tmp_path,
                      env)
        # The same command as kfp.local writes it, routed through the server.
        shell = stepserver.route_command(["sh", "-c", f"{sys.executable} -m kfp.dsl.executor_main \"$@\"", "--",
                                          "a"], path)
        assert shell[2] == f"{sys.executable} -m pipelines.stepserver {path} kfp.dsl.executor_main \"$@\""
    assert served.returncode == direct.returncode == int(code)
    assert served.stdout == direct.stdout
    assert "'x y'" in direct.stdout and "given to the step" in direct.stdout and "stdin hello" in direct.stdout
    assert f"cwd {tmp_path / 'work'}" in direct.stdout and "main __main__" in direct.stdout
    assert served.stderr == direct.stderr == "to stderr\n"


def test_without_a_server_the_client_runs_the_step_itself(tmp_path: Path) -> None:
    (tmp_path / "step_module.py").write_text(MODULE)
    (tmp_path / "work").mkdir()
    env = _env(tmp_path, STEP_VAR="v")
    out = _run([sys.executable, "-m", "pipelines.stepserver", str(tmp_path / "none.sock"), "step_module", "4"],
               tmp_path, env)
    assert out.returncode == 4 and "argv ['4']" in out.stdout and "var v" in out.stdout


def test_turned_off_there_is_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stepserver.ENV, "0")
    with stepserver.running() as path:
        assert path is None


PROBE = """
import gc
import sys
import time
print("torch", "torch" in sys.modules, "gx", "great_expectations" in sys.modules)
print("gc on", gc.isenabled(), "imports frozen", gc.get_freeze_count() > 100_000)
"""


def test_the_torch_steps_have_a_server_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the imports every step needs, the server splits: validate, gate and skip are forked from a server
    with GX and no torch, the other steps from one with torch loaded, each routed by kfp's function name."""
    (tmp_path / "probe_module.py").write_text(PROBE)
    (tmp_path / "work").mkdir()
    monkeypatch.delenv(stepserver.PRELOAD_ENV, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), str(REPO / "src"), *sys.path]))
    env = {**os.environ}

    def kfp_command(function: str) -> list[str]:
        return ["sh", "-c", f"{sys.executable} -m kfp.dsl.executor_main \"$@\"", "--", "--executor_input", "{}",
                "--function_to_execute", function]

    with stepserver.running() as path:
        assert path is not None
        heavy = stepserver.heavy_socket(path)
        assert stepserver.route_command(kfp_command("parity"), path)[2].split()[3] == path  # no second one yet
        deadline = time.monotonic() + 120
        while not os.path.exists(heavy) and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = {}
        for function in ("validate", "parity", "gate", "fine_tune"):
            routed = stepserver.route_command(kfp_command(function), path)[2].split()[3]
            assert routed == (path if function in stepserver.LIGHT_STEPS else heavy)
            seen[function] = _run([sys.executable, "-m", "pipelines.stepserver", routed, "probe_module"], tmp_path,
                                  env).stdout.strip()
    # A step collects garbage as a new process does, but never traverses what its server imported (frozen before
    # the fork, as Python advises for a process that forks without exec).
    assert seen["validate"] == seen["gate"] == "torch False gx True\ngc on True imports frozen True"
    assert seen["parity"] == seen["fine_tune"] == "torch True gx False\ngc on True imports frozen True"


def test_every_module_the_servers_preload_exists() -> None:
    """The stages name modules of MLflow, GX, scikit-image and others that the steps import when they run: a name
    a library dropped would only be a line in the server's log and a slower step, so it fails here instead."""
    stages = [*stepserver.COMMON, *stepserver.LIGHT, *stepserver.LIGHT_LATER, *stepserver.HEAVY,
              *stepserver.HEAVY_LATER]
    code = ("import importlib, os, sys\nos.environ['_KFP_RUNTIME'] = 'true'\nbad = []\n"
            f"for name in {stages!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as exc:\n        bad.append(f'{name}: {exc}')\n"
            "print('\\n'.join(bad) or 'ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src"), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr
