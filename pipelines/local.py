"""Run the pipeline on this machine with kfp.local: each step a subprocess of this Python, or (``Containers``) the
compiled pipeline with each step in its own container of the project image, as a cluster runs it."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipelines import stepserver
from pipelines.view import LiveView, PlainView, make_view, parse_event
from tlops import progress
from tlops.config.settings import Config
from tlops.errors import GateFailed, TlopsError
from tlops.steps import ERROR_FILE_ENV

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Lines worth a person's attention while the full log goes to a file.
ECHO = re.compile(r"Executing task|finished with status|^\s*\[tlops\] ")
KFP_LINE = re.compile(r"Executing task|finished with status")


STEP_EVENT = re.compile(r"(Executing task|Task) '([\w-]+)'")


class _Tee:
    """Everything to the log file; to the view (a live display on a terminal, else plain lines) the lines worth a
    person's attention and the steps' progress events; each step's wall time."""

    def __init__(self, log: TextIO, view: PlainView | LiveView, verbose: bool) -> None:
        self.log, self.view, self.verbose, self.buf = log, view, verbose, ""
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.current = "pipeline"

    def _timing(self, plain: str) -> None:
        import time

        event = STEP_EVENT.search(plain)
        if event is None:
            return
        kind, name = event.groups()
        if kind == "Executing task":
            self.started[name] = time.perf_counter()
            self.current = name
            self.view.step_started(name)
        elif name in self.started and "finished with status" in plain:
            self.seconds[name] = round(time.perf_counter() - self.started.pop(name), 1)
            self.view.step_finished(name, self.seconds[name], "SUCCESS" in plain)

    def write(self, text: str) -> int:
        self.log.write(text)
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            plain = ANSI.sub("", line)
            event = parse_event(plain)
            if event is not None:
                self.view.event(self.current, event)
                continue
            self._timing(plain)
            if KFP_LINE.search(plain) and not self.view.kfp_lines:
                continue  # the view says when a step starts and ends in its own way
            if self.verbose or ECHO.search(plain):
                self.view.line(plain.strip())
        return len(text)

    def flush(self) -> None:
        self.log.flush()


# What a step container is given from this environment (credentials by value, never in the compiled YAML):
# the object store, the tracking server, and tlops' own run-time settings.
PASSED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
              "MLFLOW_HTTP_REQUEST_TIMEOUT", "TLOPS_S3_MAX_ATTEMPTS", "TLOPS_S3_CONNECT_TIMEOUT",
              "TLOPS_S3_READ_TIMEOUT", progress.ENV)
CONTAINER_WORKDIR = "/home/tlops/.tlops"  # each step's own work directory, a tmpfs gone with its container
CONTAINER_USER = "10001:10001"  # the image's unprivileged user


@dataclass(frozen=True)
class Containers:
    """Run the compiled pipeline with every step in its own container of ``image`` (kfp's DockerRunner, through
    Docker or podman's Docker-compatible socket at ``$DOCKER_HOST``): a read-only root file system, the work
    directory in a tmpfs of the container's own, the store endpoints and credentials from this environment."""

    image: str
    network: str = "host"  # a network of the engine where the stores are reachable, or the host's
    env: dict[str, str] = field(default_factory=dict)  # more variables, over PASSED_ENV's
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address, as a cluster's Service names resolve
    cpus: float | None = None


def _engine(image: str) -> Any:
    """The container engine's client, once the image is known to be there (kfp would otherwise try a pull)."""
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError:
        raise TlopsError("running steps in containers needs the docker package (pip install docker)") from None
    where = os.environ.get("DOCKER_HOST", "the default socket")
    try:
        client = docker.from_env()
        client.ping()
    except DockerException:
        raise TlopsError(f"cannot reach a container engine at {where}: start one (podman system service, or "
                         "Docker) and set DOCKER_HOST to its socket") from None
    try:
        client.images.get(image)
    except ImageNotFound:
        raise TlopsError(f"--image {image}: no such image in the container engine at {where}; build it "
                         "(make image) or name a local one exactly as `podman images` lists it, for example "
                         "localhost/tlops:0.1.0") from None
    return client


def _compiled(cfg: Config, containers: Containers, path: Path) -> Any:
    """The pipeline as a cluster gets it (the IR YAML), with the image set and nothing kfp.local would act on
    differently: no retries (kfp.local would re-run a step that failed on bad input), no env in the YAML (the
    runner's environment would be replaced by it), no Secrets or placement (cluster-only)."""
    from kfp import components

    from pipelines.transfer_learning import compile_pipeline

    cluster = cfg.cluster.model_copy(update={
        "image": containers.image, "env": {}, "secrets": [], "node_selector": {}, "tolerations": [],
        "steps": {name: step.model_copy(update={"retries": 0, "node_selector": {}, "tolerations": []})
                  for name, step in cfg.cluster.steps.items()}})
    compile_pipeline(str(path), None, cluster)
    return components.load_component_from_file(str(path))


def _owned_by_user(engine: Any) -> str:
    """tmpfs options that make the work directory the step user's own. Trap: a tmpfs mounted over a directory of
    the image takes that directory's owner and mode (root, 0750 here) whatever ``mode=`` says; podman chowns it
    to the container's user with ``U``, Docker takes ``uid=``/``gid=``."""
    components = engine.version().get("Components") or []
    if any("podman" in str(c.get("Name", "")).lower() for c in components):
        return "U"
    return "uid=10001,gid=10001"


def _runner(cfg: Config, containers: Containers, pipeline_root: Path, error_file: str, engine: Any) -> Any:
    from kfp import local

    from tlops import tracking

    uri = tracking.resolve_tracking_uri(cfg)
    if not uri.startswith(("http://", "https://", "databricks")):
        raise TlopsError(f"steps in containers need a tracking server they can reach, not {tracking.redact(uri)}: "
                         "set MLFLOW_TRACKING_URI (or tracking.uri) to its http:// URL")
    env = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    env.update({"MLFLOW_TRACKING_URI": uri, ERROR_FILE_ENV: error_file, **containers.env})
    args: dict[str, Any] = {
        "environment": env, "user": CONTAINER_USER, "network_mode": containers.network, "read_only": True,
        "tmpfs": {"/tmp": "rw,size=4g", CONTAINER_WORKDIR: f"rw,size=8g,{_owned_by_user(engine)}"},
    }
    if containers.hosts:
        args["extra_hosts"] = dict(containers.hosts)
    if containers.cpus:
        args["nano_cpus"] = int(containers.cpus * 1e9)
    # Trap: the pipeline root is bind-mounted at the same path and the steps run as an unprivileged user, so
    # it must be writable by that user (a root-owned mount is not).
    pipeline_root.mkdir(parents=True, exist_ok=True)
    pipeline_root.chmod(0o1777)
    return local.DockerRunner(**args)


def _failure(error_file: str, log_path: Path) -> TlopsError | None:
    if not Path(error_file).is_file():
        return None
    failure = json.loads(Path(error_file).read_text())
    message = failure["message"] + (f"; full log: {log_path}" if "(the step's log has the traceback)" in
                                    failure["message"] else "")
    return GateFailed(message) if failure["exit_code"] == 1 else TlopsError(message)


@dataclass
class Launch:
    """What a run has before its pipeline starts: its stamp, its log and, for steps run as subprocesses here, the
    step server's socket (None when turned off or when the steps run in containers)."""

    workdir: Path
    stamp: str
    log_path: Path
    server: str | None = None
    store: _NewStore | None = None
    started: bool = False  # the pipeline was started

    def ready(self) -> None:
        """Before the first step: the new store made ahead (if any) is in place."""
        self.started = True
        if self.store is not None:
            self.store.finish()
            self.store = None

    def abandon(self) -> None:
        """The launch failed: the store being made is dropped, not waited for."""
        if self.store is not None:
            self.store.drop()
            self.store = None


class _NewStore:
    """A new SQLite tracking store made ahead, in a process of its own, while the step server imports: MLflow
    creates a store by running every schema migration (2-3 s here), which the first step would otherwise pay.
    It is made under a temporary name and linked into place only when complete (never over a store that appeared
    meanwhile), so an interrupted launch leaves no half-made store; if anything fails, the steps make it as
    before and say what is wrong."""

    def __init__(self, cfg: Config, db: Path, log: Path) -> None:
        import subprocess

        self.db = db
        self.tmp = db.with_name(f".{db.name}.{os.getpid()}.new")
        ahead = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": f"sqlite:///{self.tmp}"})})
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tlops.tracking", "setup"], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=err)
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(ahead.to_json().encode())
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    @staticmethod
    def start(cfg: Config, log: Path) -> _NewStore | None:
        from tlops import tracking

        db = tracking.sqlite_path(tracking.resolve_tracking_uri(cfg))
        if db is None or db.exists() or not db.parent.is_dir():
            return None
        return _NewStore(cfg, db, log)

    def drop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._clean()

    def _clean(self) -> None:
        for leftover in (self.tmp, self.tmp.with_name(self.tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)

    def finish(self) -> None:
        try:
            if self.proc.wait() == 0:
                with contextlib.suppress(OSError):  # FileExistsError: a store appeared meanwhile, which wins
                    os.link(self.tmp, self.db)
        finally:
            self._clean()


@contextlib.contextmanager
def launched(cfg: Config, containers: Containers | None = None) -> Iterator[Launch]:
    """A run's stamp and log, and its step server started at once: enter it first (``tlops run`` does, before its
    checks, its imports of kfp and the DAG) so that the server imports what the steps need meanwhile."""
    workdir = Path(cfg.workdir).resolve()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    log_path = workdir / "logs" / f"run-{stamp}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server_log = log_path.with_name(f"stepserver-{stamp}.log")
    with contextlib.ExitStack() as stack:
        launch = Launch(workdir, stamp, log_path)
        if containers is None:  # in containers every step is its own container of the image: nothing to start
            launch.server = stack.enter_context(stepserver.running(log=server_log))
            launch.store = _NewStore.start(cfg, server_log)
        try:
            yield launch
        except BaseException:
            launch.abandon()
            if not launch.started:  # a bad input before any step: no log of a run that never started
                server_log.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # made for this launch, if nothing else is in it
                    log_path.parent.rmdir()
            raise
        launch.ready()


def run_local(data_uri: str, cfg: Config, verbose: bool = False,
              containers: Containers | None = None, launch: Launch | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the gate's summary, or raises TlopsError naming the failed step.
    ``launch``: from ``launched`` when the caller started the run's server before its own work."""
    if launch is None:
        with launched(cfg, containers) as launch:
            return run_local(data_uri, cfg, verbose, containers, launch)
    pipeline_root = launch.workdir / "pipeline_root"
    # The steps say how far they are as structured lines, which the view draws (tlops.progress).
    old_progress = os.environ.get(progress.ENV)
    os.environ[progress.ENV] = "json"
    try:
        with _steps_through(launch.server):
            return _run_steps(data_uri, cfg, verbose, containers, launch, pipeline_root)
    finally:
        if old_progress is None:
            os.environ.pop(progress.ENV, None)
        else:
            os.environ[progress.ENV] = old_progress


@contextlib.contextmanager
def _steps_through(server: str | None) -> Iterator[None]:
    """kfp.local's subprocess runner starting each step through the step server (``pipelines.stepserver``): the
    same command, ``python -m kfp.dsl.executor_main`` forked from a process that has its imports done."""
    if server is None:
        yield
        return
    from kfp.local import subprocess_task_handler as handler

    original = handler.run_local_subprocess

    def through_server(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        return original(stepserver.route_command(full_command, server), env_vars)

    handler.run_local_subprocess = through_server
    try:
        yield
    finally:
        handler.run_local_subprocess = original


def _run_steps(data_uri: str, cfg: Config, verbose: bool, containers: Containers | None, launch: Launch,
               pipeline_root: Path) -> dict[str, Any]:
    from kfp import local

    from pipelines.transfer_learning import transfer_learning_pipeline

    workdir, stamp, log_path = launch.workdir, launch.stamp, launch.log_path
    # Resource requests and limits are the cluster's business; kfp.local says so once per step.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    if containers is None:
        # Steps run in this very environment, where the project image's contents are installed.
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
        fd, error_file = tempfile.mkstemp(prefix="tlops-error-", suffix=".txt")
        os.close(fd)
        Path(error_file).unlink()
        pipeline: Any = transfer_learning_pipeline
        config_json = cfg.to_json()
    else:
        engine = _engine(containers.image)
        # The error file must be where a step container can write it: under the mounted pipeline root.
        error_file = str(pipeline_root / f".error-{stamp}.json")
        local.init(runner=_runner(cfg, containers, pipeline_root, error_file, engine),
                   pipeline_root=str(pipeline_root))
        pipeline = _compiled(cfg, containers, workdir / f"pipeline-{stamp}.yaml")
        config_json = cfg.model_copy(update={"workdir": CONTAINER_WORKDIR}).to_json()
    launch.ready()
    old = os.environ.get(ERROR_FILE_ENV)
    os.environ[ERROR_FILE_ENV] = error_file
    terminal = sys.stdout
    view = make_view(terminal)
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            tee = _Tee(log, view, verbose)
            try:
                with contextlib.redirect_stdout(tee):
                    try:
                        task = pipeline(data_uri=data_uri, config_json=config_json,
                                        pipeline_run=f"tlops-{stamp}")
                    finally:
                        view.close()
            # kfp's DockerRunner can call a failed container a success (removed before its exit code was read);
            # the next step then fails on the missing outputs, so any failure is checked against the error file.
            except Exception as exc:
                error = _failure(error_file, log_path)
                if error is not None:
                    raise error from None
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                lost = re.search(r"Tried to get output '[^']+' from task '([^']+)'", first)
                if lost:  # kfp's DockerRunner called a container that died (killed, out of memory) a success
                    raise TlopsError(f"{lost.group(1)}: the step ended without writing its outputs (its container "
                                     f"was killed or crashed); full log: {log_path}") from None
                raise TlopsError(f"pipeline failed: {first}; full log: {log_path}") from None
        error = _failure(error_file, log_path)
        if error is not None:
            raise error
    finally:
        if old is None:
            os.environ.pop(ERROR_FILE_ENV, None)
        else:
            os.environ[ERROR_FILE_ENV] = old
        Path(error_file).unlink(missing_ok=True)
    summary = json.loads(task.output)
    summary["log"] = str(log_path)
    summary["step_seconds"] = tee.seconds
    return summary
