"""MLflow set-up: where runs and the registry live (embedded SQLite by default), and run helpers."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlops.config.settings import Config
from tlops.errors import TlopsError

ENV_URI = "MLFLOW_TRACKING_URI"
RETRY_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
# What MLflow's REST client says once its retries are spent, or when the connection cannot even be made.
_UNREACHABLE = re.compile(r"API request to .* failed with exception|Max retries exceeded|Connection refused|"
                          r"Failed to establish a new connection|Read timed out|RemoteDisconnected")


def env_uri_set() -> bool:
    return bool(os.environ.get(ENV_URI))


def resolve_tracking_uri(cfg: Config) -> str:
    """config > MLFLOW_TRACKING_URI > ``sqlite:///<workdir>/mlflow.db`` (the embedded default)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get(ENV_URI):
        return os.environ[ENV_URI]
    return f"sqlite:///{(Path(cfg.workdir) / 'mlflow.db').resolve()}"


def redact(uri: str) -> str:
    """A URI fit for logs: any password replaced."""
    return re.sub(r"(//[^:/@]+):[^@/]+@", r"\1:***@", uri)


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the store is a server (``http(s)://``), without credentials."""
    if not uri.startswith(("http://", "https://")):
        return None
    bare = re.sub(r"//[^/@]+@", "//", uri).rstrip("/")
    return f"{bare}/#/experiments/{experiment_id}/runs/{run_id}"


PROXY_MULTIPART_ENV = ("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD")


def apply_retry_policy(cfg: Config) -> None:
    """Retries, back-off and timeout for every request to a tracking server (the environment wins)."""
    values = (cfg.tracking.retries, cfg.tracking.backoff_factor, cfg.tracking.timeout_s)
    for name, value in zip(RETRY_ENV, values, strict=True):
        os.environ.setdefault(name, str(value))
    # Artifacts go through the tracking server, never around it: with these unset, an MLflow 3.17 client asks the
    # server and then moves artifacts through presigned S3 URLs naming the object store as the server sees it
    # (an in-cluster host), which a client behind a port-forward cannot reach.
    for name in PROXY_MULTIPART_ENV:
        os.environ.setdefault(name, "false")


def unreachable_error(exc: BaseException) -> TlopsError | None:
    """A one-line error when ``exc`` means the tracking server stopped answering; None for anything else."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from_client = isinstance(exc, MlflowException) or type(exc).__module__.split(".")[0] in ("requests", "urllib3")
    if not from_client or not _UNREACHABLE.search(f"{type(exc).__name__}: {exc}"):
        return None

    uri = redact(mlflow.get_tracking_uri())
    retries = os.environ.get(RETRY_ENV[0], "?")
    return TlopsError(f"the MLflow tracking server at {uri} did not answer after {retries} retries with back-off; "
                      "start it (or point MLFLOW_TRACKING_URI at a running one) and run again: checkpoints and "
                      "cached features already written are kept and the rerun resumes from them")


# What SQLite (through SQLAlchemy and MLflow) says when the store itself is the problem, and what that means.
_STORE_FAULTS = (
    ("attempt to write a readonly database", "is read-only for this user (attempt to write a readonly database): "
     "the file and its folder must be writable to promote, roll back or register"),
    ("database is locked", "is locked by another process (database is locked); try again when it has finished"),
    ("file is not a database", "is not an SQLite database (file is not a database): point tracking.uri at an "
     "MLflow store"),
    ("database disk image is malformed", "is corrupt (database disk image is malformed): restore it from a copy"),
    ("unable to open database file", "cannot be opened (unable to open database file): check that its folder "
     "exists and is readable"),
    ("database or disk is full", "has no room left (database or disk is full): free space there"),
    ("disk I/O error", "could not be read or written (disk I/O error)"),
    ("no such table", "is not an MLflow store (no such table): point tracking.uri at an MLflow store"),
)
SQLITE_HEADER = b"SQLite format 3\x00"


def store_error(exc: BaseException, uri: str | None = None) -> TlopsError | None:
    """A one-line error naming the store when ``exc`` means the tracking store itself cannot serve the
    request (read-only, locked, corrupt, full); None for anything else."""
    if type(exc).__module__.split(".")[0] not in ("mlflow", "sqlalchemy", "sqlite3"):
        return None
    text = f"{exc}"
    for needle, meaning in _STORE_FAULTS:
        if needle in text:
            if uri is None:
                import mlflow

                uri = mlflow.get_tracking_uri()
            return TlopsError(f"the MLflow store {redact(uri)} {meaning}")
    return None


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_store(uri: str) -> None:
    """Before a command that reads an existing store: it is there, and it is an MLflow store. Nothing is
    created: MLflow would make an empty store (and its folder) wherever the URI points."""
    import sqlite3

    local = sqlite_path(uri)
    if local is None and uri.startswith("file:"):
        local = Path(uri[len("file://") :] if uri.startswith("file://") else uri[len("file:") :])
    elif local is None and "://" not in uri:
        local = Path(uri)
    if local is None:
        return  # a server: the retry policy bounds the wait, unreachable_error says so
    shown = redact(uri)
    if not local.exists():
        raise TlopsError(f"no MLflow store at {shown}: run 'tlops run' first, or set MLFLOW_TRACKING_URI")
    if not uri.startswith("sqlite:"):
        return
    if not local.is_file():
        raise TlopsError(f"the MLflow store {shown} is not a file ({'a folder' if local.is_dir() else 'special'})")
    try:
        with open(local, "rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise TlopsError(f"the MLflow store {shown} cannot be read: {exc.strerror or exc}") from None
    if head != SQLITE_HEADER:
        raise TlopsError(f"the MLflow store {shown} is not an SQLite database"
                         + (" (an empty file)" if not head else "") + ": point tracking.uri at an MLflow store")
    try:
        con = sqlite3.connect(f"{local.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            found = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='registered_models'"
                                ).fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise (store_error(exc, uri) or TlopsError(f"the MLflow store {shown} cannot be read: {exc}")) from None
    if found is None:
        raise TlopsError(f"the MLflow store {shown} is an SQLite database but not an MLflow store (it has no "
                         "registered_models table): point tracking.uri at an MLflow store")


def quiet_store_logs() -> None:
    """MLflow logs every failed SQL statement with its traceback at ERROR before raising it; the caller
    turns the exception into one line (``store_error``), so the log would only repeat it."""
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def setup(cfg: Config) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

    apply_retry_policy(cfg)
    uri = resolve_tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        # Keep the embedded default's artifacts beside its database, not in ./mlruns.
        location = (Path(cfg.workdir) / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:
        # Another process created it first.
        exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


# --------------------------------------------------------------------------------- what a person sees

# MLflow 3 shows an experiment by its kind; without the tag the UI has to guess (and may offer GenAI views).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# Settings that say how this process runs, not what it trains: they stay in the config artifact
# (config/config.json), out of the run's params.
_TRAIN_OPERATIONAL = frozenset({
    "num_threads", "device", "feature_cache", "input_cache_mb", "num_workers", "processes", "accelerator",
    "checkpoint_dir", "checkpoint_every_steps", "resume", "stop_after_steps", "epochs_unset", "compile",
    "channels_last", "deterministic",
})
_GATE_PARAMS = ("mode", "min_accuracy", "min_class_recall", "max_regression", "min_improvement",
                "max_latency_p95_ms", "max_model_size_mb")


def run_params(cfg: Config) -> dict[str, str]:
    """The params a person scans on the run page: what was trained on what, with which preprocessing and
    training settings, under which gate. Unset values are left out; everything else (validation limits,
    evaluation, selection, tracking, cluster) is in the run's ``config/config.json``."""
    dumped = cfg.model_dump(mode="json")
    params = {"backbone": str(dumped["backbone"]), "model_name": str(dumped["registry"]["model_name"])}
    data = dumped["data"]
    params.update({f"data.{k}": str(data[k]) for k in ("uri", "val_fraction", "test_fraction")})
    params.update({f"data.{k}": str(data[k]) for k in ("target_uri", "target_labelled_uri") if data.get(k)})
    params.update(flatten({k: v for k, v in dumped["preprocess"].items() if v is not None}, "preprocess."))
    train = {k: v for k, v in dumped["train"].items() if k not in _TRAIN_OPERATIONAL and v is not None}
    strategy = cfg.train.strategy
    if not cfg.train.is_adaptation:
        train.pop("adaptation", None)
    if strategy == "linear-probe":  # L-BFGS on cached features: the gradient settings do not apply
        train = {k: v for k, v in train.items() if k in ("strategy", "epochs", "l2_grid", "batch_size", "seed")}
    else:
        train.pop("l2_grid", None)
        if strategy != "partial":
            train.pop("frozen_stages", None)
        if strategy != "gradual":
            train = {k: v for k, v in train.items() if not k.startswith("gradual_")}
        if not cfg.train.augment.random_resized_crop:
            train["augment"] = {k: v for k, v in train["augment"].items() if k not in ("crop_scale", "crop_ratio")}
    params.update(flatten(train, "train."))
    params.update({f"gate.{k}": str(dumped["gate"][k]) for k in _GATE_PARAMS if dumped["gate"][k] is not None})
    return params


def data_name(uri: str) -> str:
    """A short name for a data URI: its last path part (``s3://bucket/sets/digits/`` is ``digits``)."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1] or uri
    return tail.removesuffix(".csv") or tail


def run_name(cfg: Config, data_uri: str, manifest_hash: str) -> str:
    """``efficientnet_lite0 linear-probe on digits@34605d7b6ec3``: model, strategy, data (and which data)."""
    return f"{cfg.backbone} {cfg.train.strategy} on {data_name(data_uri)}@{manifest_hash[:12]}"


def log_datasets(rows: Any, data_uri: str, manifest_hash: str) -> None:
    """MLflow dataset tracking: one dataset per split (context train, val or test), its source the data URI and
    its digest the manifest's content hash (what the summary prints), so the run's Datasets panel says what
    trained and tested the model. Only the rows' identity is described (uri, sha256, label, split); no pixels
    are stored."""
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    name = data_name(data_uri)
    columns = [c for c in ("uri", "sha256", "label", "split") if c in rows]
    for split in ("train", "val", "test"):
        part = rows.loc[rows["split"] == split, columns].reset_index(drop=True)
        if part.empty:
            continue
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all local artifacts
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(part, source=data_uri, targets="label", name=f"{name}-{split}",
                                  digest=manifest_hash[:12])
        mlflow.log_input(dataset, context=split)


def load_pyfunc(model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model(model_uri)``, without MLflow's load-time environment check where it has nothing to
    say: that check first maps every installed distribution to its modules (``packages_distributions``: about 1 s
    of CPU, once per process) to compare the model's requirements with this environment. When the model's Python is
    this one and each requirement pins (``==``) a distribution installed at that version (a model tlops logged in
    this environment: the pipeline's candidate, a champion from the same image), the check would warn about nothing
    and is skipped; any other model is loaded with it, its warnings as MLflow gives them."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)  # what load_model does first
    return mlflow.pyfunc.load_model(local, suppress_warnings=environment_matches(local))


def environment_matches(model_dir: str | Path) -> bool:
    """Whether MLflow's load-time checks of the model in ``model_dir`` (its ``MLmodel`` and ``requirements.txt``)
    against this environment would find nothing: the same Python version, and every requirement an exact pin of
    an installed distribution's version (a local label such as torch's ``+cpu`` aside, as MLflow compares them).
    False for anything else (no file, a range, an extra, a marker, a path): MLflow's own check then runs."""
    import platform

    import yaml

    root = Path(model_dir)
    try:
        meta = yaml.safe_load((root / "MLmodel").read_text(encoding="utf-8"))
        lines = (root / "requirements.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, yaml.YAMLError):
        return False
    python = ((meta or {}).get("flavors") or {}).get("python_function", {}).get("python_version")
    return python == platform.python_version() and pins_installed(lines)


def pins_installed(requirements: list[str]) -> bool:
    """Whether every requirement (blank lines and comments aside) is an exact pin (``==``) of the version of an
    installed distribution: what MLflow's requirement checks would then find is nothing. False for a range, an
    extra, a marker, a path or URL, a distribution not installed or at another version. One metadata lookup per
    requirement, against MLflow's map of every installed distribution (about 1 s to build, once a process)."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    for line in (x.strip() for x in requirements):
        if not line or line.startswith("#"):
            continue
        try:
            req = Requirement(line)
            pins = list(req.specifier)
            if req.extras or req.marker or req.url or len(pins) != 1 or pins[0].operator != "==":
                return False
            if not req.specifier.contains(metadata.version(req.name), prereleases=True):
                return False
        except (InvalidRequirement, metadata.PackageNotFoundError, ValueError):
            return False
    return True


# Where MLflow calls its requirement check while a model is logged: on the requirements it writes
# (``environment._process_pip_requirements``) and, with an input example, on loading the model back to try that
# example (``pyfunc.load_model``). Module attributes of MLflow 3 (the version the lock file pins); a test fails when
# they move.
_REQUIREMENT_CHECKS = (("mlflow.utils.environment", "warn_dependency_requirement_mismatches"),
                       ("mlflow.pyfunc", "warn_dependency_requirement_mismatches"))


@contextlib.contextmanager
def pinned_requirements_checked() -> Iterator[None]:
    """While a model is logged: MLflow's check of its requirements against this environment runs only where it could
    warn, i.e. unless every requirement pins an installed version (``pins_installed``, which is what tlops writes:
    ``pyfunc_requirements``). The check is otherwise unchanged, its warnings as MLflow gives them; what it saves is
    its map of every installed distribution's modules (``packages_distributions``, about 1.7 s of CPU in a step).
    Not thread-safe: it swaps module attributes for the duration of the block."""
    import importlib

    swapped: list[tuple[Any, str, Any]] = []
    for module_name, attribute in _REQUIREMENT_CHECKS:
        module = importlib.import_module(module_name)
        original = getattr(module, attribute, None)
        if original is None:  # another MLflow: its check runs as it is
            continue

        def check(requirements: list[str], _original: Any = original) -> None:
            if not pins_installed(list(requirements)):
                _original(requirements)

        swapped.append((module, attribute, original))
        setattr(module, attribute, check)
    try:
        yield
    finally:
        for module, attribute, original in swapped:
            setattr(module, attribute, original)


def _mark_running(run_id: str) -> None:
    import mlflow

    mlflow.MlflowClient().update_run(run_id, status="RUNNING")


@contextlib.contextmanager
def system_metrics(run_id: str, interval_s: float = 5.0) -> Iterator[None]:
    """CPU, memory, disk and network (and GPU utilisation and memory where there is one) of this machine into the
    run as ``system/…`` metrics while the block runs, through MLflow's system metrics monitor (psutil,
    nvidia-ml-py). Best effort: a tracking server that does not answer costs a warning, never the work inside."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    log = logging.getLogger("tlops")
    monitor = None
    try:
        _mark_running(run_id)  # the monitor stops as soon as it sees a run that is not running
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True)
        monitor.start()
    except Exception as exc:
        log.warning("system metrics are not recorded for this step (%s)", str(exc).splitlines()[0][:200])
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()
            try:
                # What was sampled since the last logged point (the monitor drops it on finish): a block shorter
                # than one interval still leaves a sample.
                last = monitor.aggregate_metrics()
                if last:
                    monitor.publish_metrics(last)
                    monitor.mlflow_logger.flush()
            except Exception as exc:
                log.warning("system metrics: the last sample was not recorded (%s)",
                            str(exc).splitlines()[0][:200])


def main(argv: list[str]) -> int:
    """``python -m tlops.tracking setup < CONFIG_JSON``: make the store and the run's experiment, as a step's
    ``setup`` does. ``tlops run`` has a new SQLite store made this way while its step server imports, so that the
    first step does not spend seconds creating the tables."""
    import sys

    if argv != ["setup"]:
        sys.stderr.write("usage: python -m tlops.tracking setup < CONFIG_JSON\n")
        return 2
    setup(Config.from_json(sys.stdin.read()))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
