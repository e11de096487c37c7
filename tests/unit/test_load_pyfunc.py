"""`tracking.load_pyfunc` skips MLflow's load-time environment check, and `tracking.pinned_requirements_checked` its
save-time one, only where that check has nothing to say."""

from __future__ import annotations

import platform
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tlops.tracking import _REQUIREMENT_CHECKS, environment_matches, pinned_requirements_checked, pins_installed


def _model(root: Path, requirements: list[str], python: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.loaders.code_model\n"
                                  f"    python_version: {python or platform.python_version()}\n", encoding="utf-8")
    (root / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    return root


def _pin(name: str) -> str:
    return f"{name}=={metadata.version(name).split('+')[0]}"


def test_a_model_pinned_to_this_environment_matches(tmp_path: Path) -> None:
    assert environment_matches(_model(tmp_path / "m", [_pin("mlflow"), _pin("torch"), _pin("numpy"), "# note", ""]))


@pytest.mark.parametrize(("requirements", "python"), [
    ([_pin("mlflow"), "numpy==0.0.1"], None),  # another version
    ([_pin("mlflow"), "numpy>=1"], None),  # a range: MLflow's own check decides
    ([_pin("mlflow"), "tlops-no-such-distribution==1.0"], None),  # not installed
    ([f"{_pin('mlflow').replace('mlflow', 'mlflow[gateway]')}"], None),  # an extra
    ([_pin("numpy") + "; python_version < '3'"], None),  # a marker
    (["./wheels/thing.whl"], None),  # a path
    ([_pin("numpy")], "3.9.1"),  # another Python
])
def test_anything_else_is_left_to_mlflows_check(tmp_path: Path, requirements: list[str], python: str | None) -> None:
    assert not environment_matches(_model(tmp_path / "m", requirements, python))


def test_a_folder_without_the_files_is_left_to_mlflows_check(tmp_path: Path) -> None:
    assert not environment_matches(tmp_path)
    (tmp_path / "MLmodel").write_text("flavors: [", encoding="utf-8")
    (tmp_path / "requirements.txt").write_text(_pin("numpy"), encoding="utf-8")
    assert not environment_matches(tmp_path)


def test_the_model_the_pipeline_logs_matches_and_logs_and_loads_without_the_check(
        tmp_path: Path, tiny_models: dict[str, Path], tiny_digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import mlflow.utils.requirements_utils as requirements_utils
    import pandas as pd

    from tests.helpers.registry import restored_mlflow_uris, use_store
    from tlops import tracking
    from tlops.steps import log_pyfunc_model

    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code directory
    image = sorted((tiny_digits / "7").glob("*.png"))[0].read_bytes()
    with restored_mlflow_uris():
        exp = use_store(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts")
        built = []
        monkeypatch.setattr(requirements_utils, "_init_packages_to_modules_map", lambda: built.append(1))
        with mlflow.start_run(experiment_id=exp):
            info = log_pyfunc_model(str(tiny_models["good"]), "test", input_example=pd.DataFrame({"image": [image]}))
        assert not built  # logging (the requirements written, the example tried on the model loaded back) built no map
        assert environment_matches(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri))
        model = tracking.load_pyfunc(info.model_uri)
        out = pd.DataFrame(model.predict(pd.DataFrame({"image": [image]})))
        assert out.loc[0, "label"] == "7" and out.loc[0, "score"] > 0.5
        assert not built  # MLflow's map of every installed distribution was never built
        # The same model pinned to another numpy: MLflow's check runs (and warns), the model still loads.
        other = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "o")))
        reqs = other / "requirements.txt"
        reqs.write_text(re.sub(r"numpy==\S+", "numpy==0.0.1", reqs.read_text(encoding="utf-8")), encoding="utf-8")
        assert tracking.load_pyfunc(str(other)).predict(pd.DataFrame({"image": [image]})) is not None
        assert built


def test_mlflow_still_calls_its_requirement_check_where_it_is_swapped() -> None:
    """The attributes swapped while a model is logged exist in this MLflow (else the skip would silently be lost)."""
    import importlib

    for module, attribute in _REQUIREMENT_CHECKS:
        assert callable(getattr(importlib.import_module(module), attribute)), f"{module}.{attribute}"


def test_the_save_time_check_runs_unless_every_requirement_pins_this_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc
    import mlflow.utils.environment as environment

    calls: list[list[str]] = []
    for module in (environment, mlflow.pyfunc):
        monkeypatch.setattr(module, "warn_dependency_requirement_mismatches", lambda reqs: calls.append(list(reqs)))
    pinned = [_pin("mlflow"), _pin("torch"), "# note"]
    assert pins_installed(pinned) and not pins_installed([_pin("mlflow"), "numpy>=1"])
    with pinned_requirements_checked():
        environment.warn_dependency_requirement_mismatches(pinned)
        mlflow.pyfunc.warn_dependency_requirement_mismatches(pinned)
        assert calls == []
        environment.warn_dependency_requirement_mismatches([_pin("mlflow"), "numpy==0.0.1"])
        mlflow.pyfunc.warn_dependency_requirement_mismatches(["numpy>=1"])
    assert calls == [[_pin("mlflow"), "numpy==0.0.1"], ["numpy>=1"]]
    before = len(calls)
    environment.warn_dependency_requirement_mismatches(pinned)  # after the block: MLflow's own, always
    assert len(calls) == before + 1
