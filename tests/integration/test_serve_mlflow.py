"""The registered model is self-contained: MLflow's own `mlflow models serve --env-manager local`, run from a
Python environment that holds the model's declared requirements but not tlops, loads a registered version from a
real `mlflow server`, answers with the predictions `tlops serve` gives, and refuses hostile images with a clear
400 (the image limits travel with the model), quickly."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port, stop
from tests.integration.test_serve import (
    _invoke,
    _png,
    _png_declaring,
    images,  # noqa: F401 - the module-scoped fixture of real image files
    running_serve,
)

pytestmark = pytest.mark.integration
NAME = "serve-mlflow"

# Run in the environment without tlops: load the model and predict, then every third-party module the bundled
# code imports (at its top or in a function) and that was really imported, by distribution, against the model's
# requirements.txt; and where tlops came from.
CLOSURE = r"""
import ast, json, sys, importlib.metadata as md
from pathlib import Path
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(pd.DataFrame({"image": [open(sys.argv[2], "rb").read()]}))
code = Path(sys.modules["tlops"].__file__).parent
names = set()
for path in code.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
third_party = {n for n in names if n not in sys.stdlib_module_names and n not in ("tlops", "__future__")}
from packaging.requirements import Requirement
def norm(name): return name.lower().replace("_", "-").replace(".", "-")
declared = {norm(line.split("==")[0]) for line in open(sys.argv[3]).read().split() if line}
covered, todo = set(), list(declared)  # declared, and what pip installs with them
while todo:
    name = todo.pop()
    if name in covered: continue
    covered.add(name)
    try: requires = md.requires(name) or []
    except md.PackageNotFoundError: continue
    todo += [norm(r.name) for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]
by_module = md.packages_distributions()
used = {n: {norm(d) for d in by_module.get(n, [n])} for n in third_party if n in sys.modules}
print(json.dumps({"used": sorted(d for ds in used.values() for d in ds),
                  "direct": sorted(n for n, ds in used.items() if ds & declared),
                  "uncovered": sorted(n for n, ds in used.items() if not ds & covered), "tlops_file": str(code),
                  "not_imported": sorted(n for n in third_party if n not in sys.modules)}))
"""

@pytest.fixture(scope="module")
def no_tlops_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A fresh venv (no pip install) that sees the shared venv's packages through a .pth line, but where the
    shared venv's own .pth files (tlops' editable finder) are not run: `import tlops` fails there. Its bin holds
    a `uvicorn` launcher, as pip would install, which `mlflow models serve` runs from PATH."""
    import torch

    venv = tmp_path_factory.mktemp("no-tlops") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "shared.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    python = venv / "bin" / "python"
    launcher = venv / "bin" / "uvicorn"
    launcher.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    path = [str(venv / "bin"), *(p for p in os.environ["PATH"].split(os.pathsep)
                                 if Path(p).resolve() != Path(sys.executable).resolve().parent)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    env.update(PATH=os.pathsep.join(path), VIRTUAL_ENV=str(venv), PYTHON=str(python))
    found = subprocess.run([str(python), "-c", "import tlops"], env=env, capture_output=True, text=True, timeout=60)
    assert found.returncode != 0 and "No module named 'tlops'" in found.stderr, found
    return env


@pytest.fixture(scope="module")
def served(mlflow_server: str, tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The tiny model registered, and `tlops serve` on it."""
    with running_serve(mlflow_server, tiny_models["good"], NAME, tmp_path_factory.mktemp("tlops-serve")) as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_serve(served: dict, no_tlops_env: dict[str, str], mlflow_server: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`mlflow models serve --env-manager local` on the same registered version, in the environment without
    tlops; yields its port."""
    root = tmp_path_factory.mktemp("mlflow-serve")
    port = free_port()
    env = {**no_tlops_env, "MLFLOW_TRACKING_URI": mlflow_server}
    log_path = root / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [env["PYTHON"], "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/{served['version']}",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not start (exit {proc.poll()}): {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield port
    finally:
        stop(proc, group=True, abrupt=True)  # a throw-away server: no need for its graceful stop


def test_the_logged_model_declares_what_it_imports_and_bundles_its_code(
        served: dict, no_tlops_env: dict[str, str], mlflow_server: str, tiny_digits: Path, tmp_path: Path) -> None:
    import mlflow

    model_uri = f"models:/{NAME}/{served['version']}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path)))
    requirements = (local / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in requirements}
    assert {"torch", "torchvision", "timm", "pillow", "numpy", "pandas", "mlflow"} <= names, requirements
    assert "tlops" not in names and all("==" in r for r in requirements), requirements
    code = local / "code" / "tlops"
    assert (code / "serving" / "pyfunc.py").is_file() and (code / "serving" / "pyfunc_entry.py").is_file()
    assert not (code / "cli.py").exists() and not (code / "serving" / "server.py").exists()
    digit = next(tiny_digits.glob("7/*.png"))
    env = {**no_tlops_env, "MLFLOW_TRACKING_URI": mlflow_server}
    run = subprocess.run([env["PYTHON"], "-c", CLOSURE, model_uri, str(digit), str(local / "requirements.txt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    # Every third-party module the bundled code imported; tlops is the model's own copy.
    assert found["uncovered"] == [], found  # each is declared, or installed with a declared one
    assert {"torch", "torchvision", "timm", "PIL", "numpy", "pandas", "mlflow"} <= set(found["direct"]), found
    assert found["tlops_file"].endswith("/code/tlops"), found


def test_mlflow_models_serve_without_tlops_answers_as_tlops_serve(served: dict, mlflow_serve: int,
                                                                  images: dict[str, bytes]) -> None:  # noqa: F811
    files = list(images.values())
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f).decode()] for f in files]}}
    status, ours = _invoke(served["port"], payload)
    assert status == 200
    status, theirs = _invoke(mlflow_serve, payload)
    assert status == 200, theirs
    ours_p, theirs_p = ours["predictions"], theirs["predictions"]
    assert len({p["label"] for p in ours_p}) > 1  # the digits are told apart: a meaningful comparison
    assert [p["label"] for p in theirs_p] == [p["label"] for p in ours_p]
    # tlops serve folds BatchNorm into the convolutions, MLflow runs the pyfunc as logged: float32 rounding apart.
    np.testing.assert_allclose([p["probabilities"] for p in theirs_p], [p["probabilities"] for p in ours_p],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize(("image", "words"), [
    (_png(np.zeros((1, 20_000, 3), dtype=np.uint8)), ["instance 0", "aspect ratio of 20000:1", "not decoded"]),
    (_png_declaring(100_000, 100_000), ["instance 0", "pixels exceeds the limit", "not decoded"]),
    (b"this is a text file, not a picture\n", ["instance 0", "not an image"]),
], ids=["thin strip", "bomb header", "text"])
def test_mlflow_models_serve_refuses_hostile_images_with_the_same_limits(mlflow_serve: int, image: bytes,
                                                                         words: list[str]) -> None:
    start = time.monotonic()
    status, body = _invoke(mlflow_serve, {"inputs": {"image": [base64.b64encode(image).decode()]}})
    assert status == 400 and all(w in body["message"] for w in words), (status, body)
    assert time.monotonic() - start < 10
