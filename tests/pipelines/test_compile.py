from pathlib import Path

import yaml

from tests.conftest import run_cli


def test_compiled_ir_loads_back_and_names_all_five_tasks(tmp_path: Path) -> None:
    from kfp import components

    out = tmp_path / "pipeline.yaml"
    result = run_cli("compile", "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "tlops-transfer-learning"
    ir = yaml.safe_load(out.read_text())
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {"validate", "parity", "fine-tune", "evaluate", "gate"}
    # The DAG order: each step depends on the one before it.
    assert "validate" in tasks["parity"]["dependentTasks"]
    assert "fine-tune" in tasks["evaluate"]["dependentTasks"]
    assert set(tasks["gate"]["dependentTasks"]) >= {"evaluate", "fine-tune"}
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {"tlops:0.1.0"}
    # No step installs packages at run time: the command runs the executor from the image.
    for executor in ir["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(executor["container"].get("command", []))


def test_compile_into_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("compile", "--output", str(tmp_path / "no" / "p.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
