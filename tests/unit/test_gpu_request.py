"""The fine-tune step asks the cluster for the accelerator the config names (kfp IR resources)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import ir_tasks
from tlops.config.settings import AcceleratorConfig, load_config


def fine_tune_resources(ir_path: Path) -> dict:
    ir = yaml.safe_load(ir_path.read_text())
    executors = ir["deploymentSpec"]["executors"]
    task = ir_tasks(ir)["fine-tune"]
    executor = ir["components"][task["componentRef"]["name"]]["executorLabel"]
    others = [e for name, e in executors.items() if name != executor]
    assert all("accelerator" not in e["container"].get("resources", {}) for e in others)  # only fine-tune asks
    return executors[executor]["container"].get("resources", {})


def test_config_accelerator_is_requested_by_fine_tune_only(tmp_path: Path) -> None:
    from pipelines.transfer_learning import compile_pipeline

    cfg = load_config(overrides=["train.accelerator.type=nvidia.com/gpu", "train.accelerator.limit=2",
                                 "train.strategy=full"])
    compile_pipeline(str(tmp_path / "gpu.yaml"), cfg.train.accelerator)
    resources = fine_tune_resources(tmp_path / "gpu.yaml")
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "2"


def test_no_accelerator_by_default_and_env_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.transfer_learning import compile_pipeline

    monkeypatch.delenv("TLOPS_ACCELERATOR_TYPE", raising=False)
    compile_pipeline(str(tmp_path / "cpu.yaml"), AcceleratorConfig())
    assert "accelerator" not in fine_tune_resources(tmp_path / "cpu.yaml")
    monkeypatch.setenv("TLOPS_ACCELERATOR_TYPE", "nvidia.com/gpu")
    monkeypatch.setenv("TLOPS_ACCELERATOR_LIMIT", "4")
    compile_pipeline(str(tmp_path / "env.yaml"), None)  # the module's pipeline was built without the variable
    assert "accelerator" not in fine_tune_resources(tmp_path / "env.yaml")
    import pipelines.transfer_learning as tl

    compile_pipeline(str(tmp_path / "env2.yaml"), tl.accelerator_from_env())
    assert fine_tune_resources(tmp_path / "env2.yaml")["accelerator"]["resourceCount"] == "4"


def test_accelerator_limit_must_be_positive() -> None:
    from tlops.errors import TlopsError

    with pytest.raises(TlopsError, match="train.accelerator.limit"):
        load_config(overrides=["train.accelerator.limit=0"])
