"""validate -> parity -> fine_tune -> evaluate -> gate (or skip), as one kfp v2 pipeline."""

# No `from __future__ import annotations`: kfp reads the pipeline signature's types at decoration.
import os
from contextvars import ContextVar
from dataclasses import dataclass

from kfp import compiler, dsl, kubernetes

from components import compress, evaluate, fine_tune, gate, parity, skip, validate
from components.image import resolve_image
from tlops.config.kubernetes import ClusterConfig
from tlops.config.settings import AcceleratorConfig, Config

PIPELINE_NAME = "tlops-transfer-learning"
DESCRIPTION = ("Validate data, prove preprocessing parity, fine-tune a pre-trained backbone, evaluate it against "
               "the champion, and gate its promotion.")
TASKS = ("validate", "parity", "fine-tune", "evaluate", "compress", "gate")
# Steps whose outputs KFP may take from its cache when the same inputs come again: validate (its inputs name the
# data, the config and the pipeline run, so a new run looks at the data afresh while a clone or retry of a run
# reuses it) and parity (a pure function of the spec, the config and the manifest). The others must run: fine-tune
# leaves a model in the tracking store that a cache entry cannot vouch for (its own checkpoints make a re-run
# cheap), evaluate compares with whichever version is the champion now, and gate moves registry aliases.
CACHED_STEPS = frozenset({"validate", "parity"})


@dataclass(frozen=True)
class ClusterBuild:
    """Everything a compile fixes about how the steps run on the cluster, applied in one place."""

    cluster: ClusterConfig | None  # None: the accelerator alone, nothing else (no platform spec in the YAML)
    accelerator: AcceleratorConfig
    image: str


# The DAG is built when the pipeline function runs: compile_pipeline runs it again under this variable.
# Unset (the module's own pipeline, which kfp.local runs): no cluster settings, and in particular no retries,
# which kfp.local would honour by re-running a step that failed on bad input.
_BUILD: ContextVar[ClusterBuild | None] = ContextVar("tlops_cluster_build", default=None)


def accelerator_from_env() -> AcceleratorConfig:
    """TLOPS_ACCELERATOR_TYPE / TLOPS_ACCELERATOR_LIMIT, for compiles whose config names no accelerator."""
    return AcceleratorConfig(type=os.environ.get("TLOPS_ACCELERATOR_TYPE") or None,
                             limit=int(os.environ.get("TLOPS_ACCELERATOR_LIMIT", "1")))


def apply_cluster(task: dsl.PipelineTask, name: str, build: ClusterBuild) -> None:
    """Image, resources, accelerator, retries, caching, environment, secrets and placement of one step."""
    if name == "fine-tune" and build.accelerator.type:
        task.set_accelerator_type(build.accelerator.type).set_accelerator_limit(build.accelerator.limit)
    cluster = build.cluster
    if cluster is None:
        return
    step = cluster.step(name)
    task.set_container_image(build.image)
    task.set_cpu_request(step.cpu_request).set_cpu_limit(step.cpu_limit)
    task.set_memory_request(step.memory_request).set_memory_limit(step.memory_limit)
    if step.retries:
        task.set_retry(step.retries, backoff_duration=cluster.retry_backoff,
                       backoff_factor=cluster.retry_backoff_factor, backoff_max_duration=cluster.retry_backoff_max)
    task.set_caching_options(enable_caching=name in CACHED_STEPS)
    for var, value in sorted(cluster.env.items()):
        task.set_env_variable(var, value)
    for secret in cluster.secrets:
        keys = {key: var for key, var in secret.keys.items() if var not in cluster.env}
        if keys:
            kubernetes.use_secret_as_env(task, secret_name=secret.name, secret_key_to_env=keys,
                                         optional=secret.optional)
    for label, value in sorted({**cluster.node_selector, **step.node_selector}.items()):
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in [*cluster.tolerations, *step.tolerations]:
        kubernetes.add_toleration(task, key=toleration.key, operator=toleration.operator, value=toleration.value,
                                  effect=toleration.effect, toleration_seconds=toleration.toleration_seconds)


def _step(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    task.set_display_name(name)
    build = _BUILD.get()
    if build is not None:
        apply_cluster(task, name, build)
    return task


@dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
def transfer_learning_pipeline(data_uri: str = "", config_json: str = "", backbone: str = "", strategy: str = "",
                               epochs: int = 0, model_name: str = "", min_accuracy: float = -1.0,
                               pipeline_run: str = "") -> str:
    """Validate data, prove preprocessing parity, fine-tune a pre-trained backbone, evaluate it against the
    champion, and gate its promotion. A parameter left at its unset value keeps the config's field.

    Args:
        data_uri: s3://bucket/prefix (local runs: a directory or CSV manifest too). Empty: the config's data.uri.
        config_json: The full tlops config as JSON (tlops compile/submit fill it). Empty: the defaults.
        backbone: efficientnet_lite0, resnet18, resnet50, auto or checkpoint:DIR. Empty: the config's backbone.
        strategy: linear-probe, partial, full, gradual, scratch, adabn, self-training, mcc or auto. Empty: the
            config's train.strategy.
        epochs: Epochs (L-BFGS iterations for linear-probe). 0: the config's train.epochs.
        model_name: Registered model name in MLflow. Empty: the config's registry.model_name.
        min_accuracy: The gate's accuracy floor, 0 to 1. Negative: the config's gate.min_accuracy.
        pipeline_run: A name for this run in MLflow's tags (scheduled runs get one each).
    """
    # Only the validate step reads the config as given, with the typed parameters over it (precedence: a set
    # parameter > config_json > the defaults): it resolves it (auto choices) into the run plan, which every later
    # step takes as an input. What crosses between steps is in this DAG, nothing else.
    checked = _step(validate(data_uri=data_uri, config_json=config_json, pipeline_run=pipeline_run,
                             backbone=backbone, strategy=strategy, epochs=epochs, model_name=model_name,
                             min_accuracy=min_accuracy, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                             kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), "validate")
    plan, manifest = checked.outputs["run_plan"], checked.outputs["manifest"]
    # The target domain's images (data.target_uri, data.target_labelled_uri; the header alone without them).
    target = checked.outputs["target_manifest"]
    proved = _step(parity(run_plan=plan, manifest=manifest, target_manifest=target), "parity")
    # The plan's decision: "train", or "skip" when selection.skip_when found no new data or no drift.
    # A skipped run starts no fine-tune pod (no GPU asked for), no evaluation and no gate.
    with dsl.If(checked.outputs["Output"] == "train", name="train"):
        trained = _step(fine_tune(run_plan=plan, manifest=manifest, target_manifest=target,
                                  spec=proved.outputs["spec"]), "fine-tune")
        # With a labelled target test split: scored on it and on the source test split (the source-only model
        # too, the gate's reference for max_source_regression when there is no champion).
        scored = _step(evaluate(run_plan=plan, model_uri=trained.outputs["Output"], manifest=manifest,
                                target_manifest=target, source_model=trained.outputs["source_model"]), "evaluate")
        # Compressed serving variants (deploy.variants); with none the step only writes an empty record.
        shrunk = _step(compress(run_plan=plan, model_uri=trained.outputs["Output"], manifest=manifest,
                                evaluation=scored.outputs["evaluation"]), "compress")
        decided = _step(gate(run_plan=plan, model_uri=trained.outputs["Output"],
                             evaluation=scored.outputs["evaluation"], parity_report=proved.outputs["report"],
                             serving_parity=trained.outputs["serving_parity"],
                             compression=shrunk.outputs["compression"]), "gate")
    with dsl.Else(name="skip-training"):
        skipped = _step(skip(run_plan=plan), "skip")
    return dsl.OneOf(decided.outputs["Output"], skipped.outputs["Output"])


def compile_pipeline(output: str, accelerator: AcceleratorConfig | None = None,
                     cluster: ClusterConfig | None = None) -> str:
    """Write the IR YAML: ``accelerator`` (``train.accelerator``) is what fine-tune requests (none when unset);
    ``cluster`` (a config's ``cluster`` section) sets image, resources, retries, caching, secrets and placement.
    Without ``cluster`` the steps keep the components' defaults: ``compile_config`` is what the CLI uses."""
    build = ClusterBuild(cluster=cluster, accelerator=accelerator or AcceleratorConfig(),
                         image=resolve_image(cluster.image if cluster else None))
    token = _BUILD.set(build)
    try:
        pipeline = dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(
            transfer_learning_pipeline.pipeline_func)
    finally:
        _BUILD.reset(token)
    compiler.Compiler().compile(pipeline, package_path=output)
    return output


def compile_config(cfg: Config, output: str) -> str:
    """Compile with a run config: its ``cluster`` section, and ``train.accelerator`` (else the
    TLOPS_ACCELERATOR_* variables). Returns the image the steps run in."""
    accelerator = cfg.train.accelerator if cfg.train.accelerator.type else accelerator_from_env()
    compile_pipeline(output, accelerator, cfg.cluster)
    return resolve_image(cfg.cluster.image)
