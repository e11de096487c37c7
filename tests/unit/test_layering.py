"""The layering ARCHITECTURE.md promises, checked by import-linter as `make lint` runs it: the core never imports
kfp, the components or the pipelines; a package imports only from the layers below it; no import cycles within
a package. Imports inside functions count (grimp reads every import statement of a module).

The contracts live in pyproject.toml ([tool.importlinter]). Each is shown to fail on a copy of the tree with one
deliberate violation, so a contract that stopped checking anything would fail here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(repo: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on ``repo``'s pyproject.toml, with ``repo/src`` first on the path (so its tlops is checked)."""
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(repo / "pyproject.toml"), "--no-cache"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract() -> None:
    run = lint_imports(REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "BROKEN" not in run.stdout and run.stdout.count("KEPT") == 3


VIOLATIONS = {
    # a low layer reaching up to the CLI, inside a function
    "layers": ("tlops/errors.py", "\n\ndef _upward():\n    from tlops.cli import main\n\n    return main\n",
               "Layers: a module imports only from its own layer's package or the layers below BROKEN",
               "tlops.errors -> tlops.cli"),
    # the core importing kfp
    "kfp": ("tlops/data/storage.py", "\n\ndef _kfp():\n    import kfp\n\n    return kfp\n",
            "The core never imports kfp, the components or the pipelines (only the CLI launches them) BROKEN",
            "tlops.data.storage -> kfp"),
    # a cycle inside a package: preprocessing -> backbones -> preprocessing
    "cycle": ("tlops/vision/preprocessing.py",
              "\n\ndef _back():\n    from tlops.vision.backbones import reference_spec\n\n    return reference_spec\n",
              "No import cycles between the modules of a package BROKEN", "tlops.vision"),
}


@pytest.mark.parametrize("kind", sorted(VIOLATIONS))
def test_lint_fails_on_a_deliberate_violation(tmp_path: Path, kind: str) -> None:
    module, addition, broken, named = VIOLATIONS[kind]
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "src" / "tlops", tmp_path / "src" / "tlops",
                    ignore=shutil.ignore_patterns("__pycache__", "datadocs_static"))
    target = tmp_path / "src" / module
    target.write_text(target.read_text(encoding="utf-8") + addition, encoding="utf-8")
    run = lint_imports(tmp_path)
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0, out
    assert " ".join(broken.split()) in out and named in out, out


def test_the_data_checks_load_no_torch() -> None:
    """`tlops validate` (the data checks, the target domain's included) runs without torch: its memory stays that
    of pandas and GX (the hostile-tree test bounds it), and a step that only validates starts in a second."""
    code = ("import sys; import tlops.cli, tlops.data.validation, tlops.data.target, tlops.selection.domain, "
            "tlops.selection.planner; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
