"""Security rules the code must keep, checked on the source itself: nothing is unpickled, every ``torch.load``
is ``weights_only=True``, and every dependency is pinned."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = sorted(p for d in ("src", "components", "pipelines", "bench") for p in (REPO / d).rglob("*.py"))
# Loaders that unpickle what they read; a model or a bucket object must never go through them.
UNPICKLERS = {"pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "dill.load",
              "dill.loads", "pandas.read_pickle", "pd.read_pickle", "numpy.load", "np.load",
              "mlflow.pytorch.load_model", "mlflow.sklearn.load_model", "mlflow.pytorch.log_model",
              "mlflow.sklearn.log_model", "torch.jit.load"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "?"


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(_name(n.func), n) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def torch_loads_without_weights_only(path: Path) -> list[str]:
    bad = []
    for name, call in _calls(path):
        if name.endswith("torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                bad.append(f"{_rel(path)}:{call.lineno}")
    return bad


def unpickling_calls(path: Path) -> list[str]:
    out = []
    for name, call in _calls(path):
        if name in UNPICKLERS:
            kw = {k.arg: k.value for k in call.keywords}
            if name.endswith("np.load") or name.endswith("numpy.load"):
                allow = kw.get("allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is True):
                    continue  # numpy refuses pickles unless told otherwise
            out.append(f"{_rel(path)}:{call.lineno} {name}")
    return out


def test_the_scan_covers_the_code() -> None:
    assert len(SOURCES) > 30
    assert sum(name.endswith("torch.load") for p in SOURCES for name, _ in _calls(p)) >= 3


def test_every_torch_load_is_weights_only() -> None:
    assert [hit for p in SOURCES for hit in torch_loads_without_weights_only(p)] == []


def test_nothing_is_unpickled() -> None:
    assert [hit for p in SOURCES for hit in unpickling_calls(p)] == []


@pytest.mark.parametrize("rule, code, caught", [
    ("torch.load", "import torch\ntorch.load('x.pt')\n", True),
    ("torch.load", "import torch\ntorch.load('x.pt', weights_only=False)\n", True),
    ("torch.load", "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)\n", False),
    ("unpickle", "import pickle\npickle.loads(b'')\n", True),
    ("unpickle", "import numpy as np\nnp.load('a.npy', allow_pickle=True)\n", True),
    ("unpickle", "import numpy as np\nnp.load('a.npy')\n", False),
])
def test_the_rules_catch_what_they_should(tmp_path: Path, rule: str, code: str, caught: bool) -> None:
    path = tmp_path / "probe.py"
    path.write_text(code)
    check = torch_loads_without_weights_only if rule == "torch.load" else unpickling_calls
    assert bool(check(path)) is caught


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]+\])?==([A-Za-z0-9.+!-]+)(\s*;.*)?", line)
        assert m, f"requirements.lock: {line!r} is not an exact pin"
        pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return pins


def test_every_dependency_is_pinned_exactly() -> None:
    pins = _lock()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for ds in project.get("optional-dependencies", {}).values()
                                             for d in ds)]
    missing = []
    for dep in declared:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", dep).group(0)).lower()  # type: ignore[union-attr]
        if name not in pins and name not in ("torch", "torchvision"):
            missing.append(name)
    assert missing == []
    # torch is pinned where it is installed (Makefile and Dockerfile), outside the lock.
    for f in ("Makefile", "Dockerfile"):
        assert "torch==2.14.1" in (REPO / f).read_text() and "torchvision==0.29.1" in (REPO / f).read_text(), f
