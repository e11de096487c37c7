"""The prediction log: batches written by its own thread into day partitions, read back by window; a store that
hangs or fails drops and counts records and never holds the caller; files in the log that are not its parts are
one clear error."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlops.errors import TlopsError
from tlops.serving.predlog import PredictionLog, Served, parse_when, read_log

INFO = {"name": "digits", "version": "3", "classes": ["0", "1", "7"], "preprocess_fingerprint": "f" * 64}
DAY1 = dt.datetime(2026, 11, 30, 23, 59, 0, tzinfo=dt.UTC).timestamp()
DAY2 = dt.datetime(2026, 12, 1, 0, 0, 1, tzinfo=dt.UTC).timestamp()


@pytest.fixture(scope="module")
def digit_files(tiny_digits: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(tiny_digits.rglob("*.png"))[:12]]


def _served(images: list[bytes], when: float, seed: int = 0) -> list[Served]:
    rng = np.random.default_rng(seed)
    proba = rng.dirichlet(np.ones(3), size=len(images)).astype(np.float32)
    emb = rng.normal(size=(len(images), 8)).astype(np.float32)
    return [Served(when, INFO, b, proba[i], emb[i]) for i, b in enumerate(images)]


def test_batches_land_in_day_partitions_and_read_back_by_window(tmp_path: Path, digit_files: list[bytes]) -> None:
    log = PredictionLog(str(tmp_path / "log"), batch_records=4, flush_s=60, keep_images=False, top_k=2)
    items = _served(digit_files[:6], DAY1) + _served(digit_files[6:], DAY2, seed=1)
    assert all(log.offer(item) for item in items)
    log.close()
    assert log.written == 12 and log.dropped == {"queue_full": 0, "store_error": 0}
    days = sorted(p.name for p in (tmp_path / "log").iterdir())
    assert days == ["day=2026-11-30", "day=2026-12-01"]
    parts = sorted((tmp_path / "log").rglob("*.parquet"))
    assert len(parts) == log.files >= 3  # batches of 4, one file per day within each batch
    assert not [p for p in (tmp_path / "log").rglob("*") if p.name.startswith(".")]  # no temporary left

    frame = read_log(str(tmp_path / "log"))
    assert len(frame) == 12
    sha = hashlib.sha256(digit_files[0]).hexdigest()
    first = frame[frame["image_sha256"] == sha].iloc[0]  # within a second, the order of files is not kept
    with Image.open(io.BytesIO(digit_files[0])) as img:
        assert (first["width"], first["height"], first["mode"]) == (img.width, img.height, img.mode)
    assert frame["image_sha256"].nunique() == 12
    assert first["model_name"] == "digits" and first["model_version"] == "3"
    assert first["preprocess_fingerprint"] == "f" * 64
    probs = items[0].proba
    assert first["predicted"] == INFO["classes"][int(np.argmax(probs))]
    assert first["confidence"] == pytest.approx(float(probs.max()))
    assert len(first["top_classes"]) == 2 and list(first["top_probabilities"]) == sorted(first["top_probabilities"],
                                                                                          reverse=True)
    np.testing.assert_allclose(first["embedding"], items[0].embedding)
    assert first["image"] is None  # bytes are kept only when asked for
    assert 0.0 <= first["brightness"] <= 1.0

    second_day = read_log(str(tmp_path / "log"), since=dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    assert len(second_day) == 6
    assert len(read_log(str(tmp_path / "log"), until=dt.datetime(2026, 12, 1, tzinfo=dt.UTC))) == 6


def test_image_bytes_are_kept_when_asked_for(tmp_path: Path, digit_files: list[bytes]) -> None:
    log = PredictionLog(str(tmp_path), batch_records=100, flush_s=60, keep_images=True)
    for item in _served(digit_files[:3], DAY2):
        log.offer(item)
    log.close()
    assert list(read_log(str(tmp_path))["image"]) == digit_files[:3]


def test_a_flush_interval_writes_a_partial_batch(tmp_path: Path, digit_files: list[bytes]) -> None:
    log = PredictionLog(str(tmp_path), batch_records=1000, flush_s=0.2)
    log.offer(_served(digit_files[:1], time.time())[0])
    deadline = time.monotonic() + 10
    while log.written == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.written == 1  # without close: the interval flushed it
    log.close()


@pytest.fixture
def silent_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 endpoint that accepts connections and never answers: a store that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                       "TLOPS_S3_READ_TIMEOUT": "0.5", "TLOPS_S3_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    try:
        yield "s3://logs/predictions"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def test_a_hanging_store_drops_and_counts_and_never_holds_the_caller(silent_s3: str,
                                                                     digit_files: list[bytes]) -> None:
    log = PredictionLog(silent_s3, batch_records=1, flush_s=60, max_queue=1)
    items = _served(digit_files, time.time()) * 5  # 60 records
    started = time.perf_counter()
    accepted = [log.offer(item) for item in items]
    offering = time.perf_counter() - started
    assert offering < 0.5  # 60 offers while the store hangs: no wait
    assert accepted.count(False) == log.dropped["queue_full"] >= 55
    log.close(timeout=30)
    assert log.written == 0
    assert log.dropped["store_error"] + log.dropped["queue_full"] == len(items)


def test_a_failing_store_counts_the_batch_as_dropped(tmp_path: Path, digit_files: list[bytes]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the log cannot be a directory under a file")
    log = PredictionLog(str(blocker / "log"), batch_records=2, flush_s=60)
    for item in _served(digit_files[:5], time.time()):
        log.offer(item)
    log.close()
    assert (log.written, log.dropped["store_error"]) == (0, 5)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("day=2026-12-01/notes.txt", b"a note", "is not a prediction log file"),
    ("misc/part-1.parquet", b"x", "is not a prediction log file"),
    ("day=2026-12-01/part-20261201T000000-bad.parquet", b"PAR1 this is not parquet", "cannot be read as Parquet"),
    ("day=2026-12-01/part-20261201T000000-foreign.parquet", None, "is not a tlops prediction log"),
])
def test_a_file_that_is_not_a_log_part_is_one_clear_error(tmp_path: Path, digit_files: list[bytes], name: str,
                                                          content: bytes | None, message: str) -> None:
    log = PredictionLog(str(tmp_path), batch_records=10, flush_s=60)
    for item in _served(digit_files[:2], DAY2):
        log.offer(item)
    log.close()
    target = tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if content is None:  # valid Parquet, someone else's
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": [1, 2]}), target)
    else:
        target.write_bytes(content)
    with pytest.raises(TlopsError, match=message) as err:
        read_log(str(tmp_path))
    assert name.split("/")[-1] in str(err.value) and "\n" not in str(err.value)


def test_missing_log_and_times() -> None:
    with pytest.raises(TlopsError, match="does not exist"):
        read_log(os.path.join("/nonexistent", "log"))
    now = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC)
    assert parse_when("24h", now) == dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)
    assert parse_when("2026-12-01", now) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    with pytest.raises(TlopsError, match="not a time"):
        parse_when("yesterday", now)
