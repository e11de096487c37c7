"""Start and schedule the compiled pipeline on a Kubeflow Pipelines cluster, through kfp's own REST client.

The one core module that talks to kfp, and only to its API client (``kfp.Client``, imported when a call is made):
the pipeline itself is compiled by ``pipelines.transfer_learning``. Every call is bounded in time
(``cluster.timeout_s``), and an unreachable host or an HTTP error becomes one ``TlopsError`` line (exit 2).
The token (``$KF_PIPELINES_TOKEN``) goes into the Authorization header only, never into output or errors.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import re
import socket
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tlops.config.settings import Config
from tlops.errors import TlopsError

TOKEN_ENV = "KF_PIPELINES_TOKEN"
ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"  # kfp.Client's own variable for the host
HEALTHZ_PATH = "/apis/v2beta1/healthz"
# KFP's scheduler substitutes these in run parameters: each scheduled run gets its own pipeline_run name, so its
# validate step looks at the data afresh instead of being answered from the cache.
SCHEDULED_RUN_SUFFIX = "-[[ScheduledTime]]"
# KFP cron (robfig/cron): six fields, seconds first.
CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-LW#]+$")


@dataclass(frozen=True)
class Submitted:
    run_id: str
    run_name: str
    experiment_id: str
    url: str


@dataclass(frozen=True)
class Schedule:
    recurring_run_id: str
    name: str
    enabled: bool
    cron: str
    max_concurrency: str
    no_catchup: bool
    created_at: str


def resolve_host(host: str | None, cfg: Config) -> str:
    """``--host``, else ``cluster.host``, else ``$KF_PIPELINES_ENDPOINT``; an http(s) URL without a trailing /."""
    chosen = host or cfg.cluster.host or os.environ.get(ENDPOINT_ENV)
    if not chosen:
        raise TlopsError(f"no Kubeflow Pipelines host: pass --host URL (or set cluster.host, or {ENDPOINT_ENV}), "
                         "for example --host http://127.0.0.1:8080 after kubectl port-forward")
    if not re.match(r"^https?://[^/\s]+", chosen):
        raise TlopsError(f"--host {chosen!r}: expected an http:// or https:// URL of the Kubeflow Pipelines API")
    return chosen.rstrip("/")


def check_cluster_data(cfg: Config) -> None:
    """A step's pod cannot see this machine's files: the data must be in object storage."""
    if "://" not in cfg.data.uri:
        raise TlopsError(f"data {cfg.data.uri}: a cluster run reads its data from object storage; "
                         "pass --data s3://bucket/prefix")


def check_cron(cron: str) -> str:
    fields = cron.split()
    if len(fields) != 6 or not all(CRON_FIELD.match(f) for f in fields):
        raise TlopsError(f"--cron {cron!r}: expected 6 fields (second minute hour day-of-month month day-of-week), "
                         "for example '0 0 3 * * *' for 03:00 every day")
    return " ".join(fields)


def pipeline_arguments(cfg: Config, pipeline_run: str, host: str | None = None) -> dict[str, str]:
    """The run's arguments: the full config (with ``cluster.host`` set to ``host``, so that the MLflow run can
    link back to the KFP run), its data URI and the run's name; the typed parameters stay unset, so the config
    decides."""
    if host:
        cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"host": host})})
    return {"data_uri": cfg.data.uri, "config_json": cfg.to_json(), "pipeline_run": pipeline_run}


def default_run_name(cfg: Config) -> str:
    return f"{cfg.registry.model_name}-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}"


def _error_detail(body: Any) -> str:
    """The server's own message from a KFP error body (JSON ``message``/``error``), on one short line."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    try:
        loaded = json.loads(text)
        if isinstance(loaded, dict):
            text = str(loaded.get("message") or loaded.get("error") or text)
    except ValueError:
        pass
    line = " ".join(text.split())
    return line[:200] + ("…" if len(line) > 200 else "")


def _unreachable(host: str, reason: object) -> TlopsError:
    return TlopsError(f"cannot reach Kubeflow Pipelines at {host} ({reason}): check --host, and that the API answers "
                      f"there (for example kubectl port-forward -n kubeflow svc/ml-pipeline 8080:8888)")


def _http_error(host: str, status: object, reason: object, body: Any) -> TlopsError:
    detail = _error_detail(body)
    hint = " (check KF_PIPELINES_TOKEN)" if status in (401, 403) else ""
    return TlopsError(f"Kubeflow Pipelines at {host} answered HTTP {status} {reason}{hint}"
                      + (f": {detail}" if detail else ""))


def _auth_headers() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _bounded_calls(host: str, timeout_s: float) -> Iterator[None]:
    """kfp's client calls with a socket timeout, its prints and warnings kept off the terminal, and its errors
    turned into one line."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # urllib3's default timeout is the socket module's
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    except ApiException as exc:
        if not exc.status:  # kfp_server_api reports TLS failures with status 0
            raise _unreachable(host, exc.reason) from None
        raise _http_error(host, exc.status, exc.reason, exc.body) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise _unreachable(host, str(reason).split(": ")[-1]) from None
    finally:
        socket.setdefaulttimeout(previous)


def check_reachable(host: str, timeout_s: float) -> None:
    """One bounded GET of the health endpoint; kfp's own check would retry five times, five seconds apart."""
    # No proxies from the environment, as kfp's client uses none either.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(host + HEALTHZ_PATH, headers=_auth_headers())
    try:
        with opener.open(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise _http_error(host, exc.code, exc.reason, exc.read()) from None
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(host, getattr(exc, "reason", None) or exc) from None


def connect(host: str, cfg: Config) -> Any:
    """A ``kfp.Client`` for ``host``, after a bounded reachability check."""
    check_reachable(host, cfg.cluster.timeout_s)
    with _bounded_calls(host, cfg.cluster.timeout_s):
        import kfp

        return kfp.Client(host=host, namespace=cfg.cluster.namespace or "kubeflow",
                          existing_token=os.environ.get(TOKEN_ENV) or None)


def submit(package: str, cfg: Config, host: str, experiment: str | None = None, run_name: str | None = None,
           no_cache: bool = False) -> Submitted:
    """Start one run of the compiled ``package`` in ``experiment`` (created when missing)."""
    check_cluster_data(cfg)
    run_name = run_name or default_run_name(cfg)
    client = connect(host, cfg)
    with _bounded_calls(host, cfg.cluster.timeout_s):
        result = client.create_run_from_pipeline_package(
            package, arguments=pipeline_arguments(cfg, run_name, host), run_name=run_name,
            experiment_name=experiment or cfg.cluster.experiment, namespace=cfg.cluster.namespace,
            # False turns the cache off for every step; None keeps the compiled per-step choice. Never True:
            # that would let evaluate and gate be answered from the cache.
            enable_caching=False if no_cache else None, service_account=cfg.cluster.service_account)
    return Submitted(run_id=result.run_id, run_name=run_name, experiment_id=str(result.run_info.experiment_id),
                     url=f"{host}/#/runs/details/{result.run_id}")


def list_schedules(cfg: Config, host: str, client: Any = None) -> list[Schedule]:
    """Every recurring run the API lists (in ``cluster.namespace`` when set), all pages."""
    client = client or connect(host, cfg)
    found: list[Schedule] = []
    token = ""
    with _bounded_calls(host, cfg.cluster.timeout_s):
        while True:
            page = client.list_recurring_runs(page_token=token, page_size=100, namespace=cfg.cluster.namespace)
            for run in page.recurring_runs or []:
                cron = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else ""
                found.append(Schedule(recurring_run_id=run.recurring_run_id, name=run.display_name or "",
                                      enabled=run.mode == "ENABLE", cron=cron or "",
                                      max_concurrency=str(run.max_concurrency or ""), no_catchup=bool(run.no_catchup),
                                      created_at=run.created_at.isoformat(timespec="seconds")
                                      if run.created_at else ""))
            token = page.next_page_token or ""
            if not token:
                return found


def create_schedule(package: str, cfg: Config, host: str, name: str, cron: str,
                    experiment: str | None = None) -> Schedule:
    """A recurring run of ``package``: no catch-up after a pause, at most one run at a time. Refuses a second
    enabled schedule of the same name (two would retrain twice)."""
    check_cluster_data(cfg)
    cron = check_cron(cron)
    client = connect(host, cfg)
    twins = [s for s in list_schedules(cfg, host, client) if s.name == name and s.enabled]
    if twins:
        raise TlopsError(f"an enabled recurring run named {name!r} exists (id {twins[0].recurring_run_id}): "
                         f"disable it first with 'tlops schedule --disable {twins[0].recurring_run_id}', "
                         "or choose another --name")
    with _bounded_calls(host, cfg.cluster.timeout_s):
        exp = client.create_experiment(experiment or cfg.cluster.experiment, namespace=cfg.cluster.namespace)
        run = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=name, cron_expression=cron, max_concurrency=1,
            no_catchup=True, params=pipeline_arguments(cfg, name + SCHEDULED_RUN_SUFFIX, host),
            pipeline_package_path=package, enabled=True, service_account=cfg.cluster.service_account)
    return Schedule(recurring_run_id=run.recurring_run_id, name=name, enabled=True, cron=cron, max_concurrency="1",
                    no_catchup=True, created_at="")


def disable_schedule(cfg: Config, host: str, name_or_id: str) -> Schedule:
    """Disable the recurring run with this id, or the one enabled recurring run with this name."""
    client = connect(host, cfg)
    schedules = list_schedules(cfg, host, client)
    match = [s for s in schedules if s.recurring_run_id == name_or_id]
    if not match:
        named = [s for s in schedules if s.name == name_or_id]
        match = [s for s in named if s.enabled] or named
        if len(match) > 1:
            raise TlopsError(f"{len(match)} recurring runs are named {name_or_id!r} "
                             f"({', '.join(s.recurring_run_id for s in match)}): pass the id to --disable")
    if not match:
        raise TlopsError(f"no recurring run named {name_or_id!r} or with that id on {host}: "
                         "'tlops schedule --list' shows them")
    with _bounded_calls(host, cfg.cluster.timeout_s):
        client.disable_recurring_run(match[0].recurring_run_id)
    return match[0]


def format_schedules(schedules: list[Schedule]) -> str:
    if not schedules:
        return "no recurring runs"
    rows = [("ID", "NAME", "STATE", "CRON", "MAX CONCURRENT", "CATCH-UP", "CREATED (UTC)")]
    rows += [(s.recurring_run_id, s.name, "enabled" if s.enabled else "disabled", s.cron, s.max_concurrency,
              "no" if s.no_catchup else "yes", s.created_at) for s in schedules]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
