"""The pipeline's typed parameters (what a KFP run form shows) over the full config, and the KFP run and the MLflow
run naming each other: in the compiled spec, in tlops.config.settings.with_parameters, and through a kfp.local run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ir_tasks
from tlops.config.settings import PIPELINE_PARAMETERS, load_config, with_parameters
from tlops.errors import TlopsError

TYPED = {"data_uri": "STRING", "config_json": "STRING", "backbone": "STRING", "strategy": "STRING",
         "epochs": "NUMBER_INTEGER", "model_name": "STRING", "min_accuracy": "NUMBER_DOUBLE",
         "pipeline_run": "STRING"}


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipelines.transfer_learning import compile_config

    path = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    compile_config(load_config(None, []), str(path))
    return next(yaml.safe_load_all(path.read_text()))  # the pipeline spec; the platform spec follows


def test_the_run_form_has_typed_parameters_with_unset_defaults_and_descriptions(ir: dict) -> None:
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in params.items()} == TYPED
    assert {k: v["defaultValue"] for k, v in params.items()} == {
        "data_uri": "", "config_json": "", "backbone": "", "strategy": "", "epochs": 0, "model_name": "",
        "min_accuracy": -1.0, "pipeline_run": ""}
    assert all(v["isOptional"] and v["description"] for v in params.values())
    assert ("linear-probe, partial, full, gradual, scratch, adabn, self-training, mcc or auto"
            in params["strategy"]["description"])


def test_validate_takes_every_parameter_and_the_kfp_run_id_and_name(ir: dict) -> None:
    inputs = ir_tasks(ir)["validate"]["inputs"]["parameters"]
    for name in TYPED:
        assert inputs[name] == {"componentInputParameter": name}, name
    assert inputs["kfp_run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert inputs["kfp_run_name"] == {"runtimeValue": {"constant": "{{$.pipeline_job_name}}"}}
    outputs = ir["components"]["comp-validate"]["outputDefinitions"]["artifacts"]
    assert outputs["mlflow_run"]["artifactType"]["schemaTitle"] == "system.Markdown"


def test_precedence_a_set_parameter_then_the_config_then_the_default() -> None:
    config = load_config(None, ["registry.model_name=from-config", "gate.min_accuracy=0.7", "train.epochs=5"]).to_json()
    assert with_parameters(config).registry.model_name == "from-config"  # nothing set: the config
    cfg = with_parameters(config, model_name="from-form", epochs=3, min_accuracy=0.0, backbone="resnet18")
    assert (cfg.registry.model_name, cfg.train.epochs, cfg.gate.min_accuracy, cfg.backbone) == (
        "from-form", 3, 0.0, "resnet18")
    assert with_parameters("", model_name="1e3").registry.model_name == "1e3"  # typed text, not YAML
    assert with_parameters("").model_dump() == load_config(None, []).model_dump()  # no config: the defaults
    assert set(PIPELINE_PARAMETERS) == set(TYPED) - {"data_uri", "config_json", "pipeline_run"}


def test_a_new_strategy_takes_its_own_default_epochs_unless_the_config_chose() -> None:
    assert with_parameters("", strategy="full").train.epochs == 10  # not the probe's 200 L-BFGS iterations
    assert with_parameters(load_config(None, ["train.epochs=7"]).to_json(), strategy="full").train.epochs == 7
    assert with_parameters("", strategy="full", epochs=2).train.epochs == 2


def test_a_bad_parameter_is_named_as_a_parameter() -> None:
    with pytest.raises(TlopsError, match="^pipeline parameter strategy: Input should be 'linear-probe'"):
        with_parameters("", strategy="fll")
    with pytest.raises(TlopsError, match="^pipeline parameter min_accuracy: "):
        with_parameters("", min_accuracy=1.5)


def test_parameters_override_the_config_in_a_kfp_local_run(tmp_path: Path, tiny_digits: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The validate component run by kfp.local with a full config and three typed parameters: the run plan every
    later step takes, and the MLflow run's tags, say what the parameters set; the MLflow run names the KFP run and
    the Markdown output names the MLflow run."""
    import mlflow
    from kfp import local

    from components import validate
    from tlops.config.plan import RunPlan

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(None, [f"workdir={tmp_path / '.tlops'}", f"tracking.uri={store}",
                                "validation.min_images_per_class=2", "registry.model_name=from-config",
                                "train.epochs=50", "gate.min_accuracy=0.9", "cluster.host=http://kfp.example:8080"])
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = validate(data_uri=str(tiny_digits), config_json=config.to_json(), pipeline_run="form-run",
                    model_name="from-form", epochs=3, strategy="full", kfp_run_id="1234-abcd",
                    kfp_run_name="retrain-from-the-form")
    assert task.outputs["Output"] == "train"
    plan = RunPlan.read(task.outputs["run_plan"].path)
    assert (plan.config.registry.model_name, plan.config.train.epochs, plan.config.train.strategy) == (
        "from-form", 3, "full")
    assert plan.config.gate.min_accuracy == 0.9  # not set in the form: the config's
    run = mlflow.MlflowClient(store).get_run(plan.run_id)
    assert run.data.params["model_name"] == "from-form" and run.data.params["train.epochs"] == "3"
    assert run.data.tags["kfp.run_id"] == "1234-abcd" and run.data.tags["kfp.run_name"] == "retrain-from-the-form"
    assert run.data.tags["kfp.run_url"] == "http://kfp.example:8080/#/runs/details/1234-abcd"
    page = Path(task.outputs["mlflow_run"].path).read_text()
    assert plan.run_id in page and "from-form" in page and "http://kfp.example:8080/#/runs/details/1234-abcd" in page
    json.dumps(plan.to_dict())
