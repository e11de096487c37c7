"""Fixtures shared by the integration tests: an S3 endpoint (moto's server mode) on loopback, data in it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# A recognisable secret: tests assert it never reaches logs, the tracking store or any artifact.
S3_SECRET = "tlops-test-secret-5f1c2e"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1; its address and credentials are in os.environ for the module's tests."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(s3_endpoint: dict[str, str], tiny_digits: Path) -> str:
    """The tiny digits uploaded to s3://images/digits on the endpoint."""
    from tests.helpers.data import upload_dir
    from tlops.data.storage import s3_client

    s3_client().create_bucket(Bucket="images")
    assert upload_dir(tiny_digits, "s3://images/digits") == 90
    return "s3://images/digits"
