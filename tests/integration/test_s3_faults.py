"""An S3 endpoint that answers 503 now and then: boto3's configured retries (standard mode,
``TLOPS_S3_MAX_ATTEMPTS``) carry the work through; with retries off the same endpoint is one clear error.

The faults come from a real HTTP proxy on 127.0.0.1 in front of moto's server: one request in seven gets
``503 SlowDown``, the others are forwarded unchanged."""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.integration

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyProxy(http.server.ThreadingHTTPServer):
    def __init__(self, upstream: str, every: int) -> None:
        self.upstream, self.every = urlsplit(upstream), every
        self.count, self.failed, self.lock = 0, 0, threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def should_fail(self) -> bool:
        with self.lock:
            self.count += 1
            fail = self.every > 0 and self.count % self.every == 0
            self.failed += fail
            return fail


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FlakyProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.should_fail():
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(SLOW_DOWN)
            return
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay


@pytest.fixture
def flaky(s3_endpoint: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """The S3 endpoint, behind a proxy that answers 503 to every seventh request."""
    proxy = FlakyProxy(s3_endpoint["AWS_ENDPOINT_URL"], every=7)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_retries_carry_manifest_and_checkpoints_through_503s(flaky: FlakyProxy, bucket: str, tmp_path: Path,
                                                             tiny_digits: Path) -> None:
    import torch

    from tlops.data.discovery import build_manifest
    from tlops.training.checkpoints import CheckpointStore

    df = build_manifest(bucket, tmp_path / "cache")
    local = build_manifest(str(tiny_digits), tmp_path / "local-cache")
    assert sorted(df["sha256"]) == sorted(local["sha256"]) and df["decodable"].all()
    store = CheckpointStore("s3://images/checkpoints/run", tmp_path / "ckpt-cache")
    for step in range(4):
        store.save("last.pt", {"model": torch.full((16,), float(step)), "global_step": step})
    fresh = CheckpointStore("s3://images/checkpoints/run", tmp_path / "other-cache")
    fresh.sync_down()
    assert fresh.load("last.pt")["global_step"] == 3  # type: ignore[index]
    assert flaky.failed >= 10, (flaky.count, flaky.failed)


def test_without_retries_the_same_endpoint_is_one_clear_error(flaky: FlakyProxy, bucket: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tlops.data.discovery import build_manifest
    from tlops.errors import TlopsError

    monkeypatch.setenv("TLOPS_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(TlopsError) as err:
        build_manifest(bucket, tmp_path / "cache")
    message = str(err.value)
    assert "s3://images" in message and "SlowDown" in message and "\n" not in message, message


def test_validate_cli_through_a_flaky_endpoint(flaky: FlakyProxy, bucket: str, tmp_path: Path) -> None:
    import os

    cfg = write_config(tmp_path / "tlops.yaml", tmp_path / ".tlops")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    proc = run_cli("validate", "--data", bucket, "--config", str(cfg), cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert flaky.failed >= 10, (flaky.count, flaky.failed)
