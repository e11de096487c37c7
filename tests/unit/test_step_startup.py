"""What a step loads before its first line of work, started as its container starts it: the command kfp compiles
for the component (``sh -ec`` writing the component's source to a file, ``_KFP_RUNTIME=true python3 -m
kfp.dsl.executor_main``), with the executor swapped for bench/bench_container_startup.py's driver, which loads the
component as the executor does and runs the imports at the head of the component and of its step function. Each
module loaded there is paid at every start of the step's container (a pod on a cluster); without containers here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH = ("torch", "timm", "torchvision")


def _bench() -> ModuleType:
    path = REPO / "bench" / "bench_container_startup.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_step(step: str, tmp_path: Path) -> dict:
    """Start ``step`` as its container does, up to its first line of work; the driver's report."""
    import components.steps

    bench = _bench()
    container = getattr(components.steps, step).component_spec.implementation.container
    driver = tmp_path / "driver.py"
    driver.write_text(bench.DRIVER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"  # the image's python3: this environment's (a symlink would lose the venv)
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    command = bench.with_driver(container.command, container.args, driver=str(driver))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO / "src"),
           "TMPDIR": str(tmp_path)}
    env.pop("_KFP_RUNTIME", None)  # the compiled command sets it
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


@pytest.mark.parametrize("step", ["validate", "gate"])
def test_validate_and_gate_start_without_torch(step: str, tmp_path: Path) -> None:
    """Neither step runs a model: torch, timm and torchvision (about 1.2 s of imports on a quiet machine, more in
    a cold container) stay out of their start-up. validate loads torch only in the branch that ranks backbones."""
    report = start_step(step, tmp_path)
    assert "mlflow" in report["loaded"] and report["modules"] > 500, report  # the step's own imports ran
    assert [m for m in TORCH if m in report["loaded"]] == [], report


@pytest.mark.parametrize("step", ["parity", "evaluate", "compress"])
def test_a_step_starts_without_kfps_client(step: str, tmp_path: Path) -> None:
    """kfp's client (the kubernetes package, kfp_server_api) is for submitting pipelines, not for a step: kfp loads
    it unless the step's command sets _KFP_RUNTIME=true, as the compiled command does."""
    report = start_step(step, tmp_path)
    assert report["modules"] > 300, report
    assert "kubernetes" not in report["loaded"], report
