"""The five pipeline steps as plain functions over paths. Kubeflow components call these and nothing else.

All steps of one pipeline run log into one MLflow run, opened by ``validate`` and passed on by id.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from tlops import logs
from tlops.config.settings import Config
from tlops.errors import GateFailed, TlopsError
from tlops.fileio import read_json, write_json, write_text

log = logging.getLogger("tlops")
F = TypeVar("F", bound=Callable[..., Any])
ERROR_FILE_ENV = "TLOPS_ERROR_FILE"
# Set (to a directory, or to 1 for the system's temporary one): every step works in a fresh work directory of its
# own, removed when the step ends, as a pod's disk is. A step that reads what another step left on its disk,
# outside the declared outputs, then fails under kfp.local just as it would on a cluster.
PRIVATE_WORKDIR_ENV = "TLOPS_PRIVATE_WORKDIR"
FULL_EXIT_ENV = "TLOPS_FULL_EXIT"
PROFILE_ENV = "TLOPS_PROFILE_DIR"  # a directory: each step's body profiled into NAME.prof
_PRIVATE_WORKDIR: ContextVar[str | None] = ContextVar("tlops_private_workdir", default=None)


@contextlib.contextmanager
def _private_workdir(name: str) -> Iterator[None]:
    setting = os.environ.get(PRIVATE_WORKDIR_ENV, "")
    if not setting or setting == "0":
        yield
        return
    parent = setting if os.path.isdir(setting) else None
    path = tempfile.mkdtemp(prefix=f"{name}-", dir=parent)
    token = _PRIVATE_WORKDIR.set(path)
    try:
        yield
    finally:
        _PRIVATE_WORKDIR.reset(token)
        shutil.rmtree(path, ignore_errors=True)


def own_disk(cfg: Config) -> Config:
    """The config as this step works with it: under ``$TLOPS_PRIVATE_WORKDIR`` its own fresh work directory (the
    tracking store stays the one the config names, resolved before the work directory moves)."""
    private = _PRIVATE_WORKDIR.get()
    if private is None:
        return cfg
    from tlops import tracking

    return cfg.model_copy(update={"workdir": private, "tracking": cfg.tracking.model_copy(
        update={"uri": tracking.resolve_tracking_uri(cfg)})})


def _hand_over(function: str, message: str, exit_code: int) -> None:
    target = os.environ.get(ERROR_FILE_ENV)
    if target:
        write_json(target, {"message": f"{function.removesuffix('_step').replace('_', '-')}: {message}",
                            "exit_code": exit_code})


def _exit_quickly_once_done() -> None:
    """In a step's own process (kfp's ``python -m kfp.dsl.executor_main``), end it the moment the executor is
    done, without the interpreter's teardown: unloading torch, MLflow and the rest took 6-7 s per step on this
    machine under load (0.6 s with ``os._exit``), which a pipeline pays once per step. Only after the step
    succeeded; the executor still writes its outputs first; an uncaught error after that exits as usual.
    ``TLOPS_FULL_EXIT=1`` keeps the full teardown."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) != "kfp.dsl.executor_main" or os.environ.get(FULL_EXIT_ENV, "") not in ("", "0"):
        return
    failed: list[bool] = []
    previous = sys.excepthook

    def note_failure(*args: Any) -> None:
        failed.append(True)
        previous(*args)

    def exit_now() -> None:
        if failed:
            return
        if _mlflow_store_opened():
            sys.modules["mlflow"].flush_async_logging()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    sys.excepthook = note_failure
    atexit.register(exit_now)


def _process_age() -> float | None:
    """Seconds since this process started (Linux's /proc), else None."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _log_timing(name: str, entered: float) -> None:
    """One line per step for profiling a run (``bench/profile_run.py``): the process's start-up before the step's
    body (interpreter, kfp's executor, imports), the body, and the process's CPU time so far."""
    import resource

    body = time.monotonic() - entered
    age = _process_age()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before = f"{age - body:.2f} s" if age is not None else "unknown"
    log.info("%s: step timing: start-up %s, body %.2f s, cpu user %.2f s sys %.2f s", name, before, body,
             usage.ru_utime, usage.ru_stime)


def _mlflow_store_opened() -> bool:
    """Whether this process opened an MLflow tracking store (only then can it have logging to flush). A step
    started by the step server has MLflow imported whether it used it or not, and asking for the store to flush
    would open one (a SQLite store checks its schema: seconds)."""
    if "mlflow" not in sys.modules:
        return False
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return _tracking_store_registry._get_store_with_resolved_uri.cache_info().currsize > 0
    except Exception:  # another MLflow's internals: flush as before
        return True


@contextlib.contextmanager
def _profiled(name: str) -> Iterator[None]:
    """With ``$TLOPS_PROFILE_DIR`` set, the step's body under cProfile, its statistics written to DIR/NAME.prof
    (read them with ``python -m pstats`` or snakeviz): where a step's own time goes, imports aside."""
    target = os.environ.get(PROFILE_ENV)
    if not target:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        Path(target).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(Path(target) / f"{name}.prof"))


def step(fn: F) -> F:
    """Log to stderr, and hand a user-facing error to the launcher through ``$TLOPS_ERROR_FILE``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tlops import progress

        logs.to_stderr()  # the kfp executor configures the root logger for itself
        name = fn.__name__.removesuffix("_step").replace("_", "-")
        entered = time.monotonic()
        try:
            try:
                with _private_workdir(fn.__name__.removesuffix("_step")), progress.heartbeat(name), \
                        _profiled(name):
                    result = fn(*args, **kwargs)
                _log_timing(name, entered)
                _exit_quickly_once_done()
                return result
            except TlopsError:
                raise
            except Exception as exc:
                from tlops.tracking import unreachable_error

                user_error = unreachable_error(exc)
                if user_error is None:
                    raise
                raise user_error from None
        except TlopsError as exc:
            _hand_over(fn.__name__, str(exc), exc.exit_code)
            raise
        except Exception as exc:
            # Not a user's mistake: said as what it is. The launcher must hear of it from here too, because a
            # container runner may report the failed step as a success (kfp's DockerRunner can).
            _hand_over(fn.__name__, f"unexpected {type(exc).__name__}: {str(exc)[:500]} (the step's log has the "
                       "traceback)", 2)
            raise

    return wrapper  # type: ignore[return-value]


def _mlflow_run(cfg: Config, run_id: str | None = None, run_name: str | None = None) -> Any:
    import mlflow

    from tlops import tracking

    experiment_id = tracking.setup(cfg)
    if run_id:
        return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name)


@contextlib.contextmanager
def _system_metrics(cfg: Config, run_id: str) -> Iterator[None]:
    """The machine's CPU, memory (and GPU) into the run while the block runs; see ``tracking.system_metrics``."""
    from tlops import tracking

    try:
        tracking.setup(cfg)
    except Exception as exc:  # best effort: the work goes on, the step says later if the server is gone
        log.warning("system metrics are not recorded for this step (%s)", str(exc).splitlines()[0][:200])
        yield
        return
    with tracking.system_metrics(run_id):
        yield


def _pixels(cfg: Config, rows: Any) -> Any:
    """``rows`` of the run's manifest with ``path`` naming this step's own copy of each file (checked by sha256)."""
    from tlops.data.manifest import localize

    return localize(rows, Path(cfg.workdir) / "cache")


def _feature_cache(cfg: Config) -> Any:
    """The feature cache fine-tune uses: this step's work directory, and ``state_uri`` when set."""
    from tlops.vision.features import FeatureCache

    remote = f"{cfg.state_uri.rstrip('/')}/features" if cfg.state_uri else None
    return FeatureCache(Path(cfg.workdir) / "cache" / "features", remote)


# Over 60 lines: the step's MLflow run set-up, the data checks, the plan and the outputs kfp declares, in
# the order the run records them (steps.py is kept as it is while the monitoring work changes it).
@step
def validate_step(data_uri: str, config_json: str, manifest_path: str, report_path: str,
                  pipeline_run: str = "", html_path: str = "", plan_path: str = "",
                  parameters: dict[str, Any] | None = None, kfp_run: dict[str, str] | None = None,
                  links_path: str = "", target_manifest_path: str = "") -> str:
    """Build the image manifest, run the GX suite, open the MLflow run, decide what the run does.

    Writes the manifest training uses (``manifest_path``; with ``validation.exclude_quarantined`` without the
    quarantined files, the full one is logged to MLflow beside it), the report, and the run plan
    (``plan_path``: the resolved config, train or skip and why, the MLflow run id), which every later step
    takes as its input. Returns the plan's decision, ``train`` or ``skip``.

    ``parameters`` are the pipeline's typed parameters (``tlops.config.settings.with_parameters``: over
    ``config_json``); an empty ``data_uri`` means the config's ``data.uri``. ``kfp_run`` (``id``, ``name``) names
    the KFP run, recorded as MLflow tags with a link to it when ``cluster.host`` is known; ``links_path`` receives
    a Markdown page with the link to the MLflow run. ``target_manifest_path`` receives the target domain's manifest
    (``data.target_uri``, ``data.target_labelled_uri``; the header alone without them), checked with the source.
    """
    import mlflow

    from tlops import tracking
    from tlops.config.plan import RunPlan
    from tlops.config.settings import with_parameters
    from tlops.data import discovery as data
    from tlops.data.validation import training_manifest, write_outputs
    from tlops.selection.planner import validate_data

    cfg = with_parameters(config_json, **(parameters or {}))
    data_uri = data_uri or cfg.data.uri
    work = own_disk(cfg)
    with tempfile.TemporaryDirectory(prefix="tlops-validate-") as tmp:
        docs_dir = Path(tmp) / "data_docs"
        manifest, report = validate_data(data_uri, work, docs_dir)
        from tlops.data.target import write_target_manifest
        from tlops.selection.domain import target_summary, validate_target

        # Before anything is written: a target URI with no images or foreign classes stops here (exit 2).
        target, report = validate_target(work, manifest, report)
        used = training_manifest(manifest, report)
        outputs = write_outputs(Path(tmp) / "out", manifest, report)
        data.write_manifest(used, manifest_path)
        if target_manifest_path:
            write_target_manifest(target, target_manifest_path)
        if not target.empty:
            outputs["target_manifest"] = write_target_manifest(target, Path(tmp) / "out" / "target_manifest.csv")
        write_json(report_path, report.to_dict())
        if html_path:
            write_text(html_path, report.to_html())
        mhash = data.manifest_hash(used)
        with _mlflow_run(work, run_name=tracking.run_name(cfg, data_uri, mhash)) as run:
            mlflow.log_param("data.resolved_uri", data_uri)
            tracking.log_datasets(used, data_uri, mhash)
            split_counts = used["split"].value_counts().to_dict()
            verdict = {"status": "pass" if report.success else "fail",
                       "failed": [c.name for c in report.failures()], "warnings": [c.name for c in report.warnings()]}
            links = kfp_links(cfg, kfp_run or {}, run.info.experiment_id, run.info.run_id)
            mlflow.set_tags(links["tags"])
            if links_path:
                write_text(links_path, links["markdown"])
            mlflow.set_tags({
                "tlops.pipeline_run": pipeline_run, "data.manifest_hash": mhash,
                "validation": verdict["status"], "config.hash": cfg.config_hash(),
                "validation.failed": ",".join(verdict["failed"]) or "none",
                "validation.warnings": ",".join(verdict["warnings"]) or "none",
            })
            mlflow.log_metrics({"data.files": len(used), "data.classes": used["label"].nunique(),
                                "data.quarantined": len(report.quarantine), "data.excluded": len(report.excluded),
                                **{f"data.split.{k}": int(v) for k, v in split_counts.items()}})
            if not target.empty:
                mlflow.log_metrics({f"data.{k}": v for k, v in target_summary(target).items()})
            # validation/manifest.csv (MANIFEST_ARTIFACT) is what a later run reads back as its drift reference.
            for path in outputs.values():
                mlflow.log_artifact(str(path), "validation")
            if docs_dir.is_dir():
                mlflow.log_artifacts(str(docs_dir), "validation/data_docs")
            for line in report.summary_lines():
                log.info("validation %s", line)
            if not report.success:
                mlflow.log_params(tracking.run_params(cfg))
                mlflow.log_dict(cfg.model_dump(mode="json"), "config/config.json")
                raise GateFailed("data validation failed: " + "; ".join(c.name + ": " + c.detail
                                                                       for c in report.failures()))
            from tlops.selection.planner import plan_run, resolved_config

            choices = plan_run(work, used, target)  # backbone/strategy auto, feature drift, skip decision
            resolved = resolved_config(cfg, choices)
            skipped = bool(choices.get("skipped"))
            plan = RunPlan(run_id=run.info.run_id, config=resolved, decision="skip" if skipped else "train",
                           reasons=[str(choices.get("skip_reason") or "training")], pipeline_run=pipeline_run,
                           manifest_hash=mhash, validation=verdict,
                           choices={k: v for k, v in choices.items() if k != "mmd"})
            # The config as the later steps run it: auto already replaced by what was chosen. The run's params are
            # the settings a person scans (tracking.run_params); the whole config is this artifact.
            mlflow.log_params(tracking.run_params(resolved))
            mlflow.set_tag("mlflow.runName", tracking.run_name(resolved, data_uri, mhash))
            mlflow.log_dict(resolved.model_dump(mode="json"), "config/config.json")
            mlflow.log_dict(plan.to_dict(), "plan/run_plan.json")
            if plan_path:
                plan.write(plan_path)
            return plan.decision


def kfp_links(cfg: Config, kfp_run: dict[str, str], experiment_id: str, run_id: str) -> dict[str, Any]:
    """The KFP run and the MLflow run naming each other: MLflow tags (``kfp.run_id``, ``kfp.run_name``,
    ``kfp.run_url`` when ``cluster.host`` names the KFP UI) and a Markdown page for KFP with the MLflow run's
    link (or, for a store that is no server, where to find the run)."""
    from tlops import tracking

    tags: dict[str, str] = {}
    kfp_id, kfp_name = kfp_run.get("id", ""), kfp_run.get("name", "")
    if kfp_id:
        tags["kfp.run_id"] = kfp_id
        if cfg.cluster.host:
            tags["kfp.run_url"] = f"{cfg.cluster.host.rstrip('/')}/#/runs/details/{kfp_id}"
    if kfp_name:
        tags["kfp.run_name"] = kfp_name
    uri = tracking.resolve_tracking_uri(cfg)
    url = tracking.run_url(uri, experiment_id, run_id)
    where = f"[{run_id}]({url})" if url else f"`{run_id}` in `{tracking.redact(uri)}` (`mlflow ui`)"
    lines = ["# MLflow", "", f"- run: {where}", f"- experiment: `{cfg.tracking.experiment}` ({experiment_id})",
             f"- registered model: `{cfg.registry.model_name}`"]
    if tags.get("kfp.run_url"):
        lines.append(f"- this KFP run, as MLflow records it: {tags['kfp.run_url']}")
    return {"tags": tags, "url": url, "markdown": "\n".join(lines) + "\n"}


@step
def parity_step(plan_path: str, manifest_path: str, spec_path: str, report_path: str,
                html_path: str = "", target_manifest_path: str = "") -> str:
    """Compare the eval preprocessing with the backbone's reference; returns the spec fingerprint.

    With target images (``target_manifest_path``), some of them are golden images too: one spec for both domains."""
    import mlflow
    import pandas as pd

    from tlops import progress
    from tlops.config.plan import RunPlan
    from tlops.data.discovery import read_manifest
    from tlops.data.manifest import golden_rows
    from tlops.vision.parity import check_parity, eval_spec, golden_set, report_html

    plan = RunPlan.read(plan_path)
    cfg = own_disk(plan.config)
    from tlops.data.target import read_target_manifest, target_golden_rows

    rows = pd.concat([golden_rows(read_manifest(manifest_path)),
                      target_golden_rows(read_target_manifest(target_manifest_path))], ignore_index=True)
    golden = golden_set(list(_pixels(cfg, rows)["path"]))
    progress.phase(f"{len(golden)} golden images through our transform and {cfg.backbone}'s own")
    report = check_parity(cfg.backbone, cfg.preprocess, golden)
    spec = eval_spec(cfg.backbone, cfg.preprocess)
    record = report.to_dict()
    write_json(spec_path, spec.to_record())
    write_json(report_path, record)
    page = report_html(record)
    if html_path:
        write_text(html_path, page)
    with _mlflow_run(cfg, plan.run_id):
        mlflow.log_dict(spec.to_record(), "preprocess/preprocess.json")
        mlflow.log_dict(record, "preprocess/parity_report.json")
        mlflow.log_text(page, "preprocess/parity_report.html")
        mlflow.set_tags({
            "preprocess.fingerprint": spec.fingerprint,
            "preprocess.reference_fingerprint": report.reference["fingerprint"],
            "preprocess.declared": "; ".join(report.declared) or "none",
            "preprocess.source": spec.source,
            "parity": "pass" if report.passed else "fail",
        })
        mlflow.log_metric("parity.golden_max_abs_diff", max(g["max_abs_diff"] for g in report.golden))
        for line in report.declared:
            log.info("parity: declared difference %s", line)
        if not report.passed:
            raise GateFailed("preprocessing parity failed: " + report.short_reason())
    log.info("parity: pass, fingerprint %s", spec.fingerprint)
    return spec.fingerprint


# Over 60 lines: the step's inputs read, the training mode run, the model logged and its serving check,
# in the order the run records them (steps.py is kept as it is while the monitoring work changes it).
@step
def fine_tune_step(plan_path: str, manifest_path: str, spec_path: str, model_dir: str,
                   serving_path: str = "", target_manifest_path: str = "", reference_dir: str = "") -> str:
    """Fine-tune with ``train.strategy``, save the model files, log the model to MLflow; returns its model URI.

    ``serving_path`` receives the serving parity check (the logged model loaded back, raw bytes in, against
    the in-memory model), which the gate takes as an input. An adaptation strategy reads the target images of
    ``target_manifest_path`` (only the adaptation pool and the labelled target's val split are fetched: never a
    target test image) and writes the source model it started from to ``reference_dir`` (the evaluate step scores
    it on the source test split: the gate's reference when there is no champion); other strategies write nothing
    there."""
    import mlflow
    import pandas as pd
    from mlflow.entities import Metric

    from tlops import __version__, progress, tracking
    from tlops.aside import Aside
    from tlops.config.plan import RunPlan
    from tlops.data.discovery import class_names, read_manifest
    from tlops.data.manifest import golden_rows, usable
    from tlops.serving.pyfunc import save_model_dir
    from tlops.training.curves import plot_history
    from tlops.training.finetune import fine_tune
    from tlops.vision.parity import golden_set, serving_check
    from tlops.vision.preprocessing import PreprocessSpec

    plan = RunPlan.read(plan_path)
    cfg = own_disk(plan.config)
    manifest = _pixels(cfg, usable(read_manifest(manifest_path)))
    # The eval spec is the one the parity step proved; augmentation (training only) never changes it.
    spec = PreprocessSpec.from_record(read_json(spec_path))
    classes = class_names(manifest)
    adapting: dict[str, Any] = {}
    if cfg.train.is_adaptation:
        from tlops.data.target import adaptation_pool, labelled_split, read_target_manifest

        target = read_target_manifest(target_manifest_path)
        pool = adaptation_pool(target)
        progress.phase(f"fetching {len(pool)} target images to adapt to")
        adapting = {"target": _pixels(cfg, pool) if not pool.empty else pool,
                    "target_val": _pixels(cfg, labelled_split(target, "val")),
                    "target_test_sha256": [str(s) for s in labelled_split(target, "test")["sha256"]]}
    progress.phase(f"{cfg.train.strategy}: loading {cfg.backbone} with its pre-trained weights")
    with _system_metrics(cfg, plan.run_id):
        result = fine_tune(cfg.backbone, manifest, classes, spec, cfg.train, workdir=cfg.workdir,
                           state_uri=cfg.state_uri, **adapting)
    # The curves are drawn in a forked child while this process saves and logs the model (tlops.aside).
    drawing = Aside(lambda: {"curves.png": plot_history(result.history, result.strategy)})
    save_model_dir(model_dir, result.model, cfg.backbone, classes, spec)
    if reference_dir and result.source_only is not None:
        import copy

        reference = copy.deepcopy(result.model)
        reference.load_state_dict(result.source_only)
        save_model_dir(reference_dir, reference, cfg.backbone, classes, spec)
    elif reference_dir:  # the declared output exists either way; empty: no source-only model
        Path(reference_dir).mkdir(parents=True, exist_ok=True)
    golden_paths = list(golden_rows(manifest)["path"])
    with _mlflow_run(cfg, plan.run_id) as run, tempfile.TemporaryDirectory(prefix="tlops-fine-tune-") as tmp:
        # One batched call for the whole history instead of a call per epoch.
        metrics = [Metric(k, float(v), 0, int(h["epoch"])) for h in result.history
                   for k, v in h.items() if k != "epoch" and isinstance(v, int | float) and v == v]
        client = mlflow.MlflowClient()
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        mlflow.log_metrics({"best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch})
        env = result.environment
        mlflow.log_dict(env, "train/environment.json")
        mlflow.log_params({f"env.{k}": env[k] for k in ("torch", "cuda", "device", "torch_threads", "world_size",
                                                          "amp_dtype") if k in env})
        mlflow.set_tags({"train.strategy": result.strategy,
                         "train.resumed_at_step": "none" if result.resumed_at_step is None
                         else str(result.resumed_at_step),
                         # LP-FT: the fine-tuned model lost to the probe it started from on validation
                         **({"train.probe_kept_over": result.kept_over} if result.kept_over else {})})
        if "probe_val_accuracy" in env:
            mlflow.log_metric("probe.best_val_accuracy", env["probe_val_accuracy"])
        if cfg.train.is_adaptation:
            mlflow.set_tags({"train.adaptation_base": str(env.get("adaptation_base", "")),
                             "train.adaptation_resumed_at": "none" if result.resumed_at_step is None
                             else str(result.resumed_at_step)})
            mlflow.log_metrics({"adaptation.target_images": float(env.get("target_images", 0)),
                                "adaptation.source_val_accuracy_before": float(env["source_val_accuracy_before"])})
        example = pd.DataFrame({"image": [Path(golden_paths[0]).read_bytes()]}) if golden_paths else None
        progress.phase("logging the model to MLflow")
        info = log_pyfunc_model(model_dir, __version__, input_example=example, name=cfg.registry.model_name)
        # Serving parity: the model as it will be served (loaded back from the store, raw bytes in)
        # against the in-memory model on the training eval transform.
        progress.phase("serving parity: the logged model loaded back, on the golden images")
        golden = golden_set(golden_paths)
        serving = serving_check(result.model, spec, tracking.load_pyfunc(info.model_uri), golden)
        mlflow.log_dict(serving, "preprocess/serving_parity.json")
        mlflow.set_tag("parity.serving", serving["status"])
        mlflow.log_metric("parity.serving_max_abs_prob_diff", max(r["max_abs_prob_diff"] for r in serving["images"]))
        if serving["status"] != "pass":
            mlflow.set_tag("parity", "fail")
            log.warning("serving parity failed: %s", "; ".join(serving["errors"][:3]))
        else:
            log.info("serving parity: pass on %d golden images", len(golden))
        curves = Path(tmp) / "curves.png"
        curves.write_bytes(drawing.result()["curves.png"])
        mlflow.log_artifact(str(curves), "train")
    if serving_path:
        write_json(serving_path, serving)
    return str(info.model_uri)


def log_pyfunc_model(model_dir: str, version: str, input_example: Any = None, name: str = "model") -> Any:
    """Log the model as an MLflow pyfunc from code (no pickle), self-contained: its files as artifacts, the tlops
    code it runs (``code_paths``) and the pinned requirements of what that code imports (not tlops), so it loads
    wherever MLflow models load (``mlflow models serve``, ``build-docker``, KServe's MLflow runtime). ``name`` is
    the logged model's name (the registered model's, so the run's Models list says which model it is)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from tlops import tracking
    from tlops.serving.pyfunc import bundle_code, pyfunc_requirements

    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    )
    with tempfile.TemporaryDirectory(prefix="tlops-code-") as tmp, tracking.pinned_requirements_checked():
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("serving") / "pyfunc_entry.py"),
            artifacts={"model_dir": model_dir},
            code_paths=[str(bundle_code(tmp))],
            signature=signature,
            input_example=input_example,
            # Explicit requirements: MLflow would otherwise import the model to infer them.
            pip_requirements=pyfunc_requirements(),
            metadata={"tlops_version": version},
        )


@step
def evaluate_step(plan_path: str, manifest_path: str, model_uri: str, metrics_path: str,
                  html_path: str = "", target_manifest_path: str = "", reference_dir: str = "") -> dict[str, Any]:
    """Score the candidate and the current champion on the same test split; write the record and the report.

    With a labelled target test split (``target_manifest_path``) the record is the target's (the gate compares
    there) and ``domains`` adds the source test split's figures: the candidate's, the champion's and, when the
    fine-tune step left one in ``reference_dir``, the source-only model's (on both test splits).

    Returns what the Kubeflow component passes on: ``metrics`` (headline numbers), and ``categories`` and
    ``matrix`` for its ClassificationMetrics confusion matrix.
    """
    import mlflow

    from tlops import progress
    from tlops.aside import Aside
    from tlops.config.plan import RunPlan
    from tlops.data.discovery import read_manifest
    from tlops.data.manifest import split_rows
    from tlops.evaluation import evaluate as evaluation
    from tlops.evaluation import report
    from tlops.registry import champion_version

    plan = RunPlan.read(plan_path)
    cfg = own_disk(plan.config)
    manifest = read_manifest(manifest_path)
    rows = split_rows(manifest, "test")
    if rows.empty:
        raise TlopsError("the test split is empty: add images or raise data.test_fraction")
    rows = _pixels(cfg, rows)
    from tlops.data.target import labelled_split, read_target_manifest

    target_rows = labelled_split(read_target_manifest(target_manifest_path), "test")
    source_rows = None
    if not target_rows.empty:  # the target test split is what the candidate is judged on; the source's beside it
        source_rows, rows = rows, _pixels(cfg, target_rows)
    progress.phase(f"reading {len(rows)} test images")
    images = evaluation.read_images(list(rows["path"]))
    progress.phase("opening the MLflow run")
    with _mlflow_run(cfg, plan.run_id), tempfile.TemporaryDirectory(prefix="tlops-evaluate-") as tmp:
        progress.phase(f"looking up the champion of {cfg.registry.model_name}")
        champ = champion_version(cfg.registry.model_name)
        champion = None if champ is None else (cfg.registry.model_name, str(champ.version))
        features = _feature_cache(cfg) if cfg.evaluation.feature_cache else None
        loaded: dict[str, Any] = {}
        result = evaluation.evaluate(model_uri, rows, images, cfg.evaluation, champion, features=features,
                                     loaded=loaded)
        if source_rows is not None:
            progress.phase(f"scoring on the source test split too ({len(source_rows)} images)")
            result["domain"] = "target"
            result["domains"] = _domains(model_uri, cfg, champion, features, rows, images, source_rows, result,
                                         reference_dir)
            mlflow.log_metrics(_domain_metrics(result["domains"]))
        # The figures are drawn in a forked child while this process logs the record and the monitoring
        # reference (tlops.aside); the report that shows them is written last.
        drawing = Aside(report.figures, result)
        result["report"] = mlflow.get_artifact_uri("evaluation/report.html")
        numbers = evaluation.scalars(result)
        renamed = {"n": "test_images", "champion_accuracy": "champion.test_accuracy",
                   "accuracy_difference": "comparison.accuracy_difference",
                   "accuracy_difference_ci_low": "comparison.ci_low",
                   "accuracy_difference_ci_high": "comparison.ci_high", "mcnemar_p": "comparison.mcnemar_p",
                   "latency_p50_ms": "latency_p50_ms", "latency_p95_ms": "latency_p95_ms",
                   "model_size_bytes": "model_size_bytes"}
        mlflow.log_metrics({renamed.get(k, f"test_{k}"): v for k, v in numbers.items()})
        if "champion" in result:
            mlflow.log_metric("champion.test_macro_f1", result["champion"]["macro_f1"])
        mlflow.log_dict(result, "evaluation/metrics.json")
        progress.phase("recording the reference tlops monitor compares served traffic with")
        from tlops.monitoring.reference import log_reference

        log_reference(cfg, model_uri, manifest, lambda sample: _pixels(cfg, sample),
                      predictor=loaded["candidate"].unwrap_python_model().predictor, features=features)
        progress.phase("drawing the figures and writing the report")
        pngs = drawing.result()
        page = report.report_html(result, pngs, f"tlops evaluation: {cfg.registry.model_name} candidate")
        for name, data in pngs.items():
            (Path(tmp) / name).write_bytes(data)
            mlflow.log_artifact(str(Path(tmp) / name), "evaluation")
        mlflow.log_text(page, "evaluation/report.html")
        if html_path:
            write_text(html_path, page)
        cand = result["candidate"]
        log.info("evaluate: accuracy %.4f, macro-F1 %.4f, ECE %.4f, latency p95 %.1f ms, weights %d bytes",
                 cand["accuracy"], cand["macro_f1"], cand["ece"], cand["latency"]["p95_ms"] or float("nan"),
                 cand["model_size_bytes"])
    write_json(metrics_path, result)
    cm = result["confusion_matrix"]
    return {"metrics": numbers, "categories": cm["categories"], "matrix": cm["matrix"]}


@step
def compress_step(plan_path: str, manifest_path: str, model_uri: str, metrics_path: str,
                  compression_path: str) -> str:
    """Build the compressed serving variants of ``deploy.variants`` (none: nothing to do), check their parity,
    measure them on the test split against the uncompressed candidate; the gate decides on them. Returns the
    variants built, comma-separated."""
    from tlops.config.plan import RunPlan
    from tlops.data.discovery import read_manifest
    from tlops.serving.compress.step import run_step

    plan = RunPlan.read(plan_path)
    cfg = own_disk(plan.config)
    if not cfg.deploy.variants:
        record = run_step(cfg, plan.run_id, model_uri, read_manifest(manifest_path), None, {})
    else:
        with _mlflow_run(cfg, plan.run_id):
            record = run_step(cfg, plan.run_id, model_uri, read_manifest(manifest_path),
                              lambda rows: _pixels(cfg, rows), read_json(metrics_path))
    write_json(compression_path, record)
    return ",".join(n for n, r in record["variants"].items() if "error" not in r)


def gate_evidence(plan: Any, parity_report: dict[str, Any], serving: dict[str, Any]) -> dict[str, str]:
    """What the gate decides on and records, from its declared inputs: the run plan (validation verdict,
    data hash), the parity step's report and the fine-tune step's serving check."""
    return {
        "validation": plan.validation.get("status", "unknown"),
        "parity": parity_report.get("status", "unknown"),
        "parity.serving": serving.get("status", "unknown"),
        "preprocess.fingerprint": parity_report.get("candidate", {}).get("fingerprint", ""),
        "preprocess.reference_fingerprint": parity_report.get("reference", {}).get("fingerprint", ""),
        "preprocess.declared": "; ".join(parity_report.get("declared") or []) or "none",
        "data.manifest_hash": plan.manifest_hash,
        "config.hash": plan.config.config_hash(),
        "tlops.pipeline_run": plan.pipeline_run,
    }


def _release(run: Any, plan: Any, evidence: dict[str, str], decision: Any, name: str, version: str,
             tmp: str) -> dict[str, Any]:
    """What the report and the KFP Markdown say about the release: decision, version, fingerprint, data, the
    training curves. For people only: the data summary and the curves are read back from the run."""
    import mlflow

    metrics, params = run.data.metrics, run.data.params
    curves = None
    try:
        curves = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="train/curves.png",
                                                          dst_path=tmp)).read_bytes()
    except Exception as exc:  # the report goes on without the figure
        log.warning("gate: the training curves are not in the report (%s)", str(exc).splitlines()[0][:200])
    return {
        "decision": decision.decision, "reasons": decision.reasons, "compared_with": decision.compared_with,
        "model_name": name, "version": version, "fingerprint": evidence["preprocess.fingerprint"],
        "reference_fingerprint": evidence["preprocess.reference_fingerprint"],
        "declared": evidence["preprocess.declared"],
        "data": {"uri": params.get("data.resolved_uri", plan.config.data.uri), "manifest_hash": plan.manifest_hash,
                 "files": int(metrics["data.files"]) if "data.files" in metrics else None,
                 "classes": int(metrics["data.classes"]) if "data.classes" in metrics else None,
                 "splits": {s: int(metrics[f"data.split.{s}"]) for s in ("train", "val", "test")
                            if f"data.split.{s}" in metrics}},
        "curves": curves,
    }


# Over 60 lines: register, decide under the lock, record the evidence and the report on the version, in
# the order the registry records them (steps.py is kept as it is while the monitoring work changes it).
@step
def gate_step(plan_path: str, model_uri: str, metrics_path: str, parity_path: str, serving_path: str,
              decision_path: str, compression_path: str = "", markdown_path: str = "", html_path: str = "") -> str:
    """Register the candidate with its evidence, decide, move the aliases. Returns the run summary as JSON.

    Everything the decision rests on is a declared input: the run plan (validation verdict), the parity
    report, the serving check and the evaluation. The decision is then written where people look: the
    version's description, the evaluation report (decision, version, fingerprint, data, curves; replaced in the
    run and written to ``html_path``) and ``markdown_path`` (the KFP Markdown output)."""
    import mlflow

    from tlops import progress, registry, tracking
    from tlops.aside import Aside
    from tlops.config.plan import RunPlan
    from tlops.evaluation import report

    plan = RunPlan.read(plan_path)
    cfg = own_disk(plan.config)
    metrics = read_json(metrics_path)
    evidence_in = gate_evidence(plan, read_json(parity_path), read_json(serving_path))
    name = cfg.registry.model_name
    # The report's figures depend on the evaluation alone: drawn in a forked child (tlops.aside) while this
    # process works with the store and waits on the registry lock's settle time (a second of sleep).
    drawing = Aside(report.figures, metrics)
    with _mlflow_run(cfg, plan.run_id) as run:
        tags = run.data.tags  # for the summary a person reads (why auto chose), not for the decision
        parity_ok = evidence_in["parity"] == "pass" and evidence_in["parity.serving"] == "pass"
        decision = registry.decide(metrics["candidate"], metrics.get("champion"), cfg.gate,
                                   validation_ok=plan.validation_ok, parity_ok=parity_ok,
                                   preprocess=registry.PreprocessEvidence.from_tags(evidence_in),
                                   comparison=metrics.get("comparison"), domains=metrics.get("domains"))
        evidence = registry.evidence_tags(evidence_in, metrics, cfg.backbone, run.info.run_id, cfg.config_hash())
        progress.phase(f"registering the candidate as a version of {name}")
        mv = registry.register(model_uri, name, evidence)
        version = str(mv.version)
        progress.phase(f"gate: {decision.decision} version {version}; moving the aliases")
        notes = [f"Preprocessing fingerprint `{evidence_in['preprocess.fingerprint']}`; data content hash "
                 f"`{plan.manifest_hash}`; test accuracy {metrics['candidate']['accuracy']:.4f} on "
                 f"{metrics['candidate']['n']} images.",
                 f"Evidence: this version's tags; the report is `evaluation/report.html` of run "
                 f"`{run.info.run_id}`."]
        decision = registry.apply_decision(name, version, decision, via=f"pipeline {plan.pipeline_run}".strip(),
                                           notes=notes)
        mlflow.set_tags({"gate.decision": decision.decision, "gate.stale": str(decision.stale).lower(),
                         "model.name": name, "model.version": version, "git.commit": evidence["git.commit"]})
        variants = None
        if compression_path:  # compressed variants: the chosen one becomes the version's serving artifact
            from tlops.serving.compress.step import record_on_version

            variants = record_on_version(name, version, read_json(compression_path), cfg.gate)
        summary = {
            "run_id": run.info.run_id,
            "tracking_uri": tracking.redact(tracking.resolve_tracking_uri(cfg)),
            "model_name": name,
            "model_version": version,
            "decision": decision.decision,
            "reasons": decision.reasons,
            "compared_with": decision.compared_with,
            "stale": decision.stale,
            "mode": cfg.gate.mode,
            "champion_now": registry.alias_version(name, registry.CHAMPION),
            "challenger_now": registry.alias_version(name, registry.CHALLENGER),
            "git_commit": evidence["git.commit"],
            "metrics": _headline(metrics),
            "validation": evidence_in["validation"],
            "parity": evidence_in["parity"],
            "fingerprint": evidence_in["preprocess.fingerprint"],
            "manifest_hash": plan.manifest_hash,
            "backbone": cfg.backbone, "backbone_reason": tags.get("backbone.selection_reason"),
            "strategy": cfg.train.strategy,
            "strategy_reason": tags.get("adaptation.why") or tags.get("similarity.why"),
        }
        if metrics.get("domains"):  # the target test split decided; the source's beside it
            summary["domains"] = metrics["domains"]
        if variants and variants["variants"]:
            summary["serving_variant"] = variants["serving_variant"]
            summary["variant_reasons"] = {n: r["reasons"] for n, r in variants["variants"].items()}
        mlflow.log_dict(summary, "gate/decision.json")
        with tempfile.TemporaryDirectory(prefix="tlops-gate-") as tmp:
            release = _release(run, plan, evidence_in, decision, name, version, tmp)
        page = report.report_html(metrics, drawing.result(), f"tlops evaluation: {name} version {version}",
                                  release)
        mlflow.log_text(page, "evaluation/report.html")
        markdown = report.release_markdown(release, metrics, run.info.run_id)
        mlflow.log_text(markdown, "gate/decision.md")
    if html_path:
        write_text(html_path, page)
    if markdown_path:
        write_text(markdown_path, markdown)
    write_json(decision_path, summary)
    return json.dumps(summary)


@step
def skip_step(plan_path: str, decision_path: str) -> str:
    """The pipeline's branch when the validate step decided to train nothing (``selection.skip_when``): fine-tune,
    evaluate and gate do not run, no version is registered, the champion is unchanged, and the reason is recorded.
    Returns the run summary as JSON, as the gate does."""
    import mlflow

    from tlops import registry, tracking
    from tlops.config.plan import RunPlan

    plan = RunPlan.read(plan_path)
    cfg = own_disk(plan.config)
    name = cfg.registry.model_name
    with _mlflow_run(cfg, plan.run_id) as run:
        mlflow.set_tags({"gate.decision": "skipped", "model.name": name})
        summary = {"run_id": run.info.run_id, "tracking_uri": tracking.redact(tracking.resolve_tracking_uri(cfg)),
                   "model_name": name, "decision": "skipped", "reasons": plan.reasons,
                   "champion_now": registry.alias_version(name, registry.CHAMPION),
                   "validation": plan.validation.get("status"), "manifest_hash": plan.manifest_hash,
                   "drift": plan.choices.get("drift")}
        mlflow.log_dict(summary, "gate/decision.json")
    write_json(decision_path, summary)
    return json.dumps(summary)


def _accuracies_of_dir(model_dir: str, splits: dict[str, tuple[Any, list[bytes]]]) -> dict[str, dict[str, Any]]:
    """Accuracy and size of each split (name -> its rows with ``label``, its image bytes) for the model files in
    ``model_dir``, loaded once, through its own preprocessing."""
    from tlops.serving.pyfunc import Predictor, load_model_dir

    model, spec, classes = load_model_dir(model_dir)
    predictor = Predictor(model, spec, classes, batch_size=64)
    out = {}
    for name, (rows, images) in splits.items():
        labels = [str(x) for x in rows["label"]]
        right = sum(classes[int(k)] == t for k, t in zip(predictor.predict_proba(images).argmax(1), labels,
                                                            strict=True))
        out[name] = {"accuracy": right / max(len(labels), 1), "n": len(rows)}
    return out


def _domains(model_uri: str, cfg: Config, champion: Any, features: Any, target_rows: Any, target_images: list[bytes],
             source_rows: Any, result: dict[str, Any], reference_dir: str) -> dict[str, Any]:
    """Both test splits' figures: target (from ``result``, its images already read) and source (scored now), for the
    candidate, the champion and the source-only model the adaptation started from (when ``reference_dir`` holds
    it)."""
    from tlops.evaluation import evaluate as evaluation

    images = evaluation.read_images(list(source_rows["path"]))
    src = evaluation.evaluate(model_uri, source_rows, images, cfg.evaluation.model_copy(update={"latency_images": 0}),
                              champion, features=features)

    def brief(record: dict[str, Any]) -> dict[str, Any]:
        return {k: record[k] for k in ("accuracy", "macro_f1", "n") if k in record} | (
            {"version": record["version"]} if "version" in record else {})

    out: dict[str, Any] = {
        "target": {"candidate": brief(result["candidate"]), **({"champion": brief(result["champion"])}
                                                               if "champion" in result else {})},
        "source": {"candidate": brief(src["candidate"]), **({"champion": brief(src["champion"])}
                                                             if "champion" in src else {})},
    }
    if reference_dir and (Path(reference_dir) / "model.json").is_file():
        scored = _accuracies_of_dir(reference_dir, {"target": (target_rows, target_images),
                                                    "source": (source_rows, images)})
        for domain, record in scored.items():
            out[domain]["source_only"] = record
    return out


def _domain_metrics(domains: dict[str, Any]) -> dict[str, float]:
    return {f"{domain}.{who}.test_accuracy": float(rec["accuracy"]) for domain, whos in domains.items()
            for who, rec in whos.items()}


def _headline(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation record without its tables (per class, bins, matrix, slices): small enough for a summary."""
    bulky = {"per_class", "calibration", "classes"}
    out = {k: v for k, v in evaluation.items() if k not in ("confusion_matrix", "slices")}
    for who in ("candidate", "champion"):
        if who in out:
            out[who] = {k: v for k, v in out[who].items() if k not in bulky}
    return out
