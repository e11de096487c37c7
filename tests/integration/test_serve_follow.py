"""`tlops serve --model models:/NAME@champion` follows the alias on a real `mlflow server` registry: under
constant traffic, a promotion and then a rollback reach the running server within its poll interval, every
request is answered, and each answer says (header ``x-model-version``) which version gave it."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.registry import log_model_run, new_version, use_store
from tests.integration.test_serve import (
    _b64,
    running_serve,
)

pytestmark = pytest.mark.integration
NAME = "serve-follow"
POLL_S = 1.0


class Traffic:
    """Clients that post the same digit over and over on keep-alive connections, recording every answer."""

    def __init__(self, port: int, body: bytes, clients: int = 3) -> None:
        self.port, self.body = port, body
        self.answers: list[list[tuple[int, str | None, str | None]]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            try:
                conn.request("POST", "/invocations", body=self.body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
            except OSError as exc:
                self.answers[i].append((0, None, f"{type(exc).__name__}: {exc}"))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            label = json.loads(raw)["predictions"][0]["label"] if resp.status == 200 else raw.decode()[:200]
            self.answers[i].append((resp.status, resp.getheader("x-model-version"), label))
            time.sleep(0.02)
        conn.close()

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def latest(self) -> set[str | None]:
        return {per[-1][1] for per in self.answers if per}

    def wait_for(self, version: str, timeout: float) -> float:
        """Seconds until every client's latest answer came from ``version``."""
        start = time.monotonic()
        while self.latest() != {version}:
            assert time.monotonic() - start < timeout, f"still answered by {self.latest()} after {timeout} s"
            time.sleep(0.1)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def zero(tiny_digits: Path) -> bytes:
    return sorted((tiny_digits / "0").glob("*.png"))[0].read_bytes()


def test_a_promotion_and_a_rollback_reach_a_running_server_without_a_failed_request(
        mlflow_server: str, tiny_models: dict, tmp_path_factory: pytest.TempPathFactory, zero: bytes) -> None:
    from tlops import registry

    with running_serve(mlflow_server, tiny_models["good"], NAME, tmp_path_factory.mktemp("follow"),
                       "--poll-s", str(POLL_S)) as server:
        first = server["version"]
        # The challenger: the same model with the heads of 0 and 1 swapped, so a 0 tells the versions apart.
        _run, uri = log_model_run(use_store(mlflow_server, experiment=NAME), tiny_models["worse"])
        second = new_version(uri, NAME)
        body = json.dumps({"inputs": {"image": [_b64(zero)]}}).encode()
        with Traffic(server["port"], body) as traffic:
            traffic.wait_for(first, 30)
            registry.promote(NAME, second, reason="alias-follow test", force=True)
            promoted_in = traffic.wait_for(second, 30)
            registry.rollback(NAME, reason="alias-follow test")
            rolled_back_in = traffic.wait_for(first, 30)
            time.sleep(0.5)
        log = server["log"].read_text()

    answers = [a for per in traffic.answers for a in per]
    failed = [a for a in answers if a[0] != 200]
    assert not failed, failed[:5]
    assert {(version, label) for _status, version, label in answers} == {(first, "0"), (second, "1")}
    for per in traffic.answers:  # each client: first version, then the second, then the first again
        runs = [v for i, (_s, v, _l) in enumerate(per) if i == 0 or per[i - 1][1] != v]
        assert runs == [first, second, first], runs
    # Within a poll interval plus the load of a small model, on a loaded machine.
    assert promoted_in < 20 and rolled_back_in < 20, (promoted_in, rolled_back_in)
    assert f"now names version {second}" in log and f"now names version {first}" in log
    assert "Traceback" not in log
    print(f"{len(answers)} requests, promotion served after {promoted_in:.1f} s, rollback after {rolled_back_in:.1f} s")
