"""validate -> parity -> fine_tune -> evaluate -> gate, as one kfp v2 pipeline."""

from kfp import compiler, dsl

from components import evaluate, fine_tune, gate, parity, validate

PIPELINE_NAME = "tlops-transfer-learning"
TASKS = ("validate", "parity", "fine-tune", "evaluate", "gate")


@dsl.pipeline(name=PIPELINE_NAME, description="Validate data, prove preprocessing parity, fine-tune a "
              "pre-trained backbone, evaluate it against the champion, and gate its promotion.")
def transfer_learning_pipeline(data_uri: str, config_json: str, pipeline_run: str = "") -> str:
    checked = validate(data_uri=data_uri, config_json=config_json, pipeline_run=pipeline_run)
    checked.set_display_name("validate")
    run_id = checked.outputs["Output"]
    spec = parity(config_json=config_json, run_id=run_id, manifest=checked.outputs["manifest"])
    spec.set_display_name("parity")
    trained = fine_tune(config_json=config_json, run_id=run_id, manifest=checked.outputs["manifest"],
                        spec=spec.outputs["spec"])
    trained.set_display_name("fine-tune")
    scored = evaluate(config_json=config_json, run_id=run_id, model_uri=trained.outputs["Output"],
                      manifest=checked.outputs["manifest"])
    scored.set_display_name("evaluate")
    decided = gate(config_json=config_json, run_id=run_id, model_uri=trained.outputs["Output"],
                   evaluation=scored.outputs["evaluation"])
    decided.set_display_name("gate")
    return decided.outputs["Output"]


def compile_pipeline(output: str) -> str:
    compiler.Compiler().compile(transfer_learning_pipeline, package_path=output)
    return output
