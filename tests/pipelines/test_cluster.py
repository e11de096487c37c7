"""`tlops submit` and `tlops schedule` against a recording KFP v2beta1 API on loopback.

The server answers the REST calls kfp's own client sends (paths from kfp_server_api) with minimal valid JSON and
keeps the recurring runs it was given, so list and disable see what create made. The tests check method, path and
body of what the real `tlops` process sent.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import free_port, ir_tasks, run_cli

API = "/apis/v2beta1"
TOKEN = "kfp-token-not-to-be-printed"


class KfpApi(ThreadingHTTPServer):
    """Records every request; answers like the KFP API server for the calls tlops makes."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.recurring: dict[str, dict[str, Any]] = {}
        self.fail: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}

    def reset(self) -> None:
        self.requests.clear()
        self.experiments.clear()
        self.recurring.clear()
        self.fail.clear()

    def calls(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: KfpApi

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.server.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                     "body": body, "authorization": self.headers.get("Authorization")})
        if (method, url.path) in self.server.fail:
            self._answer(*self.server.fail[(method, url.path)])
            return
        self._answer(*self._route(method, url.path, body or {}))

    def _route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        srv = self.server
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", f"{API}/experiments"):
            return 200, {"experiments": list(srv.experiments.values())} if srv.experiments else {}
        if (method, path) == ("POST", f"{API}/experiments"):
            exp = {"experiment_id": f"exp-{len(srv.experiments) + 1}", "display_name": body["display_name"]}
            srv.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if (method, path) == ("POST", f"{API}/runs"):
            return 200, {"run_id": "run-1", "display_name": body["display_name"],
                         "experiment_id": body["experiment_id"], "state": "PENDING"}
        if (method, path) == ("POST", f"{API}/recurringruns"):
            run = {**body, "recurring_run_id": f"rr-{len(srv.recurring) + 1}", "created_at": "2026-11-23T05:00:00Z"}
            run.pop("pipeline_spec", None)
            srv.recurring[run["recurring_run_id"]] = run
            return 200, run
        if (method, path) == ("GET", f"{API}/recurringruns"):
            # The API names this one field in camelCase (kfp_server_api V2beta1ListRecurringRunsResponse).
            return 200, {"recurringRuns": list(srv.recurring.values()), "total_size": len(srv.recurring)}
        if method == "POST" and path.startswith(f"{API}/recurringruns/") and path.endswith(":disable"):
            rid = path[len(f"{API}/recurringruns/"):-len(":disable")]
            if rid not in srv.recurring:
                return 404, {"error": f"recurring run {rid} not found", "code": 5}
            srv.recurring[rid]["mode"] = "DISABLE"
            return 200, {}
        return 404, {"error": f"no route {method} {path}", "code": 5}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")


@pytest.fixture(scope="module")
def kfp_api() -> Iterator[KfpApi]:
    server = KfpApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def api(kfp_api: KfpApi) -> KfpApi:
    kfp_api.reset()
    return kfp_api


def tlops(*args: str, cwd: Path) -> Any:
    # HOME: kfp's client reads ~/.config/kfp/context.json; the token comes from the environment only.
    return run_cli(*args, cwd=cwd, env={"HOME": str(cwd), "KF_PIPELINES_TOKEN": TOKEN}, timeout=120)


def pipeline_doc(body: dict[str, Any]) -> dict[str, Any]:
    """The IR document inside a run or recurring-run body (kfp sends IR and platform spec together)."""
    spec = body["pipeline_spec"]
    return spec.get("pipeline_spec", spec)


def test_submit_starts_a_run_with_the_compiled_pipeline(api: KfpApi, tmp_path: Path) -> None:
    result = tlops("submit", "--host", api.url, "--experiment", "nightly", "--data", "s3://bucket/digits",
                   "--run-name", "try-1", "--image", "registry.example/tlops:7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "run-1" in result.stdout and f"{api.url}/#/runs/details/run-1" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in api.requests)
    assert api.calls("GET", f"{API}/healthz")
    created = api.calls("POST", f"{API}/experiments")
    assert [c["body"]["display_name"] for c in created] == ["nightly"]
    (run,) = api.calls("POST", f"{API}/runs")
    body = run["body"]
    assert body["display_name"] == "try-1" and body["experiment_id"] == "exp-1"
    params = body["runtime_config"]["parameters"]
    assert params["data_uri"] == "s3://bucket/digits" and params["pipeline_run"] == "try-1"
    assert json.loads(params["config_json"])["cluster"]["image"] == "registry.example/tlops:7"
    ir = pipeline_doc(body)
    assert ir["pipelineInfo"]["name"] == "tlops-transfer-learning"
    assert set(ir_tasks(ir)) == {"validate", "parity", "fine-tune", "evaluate", "compress", "gate", "skip"}
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/tlops:7"}
    # The platform spec (secrets) travels with it, and the compiled caching choice is kept.
    assert "kubernetes" in body["pipeline_spec"]["platform_spec"]["platforms"]
    assert ir_tasks(ir)["validate"]["cachingOptions"].get("enableCache") is True


def test_schedule_creates_lists_and_disables_a_recurring_run(api: KfpApi, tmp_path: Path) -> None:
    made = tlops("schedule", "--host", api.url, "--cron", "0 0 3 * * *", "--name", "retrain",
                 "--data", "s3://bucket/digits", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "rr-1" in made.stdout
    (call,) = api.calls("POST", f"{API}/recurringruns")
    body = call["body"]
    assert body["display_name"] == "retrain" and body["experiment_id"] == "exp-1"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert body["no_catchup"] is True and str(body["max_concurrency"]) == "1" and body["mode"] == "ENABLE"
    # Each scheduled run gets its own pipeline_run (KFP fills in the time), so validate is not a cache hit.
    assert body["runtime_config"]["parameters"]["pipeline_run"] == "retrain-[[ScheduledTime]]"
    assert set(ir_tasks(pipeline_doc(body))) >= {"validate", "gate"}

    again = tlops("schedule", "--host", api.url, "--cron", "0 0 4 * * *", "--name", "retrain",
                  "--data", "s3://bucket/digits", cwd=tmp_path)
    assert again.returncode == 2 and "rr-1" in again.stderr and "--disable" in again.stderr
    assert len(api.calls("POST", f"{API}/recurringruns")) == 1

    listed = tlops("schedule", "--host", api.url, "--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("rr-1"))
    assert "retrain" in row and "enabled" in row and "0 0 3 * * *" in row

    off = tlops("schedule", "--host", api.url, "--disable", "retrain", cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert [c["path"] for c in api.requests if c["method"] == "POST"][-1] == f"{API}/recurringruns/rr-1:disable"
    assert api.recurring["rr-1"]["mode"] == "DISABLE"
    assert TOKEN not in made.stdout + made.stderr + listed.stdout + off.stdout


def test_unreachable_host_and_http_errors_are_one_line_exit_2(api: KfpApi, tmp_path: Path) -> None:
    down = tlops("submit", "--host", f"http://127.0.0.1:{free_port()}", "--data", "s3://b/p", cwd=tmp_path)
    assert down.returncode == 2
    assert down.stderr.strip().count("\n") == 0 and "cannot reach Kubeflow Pipelines" in down.stderr
    api.fail[("POST", f"{API}/runs")] = (403, {"error": "user may not create runs", "code": 7})
    refused = tlops("submit", "--host", api.url, "--data", "s3://b/p", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "HTTP 403" in refused.stderr and "user may not create runs" in refused.stderr
    assert "Traceback" not in refused.stderr and TOKEN not in refused.stderr + refused.stdout
    missing = tlops("schedule", "--host", api.url, "--disable", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "no recurring run named 'nope'" in missing.stderr


def test_a_host_that_never_answers_fails_within_the_timeout(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        started = time.monotonic()
        hung = tlops("submit", "--host", f"http://127.0.0.1:{silent.getsockname()[1]}", "--data", "s3://b/p",
                     "--set", "cluster.timeout_s=1", cwd=tmp_path)
        elapsed = time.monotonic() - started
    assert hung.returncode == 2 and hung.stderr.strip().count("\n") == 0
    assert "cannot reach Kubeflow Pipelines" in hung.stderr and "timed out" in hung.stderr
    assert elapsed < 30
