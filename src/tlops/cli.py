"""The ``tlops`` command line: how a person starts any part of the pipeline."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from tlops.config.settings import StrategyChoice
from tlops.errors import TlopsError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer-learning MLOps: validate, parity, fine-tune, evaluate, gate.")

FORMATS = ("table", "json")
STRATEGIES = get_args(StrategyChoice)
# The catalogue of tlops.vision.backbones (a test keeps them equal), named here so that --help and completion need no
# torch import; checkpoint:DIR names a backbone of your own, auto lets the validate step choose.
BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50")
# Set by a command whose process holds nothing to finalise once it returns (``tlops run``: its log is closed and
# its step servers waited for; it logs nothing to MLflow itself): ``python -m tlops`` then ends without the
# interpreter's teardown of kfp, pydantic and the rest (0.25 s of every run, after the summary is printed).
QUICK_EXIT = False


def _choices(values: tuple[str, ...]) -> Any:
    """Shell completion of a closed set: the values that start with what is typed."""

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    return complete


def _version(value: bool) -> None:
    if value:
        from tlops import __version__

        typer.echo(f"tlops {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Transfer-learning MLOps: validate, parity, fine-tune, evaluate, gate."""


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
# A closed set as text, checked by the command itself: a wrong value is one `error:` line (exit 2), while the
# choices show in --help and complete in the shell.
FormatOpt = Annotated[str, typer.Option("--format", metavar="[table|json]", help="Output format: table or json.",
                                        autocompletion=_choices(FORMATS))]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config field, e.g. --set train.epochs=10 or "
    "--set preprocess.mean=0.485,0.456,0.406 (repeatable; applied after --config).")]


def _config(config: Path | None, overrides: list[str] | None, **fields: Any):  # noqa: ANN202
    from tlops.config.settings import load_config

    extra = [f"{k}={v}" for k, v in fields.items() if v is not None]
    return load_config(config, [*(overrides or []), *extra])


def _writable_dir(path: Path, what: str) -> None:
    """Fail in a second, with one line, when results cannot be written under ``path`` (under a file, in /proc,
    read-only): before any work, and leaving no file behind."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TlopsError(f"{what} {_shown(path)}: cannot write there ({why})") from None


def _shown(value: object) -> str:
    from tlops.data.discovery import printable

    return printable(str(value))


def _pairs(items: list[str] | None, sep: str, option: str, shape: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, found, value = item.partition(sep)
        if not found or not key:
            raise TlopsError(f"{option} {item!r}: expected {shape}")
        out[key] = value
    return out


def preflight(data_uri: str, backbone: str) -> str:
    """Cheap checks before any step starts: a bad input fails in a second, with one line."""
    from tlops.data import listing, storage

    if backbone not in (*BACKBONES, "auto"):  # auto: the validate step picks among selection.candidates
        from tlops.vision import backbones  # torch: only for a checkpoint's own description or to name the choices

        backbones.get_info(backbone)
    if storage.is_s3(data_uri):
        objects = storage.list_s3(data_uri)
        if not objects:
            raise TlopsError(f"no objects found under {data_uri}: expected {data_uri}/<class>/<image>")
        return f"{len(objects)} objects"
    entries = listing.discover(Path(data_uri), data_uri)
    return f"{len(entries)} files"


def format_summary(s: dict[str, Any], seconds: float) -> str:
    if s.get("decision") == "skipped":
        return "\n".join([
            f"tlops run finished in {seconds:.0f}s: training skipped",
            f"  data checks    validation {s['validation']}; manifest {str(s['manifest_hash'])[:12]}; "
            f"feature drift {s.get('drift') or 'not measured'}",
            f"  why            {s['reasons'][0]}",
            f"  champion       {s['model_name']} version {s['champion_now'] or 'none'} (unchanged)",
            f"  mlflow         {s['tracking_uri']} (run {s['run_id']})",
            *_steps_line(s),
            f"  log            {s['log']}",
        ])
    m = s["metrics"]
    cand, champ, comp = m["candidate"], m.get("champion"), m.get("comparison")
    lines = [
        f"tlops run finished in {seconds:.0f}s",
        f"  data checks    validation {s['validation']}; manifest {str(s['manifest_hash'])[:12]}",
        f"  preprocessing  fingerprint {s['fingerprint']}; parity {s['parity']}",
        *([f"  backbone       {s['backbone_reason']}"] if s.get("backbone_reason") else []),
        *([f"  strategy       {s['strategy_reason']}"] if s.get("strategy_reason") else []),
        f"  metrics        test accuracy {cand['accuracy']:.4f}, macro-F1 {cand['macro_f1']:.4f} "
        f"({cand['n']} images)",
    ]
    if "min_class_recall" in cand:
        top = ", ".join(f"{k.replace('_', '-')} {v:.4f}" for k, v in cand.get("top_k", {}).items())
        lines.append(f"                 {top}; lowest class recall {cand['min_class_recall']:.4f} "
                     f"(class {cand.get('min_recall_class', '?')}); ECE {cand['ece']:.4f}")
    domains = s.get("domains") or m.get("domains")
    if domains:  # adaptation: the test accuracy above is the target's
        def figures(domain: str) -> str:
            whos = domains.get(domain) or {}
            return ", ".join(f"{who.replace('_', '-')} {rec['accuracy']:.4f}" for who, rec in whos.items())

        lines.append(f"  domains        target test: {figures('target')}")
        lines.append(f"                 source test: {figures('source')}")
    lat = cand.get("latency") or {}
    if lat.get("p95_ms") is not None:
        lines.append(f"  serving        latency p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms (batch size 1, "
                     f"CPU, {lat['n']} images); weights {cand['model_size_bytes'] / 1e6:.1f} MB")
    if champ:
        lines.append(f"  champion       version {champ['version']}: accuracy {champ['accuracy']:.4f} on the same "
                     f"images (McNemar p={m.get('mcnemar_p', 1.0):.3f})")
        if comp:
            lines.append(f"                 difference {comp['difference']:+.4f}, {comp['confidence']:.0%} paired "
                         f"bootstrap CI [{comp['ci_low']:+.4f}, {comp['ci_high']:+.4f}]")
    lines += [
        f"  model          {s['model_name']} version {s['model_version']}",
        f"  gate           {s['decision'].upper()}"
        + (f" (compared with champion version {s['compared_with']})" if s["compared_with"] else ""),
        *[f"                 - {r}" for r in s["reasons"]],
    ]
    if s.get("variant_reasons"):  # compressed variants (deploy.variants): the serving one, each verdict
        lines.append(f"  serving        variant {s.get('serving_variant') or 'none (the PyTorch model)'}")
        lines += [f"                 - {r}" for reasons in s["variant_reasons"].values() for r in reasons]
    if "champion_now" in s:
        lines.append(f"  aliases        champion version {s['champion_now'] or 'none'}, challenger version "
                     f"{s.get('challenger_now') or 'none'}")
    if m.get("report"):
        lines.append(f"  report         {m['report']}")
    lines += [
        f"  mlflow         {s['tracking_uri']} (run {s['run_id']})",
        *_steps_line(s),
        f"  log            {s['log']}",
    ]
    return "\n".join(lines)


def _steps_line(s: dict[str, Any]) -> list[str]:
    """Wall time per step, in the order they ran (start-up of each step's process or container included)."""
    steps = s.get("step_seconds") or {}
    return [f"  steps          {', '.join(f'{k} {v:.0f}s' for k, v in steps.items())}"] if steps else []


# Over 60 lines: a typer command's options are its signature (a third of its lines).
@app.command()
def run(
    data: Annotated[str | None, typer.Option(help="Data: a directory, a CSV manifest, or s3://bucket/prefix.")] = None,
    backbone: Annotated[str | None, typer.Option(
        metavar="[" + "|".join((*BACKBONES, "auto", "checkpoint:DIR")) + "]",
        help="Backbone: one of the catalogue, auto (chosen by the validate step among selection.candidates), "
        "or checkpoint:DIR for your own.", autocompletion=_choices((*BACKBONES, "auto", "checkpoint:")))] = None,
    strategy: Annotated[str | None, typer.Option(
        metavar="[" + "|".join(STRATEGIES) + "]", help="Fine-tuning strategy (train.strategy).",
        autocompletion=_choices(STRATEGIES))] = None,
    epochs: Annotated[int | None, typer.Option(
        help="Epochs (train.epochs; L-BFGS iterations for linear-probe).")] = None,
    min_accuracy: Annotated[float | None, typer.Option(
        help="The gate's accuracy floor (gate.min_accuracy), 0 to 1.")] = None,
    model_name: Annotated[str | None, typer.Option(help="Registered model name in MLflow.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    fail_on_reject: Annotated[bool, typer.Option(
        "--fail-on-reject", help="Exit 1 when the gate rejects the candidate (for CI); by default a finished "
        "run exits 0 whatever the gate decided.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stream every step's full log.")] = False,
    image: Annotated[str | None, typer.Option(
        help="Run the compiled pipeline with every step in its own container of this image (kfp's DockerRunner "
        "over $DOCKER_HOST, e.g. podman's socket), as a cluster does: data from s3:// and a tracking server "
        "only. Default: each step a subprocess here.")] = None,
    network: Annotated[str, typer.Option(help="With --image: the engine's network the steps join.")] = "host",
    add_host: Annotated[list[str] | None, typer.Option(
        "--add-host", help="With --image: NAME:ADDRESS the steps resolve, as a cluster's Service names "
        "(repeatable).")] = None,
    step_env: Annotated[list[str] | None, typer.Option(
        "--step-env", help="With --image: KEY=VALUE set in every step's container, over what is taken from this "
        "environment (the AWS_* and MLFLOW_* variables), e.g. MLFLOW_TRACKING_URI=http://tlops-mlflow:5000 "
        "(repeatable).")] = None,
) -> None:
    """Run the whole pipeline locally (kfp.local) and print a summary."""
    t0 = time.perf_counter()
    from pipelines.local import Containers, launched, run_local
    from tlops import tracking

    cfg = _config(config, set_, **{"data.uri": data, "backbone": backbone, "registry.model_name": model_name,
                                   "train.strategy": strategy, "train.epochs": epochs,
                                   "gate.min_accuracy": min_accuracy})
    _writable_dir(Path(cfg.workdir), "workdir")
    if image and not (tracking.env_uri_set() or cfg.tracking.uri):
        raise TlopsError("--image: steps in containers need a tracking server: set MLFLOW_TRACKING_URI to its "
                         "http:// URL")
    containers = None
    if image:
        containers = Containers(image=image, network=network, hosts=_pairs(add_host, ":", "--add-host", "NAME:ADDRESS"),
                                env=_pairs(step_env, "=", "--step-env", "KEY=VALUE"))
    # The step server starts first and imports what the steps need while this process checks the input, imports
    # kfp and builds the DAG (a bad input stops it at once).
    with launched(cfg, containers) as launch:
        found = preflight(cfg.data.uri, cfg.backbone)
        if not cfg.tracking.uri and not tracking.env_uri_set():
            # Freeze the embedded default so every step (a subprocess) uses the same store.
            cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
                update={"uri": tracking.resolve_tracking_uri(cfg)})})
        data_uri = cfg.data.uri if "://" in cfg.data.uri else str(Path(cfg.data.uri).resolve())
        typer.echo(f"tlops: {data_uri} ({found}), backbone {cfg.backbone}, model {cfg.registry.model_name}")
        summary = run_local(data_uri, cfg, verbose=verbose, containers=containers, launch=launch)
    typer.echo(format_summary(summary, time.perf_counter() - t0))
    global QUICK_EXIT
    QUICK_EXIT = True
    if fail_on_reject and summary.get("decision") == "reject":
        typer.echo(f"error: gate: {summary['model_name']} version {summary['model_version']} rejected "
                   "(--fail-on-reject)", err=True)
        raise typer.Exit(1)


@app.command()
def validate(
    data: Annotated[str | None, typer.Option(help="Data: a directory, a CSV manifest, or s3://bucket/prefix.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Where to write the manifest, report, Data Docs and quarantine list "
        "(default: <workdir>/validation).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")] = False,
) -> None:
    """Check a data set: one line per check; exit 0 when every error-level check passes, 1 when one fails,
    2 when the data cannot be used at all."""
    import logging
    import shutil

    from tlops import logs
    from tlops.data.validation import write_outputs
    from tlops.errors import GateFailed
    from tlops.selection.planner import validate_data

    cfg = _config(config, set_, **{"data.uri": data})
    # Libraries (GX) speak only for warnings; tlops progress lines with --verbose.
    logs.to_stderr("%(levelname)s %(name)s: %(message)s", name="", datefmt=None,
                   keep=lambda r: r.levelno >= logging.WARNING or (verbose and r.name.startswith("tlops")))
    out = output or Path(cfg.workdir) / "validation"
    _writable_dir(Path(cfg.workdir), "workdir")
    _writable_dir(out, "--output")
    shutil.rmtree(out / "data_docs", ignore_errors=True)  # the site of this run only, not an old one
    manifest, report = validate_data(cfg.data.uri, cfg, out / "data_docs")
    from tlops.selection.domain import validate_target

    target, report = validate_target(cfg, manifest, report)  # data.target_uri, target_labelled_uri: checked too
    paths = write_outputs(out, manifest, report)
    if not target.empty:
        from tlops.data.target import write_target_manifest

        write_target_manifest(target, out / "target_manifest.csv")
    for line in report.summary_lines():
        typer.echo(line)
    typer.echo(f"{len(manifest)} files; {len(report.quarantine)} quarantined"
               + (f", {len(report.excluded)} left out of training" if report.excluded else "")
               + f"; results in {out} (summary.md, report.html, data_docs/index.html, {paths['quarantine'].name})")
    if not report.success:
        failed = report.failures()
        raise GateFailed(f"data validation failed: {len(failed)} error-level check(s): "
                         + ", ".join(c.name for c in failed))


ImageOpt = Annotated[str | None, typer.Option(
    "--image", help="Image every step runs in (default: cluster.image, else $TLOPS_IMAGE, else tlops:0.1.0).")]
HostOpt = Annotated[str | None, typer.Option(
    "--host", help="Kubeflow Pipelines API URL (default: cluster.host, else $KF_PIPELINES_ENDPOINT).")]
ExperimentOpt = Annotated[str | None, typer.Option(
    "--experiment", help="KFP experiment (default: cluster.experiment).")]
DataOpt = Annotated[str | None, typer.Option("--data", help="Data the cluster reads: s3://bucket/prefix.")]


def _cluster_config(config: Path | None, overrides: list[str] | None, image: str | None = None,
                    data: str | None = None):  # noqa: ANN202
    """The config for a cluster compile: ``--image`` wins over ``cluster.image``."""
    cfg = _config(config, overrides, **{"data.uri": data})
    if image is None:
        return cfg
    if not image.strip() or any(ch.isspace() for ch in image):
        raise TlopsError(f"--image {image!r}: expected an image reference such as registry.example.com/tlops:0.1.0")
    return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"image": image})})


@app.command("compile")
def compile_(output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the IR YAML.")],
             image: ImageOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Write the pipeline as kfp v2 IR YAML, for a Kubeflow cluster (image, resources, secrets from cluster.*)."""
    if output.is_dir():
        raise TlopsError(f"--output {_shown(output)} is a directory: name the YAML file to write, e.g. "
                         f"{_shown(output / 'pipeline.yaml')}")
    if output.parent and not output.parent.exists():
        raise TlopsError(f"--output {_shown(output)}: directory {_shown(output.parent)} does not exist")
    if not output.parent.is_dir():
        raise TlopsError(f"--output {_shown(output)}: {_shown(output.parent)} is not a directory")
    from pipelines.transfer_learning import compile_config

    image_used = compile_config(_cluster_config(config, set_, image), str(output))
    typer.echo(f"wrote {output} (image {image_used})")


@app.command("submit")
def submit_cmd(
    host: HostOpt = None,
    experiment: ExperimentOpt = None,
    data: DataOpt = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="Run name (default: MODEL-UTCSTAMP).")] = None,
    image: ImageOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run every step, validate and parity "
                                           "included, instead of reusing cached results.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Compile the pipeline and start one run on a Kubeflow Pipelines cluster; prints the run id and its URL."""
    import tempfile

    from pipelines import cluster
    from pipelines.transfer_learning import compile_config

    cfg = _cluster_config(config, set_, image, data)
    url = cluster.resolve_host(host, cfg)
    cluster.check_cluster_data(cfg)
    with tempfile.TemporaryDirectory(prefix="tlops-submit-") as tmp:
        package = str(Path(tmp) / "pipeline.yaml")
        compile_config(cfg, package)
        run = cluster.submit(package, cfg, url, experiment=experiment, run_name=run_name, no_cache=no_cache)
    typer.echo(f"run {run.run_id} ({run.run_name}) started in experiment {run.experiment_id}")
    typer.echo(f"  {run.url}")


@app.command("schedule")
def schedule_cmd(
    host: HostOpt = None,
    cron: Annotated[str | None, typer.Option("--cron", help="When, as 6 cron fields with seconds first: "
                                             "'0 0 3 * * *' is 03:00 every day.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Recurring run name (default: MODEL-retrain).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the recurring runs.")] = False,
    disable: Annotated[str | None, typer.Option("--disable", help="Disable a recurring run, by name or id.",
                                                metavar="NAME_OR_ID")] = None,
    experiment: ExperimentOpt = None,
    data: DataOpt = None,
    image: ImageOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Create a recurring run (no catch-up, at most one at a time), or --list / --disable them."""
    import tempfile

    from pipelines import cluster
    from pipelines.transfer_learning import compile_config

    if (cron is not None) + list_ + (disable is not None) != 1:
        raise TlopsError("pass one of --cron EXPR (create a recurring run), --list, or --disable NAME_OR_ID")
    cfg = _cluster_config(config, set_, image, data)
    url = cluster.resolve_host(host, cfg)
    if list_:
        typer.echo(cluster.format_schedules(cluster.list_schedules(cfg, url)))
        return
    if disable is not None:
        gone = cluster.disable_schedule(cfg, url, disable)
        typer.echo(f"disabled recurring run {gone.recurring_run_id} ({gone.name})")
        return
    assert cron is not None
    cluster.check_cluster_data(cfg)
    cluster.check_cron(cron)
    with tempfile.TemporaryDirectory(prefix="tlops-schedule-") as tmp:
        package = str(Path(tmp) / "pipeline.yaml")
        compile_config(cfg, package)
        made = cluster.create_schedule(package, cfg, url, name or f"{cfg.registry.model_name}-retrain", cron,
                                       experiment=experiment)
    typer.echo(f"recurring run {made.recurring_run_id} ({made.name}): cron '{made.cron}', "
               "at most one run at a time, no catch-up")
    typer.echo(f"  {url}/#/recurringrun/details/{made.recurring_run_id}")


def _tracking(config: Path | None, overrides: list[str] | None, output_format: str = "table") -> Any:
    """Point MLflow at the run's store for the registry commands, after checking their --format; the config."""
    from tlops import tracking

    if output_format not in ("table", "json"):
        raise TlopsError(f"--format {output_format!r}: choose table or json")

    cfg = _config(config, overrides)
    uri = tracking.resolve_tracking_uri(cfg)
    # The store must exist and be an MLflow store: MLflow would otherwise make an empty one (and its folder)
    # wherever the URI points, even for a command that only reads.
    tracking.check_store(uri)
    tracking.quiet_store_logs()
    import mlflow

    tracking.apply_retry_policy(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return cfg


@app.command("parity")
def parity_cmd(
    model: Annotated[str, typer.Option("--model", help="models:/NAME/VERSION or models:/NAME@ALIAS")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output_format: FormatOpt = "table",
) -> None:
    """Re-run the preprocessing parity checks on a logged model. Exit 0 pass, 1 fail."""
    from tlops.audit import parity_for_version
    from tlops.registry.uri import parse_model_uri

    _tracking(config, set_, output_format)
    name, version = parse_model_uri(model)
    result = parity_for_version(name, version)
    if output_format == "json":
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"model {name} version {version} ({result['backbone']}): parity {result['status'].upper()}")
        typer.echo(f"  fingerprint {result['fingerprint']}")
        typer.echo(f"  reference   {result['reference_fingerprint']}  declared: {result['declared']}")
        worst = max(result["golden"], key=lambda g: g["max_abs_diff"])
        typer.echo(f"  golden images: {len(result['golden'])}, worst difference {worst['max_abs_diff']:.2e} "
                   f"({worst['image']})")
        typer.echo(f"  serving path: {result['serving']['status']}")
        if result.get("serving_variant"):
            typer.echo(f"  serving variant {result['serving_variant']['name']}: {result['serving_variant']['status']}")
        for err in result["errors"]:
            typer.echo(f"  FAIL {err}")
    if result["status"] != "pass":
        raise typer.Exit(1)


@app.command("audit")
def audit_cmd(
    model: Annotated[str, typer.Option("--model", help="Registered model name.")],
    output_format: FormatOpt = "table",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """List every version's preprocessing evidence; exit 1 when an alias points at an inconsistent one."""
    from tlops.audit import audit_model, format_audit

    _tracking(config, set_, output_format)
    rows = audit_model(model)
    typer.echo(format_audit(model, rows, output_format))
    bad_aliases = [f"{a} -> version {r.version}" for r in rows if not r.consistent for a in r.aliases]
    if bad_aliases:
        typer.echo(f"error: alias points at an inconsistent version: {', '.join(bad_aliases)}", err=True)
        raise typer.Exit(1)


NameArg = Annotated[str, typer.Argument(help="Registered model name.")]


@app.command("promote")
def promote_cmd(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="The version to make the champion.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why; recorded in the history.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Promote even a version whose gate did not pass or whose "
                                        "comparison is stale (needs --reason).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Make VERSION the champion: a person's approval of a version the gate left as challenger (manual mode).
    Exit 0 done, 1 the version's gate did not pass, 2 unknown model or version."""
    from tlops import registry

    if force and not reason.strip():
        raise TlopsError("--force needs --reason: say why this version is promoted despite its gate")
    _tracking(config, set_)
    event = registry.promote(name, version, reason=reason, force=force)
    if event is None:
        typer.echo(f"model {name} version {version} is already the champion; nothing changed")
        return
    typer.echo(f"champion of {name}: version {event.from_version or 'none'} -> version {event.to_version} "
               f"({event.action} by {event.who} at {event.at}; history #{event.seq})")


@app.command("rollback")
def rollback_cmd(
    name: NameArg,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why; recorded in the history.")] = "",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Move the champion back to the previous champion (from the promotion history)."""
    from tlops import registry

    _tracking(config, set_)
    event = registry.rollback(name, reason=reason)
    typer.echo(f"champion of {name}: version {event.from_version} -> version {event.to_version} "
               f"(rollback by {event.who} at {event.at}; history #{event.seq})")


@app.command("history")
def history_cmd(
    name: NameArg,
    output_format: FormatOpt = "table",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the promotion history: who moved the champion, when (UTC), from which version to which, why."""
    from tlops import registry

    _tracking(config, set_, output_format)
    typer.echo(registry.format_history(name, registry.history(name), output_format))


@app.command("serve")
def serve_cmd(
    model: Annotated[str, typer.Option("--model", help="models:/NAME@ALIAS (e.g. @champion) or models:/NAME/VERSION, "
                                       "or the local directory of a downloaded ONNX variant (no MLflow, no torch)")],
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port to listen on.")] = 8080,
    host: Annotated[str, typer.Option("--host", help="Address to bind; loopback unless you mean otherwise.")] = (
        "127.0.0.1"),
    max_bytes: Annotated[int, typer.Option("--max-bytes", help="Largest request body, in bytes (413 above).")] = (
        16 * 1024 * 1024),
    max_instances: Annotated[int, typer.Option("--max-instances", help="Most images in one request.")] = 64,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads (0: every core); at most the "
                                         "CPUs the server may use.")] = 1,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most images of concurrent requests in one forward "
                                           "pass (1: no batching).")] = 32,
    batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", help="How long a batch waits for requests "
                                                   "already on their way, in ms (never when none is).")] = 5.0,
    batch_workers: Annotated[int | None, typer.Option(
        "--batch-workers", help="Forward passes at once, each on --threads threads. Default: 2 with batching, 1 "
        "without (--max-batch 1: one request at a time).")] = None,
    poll_s: Annotated[float, typer.Option("--poll-s", help="With models:/NAME@ALIAS: seconds between looks at the "
                                          "alias; a new version is loaded, then swapped in (0: pinned).")] = 10.0,
    pytorch: Annotated[bool, typer.Option("--pytorch", help="Serve the version's PyTorch model even when it has an "
                                          "ONNX serving variant (which is served without torch by default).")] = False,
    sample_rate: Annotated[float | None, typer.Option("--sample-rate", help="Share of served images written to "
                                                      "the prediction log (0: none). Default: "
                                                      "monitoring.sample_rate.")] = None,
    log_uri: Annotated[str | None, typer.Option("--log-uri", help="Prediction log: a directory or s3:// prefix. "
                                                "Default: monitoring.log_uri, else <workdir>/prediction-log.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve a registered model over MLflow's scoring protocol (POST /invocations) until SIGTERM or Ctrl-C;
    metrics at GET /metrics, a sample of the predictions to the prediction log."""
    from tlops.serving.server import ServeLimits, serve

    # With the retry policy: a tracking server that is down is a bounded wait, one line. A variant's downloaded
    # directory involves no tracking server.
    from_store = model.startswith("models:/") or not Path(model).is_dir()
    cfg = _tracking(config, set_) if from_store else _config(config, set_)
    mon = cfg.monitoring
    rate = mon.sample_rate if sample_rate is None else sample_rate
    where = log_uri or mon.log_uri or str(Path(cfg.workdir) / "prediction-log")
    serve(model, host, port, ServeLimits(max_bytes=max_bytes, max_instances=max_instances), threads=threads,
          max_batch=max_batch, batch_window_ms=batch_window_ms, poll_s=poll_s, variant=not pytorch,
          sample_rate=rate, log_uri=where, log_images=mon.log_images, batch_workers=batch_workers)


@app.command("monitor")
def monitor_cmd(
    model: Annotated[str, typer.Option("--model", help="NAME@champion (or NAME/VERSION, or models:/…): the version "
                                       "whose served traffic is checked.")],
    since: Annotated[str | None, typer.Option("--since", help="Window start: ISO 8601 (UTC unless it says) or a "
                                              "duration before now (24h, 7d). Default: the log's start.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Window end (excluded), as --since. Default: "
                                              "now.")] = None,
    log_uri: Annotated[str | None, typer.Option("--log-uri", help="The prediction log. Default: monitoring.log_uri, "
                                                "else <workdir>/prediction-log.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Directory for report.html and "
                                                "monitor.json. Default: <workdir>/monitor/NAME-vVERSION-TIME.")] = None,
    export_queue: Annotated[int | None, typer.Option("--export-queue", help="Instead of the report: the N served "
                                                     "images most worth labelling (uncertain, novel, spread over "
                                                     "classes) as a Label Studio import and a CSV template; needs "
                                                     "monitoring.log_images.")] = None,
    output_format: FormatOpt = "table",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Compare a window of served traffic with the model's training data: drift, out-of-distribution rate and a
    label-free accuracy estimate. Exit 0 quiet, 1 drift or an estimate below the gate's floor."""
    from tlops.monitoring.report import export_queue as export
    from tlops.monitoring.report import run_monitor

    cfg = _tracking(config, set_, output_format)
    if export_queue is not None:
        where, count = export(cfg, model, since, until, log_uri, str(output) if output else None, export_queue)
        typer.echo(f"labelling queue: {count} images in {where} (labelstudio.json to import, manifest.csv to fill)")
        return
    result, table = run_monitor(cfg, model, since, until, log_uri, str(output) if output else None)
    typer.echo(json.dumps(result, indent=2, default=float) if output_format == "json" else table)
    if output_format == "table":
        typer.echo(f"report: {result['report']}; MLflow run {result['mlflow_run_id']}")
    if result["verdict"] != "quiet":
        raise typer.Exit(1)


@app.command("select")
def select_cmd(
    data: Annotated[str | None, typer.Option(help="Data: a directory, a CSV manifest, or s3://bucket/prefix.")] = None,
    candidates: Annotated[str | None, typer.Option(
        help="Comma-separated backbones among " + ", ".join(BACKBONES) + " and checkpoint:DIR, e.g. "
        "efficientnet_lite0,resnet18 (NAME:random and NAME:shuffled are controls). Default: selection.candidates.",
        autocompletion=_choices(BACKBONES))] = None,
    sample: Annotated[int | None, typer.Option(help="Images of the train split, stratified by class.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output_format: FormatOpt = "table",
) -> None:
    """Rank candidate backbones on a sample of the data: LogME, cross-validated linear probe, speed, size."""
    from tlops.selection.ranking import select

    cfg = _config(config, set_, **{"data.uri": data})
    names = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
    typer.echo(select(cfg, cfg.data.uri, names, sample, output_format))


@app.command("labels-curve")
def labels_curve_cmd(
    data: Annotated[str | None, typer.Option(help="Data: a directory, a CSV manifest, or s3://bucket/prefix.")] = None,
    fractions: Annotated[str | None, typer.Option(
        help="Shares of the training labels, e.g. 0.01,0.1,1 or 1%,10%,100%. Default: 1,2,5,10,25,50,100%.")] = None,
    seeds: Annotated[int, typer.Option(help="Subsets drawn per share; the interval is over them.")] = 5,
    plot: Annotated[Path | None, typer.Option(help="Where to write the plot (PNG). Default: "
                                              "<workdir>/labels_curve/labels_curve.png")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output_format: FormatOpt = "table",
) -> None:
    """How many labels do I need? The linear probe on 1-100% of the training labels, from the feature cache."""
    from tlops.fileio import write_json
    from tlops.training import labels_curve as lc

    if output_format not in ("table", "json"):
        raise TlopsError(f"--format {output_format!r}: choose table or json")
    cfg = _config(config, set_, **{"data.uri": data})
    points = lc.labels_curve(cfg, cfg.data.uri, lc.parse_fractions(fractions), seeds)
    out = plot or Path(cfg.workdir) / "labels_curve" / "labels_curve.png"
    lc.plot(points, out, f"{cfg.backbone} linear probe on {Path(cfg.data.uri).name}")
    write_json(out.with_suffix(".json"), lc.table_frame(points).to_dict("records"))
    typer.echo(lc.format_table(points, output_format))
    if output_format == "table":
        typer.echo(f"plot: {out}; table: {out.with_suffix('.json')}")


data_app = typer.Typer(no_args_is_help=True, help="Data store operations.")
app.add_typer(data_app, name="data")


@data_app.command("merge")
def data_merge_cmd(
    labels: Annotated[Path, typer.Option("--labels", help="The labelled queue: its manifest.csv with the label "
                                         "column filled, or Label Studio's JSON export of its tasks.")],
    into: Annotated[Path, typer.Option("--into", help="The CSV manifest (path,label[,split]) of the data to add "
                                       "the images to; made when absent.")],
    queue: Annotated[Path | None, typer.Option("--queue", help="The queue directory tlops monitor --export-queue "
                                               "wrote. Default: the directory of --labels.")] = None,
) -> None:
    """Add labelled served images to the data, with provenance columns; the next run validates them."""
    from tlops.monitoring.merge import merge

    counts = merge(labels, into, queue)
    typer.echo(f"{into}: {counts['added']} images added, {counts['present']} already there, "
               f"{counts['unlabelled']} left unlabelled")


@app.command("demo-data")
def demo_data(directory: Annotated[Path, typer.Argument(help="Where to write the ImageFolder.")],
              fonts: Annotated[int, typer.Option(
                  help="Instead: this many digits per class rendered from the machine's fonts, in the scans' 8x8 "
                  "look (a target domain for train.strategy adabn, self-training, mcc).", min=0)] = 0,
              seed: Annotated[int, typer.Option(help="With --fonts: the rendering's seed.")] = 0) -> None:
    """Export scikit-learn's real digits set as an ImageFolder of PNG files (or, with --fonts, digits rendered from
    the machine's fonts)."""
    if fonts:
        from tlops.data.fontdigits import export_font_digits

        n = export_font_digits(directory, per_class=fonts, seed=seed)
        typer.echo(f"{directory}: {n} font-rendered digit images in 10 class folders")
        return
    from tlops.data.discovery import export_digits

    n = export_digits(directory)
    typer.echo(f"{directory}: {n} digit images in 10 class folders")


def entry() -> None:
    """The ``tlops`` command and ``python -m tlops``: :func:`main`, then the quick exit a command asked for
    (``QUICK_EXIT``) when it succeeded."""
    code: int | str | None
    try:
        code = main()
    except SystemExit as exc:  # typer's standalone mode ends a command this way
        code = exc.code
    if QUICK_EXIT and code in (0, None):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        # Typer's standalone mode handles usage errors (exit 2) and --help, and exits by SystemExit.
        app(args=argv)
    except TlopsError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except Exception as exc:
        from tlops.tracking import store_error, unreachable_error

        # A tracking server that stopped answering, or a store that cannot serve (read-only, locked, corrupt),
        # is no bug of ours; nor is a file system that refuses a read or a write.
        user_error = unreachable_error(exc) or store_error(exc)
        if user_error is None and isinstance(exc, OSError):
            where = f"{_shown(exc.filename)}: " if exc.filename is not None else ""
            user_error = TlopsError(f"{where}{exc.strerror or exc}")
        if user_error is None:
            raise
        typer.echo(f"error: {user_error}", err=True)
        return user_error.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
