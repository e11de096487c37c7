"""The pipeline components. Bodies stay an import and one call: the logic lives in ``tlops.steps``.

``DEFAULT_IMAGE`` is only the components' own default: a compiled pipeline sets every task's image from its
cluster config (``pipelines.transfer_learning.apply_cluster``).
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def validate(data_uri: str, config_json: str, pipeline_run: str, manifest: Output[Dataset],
             report: Output[Artifact], report_html: Output[HTML], run_plan: Output[Artifact],
             mlflow_run: Output[Markdown], target_manifest: Output[Dataset], backbone: str = "", strategy: str = "",
             epochs: int = 0, model_name: str = "", min_accuracy: float = -1.0, kfp_run_id: str = "",
             kfp_run_name: str = "") -> str:
    from tlops.steps import validate_step

    return validate_step(data_uri, config_json, manifest.path, report.path, pipeline_run, report_html.path,
                         run_plan.path, parameters={"backbone": backbone, "strategy": strategy, "epochs": epochs,
                                                    "model_name": model_name, "min_accuracy": min_accuracy},
                         kfp_run={"id": kfp_run_id, "name": kfp_run_name}, links_path=mlflow_run.path,
                         target_manifest_path=target_manifest.path)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def parity(run_plan: Input[Artifact], manifest: Input[Dataset], target_manifest: Input[Dataset],
           spec: Output[Artifact], report: Output[Artifact], report_html: Output[HTML]) -> str:
    from tlops.steps import parity_step

    return parity_step(run_plan.path, manifest.path, spec.path, report.path, report_html.path,
                       target_manifest_path=target_manifest.path)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def fine_tune(run_plan: Input[Artifact], manifest: Input[Dataset], target_manifest: Input[Dataset],
              spec: Input[Artifact], model: Output[Model], serving_parity: Output[Artifact],
              source_model: Output[Model]) -> str:
    from tlops.steps import fine_tune_step

    return fine_tune_step(run_plan.path, manifest.path, spec.path, model.path, serving_parity.path,
                          target_manifest_path=target_manifest.path, reference_dir=source_model.path)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def evaluate(run_plan: Input[Artifact], model_uri: str, manifest: Input[Dataset], target_manifest: Input[Dataset],
             source_model: Input[Model], metrics: Output[Metrics], evaluation: Output[Artifact],
             confusion: Output[ClassificationMetrics], report_html: Output[HTML]) -> float:
    from tlops.steps import evaluate_step

    out = evaluate_step(run_plan.path, manifest.path, model_uri, evaluation.path, report_html.path,
                        target_manifest_path=target_manifest.path, reference_dir=source_model.path)
    metrics.metadata.update(out["metrics"])
    confusion.log_confusion_matrix(out["categories"], out["matrix"])
    return out["metrics"]["accuracy"]


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def compress(run_plan: Input[Artifact], model_uri: str, manifest: Input[Dataset], evaluation: Input[Artifact],
             compression: Output[Artifact]) -> str:
    from tlops.steps import compress_step

    return compress_step(run_plan.path, manifest.path, model_uri, evaluation.path, compression.path)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def gate(run_plan: Input[Artifact], model_uri: str, evaluation: Input[Artifact], parity_report: Input[Artifact],
         serving_parity: Input[Artifact], compression: Input[Artifact], decision: Output[Artifact],
         decision_markdown: Output[Markdown], report_html: Output[HTML]) -> str:
    from tlops.steps import gate_step

    return gate_step(run_plan.path, model_uri, evaluation.path, parity_report.path, serving_parity.path,
                     decision.path, compression_path=compression.path, markdown_path=decision_markdown.path,
                     html_path=report_html.path)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def skip(run_plan: Input[Artifact], decision: Output[Artifact]) -> str:
    from tlops.steps import skip_step

    return skip_step(run_plan.path, decision.path)
