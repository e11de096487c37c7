"""validate -> parity -> fine_tune -> evaluate -> gate, as one kfp v2 pipeline."""

import os
from contextvars import ContextVar

from kfp import compiler, dsl

from components import evaluate, fine_tune, gate, parity, validate
from tlops.config import AcceleratorConfig

PIPELINE_NAME = "tlops-transfer-learning"
DESCRIPTION = ("Validate data, prove preprocessing parity, fine-tune a pre-trained backbone, evaluate it against "
               "the champion, and gate its promotion.")
TASKS = ("validate", "parity", "fine-tune", "evaluate", "gate")
# The fine-tune step's accelerator is fixed when the pipeline is compiled: train.accelerator of the config
# given to compile_pipeline, else TLOPS_ACCELERATOR_TYPE / TLOPS_ACCELERATOR_LIMIT (as TLOPS_IMAGE names the image).
_ACCELERATOR: ContextVar[AcceleratorConfig | None] = ContextVar("tlops_accelerator", default=None)


def accelerator_from_env() -> AcceleratorConfig:
    return AcceleratorConfig(type=os.environ.get("TLOPS_ACCELERATOR_TYPE") or None,
                             limit=int(os.environ.get("TLOPS_ACCELERATOR_LIMIT", "1")))


def request_accelerator(task: dsl.PipelineTask) -> None:
    accelerator = _ACCELERATOR.get() or accelerator_from_env()
    if accelerator.type:
        task.set_accelerator_type(accelerator.type).set_accelerator_limit(accelerator.limit)


@dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
def transfer_learning_pipeline(data_uri: str, config_json: str, pipeline_run: str = "") -> str:
    checked = validate(data_uri=data_uri, config_json=config_json, pipeline_run=pipeline_run)
    checked.set_display_name("validate")
    run_id = checked.outputs["Output"]
    spec = parity(config_json=config_json, run_id=run_id, manifest=checked.outputs["manifest"])
    spec.set_display_name("parity")
    trained = fine_tune(config_json=config_json, run_id=run_id, manifest=checked.outputs["manifest"],
                        spec=spec.outputs["spec"])
    trained.set_display_name("fine-tune")
    request_accelerator(trained)
    scored = evaluate(config_json=config_json, run_id=run_id, model_uri=trained.outputs["Output"],
                      manifest=checked.outputs["manifest"])
    scored.set_display_name("evaluate")
    decided = gate(config_json=config_json, run_id=run_id, model_uri=trained.outputs["Output"],
                   evaluation=scored.outputs["evaluation"])
    decided.set_display_name("gate")
    return decided.outputs["Output"]


def compile_pipeline(output: str, accelerator: AcceleratorConfig | None = None) -> str:
    """Write the IR YAML; ``accelerator`` (a config's ``train.accelerator``) is what fine-tune requests."""
    pipeline = transfer_learning_pipeline
    if accelerator is not None:
        token = _ACCELERATOR.set(accelerator)
        try:  # the DAG is built when decorated: build it again with this accelerator
            build = dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
            pipeline = build(transfer_learning_pipeline.pipeline_func)
        finally:
            _ACCELERATOR.reset(token)
    compiler.Compiler().compile(pipeline, package_path=output)
    return output
