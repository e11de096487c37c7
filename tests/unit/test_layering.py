"""The layering ARCHITECTURE.md promises, checked on the source: the core never imports kfp, the pipelines or
the components (it runs, and is tested, without them)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "src" / "tlops"
FORBIDDEN = ("kfp", "pipelines", "components")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_core_imports_no_orchestration_layer() -> None:
    offenders = {f"{path.name}: {name}" for path in CORE.glob("*.py") for name in imported_modules(path)
                 if name.split(".")[0] in FORBIDDEN and path.name != "cli.py"}
    assert not offenders


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from kfp import dsl\n    import pipelines.local\n")
    assert imported_modules(sample) == {"kfp", "pipelines.local"}
