"""The pipeline components. Bodies stay an import and one call: the logic lives in ``tlops.steps``.

``DEFAULT_IMAGE`` is only the components' own default: a compiled pipeline sets every task's image from its
cluster config (``pipelines.transfer_learning.apply_cluster``).
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.image import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def validate(data_uri: str, config_json: str, pipeline_run: str, manifest: Output[Dataset],
             report: Output[Artifact], report_html: Output[HTML], plan: dsl.OutputPath(str)) -> str:  # type: ignore[valid-type]
    from tlops.steps import validate_step

    return validate_step(data_uri, config_json, manifest.path, report.path, pipeline_run, report_html.path, plan)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def parity(config_json: str, run_id: str, manifest: Input[Dataset], spec: Output[Artifact],
           report: Output[Artifact], report_html: Output[HTML]) -> str:
    from tlops.steps import parity_step

    return parity_step(config_json, run_id, manifest.path, spec.path, report.path, report_html.path)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def fine_tune(config_json: str, run_id: str, manifest: Input[Dataset], spec: Input[Artifact],
              model: Output[Model]) -> str:
    from tlops.steps import fine_tune_step

    return fine_tune_step(config_json, run_id, manifest.path, spec.path, model.path)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def evaluate(config_json: str, run_id: str, model_uri: str, manifest: Input[Dataset], metrics: Output[Metrics],
             evaluation: Output[Artifact], confusion: Output[ClassificationMetrics],
             report_html: Output[HTML]) -> float:
    from tlops.steps import evaluate_step

    out = evaluate_step(config_json, run_id, manifest.path, model_uri, evaluation.path, report_html.path)
    metrics.metadata.update(out["metrics"])
    confusion.log_confusion_matrix(out["categories"], out["matrix"])
    return out["metrics"]["accuracy"]


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def gate(config_json: str, run_id: str, model_uri: str, evaluation: Input[Artifact],
         decision: Output[Artifact]) -> str:
    from tlops.steps import gate_step

    return gate_step(config_json, run_id, model_uri, evaluation.path, decision.path)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def skip(config_json: str, run_id: str, decision: Output[Artifact]) -> str:
    from tlops.steps import skip_step

    return skip_step(config_json, run_id, decision.path)
